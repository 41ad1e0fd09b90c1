//! Directories: a linear-hashing table stored in the directory's own block map, so lookup
//! and insert touch O(1) blocks whatever the directory size.
//!
//! * file block 0: the header (kind MMDH, owner = directory).
//! * file block 1 + i: bucket i, for i < bucket_count = 2^level + split.
//! * file block OVERFLOW_BASE + k: overflow blocks chained from a bucket.
//!
//! A name with hash h lives in bucket `h mod 2^level`, or `h mod 2^(level+1)` when that is
//! below `split` (the buckets already split in this round). `.` and `..` are not stored:
//! the header records the parent.
//!
//! Header:
//! ```text
//!  0 4 version         1
//!  4 4 parent          inode number of the parent directory (the root names itself); never 0
//!  8 4 level
//! 12 4 split
//! 16 8 entry_count     entries in all buckets
//! 24 4 overflow_next   next unused overflow index (file block OVERFLOW_BASE + index),
//!                      at most MAX_OVERFLOW_BLOCKS
//! 28 .. zero
//! ```
//! Bucket / overflow block (kind MMDB, owner = directory):
//! ```text
//!  0 4 next            file block of the next overflow block in the chain, 0 = last
//!  4 2 count           entries in this block
//!  6 2 used            bytes of entries
//!  8 .. entries        ino u32 | type u8 | name_len u8 | name   (packed, unordered)
//! ```

use crate::block::{self, BlockAddr, BlockKind, Ino, PAYLOAD_SIZE};
use crate::bytes::*;
use crate::error::{FormatError, Result};

pub const DIR_VERSION: u32 = 1;
pub const OVERFLOW_BASE: u64 = 1 << 30;
/// Most overflow indices a directory can hand out: file blocks are u32, so
/// `OVERFLOW_BASE + overflow_next` stays at or below 2^32.
pub const MAX_OVERFLOW_BLOCKS: u64 = (1 << 32) - OVERFLOW_BASE;
pub const MAX_NAME_LEN: usize = 255;
/// Entries per bucket (on average) above which the next bucket is split.
pub const SPLIT_LOAD: u64 = 48;

pub const HDR_OFF_VERSION: usize = 0;
pub const HDR_OFF_PARENT: usize = HDR_OFF_VERSION + 4;
pub const HDR_OFF_LEVEL: usize = HDR_OFF_PARENT + 4;
pub const HDR_OFF_SPLIT: usize = HDR_OFF_LEVEL + 4;
pub const HDR_OFF_ENTRY_COUNT: usize = HDR_OFF_SPLIT + 4;
pub const HDR_OFF_OVERFLOW_NEXT: usize = HDR_OFF_ENTRY_COUNT + 8;
pub const HDR_FIELDS_END: usize = HDR_OFF_OVERFLOW_NEXT + 4;

pub const BUCKET_OFF_NEXT: usize = 0;
pub const BUCKET_OFF_COUNT: usize = BUCKET_OFF_NEXT + 4;
pub const BUCKET_OFF_USED: usize = BUCKET_OFF_COUNT + 2;
pub const BUCKET_OFF_ENTRIES: usize = BUCKET_OFF_USED + 2;
pub const BUCKET_CAPACITY: usize = PAYLOAD_SIZE - BUCKET_OFF_ENTRIES;
pub const ENTRY_HEADER: usize = 6;

/// File type codes stored in entries (the `DT_*` values of readdir).
pub const DT_UNKNOWN: u8 = 0;
pub const DT_FIFO: u8 = 1;
pub const DT_CHR: u8 = 2;
pub const DT_DIR: u8 = 4;
pub const DT_BLK: u8 = 6;
pub const DT_REG: u8 = 8;
pub const DT_LNK: u8 = 10;
pub const DT_SOCK: u8 = 12;

/// The `DT_*` code for a POSIX mode.
pub fn dtype_of_mode(mode: u32) -> u8 {
    use crate::inode::*;
    match mode & S_IFMT {
        S_IFIFO => DT_FIFO,
        S_IFCHR => DT_CHR,
        S_IFDIR => DT_DIR,
        S_IFBLK => DT_BLK,
        S_IFREG => DT_REG,
        S_IFLNK => DT_LNK,
        S_IFSOCK => DT_SOCK,
        _ => DT_UNKNOWN,
    }
}

/// Whether `dtype` is a code an entry may store (`DT_UNKNOWN` is not).
pub fn is_stored_dtype(dtype: u8) -> bool {
    matches!(
        dtype,
        DT_FIFO | DT_CHR | DT_DIR | DT_BLK | DT_REG | DT_LNK | DT_SOCK
    )
}

/// The name hash: CRC-32 (ISO-HDLC) of the name bytes. Frozen by the format.
pub fn name_hash(name: &[u8]) -> u32 {
    crc32fast::hash(name)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirHeader {
    pub parent: Ino,
    pub level: u32,
    pub split: u32,
    pub entry_count: u64,
    pub overflow_next: u32,
}

impl DirHeader {
    pub fn new(parent: Ino) -> DirHeader {
        DirHeader {
            parent,
            level: 0,
            split: 0,
            entry_count: 0,
            overflow_next: 0,
        }
    }

    pub fn bucket_count(&self) -> u64 {
        (1u64 << self.level) + self.split as u64
    }

    /// The bucket a name hash belongs to.
    pub fn bucket_of(&self, hash: u32) -> u64 {
        let low = hash as u64 & ((1u64 << self.level) - 1);
        if low < self.split as u64 {
            hash as u64 & ((1u64 << (self.level + 1)) - 1)
        } else {
            low
        }
    }

    pub fn needs_split(&self) -> bool {
        self.entry_count > self.bucket_count() * SPLIT_LOAD
    }

    /// File block of bucket `i`.
    pub fn bucket_block(i: u64) -> u64 {
        1 + i
    }

    pub fn encode(&self, owner: Ino, addr: BlockAddr) -> Box<block::Block> {
        let mut b = block::zeroed();
        put_u32(&mut b[..], HDR_OFF_VERSION, DIR_VERSION);
        put_u32(&mut b[..], HDR_OFF_PARENT, self.parent.0);
        put_u32(&mut b[..], HDR_OFF_LEVEL, self.level);
        put_u32(&mut b[..], HDR_OFF_SPLIT, self.split);
        put_u64(&mut b[..], HDR_OFF_ENTRY_COUNT, self.entry_count);
        put_u32(&mut b[..], HDR_OFF_OVERFLOW_NEXT, self.overflow_next);
        block::seal(&mut b[..], BlockKind::DirHeader, owner, addr);
        b
    }

    pub fn decode(b: &[u8], owner: Ino, addr: BlockAddr) -> Result<DirHeader> {
        const WHAT: &str = "directory header";
        block::verify(b, BlockKind::DirHeader, Some(owner), addr)?;
        let version = get_u32(b, HDR_OFF_VERSION);
        if version != DIR_VERSION {
            return Err(FormatError::UnsupportedVersion {
                what: WHAT,
                found: version,
                supported: DIR_VERSION,
            });
        }
        let h = DirHeader {
            parent: Ino(get_u32(b, HDR_OFF_PARENT)),
            level: get_u32(b, HDR_OFF_LEVEL),
            split: get_u32(b, HDR_OFF_SPLIT),
            entry_count: get_u64(b, HDR_OFF_ENTRY_COUNT),
            overflow_next: get_u32(b, HDR_OFF_OVERFLOW_NEXT),
        };
        if h.parent.0 == 0 {
            return Err(FormatError::corrupted(WHAT, "parent is inode 0"));
        }
        if h.level > 29 || h.split as u64 >= (1u64 << h.level) {
            return Err(FormatError::corrupted(
                WHAT,
                format!("level {} split {}", h.level, h.split),
            ));
        }
        if h.overflow_next as u64 > MAX_OVERFLOW_BLOCKS {
            return Err(FormatError::corrupted(
                WHAT,
                format!(
                    "overflow_next {} reaches past file block {}",
                    h.overflow_next,
                    u32::MAX
                ),
            ));
        }
        if b[HDR_FIELDS_END..block::TAIL_KIND].iter().any(|&x| x != 0) {
            return Err(FormatError::corrupted(WHAT, "reserved bytes are not zero"));
        }
        Ok(h)
    }
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DirEntry {
    pub ino: Ino,
    pub dtype: u8,
    pub name: Vec<u8>,
}

impl DirEntry {
    pub(crate) fn encoded_len(&self) -> usize {
        ENTRY_HEADER + self.name.len()
    }
}

/// Checks a name is storable: 1..=255 bytes, no `/` or NUL, not `.` or `..`.
pub fn validate_name(name: &[u8]) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("name longer than 255 bytes");
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err("name contains '/' or NUL");
    }
    if name == b"." || name == b".." {
        return Err("'.' and '..' are not stored");
    }
    Ok(())
}

/// A decoded bucket or overflow block.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bucket {
    /// File block of the next overflow block, 0 = last.
    pub next: u64,
    pub entries: Vec<DirEntry>,
}

impl Bucket {
    pub fn used(&self) -> usize {
        self.entries.iter().map(DirEntry::encoded_len).sum()
    }

    pub fn fits(&self, e: &DirEntry) -> bool {
        self.used() + e.encoded_len() <= BUCKET_CAPACITY
    }

    /// Encodes the block. Refuses what `decode` rejects: a bad name or type, inode 0, a
    /// `next` link that is neither 0 nor a file block of the overflow area.
    pub fn encode(&self, owner: Ino, addr: BlockAddr) -> Result<Box<block::Block>> {
        const WHAT: &str = "directory bucket";
        if self.next != 0 && !(OVERFLOW_BASE..=u32::MAX as u64).contains(&self.next) {
            return Err(FormatError::corrupted(
                WHAT,
                format!("overflow link {} outside the overflow area", self.next),
            ));
        }
        for e in &self.entries {
            validate_name(&e.name).map_err(|d| FormatError::corrupted(WHAT, d))?;
            if e.ino.0 == 0 || !is_stored_dtype(e.dtype) {
                return Err(FormatError::corrupted(
                    WHAT,
                    "entry with inode 0 or unknown type",
                ));
            }
        }
        if self.used() > BUCKET_CAPACITY {
            return Err(FormatError::Full { what: WHAT });
        }
        let mut b = block::zeroed();
        put_u32(&mut b[..], BUCKET_OFF_NEXT, self.next as u32);
        put_u16(&mut b[..], BUCKET_OFF_COUNT, self.entries.len() as u16);
        put_u16(&mut b[..], BUCKET_OFF_USED, self.used() as u16);
        let mut off = BUCKET_OFF_ENTRIES;
        for e in &self.entries {
            put_u32(&mut b[..], off, e.ino.0);
            b[off + 4] = e.dtype;
            b[off + 5] = e.name.len() as u8;
            b[off + ENTRY_HEADER..off + ENTRY_HEADER + e.name.len()].copy_from_slice(&e.name);
            off += e.encoded_len();
        }
        block::seal(&mut b[..], BlockKind::DirBucket, owner, addr);
        Ok(b)
    }

    pub fn decode(b: &[u8], owner: Ino, addr: BlockAddr) -> Result<Bucket> {
        const WHAT: &str = "directory bucket";
        block::verify(b, BlockKind::DirBucket, Some(owner), addr)?;
        let next = get_u32(b, BUCKET_OFF_NEXT) as u64;
        if next != 0 && next < OVERFLOW_BASE {
            return Err(FormatError::corrupted(
                WHAT,
                format!("overflow link {next} below the overflow area"),
            ));
        }
        let count = get_u16(b, BUCKET_OFF_COUNT) as usize;
        let used = get_u16(b, BUCKET_OFF_USED) as usize;
        if used > BUCKET_CAPACITY {
            return Err(FormatError::corrupted(
                WHAT,
                format!("used {used} exceeds capacity"),
            ));
        }
        let area = &b[BUCKET_OFF_ENTRIES..BUCKET_OFF_ENTRIES + used];
        let mut entries = Vec::with_capacity(count);
        let mut off = 0;
        while off < used {
            if off + ENTRY_HEADER > used {
                return Err(FormatError::corrupted(
                    WHAT,
                    "entry header crosses the used area",
                ));
            }
            let ino = Ino(get_u32(area, off));
            let dtype = area[off + 4];
            let len = area[off + 5] as usize;
            if off + ENTRY_HEADER + len > used {
                return Err(FormatError::corrupted(
                    WHAT,
                    "entry name crosses the used area",
                ));
            }
            let name = area[off + ENTRY_HEADER..off + ENTRY_HEADER + len].to_vec();
            validate_name(&name).map_err(|e| FormatError::corrupted(WHAT, e))?;
            if ino.0 == 0 || !is_stored_dtype(dtype) {
                return Err(FormatError::corrupted(
                    WHAT,
                    "entry with inode 0 or unknown type",
                ));
            }
            entries.push(DirEntry { ino, dtype, name });
            off += ENTRY_HEADER + len;
        }
        if entries.len() != count {
            return Err(FormatError::corrupted(
                WHAT,
                format!("count {count} but {} entries", entries.len()),
            ));
        }
        if b[BUCKET_OFF_ENTRIES + used..PAYLOAD_SIZE]
            .iter()
            .any(|&x| x != 0)
        {
            return Err(FormatError::corrupted(
                WHAT,
                "bytes past the entries are not zero",
            ));
        }
        Ok(Bucket { next, entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_hashing_addresses_every_bucket() {
        let mut h = DirHeader::new(Ino(1));
        // Grow through several rounds; every hash always lands in an existing bucket, and
        // after a split only the split bucket's entries move, to the new bucket.
        for _ in 0..100 {
            let before: Vec<u64> = (0..5000u32)
                .map(|x| h.bucket_of(x.wrapping_mul(2654435761)))
                .collect();
            let splitting = h.split as u64;
            let new_bucket = h.bucket_count();
            h.split += 1;
            if h.split as u64 == 1u64 << h.level {
                h.level += 1;
                h.split = 0;
            }
            for (i, x) in (0..5000u32).enumerate() {
                let b = h.bucket_of(x.wrapping_mul(2654435761));
                assert!(b < h.bucket_count());
                if before[i] != b {
                    assert_eq!(before[i], splitting);
                    assert_eq!(b, new_bucket);
                }
            }
        }
    }

    fn entry(ino: u32, dtype: u8, name: &[u8]) -> DirEntry {
        DirEntry {
            ino: Ino(ino),
            dtype,
            name: name.to_vec(),
        }
    }

    #[test]
    fn bucket_encode_refuses_what_decode_rejects() {
        let ok = Bucket {
            next: 0,
            entries: vec![entry(3, DT_REG, b"a")],
        };
        ok.encode(Ino(5), BlockAddr(40)).unwrap();
        let bad_entries = [
            entry(0, DT_REG, b"a"),
            entry(3, DT_UNKNOWN, b"a"),
            entry(3, 3, b"a"),
            entry(3, DT_REG, b""),
            entry(3, DT_REG, b"."),
            entry(3, DT_REG, b".."),
            entry(3, DT_REG, b"a/b"),
            entry(3, DT_REG, b"a\0b"),
            entry(3, DT_REG, &[b'x'; 256]),
        ];
        for e in bad_entries {
            let b = Bucket {
                next: 0,
                entries: vec![e.clone()],
            };
            assert!(b.encode(Ino(5), BlockAddr(40)).is_err(), "{e:?}");
        }
        for (next, accepted) in [
            (0, true),
            (1, false),
            (OVERFLOW_BASE - 1, false),
            (OVERFLOW_BASE, true),
            (u32::MAX as u64, true),
            (u32::MAX as u64 + 1, false),
        ] {
            let b = Bucket { next, ..ok.clone() };
            let enc = b.encode(Ino(5), BlockAddr(40));
            assert_eq!(enc.is_ok(), accepted, "next {next}");
            if let Ok(blk) = enc {
                assert_eq!(Bucket::decode(&blk[..], Ino(5), BlockAddr(40)).unwrap(), b);
            }
        }
    }

    #[test]
    fn header_decode_refuses_parent_0_and_overflow_past_u32() {
        let decode = |h: DirHeader| {
            DirHeader::decode(&h.encode(Ino(5), BlockAddr(41))[..], Ino(5), BlockAddr(41))
        };
        let h = DirHeader::new(Ino(1));
        assert!(decode(h).is_ok());
        assert!(decode(DirHeader {
            parent: Ino(0),
            ..h
        })
        .is_err());
        // The last overflow index hands out file block 2^32 - 1; one more would not fit.
        assert_eq!(OVERFLOW_BASE + MAX_OVERFLOW_BLOCKS - 1, u32::MAX as u64);
        let at = |n: u64| DirHeader {
            overflow_next: n as u32,
            ..h
        };
        assert!(decode(at(MAX_OVERFLOW_BLOCKS)).is_ok());
        assert!(decode(at(MAX_OVERFLOW_BLOCKS + 1)).is_err());
        assert!(decode(at(u32::MAX as u64)).is_err());
    }

    #[test]
    fn bucket_round_trip() {
        let mut bk = Bucket {
            next: OVERFLOW_BASE + 3,
            entries: vec![],
        };
        for i in 0..20u32 {
            bk.entries.push(DirEntry {
                ino: Ino(i + 2),
                dtype: DT_REG,
                name: format!("file-{i}").into_bytes(),
            });
        }
        let b = bk.encode(Ino(5), BlockAddr(40)).unwrap();
        assert_eq!(Bucket::decode(&b[..], Ino(5), BlockAddr(40)).unwrap(), bk);
        let hd = DirHeader {
            parent: Ino(1),
            level: 3,
            split: 2,
            entry_count: 99,
            overflow_next: 4,
        };
        let b = hd.encode(Ino(5), BlockAddr(41));
        assert_eq!(
            DirHeader::decode(&b[..], Ino(5), BlockAddr(41)).unwrap(),
            hd
        );
    }
}
