//! The supervisor is replaceable too: a live update of the supervisor itself (an exec
//! of the new binary in the same process), a new binary that fails to take over (the old
//! one resumes in charge), and a supervisor killed outright (the components serve on and
//! a new supervisor adopts them). In each: no workload error, held files keep working,
//! the history and the sequence number survive (a replayed package is refused), and the
//! image checks clean.
//!
//! The supervisor variants come from `scripts/build-examples.sh --bins-only`: `fsd-sup2`
//! (supervisor 0.1.0+sup2) and `fsd-takeover-fault` (panics while taking over).

use std::path::{Path, PathBuf};
use std::time::Duration;

use molt_tests::harness::{alive, kill9, poll_until, supervisor_pid, Keyring, TempDir, TestImage};

use super::live::{
    apply, component, distinct_copy, fsd_manifest, last_outcome, mount_live, pack, status,
    variants, Held, Load, COMMITTED, EXPIRES, REFUSED, ROLLED_BACK,
};

/// A package replacing the supervisor with `binary`, which says it is `to`.
fn supervisor_package(
    keys: &Keyring,
    work: &Path,
    name: &str,
    sequence: u64,
    to: &str,
    binary: &Path,
) -> PathBuf {
    let manifest = format!(
        "[package]\n\
         name = {name:?}\n\
         sequence = {sequence}\n\
         expires_unix = {EXPIRES}\n\
         nature = \"one-component\"\n\
         deadline_ms = 10000\n\n\
         [[component]]\n\
         name = \"supervisor\"\n\
         applies_to = [\"0.1.0\"]\n\
         new_version = {to:?}\n\
         binary = \"bin/fsd\"\n\
         state_schema_reads = [1]\n\
         state_schema_writes = 1\n\n\
         [[file]]\n\
         path = \"bin/fsd\"\n"
    );
    pack(keys, &work.join(name), &manifest, &[("bin/fsd", binary)])
}

/// An fsd package (a byte-distinct copy of the running build, same version).
fn fsd_package(keys: &Keyring, work: &Path, name: &str, sequence: u64) -> PathBuf {
    let copy = work.join(format!("{name}-fsd"));
    distinct_copy(&molt_tests::harness::bin("fsd"), &copy, name);
    pack(
        keys,
        &work.join(name),
        &fsd_manifest(name, sequence, "0.1.0", "0.1.0", &["quiescent"]),
        &[("bin/fsd", &copy)],
    )
}

fn supervisor_of(st: &serde_json::Value) -> (String, u64, String) {
    let s = &st["supervisor"];
    (
        s["version"].as_str().unwrap_or_default().to_string(),
        s["pid"].as_u64().unwrap_or(0),
        s["how"].as_str().unwrap_or_default().to_string(),
    )
}

fn history_len(st: &serde_json::Value) -> usize {
    st["history"].as_array().map_or(0, Vec::len)
}

/// A supervisor package applied while the stress workload runs with files held open:
/// it commits in the same process (same pid, same components), the workload sees no
/// error, the history and sequence survive (the package replayed is refused), and every
/// later updater command works, a component update included.
#[test]
fn a_live_update_of_the_supervisor_keeps_the_mount_and_its_history() {
    let img = TestImage::new("sup-update", "256M");
    let keys = Keyring::new("sup-update-keys");
    let work = TempDir::new("sup-update-work");
    let bins = variants(work.path());
    let m = mount_live(&img, &keys, None);
    let mut held = Held::open(m.path());
    let load = Load::start(m.path(), 3, "read=40,write=40,meta=20");

    let first = fsd_package(&keys, work.path(), "fsd-before", 1);
    let r = apply(m.path(), &first, &[]);
    assert_eq!(
        r.code, COMMITTED,
        "the fsd update did not commit:\n{}",
        r.out
    );
    let before = status(m.path());
    let (version, sup_pid, how) = supervisor_of(&before);
    assert_eq!(
        (version.as_str(), how.as_str()),
        ("0.1.0", "mount"),
        "{before}"
    );
    let server = component(&before, "fsd");

    let pkg = supervisor_package(
        &keys,
        work.path(),
        "supervisor-sup2",
        2,
        "0.1.0+sup2",
        &bins.join("fsd-sup2"),
    );
    let r = apply(m.path(), &pkg, &[]);
    assert_eq!(
        r.code, COMMITTED,
        "the supervisor update did not commit:\n{}",
        r.out
    );
    let after = status(m.path());
    let (version, pid, how) = supervisor_of(&after);
    assert_eq!(version, "0.1.0+sup2", "{after}");
    assert_eq!(pid, sup_pid, "the new supervisor runs in the same process");
    assert_eq!(how, "live update");
    assert_eq!(
        component(&after, "fsd"),
        server,
        "the server was not touched"
    );
    assert_eq!(history_len(&after), 2, "history: {after}");
    let (outcome, message) = last_outcome(&after);
    assert!(outcome.contains("committed"), "{outcome}: {message}");

    // The sequence survived the exec: the same package again is refused.
    let again = apply(m.path(), &pkg, &[]);
    assert_eq!(
        again.code, REFUSED,
        "a replayed package was not refused:\n{}",
        again.out
    );
    assert!(
        again.failed_checks().contains(&"sequence".to_string()),
        "{}",
        again.out
    );
    // The new supervisor updates components as the old one did.
    let later = fsd_package(&keys, work.path(), "fsd-after", 3);
    let r = apply(m.path(), &later, &[]);
    assert_eq!(
        r.code, COMMITTED,
        "an fsd update after the supervisor's:\n{}",
        r.out
    );
    assert_ne!(component(&status(m.path()), "fsd"), server);

    held.check();
    load.finish();
    drop(held);
    m.unmount();
    img.assert_clean();
}

/// A new supervisor binary that fails while taking over (a build that panics there)
/// hands the mount back: the old supervisor resumes in the same process, reports the
/// update rolled back, and the workload sees nothing.
#[test]
fn a_supervisor_that_crashes_taking_over_leaves_the_old_one_in_charge() {
    let img = TestImage::new("sup-fault", "256M");
    let keys = Keyring::new("sup-fault-keys");
    let work = TempDir::new("sup-fault-work");
    let bins = variants(work.path());
    let m = mount_live(&img, &keys, None);
    let mut held = Held::open(m.path());
    let load = Load::start(m.path(), 2, "read=40,write=40,meta=20");
    let (_, sup_pid, _) = supervisor_of(&status(m.path()));

    let pkg = supervisor_package(
        &keys,
        work.path(),
        "supervisor-fault",
        1,
        "0.1.0+takeover-fault",
        &bins.join("fsd-takeover-fault"),
    );
    let r = apply(m.path(), &pkg, &[]);
    assert_eq!(r.code, ROLLED_BACK, "not rolled back:\n{}", r.out);
    let st = status(m.path());
    let (version, pid, how) = supervisor_of(&st);
    assert_eq!(version, "0.1.0", "{st}");
    assert_eq!(pid, sup_pid);
    assert_eq!(how, "rolled back");
    let (outcome, message) = last_outcome(&st);
    assert!(outcome.contains("rolledback"), "{outcome}: {message}");
    assert!(message.contains("panicked"), "{message}");

    // Still in charge: a component update commits.
    let later = fsd_package(&keys, work.path(), "fsd-after-fault", 2);
    let r = apply(m.path(), &later, &[]);
    assert_eq!(
        r.code, COMMITTED,
        "an fsd update after the roll-back:\n{}",
        r.out
    );

    held.check();
    load.finish();
    drop(held);
    m.unmount();
    img.assert_clean();
}

/// kill -9 of the supervisor costs the workload nothing: the server and the driver serve
/// on, the server starts a new supervisor that adopts them with the history, a replayed
/// package is still refused, and a component crash after that is recovered.
#[test]
fn a_killed_supervisor_is_replaced_and_the_mount_stays() {
    let img = TestImage::new("sup-kill", "256M");
    let keys = Keyring::new("sup-kill-keys");
    let work = TempDir::new("sup-kill-work");
    let m = mount_live(&img, &keys, None);
    let mut held = Held::open(m.path());
    let load = Load::start(m.path(), 3, "read=40,write=40,meta=20");
    let pkg = fsd_package(&keys, work.path(), "fsd-before-kill", 1);
    let r = apply(m.path(), &pkg, &[]);
    assert_eq!(r.code, COMMITTED, "{}", r.out);
    let (sup, server, _) = m.stack_pids().expect("the stack runs");

    kill9(sup);
    let adopted = poll_until(Duration::from_secs(30), || {
        supervisor_pid(m.path()).is_some_and(|p| p != sup && alive(p)) && m.stack_pids().is_some()
    });
    assert!(adopted, "no supervisor adopted the mount after the kill");
    let (new_sup, new_server, _) = m.stack_pids().expect("the stack runs");
    assert_eq!(new_server, server, "the server was not kept");
    let st = status(m.path());
    let (_, pid, how) = supervisor_of(&st);
    assert_eq!(
        (pid as i32, how.as_str()),
        (new_sup, "adopted after a crash"),
        "{st}"
    );
    let (outcome, message) = last_outcome(&st);
    assert!(
        outcome.contains("committed") && message.contains(&format!("pid {sup}")),
        "{outcome}: {message}"
    );
    assert_eq!(history_len(&st), 2, "{st}");

    let again = apply(m.path(), &pkg, &[]);
    assert_eq!(
        again.code, REFUSED,
        "a replayed package was not refused:\n{}",
        again.out
    );

    // The adopted server dies: the new supervisor recovers it.
    kill9(server);
    let recovered = poll_until(Duration::from_secs(60), || {
        m.stack_pids().is_some_and(|(_, f, _)| f != server)
    });
    assert!(recovered, "the adopted server's crash was not recovered");

    held.check();
    load.finish();
    drop(held);
    m.unmount();
    img.assert_clean();
}
