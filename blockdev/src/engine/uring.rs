//! The io_uring engine.
//!
//! Every request lives in the in-flight table from `push` until its completion is reaped;
//! the table owns its buffer, so memory the kernel writes into is never freed or moved
//! early. A short transfer is resubmitted for the remaining bytes, so a completion always
//! covers the whole request. The image is a registered file (`Fixed(0)`), and shared
//! memory regions can be registered buffers (`ReadFixed`/`WriteFixed`).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use memmap2::MmapRaw;

use super::{validate, Errno, IoBuf, IoCompletion, IoOp, IoRequest, WaitOutcome};
use crate::buffer::AlignedBuf;
use crate::image::{DiscardMode, Image};
use crate::BLOCK_SIZE;

/// `user_data` of the doorbell poll and of its cancellation; table ids are smaller.
const DOORBELL: u64 = u64::MAX;
const CANCEL: u64 = u64::MAX - 1;
/// Zero-filled source for discards on backings that cannot punch holes.
const ZERO_CHUNK_BLOCKS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Punch,
    WriteZeros,
}

#[derive(Debug)]
struct InFlight {
    user_data: u64,
    kind: Kind,
    /// Owned buffer (or the zero chunk), kept here until the completion is reaped.
    owned: Option<AlignedBuf>,
    /// Registered buffer index and its base address, for fixed reads/writes.
    fixed: Option<(u16, usize)>,
    offset: u64,
    len: u64,
    done: u64,
}

pub struct UringEngine {
    ring: IoUring,
    image: Image,
    capacity: usize,
    table: Vec<Option<InFlight>>,
    free: Vec<u32>,
    in_flight: usize,
    fixed: Vec<(usize, usize)>,
    done: VecDeque<IoCompletion>,
    /// SQEs pushed since the last `submit`.
    unsubmitted: usize,
    doorbell_armed: bool,
    doorbell_fired: bool,
    cancel_pending: bool,
    /// The mappings the registered buffers lie in: kept mapped until the ring (and its
    /// registration) is gone. Last, so it is dropped after the ring.
    mappings: Vec<Arc<MmapRaw>>,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("image", &self.image)
            .field("capacity", &self.capacity)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl UringEngine {
    pub fn new(image: Image, depth: u32) -> io::Result<UringEngine> {
        let capacity = depth.max(1) as usize;
        // Room for one SQE per in-flight request plus the doorbell poll and its cancel.
        let entries = (capacity as u32 + 2).next_power_of_two();
        // Default setup on purpose: not SINGLE_ISSUER (an engine may be built on one thread
        // and run on another), not COOP_TASKRUN/DEFER_TASKRUN (completions must appear in
        // the CQ while the driver spins in user space, without a syscall).
        let ring = IoUring::new(entries)?;
        ring.submitter()
            .register_files(&[image.file().as_raw_fd()])?;
        Ok(UringEngine {
            ring,
            image,
            capacity,
            table: (0..capacity).map(|_| None).collect(),
            free: (0..capacity as u32).rev().collect(),
            in_flight: 0,
            fixed: Vec::new(),
            done: VecDeque::new(),
            unsubmitted: 0,
            doorbell_armed: false,
            doorbell_fired: false,
            cancel_pending: false,
            mappings: Vec::new(),
        })
    }

    pub fn num_blocks(&self) -> u64 {
        self.image.num_blocks()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight + self.done.len()
    }

    /// # Safety
    /// See [`super::Engine::register_buffers`].
    pub(super) unsafe fn register_buffers(
        &mut self,
        regions: &[(usize, usize)],
        mapping: Arc<MmapRaw>,
    ) -> io::Result<()> {
        if regions.len() > u16::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many buffers",
            ));
        }
        let iovecs: Vec<libc::iovec> = regions
            .iter()
            .map(|&(addr, len)| libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        if !self.fixed.is_empty() {
            self.ring.submitter().unregister_buffers()?;
        }
        // SAFETY: the caller guarantees every region lies inside `mapping`, which is kept
        // in `self.mappings` until the engine (and so the ring holding the registration)
        // is dropped.
        unsafe { self.ring.submitter().register_buffers(&iovecs)? };
        self.fixed = regions.to_vec();
        self.mappings.push(mapping);
        Ok(())
    }

    pub fn push(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        if self.in_flight() >= self.capacity {
            return Err(req);
        }
        let IoRequest { user_data, op } = req;
        if let Err(errno) = validate(&op, self.num_blocks(), &self.fixed) {
            self.done.push_back(IoCompletion {
                user_data,
                result: Err(errno),
                buf: op.take_owned(),
            });
            return Ok(());
        }
        let flight = match op {
            IoOp::Read { lba, buf } => {
                self.data_flight(user_data, Kind::Read, lba.byte_offset(), buf)
            }
            IoOp::Write { lba, buf } => {
                self.data_flight(user_data, Kind::Write, lba.byte_offset(), buf)
            }
            IoOp::Flush => InFlight {
                user_data,
                kind: Kind::Flush,
                owned: None,
                fixed: None,
                offset: 0,
                len: 0,
                done: 0,
            },
            IoOp::Discard { lba, nblocks } => {
                let len = nblocks * BLOCK_SIZE as u64;
                let offset = lba.byte_offset();
                match self.image.discard_mode() {
                    DiscardMode::PunchHole => InFlight {
                        user_data,
                        kind: Kind::Punch,
                        owned: None,
                        fixed: None,
                        offset,
                        len,
                        done: 0,
                    },
                    DiscardMode::WriteZeros => InFlight {
                        user_data,
                        kind: Kind::WriteZeros,
                        owned: Some(AlignedBuf::zeroed(ZERO_CHUNK_BLOCKS)),
                        fixed: None,
                        offset,
                        len,
                        done: 0,
                    },
                }
            }
        };
        let id = self
            .free
            .pop()
            .expect("a free table entry: in_flight < capacity");
        self.table[id as usize] = Some(flight);
        self.in_flight += 1;
        self.push_sqe(id);
        Ok(())
    }

    fn data_flight(&self, user_data: u64, kind: Kind, offset: u64, buf: IoBuf) -> InFlight {
        match buf {
            IoBuf::Owned(b) => {
                let len = b.len() as u64;
                InFlight {
                    user_data,
                    kind,
                    owned: Some(b),
                    fixed: None,
                    offset,
                    len,
                    done: 0,
                }
            }
            IoBuf::Fixed { index, len } => InFlight {
                user_data,
                kind,
                owned: None,
                // `validate` checked `index` against the registered table (≤ u16::MAX entries).
                fixed: Some((index as u16, self.fixed[index as usize].0)),
                offset,
                len: len as u64,
                done: 0,
            },
        }
    }

    /// Queues the SQE for the remaining part of table entry `id`.
    fn push_sqe(&mut self, id: u32) {
        let f = self.table[id as usize].as_mut().expect("live table entry");
        let fd = types::Fixed(0);
        let off = f.offset + f.done;
        // One SQE moves at most 1 GiB; the rest follows as a continuation.
        let chunk = (f.len - f.done).min(1 << 30) as u32;
        let entry: squeue::Entry = match f.kind {
            Kind::Read | Kind::Write | Kind::WriteZeros => {
                let (base, index) = match (&mut f.owned, f.fixed) {
                    (Some(b), _) if f.kind == Kind::WriteZeros => (b.as_mut_ptr(), None),
                    (Some(b), _) => (b.as_mut_ptr().wrapping_add(f.done as usize), None),
                    (None, Some((i, addr))) => {
                        ((addr as *mut u8).wrapping_add(f.done as usize), Some(i))
                    }
                    (None, None) => unreachable!("data request without a buffer"),
                };
                let chunk = if f.kind == Kind::WriteZeros {
                    chunk.min((ZERO_CHUNK_BLOCKS * BLOCK_SIZE) as u32)
                } else {
                    chunk
                };
                match (f.kind, index) {
                    (Kind::Read, None) => opcode::Read::new(fd, base, chunk).offset(off).build(),
                    (Kind::Read, Some(i)) => opcode::ReadFixed::new(fd, base, chunk, i)
                        .offset(off)
                        .build(),
                    (_, None) => opcode::Write::new(fd, base, chunk).offset(off).build(),
                    (_, Some(i)) => opcode::WriteFixed::new(fd, base, chunk, i)
                        .offset(off)
                        .build(),
                }
            }
            Kind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Kind::Punch => opcode::Fallocate::new(fd, f.len)
                .offset(f.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        };
        self.push_entry(entry.user_data(id as u64));
    }

    fn push_entry(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every buffer an entry points into is either owned by its in-flight
            // table entry (freed only after the completion is reaped) or a registered region
            // the `register_buffers` caller keeps mapped for the engine's lifetime; the doorbell
            // poll and cancel entries reference no memory.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.unsubmitted += 1;
                return;
            }
            // The SQ is sized for every possible outstanding entry; if it is full anyway,
            // make room by submitting.
            if self.ring.submit().is_ok() {
                self.unsubmitted = 0;
            }
        }
    }

    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(_) => self.unsubmitted = 0,
                // Transient: the entries stay queued and go with the next submit.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Processes every CQE: finished requests move to `done`, short transfers continue.
    fn drain_cq(&mut self) {
        let mut cqes: Vec<(u64, i32)> = Vec::new();
        {
            let mut cq = self.ring.completion();
            cq.sync();
            for cqe in &mut cq {
                let cqe: cqueue::Entry = cqe;
                cqes.push((cqe.user_data(), cqe.result()));
            }
        }
        for (ud, res) in cqes {
            match ud {
                DOORBELL => {
                    self.doorbell_armed = false;
                    if res >= 0 {
                        self.doorbell_fired = true;
                    }
                }
                CANCEL => self.cancel_pending = false,
                id => self.complete(id as u32, res),
            }
        }
    }

    fn complete(&mut self, id: u32, res: i32) {
        let f = self.table[id as usize]
            .as_mut()
            .expect("completion for a live table entry");
        let result = if res == -libc::EAGAIN || res == -libc::EINTR {
            self.push_sqe(id);
            return;
        } else if res < 0 {
            Err(Errno(-res))
        } else {
            match f.kind {
                Kind::Read | Kind::Write | Kind::WriteZeros => {
                    if res == 0 {
                        Err(Errno(libc::EIO))
                    } else {
                        f.done += res as u64;
                        if f.done < f.len {
                            self.push_sqe(id);
                            return;
                        }
                        Ok(())
                    }
                }
                Kind::Flush | Kind::Punch => Ok(()),
            }
        };
        let f = self.table[id as usize].take().expect("live table entry");
        self.free.push(id);
        self.in_flight -= 1;
        let buf = if f.kind == Kind::WriteZeros {
            None
        } else {
            f.owned
        };
        self.done.push_back(IoCompletion {
            user_data: f.user_data,
            result,
            buf,
        });
    }

    pub fn reap(&mut self, out: &mut Vec<IoCompletion>) {
        self.drain_cq();
        if self.unsubmitted > 0 {
            // Continuations of short transfers; an error here surfaces on the next submit.
            let _ = self.submit();
        }
        out.extend(self.done.drain(..));
    }

    pub fn wait(
        &mut self,
        doorbell: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> io::Result<WaitOutcome> {
        self.drain_cq();
        if !self.done.is_empty() || self.doorbell_fired {
            return Ok(WaitOutcome {
                doorbell: std::mem::take(&mut self.doorbell_fired),
            });
        }
        if let Some(fd) = doorbell {
            if !self.doorbell_armed {
                let poll = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
                    .build()
                    .user_data(DOORBELL);
                self.push_entry(poll);
                self.doorbell_armed = true;
            }
        }
        if self.in_flight == 0 && !self.doorbell_armed && !self.cancel_pending {
            self.submit()?;
            return Ok(WaitOutcome::default());
        }
        let ts = types::Timespec::new()
            .sec(timeout.as_secs())
            .nsec(timeout.subsec_nanos());
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        self.unsubmitted = 0;
        self.drain_cq();
        Ok(WaitOutcome {
            doorbell: std::mem::take(&mut self.doorbell_fired),
        })
    }

    pub(crate) fn disarm_doorbell(&mut self) -> io::Result<()> {
        if self.doorbell_armed && !self.cancel_pending {
            self.push_entry(opcode::AsyncCancel::new(DOORBELL).build().user_data(CANCEL));
            self.cancel_pending = true;
        }
        while self.doorbell_armed || self.cancel_pending {
            self.ring.submit_and_wait(1)?;
            self.unsubmitted = 0;
            self.drain_cq();
        }
        self.doorbell_fired = false;
        Ok(())
    }
}

impl Drop for UringEngine {
    /// The kernel may still write into buffers of requests in flight: wait for them all
    /// before the table (and its buffers) is freed.
    fn drop(&mut self) {
        let _ = self.disarm_doorbell();
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // Cannot wait: leak the buffers rather than free memory the kernel
                    // may still write into.
                    std::mem::forget(std::mem::take(&mut self.table));
                    std::mem::forget(std::mem::take(&mut self.mappings));
                    return;
                }
            }
            self.unsubmitted = 0;
            self.drain_cq();
        }
    }
}
