//! The source tarball the unpack job extracts: a generated tree shaped like a source
//! checkout (nested directories, many small files, sizes spread log-uniformly), packed
//! once with `tar -cf` into memory-backed storage, so reading it costs the same for every
//! peer and survives the cache drops between jobs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::run_ok;
use super::BenchError;
use crate::harness::TestRng;

/// Smallest and largest generated file, in bytes.
const MIN_FILE: f64 = 256.0;
const MAX_FILE: f64 = 48.0 * 1024.0;
const FILES_PER_DIR: u64 = 100;
const DIRS_PER_PARENT: u64 = 10;

pub struct Tarball {
    pub path: PathBuf,
    /// Regular files in the archive.
    pub files: u64,
    /// Bytes of file content (what the MiB/s figure counts).
    pub bytes: u64,
}

impl Tarball {
    /// Generates `files` files under `work`, packs them into `work/src.tar` and removes the
    /// tree.
    pub fn create(work: &Path, files: u64) -> Result<Tarball, BenchError> {
        let tree = work.join("src");
        std::fs::create_dir_all(&tree).map_err(|e| BenchError::io(&tree, e))?;
        let mut rng = TestRng::new(0x6d6f_6c74);
        let mut bytes = 0;
        let ratio = (MAX_FILE / MIN_FILE).ln();
        for i in 0..files {
            let d = i / FILES_PER_DIR;
            let dir = tree
                .join(format!("mod{:03}", d / DIRS_PER_PARENT))
                .join(format!("sub{:03}", d % DIRS_PER_PARENT));
            if i % FILES_PER_DIR == 0 {
                std::fs::create_dir_all(&dir).map_err(|e| BenchError::io(&dir, e))?;
            }
            let u = rng.below(1 << 20) as f64 / f64::from(1 << 20);
            let len = (MIN_FILE * (u * ratio).exp()) as usize;
            let p = dir.join(format!("file{i:06}.rs"));
            let mut f = std::fs::File::create(&p).map_err(|e| BenchError::io(&p, e))?;
            f.write_all(&text(&mut rng, len))
                .map_err(|e| BenchError::io(&p, e))?;
            bytes += len as u64;
        }
        let path = work.join("src.tar");
        run_ok(
            Command::new("tar")
                .arg("-cf")
                .arg(&path)
                .arg("-C")
                .arg(&tree)
                .arg("."),
            Duration::from_secs(600),
        )?;
        std::fs::remove_dir_all(&tree).map_err(|e| BenchError::io(&tree, e))?;
        Ok(Tarball { path, files, bytes })
    }
}

/// Printable bytes in lines, like source text.
fn text(rng: &mut TestRng, len: usize) -> Vec<u8> {
    let mut v = rng.bytes(len);
    for (i, b) in v.iter_mut().enumerate() {
        *b = if i % 64 == 63 {
            b'\n'
        } else {
            b' ' + (*b % 94)
        };
    }
    v
}
