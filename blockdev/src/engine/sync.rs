//! The plain-syscall engine: `pread`/`pwrite`/`fdatasync`/`fallocate`, one request at a
//! time. Slow and obviously correct: it is the oracle the io_uring engine is tested against.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use memmap2::MmapRaw;

use super::{validate, Errno, IoBuf, IoCompletion, IoOp, IoRequest, WaitOutcome};
use crate::buffer::AlignedBuf;
use crate::image::{DiscardMode, Image};
use crate::BLOCK_SIZE;
use molt_sys as sys;

#[derive(Debug)]
pub struct SyncEngine {
    image: Image,
    capacity: usize,
    fixed: Vec<(usize, usize)>,
    done: VecDeque<IoCompletion>,
    /// The mappings `fixed` lies in, kept mapped while the engine lives.
    mappings: Vec<Arc<MmapRaw>>,
}

impl SyncEngine {
    pub fn new(image: Image, depth: u32) -> SyncEngine {
        SyncEngine {
            image,
            capacity: depth.max(1) as usize,
            fixed: Vec::new(),
            done: VecDeque::new(),
            mappings: Vec::new(),
        }
    }

    pub fn num_blocks(&self) -> u64 {
        self.image.num_blocks()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn in_flight(&self) -> usize {
        self.done.len()
    }

    pub(super) fn register_buffers(&mut self, regions: &[(usize, usize)], mapping: Arc<MmapRaw>) {
        self.fixed = regions.to_vec();
        self.mappings.push(mapping);
    }

    /// Runs the request at once; its completion waits in the queue until reaped.
    pub fn push(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        if self.done.len() >= self.capacity {
            return Err(req);
        }
        let IoRequest { user_data, mut op } = req;
        let result =
            validate(&op, self.num_blocks(), &self.fixed).and_then(|()| self.execute(&mut op));
        self.done.push_back(IoCompletion {
            user_data,
            result,
            buf: op.take_owned(),
        });
        Ok(())
    }

    fn execute(&mut self, op: &mut IoOp) -> Result<(), Errno> {
        let fd = self.image.file().as_raw_fd();
        let res = match op {
            IoOp::Read { lba, buf } => {
                let (ptr, len) = self.buf_ptr(buf);
                // SAFETY: `buf_ptr` returns an owned buffer's memory or a registered region
                // whose bounds `validate` checked; both are writable for `len` bytes.
                unsafe { pread_all(fd, ptr, len, lba.byte_offset()) }
            }
            IoOp::Write { lba, buf } => {
                let (ptr, len) = self.buf_ptr(buf);
                // SAFETY: as for reads; the region is readable for `len` bytes.
                unsafe { pwrite_all(fd, ptr, len, lba.byte_offset()) }
            }
            IoOp::Flush => sys::fdatasync(self.image.file().as_fd()),
            IoOp::Discard { lba, nblocks } => {
                let off = lba.byte_offset();
                let len = *nblocks * BLOCK_SIZE as u64;
                match self.image.discard_mode() {
                    DiscardMode::PunchHole => sys::fallocate(
                        self.image.file().as_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off,
                        len,
                    ),
                    DiscardMode::WriteZeros => write_zeros(fd, off, len),
                }
            }
        };
        res.map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))
    }

    fn buf_ptr(&self, buf: &mut IoBuf) -> (*mut u8, usize) {
        match buf {
            IoBuf::Owned(b) => (b.as_mut_ptr(), b.len()),
            IoBuf::Fixed { index, len } => {
                (self.fixed[*index as usize].0 as *mut u8, *len as usize)
            }
        }
    }

    pub fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    pub fn reap(&mut self, out: &mut Vec<IoCompletion>) {
        out.extend(self.done.drain(..));
    }

    pub fn wait(
        &mut self,
        doorbell: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> io::Result<WaitOutcome> {
        if !self.done.is_empty() {
            return Ok(WaitOutcome::default());
        }
        match doorbell {
            Some(fd) => {
                let ready = sys::poll_readable(&[fd.as_raw_fd()], timeout)?;
                Ok(WaitOutcome { doorbell: ready[0] })
            }
            None => Ok(WaitOutcome::default()),
        }
    }
}

const ZERO_CHUNK_BLOCKS: usize = 256;

pub(super) fn write_zeros(fd: i32, mut off: u64, mut len: u64) -> io::Result<()> {
    let zeros = AlignedBuf::zeroed(ZERO_CHUNK_BLOCKS);
    while len > 0 {
        let n = len.min(zeros.len() as u64) as usize;
        // SAFETY: `zeros` is a live buffer of at least `n` bytes.
        unsafe { pwrite_all(fd, zeros.as_ptr(), n, off)? };
        off += n as u64;
        len -= n as u64;
    }
    Ok(())
}

/// Reads exactly `len` bytes at `off` into raw memory.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes for the duration of the call.
unsafe fn pread_all(fd: RawFd, ptr: *mut u8, len: usize, off: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        // SAFETY: the caller guarantees `ptr..ptr+len` is writable; `done < len`.
        let n = unsafe {
            libc::pread(
                fd,
                ptr.add(done).cast(),
                len - done,
                (off + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        done += n as usize;
    }
    Ok(())
}

/// Writes exactly `len` bytes from raw memory at `off`.
///
/// # Safety
/// `ptr` must be valid for reads of `len` bytes for the duration of the call.
unsafe fn pwrite_all(fd: RawFd, ptr: *const u8, len: usize, off: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        // SAFETY: the caller guarantees `ptr..ptr+len` is readable; `done < len`.
        let n = unsafe {
            libc::pwrite(
                fd,
                ptr.add(done).cast(),
                len - done,
                (off + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        done += n as usize;
    }
    Ok(())
}
