//! Runs the built `fsd` binary: mkfs and fsck on temporary image files.

mod common;

use common::{fsd, p, text};

#[test]
fn mkfs_then_fsck_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    let o = fsd(&["mkfs", p(&img), "--size", "64M"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 64 << 20);
    let o = fsd(&["fsck", p(&img)]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("clean"));

    // A second mkfs without --force is refused; with it, it goes ahead.
    let o = fsd(&["mkfs", p(&img), "--size", "64M"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--force"), "{}", text(&o));
    let o = fsd(&["mkfs", p(&img), "--size", "64M", "--force"]);
    assert!(o.status.success(), "{}", text(&o));

    let o = fsd(&["fsck", p(&img), "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("fsck --json prints JSON");
    assert_eq!(v["clean"], true);
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["problems"].as_array().unwrap().len(), 0);
    assert_eq!(v["stats"]["directories"], 2);
    assert_eq!(v["image"], p(&img));
}

#[test]
fn damage_is_reported_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    assert!(fsd(&["mkfs", p(&img), "--size", "8M"]).status.success());
    // Mark the superblock's free-block count wrong: a re-encoded, valid superblock.
    let mut bytes = std::fs::read(&img).unwrap();
    let sb = formats::superblock::Superblock::decode(&bytes[..4096]).unwrap();
    let bad = formats::superblock::Superblock {
        free_blocks: sb.free_blocks - 5,
        ..sb
    };
    bytes[..4096].copy_from_slice(&bad.encode()[..]);
    std::fs::write(&img, &bytes).unwrap();

    let o = fsd(&["fsck", p(&img), "--json"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["clean"], false);
    assert_eq!(v["problems"][0]["structure"], "superblock");
    assert_eq!(v["problems"][0]["repaired"], false);
    let o = fsd(&["fsck", p(&img)]);
    assert!(
        text(&o).contains("superblock at block 0: free_blocks"),
        "{}",
        text(&o)
    );

    let o = fsd(&["fsck", p(&img), "--repair"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("(repaired)"));
    assert_eq!(fsd(&["fsck", p(&img)]).status.code(), Some(0));
}

#[test]
fn sizes_v1_can_and_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    let o = fsd(&["mkfs", p(&big), "--size", "1T"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::metadata(&big).unwrap().len(), 1 << 40);
    let o = fsd(&["fsck", p(&big)]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    let small = dir.path().join("small");
    let o = fsd(&["mkfs", p(&small), "--size", "100K"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("minimum"), "{}", text(&o));
    assert!(!small.exists(), "a refused mkfs leaves no file behind");

    let o = fsd(&["mkfs", p(&small), "--size", "lots"]);
    assert!(!o.status.success());
}

#[test]
fn not_a_molt_image_is_operational_error() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0xA5u8; 1 << 20]).unwrap();
    let o = fsd(&["fsck", p(&junk)]);
    assert_eq!(o.status.code(), Some(8), "{}", text(&o));
    assert!(text(&o).contains("not a Molt image"), "{}", text(&o));
    let o = fsd(&["fsck", p(&junk), "--json"]);
    assert_eq!(o.status.code(), Some(8));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["exit_code"], 8);

    let o = fsd(&["fsck", p(&dir.path().join("missing"))]);
    assert_eq!(o.status.code(), Some(8), "{}", text(&o));
}

/// A reader that stops reading (`fsd fsck IMG | head`) ends the command quietly with
/// status 141, as SIGPIPE would, not with a panic.
#[test]
fn a_closed_standard_output_ends_fsck_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    assert!(fsd(&["mkfs", p(&img), "--size", "8M"]).status.success());
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_fsd"))
        .args(["fsck", p(&img)])
        .stdout(writer)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(141), "{}", text(&o));
    assert!(o.stderr.is_empty(), "{}", text(&o));
}
