//! The messages. Every type here is part of the wire format: a changed variant or field
//! is a protocol change (docs/live-update.md, "Control messages").

use std::fmt;
use std::str::FromStr;

use formats::version::FormatVersion;
use serde::{Deserialize, Serialize};

/// Manager → component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Notification: reach every `required` state (and hold it) within `deadline_ms`
    /// while serving, then drain and answer [`Reply::Ready`]. Answered with
    /// [`ControlError::Deadline`] (and serving on) when the deadline passes first.
    Prepare {
        deadline_ms: u64,
        required: Vec<RequiredState>,
    },
    /// Rollback: a prepared (holding) component serves again → [`Reply::Serving`].
    Resume,
    /// A prepared component ends its process without touching anything shared. No reply.
    Exit,
    /// → [`Reply::Status`].
    Status,
    /// State transfer to a successor: its predecessor's exported state. → [`Reply::Imported`].
    State(Vec<u8>),
    /// Replacement: the successor takes over and serves → [`Reply::Serving`].
    Commit,
    /// The successor ends its process without having touched anything shared. No reply.
    Abort,
    /// Start-up (filesystem server): the supervisor made the FUSE mount → [`Reply::Serving`].
    Mounted,
    /// Filesystem server: the free space a conversion to this format needs → [`Reply::Space`].
    ConversionSpace(FormatVersion),
    /// Filesystem server: start converting the image online → [`Reply::Converting`].
    Convert(FormatVersion),
}

/// Component → manager.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// A successor started in adopt mode is ready for [`Command::State`].
    Spawned,
    /// Start-up (filesystem server): the image is mounted over the ring; waiting for
    /// [`Command::Mounted`].
    FsReady,
    /// Preparation done: the component holds, and this is its exported state (framed by
    /// the component's own state format; the manager checks it).
    Ready(Vec<u8>),
    Serving,
    Imported,
    Status(Status),
    /// Bytes a conversion needs and bytes free on the image.
    Space {
        needed: u64,
        free: u64,
    },
    Converting,
    Error(ControlError),
}

/// Why a component refused or could not do what it was told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ControlError {
    /// The required state was not reached (or the drain not finished) by the deadline;
    /// the component serves on.
    #[error("required state not reached by the deadline: {0}")]
    Deadline(String),
    /// A successor does not read the state schema it was given.
    #[error("unsupported state schema {0}")]
    UnsupportedSchema(u32),
    /// The state failed its check or could not be imported.
    #[error("state refused: {0}")]
    StateRefused(String),
    /// The command is not one this component serves in its current phase.
    #[error("unexpected command {0}")]
    Unexpected(String),
    #[error("{0}")]
    Failed(String),
}

/// What a component reports of itself while it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub phase: ServingPhase,
    pub pid: u32,
    pub version: String,
    /// The state schema this build exports.
    pub state_schema: u32,
    /// Named counters in the component's order (I/O counts, lookups, open handles…).
    pub counters: Vec<(String, u64)>,
    /// Filesystem server: the image's on-disk format.
    pub format: Option<FormatVersion>,
    /// Filesystem server: an online conversion in progress.
    pub conversion: Option<ConversionProgress>,
    /// Filesystem server: the last conversion this process finished.
    pub last_conversion: Option<ConversionResult>,
    /// Filesystem server: how its FUSE connection is served.
    pub fuse: Option<FuseInfo>,
}

/// A filesystem server's FUSE connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FuseInfo {
    /// "dev" (`/dev/fuse` read and write) or "uring" (FUSE over io_uring).
    pub transport: String,
    /// The protocol version negotiated at INIT, "7.N"; `None` before INIT.
    pub protocol: Option<String>,
}

impl Status {
    /// The counter named `key`.
    pub fn counter(&self, key: &str) -> Option<u64> {
        self.counters
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServingPhase {
    Serving,
    /// Preparing: converging or draining.
    Draining,
    /// Prepared: holding until resume or exit.
    Held,
    /// A successor waiting for its predecessor's state.
    Adopting,
    /// A successor that imported the state and waits for the commit.
    Imported,
}

/// An online conversion in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversionProgress {
    pub to: FormatVersion,
    pub done: u64,
    pub total: u64,
    /// Inodes per second since this process started converting.
    pub rate_per_s: u64,
    /// Metadata bytes rewritten by this process.
    pub bytes: u64,
}

/// A finished online conversion, as the process that finished it measured it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversionResult {
    pub to: FormatVersion,
    /// Inodes moved to the new layout by this process.
    pub inodes: u64,
    /// Metadata bytes rewritten by this process.
    pub bytes: u64,
    pub millis: u64,
    pub steps: u64,
    pub longest_step_us: u64,
    pub mean_step_us: u64,
}

/// A state a component must reach (and hold) before it is replaced. In a package's
/// manifest and on the wire by the same kebab-case names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RequiredState {
    /// Nothing in flight anywhere in the component.
    Quiescent,
    NoReadsInFlight,
    NoWritesInFlight,
    NoOpenFiles,
    /// Filesystem server only: every open file has done at least one read or write.
    EveryOpenFileTouched,
}

impl RequiredState {
    pub const ALL: [RequiredState; 5] = [
        RequiredState::Quiescent,
        RequiredState::NoReadsInFlight,
        RequiredState::NoWritesInFlight,
        RequiredState::NoOpenFiles,
        RequiredState::EveryOpenFileTouched,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequiredState::Quiescent => "quiescent",
            RequiredState::NoReadsInFlight => "no-reads-in-flight",
            RequiredState::NoWritesInFlight => "no-writes-in-flight",
            RequiredState::NoOpenFiles => "no-open-files",
            RequiredState::EveryOpenFileTouched => "every-open-file-touched",
        }
    }

    /// Only the filesystem server knows how to reach this state.
    pub fn filesystem_server_only(self) -> bool {
        self == RequiredState::EveryOpenFileTouched
    }
}

impl fmt::Display for RequiredState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RequiredState {
    type Err = String;

    fn from_str(s: &str) -> Result<RequiredState, String> {
        RequiredState::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown required state {s:?}"))
    }
}

/// What a component binary says of itself (`<binary> component-info`, one JSON line):
/// the manager reads it before it starts the binary, to check an update's compatibility.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentInfo {
    /// "fsd" or "blockdev".
    pub name: String,
    pub version: String,
    /// The state schema it exports.
    pub state_schema: u32,
    /// The state schemas it imports.
    pub state_schema_reads: Vec<u32>,
    /// The ring protocol version it speaks.
    pub ring: u32,
    /// The ring's error-code table it uses.
    pub errcodes: u32,
}
