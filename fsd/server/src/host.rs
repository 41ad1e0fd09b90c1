//! What the filesystem daemon needs from the operating system beyond `std`: the image's
//! exclusive lock, the redo log's shared memory, and the filesystem core's block store
//! over the blockdev ring.

use std::fs::File;
use std::io;

use fsd_core::fs::redo::{RedoLog, REDO_LOG_SIZE};
use fsd_core::store::BlockStore;

/// Takes the exclusive `flock` that `fsd mount` holds on an image for as long as it is
/// mounted, without waiting: `false` when another open description holds it. The lock
/// lasts while any descriptor of `file`'s open description stays open.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    molt_sys::try_lock_exclusive(std::os::fd::AsFd::as_fd(file))
}

/// A memfd of `REDO_LOG_SIZE` bytes for a new mount (the supervisor keeps it).
pub fn create_redo_log_file() -> io::Result<File> {
    molt_sys::memfd_create(c"molt-redo", REDO_LOG_SIZE)
}

/// The size of the connection record's memfd.
const SESSION_RECORD_SIZE: u64 = 4096;

/// A memfd for a new mount's connection record (the supervisor keeps it).
pub fn create_session_file() -> io::Result<File> {
    molt_sys::memfd_create(c"molt-session", SESSION_RECORD_SIZE)
}

/// Writes the connection record (its length, then the framed record) at the start of the
/// memfd. Written once, at INIT, before the INIT reply: a server that dies before it
/// leaves no record, and the kernel's INIT is then resent to its successor.
pub(crate) fn write_session_record(file: &File, record: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut out = Vec::with_capacity(4 + record.len());
    out.extend_from_slice(&(record.len() as u32).to_le_bytes());
    out.extend_from_slice(record);
    if out.len() as u64 > SESSION_RECORD_SIZE {
        return Err(io::Error::other(
            "the connection record does not fit its memfd",
        ));
    }
    file.write_all_at(&out, 0)
}

/// The connection record in the memfd; `None` if none was written (or it is damaged,
/// which the frame's crc tells).
pub(crate) fn read_session_record(file: &File) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut len = [0u8; 4];
    file.read_exact_at(&mut len, 0).ok()?;
    let len = u32::from_le_bytes(len) as u64;
    if len == 0 || len + 4 > SESSION_RECORD_SIZE {
        return None;
    }
    let mut record = vec![0u8; len as usize];
    file.read_exact_at(&mut record, 4).ok()?;
    Some(record)
}

/// Maps the redo log memfd `file` and opens the log in it.
pub(crate) fn open_redo_log(file: &File) -> io::Result<RedoLog> {
    // The memfd is shared only with the supervisor, which never writes it, and with a
    // successor that maps it only after this process stopped writing.
    let map = molt_sys::map_memfd(file)?;
    RedoLog::new(Box::new(map))
}

/// The blockdev driver, reached over the shared-memory ring, as the core's block store.
pub(crate) struct RingStore(pub std::sync::Arc<blockdev::Client>);

impl BlockStore for RingStore {
    fn num_blocks(&self) -> u64 {
        self.0.num_blocks()
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read(blockdev::Lba(addr), buf).map_err(block_error)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> io::Result<()> {
        self.0.write(blockdev::Lba(addr), buf).map_err(block_error)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush().map_err(block_error)
    }
    fn write_many(&self, writes: &[(u64, &[u8])]) -> io::Result<()> {
        let mut batch = self.0.batch();
        for (addr, buf) in writes {
            batch.write(blockdev::Lba(*addr), buf);
        }
        batch.run_all().map_err(block_error)
    }
    fn discard(&self, addr: u64, nblocks: u64) -> io::Result<()> {
        self.0
            .discard(blockdev::Lba(addr), nblocks)
            .map_err(block_error)
    }
}

fn block_error(e: blockdev::BlockError) -> io::Error {
    use blockdev::BlockError as B;
    let errno = match &e {
        B::OutOfRange { .. } | B::Misaligned(_) => libc::EINVAL,
        B::Io(_) | B::DriverGone(_) | B::Protocol(_) | B::Setup(_) => libc::EIO,
        B::Os(io) => io.raw_os_error().unwrap_or(libc::EIO),
    };
    io::Error::new(io::Error::from_raw_os_error(errno).kind(), e.to_string())
}

/// The filesystem core's block store over an NBD export, for tools (mkfs, fsck, convert,
/// the supervisor's checks): one request at a time.
pub struct NbdStore {
    client: blockdev::nbd::NbdClient,
}

impl NbdStore {
    pub fn connect(uri: &blockdev::nbd::NbdUri) -> io::Result<NbdStore> {
        Ok(NbdStore {
            client: blockdev::nbd::NbdClient::connect(uri)?,
        })
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.client.size()
    }

    fn offset(addr: u64) -> io::Result<u64> {
        addr.checked_mul(formats::BLOCK_SIZE as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "block address overflows"))
    }
}

impl BlockStore for NbdStore {
    fn num_blocks(&self) -> u64 {
        self.client.target().num_blocks()
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.client.read_at(NbdStore::offset(addr)?, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> io::Result<()> {
        self.client.write_at(NbdStore::offset(addr)?, buf)
    }
    fn flush(&self) -> io::Result<()> {
        self.client.flush()
    }
    fn discard(&self, addr: u64, nblocks: u64) -> io::Result<()> {
        let len = nblocks
            .checked_mul(formats::BLOCK_SIZE as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))?;
        self.client.write_zeroes(NbdStore::offset(addr)?, len)
    }
}

/// Whether an image name is an NBD URI rather than a path.
pub fn is_nbd_name(name: &std::path::Path) -> bool {
    name.to_str().is_some_and(blockdev::nbd::NbdUri::is_nbd)
}

/// Opens an image for a tool: an NBD URI is connected ([`NbdStore`]; an NBD export is
/// always writable), a path is opened as a [`fsd_core::store::FileStore`], writable only
/// if `writable`.
pub fn open_store(name: &std::path::Path, writable: bool) -> io::Result<Box<dyn BlockStore>> {
    match name.to_str().filter(|s| blockdev::nbd::NbdUri::is_nbd(s)) {
        Some(s) => {
            let uri = blockdev::nbd::NbdUri::parse(s)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            Ok(Box::new(NbdStore::connect(&uri)?))
        }
        None => Ok(Box::new(fsd_core::store::FileStore::open(name, writable)?)),
    }
}
