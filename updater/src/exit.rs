//! `updater` exit codes (`docs/live-update.md`, "Updater CLI").

/// Committed, check passed, update started (`--no-wait`), command done.
pub const OK: i32 = 0;
/// Refused: a check failed, the package is bad or untrusted, or it is not live-updatable.
pub const REFUSED: i32 = 2;
/// Aborted: the deadline passed or `updater abort` stopped it; the old version runs.
pub const ABORTED: i32 = 3;
/// Rolled back after a failure; the old version runs with its state.
pub const ROLLED_BACK: i32 = 4;
/// Any other failure, including no supervisor to talk to.
pub const FAILURE: i32 = 5;
/// Bad command line (EX_USAGE).
pub const USAGE: i32 = 64;
