//! The data files and the aligned buffers that I/O goes through.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::config::StressConfig;
use super::error::{Result, StressError};

/// Path of data file `file` below the run directory `dir`.
pub fn data_file_path(dir: &Path, file: u32) -> PathBuf {
    dir.join(data_file_rel(file))
}

/// Path of data file `file` relative to the run directory.
pub fn data_file_rel(file: u32) -> String {
    format!("data/f{file:06}")
}

/// The data files, the first `held` of them open for the whole run.
pub struct FileSet {
    dir: PathBuf,
    direct: bool,
    held: Vec<File>,
}

fn setup_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StressError {
    let path = path.to_path_buf();
    move |source| StressError::Setup { what, path, source }
}

impl FileSet {
    /// Creates `data/` and, unless `existing`, creates every file afresh (all zeros,
    /// full size); then opens the held files.
    pub fn setup(cfg: &StressConfig, existing: bool) -> Result<FileSet> {
        let md = fs::metadata(&cfg.dir).map_err(setup_err("run directory", &cfg.dir))?;
        if !md.is_dir() {
            return Err(StressError::Setup {
                what: "run directory",
                path: cfg.dir.clone(),
                source: std::io::Error::from_raw_os_error(libc::ENOTDIR),
            });
        }
        let data = cfg.dir.join("data");
        fs::create_dir_all(&data).map_err(setup_err("creating", &data))?;
        if !existing {
            for id in 0..cfg.files {
                let p = data_file_path(&cfg.dir, id);
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&p)
                    .map_err(setup_err("creating", &p))?;
                f.set_len(cfg.file_size).map_err(setup_err("sizing", &p))?;
            }
        }
        let mut set = FileSet {
            dir: cfg.dir.clone(),
            direct: cfg.direct,
            held: Vec::new(),
        };
        for id in 0..cfg.held_files() {
            let p = data_file_path(&cfg.dir, id);
            let f = set.open(id).map_err(setup_err("opening", &p))?;
            set.held.push(f);
        }
        Ok(set)
    }

    pub fn held(&self, file: u32) -> Option<&File> {
        self.held.get(file as usize)
    }

    /// Opens a data file for I/O with the run's flags.
    pub fn open(&self, file: u32) -> std::io::Result<File> {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if self.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(data_file_path(&self.dir, file))
    }
}

/// A heap buffer whose usable part starts on a 4096-byte boundary (for `O_DIRECT`).
/// The heap allocation never moves, so its address stays valid while `self` lives,
/// wherever `self` is moved.
pub struct AlignedBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    pub const ALIGN: usize = 4096;

    pub fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + Self::ALIGN];
        let addr = raw.as_ptr() as usize;
        let off = (Self::ALIGN - addr % Self::ALIGN) % Self::ALIGN;
        AlignedBuf { raw, off, len }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }

    /// The whole allocation and the usable range in it (to hand the buffer to a ring).
    pub fn into_parts(self) -> (Vec<u8>, std::ops::Range<usize>) {
        (self.raw, self.off..self.off + self.len)
    }

    /// Back from [`AlignedBuf::into_parts`].
    pub fn from_parts(raw: Vec<u8>, range: std::ops::Range<usize>) -> AlignedBuf {
        AlignedBuf {
            raw,
            off: range.start,
            len: range.end - range.start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffer_is_aligned() {
        for len in [64, 4096, 12288] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().as_ptr() as usize % AlignedBuf::ALIGN, 0);
            assert_eq!(b.as_mut_slice().len(), len);
        }
    }
}
