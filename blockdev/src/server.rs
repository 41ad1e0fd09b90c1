//! The driver's serve loop: takes entries from the ring, runs them on an engine, posts
//! completions.
//!
//! One iteration takes every available submission entry (each copied out of shared memory
//! once, then decoded and validated), submits them all to the engine in one call, reaps
//! every completion and publishes them with one tail update and at most one doorbell. It
//! sleeps only after a bounded spin finds nothing to do, and only after announcing it in the
//! header (`sq_need_wakeup`) and re-checking the queue, so a busy ring costs no wakeups.
//! How long it spins is [`crate::spin`]'s policy: fixed, or learned from how soon work came
//! after earlier idle periods.
//!
//! The loop stops between requests: once a stop is requested it takes no new entries,
//! reaps everything in flight, and returns its exportable state; `resume` serves again.
//! A *prepare* (for a live update) is a stop that can be cancelled until the drain is
//! done: a supervisor whose deadline passes cancels it and the loop serves on.
//!
//! A successor driver is built with [`Server::adopt`], which writes nothing to the ring:
//! it imports its predecessor's state, and only [`Server::attach`] (at commit) publishes
//! the device, the counters and the phase. A successor of a driver that died instead
//! ([`Server::crashed_predecessor`]) takes the ring over without a state
//! ([`Server::take_over_crashed`]); the client resubmits what the dead driver had taken.
//! Every attach starts a new driver epoch in the header (`RING.md`, "Driver crash
//! recovery").

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{Engine, IoBuf, IoCompletion, IoOp, IoRequest};
use crate::persist::{Counters, DriverState, IoCounters, StateError, StopReason};
use crate::ring::codec::{self, NO_SLOT};
use crate::ring::ProtocolVersion;
use crate::ring::{
    Completion, DriverEpoch, DriverPhase, Op, Request, RingError, RingRegion, Status,
};
use crate::spin::{SpinMode, SpinPolicy, Wait};
use crate::{Lba, BLOCK_SIZE};
use molt_sys as sys;

/// Errors that end the serve loop (as opposed to errors reported to the client).
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    #[error("engine: {0}")]
    Engine(#[from] io::Error),
    #[error("engine holds {capacity} requests but the ring needs {depth}")]
    EngineTooSmall { capacity: usize, depth: u32 },
    #[error("state: {0}")]
    State(#[from] StateError),
}

/// Tunables of the serve loop.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Longest poll of the queues after the last activity before sleeping (`spin_mode`
    /// says whether the loop always spins this long or learns a shorter budget).
    pub spin: Duration,
    /// Fixed or adaptive ([`crate::spin`]).
    pub spin_mode: SpinMode,
    /// Longest sleep: the heartbeat, stop flag and client liveness are checked this often.
    pub tick: Duration,
    /// Stop serving (cleanly) when this process exits.
    pub client_pid: Option<i32>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            spin: Duration::from_micros(50),
            spin_mode: SpinMode::Adaptive,
            tick: Duration::from_millis(100),
            client_pid: None,
        }
    }
}

// States of a prepare request, shared by the loop and the thread that asked for it.
const PREPARE_IDLE: u32 = 0;
const PREPARE_REQUESTED: u32 = 1;
/// The loop drained and returned: the prepare can no longer be cancelled.
const PREPARE_DRAINED: u32 = 2;

/// Asks a running server to stop between requests; usable from any thread.
#[derive(Debug, Clone)]
pub struct StopHandle {
    flag: Arc<AtomicBool>,
    prepare: Arc<AtomicU32>,
    wake: Arc<OwnedFd>,
}

impl StopHandle {
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = sys::eventfd_signal(self.wake.as_fd());
    }

    /// Asks the loop to take no new entries, reap everything in flight and return with
    /// [`StopReason::Prepare`]. Cancellable with [`StopHandle::cancel_prepare`].
    pub fn prepare(&self) {
        self.prepare.store(PREPARE_REQUESTED, Ordering::SeqCst);
        let _ = sys::eventfd_signal(self.wake.as_fd());
    }

    /// Cancels a prepare that has not drained yet; the loop then takes entries again.
    /// Returns false if the loop already drained (it returns, or has returned, its state).
    pub(crate) fn cancel_prepare(&self) -> bool {
        let cancelled = !matches!(
            self.prepare.compare_exchange(
                PREPARE_REQUESTED,
                PREPARE_IDLE,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ),
            Err(PREPARE_DRAINED)
        );
        let _ = sys::eventfd_signal(self.wake.as_fd());
        cancelled
    }

    /// The flag itself (e.g. for a signal handler); the loop notices it within one tick.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }
}

/// A driver that left a ring by dying, as [`Server::crashed_predecessor`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CrashedDriver {
    pub pid: u32,
    pub phase: DriverPhase,
    /// The `in_flight` counter it published last.
    pub in_flight: u64,
}

/// An idle period of the serve loop: what it waits for, how long it spins, and whether it
/// went on to sleep.
#[derive(Debug, Clone, Copy)]
struct Idle {
    wait: Wait,
    spin: Duration,
    slept: bool,
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
    prepare: Arc<AtomicU32>,
    /// Whether this server has published itself in the ring header.
    attached: bool,
    /// Whether queue positions came from an imported state (checked again at attach).
    imported: bool,
    depth: u32,
    max_blocks: u32,
    num_blocks: u64,
    sq_head: u32,
    cq_tail: u32,
    pending: Vec<Option<Pending>>,
    free_ids: Vec<u32>,
    slot_busy: Vec<bool>,
    backlog: VecDeque<Completion>,
    io: IoCounters,
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
        engine: Engine,
        sq_eventfd: OwnedFd,
        cq_eventfd: OwnedFd,
        config: ServerConfig,
    ) -> Result<Server, DriverError> {
        let mut server = Server::adopt(ring, engine, sq_eventfd, cq_eventfd, config)?;
        server.attach()?;
        Ok(server)
    }

    /// Prepares to take over a ring that another driver serves or holds, without writing
    /// anything to it: registers the data slots with the engine and checks that this build
    /// speaks the ring's protocol. [`Server::attach`] (or the first `run`) publishes.
    pub fn adopt(
        ring: RingRegion,
        mut engine: Engine,
        sq_eventfd: OwnedFd,
        cq_eventfd: OwnedFd,
        config: ServerConfig,
    ) -> Result<Server, DriverError> {
        // The ring's protocol label is checked at `attach`: during a two-component update
        // the supervisor relabels the quiet ring after this successor has started.
        let g = ring.geometry();
        if engine.capacity() < g.queue_depth as usize {
            return Err(DriverError::EngineTooSmall {
                capacity: engine.capacity(),
                depth: g.queue_depth,
            });
        }
        engine.register_ring_slots(&ring)?;
        let num_blocks = engine
            .num_blocks()
            .min(ProtocolVersion::CURRENT.max_blocks());
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
        let depth = g.queue_depth;
        Ok(Server {
            sq_head: ring.sq_head().load(Ordering::Acquire),
            cq_tail: ring.cq_tail().load(Ordering::Acquire),
            engine,
            ring,
            sq_eventfd: Arc::new(sq_eventfd),
            cq_eventfd,
            client_pidfd,
            config,
            stop: Arc::new(AtomicBool::new(false)),
            prepare: Arc::new(AtomicU32::new(PREPARE_IDLE)),
            attached: false,
            imported: false,
            depth,
            max_blocks: g.max_blocks_per_request(),
            num_blocks,
            pending: vec![None; depth as usize],
            free_ids: (0..depth).rev().collect(),
            slot_busy: vec![false; depth as usize],
            backlog: VecDeque::new(),
            io: IoCounters::default(),
            latched: None,
            reason: None,
            client_gone,
            scratch: Vec::new(),
            heartbeat: 0,
        })
    }

    /// Publishes this driver in the ring header (device, pid, counters, latched error, and
    /// last a new epoch naming the `sq_head` it starts from): the commit point of a
    /// handover. Takes the queue positions from the ring; after an import they must still
    /// be the exported ones. The heartbeat continues from the value in the header, so a
    /// client never sees it go back to a value it already saw. Idempotent.
    pub fn attach(&mut self) -> Result<(), DriverError> {
        if self.attached {
            return Ok(());
        }
        self.ring.reload_version();
        self.ring.check_speaks()?;
        let sq_head = self.ring.sq_head().load(Ordering::Acquire);
        let cq_tail = self.ring.cq_tail().load(Ordering::Acquire);
        if self.imported && (sq_head, cq_tail) != (self.sq_head, self.cq_tail) {
            return Err(StateError::Mismatch(format!(
                "ring positions moved after the state was exported (sq_head {} → {sq_head}, \
                 cq_tail {} → {cq_tail})",
                self.sq_head, self.cq_tail
            ))
            .into());
        }
        // Entries a driver that died had taken and not completed (none after a handover:
        // the import checked `sq_head = cq_tail`). Each gets a completion tagged
        // ABANDONED_TAG, so that every entry taken yields exactly one completion and a
        // later handover's state check holds; the client resubmits the requests themselves.
        let abandoned = sq_head.wrapping_sub(cq_tail);
        if abandoned > self.depth {
            return Err(RingError::Corrupted(format!(
                "{abandoned} entries taken and not completed (sq_head {sq_head}, cq_tail \
                 {cq_tail}): more than the queue holds"
            ))
            .into());
        }
        for _ in 0..abandoned {
            self.backlog.push_back(Completion {
                tag: codec::ABANDONED_TAG,
                result: 0,
            });
        }
        self.sq_head = sq_head;
        self.cq_tail = cq_tail;
        self.heartbeat = self.ring.heartbeat().load(Ordering::Relaxed);
        self.ring
            .publish_device(self.num_blocks, std::process::id());
        self.ring.publish_counters(&self.counters());
        self.ring
            .publish_latched(self.latched.map_or(0, Status::code));
        // Last: a client that sees the new epoch sees everything above.
        let epoch = self.ring.driver_epoch().epoch.wrapping_add(1);
        self.ring.publish_epoch(DriverEpoch { epoch, sq_head });
        self.attached = true;
        Ok(())
    }

    /// The ring's driver epoch (this driver's once attached).
    pub fn epoch(&self) -> u32 {
        self.ring.driver_epoch().epoch
    }

    /// Whether another driver attached to the ring after this one did (a successor was
    /// committed): this one must not serve it again.
    pub(crate) fn superseded(&self) -> bool {
        self.attached && self.ring.driver_pid() != std::process::id()
    }

    /// The pid of the driver the ring header names.
    pub(crate) fn ring_driver_pid(&self) -> u32 {
        self.ring.driver_pid()
    }

    /// Whether the ring was left by a driver that died with work taken: the header says
    /// serving (or quiesced with requests in flight) and its `driver_pid` no longer runs
    /// (never existed, reaped, or a zombie). A predecessor that is alive (a live update) or
    /// that stopped cleanly is not one. `None` once this server is attached.
    pub(crate) fn crashed_predecessor(&self) -> Option<CrashedDriver> {
        if self.attached {
            return None;
        }
        let phase = self.ring.driver_phase()?;
        let in_flight = self.ring.counters().in_flight;
        let left_work = match phase {
            DriverPhase::Serving => true,
            DriverPhase::Quiesced => in_flight != 0,
            DriverPhase::NotStarted | DriverPhase::Rejected => false,
        };
        let pid = self.ring.driver_pid();
        // pid 0: nobody published one; nothing says a driver ran. Our own pid: the dead
        // driver's, reused by this process after the reap.
        let gone = pid == std::process::id() || sys::process_gone(pid);
        if !left_work || pid == 0 || !gone {
            return None;
        }
        Some(CrashedDriver {
            pid,
            phase,
            in_flight,
        })
    }

    /// Takes over a ring whose driver died ([`Server::crashed_predecessor`]), without a
    /// state: carries over the I/O counters and the latched error it published (a latch
    /// holds until the image is reopened, and the image fd is the same), starts with none
    /// of its requests (they died with it: the client resubmits those it had taken;
    /// `attach` completes their entries with [`codec::ABANDONED_TAG`]), and attaches. Only
    /// before attaching.
    pub(crate) fn take_over_crashed(&mut self) -> Result<(), DriverError> {
        if self.attached || self.outstanding() != 0 {
            return Err(StateError::Mismatch(
                "a crashed driver's ring can only be taken over before attaching".into(),
            )
            .into());
        }
        self.ring.reload_version();
        // Before reading the latched code: it is numbered by the ring's status table.
        self.ring.check_speaks()?;
        // Counters that do not fit this build's width (u32 build) restart from zero: they
        // are statistics, not state the client relies on.
        self.io = IoCounters::from_view(&self.ring.counters()).unwrap_or_default();
        self.latched = match self.ring.latched() {
            0 => None,
            code => Some(Status::from_code(code).unwrap_or(Status::Io)),
        };
        self.attach()
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            flag: self.stop.clone(),
            prepare: self.prepare.clone(),
            wake: self.sq_eventfd.clone(),
        }
    }

    pub fn counters(&self) -> Counters {
        self.io.view(self.outstanding() as u64)
    }

    /// Carries counters, a latched error and the queue positions over from a
    /// predecessor's exported state, after checking that it describes this ring and this
    /// image. Before [`Server::attach`] nothing is written to the ring.
    pub(crate) fn import_state(&mut self, state: &DriverState) -> Result<(), StateError> {
        state.check()?;
        let mismatch = |m: String| Err(StateError::Mismatch(m));
        if state.geometry != self.ring.geometry() {
            return mismatch(format!(
                "geometry {:?} is not the ring's {:?}",
                state.geometry,
                self.ring.geometry()
            ));
        }
        if state.ring_version != self.ring.version() {
            return mismatch(format!(
                "state from protocol v{} but the ring speaks v{}",
                state.ring_version.0,
                self.ring.version().0
            ));
        }
        if state.num_blocks != self.num_blocks {
            return mismatch(format!(
                "device of {} blocks, but this image has {}",
                state.num_blocks, self.num_blocks
            ));
        }
        if self.outstanding() != 0 {
            return mismatch("this driver has requests in flight".into());
        }
        let (sq_head, cq_tail) = if self.attached {
            (self.sq_head, self.cq_tail)
        } else {
            (
                self.ring.sq_head().load(Ordering::Acquire),
                self.ring.cq_tail().load(Ordering::Acquire),
            )
        };
        if (sq_head, cq_tail) != (state.sq_head, state.cq_tail) {
            return mismatch(format!(
                "state positions sq_head {} cq_tail {} but the ring has {sq_head} and {cq_tail}",
                state.sq_head, state.cq_tail
            ));
        }
        self.io = IoCounters::from_view(&state.counters)?;
        self.latched = state.latched;
        self.sq_head = state.sq_head;
        self.cq_tail = state.cq_tail;
        self.imported = true;
        if self.attached {
            self.ring.publish_counters(&self.counters());
            self.ring
                .publish_latched(self.latched.map_or(0, Status::code));
        }
        Ok(())
    }

    /// The state to hand over, checked against the ring: nothing in flight, and the
    /// positions in the header are the driver's own. Only meaningful after `run` returned.
    pub(crate) fn export_state(&self) -> Result<Vec<u8>, StateError> {
        let state = self.state(StopReason::Prepare);
        let ring = (
            self.ring.sq_head().load(Ordering::Acquire),
            self.ring.cq_tail().load(Ordering::Acquire),
        );
        if ring != (self.sq_head, self.cq_tail) {
            return Err(StateError::Inconsistent(format!(
                "ring positions {ring:?} are not the driver's ({}, {})",
                self.sq_head, self.cq_tail
            )));
        }
        state.export()
    }

    /// The driver's state now.
    pub fn state(&self, reason: StopReason) -> DriverState {
        DriverState {
            counters: self.counters(),
            geometry: self.ring.geometry(),
            num_blocks: self.num_blocks,
            engine: self.engine.kind(),
            latched: self.latched,
            sq_head: self.sq_head,
            cq_tail: self.cq_tail,
            ring_version: self.ring.version(),
            reason,
        }
    }

    /// Clears a previous stop or prepare request and serves again.
    pub fn resume(&mut self) -> Result<DriverState, DriverError> {
        self.stop.store(false, Ordering::SeqCst);
        self.prepare.store(PREPARE_IDLE, Ordering::SeqCst);
        self.run()
    }

    /// Forgets a finished prepare, so that the next one can be requested; a stop requested
    /// meanwhile (e.g. by a signal) is kept. Call before telling anyone that the driver
    /// serves again, then `run`.
    pub(crate) fn clear_prepare(&mut self) {
        self.prepare.store(PREPARE_IDLE, Ordering::SeqCst);
    }

    /// Whether `run` would accept the ring now (after a hold, the supervisor may have
    /// relabelled it for an update that was then rolled back).
    pub(crate) fn check_can_resume(&self) -> Result<(), DriverError> {
        self.ring.check_speaks()?;
        Ok(())
    }

    /// A second, read-only by convention, mapping of the ring (e.g. to report status from
    /// another thread).
    pub(crate) fn ring_view(&self) -> Result<RingRegion, DriverError> {
        Ok(self.ring.try_clone()?)
    }

    /// Serves until a stop is requested, the client exits, or it breaks the protocol.
    /// Returns with nothing in flight.
    pub fn run(&mut self) -> Result<DriverState, DriverError> {
        self.attach()?;
        // A ring relabelled while the driver held (an update that was rolled back without
        // restoring the label) must not be served with the wrong entry layout.
        self.ring.check_speaks()?;
        self.reason = self.client_gone.then_some(StopReason::ClientGone);
        self.ring.set_driver_phase(DriverPhase::Serving);
        // Wake a client waiting for the driver to attach.
        let _ = sys::eventfd_signal(self.cq_eventfd.as_fd());
        let mut spin = SpinPolicy::new(self.config.spin_mode, self.config.spin);
        let mut last_progress = Instant::now();
        // The idle period since `last_progress`, once an iteration found nothing to do.
        let mut idle: Option<Idle> = None;
        let mut last_client_check = Instant::now();
        loop {
            self.heartbeat = self.heartbeat.wrapping_add(1);
            self.ring
                .heartbeat()
                .store(self.heartbeat, Ordering::Relaxed);
            if matches!(self.reason, None | Some(StopReason::Prepare))
                && self.stop.load(Ordering::Acquire)
            {
                self.reason = Some(StopReason::Requested);
            }
            match (&self.reason, self.prepare.load(Ordering::Acquire)) {
                (None, PREPARE_REQUESTED) => self.reason = Some(StopReason::Prepare),
                // Cancelled before the drain finished: serve on.
                (Some(StopReason::Prepare), PREPARE_IDLE) => self.reason = None,
                _ => {}
            }
            let stopping = self.reason.is_some();
            let mut progressed = false;
            if !stopping {
                progressed |= self.take_entries();
            }
            self.engine.submit()?;
            progressed |= self.reap_and_post();
            // A prepare also waits until every completion is posted (the client has room
            // for them unless it stopped reaping; the deadline covers that).
            let drained = if self.reason == Some(StopReason::Prepare) {
                self.outstanding() == 0
            } else {
                self.outstanding() == self.backlog.len()
            };
            if stopping && drained {
                if self.reason == Some(StopReason::Prepare)
                    && self
                        .prepare
                        .compare_exchange(
                            PREPARE_REQUESTED,
                            PREPARE_DRAINED,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        )
                        .is_err()
                {
                    // Cancelled at the last moment: serve on.
                    self.reason = None;
                    continue;
                }
                break;
            }
            if progressed {
                let now = Instant::now();
                if let Some(i) = idle.take() {
                    spin.record(i.wait, i.spin, now - last_progress, i.slept);
                }
                last_progress = now;
                continue;
            }
            let i = idle.get_or_insert_with(|| {
                let wait = if self.outstanding() > self.backlog.len() {
                    Wait::Device
                } else {
                    Wait::Client
                };
                Idle {
                    wait,
                    spin: spin.budget(wait),
                    slept: false,
                }
            });
            if !i.slept && last_progress.elapsed() < i.spin {
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
            i.slept = true;
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
        self.ring.publish_counters(&self.counters());
        self.ring.set_driver_phase(phase);
        let _ = sys::eventfd_signal(self.cq_eventfd.as_fd());
        Ok(self.state(reason))
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
        IoCounters::bump(&mut self.io.errors, 1);
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
                let c = &mut self.io;
                match p.op {
                    Op::Read => {
                        IoCounters::bump(&mut c.reads, 1);
                        IoCounters::bump(&mut c.bytes_read, p.bytes);
                    }
                    Op::Write => {
                        IoCounters::bump(&mut c.writes, 1);
                        IoCounters::bump(&mut c.bytes_written, p.bytes);
                    }
                    Op::Flush => IoCounters::bump(&mut c.flushes, 1),
                    Op::Discard => IoCounters::bump(&mut c.discards, 1),
                }
                0
            }
            Err(status) => {
                IoCounters::bump(&mut self.io.errors, 1);
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
        self.ring.publish_counters(&self.counters());
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
