//! Errors that stop `molt-stress` before or outside the workload.
//!
//! Errors found *by* the workload (a bad block, an errno, a stuck operation) are not
//! `StressError`s: they are data, collected in [`crate::stress::StressReport::errors`].

use std::io;
use std::path::PathBuf;

/// Why a stress run could not be set up or finished.
#[derive(Debug, thiserror::Error)]
pub enum StressError {
    /// The configuration is invalid (maps to exit code 2).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Preparing the directory, files or engines failed (maps to exit code 2).
    #[error("setup failed: {what} {}: {source}", path.display())]
    Setup {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The state file could not be used (maps to exit code 2).
    #[error(transparent)]
    State(#[from] StateError),
}

/// Problems with a saved state file. Corruption, an unknown version and plain I/O
/// failures are kept apart: only the last one may go away on a retry.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("state file {} is corrupted: {reason}", path.display())]
    Corrupted { path: PathBuf, reason: String },
    #[error("state file {} has unsupported version {version}", path.display())]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("state file {} does not match the configuration: {reason}", path.display())]
    Mismatch { path: PathBuf, reason: String },
}

/// Result type of the stress engine.
pub type Result<T> = std::result::Result<T, StressError>;
