//! Molt on NBD exports: mkfs, fsck and convert by NBD URI, mounts over qemu-nbd (raw and
//! qcow2, unix socket and loopback TCP) and nbdkit, a live update of the block driver that
//! hands its connection over, a killed driver, and a restarted (or lost) NBD server.
//! Every test starts its own server on a private socket or port; the image guard kills it.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use molt_tests::harness::{
    alive, fsd, kill9, poll_until, Export, Keyring, Listen, Mount, NbdBacking, NbdServer, TempDir,
    TestImage, TestRng,
};

use super::live::{self, Load};

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_clean(img: &TestImage) {
    let out = img.fsck();
    assert_eq!(
        out.status.code(),
        Some(0),
        "fsck not clean:\n{}",
        text(&out)
    );
}

/// `fsd mkfs` over every server and transport takes the export's size; fsck and convert
/// work by URI; a wrong --size and an existing filesystem are refused.
#[test]
fn mkfs_fsck_convert_by_uri() {
    for backing in [
        NbdBacking::QemuRaw(Listen::Unix),
        NbdBacking::QemuQcow2(Listen::Tcp),
        NbdBacking::KitFile(Listen::Unix),
    ] {
        let img = TestImage::over_nbd("nbd-mkfs", "64M", backing, &["--format-version", "1"]);
        let uri = img.name().to_string_lossy().into_owned();
        assert_clean(&img);
        let o = fsd(&["mkfs", &uri]);
        assert!(!o.status.success(), "{backing:?}: mkfs over a filesystem");
        assert!(
            text(&o).contains("--force") || text(&o).contains("exist"),
            "{}",
            text(&o)
        );
        let o = fsd(&["mkfs", &uri, "--size", "32M", "--force"]);
        assert!(
            !o.status.success(),
            "{backing:?}: a --size that is not the export's"
        );
        assert!(text(&o).contains("does not match"), "{}", text(&o));
        let o = fsd(&["convert", &uri, "--to", "3"]);
        assert!(o.status.success(), "{backing:?}: convert: {}", text(&o));
        assert_clean(&img);
        let o = fsd(&["fsck", "--json", &uri]);
        assert!(text(&o).contains("\"clean\""), "{}", text(&o));
    }
}

/// Clear errors: a bad URI, an export that is not there, a server that is not there, and an
/// export smaller than the filesystem on it.
#[test]
fn bad_uris_and_short_exports_are_refused() {
    let o = fsd(&["fsck", "nbd+unix:///molt"]);
    assert!(text(&o).contains("needs ?socket"), "{}", text(&o));
    let img = TestImage::over_nbd("nbd-short", "64M", NbdBacking::QemuRaw(Listen::Unix), &[]);
    let uri = img.name().to_string_lossy().into_owned();
    let wrong = uri.replace("/molt?", "/other?");
    let o = fsd(&["fsck", &wrong]);
    assert!(text(&o).contains("NBD_REP_ERR_UNKNOWN"), "{}", text(&o));
    let gone = uri.replace("nbd.sock", "none.sock");
    let o = fsd(&["fsck", &gone]);
    assert!(text(&o).contains("connecting to"), "{}", text(&o));

    // The same filesystem behind an export of half its size.
    let short = img.dir.path().join("short.img");
    std::fs::copy(&img.image, &short).unwrap();
    File::options()
        .write(true)
        .open(&short)
        .and_then(|f| f.set_len(32 << 20))
        .unwrap();
    let server = NbdServer::start(
        Export::Qemu {
            image: short,
            format: "raw".into(),
        },
        Listen::Unix,
    )
    .unwrap();
    let short_uri = server.uri().to_string();
    let o = fsd(&["mount", &short_uri, img.mnt.to_str().unwrap()]);
    assert!(!o.status.success(), "mounted a short export");
    assert!(
        text(&o).contains("shorter than its superblock"),
        "{}",
        text(&o)
    );
    let o = fsd(&["fsck", &short_uri]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
}

/// Writes `n` files of seeded sizes and contents and fsyncs them.
fn write_files(dir: &Path, seed: u64, n: u64) {
    let mut rng = TestRng::new(seed);
    for i in 0..n {
        let len = rng.below(300_000) as usize + 1;
        let data = rng.bytes(len);
        let p = dir.join(format!("f{i}"));
        let mut f = File::create(&p).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
}

fn verify_files(dir: &Path, seed: u64, n: u64) {
    let mut rng = TestRng::new(seed);
    for i in 0..n {
        let len = rng.below(300_000) as usize + 1;
        let data = rng.bytes(len);
        let got = std::fs::read(dir.join(format!("f{i}"))).unwrap();
        assert!(got == data, "f{i} differs");
    }
}

/// A mount over each server: files written and verified, again after a remount; fsck is
/// clean after each unmount.
#[test]
fn mount_write_verify() {
    for backing in [
        NbdBacking::QemuQcow2(Listen::Unix),
        NbdBacking::QemuRaw(Listen::Tcp),
        NbdBacking::KitFile(Listen::Unix),
    ] {
        let img = TestImage::over_nbd("nbd-mount", "128M", backing, &[]);
        let m = img.mount();
        write_files(m.path(), 7, 60);
        verify_files(m.path(), 7, 60);
        m.unmount();
        assert_clean(&img);
        let m = img.mount();
        verify_files(m.path(), 7, 60);
        m.unmount();
        assert_clean(&img);
    }
}

/// The socket a process holds as its descriptor `fd` (`socket:[INODE]`).
fn socket_of(pid: i32, fd: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A live update of the block driver under load over NBD: it commits, the workload sees
/// no error, and the successor serves the very connection its predecessor had (the
/// socket, not a new connection).
#[test]
fn driver_live_update_hands_the_connection_over() {
    let w = TempDir::new("nbd-live-bins");
    let bins = live::variants(w.path());
    let legacy = bins.join("blockdev-counters32");
    let new = bins.join("blockdev");
    let img = TestImage::over_nbd("nbd-live", "256M", NbdBacking::QemuRaw(Listen::Unix), &[]);
    let keys = Keyring::new("nbd-live-keys");
    let work = TempDir::new("nbd-live-work");
    let pkg = live::pack_example(
        &keys,
        work.path(),
        "01-one-component",
        &[("bin/blockdev", &new)],
    );
    let m = live::mount_live(&img, &keys, Some(&legacy));
    let (_, _, old) = m.stack_pids().expect("stack");
    let sock = socket_of(old, 6);
    assert!(sock.starts_with("socket:"), "{sock}");
    let load = Load::start(m.path(), 3, "read=45,write=45,meta=10");
    let r = live::apply(m.path(), &pkg, &[]);
    assert_eq!(
        r.code,
        live::COMMITTED,
        "the update did not commit:\n{}",
        r.out
    );
    let st = live::status(m.path());
    assert_eq!(live::component(&st, "blockdev").0, "0.2.0", "{st}");
    let (_, _, new_pid) = m.stack_pids().expect("stack");
    assert_ne!(new_pid, old);
    // Under load the successor has sent requests on it since: it is the same socket.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        socket_of(new_pid, 6),
        sock,
        "the successor opened a new connection"
    );
    load.finish();
    m.unmount();
    assert_clean(&img);
}

/// The block driver killed under load, three times: each successor gets a new connection,
/// resends what the dead one had taken, and the workload sees no error.
#[test]
fn driver_kill9_under_load_recovers() {
    let img = TestImage::over_nbd("nbd-kill", "256M", NbdBacking::QemuRaw(Listen::Unix), &[]);
    let m = img.mount();
    let load = Load::start(m.path(), 3, "read=40,write=50,meta=10");
    for _ in 0..3 {
        let (_, _, driver) = m.stack_pids().expect("stack");
        kill9(driver);
        assert!(
            poll_until(Duration::from_secs(20), || m
                .stack_pids()
                .is_some_and(|(_, _, d)| d != driver && alive(d))),
            "the driver was not replaced"
        );
        std::thread::sleep(Duration::from_millis(700));
    }
    load.finish();
    m.unmount();
    assert_clean(&img);
}

/// The NBD server restarts under load: I/O waits, the driver reconnects and resends, and
/// the workload sees no error.
#[test]
fn server_restart_under_load_reconnects() {
    let mut img = TestImage::over_nbd(
        "nbd-restart",
        "256M",
        NbdBacking::QemuRaw(Listen::Unix),
        &[],
    );
    let m = img.mount();
    let load = Load::start(m.path(), 3, "read=40,write=50,meta=10");
    for _ in 0..2 {
        let server = img.nbd.as_mut().expect("server");
        server.kill();
        std::thread::sleep(Duration::from_millis(800));
        server.restart().expect("restarting the server");
        std::thread::sleep(Duration::from_millis(1000));
    }
    load.finish();
    m.unmount();
    assert_clean(&img);
}

fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// The NBD server stays away past the driver's bound: the waiting write fails with EIO,
/// the filesystem turns read-only, and once the server is back the image unmounts and
/// checks clean with every write fsynced before the loss.
#[test]
fn server_gone_past_the_bound_gives_eio_and_read_only() {
    let mut img = TestImage::over_nbd("nbd-gone", "64M", NbdBacking::QemuRaw(Listen::Unix), &[]);
    let m = img.mount_with(&[], &[("MOLT_NBD_RECONNECT_MS", Path::new("1500"))]);
    write_files(m.path(), 3, 10);
    img.nbd.as_mut().expect("server").kill();
    let t = Instant::now();
    let e = write_synced(&m.path().join("lost"), &vec![7u8; 1 << 20])
        .expect_err("a write and fsync with no server");
    let took = t.elapsed();
    assert!(
        matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EROFS)),
        "{e}"
    );
    assert!(
        took >= Duration::from_millis(1000),
        "failed after {took:?}: did it wait?"
    );
    assert!(took < Duration::from_secs(30), "failed only after {took:?}");
    img.nbd
        .as_mut()
        .expect("server")
        .restart()
        .expect("restarting the server");
    // Read-only now, reads work again.
    let e = write_synced(&m.path().join("after"), b"x").expect_err("read-only");
    assert!(
        matches!(e.raw_os_error(), Some(libc::EROFS) | Some(libc::EIO)),
        "{e}"
    );
    verify_files(m.path(), 3, 10);
    drop(m);
    let out = img.fsck();
    println!("{}", text(&out));
    assert_eq!(
        out.status.code(),
        Some(0),
        "fsck not clean:\n{}",
        text(&out)
    );
    let m: Mount = img.mount();
    verify_files(m.path(), 3, 10);
    m.unmount();
    assert_clean(&img);
}
