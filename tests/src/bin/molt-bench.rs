//! `molt-bench`: runs one job set on a Molt mount and on its peers (fuse2fs, kernel ext4
//! on a direct-I/O loop device, fio on the raw image) and prints the medians and the ratio
//! of Molt to each peer as one markdown table. A thin shell over `molt_tests::bench`; see
//! docs/BENCHMARKS.md. Exit codes: 0 every job worked, 1 some job failed, 2 usage or setup
//! error, 130 interrupted.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use molt_tests::bench::{self, process, report, BenchConfig, BenchError, Peer, Sizes};

#[derive(Debug, Parser)]
#[command(name = "molt-bench", version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Tiny sizes, one run, about a second per job: checks the harness and every peer.
    #[arg(long)]
    quick: bool,
    /// Runs per peer (default 3, or 1 with --quick); the table shows medians.
    #[arg(long, value_name = "N")]
    runs: Option<u32>,
    /// Peers to run, comma-separated: molt, molt-uring (Molt over FUSE io_uring, left out
    /// where the kernel has none), fuse2fs, ext4, raw.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "molt,molt-uring,fuse2fs,ext4,raw"
    )]
    peers: Vec<String>,
    /// Directory for the images and mountpoints (on the disk to measure).
    #[arg(long, default_value = "/var/tmp", value_name = "DIR")]
    dir: PathBuf,
    /// Directory for the source tarball (default /dev/shm, memory-backed).
    #[arg(long, value_name = "DIR")]
    scratch: Option<PathBuf>,
    /// The fsd binary (default: $MOLT_FSD_BIN, else next to this program).
    #[arg(long, value_name = "PATH")]
    fsd: Option<PathBuf>,
    /// Write per-run figures and medians as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Replace the "Filesystem" section of this markdown file (full runs only).
    #[arg(long, value_name = "FILE")]
    docs: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Internal: the metadata job (create, stat, unlink), printing its result as JSON.
    #[command(hide = true)]
    Metadata {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        files: u64,
        #[arg(long, default_value_t = 1)]
        rounds: u64,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Cmd::Metadata { dir, files, rounds }) = &args.command {
        return match bench::metadata::run(dir, *files, *rounds) {
            Ok(r) => {
                println!("{}", serde_json::to_string(&r).expect("result serialises"));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("molt-bench metadata: {e}");
                ExitCode::from(1)
            }
        };
    }
    match run(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("molt-bench: {e:#}");
            if process::stopped() {
                ExitCode::from(130)
            } else {
                ExitCode::from(2)
            }
        }
    }
}

fn run(args: &Args) -> anyhow::Result<u8> {
    // The running command is killed, and the guards unmount everything on the way out.
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, process::stop_flag()).context("signal handler")?;
    }
    let mut peers = Vec::new();
    for p in &args.peers {
        let Some(peer) = Peer::from_key(p.trim()) else {
            bail!("unknown peer {p:?}: expected molt, fuse2fs, ext4 or raw");
        };
        if peer == Peer::MoltUring
            && !std::path::Path::new("/sys/module/fuse/parameters/enable_uring").exists()
        {
            eprintln!("molt-bench: leaving out molt-uring: this kernel has no FUSE over io_uring");
            continue;
        }
        if !peers.contains(&peer) {
            peers.push(peer);
        }
    }
    peers.sort();
    let runs = args.runs.unwrap_or(if args.quick { 1 } else { 3 });
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let self_exe = std::env::current_exe().context("locating this program")?;
    let fsd = args
        .fsd
        .clone()
        .or_else(|| std::env::var_os("MOLT_FSD_BIN").map(PathBuf::from))
        .unwrap_or_else(|| self_exe.with_file_name("fsd"));
    if peers.iter().any(|p| p.is_molt()) && !fsd.is_file() {
        bail!("{} is not built (cargo build --release)", fsd.display());
    }
    let work = canonical(&args.dir)?;
    let scratch = match &args.scratch {
        Some(d) => canonical(d)?,
        None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
        None => work.clone(),
    };
    let cfg = BenchConfig {
        quick: args.quick,
        runs,
        peers,
        work,
        scratch,
        fsd,
        self_exe,
        sizes: if args.quick {
            Sizes::quick()
        } else {
            Sizes::full()
        },
    };

    let report = match bench::run(&cfg) {
        Ok(r) => r,
        Err(BenchError::Interrupted) => bail!("interrupted; everything was unmounted"),
        Err(e) => return Err(e.into()),
    };
    let table = report.render_table();
    println!("{table}");
    if let Some(p) = &args.json {
        std::fs::write(p, report.to_json()).with_context(|| format!("writing {}", p.display()))?;
    }
    let failures = report.failures();
    for f in &failures {
        eprintln!("molt-bench: FAILED {f}");
    }
    if let Some(p) = &args.docs {
        if args.quick {
            eprintln!("molt-bench: quick mode; {} not updated", p.display());
        } else {
            let command = std::env::var("MOLT_BENCH_COMMAND").unwrap_or_else(|_| {
                std::iter::once("molt-bench".to_string())
                    .chain(std::env::args().skip(1))
                    .collect::<Vec<_>>()
                    .join(" ")
            });
            report::write_docs(p, &report.render_docs_section(&command))?;
            eprintln!(
                "molt-bench: wrote the Filesystem section of {}",
                p.display()
            );
        }
    }
    Ok(if failures.is_empty() { 0 } else { 1 })
}

fn canonical(p: &Path) -> anyhow::Result<PathBuf> {
    p.canonicalize()
        .with_context(|| format!("{} must be an existing directory", p.display()))
}
