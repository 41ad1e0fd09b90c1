//! Molt block driver.
//!
//! Layers, bottom up:
//! - [`image`]: the backing image (regular file or block device), opened with `O_DIRECT`
//!   when the filesystem allows it.
//! - [`engine`]: the I/O engines behind one enum: io_uring, plain syscalls (the test
//!   oracle), and a fault-injecting wrapper.
//! - [`ring`]: the protocol between a client and the driver over shared memory (`RING.md`).
//! - [`server`]: the driver's serve loop; [`client`]: the thread-safe client.
//! - [`spawn`]: starts the `blockdev` driver process and returns a connected client.
//! - [`spin`]: how long the serve loop polls before it sleeps (fixed or adaptive).
//! - [`persist`]: the driver's exported state and its versioned schemas;
//!   [`handover`]: the live update control protocol, both ends.
//!
//! Unsafe code is denied but in three modules: [`ring`] (the shared mapping), [`engine`]
//! (I/O into caller memory and the kernel's io_uring) and [`buffer`] (aligned heap
//! buffers). Every other system call goes through the safe wrappers of `molt-sys`.

#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod buffer;
pub mod client;
#[allow(unsafe_code)]
pub mod engine;
mod error;
pub mod handover;
pub mod image;
pub mod nbd;
pub mod persist;
#[allow(unsafe_code)]
pub mod ring;
pub mod server;
pub mod spawn;
pub mod spin;

pub use client::{Batch, Client, ClientConfig, RecoveryStats};
pub use error::BlockError;
pub use persist::Counters;
pub use spawn::{spawn_driver, spawn_driver_with_fds, DriverConfig, DriverFds};

/// Size of a block in bytes: the unit of every address and count in this crate.
pub const BLOCK_SIZE: usize = 4096;

const _: () = assert!(BLOCK_SIZE == formats::block::BLOCK_SIZE);

/// A logical block address on the image, in units of [`BLOCK_SIZE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lba(pub u64);

impl Lba {
    /// Byte offset of this block on the image.
    pub(crate) fn byte_offset(self) -> u64 {
        self.0 * BLOCK_SIZE as u64
    }
}

impl std::fmt::Display for Lba {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lba {}", self.0)
    }
}
