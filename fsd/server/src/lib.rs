//! The Molt filesystem server (`fsd serve`): the FUSE layer over the filesystem core
//! (`fsd-core`), whose blocks travel through the block driver's ring, and the server's end
//! of a live update.
//!
//! - [`serve`]: the FUSE connection: the device, `mount(2)`, the worker threads;
//! - `handover`: the process's start modes and its end of the supervisor's control link
//!   (`molt-control`): the cooperative update's phases as the server runs them;
//! - `background`: commits left in memory, the online format conversion;
//! - `fuse`: the FUSE operations over [`fsd_core::fs::Fs`];
//! - [`persist`]: the state a server hands its successor;
//! - [`host`]: the operating-system pieces the core leaves out (the ring store, the redo
//!   log file, file locks).
//!
//! No unsafe code: the system calls go through `molt-sys`.

#![forbid(unsafe_code)]

mod background;
mod credentials;
mod fuse;
mod handover;
pub mod host;
pub mod persist;
mod restart;
pub mod serve;

pub use handover::run_server;

/// What this build is, for the update manager's probe (`fsd component-info`).
pub fn component_info() -> molt_control::ComponentInfo {
    molt_control::ComponentInfo {
        name: "fsd".into(),
        version: persist::component_version(),
        state_schema: persist::StateVersion::CURRENT.0,
        state_schema_reads: persist::StateVersion::ACCEPTED
            .iter()
            .map(|v| v.0)
            .collect(),
        ring: blockdev::ring::ProtocolVersion::CURRENT.0,
        errcodes: blockdev::ring::StatusTable::CURRENT.0,
    }
}
