//! The `updater` binary end to end: key and package files on disk, and the control
//! conversation against a fake supervisor on a socket (`--socket`).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread::JoinHandle;

use updater::protocol::{
    read_msg, write_msg, Event, Outcome, Phase, PhaseState, Request, EVENTS, REQUESTS,
};
use updater::CheckItem;

fn updater(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_updater"))
        .args(args)
        .output()
        .expect("run updater")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const MANIFEST: &str = r#"
[package]
name = "fsd-noop"
sequence = 1
expires_unix = 4000000000
nature = "one-component"

[[component]]
name = "fsd"
applies_to = ["0.1.0"]
new_version = "0.1.1"
binary = "bin/fsd"
state_schema_reads = [1]
state_schema_writes = 1
required_state = ["quiescent"]

[requirements]
memory_mib = 1

[[file]]
path = "bin/fsd"
"#;

/// A key, a keyring holding its public half, and a packed package.
fn packed(dir: &Path) -> (PathBuf, PathBuf) {
    let key = dir.join("key");
    let o = updater(&["keygen", "--out", key.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let ring = dir.join("keyring");
    std::fs::create_dir(&ring).unwrap();
    std::fs::set_permissions(&ring, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::copy(dir.join("key.pub"), ring.join("release.pub")).unwrap();
    std::fs::create_dir(dir.join("bin")).unwrap();
    std::fs::write(dir.join("bin/fsd"), b"\x7fELF not really").unwrap();
    std::fs::write(dir.join("manifest.toml"), MANIFEST).unwrap();
    let pkg = dir.join("fsd-noop.lup");
    let o = updater(&[
        "pack",
        "--manifest",
        dir.join("manifest.toml").to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--out",
        pkg.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    (pkg, ring)
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

#[test]
fn keygen_pack_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let (pkg, ring) = packed(dir.path());
    let o = updater(&["inspect", pkg.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("package    fsd-noop (sequence 1)"), "{t}");
    assert!(t.contains("signature  valid"), "{t}");
    assert!(t.contains("file       bin/fsd  15 bytes"), "{t}");
    if is_root() {
        let o = updater(&[
            "inspect",
            pkg.to_str().unwrap(),
            "--keyring",
            ring.to_str().unwrap(),
        ]);
        assert_eq!(code(&o), 0, "{}", text(&o));
        assert!(text(&o).contains("trusted    yes"), "{}", text(&o));
        std::fs::set_permissions(&ring, std::fs::Permissions::from_mode(0o777)).unwrap();
        let o = updater(&[
            "inspect",
            pkg.to_str().unwrap(),
            "--keyring",
            ring.to_str().unwrap(),
        ]);
        assert_eq!(code(&o), 5, "{}", text(&o));
        assert!(text(&o).contains("insecure"), "{}", text(&o));
    }
    // A damaged package is refused.
    let mut bytes = std::fs::read(&pkg).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&pkg, bytes).unwrap();
    let o = updater(&["inspect", pkg.to_str().unwrap()]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(text(&o).contains("SHA-256"), "{}", text(&o));
}

#[test]
fn pack_refuses_a_bad_manifest() {
    let dir = tempfile::tempdir().unwrap();
    packed(dir.path());
    std::fs::write(
        dir.path().join("manifest.toml"),
        MANIFEST.replace("one-component", "interaction"),
    )
    .unwrap();
    let o = updater(&[
        "pack",
        "--manifest",
        dir.path().join("manifest.toml").to_str().unwrap(),
        "--key",
        dir.path().join("key").to_str().unwrap(),
        "--out",
        dir.path().join("x.lup").to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(text(&o).contains("both components"), "{}", text(&o));
}

/// A supervisor stand-in: accepts one connection, reads the request, sends `events`.
fn fake_supervisor(dir: &Path, events: Vec<Event>) -> (PathBuf, JoinHandle<Request>) {
    let sock = dir.join("control.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let h = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let r: Request = read_msg(&mut s, &REQUESTS).unwrap();
        for e in &events {
            write_msg(&mut s, &EVENTS, e).unwrap();
        }
        r
    });
    (sock, h)
}

fn done(outcome: Outcome, message: &str) -> Event {
    Event::Done {
        outcome,
        message: message.into(),
    }
}

#[test]
fn apply_prints_events_and_exits_by_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let (pkg, _) = packed(dir.path());
    let cases = [
        (Outcome::Committed, 0),
        (Outcome::Refused, 2),
        (Outcome::Aborted, 3),
        (Outcome::RolledBack, 4),
        (Outcome::Failed, 5),
    ];
    for (outcome, want) in cases {
        let run = tempfile::tempdir().unwrap();
        let events = vec![
            Event::Check(CheckItem::new(
                "memory",
                true,
                "need 1 MiB, have 9000 MiB available",
            )),
            Event::Check(CheckItem::new(
                "cpu features",
                false,
                "need avx512f, missing avx512f",
            )),
            Event::Phase {
                phase: Phase::Preparation,
                state: PhaseState::Finished,
                elapsed_ms: 12,
                detail: String::new(),
            },
            Event::Progress {
                what: "inodes".into(),
                done: 5,
                total: 10,
            },
            done(outcome, "the end"),
        ];
        let (sock, h) = fake_supervisor(run.path(), events);
        let o = updater(&[
            "apply",
            pkg.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
            "--deadline",
            "2s",
        ]);
        assert_eq!(code(&o), want, "{outcome}: {}", text(&o));
        let t = text(&o);
        assert!(
            t.contains("PASS memory: need 1 MiB, have 9000 MiB available"),
            "{t}"
        );
        assert!(
            t.contains("FAIL cpu features: need avx512f, missing avx512f"),
            "{t}"
        );
        assert!(t.contains("phase preparation finished in 12 ms"), "{t}");
        assert!(t.contains(&format!("{outcome}: the end")), "{t}");
        match h.join().unwrap() {
            Request::Apply {
                package,
                deadline_ms,
                no_wait,
            } => {
                assert_eq!(package, std::fs::read(&pkg).unwrap());
                assert_eq!(deadline_ms, Some(2000));
                assert!(!no_wait);
            }
            r => panic!("{r:?}"),
        }
    }
}

#[test]
fn abort_status_and_connection_failures() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, h) = fake_supervisor(
        dir.path(),
        vec![done(Outcome::Aborted, "old version resumed")],
    );
    let o = updater(&["abort", "--socket", sock.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert_eq!(h.join().unwrap(), Request::Abort);

    let dir = tempfile::tempdir().unwrap();
    let (sock, h) = fake_supervisor(dir.path(), vec![Event::Status(Box::default())]);
    let o = updater(&["status", "--socket", sock.to_str().unwrap(), "--json"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format_version"], 0);
    h.join().unwrap();

    // Closed before the outcome.
    let dir = tempfile::tempdir().unwrap();
    let (sock, h) = fake_supervisor(dir.path(), vec![]);
    let o = updater(&["status", "--socket", sock.to_str().unwrap()]);
    assert_eq!(code(&o), 5, "{}", text(&o));
    h.join().unwrap();

    // Nobody listening; a mount with no supervisor.
    let o = updater(&[
        "status",
        "--socket",
        dir.path().join("none").to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 5, "{}", text(&o));
    let o = Command::new(env!("CARGO_BIN_EXE_updater"))
        .args(["status", "--mount", dir.path().to_str().unwrap()])
        .env("MOLT_RUN_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(code(&o), 5, "{}", text(&o));
    assert!(
        text(&o).contains("cannot reach the supervisor"),
        "{}",
        text(&o)
    );
}

#[test]
fn usage_errors_exit_64_and_help_documents_exit_codes() {
    assert_eq!(code(&updater(&["frobnicate"])), 64);
    assert_eq!(code(&updater(&["status"])), 64);
    assert_eq!(
        code(&updater(&[
            "apply",
            "p",
            "--mount",
            "/m",
            "--deadline",
            "5"
        ])),
        64
    );
    let o = updater(&["--help"]);
    assert_eq!(code(&o), 0);
    assert!(text(&o).contains("64  bad command line"), "{}", text(&o));
}

/// `updater status` shows times as UTC dates with their age, and `--json` gives each
/// component's counters as one object.
#[test]
fn status_shows_dates_and_counters_as_an_object() {
    use updater::protocol::{ComponentStatus, StatusReport, UpdateRecord};
    let report = || StatusReport {
        components: vec![ComponentStatus {
            name: "blockdev".into(),
            version: "0.1.0".into(),
            pid: 42,
            state_schema: 2,
            counters: vec![("reads".into(), 7), ("writes".into(), 9)],
        }],
        history: vec![UpdateRecord {
            package: "p".into(),
            sequence: 1,
            nature: "one-component".into(),
            started_unix: 1_796_415_185,
            phases: vec![],
            outcome: Outcome::Committed,
            message: String::new(),
        }],
        ..StatusReport::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let (sock, h) = fake_supervisor(dir.path(), vec![Event::Status(Box::new(report()))]);
    let o = updater(&["status", "--socket", sock.to_str().unwrap(), "--json"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["components"][0]["counters"]["reads"], 7, "{v}");
    assert_eq!(v["components"][0]["counters"]["writes"], 9, "{v}");
    assert_eq!(
        v["history"][0]["started_utc"], "2026-12-04 20:13:05 UTC",
        "{v}"
    );
    h.join().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (sock, h) = fake_supervisor(dir.path(), vec![Event::Status(Box::new(report()))]);
    let o = updater(&["status", "--socket", sock.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("started 2026-12-04 20:13:05 UTC ("), "{out}");
    assert!(
        out.contains(" ago)") || out.contains("(in the future)"),
        "{out}"
    );
    assert!(!out.contains("1796415185"), "{out}");
    h.join().unwrap();
}

/// The write end of a pipe whose reader is already gone.
fn closed_pipe() -> std::io::PipeWriter {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    writer
}

/// `updater status` against a supervisor that sends `events`, with stdout or stderr (as
/// `closed`) a pipe nobody reads.
fn status_into_a_closed_pipe(events: Vec<Event>, closed: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (sock, h) = fake_supervisor(dir.path(), events);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_updater"));
    cmd.args(["status", "--socket", sock.to_str().unwrap()]);
    match closed {
        "stdout" => cmd.stdout(closed_pipe()),
        _ => cmd.stderr(closed_pipe()),
    };
    let o = cmd.output().unwrap();
    h.join().unwrap();
    o
}

/// A reader that stops reading (`updater status | head`) ends the command quietly with
/// status 141, as SIGPIPE would, not with a panic.
#[test]
fn a_closed_standard_output_ends_the_command_quietly() {
    let o = status_into_a_closed_pipe(vec![Event::Status(Box::default())], "stdout");
    assert_eq!(code(&o), 141, "{}", text(&o));
    assert!(o.stderr.is_empty(), "{}", text(&o));
}

/// An error message to a standard error nobody reads any more (`updater status 2>&1 |
/// head`) is dropped: the command still exits with its own code, not a panic's.
#[test]
fn a_closed_standard_error_keeps_the_exit_code() {
    // The supervisor closes the connection before the outcome: a message, and 5.
    let o = status_into_a_closed_pipe(vec![], "stderr");
    assert_eq!(code(&o), 5, "{}", text(&o));
}
