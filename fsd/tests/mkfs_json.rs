//! Runs the built `fsd` binary: `mkfs --json` describes the filesystem it made, and the
//! description agrees with the superblock on the image and with `fsck --json`.

use std::path::Path;
use std::process::Output;

use formats::superblock::Superblock;
use formats::BLOCK_SIZE;

mod common;

use common::{fsd, p, text};

fn json(o: &Output) -> serde_json::Value {
    let out = String::from_utf8(o.stdout.clone()).expect("utf-8 output");
    assert_eq!(out.lines().count(), 1, "one line of JSON: {out}");
    serde_json::from_str(&out).expect("a JSON object")
}

fn superblock(img: &Path) -> Superblock {
    let bytes = std::fs::read(img).unwrap();
    Superblock::decode(&bytes[..BLOCK_SIZE]).unwrap()
}

#[test]
fn mkfs_json_matches_the_superblock_and_fsck() {
    let dir = tempfile::tempdir().unwrap();
    for (version, size, bytes) in [("1", "64M", 64u64 << 20), ("3", "16M", 16 << 20)] {
        let img = dir.path().join(format!("img-v{version}"));
        let o = fsd(&[
            "mkfs",
            p(&img),
            "--size",
            size,
            "--format-version",
            version,
            "--json",
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let made = json(&o);

        let sb = superblock(&img);
        let g = sb.geometry;
        assert_eq!(made["image"], p(&img));
        assert_eq!(made["bytes"], bytes);
        assert_eq!(made["block_size"], BLOCK_SIZE);
        assert_eq!(made["blocks"], g.total_blocks);
        assert_eq!(made["blocks"], bytes / BLOCK_SIZE as u64);
        assert_eq!(made["inodes"], g.inode_count);
        assert_eq!(made["free_blocks"], sb.free_blocks);
        assert_eq!(made["free_inodes"], sb.free_inodes);
        assert_eq!(made["format_version"], sb.format_version.0);
        assert_eq!(made["format_version"].to_string(), version);
        let uuid: String = sb.uuid.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(made["uuid"], uuid);

        // fsck's view of the same image: what is in use is what mkfs did not leave free.
        let o = fsd(&["fsck", p(&img), "--json"]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        let checked = json(&o);
        assert_eq!(checked["image"], made["image"]);
        assert_eq!(checked["clean"], true);
        let used =
            |total: &str, free: &str| made[total].as_u64().unwrap() - made[free].as_u64().unwrap();
        assert_eq!(
            checked["stats"]["blocks_used"],
            used("blocks", "free_blocks")
        );
        assert_eq!(checked["stats"]["inodes"], used("inodes", "free_inodes"));
    }
}

#[test]
fn mkfs_json_refusal_prints_no_json() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    assert!(fsd(&["mkfs", p(&img), "--size", "8M", "--json"])
        .status
        .success());
    // A second mkfs without --force is refused: the reason on stderr, nothing on stdout.
    let o = fsd(&["mkfs", p(&img), "--size", "8M", "--json"]);
    assert!(!o.status.success());
    assert!(o.stdout.is_empty(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
}
