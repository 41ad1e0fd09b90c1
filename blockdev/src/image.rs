//! The backing image: a regular file, a block device, or an NBD export (named by an NBD
//! URI, see [`crate::nbd::uri`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::nbd::{NbdConnection, NbdError, NbdTarget, NbdUri};
use crate::BLOCK_SIZE;
use molt_sys as sys;

/// How the image implements discard so that discarded blocks read back as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DiscardMode {
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`.
    PunchHole,
    /// The backing cannot punch holes: write zeros instead.
    WriteZeros,
}

/// An open image with its geometry.
#[derive(Debug)]
pub struct Image {
    /// The file or device; for an NBD export, the connected socket (in the transmission
    /// phase), which is what a driver process is handed.
    file: File,
    num_blocks: u64,
    discard: DiscardMode,
    nbd: Option<NbdTarget>,
}

impl Image {
    /// Opens `name`: an NBD URI is connected and negotiated, anything else is a path
    /// ([`Image::open`]).
    pub fn open_named(name: &Path) -> io::Result<Image> {
        match name.to_str().filter(|s| NbdUri::is_nbd(s)) {
            Some(s) => Image::connect_nbd(&NbdUri::parse(s).map_err(NbdError::from)?),
            None => Image::open(name),
        }
    }

    /// Connects to an NBD export.
    pub fn connect_nbd(uri: &NbdUri) -> io::Result<Image> {
        let conn = NbdConnection::connect(uri)?;
        let target = conn.target.clone();
        Ok(Image {
            file: File::from(conn.into_fd()),
            num_blocks: target.num_blocks(),
            discard: DiscardMode::WriteZeros,
            nbd: Some(target),
        })
    }

    /// An NBD connection already in the transmission phase with `target` (handed over by
    /// a previous supervisor).
    pub fn from_connected_nbd(fd: OwnedFd, target: NbdTarget) -> Image {
        Image {
            file: File::from(fd),
            num_blocks: target.num_blocks(),
            discard: DiscardMode::WriteZeros,
            nbd: Some(target),
        }
    }

    /// For an NBD image, a new connection to the same export (the old one is closed
    /// first: a server may allow one client at a time). Refuses an export that shrank.
    /// A file image is returned as it is.
    pub fn reconnect(self) -> io::Result<Image> {
        let Some(target) = self.nbd.clone() else {
            return Ok(self);
        };
        drop(self);
        let new = Image::connect_nbd(&target.uri)?;
        if new.num_blocks < target.num_blocks() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: the export shrank from {} to {} blocks",
                    target.uri,
                    target.num_blocks(),
                    new.num_blocks
                ),
            ));
        }
        Ok(new)
    }

    /// The NBD export this image is, if it is one.
    pub fn nbd(&self) -> Option<&NbdTarget> {
        self.nbd.as_ref()
    }

    /// Opens `path` read-write, with `O_DIRECT` when the filesystem supports it.
    pub fn open(path: &Path) -> io::Result<Image> {
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(path);
        let file = match direct {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)?,
            Err(e) => return Err(e),
        };
        Image::from_file(file)
    }

    /// Opens `path` read-only (for a read-only mount: a write through this descriptor
    /// fails with EBADF), with `O_DIRECT` when the filesystem supports it.
    pub fn open_read_only(path: &Path) -> io::Result<Image> {
        let open = |flags| {
            OpenOptions::new()
                .read(true)
                .custom_flags(flags | libc::O_CLOEXEC)
                .open(path)
        };
        let file = match open(libc::O_DIRECT) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(0)?,
            Err(e) => return Err(e),
        };
        Image::from_file(file)
    }

    /// Adopts an already open image descriptor (e.g. inherited from the supervisor).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Image> {
        Image::from_file(File::from(fd))
    }

    fn from_file(file: File) -> io::Result<Image> {
        let meta = file.metadata()?;
        let bytes = if meta.file_type().is_block_device() {
            sys::block_device_size(file.as_fd())?
        } else if meta.file_type().is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "image must be a regular file or a block device",
            ));
        };
        let discard = probe_discard(&file, bytes, meta.file_type().is_block_device());
        Ok(Image {
            file,
            num_blocks: bytes / BLOCK_SIZE as u64,
            discard,
            nbd: None,
        })
    }

    /// Number of whole blocks on the image (a partial tail block is not addressable).
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    /// Whether the image was opened with `O_DIRECT` (tests report it).
    #[cfg(test)]
    pub(crate) fn is_direct(&self) -> bool {
        sys::status_flags(self.file.as_fd()).is_ok_and(|f| f & libc::O_DIRECT != 0)
    }

    pub(crate) fn discard_mode(&self) -> DiscardMode {
        self.discard
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Decides how to discard without touching data: punching a hole past the end of a
/// regular file is a no-op where it is supported and `EOPNOTSUPP` where it is not.
/// Block devices support `PUNCH_HOLE | KEEP_SIZE` (zeroing) in every kernel we target.
fn probe_discard(file: &File, bytes: u64, is_blockdev: bool) -> DiscardMode {
    if is_blockdev {
        return DiscardMode::PunchHole;
    }
    let end = bytes.next_multiple_of(BLOCK_SIZE as u64);
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    match sys::fallocate(file.as_fd(), mode, end, BLOCK_SIZE as u64) {
        Ok(()) => DiscardMode::PunchHole,
        Err(_) => DiscardMode::WriteZeros,
    }
}

impl Image {
    /// Overrides how discards are carried out (tests exercise both ways).
    #[cfg(test)]
    pub(crate) fn with_discard_mode(mut self, mode: DiscardMode) -> Image {
        self.discard = mode;
        self
    }
}

/// A temporary image file, deleted on drop (tests and benchmarks).
#[derive(Debug)]
pub struct ScratchImage {
    path: std::path::PathBuf,
}

impl ScratchImage {
    /// Creates a zero-filled (sparse) image of `nblocks` blocks in the temp directory.
    pub fn create(nblocks: u64) -> io::Result<ScratchImage> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "molt-blockdev-{}-{}.img",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        let f = File::create(&path)?;
        f.set_len(nblocks * BLOCK_SIZE as u64)?;
        Ok(ScratchImage { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn open(&self) -> io::Result<Image> {
        Image::open(&self.path)
    }

    /// The whole file, read with ordinary buffered I/O.
    pub fn contents(&self) -> io::Result<Vec<u8>> {
        std::fs::read(&self.path)
    }
}

impl Drop for ScratchImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
