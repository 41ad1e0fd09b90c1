//! The rows of the table and the jobs that measure them: fio jobs (random 4 KiB, 1 MiB
//! sequential, small appends with fdatasync), the metadata routine (create, stat, unlink
//! of many small files) and unpacking a tarball.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde::Serialize;

use super::peer::{Instance, Peer};
use super::process::{drop_caches, run, which};
use super::tarball::Tarball;
use super::{BenchError, Sizes};

/// What a row's figure counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Unit {
    Iops,
    MibPerSec,
    OpsPerSec,
    AppendsPerSec,
}

impl Unit {
    pub fn label(self) -> &'static str {
        match self {
            Unit::Iops => "IOPS",
            Unit::MibPerSec => "MiB/s",
            Unit::OpsPerSec => "ops/s",
            Unit::AppendsPerSec => "appends/s",
        }
    }
}

/// One row of the table. Every figure is a rate: higher is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Row {
    RandRead1,
    RandRead32,
    RandWrite1,
    RandWrite32,
    RandMix1,
    RandMix32,
    SeqReadDirect,
    SeqWriteDirect,
    SeqReadBuffered,
    SeqWriteBuffered,
    Create,
    Stat,
    Unlink,
    Untar,
    Append,
}

impl Row {
    pub const ALL: [Row; 15] = [
        Row::RandRead1,
        Row::RandRead32,
        Row::RandWrite1,
        Row::RandWrite32,
        Row::RandMix1,
        Row::RandMix32,
        Row::SeqReadDirect,
        Row::SeqWriteDirect,
        Row::SeqReadBuffered,
        Row::SeqWriteBuffered,
        Row::Create,
        Row::Stat,
        Row::Unlink,
        Row::Untar,
        Row::Append,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Row::RandRead1 => "4 KiB random read, QD1, direct",
            Row::RandRead32 => "4 KiB random read, QD32, direct",
            Row::RandWrite1 => "4 KiB random write, QD1, direct",
            Row::RandWrite32 => "4 KiB random write, QD32, direct",
            Row::RandMix1 => "4 KiB random 50/50 read/write, QD1, direct",
            Row::RandMix32 => "4 KiB random 50/50 read/write, QD32, direct",
            Row::SeqReadDirect => "1 MiB sequential read, QD8, direct",
            Row::SeqWriteDirect => "1 MiB sequential write, QD8, direct",
            Row::SeqReadBuffered => "1 MiB sequential read, buffered",
            Row::SeqWriteBuffered => "1 MiB sequential write, buffered + fsync",
            Row::Create => "create small files",
            Row::Stat => "stat small files",
            Row::Unlink => "unlink small files",
            Row::Untar => "unpack source tarball + syncfs",
            Row::Append => "512 B append + fdatasync",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Row::RandRead1 => "randread-qd1",
            Row::RandRead32 => "randread-qd32",
            Row::RandWrite1 => "randwrite-qd1",
            Row::RandWrite32 => "randwrite-qd32",
            Row::RandMix1 => "randrw-qd1",
            Row::RandMix32 => "randrw-qd32",
            Row::SeqReadDirect => "seqread-direct",
            Row::SeqWriteDirect => "seqwrite-direct",
            Row::SeqReadBuffered => "seqread-buffered",
            Row::SeqWriteBuffered => "seqwrite-buffered",
            Row::Create => "create",
            Row::Stat => "stat",
            Row::Unlink => "unlink",
            Row::Untar => "untar",
            Row::Append => "append-fdatasync",
        }
    }

    pub fn unit(self) -> Unit {
        match self {
            Row::RandRead1
            | Row::RandRead32
            | Row::RandWrite1
            | Row::RandWrite32
            | Row::RandMix1
            | Row::RandMix32 => Unit::Iops,
            Row::SeqReadDirect
            | Row::SeqWriteDirect
            | Row::SeqReadBuffered
            | Row::SeqWriteBuffered
            | Row::Untar => Unit::MibPerSec,
            Row::Create | Row::Stat | Row::Unlink => Unit::OpsPerSec,
            Row::Append => Unit::AppendsPerSec,
        }
    }

    /// Whether `peer` has a figure in this row: the raw image only has the O_DIRECT
    /// block-layer rows.
    pub fn applies_to(self, peer: Peer) -> bool {
        match peer {
            Peer::Raw => matches!(
                self,
                Row::RandRead1
                    | Row::RandRead32
                    | Row::RandWrite1
                    | Row::RandWrite32
                    | Row::RandMix1
                    | Row::RandMix32
                    | Row::SeqReadDirect
                    | Row::SeqWriteDirect
            ),
            _ => true,
        }
    }
}

/// A measured figure, or why there is none.
pub type Outcome = Result<f64, String>;

/// Runs every job on one peer instance, in a fixed order, calling `record` as each
/// figure arrives. A failed job records its error for its rows and the next job runs; an
/// interruption ends the sequence.
pub fn run_all(
    inst: &Instance,
    sizes: &Sizes,
    tarball: Option<&Tarball>,
    self_exe: &Path,
    record: &mut dyn FnMut(Row, Outcome),
) -> Result<(), BenchError> {
    let peer = inst.peer;
    let abort = || inst.abort();
    let mut report = |rows: &[Row], r: Result<Vec<f64>, BenchError>| -> Result<(), BenchError> {
        match r {
            Ok(v) => {
                for (row, x) in rows.iter().zip(v) {
                    record(*row, Ok(x));
                }
                Ok(())
            }
            Err(BenchError::Interrupted) => Err(BenchError::Interrupted),
            Err(e) => {
                eprintln!("molt-bench: {} {}: {e}", peer.key(), rows[0].key());
                for row in rows {
                    record(*row, Err(e.to_string()));
                }
                Ok(())
            }
        }
    };

    // Files live in the mount, or for the raw peer in the image file itself.
    let file = |name: &str| match inst.target() {
        Some(d) => d.join(name),
        None => inst.image.clone(),
    };
    let remove = |name: &str| {
        if inst.target().is_some() {
            let _ = std::fs::remove_file(file(name));
        }
    };

    let rand = file("rand.dat");
    for (row, rw, qd) in [
        (Row::RandRead1, "randread", 1),
        (Row::RandRead32, "randread", 32),
        (Row::RandWrite1, "randwrite", 1),
        (Row::RandWrite32, "randwrite", 32),
        (Row::RandMix1, "randrw", 1),
        (Row::RandMix32, "randrw", 32),
    ] {
        let job = FioJob {
            file: &rand,
            size: sizes.rand_file,
            rw,
            bs: "4k",
            engine: "io_uring",
            iodepth: qd,
            direct: true,
            timed: true,
            extra: &[],
        };
        report(&[row], job.run(sizes, &abort).map(|r| vec![r.iops]))?;
    }
    remove("rand.dat");

    let seq = file("seq.dat");
    for (row, rw) in [(Row::SeqReadDirect, "read"), (Row::SeqWriteDirect, "write")] {
        let job = FioJob {
            file: &seq,
            size: sizes.seq_file,
            rw,
            bs: "1M",
            engine: "io_uring",
            iodepth: 8,
            direct: true,
            timed: true,
            extra: &[],
        };
        report(&[row], job.run(sizes, &abort).map(|r| vec![r.mib_per_sec]))?;
    }
    remove("seq.dat");
    if peer == Peer::Raw {
        return Ok(());
    }

    // One pass each: the write creates the file and ends with fsync (its time counts);
    // the read starts with the caches dropped.
    let seqb = file("seqb.dat");
    for (row, rw, extra) in [
        (Row::SeqWriteBuffered, "write", &["--end_fsync=1"][..]),
        (Row::SeqReadBuffered, "read", &[][..]),
    ] {
        let job = FioJob {
            file: &seqb,
            size: sizes.seq_file,
            rw,
            bs: "1M",
            engine: "psync",
            iodepth: 1,
            direct: false,
            timed: false,
            extra,
        };
        report(&[row], job.run(sizes, &abort).map(|r| vec![r.mib_per_sec]))?;
    }
    remove("seqb.dat");

    // A database log: each 512-byte write extends the file and is followed by fdatasync.
    let log = file("log.dat");
    let job = FioJob {
        file: &log,
        size: 1 << 30,
        rw: "write",
        bs: "512",
        engine: "sync",
        iodepth: 1,
        direct: false,
        timed: false,
        extra: &["--fdatasync=1", "--fallocate=none"],
    };
    report(&[Row::Append], job.run(sizes, &abort).map(|r| vec![r.iops]))?;
    remove("log.dat");

    let dir = inst.target().expect("file peers have a mount");
    report(
        &[Row::Create, Row::Stat, Row::Unlink],
        metadata_job(self_exe, &dir.join("meta"), sizes, &abort),
    )?;

    if let Some(t) = tarball {
        report(
            &[Row::Untar],
            untar_job(t, &dir.join("untar"), sizes, &abort),
        )?;
    }
    Ok(())
}

struct FioJob<'a> {
    file: &'a Path,
    size: u64,
    rw: &'a str,
    bs: &'a str,
    engine: &'a str,
    iodepth: u32,
    direct: bool,
    /// Run for the whole runtime (looping over the file) rather than one pass.
    timed: bool,
    extra: &'a [&'a str],
}

/// What is read from fio's JSON report.
pub struct FioResult {
    /// Read plus write operations per second.
    pub iops: f64,
    /// Read plus write MiB per second.
    pub mib_per_sec: f64,
}

impl FioJob<'_> {
    fn run(&self, sizes: &Sizes, abort: &dyn Fn()) -> Result<FioResult, BenchError> {
        drop_caches(abort)?;
        let report = report_path();
        let mut cmd = Command::new(which("fio").unwrap_or_else(|| "fio".into()));
        cmd.arg("--name=bench")
            .arg(format!("--filename={}", self.file.display()))
            .arg(format!("--size={}", self.size))
            .arg(format!("--rw={}", self.rw))
            .arg(format!("--bs={}", self.bs))
            .arg(format!("--ioengine={}", self.engine))
            .arg(format!("--iodepth={}", self.iodepth))
            .arg(format!("--direct={}", u8::from(self.direct)))
            .arg(format!("--runtime={}", sizes.runtime.as_secs().max(1)))
            .args(["--rwmixread=50", "--norandommap", "--randrepeat=0"])
            .args(["--output-format=json", "--invalidate=1"])
            .arg(format!("--output={}", report.display()))
            .args(self.extra)
            .current_dir(std::env::temp_dir());
        if self.timed {
            cmd.arg("--time_based");
        }
        let fin = run(&mut cmd, sizes.runtime + sizes.slack, abort);
        let text = std::fs::read_to_string(&report).unwrap_or_default();
        let _ = std::fs::remove_file(&report);
        let fin = fin?;
        if !fin.status.success() {
            return Err(BenchError::Failed {
                what: format!("fio {} {}", self.rw, self.bs),
                detail: format!("{}: {}{}{text}", fin.status, fin.stdout, fin.stderr),
            });
        }
        parse_fio(&text)
    }
}

/// fio writes its report outside the file system under test.
fn report_path() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "molt-bench-{}-fio-{}.json",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Sums reads and writes of the one job in a fio JSON report.
pub fn parse_fio(text: &str) -> Result<FioResult, BenchError> {
    let bad = |detail: String| BenchError::Failed {
        what: "fio report".into(),
        detail,
    };
    // fio may print notices before the JSON document.
    let start = text
        .find('{')
        .ok_or_else(|| bad(format!("no JSON: {text}")))?;
    let v: serde_json::Value =
        serde_json::from_str(&text[start..]).map_err(|e| bad(format!("{e}: {text}")))?;
    let job = &v["jobs"][0];
    if job.is_null() {
        return Err(bad(format!("no job: {text}")));
    }
    if job["error"].as_i64().unwrap_or(0) != 0 {
        return Err(bad(format!("job error {}", job["error"])));
    }
    let mut iops = 0.0;
    let mut bytes = 0.0;
    for dir in ["read", "write"] {
        iops += job[dir]["iops"].as_f64().unwrap_or(0.0);
        bytes += job[dir]["bw_bytes"].as_f64().unwrap_or(0.0);
    }
    if iops <= 0.0 {
        return Err(bad("no I/O completed".into()));
    }
    Ok(FioResult {
        iops,
        mib_per_sec: bytes / f64::from(1 << 20),
    })
}

/// Runs the metadata routine in a child process (`molt-bench metadata`), so that a
/// request the file system never answers is bounded by the same deadline and abort as fio.
fn metadata_job(
    self_exe: &Path,
    dir: &Path,
    sizes: &Sizes,
    abort: &dyn Fn(),
) -> Result<Vec<f64>, BenchError> {
    drop_caches(abort)?;
    let fin = run(
        Command::new(self_exe)
            .arg("metadata")
            .arg("--dir")
            .arg(dir)
            .arg("--files")
            .arg(sizes.meta_files.to_string())
            .arg("--rounds")
            .arg(sizes.meta_rounds.to_string()),
        sizes.meta_deadline,
        abort,
    )
    .and_then(|f| f.success("molt-bench metadata"));
    let fin = match fin {
        Ok(f) => f,
        Err(e) => {
            // Leave the file system empty for the jobs after this one.
            let _ = run(
                Command::new("rm").arg("-rf").arg(dir),
                sizes.meta_deadline,
                abort,
            );
            return Err(e);
        }
    };
    let r: super::metadata::MetadataResult =
        serde_json::from_str(fin.stdout.trim()).map_err(|e| BenchError::Failed {
            what: "molt-bench metadata".into(),
            detail: format!("{e}: {}", fin.stdout),
        })?;
    Ok(vec![r.create_per_sec, r.stat_per_sec, r.unlink_per_sec])
}

/// `tar -xf` onto the target, then syncfs; both are timed. The tree is removed after.
fn untar_job(
    t: &Tarball,
    dest: &Path,
    sizes: &Sizes,
    abort: &dyn Fn(),
) -> Result<Vec<f64>, BenchError> {
    drop_caches(abort)?;
    std::fs::create_dir(dest).map_err(|e| BenchError::io(dest, e))?;
    let r = untar_timed(t, dest, sizes, abort);
    let removed = run(
        Command::new("rm").arg("-rf").arg(dest),
        sizes.tar_deadline,
        abort,
    );
    let secs = r?;
    removed?.success("rm -rf")?;
    Ok(vec![t.bytes as f64 / f64::from(1 << 20) / secs.max(1e-9)])
}

/// Seconds to unpack and sync, after checking every file arrived.
fn untar_timed(
    t: &Tarball,
    dest: &Path,
    sizes: &Sizes,
    abort: &dyn Fn(),
) -> Result<f64, BenchError> {
    let start = Instant::now();
    run(
        Command::new("tar")
            .arg("-xf")
            .arg(&t.path)
            .arg("--no-same-owner")
            .arg("-C")
            .arg(dest),
        sizes.tar_deadline,
        abort,
    )?
    .success("tar -xf")?;
    run(
        Command::new("sync").arg("-f").arg(dest),
        sizes.tar_deadline,
        abort,
    )?
    .success("sync -f")?;
    let secs = start.elapsed().as_secs_f64();
    let n = count_files(dest);
    if n != t.files {
        return Err(BenchError::Failed {
            what: "tar -xf".into(),
            detail: format!("{n} files unpacked, {} expected", t.files),
        });
    }
    Ok(secs)
}

fn count_files(dir: &Path) -> u64 {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => n += 1,
                _ => {}
            }
        }
    }
    n
}
