//! The driver's serve loop: takes entries from the ring, runs them on an engine, posts
//! completions.
//!
//! One iteration takes every available submission entry (each copied out of shared memory
//! once, then decoded and validated), submits them all to the engine in one call, reaps
//! every completion and publishes them with one tail update and at most one doorbell. It
//! sleeps only after a bounded spin finds nothing to do, and only after announcing it in the
//! header (`sq_need_wakeup`) and re-checking the queue, so a busy ring costs no wakeups.
//!
//! The loop stops between requests: once a stop is requested it takes no new entries,
//! reaps everything in flight, and returns its exportable state; `resume` serves again.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{Engine, IoBuf, IoCompletion, IoOp, IoRequest};
use crate::persist::{Counters, DriverState, StopReason};
use crate::ring::codec::{self, NO_SLOT};
use crate::ring::{Completion, DriverPhase, Op, Request, RingError, RingRegion, Status};
use crate::{sys, Lba, BLOCK_SIZE};

/// Errors that end the serve loop (as opposed to errors reported to the client).
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    #[error("engine: {0}")]
    Engine(#[from] io::Error),
    #[error("engine holds {capacity} requests but the ring needs {depth}")]
    EngineTooSmall { capacity: usize, depth: u32 },
}

/// Tunables of the serve loop.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How long to poll the queues after the last activity before sleeping.
    pub spin: Duration,
    /// Longest sleep: the heartbeat, stop flag and client liveness are checked this often.
    pub tick: Duration,
    /// Stop serving (cleanly) when this process exits.
    pub client_pid: Option<i32>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            spin: Duration::from_micros(50),
            tick: Duration::from_millis(100),
            client_pid: None,
        }
    }
}

/// Asks a running server to stop between requests; usable from any thread.
#[derive(Debug, Clone)]
pub struct StopHandle {
    flag: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
}

impl StopHandle {
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = sys::eventfd_signal(self.wake.as_fd());
    }

    /// The flag itself (e.g. for a signal handler); the loop notices it within one tick.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    tag: u64,
    op: Op,
    slot: u32,
    bytes: u64,
}

/// A driver serving one client over one ring.
#[derive(Debug)]
pub struct Server {
    // Field order matters: the engine (which holds the ring's data slots as registered
    // buffers and may have I/O in flight into them) is dropped before the ring mapping.
    engine: Engine,
    ring: RingRegion,
    sq_eventfd: Arc<OwnedFd>,
    cq_eventfd: OwnedFd,
    client_pidfd: Option<OwnedFd>,
    config: ServerConfig,
    stop: Arc<AtomicBool>,
    depth: u32,
    max_blocks: u32,
    num_blocks: u64,
    sq_head: u32,
    cq_tail: u32,
    pending: Vec<Option<Pending>>,
    free_ids: Vec<u32>,
    slot_busy: Vec<bool>,
    backlog: VecDeque<Completion>,
    counters: Counters,
    latched: Option<Status>,
    reason: Option<StopReason>,
    client_gone: bool,
    scratch: Vec<IoCompletion>,
    heartbeat: u64,
}

impl Server {
    /// Attaches to a ring: registers its data slots with the engine and publishes the
    /// device geometry. Queue positions are taken from the ring, so a successor driver
    /// continues where its predecessor stopped.
    pub fn new(
        ring: RingRegion,
        mut engine: Engine,
        sq_eventfd: OwnedFd,
        cq_eventfd: OwnedFd,
        config: ServerConfig,
    ) -> Result<Server, DriverError> {
        let g = ring.geometry();
        if engine.capacity() < g.queue_depth as usize {
            return Err(DriverError::EngineTooSmall {
                capacity: engine.capacity(),
                depth: g.queue_depth,
            });
        }
        // SAFETY: the slot regions lie inside `ring`'s mapping, which this server owns and
        // drops after the engine (field order above), so they stay mapped while registered.
        unsafe { engine.register_buffers(&ring.slot_regions())? };
        let num_blocks = engine.num_blocks().min(ring.version().max_blocks());
        // A client that exited before we started is treated like one that exits later.
        let mut client_gone = false;
        let client_pidfd = match config.client_pid {
            Some(pid) => match sys::pidfd_open(pid) {
                Ok(fd) => Some(fd),
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                    client_gone = true;
                    None
                }
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        ring.publish_device(num_blocks, std::process::id());
        let depth = g.queue_depth;
        let server = Server {
            sq_head: ring.sq_head().load(Ordering::Acquire),
            cq_tail: ring.cq_tail().load(Ordering::Acquire),
            engine,
            ring,
            sq_eventfd: Arc::new(sq_eventfd),
            cq_eventfd,
            client_pidfd,
            config,
            stop: Arc::new(AtomicBool::new(false)),
            depth,
            max_blocks: g.max_blocks_per_request(),
            num_blocks,
            pending: vec![None; depth as usize],
            free_ids: (0..depth).rev().collect(),
            slot_busy: vec![false; depth as usize],
            backlog: VecDeque::new(),
            counters: Counters::default(),
            latched: None,
            reason: None,
            client_gone,
            scratch: Vec::new(),
            heartbeat: 0,
        };
        server.ring.publish_counters(&server.counters);
        server.ring.publish_latched(0);
        Ok(server)
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            flag: self.stop.clone(),
            wake: self.sq_eventfd.clone(),
        }
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Carries counters and a latched error over from a predecessor's exported state.
    pub fn import_state(&mut self, state: &DriverState) {
        self.counters = Counters {
            in_flight: 0,
            ..state.counters
        };
        self.latched = state.latched.and_then(Status::from_code);
        self.ring.publish_counters(&self.counters);
        self.ring.publish_latched(state.latched.unwrap_or(0));
    }

    /// Clears a previous stop request and serves again.
    pub fn resume(&mut self) -> Result<DriverState, DriverError> {
        self.stop.store(false, Ordering::SeqCst);
        self.run()
    }

    /// Serves until a stop is requested, the client exits, or it breaks the protocol.
    /// Returns with nothing in flight.
    pub fn run(&mut self) -> Result<DriverState, DriverError> {
        self.reason = self.client_gone.then_some(StopReason::ClientGone);
        self.ring.set_driver_phase(DriverPhase::Serving);
        // Wake a client waiting for the driver to attach.
        let _ = sys::eventfd_signal(self.cq_eventfd.as_fd());
        let mut last_progress = Instant::now();
        let mut last_client_check = Instant::now();
        loop {
            self.heartbeat = self.heartbeat.wrapping_add(1);
            self.ring
                .heartbeat()
                .store(self.heartbeat, Ordering::Relaxed);
            if self.reason.is_none() && self.stop.load(Ordering::Acquire) {
                self.reason = Some(StopReason::Requested);
            }
            let stopping = self.reason.is_some();
            let mut progressed = false;
            if !stopping {
                progressed |= self.take_entries();
            }
            self.engine.submit()?;
            progressed |= self.reap_and_post();
            if stopping && self.outstanding() == self.backlog.len() {
                break;
            }
            if progressed {
                last_progress = Instant::now();
                continue;
            }
            if last_progress.elapsed() < self.config.spin {
                std::hint::spin_loop();
                continue;
            }
            // Sleep protocol: announce, re-check, then sleep.
            if !stopping {
                self.ring.sq_need_wakeup().store(1, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                if self.ring.sq_tail().load(Ordering::SeqCst) != self.sq_head
                    && self.outstanding() < self.depth as usize
                {
                    self.ring.sq_need_wakeup().store(0, Ordering::Relaxed);
                    continue;
                }
            }
            let timeout = if self.backlog.is_empty() {
                self.config.tick
            } else {
                Duration::from_millis(1)
            };
            let doorbell = if stopping {
                None
            } else {
                Some(self.sq_eventfd.as_fd())
            };
            let outcome = self.engine.wait(doorbell, timeout)?;
            self.ring.sq_need_wakeup().store(0, Ordering::Relaxed);
            if outcome.doorbell {
                sys::eventfd_drain(self.sq_eventfd.as_fd());
            }
            if last_client_check.elapsed() >= self.config.tick {
                last_client_check = Instant::now();
                if let Some(pidfd) = &self.client_pidfd {
                    if self.reason.is_none() && sys::pidfd_exited(pidfd.as_fd()) {
                        self.client_gone = true;
                        self.reason = Some(StopReason::ClientGone);
                    }
                }
            }
        }
        self.engine.disarm_doorbell()?;
        let reason = self.reason.clone().unwrap_or(StopReason::Requested);
        let phase = match reason {
            StopReason::ProtocolViolation(_) => DriverPhase::Rejected,
            _ => DriverPhase::Quiesced,
        };
        self.ring.publish_counters(&self.counters);
        self.ring.set_driver_phase(phase);
        let _ = sys::eventfd_signal(self.cq_eventfd.as_fd());
        Ok(DriverState {
            counters: self.counters,
            geometry: self.ring.geometry(),
            num_blocks: self.num_blocks,
            engine: self.engine.kind(),
            latched: self.latched.map(Status::code),
            sq_head: self.sq_head,
            cq_tail: self.cq_tail,
            reason,
        })
    }

    /// Requests taken from the ring and not yet published as completions.
    fn outstanding(&self) -> usize {
        self.depth as usize - self.free_ids.len() + self.backlog.len()
    }

    fn violation(&mut self, msg: String) {
        if self.reason.is_none() {
            self.reason = Some(StopReason::ProtocolViolation(msg));
        }
    }

    /// Takes every available entry (up to the queue depth in flight). Returns whether any.
    fn take_entries(&mut self) -> bool {
        let tail = self.ring.sq_tail().load(Ordering::Acquire);
        let avail = tail.wrapping_sub(self.sq_head);
        if avail > self.depth {
            self.violation(format!(
                "submission tail {tail} is {avail} entries past head {}",
                self.sq_head
            ));
            return false;
        }
        let mut took = false;
        while self.sq_head != tail && self.outstanding() < self.depth as usize {
            let raw = self.ring.read_sqe(self.sq_head);
            self.sq_head = self.sq_head.wrapping_add(1);
            took = true;
            match codec::decode_request(self.ring.version(), &raw) {
                Err(e) => self.reject(e.tag, e.status),
                Ok(req) => match self.check(&req) {
                    Err(status) => self.reject(req.tag, status),
                    Ok(()) => self.start(req),
                },
            }
        }
        if took {
            self.ring.sq_head().store(self.sq_head, Ordering::Release);
        }
        took
    }

    /// Validates a decoded request against the device and the driver's own state.
    fn check(&self, r: &Request) -> Result<(), Status> {
        let in_range =
            |n: u64| matches!(r.lba.0.checked_add(n), Some(end) if end <= self.num_blocks);
        match r.op {
            Op::Read | Op::Write => {
                if r.nblocks == 0 || r.nblocks > self.max_blocks {
                    return Err(Status::Invalid);
                }
                if r.slot >= self.depth || self.slot_busy[r.slot as usize] {
                    return Err(Status::BadSlot);
                }
                if !in_range(r.nblocks as u64) {
                    return Err(Status::OutOfRange);
                }
                if r.op == Op::Write && self.latched.is_some() {
                    return Err(Status::Latched);
                }
            }
            Op::Flush => {
                if r.lba.0 != 0 || r.nblocks != 0 || r.slot != NO_SLOT {
                    return Err(Status::Invalid);
                }
                if self.latched.is_some() {
                    return Err(Status::Latched);
                }
            }
            Op::Discard => {
                if r.nblocks == 0 || r.slot != NO_SLOT {
                    return Err(Status::Invalid);
                }
                if !in_range(r.nblocks as u64) {
                    return Err(Status::OutOfRange);
                }
                if self.latched.is_some() {
                    return Err(Status::Latched);
                }
            }
        }
        Ok(())
    }

    fn start(&mut self, r: Request) {
        let id = self
            .free_ids
            .pop()
            .expect("outstanding < depth leaves a free id");
        let bytes = r.nblocks as u64 * BLOCK_SIZE as u64;
        let buf = || IoBuf::Fixed {
            index: r.slot,
            len: bytes as u32,
        };
        let op = match r.op {
            Op::Read => IoOp::Read {
                lba: r.lba,
                buf: buf(),
            },
            Op::Write => IoOp::Write {
                lba: r.lba,
                buf: buf(),
            },
            Op::Flush => IoOp::Flush,
            Op::Discard => IoOp::Discard {
                lba: Lba(r.lba.0),
                nblocks: r.nblocks as u64,
            },
        };
        if r.slot != NO_SLOT {
            self.slot_busy[r.slot as usize] = true;
        }
        self.pending[id as usize] = Some(Pending {
            tag: r.tag,
            op: r.op,
            slot: r.slot,
            bytes,
        });
        if self
            .engine
            .push(IoRequest {
                user_data: id as u64,
                op,
            })
            .is_err()
        {
            // Cannot happen (engine capacity >= depth), but never lose a request.
            self.finish(id, Err(Status::Io));
        }
    }

    fn reject(&mut self, tag: u64, status: Status) {
        self.counters.errors += 1;
        self.backlog.push_back(Completion {
            tag,
            result: status.code(),
        });
    }

    fn finish(&mut self, id: u32, result: Result<(), Status>) {
        let p = self.pending[id as usize]
            .take()
            .expect("completion for a pending request");
        self.free_ids.push(id);
        if p.slot != NO_SLOT {
            self.slot_busy[p.slot as usize] = false;
        }
        let code = match result {
            Ok(()) => {
                let c = &mut self.counters;
                match p.op {
                    Op::Read => {
                        c.reads += 1;
                        c.bytes_read += p.bytes;
                    }
                    Op::Write => {
                        c.writes += 1;
                        c.bytes_written += p.bytes;
                    }
                    Op::Flush => c.flushes += 1,
                    Op::Discard => c.discards += 1,
                }
                0
            }
            Err(status) => {
                self.counters.errors += 1;
                if matches!(p.op, Op::Write | Op::Flush) && self.latched.is_none() {
                    // Never retried: the data the failed request carried may be lost, and
                    // a later success would hide that.
                    self.latched = Some(status);
                    self.ring.publish_latched(status.code());
                }
                status.code()
            }
        };
        self.backlog.push_back(Completion {
            tag: p.tag,
            result: code,
        });
    }

    /// Reaps engine completions and publishes the backlog. Returns whether anything moved.
    fn reap_and_post(&mut self) -> bool {
        let mut done = std::mem::take(&mut self.scratch);
        self.engine.reap(&mut done);
        let reaped = !done.is_empty();
        for c in done.drain(..) {
            let result = c.result.map_err(|e| Status::from_errno(e.0));
            self.finish(c.user_data as u32, result);
        }
        self.scratch = done;
        let posted = self.post_backlog();
        reaped || posted
    }

    fn post_backlog(&mut self) -> bool {
        if self.backlog.is_empty() {
            return false;
        }
        let head = self.ring.cq_head().load(Ordering::Acquire);
        let used = self.cq_tail.wrapping_sub(head);
        if used > self.depth {
            self.violation(format!(
                "completion head {head} is {used} entries behind tail {}",
                self.cq_tail
            ));
            // The client lost track of the queue: completions cannot be delivered.
            self.backlog.clear();
            return false;
        }
        let room = (self.depth - used) as usize;
        let n = room.min(self.backlog.len());
        for c in self.backlog.drain(..n) {
            self.ring
                .write_cqe(self.cq_tail, &codec::encode_completion(&c));
            self.cq_tail = self.cq_tail.wrapping_add(1);
        }
        self.counters.in_flight =
            (self.depth as usize - self.free_ids.len() + self.backlog.len()) as u64;
        self.ring.publish_counters(&self.counters);
        if n > 0 {
            self.ring.cq_tail().store(self.cq_tail, Ordering::Release);
            fence(Ordering::SeqCst);
            if self.ring.cq_need_wakeup().swap(0, Ordering::SeqCst) != 0 {
                let _ = sys::eventfd_signal(self.cq_eventfd.as_fd());
            }
        }
        n > 0
    }
}
