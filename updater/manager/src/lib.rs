//! The Molt supervisor and update manager (`fsd mount`).
//!
//! - [`supervisor`]: starts the block driver and the filesystem server as child processes,
//!   keeps a duplicate of every descriptor that must outlive one, performs the mount, and
//!   recovers a component that crashes;
//! - [`manager`]: the control socket the `updater` CLI talks to: requirement checks,
//!   package verification, and the update history;
//! - `update`: the cooperative update's phases over the running components;
//! - [`runtime`]: the per-mount runtime directory;
//! - [`options`]: mount options as mount(8) and fstab spell them;
//! - [`notify`]: the service manager's readiness protocol (`NOTIFY_SOCKET`);
//! - [`succession`]: the supervisor's own live update (an exec of the new binary) and the
//!   adoption of a mount whose supervisor died.
//!
//! No unsafe code: the system calls go through `molt-sys`.

#![forbid(unsafe_code)]

mod component;
pub mod identity;
pub mod manager;
pub mod notify;
pub mod options;
mod process;
pub mod runtime;
mod stack;
pub mod succession;
pub mod supervisor;
mod sysinfo;
mod update;
