//! Runs the phases: sets up files and state, starts the workers, and watches them
//! (time limit, stop flag, op watchdog, progress line) until they are done.

use std::collections::BTreeMap;
use std::fs;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::config::{EngineKind, OpKind, Phase, StressConfig};
use super::error::{Result, StateError, StressError};
use super::files::FileSet;
use super::histogram::Histogram;
use super::ledger::Ledger;
use super::persist::{self, StateV1};
use super::report::{
    ErrorKind, Latency, OpError, OpSummary, PhaseReport, Stall, StopReason, StressReport,
    TimelineReport, VerifyCounts, REPORT_VERSION,
};
use super::timeline::{StallTracker, Timeline, BUCKET_NS};
use super::uring::UringEngine;
use super::watchdog::Watch;
use super::worker::{meta_dir, Worker};

/// How long the monitor waits for workers after the watchdog fired before it gives
/// up on them and returns (they may be stuck in the kernel for good).
const WATCHDOG_GRACE: Duration = Duration::from_secs(1);
/// Monitor tick; workers also wake the monitor when they exit.
const TICK: Duration = Duration::from_millis(20);

#[derive(Clone, Debug, Default)]
pub struct OpAcc {
    pub hist: Histogram,
    pub count: u64,
    pub errors: u64,
    pub bytes: u64,
}

impl OpAcc {
    fn merge(&mut self, o: &OpAcc) {
        self.hist.merge(&o.hist);
        self.count += o.count;
        self.errors += o.errors;
        self.bytes += o.bytes;
    }
}

#[derive(Debug, Default)]
pub struct ThreadStats {
    /// Indexed by `OpKind::index`; taken at the end of every phase.
    pub ops: Vec<OpAcc>,
    pub timeline: Timeline,
}

pub struct ThreadShared {
    pub stats: Mutex<ThreadStats>,
    pub watch: Watch,
    /// Set by the worker when it has finished the current phase.
    pub done: AtomicBool,
}

#[derive(Debug, Default)]
pub struct Progress {
    pub ops: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

#[derive(Debug, Default)]
pub struct VerifyAtomics {
    pub blocks_verified: AtomicU64,
    pub torn_reads: AtomicU64,
    pub unverified: AtomicU64,
}

/// State shared by the monitor and all workers of a run.
pub struct Shared {
    pub cfg: StressConfig,
    pub t0: Instant,
    pub t0_unix_ms: u64,
    pub ledger: Ledger,
    pub files: FileSet,
    stop: Arc<AtomicBool>,
    halted: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    errors: Mutex<Vec<OpError>>,
    errors_total: AtomicU64,
    pub ops_claimed: AtomicU64,
    pub progress: Progress,
    pub verify: VerifyAtomics,
    pub stall: StallTracker,
    pub threads: Vec<ThreadShared>,
}

impl Shared {
    /// Nanoseconds since the start of the run.
    pub fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    pub fn stopping(&self) -> bool {
        self.halted.load(Ordering::Relaxed) || self.stop.load(Ordering::Relaxed)
    }

    /// Stops the run; the first reason given is the one reported.
    pub fn halt(&self, reason: StopReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        r.get_or_insert(reason);
        self.halted.store(true, Ordering::Relaxed);
    }

    pub fn record_error(&self, e: OpError) {
        let total = self.errors_total.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
            if errors.len() < self.cfg.max_errors as usize {
                errors.push(e);
            }
        }
        if total >= u64::from(self.cfg.max_errors) {
            self.halt(StopReason::Errors);
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs the configured phases against `config.dir` and reports what happened.
///
/// Returns `Err` only for problems that prevented the run (invalid configuration,
/// setup failures, an unusable state file); everything the workload finds wrong is in
/// [`StressReport::errors`]. Setting `stop` ends the run early; it still returns a
/// report. Never blocks for longer than the op timeout plus a second on an operation
/// that does not return: such threads are left behind and counted in
/// [`StressReport::stuck_threads`].
pub fn run(config: StressConfig, stop: Arc<AtomicBool>) -> Result<StressReport> {
    config.validate()?;
    let loaded = match &config.state {
        Some(p) => persist::load(p)?,
        None => None,
    };
    if let (Some(s), Some(p)) = (&loaded, &config.state) {
        if (s.block_size, s.files, s.file_size)
            != (config.block_size, config.files, config.file_size)
        {
            return Err(StateError::Mismatch {
                path: p.clone(),
                reason: format!(
                    "saved for {} files of {} bytes in {}-byte blocks, configured {} files of {} bytes in {}-byte blocks",
                    s.files, s.file_size, s.block_size, config.files, config.file_size, config.block_size
                ),
            }
            .into());
        }
    }
    if config.verify_existing && loaded.is_none() {
        return Err(StressError::Config(
            "verify-existing: the state file does not exist".into(),
        ));
    }
    let phases = config.phases();
    let files = FileSet::setup(&config, loaded.is_some())?;
    if phases.contains(&Phase::Main) && config.mix.has_metadata() {
        let meta = config.dir.join("meta");
        match fs::remove_dir_all(&meta) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StressError::Setup {
                    what: "clearing",
                    path: meta,
                    source,
                })
            }
        }
    }
    let blocks = config.total_blocks();
    let ledger = Ledger::new(
        blocks,
        loaded.as_ref().map(|s| &s.seqs[..]),
        loaded.as_ref().map_or(1, |s| s.next_seq),
    );
    let slots = config.queue_depth as usize + 1;
    let threads = (0..config.threads)
        .map(|_| ThreadShared {
            stats: Mutex::new(ThreadStats::default()),
            watch: Watch::new(slots),
            done: AtomicBool::new(false),
        })
        .collect();
    let sh = Arc::new(Shared {
        cfg: config,
        t0: Instant::now(),
        t0_unix_ms: unix_ms(SystemTime::now()),
        ledger,
        files,
        stop,
        halted: AtomicBool::new(false),
        reason: Mutex::new(None),
        errors: Mutex::new(Vec::new()),
        errors_total: AtomicU64::new(0),
        ops_claimed: AtomicU64::new(0),
        progress: Progress::default(),
        verify: VerifyAtomics::default(),
        stall: StallTracker::default(),
        threads,
    });
    if sh.cfg.mix.has_metadata() && phases.contains(&Phase::Main) {
        for t in 0..sh.cfg.threads {
            let d = meta_dir(&sh, t);
            fs::create_dir_all(&d).map_err(|source| StressError::Setup {
                what: "creating",
                path: d,
                source,
            })?;
        }
    }

    let mut phase_reports = Vec::new();
    let mut totals = vec![OpAcc::default(); OpKind::ALL.len()];
    let mut stuck = 0;
    for phase in phases {
        if sh.stop.load(Ordering::Relaxed) {
            sh.halt(StopReason::Stopped);
        }
        if sh.stopping() {
            break;
        }
        let (report, accs, stuck_now) = run_phase(&sh, phase)?;
        for (t, a) in totals.iter_mut().zip(&accs) {
            t.merge(a);
        }
        phase_reports.push(report);
        stuck = stuck_now;
        if stuck > 0 {
            break;
        }
    }

    // Workers also end on the stop flag alone: a stop that came before the monitor looked
    // at it is still the reason the run ended.
    if sh.stop.load(Ordering::Relaxed) {
        sh.halt(StopReason::Stopped);
    }
    let end = sh.now_ns();
    // With a thread still stuck, the stall runs on to the end of the run.
    let (gap, gap_start) = if stuck > 0 {
        sh.stall.finish(end)
    } else {
        sh.stall.longest()
    };
    let mut timeline = Timeline::default();
    for t in &sh.threads {
        timeline.merge(&t.stats.lock().unwrap_or_else(|e| e.into_inner()).timeline);
    }
    let mut state_saved = false;
    if let (Some(path), 0) = (&sh.cfg.state, stuck) {
        if let Some(seqs) = sh.ledger.currents(blocks) {
            let state = StateV1 {
                block_size: sh.cfg.block_size,
                files: sh.cfg.files,
                file_size: sh.cfg.file_size,
                next_seq: sh.ledger.next_seq(),
                seqs,
            };
            persist::save(path, &state)?;
            state_saved = true;
        }
    }
    let stop_reason = sh
        .reason
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or(StopReason::Completed);
    let errors = std::mem::take(&mut *sh.errors.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(StressReport {
        report_version: REPORT_VERSION,
        config: sh.cfg.clone(),
        started_unix_ms: sh.t0_unix_ms,
        duration: Duration::from_nanos(end),
        stop_reason,
        phases: phase_reports,
        bytes_read: totals[OpKind::Read.index()].bytes,
        bytes_written: totals[OpKind::Write.index()].bytes,
        ops: summarize(&totals),
        verify: VerifyCounts {
            blocks_verified: sh.verify.blocks_verified.load(Ordering::Relaxed),
            torn_reads: sh.verify.torn_reads.load(Ordering::Relaxed),
            unverified: sh.verify.unverified.load(Ordering::Relaxed),
        },
        errors,
        errors_total: sh.errors_total.load(Ordering::Relaxed),
        longest_stall: Stall {
            duration: Duration::from_nanos(gap),
            start: Duration::from_nanos(gap_start),
            start_unix_ms: sh.t0_unix_ms + gap_start / 1_000_000,
        },
        timeline: TimelineReport {
            bucket_ms: (BUCKET_NS / 1_000_000) as u32,
            counts: timeline.into_counts(end),
        },
        state_saved,
        stuck_threads: stuck,
    })
}

fn summarize(accs: &[OpAcc]) -> BTreeMap<OpKind, OpSummary> {
    OpKind::ALL
        .iter()
        .zip(accs)
        .filter(|(_, a)| a.count > 0)
        .map(|(&k, a)| {
            let s = OpSummary {
                count: a.count,
                errors: a.errors,
                bytes: a.bytes,
                latency: Latency::from_histogram(&a.hist),
            };
            (k, s)
        })
        .collect()
}

/// Runs one phase; returns its report, its raw accumulators, and the number of worker
/// threads that were still stuck when the monitor gave up on them.
fn run_phase(sh: &Arc<Shared>, phase: Phase) -> Result<(PhaseReport, Vec<OpAcc>, u32)> {
    let cfg = &sh.cfg;
    let mut engines = Vec::new();
    for _ in 0..cfg.threads {
        engines.push(match cfg.engine {
            EngineKind::Sync => None,
            EngineKind::Uring => Some(UringEngine::new(cfg.queue_depth, cfg.block_size).map_err(
                |source| StressError::Setup {
                    what: "io_uring setup for",
                    path: cfg.dir.clone(),
                    source,
                },
            )?),
        });
    }
    let started = Instant::now();
    let deadline = match phase {
        Phase::Main => cfg.time.map(|t| started + t),
        _ => None,
    };
    let monitor = thread::current();
    let mut handles = Vec::new();
    for (t, engine) in engines.into_iter().enumerate() {
        let sh = Arc::clone(sh);
        let monitor = monitor.clone();
        let h = thread::Builder::new()
            .name(format!("stress-{t}"))
            .spawn(move || {
                let sync_slot = sh.cfg.queue_depth as usize;
                Worker::new(&sh, t as u32, phase, sync_slot).run(engine);
                // A worker that ran out of work was not stalled: its exit closes the
                // window since its last completion.
                sh.stall.completion(sh.now_ns());
                sh.threads[t].done.store(true, Ordering::Release);
                monitor.unpark();
            })
            .map_err(|source| StressError::Setup {
                what: "spawning a worker for",
                path: cfg.dir.clone(),
                source,
            })?;
        handles.push(h);
    }

    let timeout_ns = cfg.op_timeout.as_nanos() as u64;
    let mut fired: Option<Instant> = None;
    let mut progress = ProgressLine::new(cfg.progress, phase, started, sh);
    let all_done = || sh.threads.iter().all(|t| t.done.load(Ordering::Acquire));
    loop {
        if all_done() {
            break;
        }
        if sh.stop.load(Ordering::Relaxed) {
            sh.halt(StopReason::Stopped);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            sh.halt(StopReason::Time);
        }
        let now = sh.now_ns();
        for (t, ts) in sh.threads.iter().enumerate() {
            for o in ts.watch.overdue(now, timeout_ns) {
                let outstanding = Duration::from_nanos(now - o.started_ns);
                sh.record_error(OpError {
                    kind: ErrorKind::Timeout,
                    op: o.op,
                    phase,
                    thread: t as u32,
                    file: o.file,
                    path: o.file.map(super::files::data_file_rel),
                    offset: o.offset,
                    errno: None,
                    detail: format!(
                        "outstanding for {:.3} s (op timeout {:.3} s), started at {:.3} s",
                        outstanding.as_secs_f64(),
                        cfg.op_timeout.as_secs_f64(),
                        o.started_ns as f64 / 1e9
                    ),
                    time: Duration::from_nanos(now),
                    unix_ms: sh.t0_unix_ms + now / 1_000_000,
                });
                sh.halt(StopReason::Watchdog);
                fired.get_or_insert_with(Instant::now);
            }
        }
        if fired.is_some_and(|f| f.elapsed() >= WATCHDOG_GRACE) {
            break;
        }
        progress.tick(false);
        thread::park_timeout(TICK);
    }
    progress.tick(true);

    let mut stuck = 0;
    for (t, h) in handles.into_iter().enumerate() {
        if !sh.threads[t].done.swap(false, Ordering::AcqRel) {
            stuck += 1;
            continue;
        }
        if h.join().is_err() {
            let now = sh.now_ns();
            sh.record_error(OpError {
                kind: ErrorKind::Panic,
                op: OpKind::Read,
                phase,
                thread: t as u32,
                file: None,
                path: None,
                offset: None,
                errno: None,
                detail: "worker thread panicked".into(),
                time: Duration::from_nanos(now),
                unix_ms: sh.t0_unix_ms + now / 1_000_000,
            });
        }
    }
    let mut accs = vec![OpAcc::default(); OpKind::ALL.len()];
    for t in &sh.threads {
        let taken = std::mem::take(&mut t.stats.lock().unwrap_or_else(|e| e.into_inner()).ops);
        for (a, b) in accs.iter_mut().zip(&taken) {
            a.merge(b);
        }
    }
    let report = PhaseReport {
        phase,
        duration: started.elapsed(),
        ops: summarize(&accs),
    };
    Ok((report, accs, stuck))
}

/// The progress line on stderr: rewritten in place at most every 0.5 s on a terminal,
/// a new line every 10 s otherwise.
struct ProgressLine<'a> {
    on: bool,
    tty: bool,
    phase: Phase,
    started: Instant,
    sh: &'a Shared,
    last: Instant,
    last_ops: u64,
    printed: bool,
}

impl<'a> ProgressLine<'a> {
    fn new(on: bool, phase: Phase, started: Instant, sh: &'a Shared) -> ProgressLine<'a> {
        ProgressLine {
            on,
            tty: std::io::stderr().is_terminal(),
            phase,
            started,
            sh,
            last: started,
            last_ops: sh.progress.ops.load(Ordering::Relaxed),
            printed: false,
        }
    }

    fn tick(&mut self, last: bool) {
        if !self.on {
            return;
        }
        let every = if self.tty {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(10)
        };
        let since = self.last.elapsed();
        if !last && since < every {
            return;
        }
        if last && !self.printed {
            return;
        }
        let p = &self.sh.progress;
        let ops = p.ops.load(Ordering::Relaxed);
        let rate = (ops - self.last_ops) as f64 / since.as_secs_f64().max(1e-9);
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let line = format!(
            "molt-stress: {} {:.1} s, {} ops ({:.0}/s), read {:.1} MiB, written {:.1} MiB, errors {}",
            self.phase.name(),
            self.started.elapsed().as_secs_f64(),
            ops,
            rate,
            mib(p.bytes_read.load(Ordering::Relaxed)),
            mib(p.bytes_written.load(Ordering::Relaxed)),
            self.sh.errors_total.load(Ordering::Relaxed)
        );
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            write!(err, "\r{line}\x1b[K{}", if last { "\n" } else { "" })
        } else {
            writeln!(err, "{line}")
        };
        self.last = Instant::now();
        self.last_ops = ops;
        self.printed = true;
    }
}
