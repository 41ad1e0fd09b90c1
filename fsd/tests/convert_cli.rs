//! Runs the built `fsd` binary: `mkfs --format-version` and `convert` on temporary image
//! files (made and damaged through the library where the test needs a particular state).

use std::path::Path;
use std::sync::Arc;

use formats::inode::S_IFREG;
use formats::superblock::{Superblock, ROOT_INO};
use formats::version::FormatVersion;
use fsd_core::fs::Fs;
use fsd_core::store::FileStore;
use fsd_server::host::try_lock_exclusive;

mod common;

use common::{fsd, p, text};

fn superblock(img: &Path) -> Superblock {
    let bytes = std::fs::read(img).unwrap();
    Superblock::decode(&bytes[..4096]).unwrap()
}

fn mount(img: &Path) -> Fs {
    Fs::mount(Arc::new(FileStore::open(img, true).unwrap())).unwrap()
}

fn fsck_clean(img: &Path) {
    let o = fsd(&["fsck", p(img)]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// A v1 image with some files, one of them with more extents than fit inline.
fn v1_image(dir: &Path, size: &str) -> std::path::PathBuf {
    let img = dir.join("v1.img");
    let o = fsd(&["mkfs", p(&img), "--size", size, "--format-version", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let fs = mount(&img);
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).unwrap().ino;
    for i in 0..20u64 {
        let f = fs
            .mknod(d, format!("f{i}").as_bytes(), S_IFREG | 0o644, 0, 0, 0)
            .unwrap()
            .ino;
        fs.write(f, 0, format!("file {i}").as_bytes()).unwrap();
    }
    let frag = fs
        .mknod(ROOT_INO, b"frag", S_IFREG | 0o644, 0, 0, 0)
        .unwrap()
        .ino;
    for k in 0..30u64 {
        fs.write(frag, 2 * k * 4096, &[k as u8; 100]).unwrap();
    }
    fs.unmount().unwrap();
    img
}

#[test]
fn mkfs_makes_every_version_and_the_newest_by_default() {
    let dir = tempfile::tempdir().unwrap();
    for (arg, want) in [
        (Some("1"), FormatVersion::V1),
        (Some("2"), FormatVersion::V2),
        (Some("3"), FormatVersion::V3),
        (None, FormatVersion::CURRENT),
    ] {
        let img = dir.path().join(format!("img-{arg:?}"));
        let mut args = vec!["mkfs", p(&img), "--size", "16M"];
        args.extend(arg.map(|a| ["--format-version", a]).into_iter().flatten());
        let o = fsd(&args);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            text(&o).contains(&format!("format v{}", want.0)),
            "{}",
            text(&o)
        );
        let sb = superblock(&img);
        assert_eq!(sb.format_version, want);
        assert_eq!(sb.incompat, want.incompat_features());
        fsck_clean(&img);
    }
    let img = dir.path().join("bad");
    for bad in ["0", "4", "x"] {
        let o = fsd(&["mkfs", p(&img), "--size", "16M", "--format-version", bad]);
        assert!(!o.status.success(), "{bad}: {}", text(&o));
        assert!(!img.exists());
    }
}

#[test]
fn convert_moves_an_image_to_v3_and_shows_progress() {
    let dir = tempfile::tempdir().unwrap();
    let img = v1_image(dir.path(), "32M");
    let o = fsd(&["convert", p(&img), "--to", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("converting") && err.contains("to format v3") && err.contains("(100%)"),
        "{err}"
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("from format v1 to v3"),
        "{}",
        text(&o)
    );
    let sb = superblock(&img);
    assert_eq!(
        (sb.format_version, sb.conversion_target),
        (FormatVersion::V3, None)
    );
    fsck_clean(&img);
    let fs = mount(&img);
    let d = fs.lookup(ROOT_INO, b"d").unwrap().ino;
    let f7 = fs.lookup(d, b"f7").unwrap();
    assert_eq!(fs.read(f7.ino, 0, 100).unwrap(), b"file 7");
    assert!(f7.crtime.is_some());
    fs.unmount().unwrap();
    // Again: nothing to do. Backwards: refused.
    let o = fsd(&["convert", p(&img), "--to", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("already has format v3"), "{}", text(&o));
    let o = fsd(&["convert", p(&img), "--to", "2"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("older"), "{}", text(&o));
}

#[test]
fn convert_refuses_an_image_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let img = v1_image(dir.path(), "16M");
    // What `fsd mount` holds while the image is mounted.
    let held = std::fs::File::open(&img).unwrap();
    assert!(try_lock_exclusive(&held).unwrap());
    let o = fsd(&["convert", p(&img), "--to", "2"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("in use"), "{}", text(&o));
    assert_eq!(superblock(&img).format_version, FormatVersion::V1);
    drop(held);
    let o = fsd(&["convert", p(&img), "--to", "2"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn convert_refuses_without_the_space_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let img = v1_image(dir.path(), "4M");
    let fs = mount(&img);
    let f = fs
        .mknod(ROOT_INO, b"fill", S_IFREG | 0o644, 0, 0, 0)
        .unwrap()
        .ino;
    let mut at = 0;
    while fs.write(f, at, &[1u8; 4096]).is_ok() {
        at += 4096;
    }
    fs.unmount().unwrap();
    let o = fsd(&["convert", p(&img), "--to", "2"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains("needs 65536 bytes free, the image has"),
        "{msg}"
    );
    let sb = superblock(&img);
    assert_eq!(
        (sb.format_version, sb.conversion_target),
        (FormatVersion::V1, None)
    );
    fsck_clean(&img);
}

#[test]
fn convert_finishes_a_conversion_left_half_done() {
    let dir = tempfile::tempdir().unwrap();
    let img = v1_image(dir.path(), "16M");
    let fs = mount(&img);
    fs.start_conversion(FormatVersion::V3).unwrap();
    fs.convert_step(4).unwrap();
    fs.sync().unwrap();
    // The converter dies here.
    drop(fs);
    let o = fsd(&["fsck", p(&img)]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("in progress"), "{}", text(&o));
    let o = fsd(&["convert", p(&img), "--to", "2"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("--to 3"), "{}", text(&o));
    let o = fsd(&["convert", p(&img), "--to", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("(resumed)"), "{}", text(&o));
    assert_eq!(superblock(&img).format_version, FormatVersion::V3);
    fsck_clean(&img);
}
