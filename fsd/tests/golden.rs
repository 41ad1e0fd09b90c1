//! The golden images of formats v1, v2 and v3 (`formats/golden/v<N>.img`, each made once
//! by `cargo run -p fsd --example make_golden -- formats/golden/v<N>.img <N>` and
//! committed).
//!
//! They pin each version down from the outside: every metadata structure of an image must
//! decode with today's `formats` code and encode back to the very same bytes, the
//! filesystem must read the tree it was made with, and no single damaged metadata byte
//! may get past fsck. The expected tree is spelled out here, not shared with the
//! generator, so that the generator can move on to later versions while these images stay
//! frozen. The v1 image converted to v3 must pass the v3 checks as well.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use formats::bitmap;
use formats::block::{self, BlockAddr, BlockKind, Ino, BLOCK_SIZE, TAIL_KIND, TAIL_OWNER};
use formats::dir::{Bucket, DirHeader};
use formats::extent::ExtentCodec;
use formats::inode::{
    InlineArea, Inode, INODE_SIZE, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK,
};
use formats::journal::JournalSuper;
use formats::superblock::{
    FsState, Geometry, Superblock, MIN_BLOCKS, OFF_MAGIC, ORPHAN_INO, ROOT_INO,
};
use formats::version::FormatVersion;
use formats::xattr::XattrSet;
use fsd_core::fs::{Attr, Fs};
use fsd_core::fsck::{self, FsckError, FsckOptions, MetaRange, EXIT_ERRORS_LEFT, EXIT_OPERATIONAL};
use fsd_core::store::{BlockStore, MemStore};

static GOLDEN_V1: &[u8] = include_bytes!("../../formats/golden/v1.img");
static GOLDEN_V2: &[u8] = include_bytes!("../../formats/golden/v2.img");
static GOLDEN_V3: &[u8] = include_bytes!("../../formats/golden/v3.img");

const BS: u64 = BLOCK_SIZE as u64;

/// The image as a read-only block store; the flip test changes bytes between checks.
struct ImageStore {
    bytes: Vec<u8>,
}

impl BlockStore for ImageStore {
    fn num_blocks(&self) -> u64 {
        (self.bytes.len() / BLOCK_SIZE) as u64
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let from = (addr as usize).checked_mul(BLOCK_SIZE);
        let range = from.and_then(|f| Some(f..f.checked_add(buf.len())?));
        match range.and_then(|r| self.bytes.get(r)) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("read of {} bytes at block {addr}", buf.len()),
            )),
        }
    }
    fn write(&self, addr: u64, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::other(format!(
            "read-only image: write to block {addr}"
        )))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, addr: u64, _nblocks: u64) -> io::Result<()> {
        Err(io::Error::other(format!(
            "read-only image: discard at block {addr}"
        )))
    }
}

fn golden(image: &[u8]) -> ImageStore {
    ImageStore {
        bytes: image.to_vec(),
    }
}

fn block_of(image: &[u8], addr: u64) -> &[u8] {
    &image[addr as usize * BLOCK_SIZE..(addr as usize + 1) * BLOCK_SIZE]
}

/// The content the generator wrote: byte `i` of stream `seed`.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed as u32 * 97) as u8 ^ (i >> 9) as u8)
        .collect()
}

/// The 180-byte names of the hard links in `/many`.
fn many_name(i: usize) -> Vec<u8> {
    let mut n = format!("link-{i:03}-").into_bytes();
    while n.len() < 180 {
        n.push(b'a' + (n.len() % 26) as u8);
    }
    n
}

const LONG_LINK_LEN: usize = 11 + 190 + 9;

fn long_link_target() -> Vec<u8> {
    format!("notes/deep/{}/leaf.txt", "d".repeat(190)).into_bytes()
}

// ---- byte for byte -----------------------------------------------------------------

/// What the walk of the inodes says a tailed block must be: (kind, owner).
type Expected = BTreeMap<u64, (BlockKind, u32)>;

/// Decodes the inode at `range`, checks it encodes back to the same bytes, and records the
/// metadata blocks it owns.
fn inode_round_trip(
    image: &[u8],
    geo: &Geometry,
    version: FormatVersion,
    range: &MetaRange,
    expected: &mut Expected,
) -> Inode {
    let ino = Ino(
        ((range.block - geo.inode_table_start) * (BLOCK_SIZE / INODE_SIZE) as u64
            + (range.bytes.start / INODE_SIZE) as u64) as u32,
    );
    assert_eq!(range.bytes.len(), INODE_SIZE, "inode {} range", ino.0);
    let raw = &block_of(image, range.block)[range.bytes.clone()];
    let i = Inode::decode(ino, raw, version)
        .unwrap_or_else(|e| panic!("inode {}: {e}", ino.0))
        .unwrap_or_else(|| panic!("inode {} is an empty slot", ino.0));
    // Every inode has the image's layout, with a creation time from v2 on.
    assert_eq!(i.layout, version, "inode {} layout", ino.0);
    assert_eq!(i.crtime.is_some(), version.has_crtime(), "inode {}", ino.0);
    let mut out = [0u8; INODE_SIZE];
    i.encode(ino, &mut out).unwrap();
    assert_eq!(&out[..], raw, "inode {} re-encodes differently", ino.0);
    let codec = i.codec();

    let mut claim = |addr: u64, kind: BlockKind| {
        let old = expected.insert(addr, (kind, ino.0));
        assert!(
            old.is_none(),
            "block {addr} reached twice: {old:?} and inode {}",
            ino.0
        );
    };
    let mut extents = i.inline_extents().to_vec();
    let mut next = i.extent_block;
    while next != 0 {
        claim(next, BlockKind::ExtentBlock);
        let (n, list) = codec
            .decode_block(block_of(image, next), ino, BlockAddr(next))
            .unwrap_or_else(|e| panic!("extent block {next} of inode {}: {e}", ino.0));
        extents.extend(list);
        next = n;
    }
    assert_eq!(extents.len(), i.extent_count as usize, "inode {}", ino.0);
    if i.xattr_block != 0 {
        claim(i.xattr_block, BlockKind::XattrBlock);
    }
    if i.is_dir() {
        for e in &extents {
            assert!(
                !e.unwritten,
                "directory inode {} has an unwritten extent",
                ino.0
            );
            for k in 0..e.len as u64 {
                let kind = if e.logical + k == 0 {
                    BlockKind::DirHeader
                } else {
                    BlockKind::DirBucket
                };
                claim(e.physical + k, kind);
            }
        }
    }
    i
}

/// Decodes the tailed block at `addr` as `kind` and checks it encodes back to the same
/// bytes.
fn block_round_trip(b: &[u8], addr: u64, kind: BlockKind, owner: u32, codec: ExtentCodec) {
    let a = BlockAddr(addr);
    let o = Ino(owner);
    let what = format!("{} at block {addr}", kind.name());
    let again: Box<block::Block> = match kind {
        BlockKind::Superblock => Superblock::decode(b).unwrap().encode(),
        BlockKind::JournalSuper => JournalSuper::decode(b, a).unwrap().encode(a),
        BlockKind::InodeBitmap | BlockKind::BlockBitmap => {
            bitmap::encode(kind, bitmap::decode(kind, b, a).unwrap(), a)
        }
        BlockKind::DirHeader => DirHeader::decode(b, o, a).unwrap().encode(o, a),
        BlockKind::DirBucket => Bucket::decode(b, o, a).unwrap().encode(o, a).unwrap(),
        BlockKind::ExtentBlock => {
            let (next, list) = codec.decode_block(b, o, a).unwrap();
            codec.encode_block(o, a, next, &list).unwrap()
        }
        BlockKind::XattrBlock => XattrSet::decode(b, o, a).unwrap().encode(o, a).unwrap(),
        BlockKind::JournalDesc | BlockKind::JournalCommit => {
            panic!("{what}: a clean image has no journal transaction in use")
        }
    };
    assert_eq!(&again[..], b, "{what} re-encodes differently");
}

fn kind_named(name: &str) -> BlockKind {
    use BlockKind::*;
    [
        Superblock,
        JournalSuper,
        JournalDesc,
        JournalCommit,
        InodeBitmap,
        BlockBitmap,
        ExtentBlock,
        DirHeader,
        DirBucket,
        XattrBlock,
    ]
    .into_iter()
    .find(|k| k.name() == name)
    .unwrap_or_else(|| panic!("no block kind is named {name:?}"))
}

/// Every metadata structure decodes with today's code and encodes back to the image's bytes.
fn check_round_trips(image: &[u8], map: &[MetaRange], version: FormatVersion) {
    let sb = Superblock::decode(block_of(image, 0)).unwrap();
    assert_eq!(sb.format_version, version);
    assert_eq!(sb.state, FsState::Clean);
    assert_eq!(sb.geometry, Geometry::for_blocks(MIN_BLOCKS).unwrap());
    assert_eq!(
        (sb.compat, sb.ro_compat, sb.incompat),
        (0, 0, version.incompat_features())
    );
    assert_eq!((sb.conversion_cursor, sb.conversion_target), (0, None));
    assert!(sb.mount_count >= 1 && sb.last_mount_sec >= sb.created_sec);
    let geo = sb.geometry;
    // Every inode has the image's layout (checked per inode), so every extent block too.
    let codec = ExtentCodec::for_version(version);

    let mut per_structure: BTreeMap<&str, usize> = BTreeMap::new();
    for r in map {
        *per_structure.entry(r.structure).or_default() += r.bytes.len();
    }
    for s in [
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
            per_structure.contains_key(s),
            "the golden image holds no {s}"
        );
    }

    // Inodes first: they say what every other block of the data area is.
    let mut expected: Expected = BTreeMap::new();
    expected.insert(0, (BlockKind::Superblock, 0));
    expected.insert(geo.journal_start, (BlockKind::JournalSuper, 0));
    for i in 0..geo.inode_bitmap_blocks as u64 {
        expected.insert(geo.inode_bitmap_start + i, (BlockKind::InodeBitmap, 0));
    }
    for i in 0..geo.block_bitmap_blocks as u64 {
        expected.insert(geo.block_bitmap_start + i, (BlockKind::BlockBitmap, 0));
    }
    let mut inodes = BTreeSet::new();
    for r in map.iter().filter(|r| r.structure == "inode") {
        assert!(
            r.block >= geo.inode_table_start && r.block < geo.data_start,
            "inode range in block {}",
            r.block
        );
        let i = inode_round_trip(image, &geo, version, r, &mut expected);
        assert!(!i.is_free());
        inodes.insert(
            ((r.block - geo.inode_table_start) * 16 + (r.bytes.start / INODE_SIZE) as u64) as u32,
        );
    }
    // The inodes fsck reached are exactly those the inode bitmap marks in use.
    let ibits = bitmap::decode(
        BlockKind::InodeBitmap,
        block_of(image, geo.inode_bitmap_start),
        BlockAddr(geo.inode_bitmap_start),
    )
    .unwrap();
    let in_use: BTreeSet<u32> = (1..=geo.inode_count)
        .filter(|&i| bitmap::get_bit(ibits, i as usize))
        .collect();
    assert_eq!(inodes, in_use);

    // Every tailed block fsck maps is what the inodes say, whole, and round-trips.
    let mut tailed = BTreeSet::new();
    for r in map.iter().filter(|r| r.structure != "inode") {
        assert_eq!(
            r.bytes,
            0..BLOCK_SIZE,
            "{} at block {}",
            r.structure,
            r.block
        );
        let kind = kind_named(r.structure);
        let (want, owner) = expected
            .get(&r.block)
            .unwrap_or_else(|| panic!("{} at block {} is owned by no inode", r.structure, r.block));
        assert_eq!(*want, kind, "block {}", r.block);
        let b = block_of(image, r.block);
        assert_eq!(
            block::owner_of(b).0,
            *owner,
            "owner in the tail of block {}",
            r.block
        );
        assert_eq!(
            u32::from_le_bytes(b[TAIL_KIND..TAIL_OWNER].try_into().unwrap()),
            kind as u32
        );
        block_round_trip(b, r.block, kind, *owner, codec);
        tailed.insert(r.block);
    }
    // And fsck maps every block the inodes reach (a directory's block map covers only its
    // header, buckets and overflow blocks).
    let reached: BTreeSet<u64> = expected.keys().copied().collect();
    assert_eq!(tailed, reached);
}

// ---- the tree --------------------------------------------------------------------------

fn at(fs: &Fs, path: &str) -> Attr {
    let mut attr = fs.getattr(ROOT_INO).unwrap();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        attr = fs
            .lookup(attr.ino, part.as_bytes())
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    attr
}

fn names(fs: &Fs, path: &str) -> BTreeSet<Vec<u8>> {
    fs.readdir(at(fs, path).ino)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<Vec<u8>> {
    items.iter().map(|s| s.as_bytes().to_vec()).collect()
}

fn read_all(fs: &Fs, path: &str) -> Vec<u8> {
    let a = at(fs, path);
    let data = fs.read(a.ino, 0, a.size as u32 + 4096).unwrap();
    assert_eq!(data.len() as u64, a.size, "{path}");
    data
}

/// Checks `path` has type and permissions `mode`, `nlink` links and owner `uid`.
fn meta(fs: &Fs, path: &str, mode: u32, nlink: u32, uid: u32) -> Attr {
    let a = at(fs, path);
    assert_eq!(a.mode, mode, "{path}: mode {:o}", a.mode);
    assert_eq!(a.nlink, nlink, "{path}: nlink");
    assert_eq!((a.uid, a.gid), (uid, uid), "{path}: owner");
    a
}

fn raw_inode(image: &[u8], ino: Ino) -> Inode {
    let sb = Superblock::decode(block_of(image, 0)).unwrap();
    let (addr, off) = sb.geometry.inode_location(ino);
    Inode::decode(
        ino,
        &block_of(image, addr.0)[off..off + INODE_SIZE],
        sb.newest_layout(),
    )
    .unwrap()
    .unwrap()
}

/// Checks the tree `fs` serves and the on-disk shapes of `image`, of format `version`.
fn check_tree(fs: &Fs, image: &[u8], version: FormatVersion) {
    assert_eq!(names(fs, "/"), set(&["docs", "data", "many", "frag-link"]));
    assert_eq!(
        names(fs, "/docs"),
        set(&["notes", "readme-link", "short-link", "long-link"])
    );
    assert_eq!(names(fs, "/docs/notes"), set(&["deep", "readme.txt"]));
    assert_eq!(names(fs, "/docs/notes/deep"), set(&["leaf.txt"]));
    assert_eq!(
        names(fs, "/data"),
        set(&[
            "fragmented.bin",
            "sparse.bin",
            "prealloc.bin",
            "fifo",
            "chardev",
            "socket"
        ])
    );
    let mut many = set(&["target"]);
    many.extend((0..8).map(|i| format!("file-{i}").into_bytes()));
    many.extend((0..111).map(many_name));
    assert_eq!(names(fs, "/many"), many);

    // Directories: 2 + subdirectories; `..` from the header.
    let root = meta(fs, "/", S_IFDIR | 0o755, 5, 0);
    let docs = meta(fs, "/docs", S_IFDIR | 0o755, 3, 1000);
    let notes = meta(fs, "/docs/notes", S_IFDIR | 0o755, 3, 1000);
    let deep = meta(fs, "/docs/notes/deep", S_IFDIR | 0o755, 2, 1000);
    meta(fs, "/data", S_IFDIR | 0o755, 2, 1000);
    let many_dir = meta(fs, "/many", S_IFDIR | 0o755, 2, 1000);
    assert_eq!(fs.parent_of(deep.ino).unwrap(), notes.ino);
    assert_eq!(fs.parent_of(notes.ino).unwrap(), docs.ino);
    assert_eq!(fs.parent_of(docs.ino).unwrap(), root.ino);
    assert_eq!(fs.parent_of(root.ino).unwrap(), root.ino);

    // Regular files, their contents and hard links.
    meta(fs, "/docs/notes/deep/leaf.txt", S_IFREG | 0o644, 1, 1000);
    assert_eq!(read_all(fs, "/docs/notes/deep/leaf.txt"), b"leaf\n");
    let readme = meta(fs, "/docs/notes/readme.txt", S_IFREG | 0o640, 2, 1000);
    assert_eq!(at(fs, "/docs/readme-link").ino, readme.ino);
    assert_eq!(read_all(fs, "/docs/notes/readme.txt"), pattern(1, 5000));
    let frag = meta(fs, "/data/fragmented.bin", S_IFREG | 0o644, 2, 1000);
    assert_eq!(at(fs, "/frag-link").ino, frag.ino);
    assert_eq!(
        read_all(fs, "/data/fragmented.bin"),
        pattern(2, 16 * BLOCK_SIZE)
    );
    let sparse = meta(fs, "/data/sparse.bin", S_IFREG | 0o644, 1, 1000);
    let mut want = vec![0u8; 40 * BLOCK_SIZE + 100 + 3000];
    want[..4].copy_from_slice(b"head");
    want[40 * BLOCK_SIZE + 100..].copy_from_slice(&pattern(3, 3000));
    assert_eq!(read_all(fs, "/data/sparse.bin"), want);
    let pre = meta(fs, "/data/prealloc.bin", S_IFREG | 0o600, 1, 1000);
    let mut want = pattern(4, BLOCK_SIZE);
    want.resize(4 * BLOCK_SIZE, 0);
    assert_eq!(read_all(fs, "/data/prealloc.bin"), want);
    let target = meta(fs, "/many/target", S_IFREG | 0o644, 112, 1000);
    assert_eq!(read_all(fs, "/many/target"), b"target\n");
    for i in 0..111 {
        let a = fs.lookup(many_dir.ino, &many_name(i)).unwrap();
        assert_eq!(
            a.ino,
            target.ino,
            "/many/{}",
            String::from_utf8_lossy(&many_name(i))
        );
    }
    for i in 0..8 {
        let p = format!("/many/file-{i}");
        meta(fs, &p, S_IFREG | 0o644, 1, 1000);
        assert_eq!(read_all(fs, &p), format!("file {i}\n").as_bytes());
    }

    // Symlinks and special files.
    let short = meta(fs, "/docs/short-link", S_IFLNK | 0o777, 1, 1000);
    assert_eq!(fs.readlink(short.ino).unwrap(), b"notes/readme.txt");
    let long = meta(fs, "/docs/long-link", S_IFLNK | 0o777, 1, 1000);
    assert_eq!(fs.readlink(long.ino).unwrap(), long_link_target());
    assert_eq!(long.size, LONG_LINK_LEN as u64);
    meta(fs, "/data/fifo", S_IFIFO | 0o644, 1, 1000);
    let chr = meta(fs, "/data/chardev", S_IFCHR | 0o600, 1, 0);
    assert_eq!(chr.rdev, (1 << 8) | 3);
    meta(fs, "/data/socket", S_IFSOCK | 0o755, 1, 1000);

    // Extended attributes.
    assert_eq!(
        fs.listxattr(readme.ino).unwrap(),
        vec![b"user.empty".to_vec(), b"user.origin".to_vec()]
    );
    assert_eq!(
        fs.getxattr(readme.ino, b"user.origin").unwrap(),
        b"golden-image"
    );
    assert_eq!(fs.getxattr(readme.ino, b"user.empty").unwrap(), b"");
    assert_eq!(
        fs.listxattr(docs.ino).unwrap(),
        vec![b"trusted.golden".to_vec(), b"user.project".to_vec()]
    );
    assert_eq!(fs.getxattr(docs.ino, b"user.project").unwrap(), b"molt");
    assert_eq!(
        fs.getxattr(docs.ino, b"trusted.golden").unwrap(),
        [0, 1, 2, 0xff]
    );

    // Creation times: none in v1; from v2 on, every inode has one, no later than its
    // change time and no earlier than the image.
    let created = Superblock::decode(block_of(image, 0)).unwrap().created_sec;
    for path in [
        "/",
        "/docs",
        "/docs/notes/readme.txt",
        "/data/fragmented.bin",
        "/docs/short-link",
        "/data/fifo",
    ] {
        let a = at(fs, path);
        match a.crtime {
            None => assert!(!version.has_crtime(), "{path}: no creation time"),
            Some(t) => {
                assert!(version.has_crtime(), "{path}: a v1 inode with a crtime");
                assert!(
                    t.sec >= created && (t.sec, t.nsec) <= (a.ctime.sec, a.ctime.nsec),
                    "{path}: crtime {t:?}, {a:?}"
                );
            }
        }
    }

    // The on-disk shapes the image was made to hold.
    let inline = ExtentCodec::for_version(version).inline_capacity();
    let i = raw_inode(image, readme.ino);
    assert!(i.xattr_block != 0 && i.extent_block == 0);
    assert_eq!((i.extent_count, i.blocks), (1, 3));
    let i = raw_inode(image, frag.ino);
    assert!(
        i.extent_count as usize > inline && i.extent_block != 0,
        "{i:?}"
    );
    assert_eq!(i.inline_extents().len(), inline);
    assert_eq!(i.blocks, 16 + 1);
    let i = raw_inode(image, sparse.ino);
    assert_eq!((i.extent_count, i.blocks), (2, 2));
    let i = raw_inode(image, pre.ino);
    let ex = i.inline_extents();
    assert_eq!((ex.len(), i.blocks), (2, 4));
    assert!(
        !ex[0].unwritten && ex[1].unwritten && ex[1].len == 3,
        "{ex:?}"
    );
    let i = raw_inode(image, short.ino);
    assert_eq!(i.inline, InlineArea::Symlink(b"notes/readme.txt".to_vec()));
    let i = raw_inode(image, long.ino);
    assert_eq!((i.extent_count, i.blocks), (1, 1));
    assert!(matches!(i.inline, InlineArea::Extents(_)));
    let i = raw_inode(image, docs.ino);
    assert!(i.xattr_block != 0);
    let i = raw_inode(image, many_dir.ino);
    let haddr = i.inline_extents()[0].physical;
    let h = DirHeader::decode(block_of(image, haddr), many_dir.ino, BlockAddr(haddr)).unwrap();
    assert_eq!((h.level, h.split, h.entry_count), (1, 1, 120));
    assert!(h.overflow_next > 0, "{h:?}");
    let i = raw_inode(image, ORPHAN_INO);
    assert_eq!((i.mode & S_IFMT, i.nlink, i.size), (S_IFDIR, 2, 2 * BS));
}

fn reads_byte_for_byte(image: &[u8], version: FormatVersion) {
    let name = format!("v{}.img", version.0);
    assert_eq!(image.len() as u64, MIN_BLOCKS * BS);
    let store = golden(image);
    let report = fsck::check(&store, &FsckOptions::default()).unwrap();
    assert!(report.is_clean(), "{}", report.render(&name));
    let map = fsck::metadata_map(&store).unwrap();
    check_round_trips(image, &map, version);

    let mem = Arc::new(MemStore::from_image(image.to_vec()));
    let fs = Fs::mount(mem.clone()).unwrap();
    check_tree(&fs, image, version);
    fs.unmount().unwrap();
    let after = fsck::check(mem.as_ref(), &FsckOptions::default()).unwrap();
    assert!(
        after.is_clean(),
        "{}",
        after.render(&format!("{name}, mounted and unmounted"))
    );
}

#[test]
fn golden_v1_reads_byte_for_byte() {
    reads_byte_for_byte(GOLDEN_V1, FormatVersion::V1);
}

#[test]
fn golden_v2_reads_byte_for_byte() {
    reads_byte_for_byte(GOLDEN_V2, FormatVersion::V2);
}

#[test]
fn golden_v3_reads_byte_for_byte() {
    reads_byte_for_byte(GOLDEN_V3, FormatVersion::V3);
}

/// The v1 and v2 images converted (v1 to v2 to v3, and v1 straight to v3) hold the same
/// tree and are, structure by structure, canonical images of the newer version.
#[test]
fn golden_images_convert_to_newer_versions() {
    for (image, steps) in [
        (GOLDEN_V1, &[FormatVersion::V2, FormatVersion::V3][..]),
        (GOLDEN_V1, &[FormatVersion::V3][..]),
        (GOLDEN_V2, &[FormatVersion::V3][..]),
    ] {
        let mem = Arc::new(MemStore::from_image(image.to_vec()));
        for &to in steps {
            let fs = Fs::mount(mem.clone()).unwrap();
            fs.start_conversion(to).unwrap();
            // Small batches: the conversion takes several steps and transactions.
            while !fs.convert_step(4).unwrap().finished {}
            assert_eq!((fs.format_version(), fs.conversion_target()), (to, None));
            fs.unmount().unwrap();
            let converted = mem.image();
            let name = format!("converted to v{}", to.0);
            let store = golden(&converted);
            let report = fsck::check(&store, &FsckOptions::default()).unwrap();
            assert!(report.is_clean(), "{}", report.render(&name));
            check_round_trips(&converted, &fsck::metadata_map(&store).unwrap(), to);
            let fs = Fs::mount(Arc::new(MemStore::from_image(converted.clone()))).unwrap();
            check_tree(&fs, &converted, to);
        }
    }
}

// ---- every byte flipped ----------------------------------------------------------------

/// Flips every metadata byte of `ranges` in turn, with each mask, in `store` (restored
/// afterwards); returns what fsck failed to say.
fn flip_all(
    store: &mut ImageStore,
    ranges: &[(u64, usize, &'static str)],
    masks: &[u8],
) -> Vec<String> {
    let mut misses = Vec::new();
    for &(blk, byte, structure) in ranges {
        let at = blk as usize * BLOCK_SIZE + byte;
        for &mask in masks {
            store.bytes[at] ^= mask;
            let s: &ImageStore = store;
            let result =
                panic::catch_unwind(AssertUnwindSafe(|| fsck::check(s, &FsckOptions::default())));
            store.bytes[at] ^= mask;
            let magic = blk == 0 && (OFF_MAGIC..OFF_MAGIC + 8).contains(&byte);
            // A stale checksum over whole fields is what a reset torn by a power cut
            // leaves (format.md, "A torn journal superblock"): its checksum and, within
            // what the log allows, its sequence may be read that way, and are noted.
            let torn_reset = structure == "journal superblock"
                && (byte >= block::TAIL_CRC || (8..16).contains(&byte));
            let why = match result {
                Err(_) => Some("fsck panicked".to_string()),
                Ok(Ok(r))
                    if torn_reset
                        && r.exit_code() == 0
                        && r.notes
                            .iter()
                            .any(|n| n.contains("journal superblock was torn")) =>
                {
                    None
                }
                Ok(Err(FsckError::NotMolt(_))) if magic => None,
                Ok(Err(e)) => Some(format!(
                    "exit {EXIT_OPERATIONAL} ({e}), expected {EXIT_ERRORS_LEFT}"
                )),
                Ok(Ok(r)) if magic => Some(format!(
                    "exit {}, expected {EXIT_OPERATIONAL} (not a Molt image)",
                    r.exit_code()
                )),
                Ok(Ok(r)) if r.exit_code() != EXIT_ERRORS_LEFT => {
                    Some(format!("exit {}", r.exit_code()))
                }
                Ok(Ok(r)) if !r.problems.iter().any(|p| p.structure == structure) => {
                    let seen: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
                    Some(format!("no problem names it; found {seen:?}"))
                }
                Ok(Ok(_)) => None,
            };
            if let Some(why) = why {
                misses.push(format!(
                    "{structure} at block {blk} byte {byte} ^ {mask:#04x}: {why}"
                ));
            }
        }
    }
    misses
}

/// Each metadata byte is damaged once per mask: every bit at once, and the lowest bit.
const MASKS: [u8; 1] = [0xff];

#[test]
fn every_metadata_byte_flip_is_detected_v1() {
    flip_walk(GOLDEN_V1);
}

#[test]
fn every_metadata_byte_flip_is_detected_v2() {
    flip_walk(GOLDEN_V2);
}

#[test]
fn every_metadata_byte_flip_is_detected_v3() {
    flip_walk(GOLDEN_V3);
}

fn flip_walk(image: &'static [u8]) {
    let started = Instant::now();
    let map = fsck::metadata_map(&golden(image)).unwrap();
    let bytes: Vec<(u64, usize, &'static str)> = map
        .iter()
        .flat_map(|r| r.bytes.clone().map(move |b| (r.block, b, r.structure)))
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = bytes.len().div_ceil(threads);

    // A panic inside fsck is caught per flip and reported with the byte that caused it.
    let misses: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = bytes
            .chunks(chunk)
            .map(|part| s.spawn(move || flip_all(&mut golden(image), part, &MASKS)))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("flip worker"))
            .collect()
    });

    let mut per_structure: BTreeMap<&str, usize> = BTreeMap::new();
    for &(_, _, s) in &bytes {
        *per_structure.entry(s).or_default() += 1;
    }
    println!(
        "walked {} metadata bytes {:?}, xor each of {MASKS:02x?}: {} fsck runs in {:.1} s on {threads} threads",
        bytes.len(),
        per_structure,
        bytes.len() * MASKS.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        misses.is_empty(),
        "{} flips not detected as expected; the first ones:\n{}",
        misses.len(),
        misses
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
