//! The control protocol between the update manager (in the supervisor) and a component
//! process: the block driver (`blockdev serve`) or the filesystem server (`fsd serve`).
//!
//! One Unix socket pair per component carries [`Command`]s from the manager and
//! [`Reply`]s from the component, each in one [`frame`](link): a little-endian `u32`
//! length, checked against the link's cap before anything else is read, then the message
//! in bincode. Both components speak the same messages; a command one of them does not
//! serve is answered with [`ControlError::Unexpected`], never ignored.
//!
//! The cooperative update, as the messages run it (docs/live-update.md lists each one):
//! - notification and preparation: [`Command::Prepare`] names the deadline and the
//!   [`RequiredState`]s; the component converges while it keeps serving, drains, and
//!   answers [`Reply::Ready`] with its exported state — or an error, and serves on;
//! - state transfer: the successor, started in adopt mode, says [`Reply::Spawned`], gets
//!   [`Command::State`], checks and imports it and says [`Reply::Imported`], touching
//!   nothing shared;
//! - replacement: [`Command::Commit`] → [`Reply::Serving`]; then the predecessor gets
//!   [`Command::Exit`];
//! - rollback before commit: [`Command::Abort`] to the successor, [`Command::Resume`] →
//!   [`Reply::Serving`] to the predecessor.
//!
//! A component binary also answers the probe `component-info` with its
//! [`ComponentInfo`] as one line of JSON, before the manager starts it.
//!
//! A component started with a relink directory outlives its supervisor: it serves on, and
//! a new supervisor connects to its [`relink_socket_path`] to become its control link
//! ([`Relink`]).
#![forbid(unsafe_code)]

mod link;
mod message;
mod relink;

pub use link::{Link, LinkError};
pub use message::{
    Command, ComponentInfo, ControlError, ConversionProgress, ConversionResult, FuseInfo, Reply,
    RequiredState, ServingPhase, Status,
};
pub use relink::{may_relink, relink_socket_path, LinkLoss, PeerUid, Relink};
