//! Mounting and unmounting the three-process stack, and the errors users see.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use molt_tests::harness::{fsd, is_mounted, TestImage};

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

    // Mounting twice is refused, on the same mountpoint and for the same image.
    let m = img.mount();
    let o = fsd(&["mount", img.image.to_str().unwrap(), mnt]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already"), "{}", stderr(&o));
    let other = img.dir.path().join("mnt2");
    std::fs::create_dir(&other).unwrap();
    let o = fsd(&[
        "mount",
        img.image.to_str().unwrap(),
        other.to_str().unwrap(),
    ]);
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

#[test]
fn creation_times_are_a_read_only_xattr_and_v1_images_have_none() {
    let img = TestImage::new("crtime", "64M");
    let m = img.mount();
    let f = m.path().join("f");
    std::fs::write(&f, b"x").unwrap();
    let (n, v, _) = xattr_call(&f, "get", c"user.molt.crtime");
    assert!(n > 0, "getxattr user.molt.crtime failed");
    let text = String::from_utf8(v).unwrap();
    let (sec, nsec) = text.split_once('.').expect("SEC.NSEC");
    assert_eq!(nsec.len(), 9, "{text}");
    let sec: i64 = sec.parse().unwrap();
    let ctime = std::fs::metadata(&f).unwrap().ctime();
    assert!((sec - ctime).abs() <= 1, "crtime {text}, ctime {ctime}");
    let (_, names, _) = xattr_call(&f, "list", c"");
    assert!(
        names.split(|b| *b == 0).any(|n| n == b"user.molt.crtime"),
        "{:?}",
        String::from_utf8_lossy(&names)
    );
    for op in ["set", "remove"] {
        let (n, _, errno) = xattr_call(&f, op, c"user.molt.crtime");
        assert_eq!((n, errno), (-1, libc::EPERM), "{op}");
    }
    m.unmount();

    // A v1 image: no creation time, not listed, ENODATA.
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
    let (n, _, errno) = xattr_call(&f, "get", c"user.molt.crtime");
    assert_eq!((n, errno), (-1, libc::ENODATA));
    let (_, names, _) = xattr_call(&f, "list", c"");
    assert!(!names.windows(16).any(|w| w == b"user.molt.crtime"));
    m.unmount();
}
