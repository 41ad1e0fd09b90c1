//! Molt filesystem daemon library: the FUSE server over the filesystem core (`fsd-core`),
//! the supervisor and update manager, and the `fsd` command's pieces.

pub mod cli;
pub mod component;
pub mod control;
pub mod credentials;
pub mod fuse;
pub mod host;
pub mod manager;
pub mod persist;
pub mod runtime;
pub mod serve;
pub mod supervisor;
pub mod sysinfo;
pub mod update;
