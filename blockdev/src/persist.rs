//! State the driver exports when it stops between requests, for a successor to import.
//! Frozen per version: a changed field is a new version (`v1` here).

use crate::engine::EngineKind;
use crate::ring::RingGeometry;

/// Per-device counters. Operation counts and byte counts cover requests that succeeded;
/// `errors` counts requests completed with an error (including rejected entries).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
    /// Requests taken from the ring whose completion is not posted yet.
    pub in_flight: u64,
}

impl Counters {
    /// The order of the counters in the ring header (`RING.md`).
    pub fn to_array(&self) -> [u64; 8] {
        [
            self.reads,
            self.writes,
            self.flushes,
            self.discards,
            self.bytes_read,
            self.bytes_written,
            self.errors,
            self.in_flight,
        ]
    }

    pub fn from_array(a: [u64; 8]) -> Counters {
        Counters {
            reads: a[0],
            writes: a[1],
            flushes: a[2],
            discards: a[3],
            bytes_read: a[4],
            bytes_written: a[5],
            errors: a[6],
            in_flight: a[7],
        }
    }
}

/// Why the serve loop returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A stop was requested (e.g. to prepare a live update).
    Requested,
    /// The client process exited.
    ClientGone,
    /// The client broke the ring protocol; it is no longer served.
    ProtocolViolation(String),
}

/// Exported driver state, version 1. Taken only when nothing is in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverStateV1 {
    pub counters: Counters,
    pub geometry: RingGeometry,
    pub num_blocks: u64,
    pub engine: EngineKind,
    /// Status code of a latched write/flush error, if any.
    pub latched: Option<i32>,
    /// Next submission index the driver will read.
    pub sq_head: u32,
    /// Next completion index the driver will write.
    pub cq_tail: u32,
    pub reason: StopReason,
}

/// The state type of the current version.
pub type DriverState = DriverStateV1;
