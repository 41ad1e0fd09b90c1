//! One flipped bit anywhere in an encoded structure makes its decoder return an error,
//! never a panic and never a value. Each case first checks that the unflipped bytes decode
//! to the value encoded, so the flip is the only thing wrong.

use proptest::collection::{btree_map, btree_set, vec};
use proptest::prelude::*;

use crate::block::{BlockAddr, Ino};
use crate::dir::{self, Bucket, DirEntry, DirHeader, MAX_OVERFLOW_BLOCKS, OVERFLOW_BASE};
use crate::extent::{Extent, ExtentCodec};
use crate::inode::{self, InlineArea, Inode, Timespec, INLINE_SIZE, INODE_SIZE};
use crate::journal::{self, JournalSuper, MAX_TX_BLOCKS};
use crate::superblock::{FsState, Geometry, Superblock, MAX_BLOCKS_V1, MIN_BLOCKS};
use crate::version::FormatVersion;
use crate::xattr::XattrSet;
use crate::{frame, FormatError};

fn arb_version() -> impl Strategy<Value = FormatVersion> {
    prop_oneof![
        Just(FormatVersion::V1),
        Just(FormatVersion::V2),
        Just(FormatVersion::V3)
    ]
}

/// Flips bit `bit % (8 × len)` of `bytes`.
fn flip(bytes: &mut [u8], bit: usize) {
    let i = bit % (bytes.len() * 8);
    bytes[i / 8] ^= 1 << (i % 8);
}

fn arb_superblock() -> impl Strategy<Value = Superblock> {
    (
        arb_version(),
        prop_oneof![Just(0u32), 1u32..=2],
        MIN_BLOCKS..=MAX_BLOCKS_V1,
        prop_oneof![
            Just(FsState::Clean),
            Just(FsState::Mounted),
            Just(FsState::Errors)
        ],
        (any::<u32>(), any::<u32>()),
        (any::<u64>(), any::<u32>(), any::<u32>()),
        any::<[u8; 16]>(),
        (any::<i64>(), any::<i64>(), any::<u64>()),
    )
        .prop_map(
            |(v, ahead, t, state, (compat, ro_compat), (fb, fi, mc), uuid, (cs, ls, cc))| {
                // A conversion `ahead` versions on, when the build knows that version.
                let target =
                    Some(FormatVersion(v.0 + ahead)).filter(|t| *t > v && t.is_supported());
                let geometry = Geometry::for_version(t, v).expect("size in range");
                Superblock {
                    format_version: v,
                    compat,
                    ro_compat,
                    incompat: Superblock::incompat_for(v, target),
                    state,
                    geometry,
                    free_blocks: fb,
                    free_inodes: fi,
                    mount_count: mc,
                    uuid,
                    created_sec: cs,
                    last_mount_sec: ls,
                    conversion_cursor: target
                        .map_or(0, |_| 1 + cc % (geometry.inode_count as u64 + 1)),
                    conversion_target: target,
                }
            },
        )
}

/// Up to `max` sorted, disjoint extents that fit the records of `codec`.
fn arb_extents(codec: ExtentCodec, max: usize) -> impl Strategy<Value = Vec<Extent>> {
    vec(
        (
            0u64..1000,
            1u32..=65535,
            0u64..codec.max_address() - 65535,
            any::<bool>(),
        ),
        0..=max,
    )
    .prop_map(|runs| {
        let mut next = 0u64;
        runs.into_iter()
            .map(|(gap, len, physical, unwritten)| {
                let e = Extent {
                    logical: next + gap,
                    physical,
                    len,
                    unwritten,
                };
                next = e.logical_end();
                e
            })
            .collect()
    })
}

fn arb_timespec() -> impl Strategy<Value = Timespec> {
    (any::<i64>(), 0..inode::NSEC_PER_SEC).prop_map(|(sec, nsec)| Timespec { sec, nsec })
}

/// An inode of any type and layout with an empty block map; `arb_inode` fills in the
/// inline area.
fn arb_inode_fields() -> impl Strategy<Value = Inode> {
    let types = prop_oneof![
        Just(inode::S_IFREG),
        Just(inode::S_IFDIR),
        Just(inode::S_IFLNK),
        Just(inode::S_IFCHR),
        Just(inode::S_IFBLK),
        Just(inode::S_IFIFO),
        Just(inode::S_IFSOCK),
    ];
    (
        (types, 0u32..=0o7777),
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
        (any::<u64>(), any::<u64>(), any::<u32>()),
        (
            arb_timespec(),
            arb_timespec(),
            arb_timespec(),
            arb_timespec(),
        ),
        (any::<u64>(), any::<u64>()),
        arb_version(),
    )
        .prop_map(
            |(
                (t, perm),
                (uid, gid, nlink, generation),
                (size, blocks, rdev),
                (a, m, c, cr),
                (x, eb),
                layout,
            )| {
                let max = ExtentCodec::for_version(layout).max_address();
                Inode {
                    layout,
                    mode: t | perm,
                    uid,
                    gid,
                    nlink,
                    generation,
                    size,
                    blocks,
                    atime: a,
                    mtime: m,
                    ctime: c,
                    extent_count: 0,
                    xattr_block: x % (max + 1),
                    extent_block: eb % (max + 1),
                    rdev,
                    inline: InlineArea::Extents(Vec::new()),
                    crtime: layout.has_crtime().then_some(cr),
                }
            },
        )
}

fn arb_inode() -> impl Strategy<Value = Inode> {
    let with_map = arb_inode_fields()
        .prop_flat_map(|i| {
            let codec = i.codec();
            (
                Just(i),
                arb_extents(codec, codec.inline_capacity()),
                0u32..10_000,
            )
        })
        .prop_map(|(mut i, e, more)| {
            // A full inline area continues in extent blocks: any larger count is consistent.
            let cap = i.codec().inline_capacity();
            i.extent_count = e.len() as u32 + if e.len() == cap { more } else { 0 };
            i.inline = InlineArea::Extents(e);
            i
        });
    let symlink =
        (arb_inode_fields(), vec(1u8..=255, 1..=INLINE_SIZE)).prop_map(|(mut i, target)| {
            i.mode = inode::S_IFLNK | 0o777;
            i.size = target.len() as u64;
            i.inline = InlineArea::Symlink(target);
            i
        });
    let freed = any::<u32>().prop_map(Inode::freed);
    prop_oneof![with_map, symlink, freed]
}

fn arb_name() -> impl Strategy<Value = Vec<u8>> {
    vec(
        any::<u8>().prop_filter("no NUL or /", |b| *b != 0 && *b != b'/'),
        1..=40,
    )
    .prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

fn arb_bucket() -> impl Strategy<Value = Bucket> {
    let dtype = prop_oneof![
        Just(dir::DT_FIFO),
        Just(dir::DT_CHR),
        Just(dir::DT_DIR),
        Just(dir::DT_BLK),
        Just(dir::DT_REG),
        Just(dir::DT_LNK),
        Just(dir::DT_SOCK),
    ];
    let entry = (1u32.., dtype, arb_name()).prop_map(|(ino, dtype, name)| DirEntry {
        ino: Ino(ino),
        dtype,
        name,
    });
    let next = prop_oneof![Just(0u64), OVERFLOW_BASE..=u32::MAX as u64];
    // 60 entries of at most 46 bytes stay within the bucket's 4072.
    (next, vec(entry, 0..60)).prop_map(|(next, entries)| Bucket { next, entries })
}

fn arb_dir_header() -> impl Strategy<Value = DirHeader> {
    (0u32..=29)
        .prop_flat_map(|level| (Just(level), 0..1u32 << level))
        .prop_flat_map(|(level, split)| {
            (
                1u32..,
                Just(level),
                Just(split),
                any::<u64>(),
                0..=MAX_OVERFLOW_BLOCKS as u32,
            )
        })
        .prop_map(
            |(parent, level, split, entry_count, overflow_next)| DirHeader {
                parent: Ino(parent),
                level,
                split,
                entry_count,
                overflow_next,
            },
        )
}

fn arb_xattrs() -> impl Strategy<Value = XattrSet> {
    let name = vec(1u8..=255, 1..=60);
    // 20 entries of at most 163 bytes stay within the block's 4076.
    btree_map(name, vec(any::<u8>(), 0..100), 0..20).prop_map(|m| XattrSet {
        entries: m.into_iter().collect(),
    })
}

proptest! {
    #[test]
    fn superblock(sb in arb_superblock(), bit: usize) {
        let mut b = sb.encode();
        prop_assert_eq!(Superblock::decode(&b[..]), Ok(sb));
        flip(&mut b[..], bit);
        prop_assert!(Superblock::decode(&b[..]).is_err());
    }

    #[test]
    fn inode(i in arb_inode(), slot in 1u32.., bit: usize) {
        let mut b = [0u8; INODE_SIZE];
        i.encode(Ino(slot), &mut b).unwrap();
        prop_assert_eq!(Inode::decode(Ino(slot), &b, FormatVersion::CURRENT), Ok(Some(i)));
        flip(&mut b, bit);
        prop_assert!(Inode::decode(Ino(slot), &b, FormatVersion::CURRENT).is_err());
    }

    #[test]
    fn extent_block(
        (c, e) in arb_version().prop_flat_map(|v| {
            let c = ExtentCodec::for_version(v);
            (Just(c), arb_extents(c, c.records_per_block()))
        }),
        next: u64, owner: u32, addr: u32, bit: usize,
    ) {
        let next = next % (c.max_address() + 1);
        let mut b = c.encode_block(Ino(owner), BlockAddr(addr as u64), next, &e).unwrap();
        prop_assert_eq!(c.decode_block(&b[..], Ino(owner), BlockAddr(addr as u64)), Ok((next, e)));
        flip(&mut b[..], bit);
        prop_assert!(c.decode_block(&b[..], Ino(owner), BlockAddr(addr as u64)).is_err());
    }

    #[test]
    fn dir_header(h in arb_dir_header(), owner: u32, addr: u32, bit: usize) {
        let (owner, addr) = (Ino(owner), BlockAddr(addr as u64));
        let mut b = h.encode(owner, addr);
        prop_assert_eq!(DirHeader::decode(&b[..], owner, addr), Ok(h));
        flip(&mut b[..], bit);
        prop_assert!(DirHeader::decode(&b[..], owner, addr).is_err());
    }

    #[test]
    fn bucket(bk in arb_bucket(), owner: u32, addr: u32, bit: usize) {
        let (owner, addr) = (Ino(owner), BlockAddr(addr as u64));
        let mut b = bk.encode(owner, addr).unwrap();
        prop_assert_eq!(Bucket::decode(&b[..], owner, addr), Ok(bk));
        flip(&mut b[..], bit);
        prop_assert!(Bucket::decode(&b[..], owner, addr).is_err());
    }

    #[test]
    fn xattr_block(s in arb_xattrs(), owner: u32, addr: u32, bit: usize) {
        let (owner, addr) = (Ino(owner), BlockAddr(addr as u64));
        let mut b = s.encode(owner, addr).unwrap();
        prop_assert_eq!(XattrSet::decode(&b[..], owner, addr), Ok(s));
        flip(&mut b[..], bit);
        prop_assert!(XattrSet::decode(&b[..], owner, addr).is_err());
    }

    #[test]
    fn journal_super(blocks: u32, sequence: u64, addr: u32, bit: usize) {
        let j = JournalSuper { blocks, sequence };
        let addr = BlockAddr(addr as u64);
        let mut b = j.encode(addr);
        prop_assert_eq!(JournalSuper::decode(&b[..], addr), Ok(j));
        flip(&mut b[..], bit);
        prop_assert!(JournalSuper::decode(&b[..], addr).is_err());
    }

    #[test]
    fn journal_descriptor(targets in btree_set(any::<u64>(), 1..=MAX_TX_BLOCKS), sequence: u64, addr: u32, bit: usize) {
        let targets: Vec<u64> = targets.into_iter().collect();
        let addr = BlockAddr(addr as u64);
        let mut b = journal::encode_descriptor(sequence, &targets, addr).unwrap();
        prop_assert_eq!(journal::decode_descriptor(&b[..], addr), Ok((sequence, targets)));
        flip(&mut b[..], bit);
        prop_assert!(journal::decode_descriptor(&b[..], addr).is_err());
    }

    #[test]
    fn journal_commit(sequence: u64, count in 1..=MAX_TX_BLOCKS as u32, data_crc: u32, addr: u32, bit: usize) {
        let addr = BlockAddr(addr as u64);
        let mut b = journal::encode_commit(sequence, count, data_crc, addr);
        prop_assert_eq!(journal::decode_commit(&b[..], addr), Ok((sequence, count, data_crc)));
        flip(&mut b[..], bit);
        prop_assert!(journal::decode_commit(&b[..], addr).is_err());
    }

    #[test]
    fn frame(magic: u32, version: u32, payload in vec(any::<u8>(), 0..256), bit: usize) {
        let mut b = frame::encode(magic, version, &payload);
        let ok = frame::decode("t", &b, magic, 1 << 20).map(|f| (f.version, f.payload.to_vec()));
        prop_assert_eq!(ok, Ok::<_, FormatError>((version, payload)));
        flip(&mut b, bit);
        prop_assert!(frame::decode("t", &b, magic, 1 << 20).is_err());
    }
}
