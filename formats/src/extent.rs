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

    pub fn records_per_block(&self) -> usize {
        (PAYLOAD_SIZE - EXTENT_BLOCK_OFF_RECORDS) / self.record_size()
    }

    pub fn encode(&self, e: &Extent, out: &mut [u8]) -> Result<()> {
        if e.len == 0
            || e.len > self.max_len()
            || e.logical_end() > u32::MAX as u64 + 1
            || e.physical_end() > self.max_address() + 1
        {
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

    pub fn encode_list(&self, extents: &[Extent], b: &mut [u8]) -> Result<()> {
        let rs = self.record_size();
        if extents.len() * rs > b.len() {
            return Err(FormatError::Full {
                what: "extent list",
            });
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
