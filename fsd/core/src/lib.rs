//! The Molt filesystem core: POSIX operations on a Molt image over a `BlockStore` (the
//! journal, the allocator, hashed directories, files, online format conversion, the redo
//! log), and the offline tools over the same code (`mkfs`, `fsck`).
//!
//! It knows no FUSE and no processes: the filesystem server adapts it to the kernel, and
//! hands it the block store and the redo log's memory. Pure safe Rust.
#![forbid(unsafe_code)]

pub mod fs;
pub mod fsck;
pub mod mkfs;
pub mod store;
