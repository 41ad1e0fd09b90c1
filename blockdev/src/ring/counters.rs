//! The per-device counters the driver publishes in the ring header.

/// Per-device counters as the ring header shows them (always u64 there). Operation and
/// byte counts cover requests that succeeded; `errors` counts requests completed with an
/// error (including rejected entries).
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
    pub(crate) fn to_array(self) -> [u64; 8] {
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

    pub(crate) fn from_array(a: [u64; 8]) -> Counters {
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

    /// The seven I/O counters (without `in_flight`), in header order.
    pub(crate) fn io(self) -> [u64; 7] {
        let a = self.to_array();
        [a[0], a[1], a[2], a[3], a[4], a[5], a[6]]
    }

    pub(crate) fn from_io(io: [u64; 7], in_flight: u64) -> Counters {
        Counters::from_array([io[0], io[1], io[2], io[3], io[4], io[5], io[6], in_flight])
    }
}
