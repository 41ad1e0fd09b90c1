//! `molt-stress`: fio-style stress and verification runs against any directory.
//!
//! A thin shell over `molt_tests::stress`: parse arguments, build a `StressConfig`,
//! run it, print the summary, write the JSON report, exit with a documented code
//! (0 ok, 1 verification/I/O errors, 2 usage or setup error; see docs/stress.md).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use molt_tests::stress::{
    self, parse_duration, parse_size, EngineKind, Mix, Pattern, StressConfig, SyncKind, SyncPolicy,
};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PatternArg {
    Seq,
    Rand,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EngineArg {
    Sync,
    Uring,
}

/// Stress and verify a directory: data and metadata operations, every read checked
/// against the last acknowledged write.
#[derive(Debug, Parser)]
#[command(
    name = "molt-stress",
    version,
    after_help = "Exit codes: 0 no errors, 1 verification or I/O errors (or a stuck operation), 2 usage or setup error, 130 second SIGINT/SIGTERM."
)]
struct Args {
    /// Directory to run in (must exist); the tool uses DIR/data and DIR/meta.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Block order: sequential per thread, or uniformly random.
    #[arg(long, value_enum, default_value = "rand")]
    pattern: PatternArg,
    /// Operation weights: read, write, create, stat, rename, unlink, readdir, and
    /// meta (= spread over the five metadata ops). Example: read=60,write=30,meta=10.
    #[arg(long, default_value = "read=50,write=50", value_name = "SPEC")]
    mix: String,
    /// Block size (I/O size and verification unit), e.g. 4k.
    #[arg(long, default_value = "4k", value_parser = parse_size, value_name = "SIZE")]
    bs: u64,
    /// Data requests outstanding per thread; above 1 uses io_uring.
    #[arg(long, default_value_t = 1, value_name = "N")]
    qd: u32,
    /// I/O engine; default sync at --qd 1, uring otherwise.
    #[arg(long, value_enum)]
    engine: Option<EngineArg>,
    /// Number of data files.
    #[arg(long, default_value_t = 4, value_name = "N")]
    files: u32,
    /// Size of each data file, a multiple of --bs.
    #[arg(long, default_value = "16m", value_parser = parse_size, value_name = "SIZE")]
    file_size: u64,
    /// Open data files with O_DIRECT.
    #[arg(long)]
    direct: bool,
    /// fsync the file after every N writes of a thread.
    #[arg(long, value_name = "N", conflicts_with = "fdatasync")]
    fsync: Option<u32>,
    /// fdatasync the file after every N writes of a thread.
    #[arg(long, value_name = "N")]
    fdatasync: Option<u32>,
    /// Keep data files 0..N open for the whole run; open and close the others around
    /// every I/O. Default: all held open.
    #[arg(long, value_name = "N")]
    hold_open: Option<u32>,
    /// Length of the main phase, e.g. 10s, 10m, 500ms.
    #[arg(long, value_parser = parse_duration, value_name = "DUR")]
    time: Option<Duration>,
    /// Operations in the main phase, over all threads.
    #[arg(long, value_name = "N")]
    ops: Option<u64>,
    /// Write every block once before the main phase.
    #[arg(long)]
    prepare: bool,
    /// Read every block once and compare with --state before the main phase.
    #[arg(long, requires = "state")]
    verify_existing: bool,
    /// State file: loaded at start if it exists, saved at the end.
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// Report any single operation outstanding longer than this, and stop.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DUR")]
    op_timeout: Duration,
    /// Stop after this many errors (details are kept for this many).
    #[arg(long, default_value_t = 100, value_name = "N")]
    max_errors: u32,
    /// Most files each thread keeps in its metadata directory.
    #[arg(long, default_value_t = 64, value_name = "N")]
    meta_files: u32,
    /// Seed for operation and block choice; default from the clock (it is in the
    /// report, so a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// Write the full results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// No progress line.
    #[arg(long, short)]
    quiet: bool,
}

fn config(a: Args) -> anyhow::Result<(StressConfig, Option<PathBuf>)> {
    let mut c = StressConfig::new(a.dir);
    c.threads = a.threads;
    c.pattern = match a.pattern {
        PatternArg::Seq => Pattern::Seq,
        PatternArg::Rand => Pattern::Rand,
    };
    c.mix = Mix::parse(&a.mix)?;
    c.block_size = u32::try_from(a.bs).context("--bs is too large")?;
    c.queue_depth = a.qd;
    c.engine = match (a.engine, a.qd) {
        (Some(EngineArg::Sync), _) => EngineKind::Sync,
        (Some(EngineArg::Uring), _) => EngineKind::Uring,
        (None, 1) => EngineKind::Sync,
        (None, _) => EngineKind::Uring,
    };
    c.files = a.files;
    c.file_size = a.file_size;
    c.direct = a.direct;
    c.sync = match (a.fsync, a.fdatasync) {
        (Some(every), _) => Some(SyncPolicy {
            kind: SyncKind::Fsync,
            every,
        }),
        (_, Some(every)) => Some(SyncPolicy {
            kind: SyncKind::Fdatasync,
            every,
        }),
        _ => None,
    };
    c.hold_open = a.hold_open;
    c.time = a.time;
    c.ops = a.ops;
    c.prepare = a.prepare;
    c.verify_existing = a.verify_existing;
    if c.time.is_none() && c.ops.is_none() && !c.prepare && !c.verify_existing {
        c.time = Some(Duration::from_secs(10));
    }
    c.state = a.state;
    c.op_timeout = a.op_timeout;
    c.max_errors = a.max_errors;
    c.meta_files = a.meta_files;
    c.seed = a.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    c.progress = !a.quiet;
    c.validate()?;
    Ok((c, a.json))
}

fn main() -> ExitCode {
    let (cfg, json) = match config(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("molt-stress: {e:#}");
            return ExitCode::from(stress::EXIT_USAGE as u8);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    if let Err(e) = watch_signals(&stop) {
        eprintln!("molt-stress: {e:#}");
        return ExitCode::from(stress::EXIT_USAGE as u8);
    }
    let report = match stress::run(cfg, stop) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("molt-stress: {e}");
            return ExitCode::from(stress::EXIT_USAGE as u8);
        }
    };
    print!("{}", report.render_text());
    if let Some(path) = json {
        if let Err(e) = std::fs::write(&path, report.to_json()) {
            eprintln!("molt-stress: writing {}: {e}", path.display());
            if report.passed() {
                return ExitCode::from(stress::EXIT_USAGE as u8);
            }
        }
    }
    let code = if report.passed() {
        stress::EXIT_OK
    } else {
        stress::EXIT_FAILED
    };
    // Worker threads stuck in an operation must not keep the process alive.
    std::process::exit(code)
}

/// First SIGINT/SIGTERM: stop cleanly and report. Second: exit at once with 130.
fn watch_signals(stop: &Arc<AtomicBool>) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    for sig in [SIGINT, SIGTERM] {
        flag::register_conditional_shutdown(sig, 130, Arc::clone(stop))
            .context("installing a signal handler")?;
        flag::register(sig, Arc::clone(stop)).context("installing a signal handler")?;
    }
    if stop.load(std::sync::atomic::Ordering::Relaxed) {
        bail!("interrupted during startup");
    }
    Ok(())
}
