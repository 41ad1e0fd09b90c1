//! Block-map records. Every mapping record on disk goes through `ExtentCodec`, so the
//! width of a block address lives in one place: the codec of a format version (an inode
//! layout) picks the record and extent-block layout.
//!
//! v1 and v2 record (12 bytes): `logical u32 | physical u32 | len u16 | flags u16`.
//! v3 record (16 bytes): `logical u32 | physical u64 | len u16 | flags u16`, where
//! `physical` is below 2^48.
//! Extent block (kind MMEX, owner = inode):
//! ```text
//! v1, v2:    0 next u32 | 4 count u32 | 8 records 12 × 339 | 4076 zero u32 | 4080 tail
//! v3:        0 next u64 | 8 count u32 | 12 zero u32 | 16 records 16 × 254 | 4080 tail
//! ```
//! Records are sorted by logical block and do not overlap; `next` = 0 ends the chain.

use crate::block::{self, BlockAddr, BlockKind, Ino, PAYLOAD_SIZE};
use crate::bytes::*;
use crate::error::{FormatError, Result};
use crate::version::FormatVersion;

/// Bytes of an inode's inline area (`inode::OFF_INLINE`): extent records or a symlink
/// target.
pub const INLINE_SIZE: usize = 144;

/// A run of `len` file blocks starting at file block `logical`, stored at `physical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub len: u32,
    /// Allocated but never written: reads as zeros (fallocate).
    pub unwritten: bool,
}

impl Extent {
    pub fn logical_end(&self) -> u64 {
        self.logical + self.len as u64
    }
    pub fn physical_end(&self) -> u64 {
        self.physical + self.len as u64
    }
}

pub const EXTENT_FLAG_UNWRITTEN: u16 = 1;

/// The versioned encoder of block-map records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentCodec {
    version: FormatVersion,
}

// Record fields. `logical` is at 0 in every version.
pub const REC_OFF_LOGICAL: usize = 0;
pub const REC_V1_OFF_PHYSICAL: usize = REC_OFF_LOGICAL + 4;
pub const REC_V1_OFF_LEN: usize = REC_V1_OFF_PHYSICAL + 4;
pub const REC_V1_OFF_FLAGS: usize = REC_V1_OFF_LEN + 2;
pub(crate) const REC_V1_SIZE: usize = REC_V1_OFF_FLAGS + 2;
pub const REC_V3_OFF_PHYSICAL: usize = REC_OFF_LOGICAL + 4;
pub const REC_V3_OFF_LEN: usize = REC_V3_OFF_PHYSICAL + 8;
pub const REC_V3_OFF_FLAGS: usize = REC_V3_OFF_LEN + 2;
pub(crate) const REC_V3_SIZE: usize = REC_V3_OFF_FLAGS + 2;

// Extent block of v1 and v2.
pub const EXTENT_BLOCK_OFF_NEXT: usize = 0;
pub const EXTENT_BLOCK_OFF_COUNT: usize = EXTENT_BLOCK_OFF_NEXT + 4;
pub const EXTENT_BLOCK_OFF_RECORDS: usize = EXTENT_BLOCK_OFF_COUNT + 4;
// Extent block of v3.
pub const EXTENT_BLOCK_V3_OFF_NEXT: usize = 0;
pub const EXTENT_BLOCK_V3_OFF_COUNT: usize = EXTENT_BLOCK_V3_OFF_NEXT + 8;
pub const EXTENT_BLOCK_V3_OFF_RESERVED: usize = EXTENT_BLOCK_V3_OFF_COUNT + 4;
pub const EXTENT_BLOCK_V3_OFF_RECORDS: usize = EXTENT_BLOCK_V3_OFF_RESERVED + 4;

impl ExtentCodec {
    pub fn for_version(version: FormatVersion) -> ExtentCodec {
        ExtentCodec { version }
    }

    /// The format version (inode layout) whose records this codec writes.
    pub fn version(&self) -> FormatVersion {
        self.version
    }

    /// 48-bit records and extent blocks (v3) instead of 32-bit ones.
    fn wide(&self) -> bool {
        self.version.block_map_address_bits() > 32
    }

    pub fn record_size(&self) -> usize {
        if self.wide() {
            REC_V3_SIZE
        } else {
            REC_V1_SIZE
        }
    }

    /// (physical, len, flags) offsets inside a record.
    fn record_offsets(&self) -> (usize, usize, usize) {
        if self.wide() {
            (REC_V3_OFF_PHYSICAL, REC_V3_OFF_LEN, REC_V3_OFF_FLAGS)
        } else {
            (REC_V1_OFF_PHYSICAL, REC_V1_OFF_LEN, REC_V1_OFF_FLAGS)
        }
    }

    /// (next, count, records) offsets inside an extent block.
    fn block_offsets(&self) -> (usize, usize, usize) {
        if self.wide() {
            (
                EXTENT_BLOCK_V3_OFF_NEXT,
                EXTENT_BLOCK_V3_OFF_COUNT,
                EXTENT_BLOCK_V3_OFF_RECORDS,
            )
        } else {
            (
                EXTENT_BLOCK_OFF_NEXT,
                EXTENT_BLOCK_OFF_COUNT,
                EXTENT_BLOCK_OFF_RECORDS,
            )
        }
    }

    /// Offset of the first record in an extent block.
    pub(crate) fn records_offset(&self) -> usize {
        self.block_offsets().2
    }

    /// Longest extent one record can describe.
    pub fn max_len(&self) -> u32 {
        u16::MAX as u32
    }

    /// Largest block address a record can hold.
    pub fn max_address(&self) -> u64 {
        (1u64 << self.version.block_map_address_bits()) - 1
    }

    /// Records the inode's inline area holds: as many whole records as fit in it.
    pub fn inline_capacity(&self) -> usize {
        INLINE_SIZE / self.record_size()
    }

    pub fn records_per_block(&self) -> usize {
        (PAYLOAD_SIZE - self.records_offset()) / self.record_size()
    }

    /// Whether `e` fits a record: a length in `1 ..= max_len`, the file run ending at or
    /// below 2^32 (file block numbers are u32) and the image run at or below
    /// `max_address + 1`.
    fn fits(&self, e: &Extent) -> bool {
        e.len != 0
            && e.len <= self.max_len()
            && e.logical
                .checked_add(e.len as u64)
                .is_some_and(|end| end <= u32::MAX as u64 + 1)
            && e.physical
                .checked_add(e.len as u64)
                .is_some_and(|end| end <= self.max_address() + 1)
    }

    /// Encodes one record into the first `record_size` bytes of `out`.
    pub fn encode(&self, e: &Extent, out: &mut [u8]) -> Result<()> {
        if !self.fits(e) {
            return Err(FormatError::corrupted(
                "extent",
                format!("{e:?} does not fit a v{} record", self.version.0),
            ));
        }
        if out.len() < self.record_size() {
            return Err(FormatError::Full { what: "extent" });
        }
        let (phys, len, flags) = self.record_offsets();
        put_u32(out, REC_OFF_LOGICAL, e.logical as u32);
        if self.wide() {
            put_u64(out, phys, e.physical);
        } else {
            put_u32(out, phys, e.physical as u32);
        }
        put_u16(out, len, e.len as u16);
        put_u16(
            out,
            flags,
            if e.unwritten {
                EXTENT_FLAG_UNWRITTEN
            } else {
                0
            },
        );
        Ok(())
    }

    /// Decodes the record at the start of `b`.
    pub fn decode(&self, b: &[u8]) -> Result<Extent> {
        if b.len() < self.record_size() {
            return Err(FormatError::Truncated {
                what: "extent",
                len: b.len(),
                need: self.record_size(),
            });
        }
        let (phys, len, flags_at) = self.record_offsets();
        let flags = get_u16(b, flags_at);
        if flags & !EXTENT_FLAG_UNWRITTEN != 0 {
            return Err(FormatError::corrupted(
                "extent",
                format!("unknown flags {flags:#x}"),
            ));
        }
        let e = Extent {
            logical: get_u32(b, REC_OFF_LOGICAL) as u64,
            physical: if self.wide() {
                get_u64(b, phys)
            } else {
                get_u32(b, phys) as u64
            },
            len: get_u16(b, len) as u32,
            unwritten: flags & EXTENT_FLAG_UNWRITTEN != 0,
        };
        if e.len == 0 {
            return Err(FormatError::corrupted("extent", "zero-length extent"));
        }
        if !self.fits(&e) {
            return Err(FormatError::corrupted(
                "extent",
                format!("{e:?} runs past the end of the address space"),
            ));
        }
        Ok(e)
    }

    /// Decodes `count` records from `b`, checking they are sorted and disjoint.
    pub(crate) fn decode_list(
        &self,
        b: &[u8],
        count: usize,
        what: &'static str,
    ) -> Result<Vec<Extent>> {
        let rs = self.record_size();
        if count.checked_mul(rs).is_none_or(|n| n > b.len()) {
            return Err(FormatError::corrupted(
                what,
                format!("{count} extents do not fit"),
            ));
        }
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let e = self.decode(&b[i * rs..(i + 1) * rs])?;
            if let Some(prev) = out.last() {
                let prev: &Extent = prev;
                if e.logical < prev.logical_end() {
                    return Err(FormatError::corrupted(
                        what,
                        "extents overlap or are unsorted",
                    ));
                }
            }
            out.push(e);
        }
        Ok(out)
    }

    /// Encodes `extents` packed from the start of `b`, zeroing the rest. Refuses what
    /// `decode_list` rejects: records that do not fit, unsorted or overlapping runs.
    pub(crate) fn encode_list(&self, extents: &[Extent], b: &mut [u8]) -> Result<()> {
        let rs = self.record_size();
        if extents.len() * rs > b.len() {
            return Err(FormatError::Full {
                what: "extent list",
            });
        }
        if extents
            .windows(2)
            .any(|w| w[1].logical < w[0].logical.saturating_add(w[0].len as u64))
        {
            return Err(FormatError::corrupted(
                "extent list",
                "extents overlap or are unsorted",
            ));
        }
        b.fill(0);
        for (i, e) in extents.iter().enumerate() {
            self.encode(e, &mut b[i * rs..(i + 1) * rs])?;
        }
        Ok(())
    }

    /// Encodes one extent block holding `extents`, chained to `next` (0 = last).
    pub fn encode_block(
        &self,
        owner: Ino,
        addr: BlockAddr,
        next: u64,
        extents: &[Extent],
    ) -> Result<Box<crate::block::Block>> {
        if extents.len() > self.records_per_block() {
            return Err(FormatError::Full {
                what: "extent block",
            });
        }
        if next > self.max_address() {
            return Err(FormatError::corrupted(
                "extent block",
                "next address too wide",
            ));
        }
        let (off_next, off_count, off_records) = self.block_offsets();
        let mut b = block::zeroed();
        if self.wide() {
            put_u64(&mut b[..], off_next, next);
        } else {
            put_u32(&mut b[..], off_next, next as u32);
        }
        put_u32(&mut b[..], off_count, extents.len() as u32);
        self.encode_list(extents, &mut b[off_records..PAYLOAD_SIZE])?;
        block::seal(&mut b[..], BlockKind::ExtentBlock, owner, addr);
        Ok(b)
    }

    /// Decodes an extent block: `(next, extents)`.
    pub fn decode_block(
        &self,
        b: &[u8],
        owner: Ino,
        addr: BlockAddr,
    ) -> Result<(u64, Vec<Extent>)> {
        block::verify(b, BlockKind::ExtentBlock, Some(owner), addr)?;
        let (off_next, off_count, off_records) = self.block_offsets();
        let next = if self.wide() {
            get_u64(b, off_next)
        } else {
            get_u32(b, off_next) as u64
        };
        if next > self.max_address() {
            return Err(FormatError::corrupted(
                "extent block",
                "next address too wide",
            ));
        }
        // v3's u32 between `count` and the records.
        if b[off_count + 4..off_records].iter().any(|&x| x != 0) {
            return Err(FormatError::corrupted(
                "extent block",
                "reserved bytes are not zero",
            ));
        }
        let count = get_u32(b, off_count) as usize;
        if count > self.records_per_block() {
            return Err(FormatError::corrupted(
                "extent block",
                format!("count {count} too large"),
            ));
        }
        let extents = self.decode_list(&b[off_records..PAYLOAD_SIZE], count, "extent block")?;
        let used = off_records + count * self.record_size();
        if b[used..PAYLOAD_SIZE].iter().any(|&x| x != 0) {
            return Err(FormatError::corrupted(
                "extent block",
                "bytes past the records are not zero",
            ));
        }
        Ok((next, extents))
    }
}

const _: () = assert!(REC_V1_SIZE == 12 && REC_V3_SIZE == 16);
// v3 records fill an extent block exactly; v1's leave 4 zero bytes.
const _: () = assert!(EXTENT_BLOCK_V3_OFF_RECORDS + 254 * REC_V3_SIZE == PAYLOAD_SIZE);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn record_round_trip(logical in 0u64..u32::MAX as u64 - 70000, physical in 0u64..u32::MAX as u64 - 70000,
                             len in 1u32..=65535, unwritten: bool) {
            let c = ExtentCodec::for_version(FormatVersion::V1);
            let e = Extent { logical, physical, len, unwritten };
            let mut b = [0u8; 12];
            c.encode(&e, &mut b).unwrap();
            prop_assert_eq!(c.decode(&b).unwrap(), e);
        }
    }

    proptest! {
        #[test]
        fn v3_record_round_trip(logical in 0u64..u32::MAX as u64 - 70000,
                                physical in 0u64..(1u64 << 48) - 70000,
                                len in 1u32..=65535, unwritten: bool) {
            let c = ExtentCodec::for_version(FormatVersion::V3);
            let e = Extent { logical, physical, len, unwritten };
            let mut b = [0u8; 16];
            c.encode(&e, &mut b).unwrap();
            prop_assert_eq!(c.decode(&b).unwrap(), e);
        }
    }

    #[test]
    fn layouts_per_version() {
        let v = |n| ExtentCodec::for_version(FormatVersion(n));
        // (record size, inline records, records per block, largest address)
        assert_eq!(
            (1..=3)
                .map(|n| (
                    v(n).record_size(),
                    v(n).inline_capacity(),
                    v(n).records_per_block(),
                    v(n).max_address()
                ))
                .collect::<Vec<_>>(),
            vec![
                (12, 12, 339, u32::MAX as u64),
                (12, 12, 339, u32::MAX as u64),
                (16, 9, 254, (1 << 48) - 1)
            ]
        );
    }

    #[test]
    fn v3_takes_48_bit_addresses_and_no_more() {
        let c = ExtentCodec::for_version(FormatVersion::V3);
        let mut b = [0u8; 16];
        let e = Extent {
            logical: 7,
            physical: (1 << 48) - 10,
            len: 10,
            unwritten: true,
        };
        c.encode(&e, &mut b).unwrap();
        assert_eq!(get_u64(&b, REC_V3_OFF_PHYSICAL), e.physical);
        assert_eq!(get_u16(&b, REC_V3_OFF_LEN), 10);
        assert_eq!(get_u16(&b, REC_V3_OFF_FLAGS), EXTENT_FLAG_UNWRITTEN);
        assert_eq!(c.decode(&b).unwrap(), e);
        assert!(c.encode(&Extent { len: 11, ..e }, &mut b).is_err());
        put_u64(&mut b, REC_V3_OFF_PHYSICAL, 1 << 48);
        assert!(c.decode(&b).is_err());
        // Short slices and absurd counts are errors, not panics.
        assert!(c.decode(&b[..15]).is_err());
        assert!(c.decode_list(&b, usize::MAX, "t").is_err());
        assert!(c.encode(&Extent { len: 1, ..e }, &mut [0u8; 15]).is_err());
        assert!(ExtentCodec::for_version(FormatVersion::V1)
            .decode(&[0u8; 11])
            .is_err());
    }

    #[test]
    fn v3_block_round_trip_and_wide_next() {
        let c = ExtentCodec::for_version(FormatVersion::V3);
        let ex: Vec<Extent> = (0..c.records_per_block() as u64)
            .map(|i| Extent {
                logical: i * 10,
                physical: (1 << 40) + i * 10,
                len: 5,
                unwritten: i % 2 == 1,
            })
            .collect();
        let next = (1u64 << 47) + 3;
        let b = c.encode_block(Ino(9), BlockAddr(77), next, &ex).unwrap();
        assert_eq!(get_u64(&b[..], EXTENT_BLOCK_V3_OFF_NEXT), next);
        assert_eq!(
            c.decode_block(&b[..], Ino(9), BlockAddr(77)).unwrap(),
            (next, ex.clone())
        );
        assert!(c
            .encode_block(Ino(9), BlockAddr(77), 1 << 48, &ex[..1])
            .is_err());
        // The reserved u32 after `count` must be zero.
        let mut bad = c.encode_block(Ino(9), BlockAddr(77), 0, &ex[..1]).unwrap();
        bad[EXTENT_BLOCK_V3_OFF_RESERVED] = 1;
        block::seal(&mut bad[..], BlockKind::ExtentBlock, Ino(9), BlockAddr(77));
        assert!(c.decode_block(&bad[..], Ino(9), BlockAddr(77)).is_err());
        // A v3 block does not read as a v1 block and the other way round.
        let v1 = ExtentCodec::for_version(FormatVersion::V1);
        let b = c.encode_block(Ino(9), BlockAddr(77), 0, &ex[..3]).unwrap();
        assert!(v1.decode_block(&b[..], Ino(9), BlockAddr(77)).is_err());
    }

    #[test]
    fn v1_refuses_wide_addresses() {
        let c = ExtentCodec::for_version(FormatVersion::V1);
        let e = Extent {
            logical: 0,
            physical: 1 << 32,
            len: 1,
            unwritten: false,
        };
        assert!(c.encode(&e, &mut [0u8; 12]).is_err());
    }

    #[test]
    fn decode_refuses_runs_past_the_address_space() {
        let c = ExtentCodec::for_version(FormatVersion::V1);
        let rec = |logical: u32, physical: u32, len: u16| {
            let mut b = [0u8; 12];
            put_u32(&mut b, 0, logical);
            put_u32(&mut b, 4, physical);
            put_u16(&mut b, 8, len);
            b
        };
        // Ending exactly at 2^32 is fine, one block further is not, on either side.
        let last = u32::MAX - 9;
        assert_eq!(c.decode(&rec(last, 7, 10)).unwrap().logical_end(), 1 << 32);
        assert_eq!(c.decode(&rec(7, last, 10)).unwrap().physical_end(), 1 << 32);
        assert!(c.decode(&rec(last, 7, 11)).is_err());
        assert!(c.decode(&rec(7, last, 11)).is_err());
        assert!(c.decode(&rec(u32::MAX, u32::MAX, u16::MAX)).is_err());
        // encode agrees on the same boundary.
        let e = Extent {
            logical: last as u64,
            physical: 7,
            len: 11,
            unwritten: false,
        };
        assert!(c.encode(&e, &mut [0u8; 12]).is_err());
        assert!(c.encode(&Extent { len: 10, ..e }, &mut [0u8; 12]).is_ok());
    }

    #[test]
    fn encode_list_refuses_what_decode_list_rejects() {
        let c = ExtentCodec::for_version(FormatVersion::V1);
        let e = |logical: u64, len: u32| Extent {
            logical,
            physical: 500,
            len,
            unwritten: false,
        };
        let mut b = [0u8; 48];
        c.encode_list(&[e(0, 2), e(2, 1)], &mut b).unwrap();
        assert!(c.encode_list(&[e(0, 3), e(2, 1)], &mut b).is_err());
        assert!(c.encode_list(&[e(4, 1), e(2, 1)], &mut b).is_err());
        assert!(c.encode_list(&[e(u64::MAX, 1)], &mut b).is_err());
        assert!(c
            .encode_block(Ino(1), BlockAddr(2), 0, &[e(9, 1), e(0, 1)])
            .is_err());
    }

    #[test]
    fn block_round_trip() {
        let c = ExtentCodec::for_version(FormatVersion::V1);
        let ex: Vec<Extent> = (0..c.records_per_block() as u64)
            .map(|i| Extent {
                logical: i * 10,
                physical: 1000 + i * 10,
                len: 5,
                unwritten: i % 2 == 0,
            })
            .collect();
        let b = c.encode_block(Ino(9), BlockAddr(77), 78, &ex).unwrap();
        assert_eq!(
            c.decode_block(&b[..], Ino(9), BlockAddr(77)).unwrap(),
            (78, ex)
        );
    }
}
