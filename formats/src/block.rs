//! The metadata block tail shared by every checksummed block except inode-table blocks
//! (whose inodes carry their own checksums).
//!
//! ```text
//! 4080 kind   u32   BlockKind magic
//! 4084 owner  u32   owning inode number, 0 for filesystem-wide blocks
//! 4088 addr   u32   the block's own address (low 32 bits): catches misdirected writes
//! 4092 crc    u32   CRC-32 of bytes 0..4092
//! ```

use crate::bytes::{get_u32, put_u32};
use crate::error::{FormatError, Result};

/// Size of every block of a Molt image, in bytes.
pub const BLOCK_SIZE: usize = 4096;

pub const TAIL_SIZE: usize = 16;
pub const TAIL_KIND: usize = BLOCK_SIZE - TAIL_SIZE;
pub const TAIL_OWNER: usize = TAIL_KIND + 4;
pub const TAIL_ADDR: usize = TAIL_OWNER + 4;
pub const TAIL_CRC: usize = TAIL_ADDR + 4;
/// Bytes of a tailed block available to its payload.
pub const PAYLOAD_SIZE: usize = TAIL_KIND;

/// A block address on the image, in units of `BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BlockAddr(pub u64);

/// Inode number. 0 is never a valid inode; 1 is the root directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ino(pub u32);

pub type Block = [u8; BLOCK_SIZE];

/// What a tailed block holds; the values are its magic numbers on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum BlockKind {
    Superblock = 0x5055_534D,    // "MSUP"
    JournalSuper = 0x534A_4D4D,  // "MMJS"
    JournalDesc = 0x444A_4D4D,   // "MMJD"
    JournalCommit = 0x434A_4D4D, // "MMJC"
    InodeBitmap = 0x4249_4D4D,   // "MMIB"
    BlockBitmap = 0x4242_4D4D,   // "MMBB"
    ExtentBlock = 0x5845_4D4D,   // "MMEX"
    DirHeader = 0x4844_4D4D,     // "MMDH"
    DirBucket = 0x4244_4D4D,     // "MMDB"
    XattrBlock = 0x4158_4D4D,    // "MMXA"
}

impl BlockKind {
    pub fn name(self) -> &'static str {
        match self {
            BlockKind::Superblock => "superblock",
            BlockKind::JournalSuper => "journal superblock",
            BlockKind::JournalDesc => "journal descriptor",
            BlockKind::JournalCommit => "journal commit",
            BlockKind::InodeBitmap => "inode bitmap",
            BlockKind::BlockBitmap => "block bitmap",
            BlockKind::ExtentBlock => "extent block",
            BlockKind::DirHeader => "directory header",
            BlockKind::DirBucket => "directory bucket",
            BlockKind::XattrBlock => "xattr block",
        }
    }
}

/// Writes the tail of `block`: kind, owner, its own address and the checksum.
pub fn seal(block: &mut [u8], kind: BlockKind, owner: Ino, addr: BlockAddr) {
    assert_eq!(block.len(), BLOCK_SIZE);
    put_u32(block, TAIL_KIND, kind as u32);
    put_u32(block, TAIL_OWNER, owner.0);
    put_u32(block, TAIL_ADDR, addr.0 as u32);
    let crc = crc32fast::hash(&block[..TAIL_CRC]);
    put_u32(block, TAIL_CRC, crc);
}

/// Checks the tail of `block` against what the reader expects to find at `addr`.
/// `owner` of `None` accepts any owner (the caller checks it itself).
pub fn verify(block: &[u8], kind: BlockKind, owner: Option<Ino>, addr: BlockAddr) -> Result<()> {
    let what = kind.name();
    if block.len() != BLOCK_SIZE {
        return Err(FormatError::Truncated {
            what,
            len: block.len(),
            need: BLOCK_SIZE,
        });
    }
    let stored = get_u32(block, TAIL_CRC);
    let computed = crc32fast::hash(&block[..TAIL_CRC]);
    if stored != computed {
        return Err(FormatError::Checksum {
            what,
            stored,
            computed,
        });
    }
    let found = get_u32(block, TAIL_KIND);
    if found != kind as u32 {
        return Err(FormatError::BadMagic {
            what,
            found: found as u64,
        });
    }
    let stored_addr = get_u32(block, TAIL_ADDR);
    if stored_addr != addr.0 as u32 {
        return Err(FormatError::corrupted(
            what,
            format!("block claims address {stored_addr}, read from {}", addr.0),
        ));
    }
    if let Some(owner) = owner {
        let stored_owner = get_u32(block, TAIL_OWNER);
        if stored_owner != owner.0 {
            return Err(FormatError::corrupted(
                what,
                format!("block owned by inode {stored_owner}, expected {}", owner.0),
            ));
        }
    }
    Ok(())
}

/// The owner recorded in a tail (meaningful only after `verify`).
pub fn owner_of(block: &[u8]) -> Ino {
    Ino(get_u32(block, TAIL_OWNER))
}

pub fn zeroed() -> Box<Block> {
    Box::new([0u8; BLOCK_SIZE])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_verify_and_every_flip_is_caught() {
        let mut b = zeroed();
        b[10] = 7;
        seal(&mut b[..], BlockKind::DirBucket, Ino(5), BlockAddr(99));
        verify(&b[..], BlockKind::DirBucket, Some(Ino(5)), BlockAddr(99)).unwrap();
        assert!(verify(&b[..], BlockKind::DirBucket, Some(Ino(6)), BlockAddr(99)).is_err());
        assert!(verify(&b[..], BlockKind::DirBucket, Some(Ino(5)), BlockAddr(98)).is_err());
        assert!(verify(&b[..], BlockKind::DirHeader, Some(Ino(5)), BlockAddr(99)).is_err());
        for i in (0..BLOCK_SIZE).step_by(97) {
            let mut c = b.clone();
            c[i] ^= 0x01;
            assert!(verify(&c[..], BlockKind::DirBucket, Some(Ino(5)), BlockAddr(99)).is_err());
        }
    }
}
