//! Results of a run: [`StressReport`], its JSON form and its text summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Serialize, Serializer};

use super::config::{OpKind, Phase, StressConfig};
use super::histogram::Histogram;

/// Version of the JSON document; bumped when a field changes meaning or goes away.
pub const REPORT_VERSION: u32 = 1;

fn ms<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// What kind of failure an [`OpError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A read returned content other than an allowed version (also: a wrong readdir
    /// listing or a wrong stat result in the metadata namespace).
    Mismatch,
    /// A read returned fewer bytes than a block.
    ShortRead,
    /// A write wrote fewer bytes than a block.
    ShortWrite,
    /// The operation failed with an errno.
    Io,
    /// The operation was outstanding longer than the op timeout.
    Timeout,
    /// A worker thread panicked.
    Panic,
}

/// One failed operation.
#[derive(Clone, Debug, Serialize)]
pub struct OpError {
    pub kind: ErrorKind,
    pub op: OpKind,
    pub phase: Phase,
    pub thread: u32,
    /// Data file id, for data operations.
    pub file: Option<u32>,
    /// Path relative to the run directory.
    pub path: Option<String>,
    /// Byte offset of the block, for data operations.
    pub offset: Option<u64>,
    pub errno: Option<i32>,
    pub detail: String,
    /// When it was detected, since the start of the run.
    #[serde(serialize_with = "ms", rename = "time_ms")]
    pub time: Duration,
    pub unix_ms: u64,
}

/// Latency summary of one op kind, microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram) -> Latency {
        let us = |ns: u64| ns as f64 / 1e3;
        Latency {
            mean_us: us(h.mean()),
            p50_us: us(h.percentile(0.50)),
            p99_us: us(h.percentile(0.99)),
            p999_us: us(h.percentile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// Counts and latency of one op kind.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct OpSummary {
    /// Completed operations, failed ones included.
    pub count: u64,
    pub errors: u64,
    pub bytes: u64,
    pub latency: Latency,
}

/// Read verification counts.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct VerifyCounts {
    /// Reads whose content was checked and found right.
    pub blocks_verified: u64,
    /// Reads that overlapped a write and saw a mix of two versions (not an error).
    pub torn_reads: u64,
    /// Reads of blocks whose last write failed (content unknown).
    pub unverified: u64,
}

/// Per-phase results.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseReport {
    pub phase: Phase,
    #[serde(serialize_with = "ms", rename = "duration_ms")]
    pub duration: Duration,
    pub ops: BTreeMap<OpKind, OpSummary>,
}

/// The longest window in which no operation completed on any thread.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Stall {
    #[serde(serialize_with = "ms", rename = "duration_ms")]
    pub duration: Duration,
    /// Start of the window, since the start of the run.
    #[serde(serialize_with = "ms", rename = "start_ms")]
    pub start: Duration,
    pub start_unix_ms: u64,
}

/// Why the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Every phase finished (op count reached, prepare/verify pass done).
    Completed,
    /// The `time` limit of the main phase passed.
    Time,
    /// The caller's stop flag was set (SIGINT/SIGTERM in the CLI).
    Stopped,
    /// `max_errors` errors were recorded.
    Errors,
    /// An operation exceeded the op timeout.
    Watchdog,
}

/// Completions per 10 ms since the start of the run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TimelineReport {
    pub bucket_ms: u32,
    pub counts: Vec<u32>,
}

/// Everything a run found. `errors.is_empty()` is the pass criterion.
#[derive(Clone, Debug, Serialize)]
pub struct StressReport {
    pub report_version: u32,
    pub config: StressConfig,
    pub started_unix_ms: u64,
    #[serde(serialize_with = "ms", rename = "duration_ms")]
    pub duration: Duration,
    pub stop_reason: StopReason,
    pub phases: Vec<PhaseReport>,
    /// All phases together.
    pub ops: BTreeMap<OpKind, OpSummary>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub verify: VerifyCounts,
    /// Details of the first `max_errors` errors.
    pub errors: Vec<OpError>,
    /// All errors, including those past `max_errors` whose details were dropped.
    pub errors_total: u64,
    pub longest_stall: Stall,
    pub timeline: TimelineReport,
    /// Whether the state file was written at the end.
    pub state_saved: bool,
    /// Worker threads still stuck in an operation when the run returned.
    pub stuck_threads: u32,
}

impl StressReport {
    pub fn passed(&self) -> bool {
        self.errors_total == 0
    }

    /// Total of the mix-chosen operations (read, write and metadata) in `phase`.
    pub fn mix_ops(&self, phase: Phase) -> u64 {
        self.phases
            .iter()
            .filter(|p| p.phase == phase)
            .flat_map(|p| p.ops.iter())
            .filter(|(k, _)| OpKind::MIXABLE.contains(k))
            .map(|(_, s)| s.count)
            .sum()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }

    /// Human-readable summary.
    pub fn render_text(&self) -> String {
        let mut o = String::new();
        let secs = self.duration.as_secs_f64();
        let _ = writeln!(
            o,
            "molt-stress: {:.2} s, stopped: {:?}, {} thread(s), {} file(s) of {} bytes, bs {}",
            secs,
            self.stop_reason,
            self.config.threads,
            self.config.files,
            self.config.file_size,
            self.config.block_size
        );
        for p in &self.phases {
            let n: u64 = p.ops.values().map(|s| s.count).sum();
            let _ = writeln!(
                o,
                "  phase {:<8} {:>9.2} s {:>10} ops",
                p.phase.name(),
                p.duration.as_secs_f64(),
                n
            );
        }
        let _ = writeln!(
            o,
            "  {:<8} {:>10} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "op", "count", "errors", "MiB", "p50 us", "p99 us", "p99.9 us", "max us"
        );
        for (k, s) in &self.ops {
            let _ = writeln!(
                o,
                "  {:<8} {:>10} {:>7} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                k.name(),
                s.count,
                s.errors,
                s.bytes as f64 / (1 << 20) as f64,
                s.latency.p50_us,
                s.latency.p99_us,
                s.latency.p999_us,
                s.latency.max_us
            );
        }
        let mib_s = |b: u64| b as f64 / (1 << 20) as f64 / secs.max(1e-9);
        let _ = writeln!(
            o,
            "  throughput: read {:.1} MiB/s, write {:.1} MiB/s",
            mib_s(self.bytes_read),
            mib_s(self.bytes_written)
        );
        let _ = writeln!(
            o,
            "  verified blocks: {} (torn reads tolerated: {}, unverified: {})",
            self.verify.blocks_verified, self.verify.torn_reads, self.verify.unverified
        );
        let _ = writeln!(
            o,
            "  longest stall: {:.1} ms starting at {:.3} s",
            self.longest_stall.duration.as_secs_f64() * 1e3,
            self.longest_stall.start.as_secs_f64()
        );
        for e in self.errors.iter().take(20) {
            let _ = writeln!(o, "  error: {}", describe(e));
        }
        if self.errors_total > 20 {
            let _ = writeln!(o, "  ... {} more error(s)", self.errors_total - 20);
        }
        if self.stuck_threads > 0 {
            let _ = writeln!(
                o,
                "  {} worker thread(s) still stuck in an operation",
                self.stuck_threads
            );
        }
        let _ = writeln!(
            o,
            "RESULT: {} ({} error(s))",
            if self.passed() { "PASS" } else { "FAIL" },
            self.errors_total
        );
        o
    }
}

/// One line describing an error.
pub fn describe(e: &OpError) -> String {
    let mut s = format!("{:?} {} at {:.3} s", e.kind, e.op, e.time.as_secs_f64());
    if let Some(p) = &e.path {
        let _ = write!(s, " {p}");
    }
    if let Some(f) = e.file {
        let _ = write!(s, " (file {f})");
    }
    if let Some(off) = e.offset {
        let _ = write!(s, " offset {off}");
    }
    if let Some(n) = e.errno {
        let _ = write!(s, " errno {n}");
    }
    let _ = write!(s, ": {}", e.detail);
    s
}
