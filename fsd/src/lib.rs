//! Molt filesystem daemon library: the filesystem core over a block store, mkfs, fsck,
//! the FUSE server and the supervisor.

pub mod fs;
pub mod mkfs;
pub mod store;
