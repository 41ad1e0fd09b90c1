//! `molt-bench`: one job set run on a Molt mount and on its peers (fuse2fs, kernel ext4 on
//! a direct-I/O loop device, and fio on the raw image for the block-layer rows), several
//! runs each, reported as medians and the ratio of Molt to each peer in one markdown
//! table. See `docs/BENCHMARKS.md`.
//!
//! Every run of a peer starts from a fresh 1 GiB image and is taken down by a guard, even
//! on failure. Every command has a deadline; a process stuck in a FUSE request is killed
//! and the connection aborted.

pub mod metadata;
pub mod peer;
pub mod process;
pub mod report;
pub mod tarball;
pub mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use peer::Peer;
pub use report::{BenchReport, Machine};
pub use workload::{Row, Unit};

use process::WorkDir;
use tarball::Tarball;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{what} failed: {detail}")]
    Failed { what: String, detail: String },
    #[error("{what} overran its {deadline:?} deadline; output: {output}")]
    Deadline {
        what: String,
        deadline: Duration,
        output: String,
    },
    #[error("{what} could not be stopped (stuck in the kernel)")]
    Stuck { what: String },
    #[error("interrupted")]
    Interrupted,
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

impl BenchError {
    pub fn io(path: &Path, source: std::io::Error) -> BenchError {
        BenchError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// Prefixes the failing operation to an I/O error's path.
    pub fn context(self, what: &str) -> BenchError {
        match self {
            BenchError::Io { path, source } => BenchError::Io {
                path: format!("{what} {path}"),
                source,
            },
            e => e,
        }
    }
}

/// Sizes and limits of one benchmark mode.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// `--runtime` of every fio job (timed jobs run for all of it; one-pass jobs stop at it).
    pub runtime: Duration,
    /// Extra time a fio job may take beyond its runtime (laying out its file).
    pub slack: Duration,
    /// File of the 4 KiB random jobs, bytes.
    pub rand_file: u64,
    /// File of the 1 MiB sequential jobs, bytes.
    pub seq_file: u64,
    /// Files created, stated and unlinked in all, in `meta_rounds` equal rounds.
    pub meta_files: u64,
    pub meta_rounds: u64,
    pub meta_deadline: Duration,
    pub tar_files: u64,
    pub tar_deadline: Duration,
}

impl Sizes {
    pub fn full() -> Sizes {
        Sizes {
            runtime: Duration::from_secs(5),
            slack: Duration::from_secs(120),
            rand_file: 256 << 20,
            seq_file: 512 << 20,
            meta_files: 100_000,
            meta_rounds: 2,
            meta_deadline: Duration::from_secs(900),
            tar_files: 20_000,
            tar_deadline: Duration::from_secs(600),
        }
    }

    /// Tiny sizes, about a second per job: checks that the harness and every peer work.
    pub fn quick() -> Sizes {
        Sizes {
            runtime: Duration::from_secs(1),
            slack: Duration::from_secs(60),
            rand_file: 16 << 20,
            seq_file: 32 << 20,
            meta_files: 2_000,
            meta_rounds: 2,
            meta_deadline: Duration::from_secs(120),
            tar_files: 500,
            tar_deadline: Duration::from_secs(120),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub quick: bool,
    pub runs: u32,
    pub peers: Vec<Peer>,
    /// Directory for images and mountpoints (on the disk being measured).
    pub work: PathBuf,
    /// Directory for the tarball (memory-backed if possible).
    pub scratch: PathBuf,
    /// The `fsd` binary; it finds `blockdev` next to itself or via `MOLT_BLOCKDEV_BIN`.
    pub fsd: PathBuf,
    /// This program, run as `SELF metadata ...` for the metadata job.
    pub self_exe: PathBuf,
    pub sizes: Sizes,
}

/// Tools a run needs that are not part of Molt, with the peer that needs them.
pub fn missing_tools(peers: &[Peer]) -> Vec<String> {
    let mut need = vec!["fio", "tar", "sync", "rm"];
    for p in peers {
        need.extend(p.tools());
    }
    need.sort_unstable();
    need.dedup();
    need.into_iter()
        .filter(|t| process::which(t).is_none())
        .map(String::from)
        .collect()
}

/// Runs the benchmark: for each run, each peer on a fresh image, every job.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport, BenchError> {
    let missing = missing_tools(&cfg.peers);
    if !missing.is_empty() {
        return Err(BenchError::Setup(format!(
            "missing tools: {} (scripts/setup.sh installs them)",
            missing.join(", ")
        )));
    }
    let work = WorkDir::new(&cfg.work, "work")?;
    let scratch = WorkDir::new(&cfg.scratch, "tar")?;
    let tarball = if cfg.peers.iter().any(|p| Row::Untar.applies_to(*p)) {
        eprintln!(
            "molt-bench: generating the source tarball ({} files)",
            cfg.sizes.tar_files
        );
        Some(Tarball::create(scratch.path(), cfg.sizes.tar_files)?)
    } else {
        None
    };
    let mut results: BTreeMap<(Row, Peer), Vec<workload::Outcome>> = BTreeMap::new();
    let mut problems = Vec::new();
    for r in 0..cfg.runs {
        for &peer in &cfg.peers {
            eprintln!("molt-bench: run {}/{}: {}", r + 1, cfg.runs, peer.label());
            let mut record = |row: Row, o: workload::Outcome| {
                match &o {
                    Ok(x) => eprintln!(
                        "molt-bench:   {:<44} {:>12.1} {}",
                        row.label(),
                        x,
                        row.unit().label()
                    ),
                    Err(e) => eprintln!("molt-bench:   {:<44} failed: {e}", row.label()),
                }
                results.entry((row, peer)).or_default().push(o);
            };
            let inst = match peer.start(work.path(), &cfg.fsd) {
                Ok(i) => i,
                Err(BenchError::Interrupted) => return Err(BenchError::Interrupted),
                Err(e) => {
                    eprintln!("molt-bench: {} did not start: {e}", peer.label());
                    for row in Row::ALL.into_iter().filter(|r| r.applies_to(peer)) {
                        record(row, Err(format!("setup: {e}")));
                    }
                    continue;
                }
            };
            workload::run_all(
                &inst,
                &cfg.sizes,
                tarball.as_ref(),
                &cfg.self_exe,
                &mut record,
            )?;
            if let Err(e) = inst.finish() {
                eprintln!("molt-bench: {} did not unmount cleanly: {e}", peer.label());
                problems.push(format!(
                    "run {}: {} did not unmount cleanly: {e}",
                    r + 1,
                    peer.key()
                ));
            }
        }
    }
    Ok(BenchReport::new(
        cfg,
        results,
        problems,
        tarball.as_ref().map_or(0, |t| t.bytes),
    ))
}
