//! The block client: thread-safe, batched, and bounded in how long it waits for a driver.
//!
//! Each request holds one data slot from submission until its completion is claimed, so
//! at most `queue_depth` requests are in the ring and neither queue can overflow. Data is
//! copied into the slot before submission and out of it after completion, outside the
//! lock. Waiting threads elect one "poller" that spins briefly, then announces that it
//! sleeps (`cq_need_wakeup`), re-checks, and sleeps on the completion eventfd and the
//! driver's pidfd; the others wait on a condition variable.
//!
//! A driver that dies is replaced by its supervisor with a successor on the same ring,
//! which starts a new driver epoch. The client keeps every request it has in the ring
//! (position and entry) until its completion is reaped; when it sees a new epoch it
//! resubmits those an earlier driver took and never completed, so its callers see a pause,
//! not an error (`RING.md`, "Driver crash recovery").

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::ring::codec::{self, NO_SLOT, SQE_SIZE};
use crate::ring::Counters;
use crate::ring::{DriverEpoch, DriverPhase, Op, Request, RingGeometry, RingRegion, Status};
use crate::{BlockError, Lba, BLOCK_SIZE};
use molt_sys as sys;

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
    /// considered gone (used when no pidfd of the driver is known). A successor that takes
    /// the ring over within it moves the heartbeat on: its start must fit well inside.
    pub driver_timeout: Duration,
    /// With a pidfd: how long after the driver process exited a successor may take to
    /// attach (a new driver epoch) before waiting calls fail. A restart takes tens of ms.
    pub restart_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            spin: Duration::ZERO,
            poll_interval: Duration::from_millis(100),
            driver_timeout: Duration::from_secs(10),
            restart_timeout: Duration::from_secs(2),
        }
    }
}

/// What this client saw of driver replacements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoveryStats {
    /// The driver epoch the client last caught up with.
    pub epoch: u32,
    /// Epoch changes it caught up with (live-update successors and crash successors; one
    /// catch-up may cover several epochs).
    pub driver_changes: u64,
    /// Requests it resubmitted because a driver took them and never completed them.
    pub resubmitted: u64,
    /// Completions a successor posted for entries a dead driver had taken
    /// ([`codec::ABANDONED_TAG`]); in the end as many as `resubmitted`.
    pub abandoned: u64,
}

/// A request in the ring: submitted, completion not reaped yet.
#[derive(Debug, Clone, Copy)]
struct InRing {
    /// Submission counter of its (latest) entry.
    counter: u32,
    /// The entry as written; the data of a write is still in its slot, which the
    /// submitting thread holds until it claims the completion.
    entry: [u8; SQE_SIZE],
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
    /// tag → entry, for every request submitted and not reaped (at most `queue_depth`).
    in_ring: HashMap<u64, InRing>,
    polling: bool,
    failed: Option<Failure>,
    heartbeat: u64,
    heartbeat_moved: Instant,
    /// When liveness was last checked: a heartbeat that did not move while nobody was
    /// waiting (an idle client, a driver holding for a live update) proves nothing.
    last_check: Instant,
    /// A pidfd of the driver, and the pid it refers to. Only the poller uses or replaces
    /// it (one thread at a time, see `wait`). `None` in pidfd mode while no live driver is
    /// known (`lost_since`).
    driver_pidfd: Option<OwnedFd>,
    driver_pid: u32,
    /// Liveness by pidfd (the client was given one) rather than by heartbeat.
    watch_pid: bool,
    /// Pidfd mode: when the watched driver was found dead, no successor having attached.
    lost_since: Option<Instant>,
    stats: RecoveryStats,
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
    /// With `driver_pidfd`, a driver exit fails waiting calls unless a successor attaches
    /// within `config.restart_timeout` (a live-update successor has attached already: it
    /// publishes itself before its predecessor exits); the client then watches the
    /// successor. Without one, liveness is the heartbeat's (`config.driver_timeout`).
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
            // Tags start above the reserved one and never wrap (u64).
            next_tag: codec::ABANDONED_TAG + 1,
            done: HashMap::new(),
            in_ring: HashMap::new(),
            polling: false,
            failed: None,
            heartbeat: ring.heartbeat().load(Ordering::Relaxed),
            heartbeat_moved: Instant::now(),
            last_check: Instant::now(),
            watch_pid: driver_pidfd.is_some(),
            driver_pidfd,
            driver_pid: ring.driver_pid(),
            lost_since: None,
            stats: RecoveryStats {
                epoch: ring.driver_epoch().epoch,
                ..RecoveryStats::default()
            },
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

    /// Driver replacements this client caught up with, and what it resubmitted.
    pub fn recovery_stats(&self) -> RecoveryStats {
        self.lock().stats
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
                // Nothing of ours to wait for, and every slot is held by other threads:
                // wait until one frees a slot rather than spin on the lock.
                if want > 0 {
                    self.wait_for_slot()?;
                }
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

    /// Waits until a data slot is free. The slot holders drive the completions; this only
    /// waits for them (or for the client to fail).
    fn wait_for_slot(&self) -> Result<(), BlockError> {
        let mut st = self.lock();
        loop {
            if let Some(f) = &st.failed {
                return Err(f.to_error());
            }
            if !st.free_slots.is_empty() {
                return Ok(());
            }
            st = self
                .cond
                .wait_timeout(st, self.config.poll_interval)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
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
            let counter = st.sq_tail;
            st.in_ring.insert(tag, InRing { counter, entry });
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
            // Abandoned-entry completions, and tags not in the ring (a confused driver),
            // are dropped: nobody waits for them.
            if st.in_ring.remove(&c.tag).is_some() {
                st.done.insert(c.tag, c.result);
            } else if c.tag == codec::ABANDONED_TAG {
                st.stats.abandoned += 1;
            }
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

    /// The poller's check after each sleep: a new driver epoch (catch up with it), a
    /// driver that exited or stopped beating (fail once its time is up), or a rejection.
    fn check_liveness(&self, st: &mut State, exited: bool) {
        if st.failed.is_some() {
            return;
        }
        let now = Instant::now();
        if exited {
            // Completions posted before the exit are still valid.
            self.reap(st);
            // Readable for good now: stop polling it.
            st.driver_pidfd = None;
            if !self.follow_successor(st) {
                st.lost_since.get_or_insert(now);
            }
        }
        if self.ring.driver_phase() == Some(DriverPhase::Rejected) {
            st.failed = Some(Failure::Protocol(
                "driver stopped serving this client".into(),
            ));
            return;
        }
        let epoch = self.ring.driver_epoch();
        if epoch.epoch != st.stats.epoch {
            self.catch_up(st, epoch, now);
            if st.failed.is_some() {
                return;
            }
        }
        if let Some(since) = st.lost_since {
            if now.duration_since(since) >= self.config.restart_timeout {
                st.failed = Some(Failure::Gone(format!(
                    "driver process exited and no successor took the ring over within {:?}",
                    self.config.restart_timeout
                )));
            }
            return;
        }
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

    /// A driver attached since the client last looked (`epoch`): a live-update successor,
    /// or the successor of a driver that died. Reaps every completion posted so far (an
    /// earlier driver's all precede the new one's in the queue), then resubmits, oldest
    /// first, each request an earlier driver took (counter below `epoch.sq_head`) and never
    /// completed. Entries from `epoch.sq_head` on are the new driver's to take. Caller is
    /// the poller, holding the lock.
    fn catch_up(&self, st: &mut State, epoch: DriverEpoch, now: Instant) {
        self.reap(st);
        if st.failed.is_some() {
            return;
        }
        let tail = st.sq_tail;
        // The ring's sq_head now lies between the new driver's start and our tail (it
        // only grows, and entries in the queue are outstanding requests, ≤ queue_depth).
        let head = self.ring.sq_head().load(Ordering::Acquire);
        if tail.wrapping_sub(head) > tail.wrapping_sub(epoch.sq_head)
            || tail.wrapping_sub(head) > self.geometry.queue_depth
        {
            st.failed = Some(Failure::Protocol(format!(
                "driver epoch {} starts at submission {} but the queue is at {head}..{tail}",
                epoch.epoch, epoch.sq_head
            )));
            return;
        }
        // Taken before the new driver started: 0 < start − counter ≤ tail − counter.
        let mut redo: Vec<(u32, u64)> = st
            .in_ring
            .iter()
            .filter(|(_, r)| {
                let d = epoch.sq_head.wrapping_sub(r.counter);
                d != 0 && d <= tail.wrapping_sub(r.counter)
            })
            .map(|(&tag, r)| (tail.wrapping_sub(r.counter), tag))
            .collect();
        redo.sort_unstable_by_key(|&(age, _)| std::cmp::Reverse(age));
        for &(_, tag) in &redo {
            if let Some(r) = st.in_ring.get_mut(&tag) {
                self.ring.write_sqe(st.sq_tail, &r.entry);
                r.counter = st.sq_tail;
                st.sq_tail = st.sq_tail.wrapping_add(1);
            }
        }
        if !redo.is_empty() {
            self.ring.sq_tail().store(st.sq_tail, Ordering::Release);
            fence(Ordering::SeqCst);
            // Rare: ring whether or not the driver announced that it sleeps.
            self.ring.sq_need_wakeup().store(0, Ordering::Relaxed);
            let _ = sys::eventfd_signal(self.sq_eventfd.as_fd());
        }
        st.stats.epoch = epoch.epoch;
        st.stats.driver_changes += 1;
        st.stats.resubmitted += redo.len() as u64;
        st.heartbeat = self.ring.heartbeat().load(Ordering::Relaxed);
        st.heartbeat_moved = now;
        st.last_check = now;
        st.lost_since = None;
        if st.watch_pid {
            self.watch_driver(st, now);
        }
    }

    /// Pidfd mode: watches the process the header names as the driver now; if it is not
    /// running, the client waits for a successor (`lost_since`).
    fn watch_driver(&self, st: &mut State, now: Instant) {
        let pid = self.ring.driver_pid();
        if st.driver_pidfd.is_some() && pid == st.driver_pid {
            return;
        }
        let fd = libc::pid_t::try_from(pid)
            .ok()
            .filter(|&p| p > 0)
            .and_then(|p| sys::pidfd_open(p).ok())
            .filter(|fd| !sys::pidfd_exited(fd.as_fd()));
        st.driver_pid = pid;
        if fd.is_none() {
            st.lost_since.get_or_insert(now);
        }
        st.driver_pidfd = fd;
    }

    /// After the watched driver exited: if another live process has published itself as
    /// the driver (a live update committed; drivers that predate epochs publish nothing
    /// else), watch it instead. Caller is the poller.
    fn follow_successor(&self, st: &mut State) -> bool {
        let pid = self.ring.driver_pid();
        if pid == 0 || pid == st.driver_pid || !st.watch_pid {
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
