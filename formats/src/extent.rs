//! Block-map records. Every mapping record on disk goes through `ExtentCodec`, so a later
//! format version can widen block addresses in one place.
//!
//! v1 record (12 bytes): `logical u32 | physical u32 | len u16 | flags u16`.
//! Extent block (kind MMEX, owner = inode):
//! ```text
//!    0 4 next    address of the next extent block, 0 = last
//!    4 4 count   records in this block
//!    8 12*count  records, sorted by logical block, not overlapping
//! 4080 16 tail
//! ```

use crate::block::{self, BlockAddr, BlockKind, Ino, PAYLOAD_SIZE};
use crate::bytes::*;
use crate::error::{FormatError, Result};
use crate::version::FormatVersion;

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

pub const EXTENT_BLOCK_OFF_NEXT: usize = 0;
pub const EXTENT_BLOCK_OFF_COUNT: usize = EXTENT_BLOCK_OFF_NEXT + 4;
pub const EXTENT_BLOCK_OFF_RECORDS: usize = EXTENT_BLOCK_OFF_COUNT + 4;

impl ExtentCodec {
    pub fn for_version(version: FormatVersion) -> ExtentCodec {
        ExtentCodec { version }
    }

    pub fn record_size(&self) -> usize {
        12
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
        crate::inode::INLINE_SIZE / self.record_size()
    }

    pub fn records_per_block(&self) -> usize {
        (PAYLOAD_SIZE - EXTENT_BLOCK_OFF_RECORDS) / self.record_size()
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

    pub fn encode(&self, e: &Extent, out: &mut [u8]) -> Result<()> {
        if !self.fits(e) {
            return Err(FormatError::corrupted(
                "extent",
                format!("{e:?} does not fit a v{} record", self.version.0),
            ));
        }
        put_u32(out, 0, e.logical as u32);
        put_u32(out, 4, e.physical as u32);
        put_u16(out, 8, e.len as u16);
        put_u16(
            out,
            10,
            if e.unwritten {
                EXTENT_FLAG_UNWRITTEN
            } else {
                0
            },
        );
        Ok(())
    }

    pub fn decode(&self, b: &[u8]) -> Result<Extent> {
        let flags = get_u16(b, 10);
        if flags & !EXTENT_FLAG_UNWRITTEN != 0 {
            return Err(FormatError::corrupted(
                "extent",
                format!("unknown flags {flags:#x}"),
            ));
        }
        let e = Extent {
            logical: get_u32(b, 0) as u64,
            physical: get_u32(b, 4) as u64,
            len: get_u16(b, 8) as u32,
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
    pub fn decode_list(&self, b: &[u8], count: usize, what: &'static str) -> Result<Vec<Extent>> {
        let rs = self.record_size();
        if count * rs > b.len() {
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
    pub fn encode_list(&self, extents: &[Extent], b: &mut [u8]) -> Result<()> {
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
        let mut b = block::zeroed();
        put_u32(&mut b[..], EXTENT_BLOCK_OFF_NEXT, next as u32);
        put_u32(&mut b[..], EXTENT_BLOCK_OFF_COUNT, extents.len() as u32);
        self.encode_list(extents, &mut b[EXTENT_BLOCK_OFF_RECORDS..PAYLOAD_SIZE])?;
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
        let next = get_u32(b, EXTENT_BLOCK_OFF_NEXT) as u64;
        let count = get_u32(b, EXTENT_BLOCK_OFF_COUNT) as usize;
        if count > self.records_per_block() {
            return Err(FormatError::corrupted(
                "extent block",
                format!("count {count} too large"),
            ));
        }
        let extents = self.decode_list(
            &b[EXTENT_BLOCK_OFF_RECORDS..PAYLOAD_SIZE],
            count,
            "extent block",
        )?;
        let used = EXTENT_BLOCK_OFF_RECORDS + count * self.record_size();
        if b[used..PAYLOAD_SIZE].iter().any(|&x| x != 0) {
            return Err(FormatError::corrupted(
                "extent block",
                "bytes past the records are not zero",
            ));
        }
        Ok((next, extents))
    }
}

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
