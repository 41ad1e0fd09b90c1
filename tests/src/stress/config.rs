//! What a stress run does: [`StressConfig`] and the small types it is made of.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Serialize, Serializer};

use super::block::HEADER_LEN;
use super::error::{Result, StressError};

/// Order in which data blocks are visited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Each thread walks the block space from its own starting point, wrapping around.
    Seq,
    /// Uniformly random blocks over all files.
    Rand,
}

/// How data I/O is issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// `pread`/`pwrite`, one request outstanding per thread (queue depth 1).
    Sync,
    /// One io_uring per thread with up to `queue_depth` data requests outstanding.
    Uring,
}

/// Which flush call a [`SyncPolicy`] issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncKind {
    Fsync,
    Fdatasync,
}

/// Flush the written file after every `every` writes of a thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SyncPolicy {
    pub kind: SyncKind,
    pub every: u32,
}

/// Every operation the tool times. The first seven can be chosen by a [`Mix`]; the rest
/// happen as part of them (flushes, and opening/closing files that are not held open).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Read,
    Write,
    Create,
    Stat,
    Rename,
    Unlink,
    Readdir,
    Fsync,
    Open,
    Close,
}

impl OpKind {
    /// All kinds, in report order; `ALL[k.index()] == k`.
    pub const ALL: [OpKind; 10] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Create,
        OpKind::Stat,
        OpKind::Rename,
        OpKind::Unlink,
        OpKind::Readdir,
        OpKind::Fsync,
        OpKind::Open,
        OpKind::Close,
    ];
    /// The kinds a [`Mix`] chooses from.
    pub const MIXABLE: [OpKind; 7] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Create,
        OpKind::Stat,
        OpKind::Rename,
        OpKind::Unlink,
        OpKind::Readdir,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Create => "create",
            OpKind::Stat => "stat",
            OpKind::Rename => "rename",
            OpKind::Unlink => "unlink",
            OpKind::Readdir => "readdir",
            OpKind::Fsync => "fsync",
            OpKind::Open => "open",
            OpKind::Close => "close",
        }
    }

    pub fn is_data(self) -> bool {
        matches!(self, OpKind::Read | OpKind::Write)
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Relative weights of the operations chosen in the main phase.
///
/// Parsed from `read=60,write=30,meta=10`: weights are relative (they are percentages
/// when they add up to 100); `meta=N` spreads N evenly over create, stat, rename, unlink
/// and readdir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mix {
    /// Indexed like [`OpKind::MIXABLE`]; scaled by 5 so `meta=N` splits exactly.
    weights: [u64; 7],
}

impl Mix {
    /// Half reads, half writes.
    pub fn data_only() -> Mix {
        Mix::parse("read=50,write=50").expect("built-in mix parses")
    }

    pub fn parse(spec: &str) -> Result<Mix> {
        let mut weights = [0u64; 7];
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                StressError::Config(format!("mix entry `{part}` is not KEY=WEIGHT"))
            })?;
            let value: u64 = value.trim().parse().map_err(|_| {
                StressError::Config(format!("mix weight in `{part}` is not a number"))
            })?;
            if value > 1_000_000 {
                return Err(StressError::Config(format!(
                    "mix weight in `{part}` is too large"
                )));
            }
            match key.trim() {
                "meta" => {
                    for w in &mut weights[2..] {
                        *w += value;
                    }
                }
                name => {
                    let kind = OpKind::MIXABLE
                        .iter()
                        .position(|k| k.name() == name)
                        .ok_or_else(|| {
                            StressError::Config(format!(
                                "unknown mix key `{name}` (read, write, create, stat, rename, unlink, readdir, meta)"
                            ))
                        })?;
                    weights[kind] += value * 5;
                }
            }
        }
        if weights.iter().all(|&w| w == 0) {
            return Err(StressError::Config(format!(
                "mix `{spec}` has no non-zero weight"
            )));
        }
        Ok(Mix { weights })
    }

    pub fn weight(&self, kind: OpKind) -> u64 {
        OpKind::MIXABLE
            .iter()
            .position(|&k| k == kind)
            .map_or(0, |i| self.weights[i])
    }

    pub fn total(&self) -> u64 {
        self.weights.iter().sum()
    }

    /// Picks a kind for a uniformly random `r` in `0..self.total()`.
    pub fn pick(&self, mut r: u64) -> OpKind {
        for (i, &w) in self.weights.iter().enumerate() {
            if r < w {
                return OpKind::MIXABLE[i];
            }
            r -= w;
        }
        OpKind::Read
    }

    pub fn has_metadata(&self) -> bool {
        self.weights[2..].iter().any(|&w| w > 0)
    }

    /// Share of each chosen kind in percent.
    pub fn percentages(&self) -> Vec<(OpKind, f64)> {
        let total = self.total() as f64;
        OpKind::MIXABLE
            .iter()
            .zip(self.weights)
            .filter(|(_, w)| *w > 0)
            .map(|(&k, w)| (k, w as f64 * 100.0 / total))
            .collect()
    }
}

impl Serialize for Mix {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_map(self.percentages().into_iter().map(|(k, p)| (k.name(), p)))
    }
}

/// What the delay hook is told about the operation about to be issued.
#[derive(Clone, Copy, Debug)]
pub struct OpContext {
    pub phase: Phase,
    pub thread: u32,
    pub op: OpKind,
    /// Data file id, for data operations.
    pub file: Option<u32>,
    /// Byte offset in the data file, for data operations.
    pub offset: Option<u64>,
    /// Operations this thread issued before this one in this phase.
    pub index: u64,
}

/// Fault injection for tests: called before every operation, inside its timed and
/// watched window; a returned duration is slept before the operation is issued, so it
/// looks like a slow operation to the latency, stall and watchdog accounting.
#[derive(Clone)]
pub struct DelayHook(pub Arc<DelayFn>);

/// The function inside a [`DelayHook`].
pub type DelayFn = dyn Fn(&OpContext) -> Option<Duration> + Send + Sync;

impl fmt::Debug for DelayHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DelayHook")
    }
}

/// Phases of a run, in the order they execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Write every block once.
    Prepare,
    /// Read every block once and compare it with the loaded state.
    Verify,
    /// The mixed workload.
    Main,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Prepare => "prepare",
            Phase::Verify => "verify",
            Phase::Main => "main",
        }
    }
}

/// A complete description of a stress run. Build it with [`StressConfig::new`] and
/// adjust the public fields; [`crate::stress::run`] validates it.
#[derive(Clone, Debug, Serialize)]
pub struct StressConfig {
    /// Directory to work in; the tool uses `data/` and `meta/` below it.
    pub dir: PathBuf,
    pub threads: u32,
    pub pattern: Pattern,
    pub mix: Mix,
    /// Bytes per I/O and per verified block.
    pub block_size: u32,
    pub queue_depth: u32,
    pub engine: EngineKind,
    /// Number of data files.
    pub files: u32,
    /// Bytes per data file; a multiple of `block_size`.
    pub file_size: u64,
    /// Open data files with `O_DIRECT`.
    pub direct: bool,
    pub sync: Option<SyncPolicy>,
    /// Data files `0..n` stay open for the whole run; the others are opened and closed
    /// around every I/O. `None` holds all of them open.
    pub hold_open: Option<u32>,
    /// Length of the main phase; `None` with `ops` also `None` runs until stopped.
    #[serde(serialize_with = "ser_opt_duration_ms", rename = "time_ms")]
    pub time: Option<Duration>,
    /// Operations (mix choices) in the main phase, over all threads.
    pub ops: Option<u64>,
    pub prepare: bool,
    pub verify_existing: bool,
    /// Loaded at start when it exists, saved at the end.
    pub state: Option<PathBuf>,
    #[serde(serialize_with = "ser_duration_ms", rename = "op_timeout_ms")]
    pub op_timeout: Duration,
    /// Error details kept; reaching this many errors stops the run.
    pub max_errors: u32,
    /// Upper bound on files each thread keeps in its metadata directory.
    pub meta_files: u32,
    pub seed: u64,
    /// Print a progress line to stderr.
    pub progress: bool,
    #[serde(skip)]
    pub delay_hook: Option<DelayHook>,
}

impl StressConfig {
    /// One thread, random 50/50 read/write, 4 KiB blocks, 4 files of 16 MiB, no time
    /// or op limit (it runs until stopped), no state file.
    pub fn new(dir: impl Into<PathBuf>) -> StressConfig {
        StressConfig {
            dir: dir.into(),
            threads: 1,
            pattern: Pattern::Rand,
            mix: Mix::data_only(),
            block_size: 4096,
            queue_depth: 1,
            engine: EngineKind::Sync,
            files: 4,
            file_size: 16 << 20,
            direct: false,
            sync: None,
            hold_open: None,
            time: None,
            ops: None,
            prepare: false,
            verify_existing: false,
            state: None,
            op_timeout: Duration::from_secs(30),
            max_errors: 100,
            meta_files: 64,
            seed: 0x6d6f_6c74,
            progress: false,
            delay_hook: None,
        }
    }

    pub fn blocks_per_file(&self) -> u64 {
        self.file_size / u64::from(self.block_size)
    }

    pub fn total_blocks(&self) -> u64 {
        self.blocks_per_file() * u64::from(self.files)
    }

    /// Files held open for the whole run.
    pub fn held_files(&self) -> u32 {
        self.hold_open.unwrap_or(self.files).min(self.files)
    }

    /// The phases this configuration runs, in order. The main phase runs when a time or
    /// op limit is set, or when neither prepare nor verify was asked for.
    pub fn phases(&self) -> Vec<Phase> {
        let mut phases = Vec::new();
        if self.prepare {
            phases.push(Phase::Prepare);
        }
        if self.verify_existing {
            phases.push(Phase::Verify);
        }
        if self.time.is_some() || self.ops.is_some() || phases.is_empty() {
            phases.push(Phase::Main);
        }
        phases
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(StressError::Config(m));
        if !(1..=1024).contains(&self.threads) {
            return bad(format!("threads must be 1..=1024, not {}", self.threads));
        }
        if !(1..=4096).contains(&self.queue_depth) {
            return bad(format!(
                "queue depth must be 1..=4096, not {}",
                self.queue_depth
            ));
        }
        if self.queue_depth > 1 && self.engine == EngineKind::Sync {
            return bad("a queue depth above 1 needs the uring engine".into());
        }
        let bs = self.block_size;
        let min = if self.direct { 512 } else { 64 };
        if bs < min || !bs.is_multiple_of(min) || bs > (64 << 20) {
            return bad(format!(
                "block size must be a multiple of {min} between {min} and 64 MiB, not {bs}"
            ));
        }
        debug_assert!(bs as usize >= HEADER_LEN);
        if self.files == 0 || self.files > 1_000_000 {
            return bad(format!(
                "file count must be 1..=1000000, not {}",
                self.files
            ));
        }
        if self.file_size < u64::from(bs) || !self.file_size.is_multiple_of(u64::from(bs)) {
            return bad(format!(
                "file size {} must be a non-zero multiple of the block size {bs}",
                self.file_size
            ));
        }
        if self.total_blocks() > 1 << 28 {
            return bad("more than 2^28 blocks in total; use a larger block size".into());
        }
        if let Some(h) = self.hold_open {
            if h > self.files {
                return bad(format!(
                    "--hold-open {h} is more than the {} files",
                    self.files
                ));
            }
        }
        if let Some(s) = self.sync {
            if s.every == 0 {
                return bad("sync frequency must be at least 1".into());
            }
        }
        if self.verify_existing && self.state.is_none() {
            return bad("verify-existing needs a state file".into());
        }
        if self.max_errors == 0 {
            return bad("max errors must be at least 1".into());
        }
        if self.op_timeout.is_zero() {
            return bad("op timeout must be positive".into());
        }
        if self.meta_files == 0 {
            return bad("meta files must be at least 1".into());
        }
        Ok(())
    }
}

fn ser_duration_ms<S: Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

fn ser_opt_duration_ms<S: Serializer>(
    d: &Option<Duration>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_secs_f64() * 1e3)),
        None => s.serialize_none(),
    }
}

/// Parses a byte size: a number with an optional binary suffix `k`, `m`, `g`, `t`
/// (`KiB`/`K`/`KB` spellings too; all are powers of 1024).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("`{s}` has an unknown size suffix")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Parses a duration: a decimal number with a unit `ms`, `s`, `m` or `h`; a bare
/// number is seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}` has an unknown duration unit (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{s}` is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("4x").is_err());
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("3 days").is_err());
    }

    #[test]
    fn mix_splits_meta_evenly() {
        let mix = Mix::parse("read=60,write=30,meta=10").unwrap();
        let p: Vec<_> = mix.percentages();
        assert_eq!(p[0], (OpKind::Read, 60.0));
        assert_eq!(p[1], (OpKind::Write, 30.0));
        assert_eq!(p[2], (OpKind::Create, 2.0));
        assert!(mix.has_metadata());
        assert!(Mix::parse("read=0").is_err());
        assert!(Mix::parse("fly=3").is_err());
        // Every r in range maps to a kind with non-zero weight.
        for r in 0..mix.total() {
            assert!(mix.weight(mix.pick(r)) > 0);
        }
    }

    #[test]
    fn phases_follow_flags() {
        let mut c = StressConfig::new("/x");
        assert_eq!(c.phases(), vec![Phase::Main]);
        c.prepare = true;
        assert_eq!(c.phases(), vec![Phase::Prepare]);
        c.ops = Some(5);
        assert_eq!(c.phases(), vec![Phase::Prepare, Phase::Main]);
    }
}
