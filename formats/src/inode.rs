//! Inodes: 256 bytes each, 16 to an inode-table block; inode `n` is slot `n` (slot 0 unused).
//!
//! ```text
//! off size field
//!   0   4 mode         POSIX file type and permission bits; 0 = free
//!   4   4 uid
//!   8   4 gid
//!  12   4 nlink
//!  16   4 flags        bit 0 INLINE, bit 1 CRTIME, bit 2 MAP48 (the layout, below)
//!  20   4 generation
//!  24   8 size         bytes
//!  32   8 blocks       4 KiB blocks owned (data, extent, xattr blocks)
//!  40   8 atime_sec    i64
//!  48   4 atime_nsec
//!  52   4 mtime_nsec
//!  56   8 mtime_sec    i64
//!  64   8 ctime_sec    i64
//!  72   4 ctime_nsec
//!  76   4 extent_count extents in the whole block map (inline + extent blocks)
//!  80   4 xattr_block  0 = none (low 32 bits of the address)
//!  84   4 extent_block first overflow extent block, 0 = none (low 32 bits)
//!  88   4 rdev         device number of character and block special files
//!  92   4 reserved0    zero; MAP48: xattr_block_hi u16, extent_block_hi u16
//!  96 144 inline area  block-map records of the layout's codec, or a symlink target
//! 240  12 reserved1    zero; CRTIME: crtime_sec i64, crtime_nsec u32
//! 252   4 crc          CRC-32 of (ino as u32 LE) ++ bytes 0..252
//! ```
//!
//! The *layout* of a live inode is the format version its fields follow, recorded in its
//! own flags so that inodes of two layouts coexist while an image is converted: no flag
//! is v1, `CRTIME` is v2, `CRTIME | MAP48` is v3. A free slot has no flags.

use crate::block::{Ino, BLOCK_SIZE};
use crate::bytes::*;
use crate::error::{FormatError, Result};
use crate::extent::{Extent, ExtentCodec};
use crate::version::FormatVersion;

pub const INODE_SIZE: usize = 256;

pub const OFF_MODE: usize = 0;
pub const OFF_UID: usize = OFF_MODE + 4;
pub const OFF_GID: usize = OFF_UID + 4;
pub const OFF_NLINK: usize = OFF_GID + 4;
pub const OFF_FLAGS: usize = OFF_NLINK + 4;
pub const OFF_GENERATION: usize = OFF_FLAGS + 4;
pub const OFF_SIZE: usize = OFF_GENERATION + 4;
pub const OFF_BLOCKS: usize = OFF_SIZE + 8;
pub const OFF_ATIME_SEC: usize = OFF_BLOCKS + 8;
pub const OFF_ATIME_NSEC: usize = OFF_ATIME_SEC + 8;
pub const OFF_MTIME_NSEC: usize = OFF_ATIME_NSEC + 4;
pub const OFF_MTIME_SEC: usize = OFF_MTIME_NSEC + 4;
pub const OFF_CTIME_SEC: usize = OFF_MTIME_SEC + 8;
pub const OFF_CTIME_NSEC: usize = OFF_CTIME_SEC + 8;
pub const OFF_EXTENT_COUNT: usize = OFF_CTIME_NSEC + 4;
pub const OFF_XATTR_BLOCK: usize = OFF_EXTENT_COUNT + 4;
pub const OFF_EXTENT_BLOCK: usize = OFF_XATTR_BLOCK + 4;
pub const OFF_RDEV: usize = OFF_EXTENT_BLOCK + 4;
pub const OFF_RESERVED0: usize = OFF_RDEV + 4;
/// MAP48 layout: bits 32..48 of `xattr_block` and `extent_block` in `reserved0`.
pub const OFF_XATTR_BLOCK_HI: usize = OFF_RESERVED0;
pub const OFF_EXTENT_BLOCK_HI: usize = OFF_XATTR_BLOCK_HI + 2;
pub const OFF_INLINE: usize = OFF_RESERVED0 + 4;
/// Bytes of the inline area (extent records or a symlink target); the extent codec sizes
/// its inline records by it.
pub use crate::extent::INLINE_SIZE;
pub const OFF_RESERVED1: usize = OFF_INLINE + INLINE_SIZE;
/// CRTIME layout: the creation time in `reserved1`.
pub const OFF_CRTIME_SEC: usize = OFF_RESERVED1;
pub const OFF_CRTIME_NSEC: usize = OFF_CRTIME_SEC + 8;
pub const OFF_CRC: usize = OFF_RESERVED1 + 12;

pub const INODE_FLAG_INLINE: u32 = 1;
/// The inode carries a creation time (layouts v2 and v3).
pub const INODE_FLAG_CRTIME: u32 = 1 << 1;
/// The inode's block map uses 48-bit addresses (layout v3).
pub const INODE_FLAG_MAP48: u32 = 1 << 2;
/// Every flag bit a reader knows.
pub(crate) const INODE_FLAGS_KNOWN: u32 = INODE_FLAG_INLINE | INODE_FLAG_CRTIME | INODE_FLAG_MAP48;

/// The layout flags of a live inode of layout `v`.
pub(crate) fn layout_flags(v: FormatVersion) -> u32 {
    let mut f = 0;
    if v.has_crtime() {
        f |= INODE_FLAG_CRTIME;
    }
    if v.block_map_address_bits() > 32 {
        f |= INODE_FLAG_MAP48;
    }
    f
}

/// The layout named by an inode's flags, `None` for a combination no version uses.
pub(crate) fn layout_of_flags(flags: u32) -> Option<FormatVersion> {
    let layout = flags & (INODE_FLAG_CRTIME | INODE_FLAG_MAP48);
    FormatVersion::ALL
        .into_iter()
        .find(|v| layout_flags(*v) == layout)
}
/// Extent records the inline area holds in format v1 (12-byte records). Code that may
/// meet other versions asks `ExtentCodec::inline_capacity` instead.
pub const INLINE_EXTENTS: usize = INLINE_SIZE / 12;
/// Nanoseconds in a second: a stored `nsec` is below this.
pub const NSEC_PER_SEC: u32 = 1_000_000_000;
/// Bits of `mode` that may be set: the file type and the permission bits.
pub const MODE_MASK: u32 = S_IFMT | 0o7777;

pub const S_IFMT: u32 = 0o170000;
pub const S_IFSOCK: u32 = 0o140000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFBLK: u32 = 0o060000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFIFO: u32 = 0o010000;

/// Whether `mode` is a storable mode of a live inode: one of the seven POSIX file types,
/// and no bit outside the type and permission bits. (Mode 0 marks a freed slot.)
pub(crate) fn is_valid_mode(mode: u32) -> bool {
    mode & !MODE_MASK == 0
        && matches!(
            mode & S_IFMT,
            S_IFSOCK | S_IFLNK | S_IFREG | S_IFBLK | S_IFDIR | S_IFCHR | S_IFIFO
        )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

/// What the inline area of an inode holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InlineArea {
    /// The first extents of the block map (sorted, at most `INLINE_EXTENTS`).
    Extents(Vec<Extent>),
    /// A symlink target of at most `INLINE_SIZE` bytes.
    Symlink(Vec<u8>),
}

/// A decoded inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// The format version whose layout the inode is written in (`V1` for a free slot).
    pub layout: FormatVersion,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub generation: u32,
    pub size: u64,
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub extent_count: u32,
    pub xattr_block: u64,
    pub extent_block: u64,
    pub rdev: u32,
    pub inline: InlineArea,
    /// Creation time: present exactly when the layout has one.
    pub crtime: Option<Timespec>,
}

impl Inode {
    /// A new inode of layout `layout`, every time (creation time included) `now`.
    pub fn new(layout: FormatVersion, mode: u32, uid: u32, gid: u32, now: Timespec) -> Inode {
        Inode {
            layout,
            mode,
            uid,
            gid,
            nlink: 0,
            generation: 0,
            size: 0,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            extent_count: 0,
            xattr_block: 0,
            extent_block: 0,
            rdev: 0,
            inline: InlineArea::Extents(Vec::new()),
            crtime: layout.has_crtime().then_some(now),
        }
    }

    /// A freed slot: mode 0, nothing but `generation` kept, no layout flags.
    pub fn freed(generation: u32) -> Inode {
        Inode {
            generation,
            ..Inode::new(FormatVersion::V1, 0, 0, 0, Timespec::default())
        }
    }

    /// The codec of the inode's layout: its inline records and its extent blocks.
    pub fn codec(&self) -> ExtentCodec {
        ExtentCodec::for_version(self.layout)
    }

    pub fn file_type(&self) -> u32 {
        self.mode & S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.file_type() == S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.file_type() == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.file_type() == S_IFLNK
    }
    /// Whether this file type has a block map (regular files, directories, long symlinks).
    pub fn has_block_map(&self) -> bool {
        matches!(self.inline, InlineArea::Extents(_))
    }

    pub fn inline_extents(&self) -> &[Extent] {
        match &self.inline {
            InlineArea::Extents(e) => e,
            InlineArea::Symlink(_) => &[],
        }
    }

    /// Whether this is a freed slot: mode 0 (`encode` and `decode` see to it that nothing
    /// but `generation` is then set).
    pub fn is_free(&self) -> bool {
        self.mode == 0
    }

    /// Refuses every inode `decode` would reject, so that nothing written can fail to read.
    fn check(&self, codec: ExtentCodec) -> Result<()> {
        const WHAT: &str = "inode";
        if !self.layout.is_supported() {
            return Err(FormatError::UnsupportedVersion {
                what: "inode layout",
                found: self.layout.0,
                supported: FormatVersion::CURRENT.0,
            });
        }
        if self.mode == 0 {
            if *self != Inode::freed(self.generation) {
                return Err(FormatError::corrupted(
                    WHAT,
                    "a free inode (mode 0) keeps nothing but its generation",
                ));
            }
            return Ok(());
        }
        if !is_valid_mode(self.mode) {
            return Err(FormatError::corrupted(
                WHAT,
                format!("invalid mode {:#o}", self.mode),
            ));
        }
        if self.crtime.is_some() != self.layout.has_crtime() {
            return Err(FormatError::corrupted(
                WHAT,
                format!(
                    "a v{} inode {} a creation time",
                    self.layout.0,
                    if self.layout.has_crtime() {
                        "needs"
                    } else {
                        "has no room for"
                    }
                ),
            ));
        }
        if [self.atime, self.mtime, self.ctime]
            .iter()
            .chain(&self.crtime)
            .any(|t| t.nsec >= NSEC_PER_SEC)
        {
            return Err(FormatError::corrupted(WHAT, "nanoseconds not below 10^9"));
        }
        if self.xattr_block > codec.max_address() || self.extent_block > codec.max_address() {
            return Err(FormatError::corrupted(WHAT, "block address too wide"));
        }
        match &self.inline {
            InlineArea::Extents(e) => {
                let cap = codec.inline_capacity();
                if e.len() > cap {
                    return Err(FormatError::Full {
                        what: "inode inline extents",
                    });
                }
                if e.len() != (self.extent_count as usize).min(cap) {
                    return Err(FormatError::corrupted(
                        WHAT,
                        format!(
                            "{} inline extents for extent_count {} (the inline area holds the first {cap})",
                            e.len(),
                            self.extent_count
                        ),
                    ));
                }
            }
            InlineArea::Symlink(t) => {
                if !self.is_symlink() {
                    return Err(FormatError::corrupted(
                        WHAT,
                        "inline symlink target on a non-symlink",
                    ));
                }
                if t.is_empty() || t.len() > INLINE_SIZE {
                    return Err(FormatError::corrupted(WHAT, "inline symlink length"));
                }
                if t.contains(&0) {
                    return Err(FormatError::corrupted(WHAT, "NUL in a symlink target"));
                }
                if self.size != t.len() as u64 {
                    return Err(FormatError::corrupted(
                        WHAT,
                        "inline symlink size differs from its target length",
                    ));
                }
                if self.extent_count != 0 {
                    return Err(FormatError::corrupted(
                        WHAT,
                        "inline symlink with a block map",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Encodes the inode for slot `ino` in its `layout`. Refuses an inode `decode` would
    /// reject.
    pub fn encode(&self, ino: Ino, out: &mut [u8]) -> Result<()> {
        if out.len() != INODE_SIZE {
            return Err(FormatError::Truncated {
                what: "inode",
                len: out.len(),
                need: INODE_SIZE,
            });
        }
        let codec = self.codec();
        self.check(codec)?;
        out.fill(0);
        put_u32(out, OFF_MODE, self.mode);
        put_u32(out, OFF_UID, self.uid);
        put_u32(out, OFF_GID, self.gid);
        put_u32(out, OFF_NLINK, self.nlink);
        put_u32(out, OFF_GENERATION, self.generation);
        put_u64(out, OFF_SIZE, self.size);
        put_u64(out, OFF_BLOCKS, self.blocks);
        put_i64(out, OFF_ATIME_SEC, self.atime.sec);
        put_u32(out, OFF_ATIME_NSEC, self.atime.nsec);
        put_i64(out, OFF_MTIME_SEC, self.mtime.sec);
        put_u32(out, OFF_MTIME_NSEC, self.mtime.nsec);
        put_i64(out, OFF_CTIME_SEC, self.ctime.sec);
        put_u32(out, OFF_CTIME_NSEC, self.ctime.nsec);
        put_u32(out, OFF_EXTENT_COUNT, self.extent_count);
        put_u32(out, OFF_XATTR_BLOCK, self.xattr_block as u32);
        put_u32(out, OFF_EXTENT_BLOCK, self.extent_block as u32);
        put_u32(out, OFF_RDEV, self.rdev);
        let mut flags = if self.mode == 0 {
            0
        } else {
            layout_flags(self.layout)
        };
        if flags & INODE_FLAG_MAP48 != 0 {
            put_u16(out, OFF_XATTR_BLOCK_HI, (self.xattr_block >> 32) as u16);
            put_u16(out, OFF_EXTENT_BLOCK_HI, (self.extent_block >> 32) as u16);
        }
        if let Some(t) = self.crtime {
            put_i64(out, OFF_CRTIME_SEC, t.sec);
            put_u32(out, OFF_CRTIME_NSEC, t.nsec);
        }
        let area = &mut out[OFF_INLINE..OFF_INLINE + INLINE_SIZE];
        match &self.inline {
            InlineArea::Extents(e) => codec.encode_list(e, area)?,
            InlineArea::Symlink(t) => {
                flags |= INODE_FLAG_INLINE;
                out[OFF_INLINE..OFF_INLINE + t.len()].copy_from_slice(t);
            }
        }
        put_u32(out, OFF_FLAGS, flags);
        let crc = inode_crc(ino, out);
        put_u32(out, OFF_CRC, crc);
        Ok(())
    }

    /// Decodes the inode in slot `ino` of an image whose inodes may use layouts up to
    /// `newest` (`Superblock::newest_layout`). `Ok(None)` for a never-used all-zero slot.
    /// A freed slot (checksummed, mode 0, nothing but `generation` set) decodes as `Some`
    /// with mode 0, so that its generation survives; `is_free` tells it apart.
    pub fn decode(ino: Ino, b: &[u8], newest: FormatVersion) -> Result<Option<Inode>> {
        const WHAT: &str = "inode";
        if b.len() != INODE_SIZE {
            return Err(FormatError::Truncated {
                what: WHAT,
                len: b.len(),
                need: INODE_SIZE,
            });
        }
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let stored = get_u32(b, OFF_CRC);
        let computed = inode_crc(ino, b);
        if stored != computed {
            return Err(FormatError::Checksum {
                what: WHAT,
                stored,
                computed,
            });
        }
        let flags = get_u32(b, OFF_FLAGS);
        if flags & !INODE_FLAGS_KNOWN != 0 {
            return Err(FormatError::corrupted(
                WHAT,
                format!("unknown flags {flags:#x}"),
            ));
        }
        let layout = layout_of_flags(flags).ok_or_else(|| {
            FormatError::corrupted(WHAT, format!("flags {flags:#x} name no layout"))
        })?;
        if layout > newest {
            return Err(FormatError::corrupted(
                WHAT,
                format!(
                    "uses the v{} layout in an image of v{} at most",
                    layout.0, newest.0
                ),
            ));
        }
        let wide = flags & INODE_FLAG_MAP48 != 0;
        if (!wide && get_u32(b, OFF_RESERVED0) != 0)
            || (!layout.has_crtime() && b[OFF_RESERVED1..OFF_CRC].iter().any(|&x| x != 0))
        {
            return Err(FormatError::corrupted(WHAT, "reserved bytes are not zero"));
        }
        let codec = ExtentCodec::for_version(layout);
        let mode = get_u32(b, OFF_MODE);
        if mode == 0 {
            let generation = OFF_GENERATION..OFF_GENERATION + 4;
            if b[..OFF_CRC]
                .iter()
                .enumerate()
                .any(|(i, &x)| x != 0 && !generation.contains(&i))
            {
                return Err(FormatError::corrupted(
                    WHAT,
                    "a free inode (mode 0) holds more than its generation",
                ));
            }
        } else if !is_valid_mode(mode) {
            return Err(FormatError::corrupted(
                WHAT,
                format!("invalid mode {mode:#o}"),
            ));
        }
        for off in [
            OFF_ATIME_NSEC,
            OFF_MTIME_NSEC,
            OFF_CTIME_NSEC,
            OFF_CRTIME_NSEC,
        ] {
            if get_u32(b, off) >= NSEC_PER_SEC {
                return Err(FormatError::corrupted(WHAT, "nanoseconds not below 10^9"));
            }
        }
        let addr = |lo: usize, hi: usize| {
            let high = if wide { get_u16(b, hi) as u64 } else { 0 };
            high << 32 | get_u32(b, lo) as u64
        };
        let size = get_u64(b, OFF_SIZE);
        let extent_count = get_u32(b, OFF_EXTENT_COUNT);
        let area = &b[OFF_INLINE..OFF_INLINE + INLINE_SIZE];
        let inline = if flags & INODE_FLAG_INLINE != 0 {
            if mode & S_IFMT != S_IFLNK
                || size == 0
                || size > INLINE_SIZE as u64
                || extent_count != 0
            {
                return Err(FormatError::corrupted(
                    WHAT,
                    "inline data on a non-symlink or bad size",
                ));
            }
            // No NUL inside the target and only zeros after it: `size` is then the one
            // length the area allows.
            if area[..size as usize].contains(&0) {
                return Err(FormatError::corrupted(WHAT, "NUL in a symlink target"));
            }
            if area[size as usize..].iter().any(|&x| x != 0) {
                return Err(FormatError::corrupted(
                    WHAT,
                    "bytes past the inline symlink are not zero",
                ));
            }
            InlineArea::Symlink(area[..size as usize].to_vec())
        } else {
            let n = (extent_count as usize).min(codec.inline_capacity());
            let list = codec.decode_list(area, n, WHAT)?;
            if area[n * codec.record_size()..].iter().any(|&x| x != 0) {
                return Err(FormatError::corrupted(
                    WHAT,
                    "bytes past the inline extents are not zero",
                ));
            }
            InlineArea::Extents(list)
        };
        Ok(Some(Inode {
            layout,
            mode,
            uid: get_u32(b, OFF_UID),
            gid: get_u32(b, OFF_GID),
            nlink: get_u32(b, OFF_NLINK),
            generation: get_u32(b, OFF_GENERATION),
            size,
            blocks: get_u64(b, OFF_BLOCKS),
            atime: Timespec {
                sec: get_i64(b, OFF_ATIME_SEC),
                nsec: get_u32(b, OFF_ATIME_NSEC),
            },
            mtime: Timespec {
                sec: get_i64(b, OFF_MTIME_SEC),
                nsec: get_u32(b, OFF_MTIME_NSEC),
            },
            ctime: Timespec {
                sec: get_i64(b, OFF_CTIME_SEC),
                nsec: get_u32(b, OFF_CTIME_NSEC),
            },
            extent_count,
            xattr_block: addr(OFF_XATTR_BLOCK, OFF_XATTR_BLOCK_HI),
            extent_block: addr(OFF_EXTENT_BLOCK, OFF_EXTENT_BLOCK_HI),
            rdev: get_u32(b, OFF_RDEV),
            inline,
            crtime: layout.has_crtime().then(|| Timespec {
                sec: get_i64(b, OFF_CRTIME_SEC),
                nsec: get_u32(b, OFF_CRTIME_NSEC),
            }),
        }))
    }
}

fn inode_crc(ino: Ino, b: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&ino.0.to_le_bytes());
    h.update(&b[..OFF_CRC]);
    h.finalize()
}

/// Codec for inodes of layout `version`.
pub fn codec_for(version: FormatVersion) -> ExtentCodec {
    ExtentCodec::for_version(version)
}

const _: () = assert!(OFF_CRC + 4 == INODE_SIZE);
const _: () = assert!(OFF_CRTIME_NSEC + 4 == OFF_CRC);
const _: () = assert!(OFF_EXTENT_BLOCK_HI + 2 == OFF_INLINE);
// Whole inodes per table block.
const _: () = assert!(BLOCK_SIZE / INODE_SIZE * INODE_SIZE == BLOCK_SIZE);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_extents_and_symlink() {
        let mut i = Inode::new(
            FormatVersion::V1,
            S_IFREG | 0o644,
            1,
            2,
            Timespec { sec: 5, nsec: 6 },
        );
        i.nlink = 1;
        i.size = 12345;
        i.extent_count = 2;
        i.inline = InlineArea::Extents(vec![
            Extent {
                logical: 0,
                physical: 100,
                len: 2,
                unwritten: false,
            },
            Extent {
                logical: 5,
                physical: 300,
                len: 1,
                unwritten: true,
            },
        ]);
        let mut b = [0u8; INODE_SIZE];
        i.encode(Ino(3), &mut b).unwrap();
        assert_eq!(
            Inode::decode(Ino(3), &b, FormatVersion::V1).unwrap(),
            Some(i.clone())
        );
        // The checksum binds the slot: the same bytes in another slot are rejected.
        assert!(Inode::decode(Ino(4), &b, FormatVersion::V1).is_err());

        let mut s = Inode::new(
            FormatVersion::V1,
            S_IFLNK | 0o777,
            0,
            0,
            Timespec::default(),
        );
        s.size = 3;
        s.inline = InlineArea::Symlink(b"abc".to_vec());
        s.encode(Ino(7), &mut b).unwrap();
        assert_eq!(
            Inode::decode(Ino(7), &b, FormatVersion::V1).unwrap(),
            Some(s)
        );
        for i in 0..INODE_SIZE {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(
                Inode::decode(Ino(7), &c, FormatVersion::V1).is_err(),
                "flip at {i}"
            );
        }
    }

    fn v1() -> ExtentCodec {
        ExtentCodec::for_version(FormatVersion::V1)
    }

    fn ext(logical: u64) -> Extent {
        Extent {
            logical,
            physical: 1000 + logical,
            len: 1,
            unwritten: false,
        }
    }

    /// A regular file in slot 3 edited by `f`, with a valid CRC: what a writer that
    /// skipped `check` would leave.
    fn raw(f: impl FnOnce(&mut [u8; INODE_SIZE])) -> [u8; INODE_SIZE] {
        let mut b = [0u8; INODE_SIZE];
        let i = Inode::new(
            FormatVersion::V1,
            S_IFREG | 0o644,
            0,
            0,
            Timespec::default(),
        );
        i.encode(Ino(3), &mut b).unwrap();
        f(&mut b);
        let crc = inode_crc(Ino(3), &b);
        put_u32(&mut b, OFF_CRC, crc);
        b
    }

    #[test]
    fn inline_capacity_comes_from_the_codec() {
        assert_eq!(v1().inline_capacity(), INLINE_EXTENTS);
        assert_eq!(INLINE_EXTENTS, 12);
    }

    #[test]
    fn encode_refuses_inconsistent_inline_symlinks() {
        let mut s = Inode::new(
            FormatVersion::V1,
            S_IFLNK | 0o777,
            0,
            0,
            Timespec::default(),
        );
        s.size = 3;
        s.inline = InlineArea::Symlink(b"abc".to_vec());
        let mut b = [0u8; INODE_SIZE];
        s.encode(Ino(7), &mut b).unwrap();
        for bad in [
            Inode {
                mode: S_IFREG | 0o644,
                ..s.clone()
            },
            Inode {
                size: 4,
                ..s.clone()
            },
            Inode {
                extent_count: 1,
                ..s.clone()
            },
            Inode {
                inline: InlineArea::Symlink(Vec::new()),
                size: 0,
                ..s.clone()
            },
            Inode {
                inline: InlineArea::Symlink(b"a\0c".to_vec()),
                ..s.clone()
            },
        ] {
            assert!(bad.encode(Ino(7), &mut b).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn encode_refuses_inline_extents_that_disagree_with_extent_count() {
        let mut f = Inode::new(
            FormatVersion::V1,
            S_IFREG | 0o644,
            0,
            0,
            Timespec::default(),
        );
        let mut b = [0u8; INODE_SIZE];
        let list = |n: u64| InlineArea::Extents((0..n).map(|k| ext(k * 2)).collect());
        // (extent_count, inline records, accepted)
        for (count, n, ok) in [
            (0, 0, true),
            (2, 2, true),
            (12, 12, true),
            (500, 12, true),
            (1, 0, false),
            (0, 1, false),
            (3, 2, false),
            (500, 11, false),
        ] {
            f.extent_count = count;
            f.inline = list(n);
            assert_eq!(f.encode(Ino(3), &mut b).is_ok(), ok, "{count} {n}");
        }
        f.extent_count = 13;
        f.inline = list(13);
        assert!(matches!(
            f.encode(Ino(3), &mut b),
            Err(FormatError::Full { .. })
        ));
        // Unsorted inline records are refused like decode refuses them.
        f.extent_count = 2;
        f.inline = InlineArea::Extents(vec![ext(5), ext(1)]);
        assert!(f.encode(Ino(3), &mut b).is_err());
    }

    #[test]
    fn modes_must_name_a_posix_type() {
        let mut b = [0u8; INODE_SIZE];
        for t in [
            S_IFSOCK, S_IFLNK, S_IFREG, S_IFBLK, S_IFDIR, S_IFCHR, S_IFIFO,
        ] {
            let i = Inode::new(FormatVersion::V1, t | 0o7777, 0, 0, Timespec::default());
            i.encode(Ino(3), &mut b).unwrap();
            assert_eq!(
                Inode::decode(Ino(3), &b, FormatVersion::V1).unwrap(),
                Some(i)
            );
        }
        for mode in [0o644, 0o030000 | 0o644, 0o170000, 0o1_100644] {
            let i = Inode::new(FormatVersion::V1, mode, 0, 0, Timespec::default());
            assert!(i.encode(Ino(3), &mut b).is_err(), "{mode:#o}");
            let b = raw(|b| put_u32(b, OFF_MODE, mode));
            assert!(
                Inode::decode(Ino(3), &b, FormatVersion::V1).is_err(),
                "{mode:#o}"
            );
        }
    }

    #[test]
    fn nanoseconds_stay_below_a_second() {
        let mut b = [0u8; INODE_SIZE];
        let mut i = Inode::new(FormatVersion::V1, S_IFREG, 0, 0, Timespec::default());
        i.mtime.nsec = NSEC_PER_SEC - 1;
        i.encode(Ino(3), &mut b).unwrap();
        i.mtime.nsec = NSEC_PER_SEC;
        assert!(i.encode(Ino(3), &mut b).is_err());
        for off in [OFF_ATIME_NSEC, OFF_MTIME_NSEC, OFF_CTIME_NSEC] {
            let b = raw(|b| put_u32(b, off, NSEC_PER_SEC));
            assert!(
                Inode::decode(Ino(3), &b, FormatVersion::V1).is_err(),
                "offset {off}"
            );
        }
    }

    #[test]
    fn a_freed_slot_keeps_its_generation_and_nothing_else() {
        let mut b = [0u8; INODE_SIZE];
        let freed = Inode::freed(0xABCD);
        freed.encode(Ino(3), &mut b).unwrap();
        let d = Inode::decode(Ino(3), &b, FormatVersion::V1)
            .unwrap()
            .unwrap();
        assert!(d.is_free());
        assert_eq!(d, freed);
        // Anything besides the generation is refused on both sides.
        let stale = Inode {
            nlink: 1,
            ..freed.clone()
        };
        assert!(stale.encode(Ino(3), &mut b).is_err());
        let b = raw(|b| {
            put_u32(b, OFF_MODE, 0);
            put_u32(b, OFF_UID, 5);
        });
        assert!(Inode::decode(Ino(3), &b, FormatVersion::V1).is_err());
    }

    fn file_of(layout: FormatVersion, n: u64) -> Inode {
        let mut i = Inode::new(
            layout,
            S_IFREG | 0o600,
            7,
            8,
            Timespec { sec: 11, nsec: 12 },
        );
        i.nlink = 1;
        i.extent_count = n as u32;
        i.inline = InlineArea::Extents((0..n).map(|k| ext(2 * k)).collect());
        i
    }

    #[test]
    fn each_layout_round_trips_and_is_marked_in_the_flags() {
        let mut b = [0u8; INODE_SIZE];
        for (v, flags, inline) in [
            (FormatVersion::V1, 0, 12),
            (FormatVersion::V2, INODE_FLAG_CRTIME, 12),
            (FormatVersion::V3, INODE_FLAG_CRTIME | INODE_FLAG_MAP48, 9),
        ] {
            let mut i = file_of(v, inline);
            i.encode(Ino(5), &mut b).unwrap();
            assert_eq!(get_u32(&b, OFF_FLAGS), flags, "{v:?}");
            assert_eq!(layout_of_flags(flags), Some(v));
            assert_eq!(
                Inode::decode(Ino(5), &b, FormatVersion::V3).unwrap(),
                Some(i.clone())
            );
            // An image whose newest layout is older refuses the inode.
            if v > FormatVersion::V1 {
                let older = FormatVersion(v.0 - 1);
                assert!(Inode::decode(Ino(5), &b, older).is_err(), "{v:?}");
            }
            // One record more than the layout's inline area is refused.
            i = file_of(v, inline + 1);
            assert!(matches!(
                i.encode(Ino(5), &mut b),
                Err(FormatError::Full { .. })
            ));
        }
        assert_eq!(layout_of_flags(INODE_FLAG_MAP48), None);
    }

    #[test]
    fn crtime_lives_in_the_last_twelve_bytes_and_is_checksummed() {
        let mut i = file_of(FormatVersion::V2, 1);
        i.crtime = Some(Timespec {
            sec: -3,
            nsec: 999_999_999,
        });
        let mut b = [0u8; INODE_SIZE];
        i.encode(Ino(9), &mut b).unwrap();
        assert_eq!(get_i64(&b, OFF_CRTIME_SEC), -3);
        assert_eq!(get_u32(&b, OFF_CRTIME_NSEC), 999_999_999);
        for at in OFF_CRTIME_SEC..OFF_CRC {
            let mut c = b;
            c[at] ^= 1;
            assert!(matches!(
                Inode::decode(Ino(9), &c, FormatVersion::V2),
                Err(FormatError::Checksum { .. })
            ));
        }
        // Presence follows the layout, both ways; nanoseconds stay below a second.
        for bad in [
            Inode {
                crtime: None,
                ..i.clone()
            },
            Inode {
                layout: FormatVersion::V1,
                ..i.clone()
            },
            Inode {
                crtime: Some(Timespec {
                    sec: 0,
                    nsec: NSEC_PER_SEC,
                }),
                ..i.clone()
            },
        ] {
            assert!(bad.encode(Ino(9), &mut b).is_err(), "{bad:?}");
        }
        let c = raw(|c| put_u32(c, OFF_CRTIME_NSEC, 1));
        assert!(Inode::decode(Ino(3), &c, FormatVersion::V3).is_err());
    }

    #[test]
    fn map48_inodes_hold_wide_pointers_and_wide_records() {
        let mut i = file_of(FormatVersion::V3, 9);
        i.extent_count = 100;
        i.xattr_block = (1 << 48) - 1;
        i.extent_block = 0x1234_5678_9ABC;
        i.inline = InlineArea::Extents(
            (0..9)
                .map(|k| Extent {
                    logical: k,
                    physical: (1 << 47) + 2 * k,
                    len: 1,
                    unwritten: false,
                })
                .collect(),
        );
        let mut b = [0u8; INODE_SIZE];
        i.encode(Ino(4), &mut b).unwrap();
        assert_eq!(get_u16(&b, OFF_XATTR_BLOCK_HI), 0xFFFF);
        assert_eq!(get_u32(&b, OFF_EXTENT_BLOCK), 0x5678_9ABC);
        assert_eq!(get_u16(&b, OFF_EXTENT_BLOCK_HI), 0x1234);
        assert_eq!(
            Inode::decode(Ino(4), &b, FormatVersion::V3).unwrap(),
            Some(i.clone())
        );
        // Past 48 bits, or past 32 bits in a narrow layout, is refused.
        let wide = Inode {
            xattr_block: 1 << 48,
            ..i.clone()
        };
        assert!(wide.encode(Ino(4), &mut b).is_err());
        let mut narrow = file_of(FormatVersion::V2, 0);
        narrow.extent_block = 1 << 32;
        assert!(narrow.encode(Ino(4), &mut b).is_err());
        // A narrow layout keeps `reserved0` zero.
        let c = raw(|c| put_u16(c, OFF_EXTENT_BLOCK_HI, 1));
        assert!(Inode::decode(Ino(3), &c, FormatVersion::V3).is_err());
    }

    #[test]
    fn freed_slots_carry_no_layout() {
        let mut b = [0u8; INODE_SIZE];
        let f = Inode::freed(77);
        f.encode(Ino(3), &mut b).unwrap();
        assert_eq!(get_u32(&b, OFF_FLAGS), 0);
        assert_eq!(
            Inode::decode(Ino(3), &b, FormatVersion::V3).unwrap(),
            Some(f)
        );
        let v3_free = Inode {
            layout: FormatVersion::V3,
            ..Inode::freed(77)
        };
        assert!(v3_free.encode(Ino(3), &mut b).is_err());
        assert!(Inode::freed(1).encode(Ino(3), &mut [0u8; 10]).is_err());
    }
}
