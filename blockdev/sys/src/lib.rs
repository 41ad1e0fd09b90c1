//! Molt's system-call wrappers.
//!
//! The rule: outside the block driver's shared-memory ring, its I/O engines, its buffers and
//! the FUSE transport, this crate is the only place where Molt calls the kernel unsafely.
//! Every other crate is `#![forbid(unsafe_code)]` (the block driver denies it everywhere
//! but in those three modules), and a test in `tests/` fails on an `unsafe` anywhere else.
//!
//! Every wrapper here is safe to call: it takes only what it can check (borrowed or owned
//! descriptors, C strings, plain integers), returns `io::Result` (or a plain answer where
//! an error has nothing to say), and owns what it creates: a new descriptor comes back as
//! an [`OwnedFd`](std::os::fd::OwnedFd) or a [`File`](std::fs::File), a mapping as a
//! value that unmaps when dropped. Every `unsafe` block states why it is sound.
//!
//! - [`fd`]: eventfds, duplicates, descriptors inherited across `exec`, checked close,
//!   file locks, descriptor flags, block device sizes, `fdatasync` and `fallocate`;
//! - [`poll`]: readiness of a set of descriptors;
//! - [`process`]: pidfds, signals, the descriptors and session a child starts with, and
//!   programs' standard output ([`outln!`], which ends the program on a closed pipe
//!   instead of panicking) and standard error ([`errln!`], which drops what cannot be
//!   written: a closed pipe, a log on a full filesystem);
//! - [`memory`]: memfds and their shared mappings;
//! - [`mount`]: `mount(2)` and `umount2(2)`;
//! - [`socket`]: the credentials of a Unix socket's peer;
//! - [`fs`]: path truncation, file handles, zero-initialised kernel structs.

pub mod fd;
pub mod fs;
pub mod memory;
pub mod mount;
pub mod poll;
pub mod process;
pub mod socket;

pub use fd::{
    adopt_inherited_fd, block_device_size, close, dup_at_least, dup_for_exec, eventfd,
    eventfd_drain, eventfd_signal, fallocate, fdatasync, status_flags, try_lock_exclusive,
};
pub use fs::{truncate, zeroed_stat64, zeroed_statvfs64, FileHandle};
pub use memory::{is_fully_sealed, map_memfd, memfd_create, memfd_sealed, SharedMapping};
pub use mount::{mount, unmount};
pub use poll::poll_readable;
pub use process::{
    kill, kill_group, pass_fds, pidfd_exited, pidfd_getfd, pidfd_open, pidfd_send_signal,
    pidfd_try_wait, process_gone, ChildOptions,
};
pub use socket::{peer_credentials, PeerCredentials};

use std::io;

/// The C convention: a negative return is an error in `errno`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
