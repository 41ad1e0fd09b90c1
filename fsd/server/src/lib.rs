//! The Molt filesystem server (`fsd serve`): the FUSE layer over the filesystem core
//! (`fsd-core`), whose blocks travel through the block driver's ring, and the server's end
//! of a live update.
//!
//! - [`serve`]: the process: its descriptors, the FUSE session, the worker threads, and
//!   the control loop the supervisor drives;
//! - `fuse`: the FUSE operations over [`fsd_core::fs::Fs`];
//! - [`persist`]: the state a server hands its successor;
//! - [`host`]: the operating-system pieces the core leaves out (the ring store, the redo
//!   log file, file locks).
//!
//! No unsafe code: the system calls go through `molt-sys`.

#![forbid(unsafe_code)]

mod control;
mod credentials;
mod fuse;
pub mod host;
pub mod persist;
pub mod serve;

pub use control::{ControlLink, Msg};
