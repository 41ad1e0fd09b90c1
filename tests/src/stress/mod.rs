//! `molt-stress`: a fio-style stress and verification engine for any directory.
//!
//! Threads issue a mix of data operations (reads and writes of whole blocks in a set of
//! data files) and metadata operations (create, stat, rename, unlink, readdir in a
//! per-thread directory). Every written block carries its identity and a checksum
//! ([`block`]); the [`ledger`] remembers the last acknowledged version of every block,
//! so every read is verified. Latency histograms per op kind, a 10 ms completion
//! timeline and the longest stall are reported in a [`StressReport`]. See
//! `docs/stress.md` for the command line and the JSON document.
//!
//! ```no_run
//! use std::sync::{atomic::AtomicBool, Arc};
//! use molt_tests::stress::{run, StressConfig};
//!
//! let mut cfg = StressConfig::new("/mnt/molt");
//! cfg.threads = 4;
//! cfg.ops = Some(10_000);
//! let report = run(cfg, Arc::new(AtomicBool::new(false))).unwrap();
//! assert!(report.errors.is_empty());
//! ```

pub mod block;
mod config;
mod error;
mod files;
mod histogram;
pub mod ledger;
pub mod persist;
mod report;
mod rng;
mod runner;
mod timeline;
mod uring;
mod watchdog;
mod worker;

pub use config::{
    parse_duration, parse_size, DelayHook, EngineKind, Mix, OpContext, OpKind, Pattern, Phase,
    StressConfig, SyncKind, SyncPolicy,
};
pub use error::{Result, StateError, StressError};
pub use files::{data_file_path, data_file_rel};
pub use report::{
    describe, ErrorKind, Latency, OpError, OpSummary, PhaseReport, Stall, StopReason, StressReport,
    TimelineReport, VerifyCounts, REPORT_VERSION,
};
pub use runner::run;

/// Exit code: the run finished and found no error.
pub const EXIT_OK: i32 = 0;
/// Exit code: verification failures, I/O errors or a stuck operation.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: bad arguments, or the run could not be set up.
pub const EXIT_USAGE: i32 = 2;
