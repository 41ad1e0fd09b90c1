use std::collections::BTreeMap;
use std::sync::Arc;

use formats::bitmap;
use formats::block::{BlockAddr, BlockKind, Ino, BLOCK_SIZE, TAIL_CRC};
use formats::dir::DirHeader;
use formats::inode::{Inode, INODE_SIZE, S_IFCHR, S_IFIFO, S_IFREG};
use formats::journal::JournalSuper;
use formats::superblock::{FsState, Superblock, ROOT_INO};
use formats::version::FormatVersion;

use super::*;
use crate::fs::journal::JournalWriter;
use crate::fs::{Fs, XattrFlags};
use crate::mkfs::{mkfs, MkfsOptions};
use crate::store::{BlockStore, MemStore};

const BLOCKS: u64 = 2048;

fn fresh() -> MemStore {
    let s = MemStore::new(BLOCKS);
    mkfs(&s, "test", &MkfsOptions::default()).unwrap();
    s
}

fn run(s: &dyn BlockStore, repair: bool) -> FsckReport {
    check(s, &FsckOptions { repair }).unwrap()
}

fn read(s: &dyn BlockStore, addr: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    s.read(addr, &mut b).unwrap();
    b
}

fn superblock(s: &dyn BlockStore) -> Superblock {
    Superblock::decode(&read(s, 0)).unwrap()
}

/// Rewrites inode `ino` through `f`, with a valid checksum.
fn edit_inode(s: &dyn BlockStore, ino: u32, f: impl FnOnce(&mut Inode)) {
    let sb = superblock(s);
    let (addr, off) = sb.geometry.inode_location(Ino(ino));
    let mut b = read(s, addr.0);
    let mut i = Inode::decode(Ino(ino), &b[off..off + INODE_SIZE], sb.newest_layout())
        .unwrap()
        .unwrap();
    f(&mut i);
    i.encode(Ino(ino), &mut b[off..off + INODE_SIZE]).unwrap();
    s.write(addr.0, &b).unwrap();
}

/// Flips bit `item` of a bitmap and reseals the block, so only the meaning is wrong.
fn toggle_bit(s: &dyn BlockStore, kind: BlockKind, item: u64) {
    let g = superblock(s).geometry;
    let start = if kind == BlockKind::InodeBitmap {
        g.inode_bitmap_start
    } else {
        g.block_bitmap_start
    };
    let per = formats::superblock::BITS_PER_BITMAP_BLOCK;
    let addr = start + item / per;
    let b = read(s, addr);
    let mut payload = bitmap::decode(kind, &b, BlockAddr(addr)).unwrap().to_vec();
    let i = (item % per) as usize;
    let v = bitmap::get_bit(&payload, i);
    bitmap::set_bit(&mut payload, i, !v);
    s.write(addr, &bitmap::encode(kind, &payload, BlockAddr(addr))[..])
        .unwrap();
}

fn names(r: &FsckReport) -> Vec<&str> {
    r.problems.iter().map(|p| p.structure.as_str()).collect()
}

/// Expects problems naming `structure`, a repair that fixes all (exit 1), then a clean
/// check.
fn detect_then_repair(s: &MemStore, structure: &str) {
    let r = run(s, false);
    assert_eq!(r.exit_code(), 4, "{}", r.render("img"));
    assert!(
        names(&r).contains(&structure),
        "{structure} not named: {}",
        r.render("img")
    );
    let r = run(s, true);
    assert_eq!(r.exit_code(), 1, "{}", r.render("img"));
    assert!(r.repaired_all);
    let r = run(s, false);
    assert_eq!(r.exit_code(), 0, "{}", r.render("img"));
}

#[test]
fn fresh_image_is_clean() {
    let s = fresh();
    let r = run(&s, false);
    assert_eq!(r.exit_code(), 0, "{}", r.render("img"));
    assert!(r.notes.is_empty(), "{:?}", r.notes);
    assert_eq!(r.stats.inodes, 2);
    assert_eq!(r.stats.directories, 2);
    let g = superblock(&s).geometry;
    assert_eq!(r.stats.blocks_used, g.data_start + 4);
    // A repair of a clean image changes nothing.
    let before = s.image();
    assert_eq!(run(&s, true).exit_code(), 0);
    assert_eq!(s.image(), before);
}

#[test]
fn foreign_and_corrupt_superblocks() {
    assert!(matches!(
        check(&MemStore::new(BLOCKS), &FsckOptions::default()),
        Err(FsckError::NotMolt(_))
    ));
    assert!(matches!(
        check(&MemStore::new(0), &FsckOptions::default()),
        Err(FsckError::NotMolt(_))
    ));

    let s = fresh();
    let mut b = read(&s, 0);
    b[3] ^= 0x20;
    s.write(0, &b).unwrap();
    let e = check(&s, &FsckOptions::default()).unwrap_err();
    assert!(e.to_string().contains("not a Molt image"), "{e}");

    let s = fresh();
    let mut b = read(&s, 0);
    b[200] ^= 1;
    s.write(0, &b).unwrap();
    let r = run(&s, false);
    assert_eq!(r.exit_code(), 4);
    assert_eq!(names(&r), ["superblock"]);
    assert!(r.problems[0].location.contains("block 0"));
    // A checksum mismatch is never "repaired", and nothing is written.
    let before = s.image();
    assert_eq!(run(&s, true).exit_code(), 4);
    assert_eq!(s.image(), before);

    // An image shorter than its superblock says.
    let s = fresh();
    let short = MemStore::from_image(s.image()[..(BLOCKS as usize - 1) * BLOCK_SIZE].to_vec());
    assert_eq!(run(&short, false).exit_code(), 4);
}

#[test]
fn torn_bitmap_is_an_error_a_repair_leaves() {
    let s = fresh();
    let g = superblock(&s).geometry;
    let mut b = read(&s, g.block_bitmap_start);
    b[100] ^= 0x04;
    s.write(g.block_bitmap_start, &b).unwrap();
    let r = run(&s, false);
    assert_eq!(r.exit_code(), 4);
    assert_eq!(names(&r), ["block bitmap"]);
    assert!(
        r.problems[0].message.contains("checksum"),
        "{}",
        r.problems[0]
    );
    let r = run(&s, true);
    assert_eq!(r.exit_code(), 4);
    assert_eq!(read(&s, g.block_bitmap_start), b);
}

#[test]
fn block_in_use_marked_free() {
    let s = fresh();
    let g = superblock(&s).geometry;
    toggle_bit(&s, BlockKind::BlockBitmap, g.data_start + 1);
    let r = run(&s, false);
    let p = r
        .problems
        .iter()
        .find(|p| p.structure == "block bitmap")
        .unwrap();
    assert!(
        p.message.contains(&format!(
            "block {} is in use but marked free",
            g.data_start + 1
        )),
        "{p}"
    );
    // The free count now disagrees too.
    assert!(names(&r).contains(&"superblock"));
    detect_then_repair(&s, "block bitmap");
}

#[test]
fn unowned_block_and_padding_bits() {
    let s = fresh();
    let g = superblock(&s).geometry;
    toggle_bit(&s, BlockKind::BlockBitmap, g.data_start + 100);
    toggle_bit(&s, BlockKind::BlockBitmap, g.total_blocks + 3);
    toggle_bit(&s, BlockKind::BlockBitmap, 1);
    toggle_bit(&s, BlockKind::InodeBitmap, 0);
    let r = run(&s, false);
    let msgs: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
    for want in [
        "nothing owns it",
        "padding bit past the last block",
        "metadata block 1",
        "padding bit is clear",
    ] {
        assert!(msgs.iter().any(|m| m.contains(want)), "{want}: {msgs:#?}");
    }
    detect_then_repair(&s, "block bitmap");
}

#[test]
fn unreachable_inode_is_freed() {
    let s = fresh();
    toggle_bit(&s, BlockKind::InodeBitmap, 9);
    let r = run(&s, false);
    assert!(
        r.problems
            .iter()
            .any(|p| p.structure == "inode bitmap" && p.message.contains("inode 9")),
        "{}",
        r.render("i")
    );
    detect_then_repair(&s, "inode bitmap");
}

#[test]
fn wrong_link_count() {
    let s = fresh();
    edit_inode(&s, 1, |i| i.nlink = 5);
    let r = run(&s, false);
    let p = &r.problems[0];
    assert_eq!(p.structure, "inode");
    assert!(p.location.contains("inode 1 (/)"), "{p}");
    assert!(p.message.contains("link count is 5 but should be 2"), "{p}");
    detect_then_repair(&s, "inode");
}

#[test]
fn wrong_entry_count() {
    let s = fresh();
    let g = superblock(&s).geometry;
    let addr = g.data_start; // the root directory's header
    let mut h = DirHeader::decode(&read(&s, addr), ROOT_INO, BlockAddr(addr)).unwrap();
    h.entry_count = 3;
    s.write(addr, &h.encode(ROOT_INO, BlockAddr(addr))[..])
        .unwrap();
    let r = run(&s, false);
    assert_eq!(names(&r), ["directory header"]);
    assert!(r.problems[0].location.contains(&format!("block {addr}")));
    detect_then_repair(&s, "directory header");
}

#[test]
fn wrong_free_counts_and_state() {
    let s = fresh();
    let mut sb = superblock(&s);
    sb.free_blocks -= 1;
    sb.free_inodes += 2;
    s.write(0, &sb.encode()[..]).unwrap();
    let r = run(&s, false);
    assert_eq!(names(&r), ["superblock", "superblock"]);
    detect_then_repair(&s, "superblock");

    // Mounted: a note, free counts not judged; a repair marks it clean.
    let mut sb = superblock(&s);
    sb.state = FsState::Mounted;
    sb.free_blocks = 0;
    s.write(0, &sb.encode()[..]).unwrap();
    let r = run(&s, false);
    assert_eq!(r.exit_code(), 0);
    assert!(r.notes.iter().any(|n| n.contains("not cleanly unmounted")));
    assert_eq!(run(&s, true).exit_code(), 0);
    let sb = superblock(&s);
    assert_eq!(sb.state, FsState::Clean);
    assert_eq!(run(&s, false).exit_code(), 0);
}

#[test]
fn directory_damage_is_named() {
    // A bucket with a bad checksum: an error no repair removes, and a repair frees nothing.
    let s = fresh();
    let g = superblock(&s).geometry;
    let mut b = read(&s, g.data_start + 1);
    b[10] ^= 1;
    s.write(g.data_start + 1, &b).unwrap();
    let r = run(&s, false);
    assert_eq!(names(&r), ["directory bucket"]);
    assert!(r.problems[0].location.contains("directory inode 1 (/)"));
    assert_eq!(run(&s, true).exit_code(), 4);

    // A type mismatch between an entry and its inode.
    let s = populated();
    edit_inode(&*s, file_ino(&s, b"hello"), |i| i.mode = S_IFIFO | 0o644);
    let r = run(&*s, false);
    assert!(
        r.problems
            .iter()
            .any(|p| p.structure == "directory bucket" && p.message.contains("has type 8")),
        "{}",
        r.render("i")
    );
}

fn file_ino(s: &Arc<MemStore>, name: &[u8]) -> u32 {
    let fs = Fs::mount(s.clone()).unwrap();
    let ino = fs.lookup(ROOT_INO, name).unwrap().ino.0;
    fs.unmount().unwrap();
    ino
}

/// Writes one journal transaction carrying `blocks`, as the filesystem would.
fn journal_tx(s: &dyn BlockStore, blocks: Vec<(u64, Vec<u8>)>) {
    let g = superblock(s).geometry;
    let jsb = JournalSuper::decode(&read(s, g.journal_start), BlockAddr(g.journal_start)).unwrap();
    let mut w = JournalWriter::new(&g, jsb.sequence);
    let map: BTreeMap<u64, Box<[u8; BLOCK_SIZE]>> = blocks
        .into_iter()
        .map(|(a, b)| (a, Box::new(b.try_into().unwrap())))
        .collect();
    w.append(s, &map).unwrap();
    s.flush().unwrap();
}

#[test]
fn journal_is_checked_as_replayed() {
    // The image in place is wrong, the journal holds the fix: clean, with a note.
    let s = fresh();
    let g = superblock(&s).geometry;
    let good = read(&s, g.inode_table_start);
    edit_inode(&s, 1, |i| i.nlink = 7);
    journal_tx(&s, vec![(g.inode_table_start, good.clone())]);
    let before = s.image();
    let r = run(&s, false);
    assert_eq!(r.exit_code(), 0, "{}", r.render("i"));
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("1 complete transactions")),
        "{:?}",
        r.notes
    );
    assert_eq!(s.image(), before, "a check must not write");
    // A repair replays it for real.
    let r = run(&s, true);
    assert_eq!(r.exit_code(), 0, "{}", r.render("i"));
    assert_eq!(read(&s, g.inode_table_start), good);
    assert!(run(&s, false).notes.is_empty());

    // The journal carries the damage: found before replay, fixed by a repair.
    let s = fresh();
    let clean = read(&s, g.inode_table_start);
    edit_inode(&s, 1, |i| i.nlink = 9);
    let bad = read(&s, g.inode_table_start);
    s.write(g.inode_table_start, &clean).unwrap();
    journal_tx(&s, vec![(g.inode_table_start, bad)]);
    assert_eq!(run(&s, false).exit_code(), 4);
    assert_eq!(run(&s, true).exit_code(), 1);
    assert_eq!(run(&s, false).exit_code(), 0);

    // A corrupt journal superblock is named.
    let s = fresh();
    let mut b = read(&s, g.journal_start);
    b[5] ^= 1;
    s.write(g.journal_start, &b).unwrap();
    let r = run(&s, false);
    assert_eq!(names(&r), ["journal superblock"]);
}

/// An image with everything the filesystem can make, cleanly unmounted.
fn populated() -> Arc<MemStore> {
    populated_in(FormatVersion::CURRENT)
}

fn populated_in(version: FormatVersion) -> Arc<MemStore> {
    let s = Arc::new(MemStore::new(4096));
    let opts = MkfsOptions {
        version,
        ..MkfsOptions::default()
    };
    mkfs(&*s, "test", &opts).unwrap();
    let fs = Fs::mount(s.clone()).unwrap();
    let root = ROOT_INO;
    let hello = fs
        .mknod(root, b"hello", S_IFREG | 0o644, 0, 1000, 1000)
        .unwrap()
        .ino;
    fs.write(hello, 0, b"hello, world\n").unwrap();
    let a = fs.mkdir(root, b"a", 0o755, 0, 0).unwrap().ino;
    let b = fs.mkdir(a, b"b", 0o755, 0, 0).unwrap().ino;
    let c = fs.mkdir(b, b"c", 0o700, 0, 0).unwrap().ino;
    fs.link(hello, c, b"hello-again").unwrap();
    fs.link(hello, a, b"hello-too").unwrap();
    fs.symlink(root, b"short", b"a/b/c", 0, 0).unwrap();
    fs.symlink(b, b"long", &[b'x'; 3000], 0, 0).unwrap();
    fs.setxattr(hello, b"user.colour", b"blue", XattrFlags::default())
        .unwrap();
    fs.setxattr(c, b"user.big", &[7u8; 2000], XattrFlags::default())
        .unwrap();
    let sparse = fs
        .mknod(a, b"sparse", S_IFREG | 0o600, 0, 0, 0)
        .unwrap()
        .ino;
    fs.write(sparse, 20 << 20, b"end").unwrap();
    // Every other block: one extent each, more than the inode holds inline.
    let frag = fs
        .mknod(b, b"fragmented", S_IFREG | 0o600, 0, 0, 0)
        .unwrap()
        .ino;
    for i in 0..40u64 {
        fs.write(frag, i * 2 * BLOCK_SIZE as u64, &[i as u8; BLOCK_SIZE])
            .unwrap();
    }
    fs.mknod(root, b"fifo", S_IFIFO | 0o600, 0, 0, 0).unwrap();
    fs.mknod(root, b"null", S_IFCHR | 0o666, 0x0103, 0, 0)
        .unwrap();
    // A big directory with long names: splits and overflow chains.
    let big = fs.mkdir(root, b"big", 0o755, 0, 0).unwrap().ino;
    for i in 0..400 {
        let name = format!("{i:04}-{}", "n".repeat(180));
        fs.mknod(big, name.as_bytes(), S_IFREG | 0o644, 0, 0, 0)
            .unwrap();
    }
    for i in (0..400).step_by(3) {
        let name = format!("{i:04}-{}", "n".repeat(180));
        fs.unlink(big, name.as_bytes()).unwrap();
    }
    fs.rename(root, b"short", a, b"short-moved", false, false)
        .unwrap();
    fs.unmount().unwrap();
    s
}

#[test]
fn populated_image_is_clean() {
    let s = populated();
    let r = run(&*s, false);
    assert_eq!(r.exit_code(), 0, "{}", r.render("populated"));
    assert!(r.stats.files >= 270, "{:?}", r.stats);
    assert_eq!(r.stats.directories, 6);
    let structures: std::collections::HashSet<&str> = metadata_map(&*s)
        .unwrap()
        .iter()
        .map(|m| m.structure)
        .collect();
    for want in [
        "superblock",
        "journal superblock",
        "inode bitmap",
        "block bitmap",
        "inode",
        "directory header",
        "directory bucket",
        "extent block",
        "xattr block",
    ] {
        assert!(
            structures.contains(want),
            "{want} missing from the metadata map"
        );
    }
}

#[test]
fn orphans_are_noted_and_freed() {
    let s = Arc::new(MemStore::new(4096));
    mkfs(&*s, "test", &MkfsOptions::default()).unwrap();
    let fs = Fs::mount(s.clone()).unwrap();
    let f = fs
        .mknod(ROOT_INO, b"open", S_IFREG | 0o644, 0, 0, 0)
        .unwrap()
        .ino;
    fs.write(f, 0, &[1u8; 3 * BLOCK_SIZE]).unwrap();
    fs.unlink(ROOT_INO, b"open").unwrap();
    let d = fs.mkdir(ROOT_INO, b"gone", 0o755, 0, 0).unwrap().ino;
    fs.rmdir(ROOT_INO, b"gone").unwrap();
    fs.sync().unwrap();
    // Power cut while both are still open: nothing more reaches the image.
    let img = MemStore::from_image(s.image());
    drop(fs);
    let r = run(&img, false);
    assert_eq!(r.exit_code(), 0, "{}", r.render("crashed"));
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("orphan directory holds 2")),
        "{:?}",
        r.notes
    );
    let r = run(&img, true);
    assert_eq!(r.exit_code(), 0, "{}", r.render("crashed"));
    assert!(
        r.notes.iter().any(|n| n.contains("freed 2 orphaned")),
        "{:?}",
        r.notes
    );
    let r = run(&img, false);
    assert_eq!(r.exit_code(), 0, "{}", r.render("crashed"));
    assert!(r.notes.is_empty(), "{:?}", r.notes);
    assert_eq!(r.stats.inodes, 2);
    let sb = superblock(&img);
    assert_eq!(sb.free_inodes, sb.geometry.inode_count - 2);
    let _ = d;
}

#[test]
fn crash_images_check_clean_after_replay() {
    let s = Arc::new(MemStore::new(4096));
    mkfs(&*s, "test", &MkfsOptions::default()).unwrap();
    let fs = Fs::mount(s.clone()).unwrap();
    let mut images = Vec::new();
    for i in 0..30u64 {
        let name = format!("f{i}");
        let ino = fs
            .mknod(ROOT_INO, name.as_bytes(), S_IFREG | 0o644, 0, 0, 0)
            .unwrap()
            .ino;
        fs.write(ino, i * 3000, &vec![i as u8; 5000]).unwrap();
        if i % 4 == 0 {
            fs.mkdir(ROOT_INO, format!("d{i}").as_bytes(), 0o755, 0, 0)
                .unwrap();
        }
        if i % 5 == 0 && i > 0 {
            fs.unlink(ROOT_INO, format!("f{}", i - 1).as_bytes())
                .unwrap();
        }
        if i % 7 == 0 {
            fs.sync().unwrap();
        }
        let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        images.push(s.crash_image(&mut |k| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % k
        }));
    }
    fs.unmount().unwrap();
    for (i, img) in images.into_iter().enumerate() {
        let m = MemStore::from_image(img);
        let r = run(&m, false);
        assert_eq!(r.exit_code(), 0, "crash image {i}: {}", r.render("crash"));
        let r = run(&m, true);
        assert_eq!(r.exit_code(), 0, "crash image {i}: {}", r.render("crash"));
        assert_eq!(run(&m, false).exit_code(), 0);
    }
}

/// Re-seals a tailed block or re-checksums an inode slot after its bytes were changed.
fn reseal(s: &dyn BlockStore, m: &MetaRange, b: &mut [u8]) {
    if m.structure == "inode" {
        let g = superblock(s).geometry;
        let slot = (m.block - g.inode_table_start) * formats::superblock::INODES_PER_BLOCK
            + (m.bytes.start / INODE_SIZE) as u64;
        let area = &mut b[m.bytes.clone()];
        let mut h = crc32fast::Hasher::new();
        h.update(&(slot as u32).to_le_bytes());
        h.update(&area[..INODE_SIZE - 4]);
        let crc = h.finalize();
        area[INODE_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
    } else if m.block != 0 {
        let crc = crc32fast::hash(&b[..TAIL_CRC]);
        b[TAIL_CRC..].copy_from_slice(&crc.to_le_bytes());
    }
}

#[test]
fn every_metadata_byte_is_guarded() {
    let s = populated();
    let map = metadata_map(&*s).unwrap();
    let mut flips = 0;
    for m in &map {
        let orig = read(&*s, m.block);
        // A sample of each range: its ends and a stride through it.
        let mut offs: Vec<usize> = m.bytes.clone().step_by(97).collect();
        offs.extend([m.bytes.start, m.bytes.end - 1]);
        for off in offs {
            let mut b = orig.clone();
            b[off] ^= 0x01;
            s.write(m.block, &b).unwrap();
            flips += 1;
            match check(&*s, &FsckOptions::default()) {
                Err(FsckError::NotMolt(_)) => assert!(m.block == 0 && off < 8),
                Err(e) => panic!("{e}"),
                // A stale checksum over whole fields is what a reset torn by a power cut
                // leaves: mountable, and reported as such.
                Ok(r)
                    if m.structure == "journal superblock"
                        && (off >= TAIL_CRC || (8..16).contains(&off))
                        && r.problems.is_empty() =>
                {
                    assert!(
                    r.notes
                        .iter()
                        .any(|n| n.contains("journal superblock was torn")),
                        "flip at byte {off} of the journal superblock read as a torn reset but not noted: {}",
                        r.render("flip")
                    )
                }
                Ok(r) => assert!(
                    r.problems.iter().any(|p| p.structure == m.structure),
                    "flip at block {} byte {off} ({}) not named: {}",
                    m.block,
                    m.structure,
                    r.render("flip")
                ),
            }
        }
        s.write(m.block, &orig).unwrap();
    }
    assert!(flips > 500);
    assert_eq!(run(&*s, false).exit_code(), 0);
}

#[test]
fn resealed_garbage_never_panics() {
    let s = populated();
    let image = s.image();
    let map = metadata_map(&*s).unwrap();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..300 {
        let st = MemStore::from_image(image.clone());
        for _ in 0..(1 + rnd() % 3) {
            let m = &map[(rnd() % map.len() as u64) as usize];
            let mut b = read(&st, m.block);
            let width = m.bytes.len().min(64);
            let off = m.bytes.start + (rnd() as usize % (m.bytes.len() - width + 1));
            // Small values are likelier to pass the decoders and reach deeper checks.
            for byte in &mut b[off..off + (1 + rnd() as usize % width)] {
                *byte = match rnd() % 4 {
                    0 => 0,
                    1 => 1,
                    2 => 0xff,
                    _ => rnd() as u8,
                };
            }
            reseal(&st, m, &mut b);
            st.write(m.block, &b).unwrap();
        }
        let r = check(&st, &FsckOptions::default());
        let _ = r.map(|r| r.exit_code());
        let r = check(&st, &FsckOptions { repair: true });
        if let Ok(r) = r {
            // Whatever a repair claims to have fixed stays fixed.
            if r.exit_code() == 1 {
                let again = check(&st, &FsckOptions::default()).unwrap();
                assert_eq!(
                    again.exit_code(),
                    0,
                    "round {round}: {}",
                    again.render("again")
                );
            }
        }
    }
}

#[test]
fn every_version_checks_clean() {
    for v in FormatVersion::ALL {
        let s = populated_in(v);
        assert_eq!(superblock(&*s).format_version, v);
        let r = run(&*s, false);
        assert!(r.is_clean(), "v{}: {:#?}", v.0, r.problems);
    }
}

/// A v1 image stopped (cleanly unmounted) half-way through a conversion to v3.
fn half_converted() -> (Arc<MemStore>, u64) {
    let s = populated_in(FormatVersion::V1);
    let fs = Fs::mount(s.clone()).unwrap();
    fs.start_conversion(FormatVersion::V3).unwrap();
    fs.convert_step(3).unwrap();
    fs.convert_step(3).unwrap();
    fs.unmount().unwrap();
    let cursor = superblock(&*s).conversion_cursor;
    assert!(cursor > 3, "cursor {cursor}");
    (s, cursor)
}

#[test]
fn a_half_converted_image_checks_clean_and_says_so() {
    let (s, cursor) = half_converted();
    let sb = superblock(&*s);
    assert_eq!(
        (sb.format_version, sb.conversion_target),
        (FormatVersion::V1, Some(FormatVersion::V3))
    );
    let r = run(&*s, false);
    assert!(r.is_clean(), "{:#?}", r.problems);
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains(&format!("v1 to v3 is in progress at inode {cursor}"))),
        "{:?}",
        r.notes
    );
    // A repair of something else keeps the conversion where it is.
    let mut sb = superblock(&*s);
    sb.free_inodes += 1;
    s.write(0, &sb.encode()[..]).unwrap();
    let r = run(&*s, true);
    assert_eq!(r.exit_code(), EXIT_REPAIRED, "{:#?}", r.problems);
    let sb = superblock(&*s);
    assert_eq!(
        (sb.conversion_target, sb.conversion_cursor),
        (Some(FormatVersion::V3), cursor)
    );
    // And the conversion finishes from there.
    let fs = Fs::mount(s.clone()).unwrap();
    while !fs.convert_step(10).unwrap().finished {}
    fs.unmount().unwrap();
    assert!(run(&*s, false).is_clean());
}

#[test]
fn layouts_out_of_place_are_found() {
    let (s, cursor) = half_converted();
    let hello = file_ino(&s, b"hello") as u64;
    assert!(hello < cursor, "hello is inode {hello}, cursor {cursor}");
    // Below the cursor an inode must have the target's layout.
    edit_inode(&*s, hello as u32, |i| {
        i.layout = FormatVersion::V1;
        i.crtime = None;
    });
    let r = run(&*s, false);
    assert!(
        r.problems
            .iter()
            .any(|p| p.structure == "inode" && p.message.contains("has the v1 layout")),
        "{:#?}",
        r.problems
    );
    // From the cursor on, only the old version's or the target's.
    let (s, cursor) = half_converted();
    let g = superblock(&*s).geometry;
    let last = (cursor..=g.inode_count as u64)
        .rev()
        .find(|&i| {
            let (addr, off) = g.inode_location(Ino(i as u32));
            let b = read(&*s, addr.0);
            matches!(
                Inode::decode(Ino(i as u32), &b[off..off + INODE_SIZE], FormatVersion::V3),
                Ok(Some(n)) if !n.is_free()
            )
        })
        .expect("a live inode past the cursor");
    edit_inode(&*s, last as u32, |i| {
        i.layout = FormatVersion::V2;
        i.crtime = Some(i.ctime);
    });
    let r = run(&*s, false);
    assert!(
        r.problems
            .iter()
            .any(|p| p.message.contains("has the v2 layout during a conversion")),
        "{:#?}",
        r.problems
    );
    // Outside a conversion, every inode has the image's version.
    let s = populated_in(FormatVersion::V2);
    let hello = file_ino(&s, b"hello");
    edit_inode(&*s, hello, |i| {
        i.layout = FormatVersion::V1;
        i.crtime = None;
    });
    let r = run(&*s, false);
    assert!(
        r.problems
            .iter()
            .any(|p| p.message.contains("has the v1 layout in a format v2 image")),
        "{:#?}",
        r.problems
    );
}
