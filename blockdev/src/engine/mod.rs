//! I/O engines: the io_uring engine, the plain-syscall engine (also the test oracle), and
//! a fault-injecting wrapper, behind one enum.
//!
//! The interface is batched: [`Engine::push`] queues requests, [`Engine::submit`] hands
//! everything queued to the kernel in one call, [`Engine::reap`] collects completions and
//! [`Engine::wait`] sleeps until a completion, a doorbell or a timeout. Requests in flight
//! at the same time are not ordered with respect to each other (like a disk queue): a
//! caller that needs ordering waits for the earlier completion first.
//!
//! Apart from them, [`FileRing`] is a small safe io_uring over ordinary files, one request
//! per slot, for tools that do I/O on many files at once (the stress tool).

mod fault;
mod file_ring;
mod nbd;
mod sync;
mod uring;

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

pub use fault::{FaultPlan, FaultyEngine};
pub use file_ring::{FileCompletion, FileOp, FileRing};
pub use nbd::{NbdEngine, DEFAULT_RECONNECT_BOUND};
pub use sync::SyncEngine;
pub use uring::UringEngine;

use crate::buffer::AlignedBuf;
use crate::image::Image;
use crate::ring::RingRegion;
use crate::{Lba, BLOCK_SIZE};
use memmap2::MmapRaw;

/// A positive `errno` value reported by an I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", io::Error::from_raw_os_error(self.0))
    }
}

/// The memory a read fills or a write drains.
#[derive(Debug)]
pub enum IoBuf {
    /// A heap buffer the engine owns while the request is in flight and gives back in the
    /// completion.
    Owned(AlignedBuf),
    /// The first `len` bytes of registered buffer `index` (see
    /// [`Engine::register_ring_slots`]).
    Fixed { index: u32, len: u32 },
}

impl IoBuf {
    fn len(&self) -> usize {
        match self {
            IoBuf::Owned(b) => b.len(),
            IoBuf::Fixed { len, .. } => *len as usize,
        }
    }
}

/// One operation on the image.
#[derive(Debug)]
pub enum IoOp {
    Read { lba: Lba, buf: IoBuf },
    Write { lba: Lba, buf: IoBuf },
    Flush,
    Discard { lba: Lba, nblocks: u64 },
}

impl IoOp {
    /// Block range touched, if any.
    fn range(&self) -> Option<(u64, u64)> {
        match self {
            IoOp::Read { lba, buf } | IoOp::Write { lba, buf } => {
                Some((lba.0, (buf.len() / BLOCK_SIZE) as u64))
            }
            IoOp::Discard { lba, nblocks } => Some((lba.0, *nblocks)),
            IoOp::Flush => None,
        }
    }

    fn take_owned(self) -> Option<AlignedBuf> {
        match self {
            IoOp::Read {
                buf: IoBuf::Owned(b),
                ..
            }
            | IoOp::Write {
                buf: IoBuf::Owned(b),
                ..
            } => Some(b),
            _ => None,
        }
    }
}

/// A request: an operation and an opaque value returned with its completion.
#[derive(Debug)]
pub struct IoRequest {
    pub user_data: u64,
    pub op: IoOp,
}

/// The outcome of one request.
#[derive(Debug)]
pub struct IoCompletion {
    pub user_data: u64,
    pub result: Result<(), Errno>,
    /// The owned buffer of a read or write, given back.
    pub buf: Option<AlignedBuf>,
}

/// Checks what every engine checks before touching the image: a non-empty, block-sized
/// buffer, a registered buffer that exists and is large enough, and a range inside the
/// image. Returns the errno for the completion otherwise.
fn validate(op: &IoOp, num_blocks: u64, fixed: &[(usize, usize)]) -> Result<(), Errno> {
    if let IoOp::Read { buf, .. } | IoOp::Write { buf, .. } = op {
        let len = buf.len();
        if len == 0 || len & (BLOCK_SIZE - 1) != 0 {
            return Err(Errno(libc::EINVAL));
        }
        if let IoBuf::Fixed { index, len } = buf {
            match fixed.get(*index as usize) {
                Some(&(_, cap)) if *len as usize <= cap => {}
                _ => return Err(Errno(libc::EFAULT)),
            }
        }
    }
    if let Some((lba, n)) = op.range() {
        if n == 0 {
            return Err(Errno(libc::EINVAL));
        }
        match lba.checked_add(n) {
            Some(end) if end <= num_blocks => {}
            _ => return Err(Errno(libc::ERANGE)),
        }
    }
    Ok(())
}

/// Which engine to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Uring,
    Sync,
    /// An NBD export ([`NbdEngine`]); built with [`Engine::nbd`], not from an [`Image`].
    Nbd,
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uring" => Ok(EngineKind::Uring),
            "sync" => Ok(EngineKind::Sync),
            "nbd" => Ok(EngineKind::Nbd),
            other => Err(format!(
                "unknown engine {other:?} (expected uring, sync or nbd)"
            )),
        }
    }
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Uring => "uring",
            EngineKind::Sync => "sync",
            EngineKind::Nbd => "nbd",
        }
    }
}

/// What ended an [`Engine::wait`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaitOutcome {
    /// The doorbell descriptor became readable.
    pub doorbell: bool,
}

/// The block engine: one enum, one interface.
// One engine per device, built once and never moved on the I/O path: the size difference
// between variants costs nothing, and boxing would add an indirection per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Engine {
    Uring(UringEngine),
    Sync(SyncEngine),
    Nbd(NbdEngine),
    Faulty(Box<FaultyEngine>),
}

impl Engine {
    /// Builds an engine of `kind` over `image` that can keep `depth` requests in flight.
    pub fn new(kind: EngineKind, image: Image, depth: u32) -> io::Result<Engine> {
        Ok(match kind {
            EngineKind::Uring => Engine::Uring(UringEngine::new(image, depth)?),
            EngineKind::Sync => Engine::Sync(SyncEngine::new(image, depth)),
            EngineKind::Nbd => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the nbd engine serves an NBD export, not an image file",
                ))
            }
        })
    }

    /// Builds an NBD engine over `conn` that can keep `depth` requests in flight and
    /// waits up to `reconnect_bound` for a lost connection to come back.
    pub fn nbd(
        conn: crate::nbd::NbdConnection,
        depth: u32,
        reconnect_bound: Duration,
    ) -> io::Result<Engine> {
        Ok(Engine::Nbd(NbdEngine::new(conn, depth, reconnect_bound)?))
    }

    pub fn kind(&self) -> EngineKind {
        match self {
            Engine::Uring(_) => EngineKind::Uring,
            Engine::Sync(_) => EngineKind::Sync,
            Engine::Nbd(_) => EngineKind::Nbd,
            Engine::Faulty(f) => f.inner().kind(),
        }
    }

    pub fn num_blocks(&self) -> u64 {
        match self {
            Engine::Uring(e) => e.num_blocks(),
            Engine::Sync(e) => e.num_blocks(),
            Engine::Nbd(e) => e.num_blocks(),
            Engine::Faulty(e) => e.inner().num_blocks(),
        }
    }

    /// Maximum number of requests in flight at once.
    pub fn capacity(&self) -> usize {
        match self {
            Engine::Uring(e) => e.capacity(),
            Engine::Sync(e) => e.capacity(),
            Engine::Nbd(e) => e.capacity(),
            Engine::Faulty(e) => e.inner().capacity(),
        }
    }

    /// Requests pushed whose completion has not been reaped yet.
    pub fn in_flight(&self) -> usize {
        match self {
            Engine::Uring(e) => e.in_flight(),
            Engine::Sync(e) => e.in_flight(),
            Engine::Nbd(e) => e.in_flight(),
            Engine::Faulty(e) => e.in_flight(),
        }
    }

    /// Registers the data slots of `ring` as the memory [`IoBuf::Fixed`] refers to: index
    /// `i` is slot `i` (io_uring fixed buffers: pinned once, no per-request page mapping).
    /// The engine holds on to the ring's mapping from here until it is dropped, so the
    /// slots stay mapped for as long as it may read or write them.
    pub(crate) fn register_ring_slots(&mut self, ring: &RingRegion) -> io::Result<()> {
        // The NBD engine copies through the ring's own functions: no raw regions.
        match self {
            Engine::Nbd(e) => return e.register_ring(ring),
            Engine::Faulty(f) => {
                if let Engine::Nbd(e) = f.inner_mut() {
                    return e.register_ring(ring);
                }
            }
            _ => {}
        }
        let regions = ring.slot_regions();
        // SAFETY: every region is a data slot, inside `ring.mapping()`, which the engine
        // keeps from here until it is dropped; the mapping is readable and writable.
        unsafe { self.register_buffers(&regions, ring.mapping()) }
    }

    /// # Safety
    /// Every `(address, length)` region must lie inside `mapping`, readable and writable.
    /// Other processes may change its contents concurrently.
    unsafe fn register_buffers(
        &mut self,
        regions: &[(usize, usize)],
        mapping: Arc<MmapRaw>,
    ) -> io::Result<()> {
        match self {
            // SAFETY: the caller's contract is passed on unchanged.
            Engine::Uring(e) => unsafe { e.register_buffers(regions, mapping) },
            Engine::Sync(e) => {
                e.register_buffers(regions, mapping);
                Ok(())
            }
            Engine::Nbd(_) => Ok(()),
            // SAFETY: the caller's contract is passed on unchanged.
            Engine::Faulty(e) => unsafe { e.inner_mut().register_buffers(regions, mapping) },
        }
    }

    /// Queues a request. Gives it back if the engine already holds `capacity` requests.
    pub fn push(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        match self {
            Engine::Uring(e) => e.push(req),
            Engine::Sync(e) => e.push(req),
            Engine::Nbd(e) => e.push(req),
            Engine::Faulty(e) => e.push(req),
        }
    }

    /// Hands every queued request to the kernel (at most one syscall).
    pub fn submit(&mut self) -> io::Result<()> {
        match self {
            Engine::Uring(e) => e.submit(),
            Engine::Sync(e) => e.submit(),
            Engine::Nbd(e) => e.submit(),
            Engine::Faulty(e) => e.inner_mut().submit(),
        }
    }

    /// Moves every available completion into `out` without blocking.
    pub fn reap(&mut self, out: &mut Vec<IoCompletion>) {
        match self {
            Engine::Uring(e) => e.reap(out),
            Engine::Sync(e) => e.reap(out),
            Engine::Nbd(e) => e.reap(out),
            Engine::Faulty(e) => e.reap(out),
        }
    }

    /// Sleeps until a completion is available, `doorbell` is readable, or `timeout`
    /// passes. Returns at once if a completion is already available.
    pub fn wait(
        &mut self,
        doorbell: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> io::Result<WaitOutcome> {
        match self {
            Engine::Uring(e) => e.wait(doorbell, timeout),
            Engine::Sync(e) => e.wait(doorbell, timeout),
            Engine::Nbd(e) => e.wait(doorbell, timeout),
            Engine::Faulty(e) => e.wait(doorbell, timeout),
        }
    }

    /// Stops watching the doorbell (cancels the armed poll, reaping its completion), so
    /// that the engine holds no kernel request except data I/O. The NBD engine stops
    /// reading its connection, so that a live-update successor can take it over.
    pub(crate) fn disarm_doorbell(&mut self) -> io::Result<()> {
        match self {
            Engine::Uring(e) => e.disarm_doorbell(),
            Engine::Sync(_) => Ok(()),
            Engine::Nbd(e) => {
                e.stop_reading();
                Ok(())
            }
            Engine::Faulty(e) => e.inner_mut().disarm_doorbell(),
        }
    }

    /// Pushes, submits and waits for one request: a convenience for tests and tools.
    #[cfg(test)]
    pub(crate) fn run_one(&mut self, op: IoOp) -> io::Result<IoCompletion> {
        let user_data = u64::MAX - 7;
        self.push(IoRequest { user_data, op })
            .map_err(|_| io::Error::other("engine full"))?;
        self.submit()?;
        let mut out = Vec::new();
        loop {
            self.reap(&mut out);
            if let Some(pos) = out.iter().position(|c| c.user_data == user_data) {
                return Ok(out.swap_remove(pos));
            }
            self.wait(None, Duration::from_secs(1))?;
        }
    }
}

#[cfg(test)]
mod tests;
