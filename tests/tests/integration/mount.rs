//! Mounting and unmounting the three-process stack, and the errors users see.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use molt_tests::harness::{bin, fsd, is_mounted, run, TestImage};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn mount_use_unmount_then_fsck_is_clean() {
    let img = TestImage::new("basic", "128M");
    let m = img.mount();
    let (sup, children) = m.pids();
    assert_eq!(
        children.len(),
        2,
        "supervisor {sup} should run the server and the driver: {children:?}"
    );
    let p = m.path();
    std::fs::write(p.join("hello"), b"hello molt").unwrap();
    std::fs::create_dir_all(p.join("a/b/c")).unwrap();
    std::os::unix::fs::symlink("../../hello", p.join("a/b/link")).unwrap();
    std::fs::hard_link(p.join("hello"), p.join("a/hard")).unwrap();
    assert_eq!(std::fs::metadata(p.join("hello")).unwrap().nlink(), 2);
    assert_eq!(std::fs::read(p.join("a/b/link")).unwrap(), b"hello molt");
    std::fs::set_permissions(p.join("hello"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(p.join("a/hard"), p.join("a/b/c/moved")).unwrap();
    assert_eq!(std::fs::read(p.join("a/b/c/moved")).unwrap(), b"hello molt");
    m.unmount();
    img.assert_clean();
    // Everything is there after a remount.
    let m = img.mount();
    assert_eq!(
        std::fs::read(m.path().join("a/b/c/moved")).unwrap(),
        b"hello molt"
    );
    assert_eq!(
        std::fs::metadata(m.path().join("hello")).unwrap().mode() & 0o777,
        0o600
    );
    m.unmount();
}

#[test]
fn plain_umount_stops_the_stack_and_leaves_a_clean_image() {
    let img = TestImage::new("umount", "64M");
    let m = img.mount();
    let (sup, _) = m.pids();
    std::fs::write(m.path().join("f"), vec![7u8; 300_000]).unwrap();
    let st = std::process::Command::new("umount")
        .arg(m.path())
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while molt_tests::harness::alive(sup) {
        assert!(
            Instant::now() < deadline,
            "supervisor still running after umount"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    img.assert_clean();
    drop(m);
}

#[test]
fn mount_errors_are_clear() {
    let img = TestImage::new("errors", "64M");
    let mnt = img.mnt.to_str().unwrap();

    let o = fsd(&["mount", "/nonexistent/molt.img", mnt]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));

    let foreign = img.dir.path().join("foreign.img");
    std::fs::write(&foreign, vec![0xAAu8; 1 << 20]).unwrap();
    let o = fsd(&["mount", foreign.to_str().unwrap(), mnt]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a Molt image"), "{}", stderr(&o));

    // A corrupted superblock asks for fsck.
    let broken = img.dir.path().join("broken.img");
    std::fs::copy(&img.image, &broken).unwrap();
    let mut bytes = std::fs::read(&broken).unwrap();
    bytes[40] ^= 0xFF;
    std::fs::write(&broken, &bytes).unwrap();
    let o = fsd(&["mount", broken.to_str().unwrap(), mnt]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("fsck"), "{}", stderr(&o));

    // A truncated image is refused the same way, never a hang.
    let short = img.dir.path().join("short.img");
    std::fs::copy(&img.image, &short).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&short)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let o = fsd(&["mount", short.to_str().unwrap(), mnt]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("fsck"), "{}", stderr(&o));
    assert!(!is_mounted(&img.mnt));

    let o = fsd(&[
        "mount",
        img.image.to_str().unwrap(),
        "/nonexistent-mountpoint",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("mountpoint"), "{}", stderr(&o));

    // No block driver where it is looked for: the error names it and what to do.
    let o = run(
        std::process::Command::new(bin("fsd"))
            .args(["mount", img.image.to_str().unwrap(), mnt])
            .env("MOLT_BLOCKDEV_BIN", "/nonexistent/blockdev"),
        Duration::from_secs(60),
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("the block driver /nonexistent/blockdev is missing")
            && stderr(&o).contains("MOLT_BLOCKDEV_BIN"),
        "{}",
        stderr(&o)
    );
    assert!(!is_mounted(&img.mnt));

    // Mounting twice is refused, on the same mountpoint and for the same image.
    // A mount that should have been refused but was not is taken down before the
    // assertion fails, so no stack outlives the test.
    let unmount_if_mounted = |o: &std::process::Output, at: &str| {
        if o.status.success() {
            fsd(&["unmount", at]);
        }
    };
    let m = img.mount();
    let o = fsd(&["mount", img.image.to_str().unwrap(), mnt]);
    unmount_if_mounted(&o, mnt);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already"), "{}", stderr(&o));
    let other = img.dir.path().join("mnt2");
    std::fs::create_dir(&other).unwrap();
    let o = fsd(&[
        "mount",
        img.image.to_str().unwrap(),
        other.to_str().unwrap(),
    ]);
    unmount_if_mounted(&o, other.to_str().unwrap());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("in use"), "{}", stderr(&o));

    // A busy mount is not unmounted.
    let f = std::fs::File::create(m.path().join("held")).unwrap();
    let o = fsd(&["unmount", mnt]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("busy"), "{}", stderr(&o));
    drop(f);
    m.unmount();
    img.assert_clean();
}

/// One extended-attribute call on `path`: its result (bytes, or -1 with errno).
fn xattr_call(path: &std::path::Path, op: &str, name: &std::ffi::CStr) -> (isize, Vec<u8>, i32) {
    use rustix::fs::XattrFlags;
    let mut buf = vec![0u8; 4096];
    // A set writes a 1-byte value (the buffer's first byte).
    let r = match op {
        "get" => rustix::fs::getxattr(path, name, &mut buf[..]),
        "list" => rustix::fs::listxattr(path, &mut buf[..]),
        "set" => rustix::fs::setxattr(path, name, &buf[..1], XattrFlags::empty()).map(|()| 0),
        _ => rustix::fs::removexattr(path, name).map(|()| 0),
    };
    let (n, errno) = match r {
        Ok(n) => (n as isize, 0),
        Err(e) => (-1, e.raw_os_error()),
    };
    buf.truncate(n.max(0) as usize);
    (n, buf, errno)
}

/// The creation time `statx` reports for `path` (`None` without STATX_BTIME).
fn birth_time(path: &std::path::Path) -> Option<(i64, u32)> {
    use rustix::fs::{statx, AtFlags, StatxFlags, CWD};
    let st = statx(
        CWD,
        path,
        AtFlags::empty(),
        StatxFlags::BASIC_STATS | StatxFlags::BTIME,
    )
    .expect("statx");
    (st.stx_mask & StatxFlags::BTIME.bits() != 0)
        .then_some((st.stx_btime.tv_sec, st.stx_btime.tv_nsec))
}

/// `stat -c %W` of `path`: the birth time in seconds, or 0 where there is none.
fn stat_birth_seconds(path: &std::path::Path) -> i64 {
    let o = std::process::Command::new("stat")
        .args(["-c", "%W"])
        .arg(path)
        .output()
        .expect("running stat");
    assert!(o.status.success(), "{}", stderr(&o));
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .expect("stat %W")
}

#[test]
fn creation_times_reach_statx_and_v1_images_have_none() {
    let img = TestImage::new("crtime", "64M");
    let m = img.mount();
    let f = m.path().join("f");
    let d = m.path().join("d");
    std::fs::write(&f, b"x").unwrap();
    std::fs::create_dir(&d).unwrap();
    for p in [&f, &d] {
        let (sec, nsec) = birth_time(p).expect("a v2 image reports a birth time");
        assert!(nsec < 1_000_000_000);
        let ctime = std::fs::metadata(p).unwrap().ctime();
        assert!((sec - ctime).abs() <= 1, "btime {sec}, ctime {ctime}");
        assert_eq!(stat_birth_seconds(p), sec, "stat -c %W");
    }
    // A change does not move the birth time; the change time moves.
    let born = birth_time(&f);
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&f, b"changed").unwrap();
    assert_eq!(birth_time(&f), born);
    // The old virtual attribute is still readable, never listed, never settable.
    let (n, v, _) = xattr_call(&f, "get", c"user.molt.crtime");
    assert!(n > 0, "getxattr user.molt.crtime failed");
    let text = String::from_utf8(v).unwrap();
    assert_eq!(text, format!("{}.{:09}", born.unwrap().0, born.unwrap().1));
    let (_, names, _) = xattr_call(&f, "list", c"");
    assert!(names.is_empty(), "{:?}", String::from_utf8_lossy(&names));
    for op in ["set", "remove"] {
        let (n, _, errno) = xattr_call(&f, op, c"user.molt.crtime");
        assert_eq!((n, errno), (-1, libc::EPERM), "{op}");
    }
    // After a remount the birth time is the one stored.
    m.unmount();
    let m = img.mount();
    assert_eq!(birth_time(&m.path().join("f")), born);
    m.unmount();

    // A v1 image: no creation time, so statx reports none and %W is 0.
    let v1 = img.dir.path().join("v1.img");
    let o = fsd(&[
        "mkfs",
        v1.to_str().unwrap(),
        "--size",
        "16M",
        "--format-version",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = molt_tests::harness::Mount::new(&v1, &img.mnt);
    let f = m.path().join("old");
    std::fs::write(&f, b"x").unwrap();
    assert_eq!(birth_time(&f), None);
    assert_eq!(stat_birth_seconds(&f), 0);
    let (n, _, errno) = xattr_call(&f, "get", c"user.molt.crtime");
    assert_eq!((n, errno), (-1, libc::ENODATA));
    m.unmount();
}

/// Runs `prog args` and fails the test with its output if it fails.
fn run_ok(prog: &str, args: &[&std::ffi::OsStr]) {
    let o = std::process::Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e}"));
    assert!(
        o.status.success(),
        "{prog} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
}

/// Everything `cp -a` and `rsync -aX` carry, per path under `root`: type, mode, owner,
/// size, mtime, link target, contents and extended attributes.
fn tree_of(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let mut line = format!(
                "{rel} mode={:o} uid={} gid={} mtime={}",
                md.mode(),
                md.uid(),
                md.gid(),
                md.mtime()
            );
            if md.file_type().is_symlink() {
                line += &format!(" -> {}", std::fs::read_link(&p).unwrap().display());
            } else {
                if md.is_file() {
                    let data = std::fs::read(&p).unwrap();
                    line += &format!(" size={} sum={}", data.len(), crc32fast::hash(&data));
                }
                let mut buf = vec![0u8; 65536];
                let names = rustix::fs::llistxattr(&p, &mut buf[..]).unwrap();
                let mut attrs: Vec<String> = buf[..names]
                    .split(|b| *b == 0)
                    .filter(|n| !n.is_empty())
                    .map(|n| {
                        let name = std::ffi::CString::new(n).unwrap();
                        let mut v = vec![0u8; 65536];
                        let len = rustix::fs::lgetxattr(&p, name.as_c_str(), &mut v[..]).unwrap();
                        format!("{}={:?}", String::from_utf8_lossy(n), &v[..len])
                    })
                    .collect();
                attrs.sort();
                line += &format!(" xattrs={attrs:?}");
            }
            if md.is_dir() {
                stack.push(p);
            }
            out.push(line);
        }
    }
    out.sort();
    out
}

#[test]
fn cp_a_and_rsync_ax_copy_a_tree_with_xattrs_onto_molt() {
    let img = TestImage::new("copy", "128M");
    let src = img.dir.path().join("src");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("a.txt"), b"alpha").unwrap();
    std::fs::write(src.join("sub/b.bin"), vec![7u8; 300_000]).unwrap();
    std::fs::write(src.join("sub/deeper/empty"), b"").unwrap();
    std::os::unix::fs::symlink("../a.txt", src.join("sub/link")).unwrap();
    std::fs::set_permissions(src.join("a.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    for (file, name, value) in [
        ("a.txt", c"user.colour", &b"blue"[..]),
        ("sub/b.bin", c"user.big", &[9u8; 3000][..]),
        ("sub", c"user.dir", &b"d"[..]),
    ] {
        rustix::fs::setxattr(src.join(file), name, value, rustix::fs::XattrFlags::empty())
            .expect("the scratch directory takes user xattrs");
    }
    let want = tree_of(&src);
    let m = img.mount();
    let cp_dest = m.path().join("by-cp");
    run_ok("cp", &["-a".as_ref(), src.as_os_str(), cp_dest.as_os_str()]);
    assert_eq!(tree_of(&cp_dest), want, "cp -a");
    let rsync_dest = m.path().join("by-rsync");
    let from = format!("{}/", src.display());
    run_ok(
        "rsync",
        &["-aX".as_ref(), from.as_ref(), rsync_dest.as_os_str()],
    );
    assert_eq!(tree_of(&rsync_dest), want, "rsync -aX");
    // And back off Molt: nothing Molt lists is refused elsewhere.
    let back = img.dir.path().join("back");
    run_ok(
        "cp",
        &["-a".as_ref(), cp_dest.as_os_str(), back.as_os_str()],
    );
    assert_eq!(tree_of(&back), want, "cp -a off Molt");
    m.unmount();
    img.assert_clean();
}
