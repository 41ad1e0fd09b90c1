//! What the `fsd` binary does for each subcommand, kept in the library so it is testable;
//! `main.rs` only parses arguments and maps results to exit codes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use std::sync::Arc;

use formats::superblock::{Geometry, Superblock};
use formats::version::FormatVersion;
use formats::BLOCK_SIZE;

use fsd_core::fs::{Fs, FsError, Progress};
use fsd_core::fsck::{self, FsckOptions, FsckReport};
use fsd_core::mkfs::{self, MkfsError, MkfsOptions};
use fsd_core::store::{self, FileStore};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("invalid size {0:?}: expected a number with an optional K, M, G or T suffix (powers of 1024)")]
    BadSize(String),
    #[error("size {0} is not a multiple of the {BLOCK_SIZE}-byte block size")]
    Unaligned(u64),
    #[error("{path} is a block device of {device} bytes; --size {asked} does not match")]
    DeviceSizeMismatch {
        path: String,
        device: u64,
        asked: u64,
    },
    #[error("{0} does not exist or is empty: give --size")]
    NeedSize(String),
    #[error("{path} is neither a regular file nor a block device")]
    NotAnImageFile { path: String },
    #[error(transparent)]
    Mkfs(#[from] MkfsError),
    #[error("format version {0} is not one this build knows (1 to {max})", max = FormatVersion::CURRENT.0)]
    BadVersion(u32),
    #[error("{0} is in use by a mount (unmount it first)")]
    InUse(String),
    #[error("{path}: converting to format v{to} needs {needed} bytes free, the image has {free}")]
    NoSpace {
        path: String,
        to: u32,
        needed: u64,
        free: u64,
    },
    #[error("{path}: {why}")]
    Refused { path: String, why: String },
    #[error("{path}: {source}")]
    Fs { path: String, source: FsError },
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
}

/// Parses sizes like `4096`, `64M`, `1G`, `1T` (binary multiples; a trailing `B` or `iB`
/// is accepted).
pub fn parse_size(s: &str) -> Result<u64, CliError> {
    let bad = || CliError::BadSize(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// What `fsd mkfs` made.
pub struct MkfsOutcome {
    pub superblock: Superblock,
    pub bytes: u64,
}

impl MkfsOutcome {
    /// The `--json` report: one object describing the filesystem made on `image`. `inodes`
    /// counts the inode slots (the inode table's size), not the inodes in use.
    pub fn to_json(&self, image: &str) -> serde_json::Value {
        let sb = &self.superblock;
        let g = &sb.geometry;
        let uuid = formats::hex::encode(&sb.uuid);
        serde_json::json!({
            "image": image,
            "bytes": self.bytes,
            "block_size": BLOCK_SIZE,
            "blocks": g.total_blocks,
            "inodes": g.inode_count,
            "free_blocks": sb.free_blocks,
            "free_inodes": sb.free_inodes,
            "format_version": sb.format_version.0,
            "uuid": uuid,
        })
    }
}

/// A format version given on the command line.
pub fn parse_version(n: u32) -> Result<FormatVersion, CliError> {
    let v = FormatVersion(n);
    if v.is_supported() {
        Ok(v)
    } else {
        Err(CliError::BadVersion(n))
    }
}

/// `fsd mkfs IMAGE [--size SIZE] [--force] [--format-version N]`: a regular file (made
/// sparse, created if missing) gets `size` bytes; a block device keeps its own size,
/// which `size` must match.
pub fn mkfs_image(
    path: &Path,
    size: Option<u64>,
    force: bool,
    version: FormatVersion,
) -> Result<MkfsOutcome, CliError> {
    if fsd_server::host::is_nbd_name(path) {
        return mkfs_nbd(path, size, force, version);
    }
    let name = path.display().to_string();
    let io_err = |source| CliError::Io {
        path: name.clone(),
        source,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(e)),
    };
    let is_device = meta
        .as_ref()
        .is_some_and(|m| m.file_type().is_block_device());
    if meta
        .as_ref()
        .is_some_and(|m| !m.is_file() && !m.file_type().is_block_device())
    {
        return Err(CliError::NotAnImageFile { path: name });
    }
    let file_len = meta.as_ref().map(|m| m.len()).unwrap_or(0);

    if is_device {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err)?;
        let device = store::device_size(&file).map_err(io_err)?;
        if let Some(asked) = size {
            if asked != device {
                return Err(CliError::DeviceSizeMismatch {
                    path: name,
                    device,
                    asked,
                });
            }
        }
        return format(file, &name, device, force, version);
    }

    let bytes = match size {
        Some(s) => s,
        None if file_len > 0 => file_len,
        None => return Err(CliError::NeedSize(name)),
    };
    if bytes % BLOCK_SIZE as u64 != 0 {
        return Err(CliError::Unaligned(bytes));
    }
    // Refuse sizes the version cannot hold before touching the file.
    Geometry::for_version(bytes / BLOCK_SIZE as u64, version)
        .map_err(|e| CliError::Mkfs(MkfsError::Size(e)))?;
    if meta.is_some() && !force {
        let existing = FileStore::open(path, false).map_err(io_err)?;
        if mkfs::has_molt_magic(&existing).map_err(io_err)? {
            return Err(MkfsError::ExistingImage(name).into());
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err)?;
    file.set_len(bytes).map_err(io_err)?;
    format(file, &name, bytes, force, version)
}

fn format(
    file: File,
    name: &str,
    bytes: u64,
    force: bool,
    version: FormatVersion,
) -> Result<MkfsOutcome, CliError> {
    let io_err = |source| CliError::Io {
        path: name.to_string(),
        source,
    };
    // The root directory belongs to whoever owns the image.
    let m = file.metadata().map_err(io_err)?;
    let store = FileStore::new(file).map_err(io_err)?;
    let opts = MkfsOptions {
        force,
        uid: m.uid(),
        gid: m.gid(),
        version,
    };
    let superblock = mkfs::mkfs(&store, name, &opts)?;
    Ok(MkfsOutcome { superblock, bytes })
}

/// `fsd mkfs nbd://…`: the export keeps its own size, which `size` must match if given.
/// The root directory belongs to whoever runs mkfs.
fn mkfs_nbd(
    path: &Path,
    size: Option<u64>,
    force: bool,
    version: FormatVersion,
) -> Result<MkfsOutcome, CliError> {
    let name = path.display().to_string();
    let io_err = |source| CliError::Io {
        path: name.clone(),
        source,
    };
    let uri = blockdev::nbd::NbdUri::parse(&name)
        .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidInput, e.to_string())))?;
    let store = fsd_server::host::NbdStore::connect(&uri).map_err(io_err)?;
    let bytes = store.size();
    if let Some(asked) = size.filter(|&s| s != bytes) {
        return Err(CliError::DeviceSizeMismatch {
            path: name,
            device: bytes,
            asked,
        });
    }
    Geometry::for_version(bytes / BLOCK_SIZE as u64, version)
        .map_err(|e| CliError::Mkfs(MkfsError::Size(e)))?;
    // Who runs mkfs, as /proc reports it (the process's own directory is its owner's).
    let me = std::fs::metadata("/proc/self").map_err(io_err)?;
    let opts = MkfsOptions {
        force,
        uid: me.uid(),
        gid: me.gid(),
        version,
    };
    let superblock = mkfs::mkfs(&store, &name, &opts)?;
    Ok(MkfsOutcome { superblock, bytes })
}

/// What `fsd convert` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertOutcome {
    pub from: FormatVersion,
    pub to: FormatVersion,
    /// A conversion an earlier run left half-done was finished.
    pub resumed: bool,
    /// Bytes of metadata rewritten in the new layout.
    pub bytes_moved: u64,
}

/// Live inodes one conversion step converts.
pub const CONVERT_BATCH: u64 = 256;

/// `fsd convert IMAGE --to N`: converts an unmounted image to format `to`, or finishes
/// the conversion an interrupted run left. Refuses an image a mount holds (the lock
/// `fsd mount` takes) and one whose free space is below what the conversion needs.
/// `progress` sees every step.
pub fn convert_image(
    path: &Path,
    to: FormatVersion,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ConvertOutcome, CliError> {
    let name = path.display().to_string();
    let io_err = |source| CliError::Io {
        path: name.clone(),
        source,
    };
    let fs_err = |source| CliError::Fs {
        path: name.clone(),
        source,
    };
    let refused = |why: String| CliError::Refused {
        path: name.clone(),
        why,
    };
    // Held until this function returns: the lock lives as long as a descriptor does. An
    // NBD export has no lock here: its server decides who may connect.
    let (store, lock) = open_locked(path).map_err(io_err)?;
    if lock.as_ref().is_some_and(Option::is_none) {
        return Err(CliError::InUse(name));
    }
    let fs = Fs::mount(store).map_err(fs_err)?;
    let from = fs.format_version();
    // Why the image is not converted, if it is not; it is unmounted cleanly then.
    let refusal = match fs.conversion_target() {
        Some(t) if t != to => Some(refused(format!(
            "a conversion from format v{} to v{} is in progress; finish it with --to {}",
            from.0, t.0, t.0
        ))),
        None if to < from => Some(refused(format!(
            "the image has format v{}; it cannot be converted to the older v{}",
            from.0, to.0
        ))),
        _ if to > from => {
            let needed = fs.conversion_space_needed(to).map_err(fs_err)?;
            let free = fs.statfs().free_blocks * BLOCK_SIZE as u64;
            (free < needed).then(|| CliError::NoSpace {
                path: name.clone(),
                to: to.0,
                needed,
                free,
            })
        }
        _ => None,
    };
    if let Some(e) = refusal {
        fs.unmount().map_err(fs_err)?;
        return Err(e);
    }
    let resumed = fs.conversion_target().is_some();
    fs.start_conversion(to).map_err(fs_err)?;
    let mut bytes_moved = 0;
    loop {
        let p = fs.convert_step(CONVERT_BATCH).map_err(fs_err)?;
        bytes_moved += p.bytes_moved;
        progress(&p);
        if p.finished {
            break;
        }
    }
    fs.unmount().map_err(fs_err)?;
    drop(lock);
    Ok(ConvertOutcome {
        from,
        to,
        resumed,
        bytes_moved,
    })
}

/// Opens an image read-write for conversion with the lock `fsd mount` takes: `None` for
/// an NBD export (no lock), `Some(None)` when a mount holds the lock, else the lock.
#[allow(clippy::type_complexity)]
fn open_locked(path: &Path) -> io::Result<(Arc<dyn store::BlockStore>, Option<Option<File>>)> {
    if fsd_server::host::is_nbd_name(path) {
        return Ok((fsd_server::host::open_store(path, true)?.into(), None));
    }
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let lock = file.try_clone()?;
    if !fsd_server::host::try_lock_exclusive(&lock)? {
        return Ok((Arc::new(FileStore::new(file)?), Some(None)));
    }
    Ok((Arc::new(FileStore::new(file)?), Some(Some(lock))))
}

/// `fsd fsck IMAGE [--repair]`: opens the image (writable only to repair; an NBD URI is
/// connected) and checks it. A mount holds a lock on its image file until its stack has
/// made the image clean and exited, which finishes just after a plain `umount` returns:
/// fsck waits for that (up to [`UNMOUNT_WAIT`]), then checks. A repair holds the lock
/// while it runs, so no mount starts meanwhile. An NBD export has no lock.
pub fn fsck_image(path: &Path, repair: bool) -> Result<FsckReport, fsck::FsckError> {
    let _lock = wait_for_unmount(path);
    let store = fsd_server::host::open_store(path, repair)?;
    fsck::check(&*store, &FsckOptions { repair })
}

/// How long fsck waits for a mount of the image to finish.
pub const UNMOUNT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits until no mount holds `path`'s lock (or [`UNMOUNT_WAIT`] passed, saying so), and
/// returns the lock, held for as long as the returned file lives.
fn wait_for_unmount(path: &Path) -> Option<File> {
    let file = File::open(path).ok()?;
    let deadline = std::time::Instant::now() + UNMOUNT_WAIT;
    loop {
        match fsd_server::host::try_lock_exclusive(&file) {
            Ok(true) => return Some(file),
            Ok(false) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Ok(false) => {
                molt_sys::errln!(
                    "fsd fsck: {} is in use by a mount; checking what is on the image now",
                    path.display()
                );
                return None;
            }
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("100K").unwrap(), 100 << 10);
        for bad in ["", "M", "1.5G", "-1", "12X", "99999999999P"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
