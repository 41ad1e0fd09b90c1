//! Molt through the standard tools: mount(8) with the `mount.fuse.molt` helper, fstab
//! entries, umount(8), read-only mounts, option errors, the service manager's readiness
//! protocol, and the install script.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use molt_tests::harness::{
    bin, fsd, is_mounted, run, ChildGuard, Mount, MountHelper, TempDir, TestImage,
};

/// Every mount(8) or umount(8) call gets this long.
const TOOL_DEADLINE: Duration = Duration::from_secs(120);

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tool(program: &str, args: &[&str]) -> Output {
    run(Command::new(program).args(args), TOOL_DEADLINE)
}

fn must(program: &str, args: &[&str]) {
    let o = tool(program, args);
    assert!(o.status.success(), "{program} {args:?}: {}", text(&o));
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The options field of a mount in this process's mount table.
fn mount_options_of(mnt: &Path) -> String {
    let mnt = mnt.canonicalize().expect("mountpoint");
    std::fs::read_to_string("/proc/self/mounts")
        .expect("mount table")
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(s(&mnt)))
        .and_then(|l| l.split(' ').nth(3).map(String::from))
        .unwrap_or_else(|| panic!("{} is not in the mount table", mnt.display()))
}

/// umount(8) returns once the kernel detached the mount; the stack makes the image
/// clean right after, and `fsd fsck` waits for it. The check must say clean, with no
/// note of an unclean unmount.
fn assert_clean_after_umount(img: &TestImage) {
    let o = img.fsck();
    assert_eq!(o.status.code(), Some(0), "fsck: {}", text(&o));
    assert!(
        !text(&o).contains("not cleanly unmounted"),
        "the stack did not finish the unmount: {}",
        text(&o)
    );
}

#[test]
fn mount_t_fuse_molt_then_umount_leaves_a_clean_image() {
    let _helper = MountHelper::install();
    let img = TestImage::new("helper", "64M");
    must(
        "mount",
        &[
            "-t",
            "fuse.molt",
            s(&img.image),
            s(&img.mnt),
            "-o",
            "noatime,nofail,threads=2,x-systemd.automount",
        ],
    );
    // The helper returned: the mount answers already.
    let m = Mount::attach(&img.mnt);
    let opts = mount_options_of(m.path());
    assert!(opts.split(',').any(|o| o == "noatime"), "{opts}");
    assert!(opts.split(',').any(|o| o == "rw"), "{opts}");
    std::fs::write(m.path().join("via-mount8"), b"written through mount(8)").unwrap();
    must("umount", &[s(m.path())]);
    assert!(!is_mounted(m.path()));
    m.forget();
    assert_clean_after_umount(&img);
    // What was written is there at the next mount.
    let m = img.mount();
    assert_eq!(
        std::fs::read(m.path().join("via-mount8")).unwrap(),
        b"written through mount(8)"
    );
    m.unmount();
}

#[test]
fn an_fstab_entry_mounts_with_mount_t_and_mount_a() {
    let _helper = MountHelper::install();
    let img = TestImage::new("fstab", "64M");
    let fstab = img.dir.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# Molt\n{} {} fuse.molt defaults,nofail,_netdev,noexec,comment=test 0 0\n",
            s(&img.image),
            s(&img.mnt)
        ),
    )
    .unwrap();
    // `mount MOUNTPOINT` with the entry found in the table.
    must("mount", &["-T", s(&fstab), s(&img.mnt)]);
    let m = Mount::attach(&img.mnt);
    assert!(mount_options_of(m.path()).split(',').any(|o| o == "noexec"));
    std::fs::write(m.path().join("one"), b"1").unwrap();
    must("umount", &[s(m.path())]);
    m.forget();
    assert_clean_after_umount(&img);
    // `mount -a` mounts every entry of the table.
    must("mount", &["-a", "-T", s(&fstab)]);
    let m = Mount::attach(&img.mnt);
    assert_eq!(std::fs::read(m.path().join("one")).unwrap(), b"1");
    std::fs::write(m.path().join("two"), b"2").unwrap();
    must("umount", &[s(m.path())]);
    m.forget();
    assert_clean_after_umount(&img);
}

/// Every way of changing the tree on `mnt` fails with EROFS.
fn assert_every_write_refused(mnt: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let erofs = |what: &str, r: std::io::Result<()>| match r {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        other => panic!("{what}: expected EROFS, got {other:?}"),
    };
    let f = mnt.join("kept");
    erofs("create", std::fs::write(mnt.join("new"), b"x"));
    erofs(
        "open for writing",
        std::fs::OpenOptions::new().write(true).open(&f).map(|_| ()),
    );
    erofs("mkdir", std::fs::create_dir(mnt.join("dir")));
    erofs("unlink", std::fs::remove_file(&f));
    erofs("rename", std::fs::rename(&f, mnt.join("moved")));
    erofs("symlink", std::os::unix::fs::symlink("kept", mnt.join("l")));
    erofs("link", std::fs::hard_link(&f, mnt.join("h")));
    erofs(
        "chmod",
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)),
    );
    erofs(
        "utimes",
        std::fs::File::open(&f).and_then(|h| h.set_modified(std::time::SystemTime::UNIX_EPOCH)),
    );
    erofs(
        "setxattr",
        rustix::fs::setxattr(&f, c"user.k", b"v", rustix::fs::XattrFlags::empty())
            .map_err(std::io::Error::from),
    );
}

#[test]
fn a_read_only_mount_refuses_writes_and_leaves_the_image_byte_identical() {
    let _helper = MountHelper::install();
    let img = TestImage::new("ro", "64M");
    let m = img.mount();
    std::fs::write(m.path().join("kept"), b"kept across the read-only mount").unwrap();
    m.unmount();
    let before = std::fs::read(&img.image).unwrap();
    let mtime = std::fs::metadata(&img.image).unwrap().modified().unwrap();

    must(
        "mount",
        &[
            "-t",
            "fuse.molt",
            s(&img.image),
            s(&img.mnt),
            "-o",
            "ro,strictatime",
        ],
    );
    let m = Mount::attach(&img.mnt);
    assert!(mount_options_of(m.path()).split(',').any(|o| o == "ro"));
    // Reads work (and, strictatime notwithstanding, update no access time on disk).
    for _ in 0..3 {
        assert_eq!(
            std::fs::read(m.path().join("kept")).unwrap(),
            b"kept across the read-only mount"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_every_write_refused(m.path());
    // fsync of a file opened for reading and syncfs succeed: nothing is pending.
    std::fs::File::open(m.path().join("kept"))
        .unwrap()
        .sync_all()
        .unwrap();
    must("umount", &[s(m.path())]);
    m.forget();
    assert_clean_after_umount(&img);
    let after = std::fs::read(&img.image).unwrap();
    assert!(before == after, "the read-only mount changed the image");
    assert_eq!(
        std::fs::metadata(&img.image).unwrap().modified().unwrap(),
        mtime,
        "the read-only mount wrote to the image file"
    );

    // The same with `fsd mount -o ro`.
    let m = img.mount_with(&["-o", "ro"], &[]);
    assert_every_write_refused(m.path());
    m.unmount();
    assert!(before == std::fs::read(&img.image).unwrap());
}

#[test]
fn a_dirty_image_is_refused_read_only() {
    let img = TestImage::new("ro-dirty", "64M");
    let m = img.mount();
    std::fs::write(m.path().join("f"), b"x").unwrap();
    // A copy of a mounted image: its superblock says mounted.
    let dirty = img.dir.path().join("dirty.img");
    std::fs::copy(&img.image, &dirty).unwrap();
    let other = img.dir.path().join("mnt2");
    std::fs::create_dir(&other).unwrap();
    let o = fsd(&["mount", s(&dirty), s(&other), "-o", "ro"]);
    assert!(!is_mounted(&other));
    assert!(!o.status.success());
    assert!(text(&o).contains("not unmounted cleanly"), "{}", text(&o));
    m.unmount();
    img.assert_clean();
}

#[test]
fn unknown_and_bad_options_are_refused_by_name() {
    let _helper = MountHelper::install();
    let img = TestImage::new("badopt", "64M");
    for (opts, name) in [
        ("ro,frobnicate", "frobnicate"),
        ("threads=0", "threads=0"),
        ("transport=tcp", "transport=tcp"),
    ] {
        let o = fsd(&["mount", s(&img.image), s(&img.mnt), "-o", opts]);
        assert!(!o.status.success(), "fsd mount -o {opts} succeeded");
        assert!(text(&o).contains(name), "fsd mount -o {opts}: {}", text(&o));
        let o = tool(
            "mount",
            &["-t", "fuse.molt", s(&img.image), s(&img.mnt), "-o", opts],
        );
        assert!(!o.status.success(), "mount -o {opts} succeeded");
        assert!(text(&o).contains(name), "mount -o {opts}: {}", text(&o));
        assert!(!is_mounted(&img.mnt));
    }
    // The existing flags keep working beside -o, and win over it.
    let m = img.mount_with(&["--threads", "2", "-o", "threads=3,noexec"], &[]);
    assert!(mount_options_of(m.path()).split(',').any(|o| o == "noexec"));
    m.unmount();
    img.assert_clean();
}

#[test]
fn the_helpers_answer_to_their_names() {
    // The same binary under the umount(8) helper's name: it unmounts and waits for the
    // stack, so the image is clean when it returns.
    let img = TestImage::new("multicall", "64M");
    let links = TempDir::new("multicall-links");
    let umount_helper = links.path().join("umount.fuse.molt");
    std::os::unix::fs::symlink(bin("fsd"), &umount_helper).unwrap();
    let mount_helper = links.path().join("mount.fuse.molt");
    std::os::unix::fs::symlink(bin("fsd"), &mount_helper).unwrap();
    let o = run(
        Command::new(&mount_helper).args([s(&img.image), s(&img.mnt), "-n", "-o", "rw"]),
        TOOL_DEADLINE,
    );
    assert!(o.status.success(), "{}", text(&o));
    let m = Mount::attach(&img.mnt);
    let (sup, _) = m.pids();
    std::fs::write(m.path().join("f"), vec![3u8; 100_000]).unwrap();
    let o = run(
        Command::new(&umount_helper).args([s(m.path()), "-n"]),
        TOOL_DEADLINE,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(!is_mounted(m.path()));
    assert!(
        molt_tests::harness::poll_until(Duration::from_secs(10), || {
            !molt_tests::harness::alive(sup)
        }),
        "the supervisor outlived the helper"
    );
    m.forget();
    img.assert_clean();
    // `-f` checks and mounts nothing.
    let o = fsd(&["mount-helper", s(&img.image), s(&img.mnt), "-f", "-o", "ro"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!is_mounted(&img.mnt));
}

/// Receives notifications until one contains `want` (or the deadline passes).
fn await_notification(sock: &UnixDatagram, want: &str, deadline: Duration) -> String {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    while start.elapsed() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == want) {
                    return msg;
                }
                seen.push(msg);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("receiving notifications: {e}"),
        }
    }
    panic!("no {want} within {deadline:?}; received {seen:?}");
}

/// A notification socket in the abstract namespace (nothing left behind), named by
/// `tag`, and the `NOTIFY_SOCKET` value naming it.
fn notify_socket(tag: &str) -> (UnixDatagram, String) {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("molt-test-notify-{tag}-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    (sock, format!("@{name}"))
}

/// `fsd mount --foreground` as a service manager runs it, with `NOTIFY_SOCKET`.
fn foreground_mount(img: &TestImage, notify: &str, extra: &[&str], driver: &Path) -> ChildGuard {
    let child = Command::new(bin("fsd"))
        .args(["mount", "--foreground", s(&img.image), s(&img.mnt)])
        .args(["--transport", &molt_tests::harness::transport()])
        .args(extra)
        .env("NOTIFY_SOCKET", notify)
        .env("MOLT_BLOCKDEV_BIN", driver)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    ChildGuard {
        child,
        mountpoint: Some(img.mnt.canonicalize().expect("mountpoint")),
    }
}

#[test]
fn foreground_mount_speaks_the_notify_protocol_and_stops_cleanly_on_sigterm() {
    let img = TestImage::new("notify", "64M");
    let (sock, notify) = notify_socket("basic");
    let mut child = foreground_mount(&img, &notify, &[], &bin("blockdev"));
    let pid = child.child.id();

    let ready = await_notification(&sock, "READY=1", Duration::from_secs(60));
    // READY came after the mount answered: it is there, and a stat goes through it.
    assert!(is_mounted(&img.mnt), "READY=1 before the mount: {ready}");
    let m = Mount::attach(&img.mnt);
    std::fs::metadata(m.path()).unwrap();
    assert!(
        ready.lines().any(|l| l == format!("MAINPID={pid}")),
        "{ready}"
    );
    std::fs::write(m.path().join("f"), vec![9u8; 200_000]).unwrap();

    molt_sys::kill(pid as i32, libc::SIGTERM).unwrap();
    await_notification(&sock, "STOPPING=1", Duration::from_secs(30));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the supervisor did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "supervisor ended with {status}");
    assert!(!is_mounted(m.path()));
    m.forget();
    img.assert_clean();
    let m = img.mount();
    assert_eq!(
        std::fs::read(m.path().join("f")).unwrap(),
        vec![9u8; 200_000]
    );
    m.unmount();
}

#[test]
fn the_install_script_installs_into_a_destdir() {
    let root = TempDir::new("install");
    let bins = bin("fsd").parent().expect("build dir").to_path_buf();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/install.sh");
    let o = run(
        Command::new("bash")
            .arg(&script)
            .args(["--bins", s(&bins), "--prefix", "/usr/local"])
            .env("DESTDIR", root.path()),
        Duration::from_secs(60),
    );
    assert!(o.status.success(), "install.sh: {}", text(&o));
    let at = |p: &str| root.path().join(p.trim_start_matches('/'));
    for b in ["fsd", "blockdev", "updater"] {
        let p = at(&format!("/usr/local/bin/{b}"));
        let m = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(m.permissions().mode() & 0o777, 0o755, "{}", p.display());
        assert_eq!(
            std::fs::read(&p).unwrap(),
            std::fs::read(bins.join(b)).unwrap(),
            "{} differs from the build",
            p.display()
        );
    }
    // The helpers point at the installed fsd, as the system will see it (no DESTDIR).
    for h in ["mount.fuse.molt", "umount.fuse.molt"] {
        let link = at(&format!("/sbin/{h}"));
        assert_eq!(
            std::fs::read_link(&link).unwrap_or_else(|e| panic!("{}: {e}", link.display())),
            PathBuf::from("/usr/local/bin/fsd")
        );
    }
    let unit = std::fs::read_to_string(at("/etc/systemd/system/molt@.service")).unwrap();
    assert!(unit.contains("Type=notify"), "{unit}");
    assert!(
        unit.contains("ExecStart=/usr/local/bin/fsd mount --foreground"),
        "{unit}"
    );
    assert!(
        unit.contains("ExecStop=/usr/local/bin/fsd unmount"),
        "{unit}"
    );
    assert!(at("/etc/molt/keyring").is_dir());
}

#[test]
fn a_read_only_mount_stays_read_only_across_a_server_crash_and_refuses_live_updates() {
    use crate::live::{apply, component, fsd_manifest, pack, status, REFUSED};
    use molt_tests::harness::{kill9, poll_until, Keyring};
    let img = TestImage::new("ro-crash", "64M");
    let m = img.mount();
    std::fs::write(m.path().join("kept"), b"before the crash").unwrap();
    m.unmount();
    let before = std::fs::read(&img.image).unwrap();

    let keys = Keyring::new("ro-live-keys");
    let m = img.mount_with(&["-o", "ro", "--keyring", s(&keys.keyring)], &[]);
    let (_, server, _) = m.stack_pids().expect("the stack runs");
    kill9(server);
    // The supervisor starts a new server; it serves the same read-only image.
    assert!(
        poll_until(Duration::from_secs(30), || m
            .stack_pids()
            .is_some_and(|(_, s, _)| s != server)),
        "no new filesystem server after the crash"
    );
    assert_eq!(
        std::fs::read(m.path().join("kept")).unwrap(),
        b"before the crash"
    );
    assert_every_write_refused(m.path());

    // A live update is refused before anything is notified, with the reason.
    let (version, _) = component(&status(m.path()), "fsd");
    let work = TempDir::new("ro-live-work");
    let manifest = fsd_manifest("ro-fsd", 1, &version, &version, &["quiescent"]);
    let pkg = pack(
        &keys,
        &work.path().join("ro-fsd"),
        &manifest,
        &[("bin/fsd", &bin("fsd"))],
    );
    let r = apply(m.path(), &pkg, &[]);
    assert_eq!(r.code, REFUSED, "{}", r.out);
    assert!(
        r.failed_checks().iter().any(|c| c == "read-write mount"),
        "{}",
        r.out
    );
    assert!(!r.reached("Notification"), "{}", r.out);
    m.unmount();
    assert!(
        before == std::fs::read(&img.image).unwrap(),
        "the read-only mount changed the image"
    );
    img.assert_clean();
}

#[test]
fn notify_status_follows_the_phases_of_a_live_update() {
    use crate::live::{apply, pack_example, variants, COMMITTED};
    use molt_tests::harness::Keyring;
    let w = TempDir::new("notify-bins");
    let bins = variants(w.path());
    let img = TestImage::new("notify-live", "64M");
    let keys = Keyring::new("notify-live-keys");
    let work = TempDir::new("notify-live-work");
    let pkg = pack_example(
        &keys,
        work.path(),
        "01-one-component",
        &[("bin/blockdev", &bins.join("blockdev"))],
    );
    let (sock, notify) = notify_socket("live");
    let mut child = foreground_mount(
        &img,
        &notify,
        &["--keyring", s(&keys.keyring)],
        &bins.join("blockdev-counters32"),
    );
    await_notification(&sock, "READY=1", Duration::from_secs(60));
    let m = Mount::attach(&img.mnt);
    let r = apply(m.path(), &pkg, &[]);
    assert_eq!(r.code, COMMITTED, "{}", r.out);
    for phase in [
        "notification",
        "preparation",
        "state transfer",
        "replacement",
    ] {
        await_notification(
            &sock,
            &format!("STATUS=live update blockdev-counters-u64: {phase} finished"),
            Duration::from_secs(10),
        );
    }
    let done = await_notification(
        &sock,
        &format!(
            "STATUS=serving {}; live update blockdev-counters-u64: Committed",
            m.path().display()
        ),
        Duration::from_secs(10),
    );
    assert!(!done.contains("READY=1"), "{done}");
    molt_sys::kill(child.child.id() as i32, libc::SIGTERM).unwrap();
    await_notification(&sock, "STOPPING=1", Duration::from_secs(30));
    let start = Instant::now();
    while child.child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    m.forget();
    img.assert_clean();
}
