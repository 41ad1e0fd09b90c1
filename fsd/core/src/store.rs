//! The block storage boundary of the filesystem. Everything above it speaks in 4 KiB blocks;
//! implementations are a plain file and an in-memory store that can simulate a power cut
//! (for crash tests) here, and the blockdev ring client in the filesystem server.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use formats::BLOCK_SIZE;

/// A device of `num_blocks()` blocks of `BLOCK_SIZE` bytes. Buffers are whole blocks.
/// `flush` makes every completed write durable; a write not covered by a completed flush
/// may be lost, reordered or torn by a crash.
pub trait BlockStore: Send + Sync {
    fn num_blocks(&self) -> u64;
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write(&self, addr: u64, buf: &[u8]) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    /// Writes every `(address, whole blocks)` pair; the device may run them side by side,
    /// in any order (their ranges must not overlap). The default writes one at a time.
    fn write_many(&self, writes: &[(u64, &[u8])]) -> io::Result<()> {
        for (addr, buf) in writes {
            self.write(*addr, buf)?;
        }
        Ok(())
    }
    /// Drops the contents of a range; it reads as zeros afterwards.
    fn discard(&self, addr: u64, nblocks: u64) -> io::Result<()>;
}

fn check_range(num_blocks: u64, addr: u64, len: usize) -> io::Result<()> {
    if !len.is_multiple_of(BLOCK_SIZE) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "buffer is not whole blocks",
        ));
    }
    let n = (len / BLOCK_SIZE) as u64;
    if addr.checked_add(n).is_none_or(|end| end > num_blocks) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("blocks {addr}..+{n} outside a device of {num_blocks} blocks"),
        ));
    }
    Ok(())
}

/// A regular file or block device accessed with plain positioned syscalls.
pub struct FileStore {
    file: File,
    num_blocks: u64,
}

impl FileStore {
    pub fn new(file: File) -> io::Result<FileStore> {
        let bytes = device_size(&file)?;
        Ok(FileStore {
            file,
            num_blocks: bytes / BLOCK_SIZE as u64,
        })
    }

    pub fn open(path: &std::path::Path, writable: bool) -> io::Result<FileStore> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)?;
        FileStore::new(file)
    }
}

/// Size in bytes of a regular file or a block device.
pub fn device_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    // Block devices report length 0 in metadata; their end is found by seeking.
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::End(0))
}

impl BlockStore for FileStore {
    fn num_blocks(&self) -> u64 {
        self.num_blocks
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.num_blocks, addr, buf.len())?;
        self.file.read_exact_at(buf, addr * BLOCK_SIZE as u64)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> io::Result<()> {
        check_range(self.num_blocks, addr, buf.len())?;
        self.file.write_all_at(buf, addr * BLOCK_SIZE as u64)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn discard(&self, addr: u64, nblocks: u64) -> io::Result<()> {
        check_range(self.num_blocks, addr, (nblocks as usize) * BLOCK_SIZE)?;
        let zeros = vec![0u8; BLOCK_SIZE * 256];
        let mut a = addr;
        while a < addr + nblocks {
            let n = (addr + nblocks - a).min(256);
            self.file
                .write_all_at(&zeros[..n as usize * BLOCK_SIZE], a * BLOCK_SIZE as u64)?;
            a += n;
        }
        Ok(())
    }
}

/// An in-memory device that remembers which writes a flush has made durable, so a test
/// can cut the power: `crash_image` keeps every flushed write and, for each unflushed one,
/// keeps it, drops it or tears it at a 512-byte boundary, chosen by the caller's dice.
pub struct MemStore {
    inner: Mutex<MemInner>,
    num_blocks: u64,
}

struct MemInner {
    durable: Vec<u8>,
    volatile: Vec<u8>,
    /// Writes since the last flush, in order: (block address, blocks).
    pending: Vec<(u64, Vec<u8>)>,
    /// Fail every write and flush after this many more writes (fault injection).
    fail_after_writes: Option<u64>,
}

impl MemStore {
    pub fn new(num_blocks: u64) -> MemStore {
        let bytes = num_blocks as usize * BLOCK_SIZE;
        MemStore {
            inner: Mutex::new(MemInner {
                durable: vec![0; bytes],
                volatile: vec![0; bytes],
                pending: Vec::new(),
                fail_after_writes: None,
            }),
            num_blocks,
        }
    }

    pub fn from_image(image: Vec<u8>) -> MemStore {
        let num_blocks = (image.len() / BLOCK_SIZE) as u64;
        MemStore {
            inner: Mutex::new(MemInner {
                durable: image.clone(),
                volatile: image,
                pending: Vec::new(),
                fail_after_writes: None,
            }),
            num_blocks,
        }
    }

    /// The current contents as a reader sees them.
    pub fn image(&self) -> Vec<u8> {
        self.inner.lock().expect("mem store lock").volatile.clone()
    }

    /// After `n` more successful writes, every write and flush fails with EIO (tests).
    #[cfg(test)]
    pub(crate) fn fail_after_writes(&self, n: u64) {
        self.inner.lock().expect("mem store lock").fail_after_writes = Some(n);
    }

    /// The image a power cut now would leave (tests). `dice(k)` returns a number below `k`.
    #[cfg(test)]
    pub(crate) fn crash_image(&self, dice: &mut dyn FnMut(u64) -> u64) -> Vec<u8> {
        let inner = self.inner.lock().expect("mem store lock");
        let mut img = inner.durable.clone();
        for (addr, data) in &inner.pending {
            let off = *addr as usize * BLOCK_SIZE;
            match dice(3) {
                0 => {}
                1 => img[off..off + data.len()].copy_from_slice(data),
                _ => {
                    let sectors = data.len() / 512;
                    let keep = dice(sectors as u64 + 1) as usize * 512;
                    img[off..off + keep].copy_from_slice(&data[..keep]);
                }
            }
        }
        img
    }
}

impl BlockStore for MemStore {
    fn num_blocks(&self) -> u64 {
        self.num_blocks
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.num_blocks, addr, buf.len())?;
        let inner = self.inner.lock().expect("mem store lock");
        let off = addr as usize * BLOCK_SIZE;
        buf.copy_from_slice(&inner.volatile[off..off + buf.len()]);
        Ok(())
    }
    fn write(&self, addr: u64, buf: &[u8]) -> io::Result<()> {
        check_range(self.num_blocks, addr, buf.len())?;
        let mut inner = self.inner.lock().expect("mem store lock");
        if let Some(n) = inner.fail_after_writes.as_mut() {
            if *n == 0 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            *n -= 1;
        }
        let off = addr as usize * BLOCK_SIZE;
        inner.volatile[off..off + buf.len()].copy_from_slice(buf);
        inner.pending.push((addr, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let mut inner = self.inner.lock().expect("mem store lock");
        if inner.fail_after_writes == Some(0) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let inner = &mut *inner;
        for (addr, data) in inner.pending.drain(..) {
            let off = addr as usize * BLOCK_SIZE;
            inner.durable[off..off + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
    fn discard(&self, addr: u64, nblocks: u64) -> io::Result<()> {
        self.write(addr, &vec![0u8; nblocks as usize * BLOCK_SIZE])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unflushed_writes_may_vanish_flushed_ones_never() {
        let s = MemStore::new(4);
        s.write(0, &[1u8; BLOCK_SIZE]).unwrap();
        s.flush().unwrap();
        s.write(1, &[2u8; BLOCK_SIZE]).unwrap();
        let img = s.crash_image(&mut |_| 0);
        assert_eq!(img[0], 1);
        assert_eq!(img[BLOCK_SIZE], 0);
        let img = s.crash_image(&mut |_| 1);
        assert_eq!(img[BLOCK_SIZE], 2);
        assert!(s.read(4, &mut [0u8; BLOCK_SIZE]).is_err());
    }
}
