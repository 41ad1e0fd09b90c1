//! Molt's FUSE layer: the kernel protocol, spoken from the kernel's documented ABI.
//!
//! - [`abi`]: the kernel's structures, opcodes and flags, each named once.
//! - [`request`]: decoding that trusts no length or offset from the kernel.
//! - [`Session`]: INIT negotiation (or adoption of a live connection with its
//!   [`Negotiated`] parameters) and one reply for every request that takes one.
//! - [`Filesystem`]: the one interface the filesystem server implements.
//! - [`transport`]: how requests reach the session — `/dev/fuse` with N workers, or
//!   FUSE over io_uring with one queue per CPU — and [`Notifier`] for the server's own
//!   messages to the kernel.

// Unsafe code only in the io_uring transport (its commands and registered buffers).
#![deny(unsafe_code)]

pub mod abi;
mod filesystem;
pub mod request;
mod session;
pub mod transport;

pub use filesystem::{Context, DirBuf, Entry, Errno, Filesystem, Opened, Result};
pub use session::{InitPolicy, Negotiated, ReplySink, Served, Session, MAX_PAGES};
pub use transport::{Notifier, StopReason, Stopper};
