//! What is particular to a mount served over FUSE io_uring (`fsd mount --transport
//! uring`). The rest of the suite runs over either transport (`MOLT_TEST_TRANSPORT`);
//! these tests mount over io_uring themselves, and say so and pass where the kernel
//! cannot serve it.

use std::io::Write;
use std::time::{Duration, Instant};

use molt_tests::harness::{alive, bin, is_mounted, poll_until, Keyring, TempDir, TestImage};

use crate::live::{
    apply, component, fsd_manifest, pack, pack_example, status, variants, Held, Load, COMMITTED,
    REFUSED,
};

/// Whether this kernel has FUSE over io_uring (a mount switches it on as root).
fn uring_available() -> bool {
    let switch = std::path::Path::new("/sys/module/fuse/parameters/enable_uring");
    if !switch.exists() {
        println!(
            "skipped: this kernel has no FUSE over io_uring ({} is missing)",
            switch.display()
        );
    }
    switch.exists()
}

fn mount_uring(
    img: &TestImage,
    keys: &Keyring,
    driver: Option<&std::path::Path>,
) -> molt_tests::harness::Mount {
    let keyring = keys.keyring.to_str().expect("utf-8").to_string();
    let args = ["--keyring", &keyring, "--transport", "uring"];
    match driver {
        Some(d) => img.mount_with(&args, &[("MOLT_BLOCKDEV_BIN", d)]),
        None => img.mount_with(&args, &[]),
    }
}

/// Over io_uring the filesystem server is not replaced live (its queue entries cannot be
/// handed over without risking requests on this kernel): the check says why and touches
/// nothing. The block driver is replaced live as over `/dev/fuse`, the server draining
/// and resuming on its queues with files held open and a workload running.
#[test]
fn over_io_uring_fsd_updates_are_refused_and_driver_updates_commit() {
    if !uring_available() {
        return;
    }
    let img = TestImage::new("uring-live", "256M");
    let keys = Keyring::new("uring-live-keys");
    let work = TempDir::new("uring-live-work");
    let bins = variants(work.path());
    let legacy = bins.join("blockdev-counters32");
    let m = mount_uring(&img, &keys, Some(&legacy));
    let st = status(m.path());
    assert_eq!(st["fuse"]["transport"], "uring", "{st}");
    let mut held = Held::open(m.path());
    let load = Load::start(m.path(), 3, "read=45,write=45,meta=10");

    let fsd_version = component(&st, "fsd").0;
    let manifest = fsd_manifest(
        "fsd-over-uring",
        1,
        &fsd_version,
        &fsd_version,
        &["quiescent"],
    );
    let pkg = pack(
        &keys,
        &work.path().join("fsd"),
        &manifest,
        &[("bin/fsd", &bin("fsd"))],
    );
    let r = apply(m.path(), &pkg, &[]);
    println!("{}", r.out);
    assert_eq!(r.code, REFUSED, "{}", r.out);
    assert!(
        r.failed_checks().iter().any(|c| c == "fsd transport"),
        "the fsd transport check must fail:\n{}",
        r.out
    );
    assert!(
        r.out.contains("ECANCELED"),
        "the refusal says why:\n{}",
        r.out
    );
    assert!(
        !r.reached("Notification"),
        "nothing may be notified:\n{}",
        r.out
    );
    assert_eq!(component(&status(m.path()), "fsd"), component(&st, "fsd"));

    let new = bins.join("blockdev");
    let pkg = pack_example(
        &keys,
        work.path(),
        "01-one-component",
        &[("bin/blockdev", &new)],
    );
    let r = apply(m.path(), &pkg, &[]);
    println!("{}", r.out);
    assert_eq!(
        r.code, COMMITTED,
        "the driver update did not commit:\n{}",
        r.out
    );
    let after = status(m.path());
    assert_eq!(component(&after, "blockdev").0, "0.2.0", "{after}");
    assert_eq!(after["fuse"]["transport"], "uring", "{after}");
    held.check();
    // The workload saw no error (`finish` checks).
    load.finish();
    drop(held);
    m.unmount();
    img.assert_clean();
}

/// A crash of the server of an io_uring mount cannot be recovered on this kernel (the
/// requests in the dead process's queue entries cannot be taken over): the stack goes
/// down instead, every waiting program gets an error rather than hanging, and the next
/// mount finds every fsynced write and a clean image.
#[test]
fn over_io_uring_a_server_crash_ends_the_mount_without_hanging() {
    if !uring_available() {
        return;
    }
    let img = TestImage::new("uring-crash", "128M");
    let keys = Keyring::new("uring-crash-keys");
    let m = mount_uring(&img, &keys, None);
    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    {
        let mut f = std::fs::File::create(m.path().join("kept")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    let (sup, server, _) = m.stack_pids().expect("stack");
    // Programs keep asking while the server dies.
    let mnt = m.path().to_path_buf();
    let askers: Vec<_> = (0..2)
        .map(|_| {
            let mnt = mnt.clone();
            std::thread::spawn(move || {
                let end = Instant::now() + Duration::from_secs(30);
                let mut errors = 0u32;
                while Instant::now() < end && errors < 20 {
                    if std::fs::read(mnt.join("kept")).is_err() {
                        errors += 1;
                    }
                }
                errors
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    molt_sys::kill(server, libc::SIGKILL).unwrap();
    for a in askers {
        let errors = a.join().expect("asker");
        assert!(
            errors > 0,
            "a program kept getting answers from a dead server"
        );
    }
    assert!(
        poll_until(Duration::from_secs(30), || !alive(sup) && !is_mounted(&mnt)),
        "the stack did not go down"
    );
    drop(m);
    let m = img.mount();
    assert_eq!(std::fs::read(m.path().join("kept")).unwrap(), data);
    m.unmount();
    img.assert_clean();
}
