//! Results: medians per row and peer, the ratio of Molt to each peer, one markdown table,
//! the JSON document, and the "Filesystem" section of `docs/BENCHMARKS.md`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::workload::{Outcome, Row};
use super::{BenchConfig, BenchError, Peer};

/// The heading of the section `write_docs` owns; it ends at the next `## ` heading.
pub const DOCS_HEADING: &str = "## Filesystem";

/// One row and peer: the figure of every run.
#[derive(Debug, Serialize)]
pub struct Cell {
    pub row: &'static str,
    pub peer: &'static str,
    pub unit: &'static str,
    pub values: Vec<f64>,
    pub errors: Vec<String>,
    pub median: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub quick: bool,
    pub runs: u32,
    pub peers: Vec<&'static str>,
    pub date: String,
    pub machine: Machine,
    pub setup: Setup,
    pub cells: Vec<Cell>,
    /// Problems outside any row (an unclean unmount).
    pub problems: Vec<String>,
    #[serde(skip)]
    peer_list: Vec<Peer>,
    #[serde(skip)]
    by_key: BTreeMap<(Row, Peer), usize>,
}

impl BenchReport {
    pub fn new(
        cfg: &BenchConfig,
        results: BTreeMap<(Row, Peer), Vec<Outcome>>,
        problems: Vec<String>,
        tar_bytes: u64,
    ) -> BenchReport {
        let mut cells = Vec::new();
        let mut by_key = BTreeMap::new();
        for row in Row::ALL {
            for &peer in &cfg.peers {
                if !row.applies_to(peer) {
                    continue;
                }
                let outcomes = results.get(&(row, peer)).map(Vec::as_slice).unwrap_or(&[]);
                let values: Vec<f64> = outcomes.iter().filter_map(|o| o.clone().ok()).collect();
                let mut errors: Vec<String> =
                    outcomes.iter().filter_map(|o| o.clone().err()).collect();
                if outcomes.is_empty() {
                    errors.push("not run".into());
                }
                by_key.insert((row, peer), cells.len());
                cells.push(Cell {
                    row: row.key(),
                    peer: peer.key(),
                    unit: row.unit().label(),
                    median: median(&values),
                    values,
                    errors,
                });
            }
        }
        BenchReport {
            quick: cfg.quick,
            runs: cfg.runs,
            peers: cfg.peers.iter().map(|p| p.key()).collect(),
            date: today(),
            machine: Machine::probe(&cfg.work),
            setup: Setup {
                runtime_secs: cfg.sizes.runtime.as_secs(),
                rand_file: cfg.sizes.rand_file,
                seq_file: cfg.sizes.seq_file,
                meta_files: cfg.sizes.meta_files,
                meta_rounds: cfg.sizes.meta_rounds,
                tar_files: cfg.sizes.tar_files,
                tar_bytes,
            },
            cells,
            problems,
            peer_list: cfg.peers.clone(),
            by_key,
        }
    }

    pub fn cell(&self, row: Row, peer: Peer) -> Option<&Cell> {
        self.by_key.get(&(row, peer)).map(|&i| &self.cells[i])
    }

    /// Every failure, one line each; empty when every job of every run worked.
    pub fn failures(&self) -> Vec<String> {
        let mut v = self.problems.clone();
        for c in &self.cells {
            for e in &c.errors {
                v.push(format!("{} on {}: {e}", c.row, c.peer));
            }
        }
        v
    }

    /// The one markdown table: medians, then Molt over each peer.
    pub fn render_table(&self) -> String {
        let peers = &self.peer_list;
        // Each of Molt's columns over each other peer.
        let molts: Vec<Peer> = peers.iter().copied().filter(|p| p.is_molt()).collect();
        let others: Vec<Peer> = peers.iter().copied().filter(|p| !p.is_molt()).collect();
        let ratios: Vec<(Peer, Peer)> = molts
            .iter()
            .flat_map(|&m| others.iter().map(move |&p| (m, p)))
            .collect();
        let mut s = String::from("| workload | unit |");
        for p in peers {
            s.push_str(&format!(" {} |", p.label()));
        }
        for (m, p) in &ratios {
            s.push_str(&format!(" {} / {} |", m.label(), p.label()));
        }
        s.push_str("\n|---|---|");
        for _ in 0..peers.len() + ratios.len() {
            s.push_str("---:|");
        }
        s.push('\n');
        for row in Row::ALL {
            s.push_str(&format!("| {} | {} |", row.label(), row.unit().label()));
            for &p in peers {
                s.push_str(&format!(" {} |", self.cell_text(row, p)));
            }
            for &(m, p) in &ratios {
                let r = match (self.median(row, m), self.median(row, p)) {
                    (Some(m), Some(x)) if x > 0.0 => format!("{:.2}", m / x),
                    _ => "—".into(),
                };
                s.push_str(&format!(" {r} |"));
            }
            s.push('\n');
        }
        s
    }

    fn median(&self, row: Row, peer: Peer) -> Option<f64> {
        self.cell(row, peer).and_then(|c| c.median)
    }

    fn cell_text(&self, row: Row, peer: Peer) -> String {
        let Some(c) = self.cell(row, peer) else {
            return "—".into();
        };
        match c.median {
            None => "failed".into(),
            Some(m) if c.errors.is_empty() => fmt_rate(m),
            Some(m) => format!(
                "{} ({}/{} failed)",
                fmt_rate(m),
                c.errors.len(),
                c.errors.len() + c.values.len()
            ),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serialises")
    }

    /// The "Filesystem" section of `docs/BENCHMARKS.md`.
    pub fn render_docs_section(&self, command: &str) -> String {
        let m = &self.machine;
        format!(
            "{DOCS_HEADING}

Command (release build, as root, from the repository root; images on the VM's root disk):

```
{command}
```

Date: {date}. Machine: {cpus} vCPU VM ({cpu}), {mem} GiB RAM, Linux {kernel},
images on {fs}, {fio}.

The table shows medians of {runs} runs. In each run every peer gets a fresh 1 GiB image
and runs the jobs below in order; the peers take turns within a run. Caches are dropped
(`sync; echo 3 > /proc/sys/vm/drop_caches`) before every job. Every figure is a rate
(higher is better); the ratio columns are Molt's median over the peer's, so above 1 Molt
is faster. Per-run figures are printed on stderr and written by `--json`.

- **Molt**: `fsd mkfs IMAGE --size 1G`, `fsd mount IMAGE MNT` with default options
  (requests over `/dev/fuse`, 4 workers).
- **Molt (io_uring)**: the same, mounted with `--transport uring` (FUSE over io_uring,
  one queue of 16 entries per CPU).
- **fuse2fs**: `mkfs.ext4 -E lazy_itable_init=0,lazy_journal_init=0` on the image, then
  `fuse2fs IMAGE MNT -f` with default options (as root), unmounted with `umount`.
- **ext4 on loop (dio)**: the same mkfs, `losetup --direct-io=on`, kernel `mount`.
- **fio raw image**: fio straight on the image file with `O_DIRECT`, for the block-layer
  rows only (the ceiling the block layer could reach).

Jobs (fio rows use `--output-format=json`; read and write figures are summed for the
mixes):

- 4 KiB random: `--ioengine=io_uring --direct=1 --bs=4k --rw=randread|randwrite|randrw
  --rwmixread=50 --iodepth=1|32 --time_based --runtime={rt}` on a {rand} MiB file that fio
  lays out first (untimed).
- 1 MiB sequential, direct: `--ioengine=io_uring --iodepth=8 --direct=1 --time_based` on a
  {seq} MiB file, read first (fio lays the file out), then overwritten.
- 1 MiB sequential, buffered: `--ioengine=psync`, one pass over a new {seq} MiB file with
  `--end_fsync=1` (the fsync is timed), then one pass reading it back from cold caches.
- 512 B append + fdatasync: `--rw=write --bs=512 --ioengine=sync --fdatasync=1
  --fallocate=none` on a new file (every write extends it), for {rt} s.
- Small files: one thread creates {meta} files of 64 bytes (`O_CREAT|O_EXCL`, write,
  close) in directories of 1,000, then `lstat`s each, then unlinks each, in {rounds} rounds
  of {per_round} (a 1 GiB Molt image, like the default 1 GiB ext4, has 65,536 inodes); the
  create and unlink phases end with `syncfs`, which is timed.
- Source tarball: {tar} generated files (256 B–48 KiB, log-uniform; {tarmib} MiB of
  content in directories of 100) packed once with `tar -cf` into `/dev/shm`; timed
  `tar -xf --no-same-owner` onto the target plus `sync -f`. MiB/s counts file content.

{table}",
            date = self.date,
            cpus = m.cpus,
            cpu = m.cpu,
            mem = m.mem_gib,
            kernel = m.kernel,
            fs = m.work_fs,
            fio = m.fio,
            runs = self.runs,
            rt = self.setup.runtime_secs,
            rand = self.setup.rand_file >> 20,
            seq = self.setup.seq_file >> 20,
            meta = fmt_count(self.setup.meta_files),
            rounds = self.setup.meta_rounds,
            per_round = fmt_count(self.setup.meta_files / self.setup.meta_rounds.max(1)),
            tar = fmt_count(self.setup.tar_files),
            tarmib = self.setup.tar_bytes >> 20,
            table = self.render_table(),
        )
    }
}

/// The sizes a report was measured with.
#[derive(Debug, Serialize)]
pub struct Setup {
    pub runtime_secs: u64,
    pub rand_file: u64,
    pub seq_file: u64,
    pub meta_files: u64,
    pub meta_rounds: u64,
    pub tar_files: u64,
    pub tar_bytes: u64,
}

/// Replaces the section under [`DOCS_HEADING`] in the markdown file `path` (up to the next
/// `## ` heading), or appends it if there is none. Other sections are kept as they are.
pub fn write_docs(path: &Path, section: &str) -> Result<(), BenchError> {
    let old = std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))?;
    std::fs::write(path, replace_section(&old, section)).map_err(|e| BenchError::io(path, e))
}

pub fn replace_section(doc: &str, section: &str) -> String {
    let lines: Vec<&str> = doc.lines().collect();
    let section = section.trim_end();
    let start = lines.iter().position(|l| l.trim_end() == DOCS_HEADING);
    let mut out = String::new();
    match start {
        Some(i) => {
            let end = lines[i + 1..]
                .iter()
                .position(|l| l.starts_with("## "))
                .map(|j| i + 1 + j)
                .unwrap_or(lines.len());
            for l in &lines[..i] {
                out.push_str(l);
                out.push('\n');
            }
            out.push_str(section);
            out.push('\n');
            if end < lines.len() {
                out.push('\n');
                for l in &lines[end..] {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        None => {
            out.push_str(doc.trim_end());
            out.push_str("\n\n");
            out.push_str(section);
            out.push('\n');
        }
    }
    out
}

/// Median of `v` (mean of the middle two for an even count).
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// `17.9k`, `1687`, `12.5`.
pub fn fmt_rate(x: f64) -> String {
    if x >= 100_000.0 {
        format!("{:.0}k", x / 1000.0)
    } else if x >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

fn fmt_count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).rem_euclid(3) == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Today's date (UTC) as YYYY-MM-DD.
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    formats::when::utc_day(secs)
}

/// What the figures were measured on.
#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu: String,
    pub mem_gib: u64,
    pub kernel: String,
    /// File system type and device under the work directory.
    pub work_fs: String,
    pub fio: String,
}

impl Machine {
    pub fn probe(work: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown CPU".into());
        let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let fio = std::process::Command::new("fio")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            mem_gib: (mem_kib + (1 << 19)) >> 20,
            kernel,
            work_fs: work_fs(work),
            fio,
        }
    }
}

/// "ext4 (/dev/vda)" for the mount holding `dir`.
fn work_fs(dir: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let dir = dir.to_string_lossy();
    let mut best: Option<(usize, String)> = None;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        if f.len() < 3 {
            continue;
        }
        let mp = f[1];
        let under = dir == mp || mp == "/" || dir.starts_with(&format!("{mp}/"));
        let longer = match &best {
            Some((n, _)) => mp.len() >= *n,
            None => true,
        };
        if under && longer {
            best = Some((mp.len(), format!("{} ({})", f[2], f[0])));
        }
    }
    best.map(|(_, s)| s).unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn section_is_replaced_and_others_kept() {
        let doc = "# B\n\n## Block layer\n\nkeep\n\n## Filesystem\n\nold\n\n## Filesystem stress\n\nkeep too\n";
        let out = replace_section(doc, "## Filesystem\n\nnew\n");
        assert_eq!(
            out,
            "# B\n\n## Block layer\n\nkeep\n\n## Filesystem\n\nnew\n\n## Filesystem stress\n\nkeep too\n"
        );
        let appended = replace_section("# B\n\n## Block layer\n\nkeep\n", "## Filesystem\n\nnew");
        assert_eq!(
            appended,
            "# B\n\n## Block layer\n\nkeep\n\n## Filesystem\n\nnew\n"
        );
    }

    #[test]
    fn rates() {
        assert_eq!(fmt_rate(17_912.0), "17.9k");
        assert_eq!(fmt_rate(123_456.0), "123k");
        assert_eq!(fmt_rate(1687.4), "1687");
        assert_eq!(fmt_rate(12.46), "12.5");
        assert_eq!(fmt_count(100_000), "100,000");
    }
}
