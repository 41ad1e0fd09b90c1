//! The metadata journal: a write-ahead log of whole metadata blocks.
//!
//! The region is `journal_blocks` blocks from `journal_start`. Its first block is the journal
//! superblock; transactions are written from journal block 1 onwards, back to back:
//! a descriptor, the `count` block images it lists, then a commit block.
//!
//! Journal superblock (kind MMJS, owner 0):
//! ```text
//!  0 4 version   1
//!  4 4 blocks    size of the journal region
//!  8 8 sequence  sequence number of the transaction at journal block 1
//! ```
//! Descriptor (kind MMJD): `0 sequence u64 | 8 count u32 | 12 zero u32 | 16 targets u64 × count`,
//! then zeros; each target listed once.
//! Commit (kind MMJC): `0 sequence u64 | 8 count u32 | 12 data_crc u32`, then zeros, where
//! `data_crc` is the CRC-32 of the descriptor block followed by every block image, in order.
//! Readers reject non-zero reserved bytes in all three blocks.
//!
//! Replay applies complete transactions with consecutive sequence numbers from journal
//! block 1 and stops at the first block that is not the expected descriptor or whose commit
//! does not match: a torn transaction is never applied. Resetting the journal (after every
//! in-place write is flushed) rewrites the superblock with the next sequence number, which
//! retires everything written before.

use crate::block::{self, BlockAddr, BlockKind, Ino, PAYLOAD_SIZE};
use crate::bytes::*;
use crate::error::{FormatError, Result};

pub const JOURNAL_VERSION: u32 = 1;
pub const JSB_OFF_VERSION: usize = 0;
pub const JSB_OFF_BLOCKS: usize = JSB_OFF_VERSION + 4;
pub const JSB_OFF_SEQUENCE: usize = JSB_OFF_BLOCKS + 4;
pub const JSB_FIELDS_END: usize = JSB_OFF_SEQUENCE + 8;

pub const DESC_OFF_SEQUENCE: usize = 0;
pub const DESC_OFF_COUNT: usize = DESC_OFF_SEQUENCE + 8;
/// A u32 of zeros that aligns the targets.
pub const DESC_OFF_RESERVED: usize = DESC_OFF_COUNT + 4;
pub const DESC_OFF_TARGETS: usize = DESC_OFF_RESERVED + 4;
/// Most blocks one transaction can carry.
pub const MAX_TX_BLOCKS: usize = (PAYLOAD_SIZE - DESC_OFF_TARGETS) / 8;

pub const COMMIT_OFF_SEQUENCE: usize = 0;
pub const COMMIT_OFF_COUNT: usize = COMMIT_OFF_SEQUENCE + 8;
pub const COMMIT_OFF_DATA_CRC: usize = COMMIT_OFF_COUNT + 4;
pub const COMMIT_FIELDS_END: usize = COMMIT_OFF_DATA_CRC + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalSuper {
    pub blocks: u32,
    pub sequence: u64,
}

impl JournalSuper {
    pub fn encode(&self, addr: BlockAddr) -> Box<block::Block> {
        let mut b = block::zeroed();
        put_u32(&mut b[..], JSB_OFF_VERSION, JOURNAL_VERSION);
        put_u32(&mut b[..], JSB_OFF_BLOCKS, self.blocks);
        put_u64(&mut b[..], JSB_OFF_SEQUENCE, self.sequence);
        block::seal(&mut b[..], BlockKind::JournalSuper, Ino(0), addr);
        b
    }

    pub fn decode(b: &[u8], addr: BlockAddr) -> Result<JournalSuper> {
        const WHAT: &str = "journal superblock";
        block::verify(b, BlockKind::JournalSuper, Some(Ino(0)), addr)?;
        let v = get_u32(b, JSB_OFF_VERSION);
        if v != JOURNAL_VERSION {
            return Err(FormatError::UnsupportedVersion {
                what: WHAT,
                found: v,
                supported: JOURNAL_VERSION,
            });
        }
        if b[JSB_FIELDS_END..block::TAIL_KIND].iter().any(|&x| x != 0) {
            return Err(FormatError::corrupted(WHAT, "reserved bytes are not zero"));
        }
        Ok(JournalSuper {
            blocks: get_u32(b, JSB_OFF_BLOCKS),
            sequence: get_u64(b, JSB_OFF_SEQUENCE),
        })
    }
}

impl JournalSuper {
    /// Decodes a journal superblock, accepting one a power cut tore while the journal was
    /// being reset. A reset rewrites only `sequence` (first sector) and the checksum (last
    /// sector), and a torn write keeps a prefix of the new block, so a torn one is a valid
    /// journal superblock in every byte but its checksum, carrying the new sequence. That
    /// sequence is safe to scan with: a reset is written only once every block the log
    /// carries is durable in place, and is flushed before anything is logged after it.
    pub fn decode_allowing_torn_reset(b: &[u8], addr: BlockAddr) -> Result<JournalSuper> {
        let strict = JournalSuper::decode(b, addr);
        if strict.is_ok() || b.len() != block::BLOCK_SIZE {
            return strict;
        }
        let fields = JournalSuper {
            blocks: get_u32(b, JSB_OFF_BLOCKS),
            sequence: get_u64(b, JSB_OFF_SEQUENCE),
        };
        let sealed = fields.encode(addr);
        if get_u32(b, JSB_OFF_VERSION) == JOURNAL_VERSION
            && sealed[..block::TAIL_CRC] == b[..block::TAIL_CRC]
        {
            Ok(fields)
        } else {
            strict
        }
    }
}

pub fn encode_descriptor(
    sequence: u64,
    targets: &[u64],
    addr: BlockAddr,
) -> Result<Box<block::Block>> {
    if targets.is_empty() || targets.len() > MAX_TX_BLOCKS {
        return Err(FormatError::Full {
            what: "journal descriptor",
        });
    }
    if has_duplicates(targets) {
        return Err(FormatError::corrupted(
            "journal descriptor",
            "a target is listed twice",
        ));
    }
    let mut b = block::zeroed();
    put_u64(&mut b[..], DESC_OFF_SEQUENCE, sequence);
    put_u32(&mut b[..], DESC_OFF_COUNT, targets.len() as u32);
    for (i, t) in targets.iter().enumerate() {
        put_u64(&mut b[..], DESC_OFF_TARGETS + 8 * i, *t);
    }
    block::seal(&mut b[..], BlockKind::JournalDesc, Ino(0), addr);
    Ok(b)
}

fn has_duplicates(targets: &[u64]) -> bool {
    let mut sorted = targets.to_vec();
    sorted.sort_unstable();
    sorted.windows(2).any(|w| w[0] == w[1])
}

/// Decodes a descriptor: `(sequence, targets)`. Any failure means "end of the log".
pub fn decode_descriptor(b: &[u8], addr: BlockAddr) -> Result<(u64, Vec<u64>)> {
    const WHAT: &str = "journal descriptor";
    block::verify(b, BlockKind::JournalDesc, Some(Ino(0)), addr)?;
    let seq = get_u64(b, DESC_OFF_SEQUENCE);
    let count = get_u32(b, DESC_OFF_COUNT) as usize;
    if count == 0 || count > MAX_TX_BLOCKS {
        return Err(FormatError::corrupted(WHAT, "bad count"));
    }
    if get_u32(b, DESC_OFF_RESERVED) != 0 {
        return Err(FormatError::corrupted(WHAT, "reserved bytes are not zero"));
    }
    let end = DESC_OFF_TARGETS + 8 * count;
    if b[end..block::TAIL_KIND].iter().any(|&x| x != 0) {
        return Err(FormatError::corrupted(
            WHAT,
            "bytes past the targets are not zero",
        ));
    }
    let targets: Vec<u64> = (0..count)
        .map(|i| get_u64(b, DESC_OFF_TARGETS + 8 * i))
        .collect();
    if has_duplicates(&targets) {
        return Err(FormatError::corrupted(WHAT, "a target is listed twice"));
    }
    Ok((seq, targets))
}

pub fn encode_commit(
    sequence: u64,
    count: u32,
    data_crc: u32,
    addr: BlockAddr,
) -> Box<block::Block> {
    let mut b = block::zeroed();
    put_u64(&mut b[..], COMMIT_OFF_SEQUENCE, sequence);
    put_u32(&mut b[..], COMMIT_OFF_COUNT, count);
    put_u32(&mut b[..], COMMIT_OFF_DATA_CRC, data_crc);
    block::seal(&mut b[..], BlockKind::JournalCommit, Ino(0), addr);
    b
}

/// Decodes a commit block: `(sequence, count, data_crc)`.
pub fn decode_commit(b: &[u8], addr: BlockAddr) -> Result<(u64, u32, u32)> {
    block::verify(b, BlockKind::JournalCommit, Some(Ino(0)), addr)?;
    if b[COMMIT_FIELDS_END..block::TAIL_KIND]
        .iter()
        .any(|&x| x != 0)
    {
        return Err(FormatError::corrupted(
            "journal commit",
            "reserved bytes are not zero",
        ));
    }
    Ok((
        get_u64(b, COMMIT_OFF_SEQUENCE),
        get_u32(b, COMMIT_OFF_COUNT),
        get_u32(b, COMMIT_OFF_DATA_CRC),
    ))
}

/// Journal blocks a transaction of `n` block images occupies.
pub fn tx_footprint(n: usize) -> u64 {
    n as u64 + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `b` after `f`, resealed as a block of `kind` at `addr`.
    fn edited(
        b: &block::Block,
        kind: BlockKind,
        addr: BlockAddr,
        f: impl FnOnce(&mut [u8]),
    ) -> Box<block::Block> {
        let mut c = Box::new(*b);
        f(&mut c[..]);
        block::seal(&mut c[..], kind, Ino(0), addr);
        c
    }

    #[test]
    fn descriptor_is_as_strict_as_the_journal_superblock() {
        let addr = BlockAddr(5);
        let d = encode_descriptor(9, &[10, 20, 30], addr).unwrap();
        assert_eq!(
            decode_descriptor(&d[..], addr).unwrap(),
            (9, vec![10, 20, 30])
        );
        let desc = |f: &dyn Fn(&mut [u8])| {
            decode_descriptor(&edited(&d, BlockKind::JournalDesc, addr, f)[..], addr)
        };
        // The pad, every byte after the last target, and a repeated target are refused.
        assert!(desc(&|b| b[DESC_OFF_RESERVED + 3] = 1).is_err());
        assert!(desc(&|b| b[DESC_OFF_TARGETS + 8 * 3] = 1).is_err());
        assert!(desc(&|b| b[block::TAIL_KIND - 1] = 1).is_err());
        assert!(desc(&|b| put_u64(b, DESC_OFF_TARGETS + 16, 10)).is_err());
        // The encoder refuses a repeated target.
        assert!(encode_descriptor(9, &[10, 20, 10], addr).is_err());
    }

    #[test]
    fn commit_reserved_bytes_are_zero() {
        let addr = BlockAddr(6);
        let c = encode_commit(9, 3, 0xDEAD_BEEF, addr);
        assert_eq!(decode_commit(&c[..], addr).unwrap(), (9, 3, 0xDEAD_BEEF));
        for off in [COMMIT_FIELDS_END, block::TAIL_KIND - 1] {
            let bad = edited(&c, BlockKind::JournalCommit, addr, |b| b[off] = 0x80);
            assert!(decode_commit(&bad[..], addr).is_err(), "offset {off}");
        }
    }
}
