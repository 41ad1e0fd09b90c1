//! The metadata job: create, stat and unlink many small files, one thread, one phase
//! after the other, in rounds (a 1 GiB Molt image holds 65,536 inodes, so 100,000 files
//! do not fit at once). Files are spread over directories of [`FILES_PER_DIR`]. The
//! create and unlink phases end with `syncfs`, whose time counts.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::BenchError;

pub const FILES_PER_DIR: u64 = 1000;
/// Bytes written into each file.
pub const FILE_BYTES: usize = 64;

/// Operations per second of each phase.
#[derive(Debug, Serialize, Deserialize)]
pub struct MetadataResult {
    pub files: u64,
    pub create_per_sec: f64,
    pub stat_per_sec: f64,
    pub unlink_per_sec: f64,
}

fn path_c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("paths built here have no NUL")
}

fn os_err(what: &str, p: &Path, e: rustix::io::Errno) -> BenchError {
    BenchError::io(p, e.into()).context(what)
}

fn file_path(dir: &Path, i: u64) -> PathBuf {
    dir.join(format!("d{:04}", i / FILES_PER_DIR))
        .join(format!("f{:06}", i))
}

fn syncfs(dir: &Path) -> Result<(), BenchError> {
    let f = std::fs::File::open(dir).map_err(|e| BenchError::io(dir, e))?;
    rustix::fs::syncfs(&f).map_err(|e| os_err("syncfs", dir, e))
}

/// Runs `rounds` rounds of the three phases over `files / rounds` files each, in `dir`
/// (created; must not exist), and removes it after. Rates are over all rounds.
pub fn run(dir: &Path, files: u64, rounds: u64) -> Result<MetadataResult, BenchError> {
    std::fs::create_dir(dir).map_err(|e| BenchError::io(dir, e))?;
    let per_round = files / rounds.max(1);
    let (mut create, mut stat, mut unlink) = (0.0, 0.0, 0.0);
    for r in 0..rounds.max(1) {
        let round = dir.join(format!("r{r}"));
        std::fs::create_dir(&round).map_err(|e| BenchError::io(&round, e))?;
        let t = round_phases(&round, per_round)?;
        create += t.0;
        stat += t.1;
        unlink += t.2;
    }
    std::fs::remove_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
    let total = per_round * rounds.max(1);
    let rate = |secs: f64| total as f64 / secs.max(1e-9);
    Ok(MetadataResult {
        files: total,
        create_per_sec: rate(create),
        stat_per_sec: rate(stat),
        unlink_per_sec: rate(unlink),
    })
}

/// One round: seconds spent creating, stating and unlinking `files` files in `dir`.
fn round_phases(dir: &Path, files: u64) -> Result<(f64, f64, f64), BenchError> {
    let payload = [b'm'; FILE_BYTES];

    let start = Instant::now();
    for i in 0..files {
        if i % FILES_PER_DIR == 0 {
            let d = dir.join(format!("d{:04}", i / FILES_PER_DIR));
            std::fs::create_dir(&d).map_err(|e| BenchError::io(&d, e))?;
        }
        let p = file_path(dir, i);
        let c = path_c(&p);
        // Plain open(2), write(2) and close(2): what the benchmark measures.
        use rustix::fs::{Mode, OFlags};
        let fd = rustix::fs::open(
            c.as_c_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map_err(|e| os_err("create", &p, e))?;
        let write_err = match rustix::io::write(&fd, &payload) {
            Ok(n) if n == FILE_BYTES => None,
            Ok(n) => Some(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("wrote {n} of {FILE_BYTES} bytes"),
            )),
            Err(e) => Some(e.into()),
        };
        let closed = molt_sys::close(fd);
        if let Some(e) = write_err {
            return Err(BenchError::io(&p, e).context("write"));
        }
        if let Err(e) = closed {
            return Err(BenchError::io(&p, e).context("close"));
        }
    }
    syncfs(dir)?;
    let create = start.elapsed().as_secs_f64();

    let start = Instant::now();
    for i in 0..files {
        let p = file_path(dir, i);
        let m = std::fs::symlink_metadata(&p).map_err(|e| BenchError::io(&p, e))?;
        if m.len() != FILE_BYTES as u64 {
            return Err(BenchError::Failed {
                what: "stat".into(),
                detail: format!("{} has {} bytes, not {FILE_BYTES}", p.display(), m.len()),
            });
        }
    }
    let stat = start.elapsed().as_secs_f64();

    let start = Instant::now();
    for i in 0..files {
        let p = file_path(dir, i);
        std::fs::remove_file(&p).map_err(|e| BenchError::io(&p, e))?;
    }
    syncfs(dir)?;
    let unlink = start.elapsed().as_secs_f64();
    Ok((create, stat, unlink))
}
