//! Inodes: 256 bytes each, 16 to an inode-table block; inode `n` is slot `n` (slot 0 unused).
//!
//! ```text
//! off size field
//!   0   4 mode         POSIX file type and permission bits; 0 = free
//!   4   4 uid
//!   8   4 gid
//!  12   4 nlink
//!  16   4 flags        bit 0 INLINE: symlink target stored in the inline area
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
//!  80   4 xattr_block  0 = none (v1: 32-bit address)
//!  84   4 extent_block first overflow extent block, 0 = none (v1: 32-bit address)
//!  88   4 rdev         device number of character and block special files
//!  92   4 reserved     zero
//!  96 144 inline area  up to 12 v1 extent records, or an inline symlink target
//! 240  12 reserved     zero in v1
//! 252   4 crc          CRC-32 of (ino as u32 LE) ++ bytes 0..252
//! ```

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
pub const OFF_INLINE: usize = OFF_RESERVED0 + 4;
pub const INLINE_SIZE: usize = 144;
pub const OFF_RESERVED1: usize = OFF_INLINE + INLINE_SIZE;
pub const OFF_CRC: usize = OFF_RESERVED1 + 12;

pub const INODE_FLAG_INLINE: u32 = 1;
/// Extent records the inline area holds (v1).
pub const INLINE_EXTENTS: usize = INLINE_SIZE / 12;

pub const S_IFMT: u32 = 0o170000;
pub const S_IFSOCK: u32 = 0o140000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFBLK: u32 = 0o060000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFIFO: u32 = 0o010000;

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
}

impl Inode {
    pub fn new(mode: u32, uid: u32, gid: u32, now: Timespec) -> Inode {
        Inode {
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
        }
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

    pub fn encode(&self, ino: Ino, codec: ExtentCodec, out: &mut [u8]) -> Result<()> {
        assert_eq!(out.len(), INODE_SIZE);
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
        if self.xattr_block > codec.max_address() || self.extent_block > codec.max_address() {
            return Err(FormatError::corrupted("inode", "block address too wide"));
        }
        put_u32(out, OFF_XATTR_BLOCK, self.xattr_block as u32);
        put_u32(out, OFF_EXTENT_BLOCK, self.extent_block as u32);
        put_u32(out, OFF_RDEV, self.rdev);
        let area = &mut out[OFF_INLINE..OFF_INLINE + INLINE_SIZE];
        match &self.inline {
            InlineArea::Extents(e) => {
                if e.len() > INLINE_EXTENTS {
                    return Err(FormatError::Full {
                        what: "inode inline extents",
                    });
                }
                codec.encode_list(e, area)?;
            }
            InlineArea::Symlink(t) => {
                if t.is_empty() || t.len() > INLINE_SIZE {
                    return Err(FormatError::corrupted("inode", "inline symlink length"));
                }
                put_u32(out, OFF_FLAGS, INODE_FLAG_INLINE);
                out[OFF_INLINE..OFF_INLINE + t.len()].copy_from_slice(t);
            }
        }
        let crc = inode_crc(ino, out);
        put_u32(out, OFF_CRC, crc);
        Ok(())
    }

    /// Decodes the inode in slot `ino`. `Ok(None)` for a never-used all-zero slot.
    pub fn decode(ino: Ino, b: &[u8], codec: ExtentCodec) -> Result<Option<Inode>> {
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
        if flags & !INODE_FLAG_INLINE != 0 {
            return Err(FormatError::corrupted(
                WHAT,
                format!("unknown flags {flags:#x}"),
            ));
        }
        if get_u32(b, OFF_RESERVED0) != 0 || b[OFF_RESERVED1..OFF_CRC].iter().any(|&x| x != 0) {
            return Err(FormatError::corrupted(WHAT, "reserved bytes are not zero"));
        }
        let mode = get_u32(b, OFF_MODE);
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
            if area[size as usize..].iter().any(|&x| x != 0) {
                return Err(FormatError::corrupted(
                    WHAT,
                    "bytes past the inline symlink are not zero",
                ));
            }
            InlineArea::Symlink(area[..size as usize].to_vec())
        } else {
            let n = (extent_count as usize).min(INLINE_EXTENTS);
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
            xattr_block: get_u32(b, OFF_XATTR_BLOCK) as u64,
            extent_block: get_u32(b, OFF_EXTENT_BLOCK) as u64,
            rdev: get_u32(b, OFF_RDEV),
            inline,
        }))
    }
}

fn inode_crc(ino: Ino, b: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&ino.0.to_le_bytes());
    h.update(&b[..OFF_CRC]);
    h.finalize()
}

/// Codec for the format version an image records.
pub fn codec_for(version: FormatVersion) -> ExtentCodec {
    ExtentCodec::for_version(version)
}

const _: () = assert!(OFF_CRC + 4 == INODE_SIZE);
const _: () = assert!(BLOCK_SIZE % INODE_SIZE == 0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_extents_and_symlink() {
        let codec = ExtentCodec::for_version(FormatVersion::V1);
        let mut i = Inode::new(S_IFREG | 0o644, 1, 2, Timespec { sec: 5, nsec: 6 });
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
        i.encode(Ino(3), codec, &mut b).unwrap();
        assert_eq!(Inode::decode(Ino(3), &b, codec).unwrap(), Some(i.clone()));
        // The checksum binds the slot: the same bytes in another slot are rejected.
        assert!(Inode::decode(Ino(4), &b, codec).is_err());

        let mut s = Inode::new(S_IFLNK | 0o777, 0, 0, Timespec::default());
        s.size = 3;
        s.inline = InlineArea::Symlink(b"abc".to_vec());
        s.encode(Ino(7), codec, &mut b).unwrap();
        assert_eq!(Inode::decode(Ino(7), &b, codec).unwrap(), Some(s));
        for i in 0..INODE_SIZE {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(Inode::decode(Ino(7), &c, codec).is_err(), "flip at {i}");
        }
    }
}
