//! The block client: thread-safe, batched, and bounded in how long it waits for a driver.
//!
//! Each request holds one data slot from submission until its completion is claimed, so
//! at most `queue_depth` requests are in the ring and neither queue can overflow. Data is
//! copied into the slot before submission and out of it after completion, outside the
//! lock. Waiting threads elect one "poller" that spins briefly, then announces that it
//! sleeps (`cq_need_wakeup`), re-checks, and sleeps on the completion eventfd and the
//! driver's pidfd; the others wait on a condition variable.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::persist::Counters;
use crate::ring::codec::{self, NO_SLOT};
use crate::ring::{DriverPhase, Op, Request, RingGeometry, RingRegion, Status};
use crate::{sys, BlockError, Lba, BLOCK_SIZE};

/// Client tunables.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How long a waiting thread polls the completion queue before sleeping. Zero by
    /// default: on a 2-vCPU machine a spinning client and a spinning driver leave no CPU
    /// for the kernel's completion work, which measured slower than sleeping.
    pub spin: Duration,
    /// Longest single sleep; liveness is re-checked after each.
    pub poll_interval: Duration,
    /// A driver whose heartbeat does not move for this long while requests wait is
    /// considered gone (used when no pidfd of the driver is known).
    pub driver_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            spin: Duration::ZERO,
            poll_interval: Duration::from_millis(100),
            driver_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone)]
enum Failure {
    Gone(String),
    Protocol(String),
}

impl Failure {
    fn to_error(&self) -> BlockError {
        match self {
            Failure::Gone(m) => BlockError::DriverGone(m.clone()),
            Failure::Protocol(m) => BlockError::Protocol(m.clone()),
        }
    }
}

#[derive(Debug)]
struct State {
    free_slots: Vec<u32>,
    sq_tail: u32,
    cq_head: u32,
    next_tag: u64,
    /// Completions reaped but not yet claimed by the thread that submitted them.
    done: HashMap<u64, i32>,
    polling: bool,
    failed: Option<Failure>,
    heartbeat: u64,
    heartbeat_moved: Instant,
    /// When liveness was last checked: a heartbeat that did not move while nobody was
    /// waiting (an idle client, a driver holding for a live update) proves nothing.
    last_check: Instant,
    /// A pidfd of the driver, and the pid it refers to. Only the poller uses or replaces
    /// it (one thread at a time, see `wait`).
    driver_pidfd: Option<OwnedFd>,
    driver_pid: u32,
}

/// A connection to a block driver over a ring. `Send + Sync`: share it with `Arc`.
#[derive(Debug)]
pub struct Client {
    ring: RingRegion,
    sq_eventfd: OwnedFd,
    cq_eventfd: OwnedFd,
    config: ClientConfig,
    geometry: RingGeometry,
    num_blocks: u64,
    state: Mutex<State>,
    cond: Condvar,
}

/// One operation of a [`Batch`].
#[derive(Debug)]
enum BatchOp<'b> {
    Read(Lba, &'b mut [u8]),
    Write(Lba, &'b [u8]),
    Flush,
    Discard(Lba, u64),
}

/// Several operations submitted together and waited for together; up to `queue_depth`
/// ring requests are kept in flight. A flush is a barrier: it is submitted after every
/// earlier operation of the batch completed, and later ones after it completed.
#[derive(Debug)]
pub struct Batch<'c, 'b> {
    client: &'c Client,
    ops: Vec<BatchOp<'b>>,
    depth: usize,
}

impl<'b> Batch<'_, 'b> {
    pub fn read(&mut self, lba: Lba, buf: &'b mut [u8]) -> &mut Self {
        self.ops.push(BatchOp::Read(lba, buf));
        self
    }
    pub fn write(&mut self, lba: Lba, buf: &'b [u8]) -> &mut Self {
        self.ops.push(BatchOp::Write(lba, buf));
        self
    }
    pub fn flush(&mut self) -> &mut Self {
        self.ops.push(BatchOp::Flush);
        self
    }
    pub fn discard(&mut self, lba: Lba, nblocks: u64) -> &mut Self {
        self.ops.push(BatchOp::Discard(lba, nblocks));
        self
    }
    /// Keeps at most `depth` ring requests of this batch in flight (default: all slots).
    pub fn depth(&mut self, depth: usize) -> &mut Self {
        self.depth = depth.max(1);
        self
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    /// Runs every operation; one result per operation, in order.
    pub fn run(mut self) -> Vec<Result<(), BlockError>> {
        self.client.execute(&mut self.ops, self.depth)
    }
    /// Runs every operation; the first error, if any.
    pub fn run_all(self) -> Result<(), BlockError> {
        self.run().into_iter().collect()
    }
}

/// A ring request: one slot's worth of one batch operation.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    op: Op,
    index: usize,
    lba: u64,
    nblocks: u32,
    /// Byte offset into the operation's buffer.
    buf_off: usize,
}

impl Client {
    /// Connects over a ring whose driver is (or is about to be) attached. Waits until the
    /// driver publishes the device, at most `config.driver_timeout`. Refuses a ring whose
    /// protocol version or status code table this build does not use.
    ///
    /// With `driver_pidfd`, a driver exit fails waiting calls at once, except when the
    /// driver was replaced by a live update: the successor publishes its pid in the header
    /// before its predecessor exits, and the client then watches the successor.
    pub fn connect(
        ring: RingRegion,
        sq_eventfd: OwnedFd,
        cq_eventfd: OwnedFd,
        driver_pidfd: Option<OwnedFd>,
        config: ClientConfig,
    ) -> Result<Client, BlockError> {
        ring.check_speaks()?;
        let deadline = Instant::now() + config.driver_timeout;
        loop {
            match ring.driver_phase() {
                Some(DriverPhase::Serving) | Some(DriverPhase::Quiesced) => break,
                Some(DriverPhase::Rejected) => {
                    return Err(BlockError::Protocol("driver rejected this ring".into()))
                }
                Some(DriverPhase::NotStarted) => {}
                None => {
                    return Err(BlockError::Protocol(
                        "unknown driver phase in ring header".into(),
                    ))
                }
            }
            if Instant::now() >= deadline {
                return Err(BlockError::DriverGone(
                    "driver did not attach to the ring in time".into(),
                ));
            }
            let mut fds = vec![cq_eventfd.as_raw_fd()];
            fds.extend(driver_pidfd.as_ref().map(|p| p.as_raw_fd()));
            let ready = sys::poll_readable(&fds, config.poll_interval)?;
            sys::eventfd_drain(cq_eventfd.as_fd());
            if ready.get(1) == Some(&true) {
                return Err(BlockError::DriverGone(
                    "driver exited before attaching".into(),
                ));
            }
        }
        if ring.block_size() as usize != BLOCK_SIZE {
            return Err(BlockError::Protocol(format!(
                "driver block size {} is not {BLOCK_SIZE}",
                ring.block_size()
            )));
        }
        let geometry = ring.geometry();
        let state = State {
            free_slots: (0..geometry.queue_depth).rev().collect(),
            sq_tail: ring.sq_tail().load(Ordering::Acquire),
            cq_head: ring.cq_head().load(Ordering::Acquire),
            next_tag: 1,
            done: HashMap::new(),
            polling: false,
            failed: None,
            heartbeat: ring.heartbeat().load(Ordering::Relaxed),
            heartbeat_moved: Instant::now(),
            last_check: Instant::now(),
            driver_pidfd,
            driver_pid: ring.driver_pid(),
        };
        Ok(Client {
            num_blocks: ring.num_blocks(),
            geometry,
            ring,
            sq_eventfd,
            cq_eventfd,
            config,
            state: Mutex::new(state),
            cond: Condvar::new(),
        })
    }

    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        BLOCK_SIZE
    }

    pub fn geometry(&self) -> RingGeometry {
        self.geometry
    }

    /// The driver's counters, as last published in the ring header.
    pub fn counters(&self) -> Counters {
        self.ring.counters()
    }

    /// The latched write/flush error of the driver, if any.
    pub fn latched_error(&self) -> Option<Status> {
        match self.ring.latched() {
            0 => None,
            code => Some(Status::from_code(code).unwrap_or(Status::Io)),
        }
    }

    pub fn batch<'b>(&self) -> Batch<'_, 'b> {
        Batch {
            client: self,
            ops: Vec::new(),
            depth: usize::MAX,
        }
    }

    /// Reads `buf.len()` bytes (a multiple of the block size) starting at `lba`.
    pub fn read(&self, lba: Lba, buf: &mut [u8]) -> Result<(), BlockError> {
        let mut b = self.batch();
        b.read(lba, buf);
        b.run_all()
    }

    pub fn write(&self, lba: Lba, buf: &[u8]) -> Result<(), BlockError> {
        let mut b = self.batch();
        b.write(lba, buf);
        b.run_all()
    }

    /// Makes every write that completed before this call durable.
    pub fn flush(&self) -> Result<(), BlockError> {
        let mut b = self.batch();
        b.flush();
        b.run_all()
    }

    /// Discards `nblocks` blocks from `lba`; they read back as zeros.
    pub fn discard(&self, lba: Lba, nblocks: u64) -> Result<(), BlockError> {
        let mut b = self.batch();
        b.discard(lba, nblocks);
        b.run_all()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_op(&self, op: &BatchOp<'_>) -> Result<(), BlockError> {
        let (lba, nblocks) = match op {
            BatchOp::Read(lba, buf) => (*lba, self.blocks_of(buf.len())?),
            BatchOp::Write(lba, buf) => (*lba, self.blocks_of(buf.len())?),
            BatchOp::Discard(lba, n) => (*lba, *n),
            BatchOp::Flush => return Ok(()),
        };
        match lba.0.checked_add(nblocks) {
            Some(end) if end <= self.num_blocks => Ok(()),
            _ => Err(BlockError::OutOfRange {
                lba: lba.0,
                nblocks,
                num_blocks: self.num_blocks,
            }),
        }
    }

    fn blocks_of(&self, len: usize) -> Result<u64, BlockError> {
        if len & (BLOCK_SIZE - 1) != 0 {
            return Err(BlockError::Misaligned(len));
        }
        Ok((len / BLOCK_SIZE) as u64)
    }

    fn execute(&self, ops: &mut [BatchOp<'_>], depth: usize) -> Vec<Result<(), BlockError>> {
        let mut results: Vec<Result<(), BlockError>> =
            ops.iter().map(|op| self.check_op(op)).collect();
        let max = self.geometry.max_blocks_per_request();
        let mut chunks = Vec::new();
        for (index, op) in ops.iter().enumerate() {
            if results[index].is_err() {
                continue;
            }
            let (kind, lba, nblocks, per) = match op {
                BatchOp::Read(lba, buf) => (Op::Read, lba.0, (buf.len() / BLOCK_SIZE) as u64, max),
                BatchOp::Write(lba, buf) => {
                    (Op::Write, lba.0, (buf.len() / BLOCK_SIZE) as u64, max)
                }
                BatchOp::Discard(lba, n) => (Op::Discard, lba.0, *n, u32::MAX),
                BatchOp::Flush => {
                    chunks.push(Chunk {
                        op: Op::Flush,
                        index,
                        lba: 0,
                        nblocks: 0,
                        buf_off: 0,
                    });
                    continue;
                }
            };
            let mut done = 0u64;
            while done < nblocks {
                let n = (nblocks - done).min(per as u64) as u32;
                let buf_off = done as usize * BLOCK_SIZE;
                chunks.push(Chunk {
                    op: kind,
                    index,
                    lba: lba + done,
                    nblocks: n,
                    buf_off,
                });
                done += n as u64;
            }
        }
        if let Err(e) = self.run_chunks(ops, &chunks, &mut results, depth) {
            for (i, r) in results.iter_mut().enumerate() {
                if r.is_ok() && chunks.iter().any(|c| c.index == i) {
                    *r = Err(match &e {
                        BlockError::DriverGone(m) => BlockError::DriverGone(m.clone()),
                        other => BlockError::Protocol(other.to_string()),
                    });
                }
            }
        }
        results
    }

    /// Runs `chunks` keeping as many in flight as slots allow. Per-request errors go to
    /// `results`; an error return means the driver is gone or broke the protocol.
    fn run_chunks(
        &self,
        ops: &mut [BatchOp<'_>],
        chunks: &[Chunk],
        results: &mut [Result<(), BlockError>],
        depth: usize,
    ) -> Result<(), BlockError> {
        let mut next = 0usize;
        // tag → (chunk, slot)
        let mut outstanding: HashMap<u64, (usize, u32)> = HashMap::new();
        let mut claimed: Vec<(u64, i32)> = Vec::new();
        while next < chunks.len() || !outstanding.is_empty() {
            // How many chunks may go now: a flush waits for everything before it, and
            // nothing passes an outstanding flush.
            let barrier_out = outstanding
                .values()
                .any(|&(c, _)| chunks[c].op == Op::Flush);
            let mut want = 0;
            if !barrier_out {
                while next + want < chunks.len() && outstanding.len() + want < depth {
                    if chunks[next + want].op == Op::Flush {
                        if want == 0 && outstanding.is_empty() {
                            want = 1;
                        }
                        break;
                    }
                    want += 1;
                }
            }
            if want > 0 {
                let slots = {
                    let mut st = self.lock();
                    if let Some(f) = &st.failed {
                        return Err(f.to_error());
                    }
                    let n = want.min(st.free_slots.len());
                    let at = st.free_slots.len() - n;
                    st.free_slots.split_off(at)
                };
                if !slots.is_empty() {
                    self.submit(
                        ops,
                        &chunks[next..next + slots.len()],
                        next,
                        &slots,
                        &mut outstanding,
                    )?;
                    next += slots.len();
                }
            }
            if outstanding.is_empty() {
                continue;
            }
            let can_submit_more = want > 0 && next < chunks.len();
            let st = self.lock();
            let mut st = self.wait(st, |st| {
                outstanding.keys().any(|t| st.done.contains_key(t))
                    || (can_submit_more && !st.free_slots.is_empty())
            })?;
            claimed.clear();
            for tag in outstanding.keys() {
                if let Some(result) = st.done.remove(tag) {
                    claimed.push((*tag, result));
                }
            }
            drop(st);
            let mut freed = Vec::with_capacity(claimed.len());
            for &(tag, result) in &claimed {
                let (c, slot) = outstanding
                    .remove(&tag)
                    .expect("claimed tag is outstanding");
                let chunk = chunks[c];
                if result != 0 {
                    if results[chunk.index].is_ok() {
                        results[chunk.index] = Err(match Status::from_code(result) {
                            Some(s) => BlockError::from_status(
                                s,
                                chunk.lba,
                                chunk.nblocks as u64,
                                self.num_blocks,
                            ),
                            None => {
                                BlockError::Protocol(format!("unknown completion code {result}"))
                            }
                        });
                    }
                } else if let BatchOp::Read(_, buf) = &mut ops[chunk.index] {
                    let len = chunk.nblocks as usize * BLOCK_SIZE;
                    self.ring
                        .copy_from_slot(slot, 0, &mut buf[chunk.buf_off..chunk.buf_off + len]);
                }
                if slot != NO_SLOT {
                    freed.push(slot);
                }
            }
            if !freed.is_empty() {
                let mut st = self.lock();
                st.free_slots.extend(freed);
                drop(st);
                self.cond.notify_all();
            }
        }
        Ok(())
    }

    fn submit(
        &self,
        ops: &[BatchOp<'_>],
        chunks: &[Chunk],
        first: usize,
        slots: &[u32],
        outstanding: &mut HashMap<u64, (usize, u32)>,
    ) -> Result<(), BlockError> {
        // Copy data in before taking the lock: the slots are ours.
        for (chunk, &slot) in chunks.iter().zip(slots) {
            if let BatchOp::Write(_, buf) = &ops[chunk.index] {
                let len = chunk.nblocks as usize * BLOCK_SIZE;
                self.ring
                    .copy_to_slot(slot, 0, &buf[chunk.buf_off..chunk.buf_off + len]);
            }
        }
        let mut st = self.lock();
        for (i, (chunk, &slot)) in chunks.iter().zip(slots).enumerate() {
            let tag = st.next_tag;
            st.next_tag += 1;
            let ring_slot = if matches!(chunk.op, Op::Read | Op::Write) {
                slot
            } else {
                NO_SLOT
            };
            let req = Request {
                op: chunk.op,
                tag,
                lba: Lba(chunk.lba),
                nblocks: chunk.nblocks,
                slot: ring_slot,
            };
            let entry = codec::encode_request(self.ring.version(), &req)?;
            self.ring.write_sqe(st.sq_tail, &entry);
            st.sq_tail = st.sq_tail.wrapping_add(1);
            // Flush and discard carry no data but still hold a slot: it bounds the queue.
            outstanding.insert(tag, (first + i, slot));
        }
        self.ring.sq_tail().store(st.sq_tail, Ordering::Release);
        drop(st);
        fence(Ordering::SeqCst);
        if self.ring.sq_need_wakeup().load(Ordering::Relaxed) != 0
            && self.ring.sq_need_wakeup().swap(0, Ordering::SeqCst) != 0
        {
            sys::eventfd_signal(self.sq_eventfd.as_fd())?;
        }
        Ok(())
    }

    /// Moves published completions into `done`. Caller holds the lock.
    fn reap(&self, st: &mut State) -> bool {
        let tail = self.ring.cq_tail().load(Ordering::Acquire);
        let n = tail.wrapping_sub(st.cq_head);
        if n == 0 {
            return false;
        }
        if n > self.geometry.queue_depth {
            st.failed.get_or_insert(Failure::Protocol(format!(
                "completion tail {tail} jumped past head {}",
                st.cq_head
            )));
            return false;
        }
        for _ in 0..n {
            let c = codec::decode_completion(&self.ring.read_cqe(st.cq_head));
            st.done.insert(c.tag, c.result);
            st.cq_head = st.cq_head.wrapping_add(1);
        }
        self.ring.cq_head().store(st.cq_head, Ordering::Release);
        true
    }

    /// Waits until `ready` holds, driving completions; fails if the driver is gone.
    fn wait<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        ready: impl Fn(&State) -> bool,
    ) -> Result<MutexGuard<'a, State>, BlockError> {
        loop {
            if self.reap(&mut st) {
                self.cond.notify_all();
            }
            if ready(&st) {
                return Ok(st);
            }
            if let Some(f) = &st.failed {
                return Err(f.to_error());
            }
            if st.polling {
                st = self
                    .cond
                    .wait_timeout(st, self.config.poll_interval)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            st.polling = true;
            let head = st.cq_head;
            // Stays open while we sleep: only the poller replaces it, after waking.
            let pidfd = st.driver_pidfd.as_ref().map(|p| p.as_raw_fd());
            drop(st);
            let exited = self.sleep(head, pidfd);
            st = self.lock();
            st.polling = false;
            self.check_liveness(&mut st, exited);
            self.cond.notify_all();
        }
    }

    /// Spins, then sleeps until the completion tail moves past `head` or a poll interval
    /// passes. Returns whether the driver process has exited.
    fn sleep(&self, head: u32, pidfd: Option<std::os::fd::RawFd>) -> bool {
        let moved = || self.ring.cq_tail().load(Ordering::Acquire) != head;
        let spin_until = Instant::now() + self.config.spin;
        while Instant::now() < spin_until {
            if moved() {
                return false;
            }
            std::hint::spin_loop();
        }
        self.ring.cq_need_wakeup().store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.ring.cq_tail().load(Ordering::SeqCst) != head {
            return false;
        }
        let mut fds = vec![self.cq_eventfd.as_raw_fd()];
        fds.extend(pidfd);
        let ready = sys::poll_readable(&fds, self.config.poll_interval).unwrap_or_default();
        if ready.first() == Some(&true) {
            sys::eventfd_drain(self.cq_eventfd.as_fd());
        }
        ready.get(1) == Some(&true)
    }

    fn check_liveness(&self, st: &mut State, exited: bool) {
        if st.failed.is_some() {
            return;
        }
        if exited {
            // Completions posted before the exit are still valid.
            self.reap(st);
            if self.follow_successor(st) {
                return;
            }
            st.failed = Some(Failure::Gone("driver process exited".into()));
            return;
        }
        if self.ring.driver_phase() == Some(DriverPhase::Rejected) {
            st.failed = Some(Failure::Protocol(
                "driver stopped serving this client".into(),
            ));
            return;
        }
        let now = Instant::now();
        let unobserved = now.duration_since(st.last_check) > self.config.poll_interval * 3;
        st.last_check = now;
        let hb = self.ring.heartbeat().load(Ordering::Relaxed);
        if hb != st.heartbeat || unobserved {
            st.heartbeat = hb;
            st.heartbeat_moved = now;
        } else if now.duration_since(st.heartbeat_moved) >= self.config.driver_timeout {
            st.failed = Some(Failure::Gone(format!(
                "driver heartbeat has not moved for {:?}",
                self.config.driver_timeout
            )));
        }
    }

    /// After the watched driver exited: if another live process has published itself as
    /// the driver (a live update committed), watch it instead. Caller is the poller.
    fn follow_successor(&self, st: &mut State) -> bool {
        let pid = self.ring.driver_pid();
        if pid == 0 || pid == st.driver_pid || st.driver_pidfd.is_none() {
            return false;
        }
        match sys::pidfd_open(pid as i32) {
            Ok(fd) if !sys::pidfd_exited(fd.as_fd()) => {
                st.driver_pidfd = Some(fd);
                st.driver_pid = pid;
                true
            }
            _ => false,
        }
    }
}
