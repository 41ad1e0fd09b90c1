//! Molt filesystem daemon library: the filesystem core over a block store, mkfs, fsck,
//! the FUSE server and the supervisor.

pub mod cli;
pub mod component;
pub mod control;
pub mod credentials;
pub mod fs;
pub mod fsck;
pub mod fuse;
pub mod manager;
pub mod mkfs;
pub mod persist;
pub mod runtime;
pub mod serve;
pub mod store;
pub mod supervisor;
pub mod sysinfo;
pub mod update;
