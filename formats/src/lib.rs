//! Molt's byte formats. Pure: no I/O, no unsafe. `docs/format.md` is the normative spec and
//! `tests/spec.rs` checks the constants here against it.
#![forbid(unsafe_code)]

pub mod acl;
#[cfg(test)]
mod bit_flips;
pub mod bitmap;
pub mod block;
pub mod bytes;
pub mod dir;
pub mod error;
pub mod extent;
pub mod frame;
pub mod hex;
pub mod inode;
pub mod journal;
pub mod superblock;
pub mod version;
pub mod when;
pub mod xattr;

pub use block::{BlockAddr, BlockKind, Ino, BLOCK_SIZE};
pub use error::{FormatError, Result};
pub use version::FormatVersion;
