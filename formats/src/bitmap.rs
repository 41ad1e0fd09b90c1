//! Allocation bitmaps (kind MMIB for inodes, MMBB for blocks). Each block covers
//! `BITS_PER_BITMAP_BLOCK` items; bit `i` of the map is bit `i % 8` (LSB first) of byte
//! `i / 8`. A set bit means in use. Bits past the last item are set, so the allocator never
//! hands them out, and inode 0 is set (never allocated).

use crate::block::{self, BlockAddr, BlockKind, Ino, PAYLOAD_SIZE};
use crate::error::Result;

pub fn get_bit(payload: &[u8], i: usize) -> bool {
    payload[i / 8] & (1 << (i % 8)) != 0
}

pub fn set_bit(payload: &mut [u8], i: usize, v: bool) {
    if v {
        payload[i / 8] |= 1 << (i % 8);
    } else {
        payload[i / 8] &= !(1 << (i % 8));
    }
}

pub fn encode(kind: BlockKind, payload: &[u8], addr: BlockAddr) -> Box<block::Block> {
    let mut b = block::zeroed();
    b[..PAYLOAD_SIZE].copy_from_slice(&payload[..PAYLOAD_SIZE]);
    block::seal(&mut b[..], kind, Ino(0), addr);
    b
}

/// Verifies a bitmap block and returns its payload (the bits).
pub fn decode(kind: BlockKind, b: &[u8], addr: BlockAddr) -> Result<&[u8]> {
    block::verify(b, kind, Some(Ino(0)), addr)?;
    Ok(&b[..PAYLOAD_SIZE])
}
