//! Crash recovery of the driver: a SIGKILLed driver is replaced, on the same ring, doorbells
//! and image, by a driver started with `--adopt`; the client resubmits what the dead one
//! had taken, and its callers see a pause, not an error.
//!
//! Every test arms a watchdog that aborts the test process past its deadline, and holds its
//! driver processes in guards that kill and reap them, even on panic. The drivers are
//! started with `--client-pid` of this process, so an abort leaves none behind either.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::driver_control::DriverControl;
use blockdev::engine::EngineKind;
use blockdev::image::{Image, ScratchImage};
use blockdev::persist::Counters;
use blockdev::ring::{DriverEpoch, DriverPhase, RingGeometry, RingRegion};
use blockdev::spawn::{driver_command_with_control, DriverFds, RingSetup, StartMode};
use blockdev::{BlockError, Client, ClientConfig, Lba, BLOCK_SIZE};
use molt_control::ServingPhase;

use super::{config, DEADLINE};

/// Polls `cond` until it holds, napping between checks (two cores: leave them to the load
/// and the driver); fails the test after `DEADLINE`.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        thread::sleep(Duration::from_micros(200));
    }
}

const GEOMETRY: RingGeometry = RingGeometry {
    queue_depth: 16,
    slot_size: 4 * BLOCK_SIZE as u32,
};

/// Aborts the test process if the test is still running after its deadline. Dropping it
/// (end of the test, or unwinding) disarms it.
struct Watchdog {
    _armed: mpsc::Sender<()>,
}

fn watchdog(test: &'static str, limit: Duration) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("{test}: still running after {limit:?}: aborting the test process");
            std::process::abort();
        }
    });
    Watchdog { _armed: tx }
}

/// A driver process and its control link; killed and reaped when dropped.
struct Driver {
    child: Child,
    ctl: DriverControl,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    /// SIGKILL, then reap: what a supervisor sees of a crash.
    fn crash(&mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL the driver");
        self.child.wait().expect("reap the driver")
    }

    /// Waits (bounded) for the process to exit on its own.
    fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(start.elapsed() < DEADLINE, "driver did not exit");
            thread::yield_now();
        }
    }

    /// A clean stop: drain, hold, exit.
    fn stop(mut self) {
        self.ctl.prepare(Duration::from_secs(5)).unwrap();
        self.ctl.exit().unwrap();
        assert!(self.wait_exit().success());
    }
}

fn start_driver(setup: &RingSetup, image: &Image, engine: EngineKind, mode: StartMode) -> Driver {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let fds = DriverFds {
        ring: setup.ring.fd(),
        sq_eventfd: setup.sq_eventfd.as_fd(),
        cq_eventfd: setup.cq_eventfd.as_fd(),
        image: image.file().as_fd(),
    };
    let (mut cmd, guard) = driver_command_with_control(
        fds,
        &config(engine),
        Some(std::process::id()),
        theirs.as_fd(),
        mode,
    )
    .unwrap();
    let child = cmd.spawn().unwrap();
    drop(guard);
    drop(theirs);
    let mut ctl = DriverControl::new(ours).unwrap();
    ctl.set_reply_timeout(DEADLINE);
    Driver { child, ctl }
}

fn pidfd(pid: u32) -> OwnedFd {
    molt_sys::pidfd_open(pid as libc::pid_t).unwrap_or_else(|e| panic!("pidfd_open({pid}): {e}"))
}

fn connect(setup: &RingSetup, pidfd: Option<OwnedFd>, cfg: ClientConfig) -> Arc<Client> {
    let (ring_fd, sq, cq) = setup.try_clone_fds().unwrap();
    let ring = RingRegion::open(ring_fd).unwrap();
    Arc::new(Client::connect(ring, sq, cq, pidfd, cfg).unwrap())
}

/// The pid of a process that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut c = Command::new(env!("CARGO_BIN_EXE_blockdev"))
        .arg("component-info")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    c.wait().unwrap();
    c.id()
}

fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
    x |= 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

const BLOCK_MAGIC: &[u8; 8] = b"MOLTBLK\0";

/// The content of block `lba` after the write with sequence number `seq` (0: never
/// written, zeros): a header naming both, then bytes derived from them.
fn block(lba: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    if seq == 0 {
        return b;
    }
    b[..8].copy_from_slice(BLOCK_MAGIC);
    b[8..16].copy_from_slice(&lba.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    let mut next = xorshift(lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq);
    for chunk in b[24..].chunks_mut(8) {
        let v = next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    b
}

/// Checks a block read back against the last acknowledged write; says what it found.
fn check_block(lba: u64, want_seq: u64, got: &[u8]) -> Result<(), String> {
    if got == &block(lba, want_seq)[..] {
        return Ok(());
    }
    let found = if got[..8] == BLOCK_MAGIC[..] {
        format!(
            "the write of lba {} seq {}",
            u64::from_le_bytes(got[8..16].try_into().unwrap()),
            u64::from_le_bytes(got[16..24].try_into().unwrap())
        )
    } else if got.iter().all(|&b| b == 0) {
        "zeros".to_string()
    } else {
        "garbage".to_string()
    };
    Err(format!(
        "block {lba} holds {found}, but its last acknowledged write is seq {want_seq}"
    ))
}

// The load: each thread owns PARTS × PART_BLOCKS blocks and runs batches with at most one
// operation per part, so no two of its requests overlap and its model is exact.
const THREADS: u64 = 6;
const PARTS: u64 = 4;
const PART_BLOCKS: u64 = 16;
const THREAD_BLOCKS: u64 = PARTS * PART_BLOCKS;
const LOAD_BLOCKS: u64 = THREADS * THREAD_BLOCKS;

/// The last acknowledged write (sequence number) of every block of one thread.
type Model = Vec<u64>;

struct Load {
    stop: Arc<AtomicBool>,
    batches: Arc<AtomicU64>,
    /// Each thread's model and the longest time one of its batches took.
    threads: Vec<JoinHandle<Result<(Model, Duration), String>>>,
}

fn start_load(client: Arc<Client>, seed: u64) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let batches = Arc::new(AtomicU64::new(0));
    let threads = (0..THREADS)
        .map(|t| {
            let (client, stop, batches) = (client.clone(), stop.clone(), batches.clone());
            thread::spawn(move || load_thread(&client, t, seed, &stop, &batches))
        })
        .collect();
    Load {
        stop,
        batches,
        threads,
    }
}

struct Op {
    write: bool,
    at: u64,
    seq: u64,
    buf: Vec<u8>,
}

fn load_thread(
    client: &Client,
    t: u64,
    seed: u64,
    stop: &AtomicBool,
    batches: &AtomicU64,
) -> Result<(Model, Duration), String> {
    let base = t * THREAD_BLOCKS;
    let mut slowest = Duration::ZERO;
    let mut model: Model = vec![0; THREAD_BLOCKS as usize];
    let mut next = xorshift(seed ^ (t + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut seq = t << 40;
    while !stop.load(Ordering::Relaxed) {
        let mut ops = Vec::new();
        for p in 0..PARTS {
            let r = next();
            if r % 8 == 7 {
                continue;
            }
            // Up to 6 blocks: two ring requests with 4-block slots.
            let n = 1 + (r >> 8) % 6;
            let at = p * PART_BLOCKS + (r >> 16) % (PART_BLOCKS - n + 1);
            if r % 8 < 4 {
                seq += 1;
                let buf = (0..n).flat_map(|k| block(base + at + k, seq)).collect();
                ops.push(Op {
                    write: true,
                    at,
                    seq,
                    buf,
                });
            } else {
                ops.push(Op {
                    write: false,
                    at,
                    seq: 0,
                    buf: vec![0xAA; n as usize * BLOCK_SIZE],
                });
            }
        }
        let flush = next().is_multiple_of(16);
        let mut b = client.batch();
        for op in ops.iter_mut() {
            let lba = Lba(base + op.at);
            if op.write {
                b.write(lba, &op.buf);
            } else {
                b.read(lba, &mut op.buf);
            }
        }
        if flush {
            b.flush();
        }
        let started = Instant::now();
        let results = b.run();
        slowest = slowest.max(started.elapsed());
        for (i, r) in results.into_iter().enumerate() {
            r.map_err(|e| format!("thread {t}: operation {i} of a batch failed: {e}"))?;
        }
        for op in &ops {
            for (k, got) in op.buf.chunks(BLOCK_SIZE).enumerate() {
                let i = (op.at + k as u64) as usize;
                if op.write {
                    model[i] = op.seq;
                } else {
                    check_block(base + i as u64, model[i], got)
                        .map_err(|e| format!("thread {t}: read: {e}"))?;
                }
            }
        }
        batches.fetch_add(1, Ordering::Relaxed);
    }
    Ok((model, slowest))
}

impl Load {
    /// Waits until the load ran `n` more batches (or a thread ended: an error).
    fn progress(&self, n: u64) {
        let from = self.batches.load(Ordering::Relaxed);
        wait_until("the load to make progress", || {
            self.batches.load(Ordering::Relaxed) >= from + n
                || self.threads.iter().any(|t| t.is_finished())
        });
    }

    /// Stops the load: the model of every block and the slowest batch, or the first
    /// error a thread saw.
    fn finish(self) -> (Model, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        let mut slowest = Duration::ZERO;
        for t in self.threads {
            let (model, s) = t
                .join()
                .expect("load thread panicked")
                .unwrap_or_else(|e| panic!("a caller saw an error: {e}"));
            all.extend(model);
            slowest = slowest.max(s);
        }
        (all, slowest)
    }
}

fn kills() -> usize {
    std::env::var("MOLT_DRIVER_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

fn seed() -> u64 {
    std::env::var("MOLT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// Entries taken from the ring whose completion is not posted (after a kill: those the
/// dead driver abandoned, plus any abandoned-entry completions its own predecessor's
/// successor had not posted yet).
fn taken_not_completed(ring: &RingRegion) -> u32 {
    let head = ring.sq_head().load(Ordering::Acquire);
    head.wrapping_sub(ring.cq_tail().load(Ordering::Acquire))
}

/// Verified random writes and reads at queue depth; the driver is SIGKILLed at random
/// moments and replaced by an `--adopt` driver on the same descriptors. No caller sees an
/// error, every block reads back as its last acknowledged write, and the client resubmits
/// exactly the requests the dead drivers took and never completed: as many as the
/// successors counted from the queue positions.
fn kill_and_replace_under_load(test: &'static str, watch_pid: bool) {
    let kills = kills();
    let _dog = watchdog(
        test,
        Duration::from_secs(120) + kills as u32 * Duration::from_secs(3),
    );
    let seed = seed();
    eprintln!("{test}: seed {seed} (MOLT_SEED), {kills} kills (MOLT_DRIVER_KILLS)");
    let img = ScratchImage::create(LOAD_BLOCKS + 64).unwrap();
    let image = img.open().unwrap();
    let setup = RingSetup::new(GEOMETRY).unwrap();
    let ring = &setup.ring;
    let mut driver = start_driver(&setup, &image, EngineKind::Uring, StartMode::Fresh);
    // Default timeouts: they must cover a restart with room to spare.
    let client = connect(
        &setup,
        watch_pid.then(|| pidfd(driver.child.id())),
        ClientConfig::default(),
    );
    let load = start_load(client.clone(), seed);
    let mut next = xorshift(seed);
    let mut restarts = Vec::with_capacity(kills);
    let mut taken_total = 0u64;
    let mut hits = 0;
    for k in 0..kills {
        load.progress(1 + next() % 32);
        // A random moment among the requests of the next batches.
        thread::sleep(Duration::from_micros(next() % 3000));
        let killed_at = Instant::now();
        driver.crash();
        let taken = taken_not_completed(ring);
        taken_total += taken as u64;
        hits += (taken > 0) as usize;
        let before = ring.driver_epoch().epoch;
        let engine = if k % 2 == 0 {
            EngineKind::Sync
        } else {
            EngineKind::Uring
        };
        driver = start_driver(&setup, &image, engine, StartMode::Adopt);
        wait_until("the successor to take the ring over", || {
            ring.driver_epoch().epoch != before
        });
        restarts.push(killed_at.elapsed());
        assert_eq!(ring.driver_epoch().epoch, before.wrapping_add(1));
        assert_eq!(ring.driver_pid(), driver.child.id());
    }
    load.progress(50);
    let (model, slowest) = load.finish();
    assert_eq!(model.len() as u64, LOAD_BLOCKS);
    // Every block reads back as its last acknowledged write, through the client...
    let mut all = vec![0u8; LOAD_BLOCKS as usize * BLOCK_SIZE];
    client.read(Lba(0), &mut all).unwrap();
    for (lba, got) in all.chunks(BLOCK_SIZE).enumerate() {
        check_block(lba as u64, model[lba], got).unwrap();
    }
    client.flush().unwrap();
    let stats = client.recovery_stats();
    assert_eq!(stats.epoch, ring.driver_epoch().epoch);
    // Two independent counts: the client's (entries below a new driver's start without
    // a completion) and the successors' (sq_head − cq_tail when they attached).
    assert_eq!(
        stats.resubmitted, stats.abandoned,
        "the client resubmits exactly what the dead drivers took and did not complete"
    );
    assert!(stats.resubmitted <= taken_total);
    assert_eq!(taken_total > 0, stats.resubmitted > 0);
    assert!(stats.driver_changes >= 1 && stats.driver_changes <= kills as u64);
    let c: Counters = client.counters();
    assert_eq!((c.errors, c.in_flight), (0, 0));
    // ...and in the image, after a clean stop (whose drain checks sq_head = cq_tail: the
    // successors' abandoned-entry completions kept one completion per entry taken).
    driver.stop();
    let file = img.contents().unwrap();
    for (lba, got) in file[..all.len()].chunks(BLOCK_SIZE).enumerate() {
        check_block(lba as u64, model[lba], got).unwrap();
    }
    restarts.sort();
    let median = restarts
        .get(restarts.len() / 2)
        .copied()
        .unwrap_or_default();
    eprintln!(
        "{test}: {kills} kills, {hits} with requests taken and not completed; {} \
         resubmitted; kill → successor attached: min {:?} median {median:?} max {:?}; {} \
         driver changes seen by the client; slowest batch {slowest:?}",
        stats.resubmitted,
        restarts.first().copied().unwrap_or_default(),
        restarts.last().copied().unwrap_or_default(),
        stats.driver_changes,
    );
}

#[test]
fn sigkilled_driver_is_replaced_without_errors() {
    // Liveness by heartbeat, as fsd runs its client.
    kill_and_replace_under_load("sigkilled_driver_is_replaced_without_errors", false);
}

#[test]
fn sigkilled_driver_is_replaced_without_errors_pidfd() {
    kill_and_replace_under_load("sigkilled_driver_is_replaced_without_errors_pidfd", true);
}

/// A fake driver "dies" having taken one entry (never completed) while a second waits in
/// the queue. The successor takes the second; the client resubmits the first, and only it.
#[test]
fn a_taken_request_is_resubmitted_and_a_waiting_one_is_not() {
    let _dog = watchdog("a_taken_request_is_resubmitted", DEADLINE * 2);
    let img = ScratchImage::create(64).unwrap();
    let image = img.open().unwrap();
    let setup = RingSetup::new(GEOMETRY).unwrap();
    let ring = &setup.ring;
    ring.publish_device(64, dead_pid());
    ring.heartbeat().store(1000, Ordering::Relaxed);
    ring.publish_epoch(DriverEpoch {
        epoch: 7,
        sq_head: 0,
    });
    ring.set_driver_phase(DriverPhase::Serving);
    let client = connect(&setup, None, ClientConfig::default());
    let write = |lba: u64, seq: u64| {
        let c = client.clone();
        thread::spawn(move || c.write(Lba(lba), &block(lba, seq)))
    };
    let first = write(5, 1);
    wait_until("the first entry", || {
        ring.sq_tail().load(Ordering::Acquire) == 1
    });
    // The dead driver took it.
    ring.sq_head().store(1, Ordering::Release);
    ring.publish_counters(&Counters {
        in_flight: 1,
        ..Counters::default()
    });
    let second = write(6, 2);
    wait_until("the second entry", || {
        ring.sq_tail().load(Ordering::Acquire) == 2
    });
    let mut driver = start_driver(&setup, &image, EngineKind::Uring, StartMode::Adopt);
    for (h, what) in [(first, "taken"), (second, "waiting")] {
        let start = Instant::now();
        while !h.is_finished() {
            assert!(
                start.elapsed() < DEADLINE,
                "the {what} write did not complete"
            );
            thread::yield_now();
        }
        h.join().unwrap().unwrap();
    }
    let stats = client.recovery_stats();
    assert_eq!((stats.epoch, stats.resubmitted, stats.abandoned), (8, 1, 1));
    assert_eq!(
        ring.driver_epoch(),
        DriverEpoch {
            epoch: 8,
            sq_head: 1
        }
    );
    // Entries 0 and 1 as first submitted, then the first again.
    assert_eq!(ring.sq_tail().load(Ordering::Acquire), 3);
    assert!(ring.heartbeat().load(Ordering::Relaxed) > 1000);
    let st = driver.ctl.status().unwrap();
    assert_eq!(st.phase, ServingPhase::Serving);
    assert_eq!(st.counter("epoch"), Some(8));
    assert_eq!(Some(st.pid as u64), Some(driver.child.id() as u64));
    assert_eq!(
        (st.counter("writes"), st.counter("in_flight")),
        (Some(2), Some(0))
    );
    let mut b = vec![0u8; 2 * BLOCK_SIZE];
    client.read(Lba(5), &mut b).unwrap();
    check_block(5, 1, &b[..BLOCK_SIZE]).unwrap();
    check_block(6, 2, &b[BLOCK_SIZE..]).unwrap();
    driver.stop();
}

/// `--adopt` takes a ring over by itself only from a driver that died with work: not from
/// one that is alive (a live update) or that stopped cleanly; those wait for a state.
#[test]
fn an_adopting_driver_takes_over_only_from_a_dead_one() {
    let _dog = watchdog("an_adopting_driver_takes_over_only", DEADLINE * 2);
    let img = ScratchImage::create(64).unwrap();
    let image = img.open().unwrap();
    let dead = dead_pid();
    let cases = [
        (
            DriverPhase::Serving,
            std::process::id(),
            0,
            ServingPhase::Adopting,
        ),
        (DriverPhase::Quiesced, dead, 0, ServingPhase::Adopting),
        (DriverPhase::NotStarted, dead, 0, ServingPhase::Adopting),
        (DriverPhase::Rejected, dead, 0, ServingPhase::Adopting),
        (DriverPhase::Quiesced, dead, 2, ServingPhase::Serving),
        (DriverPhase::Serving, dead, 0, ServingPhase::Serving),
    ];
    for (phase, pid, in_flight, want) in cases {
        let setup = RingSetup::new(GEOMETRY).unwrap();
        let ring = &setup.ring;
        ring.publish_device(64, pid);
        ring.publish_counters(&Counters {
            writes: 9,
            in_flight,
            ..Counters::default()
        });
        ring.publish_epoch(DriverEpoch {
            epoch: 3,
            sq_head: 0,
        });
        ring.set_driver_phase(phase);
        let mut d = start_driver(&setup, &image, EngineKind::Uring, StartMode::Adopt);
        let st = d.ctl.status().unwrap();
        let case = format!("{phase:?} pid {pid} in_flight {in_flight}");
        assert_eq!(st.phase, want, "{case}");
        if want == ServingPhase::Serving {
            assert_eq!(ring.driver_epoch().epoch, 4, "{case}");
            // Attached before it answers; the loop publishes the phase as it starts.
            wait_until("the phase to say serving", || {
                ring.driver_phase() == Some(DriverPhase::Serving)
            });
            // Counters carried over, nothing in flight.
            assert_eq!(
                (st.counter("writes"), st.counter("in_flight")),
                (Some(9), Some(0))
            );
            d.stop();
        } else {
            assert_eq!(ring.driver_epoch().epoch, 3, "{case}: the ring was touched");
            assert_eq!(ring.driver_phase(), Some(phase), "{case}");
            d.ctl.abort().unwrap();
            assert!(d.wait_exit().success(), "{case}");
        }
    }
}

/// A kill with no successor: every waiting call fails (no hang), after the restart window
/// (pidfd) or the heartbeat timeout; later calls fail at once.
#[test]
fn a_kill_without_successor_fails_waiters_in_time() {
    let _dog = watchdog("a_kill_without_successor", DEADLINE * 2);
    let img = ScratchImage::create(64).unwrap();
    let image = img.open().unwrap();
    for watch_pid in [true, false] {
        let setup = RingSetup::new(GEOMETRY).unwrap();
        let mut driver = start_driver(&setup, &image, EngineKind::Uring, StartMode::Fresh);
        let cfg = ClientConfig {
            restart_timeout: Duration::from_millis(300),
            driver_timeout: Duration::from_millis(600),
            ..ClientConfig::default()
        };
        let limit = if watch_pid {
            cfg.restart_timeout
        } else {
            cfg.driver_timeout
        };
        let client = connect(&setup, watch_pid.then(|| pidfd(driver.child.id())), cfg);
        client.write(Lba(1), &block(1, 1)).unwrap();
        // Stopped, so that the next requests certainly wait.
        // The pid is our child's, not yet reaped.
        let stopped = molt_sys::kill(driver.child.id() as i32, libc::SIGSTOP).map_or(-1, |()| 0);
        assert_eq!(stopped, 0);
        let (tx, rx) = mpsc::channel();
        for i in 0..4u64 {
            let (c, tx) = (client.clone(), tx.clone());
            thread::spawn(move || {
                let mut b = vec![0u8; BLOCK_SIZE];
                let _ = tx.send(c.read(Lba(i), &mut b));
            });
        }
        wait_until("the reads to wait in the ring", || {
            setup.ring.sq_tail().load(Ordering::Acquire)
                == setup.ring.sq_head().load(Ordering::Acquire) + 4
        });
        let killed_at = Instant::now();
        driver.crash();
        for _ in 0..4 {
            let r = rx.recv_timeout(DEADLINE).expect("a waiter hangs");
            assert!(matches!(r, Err(BlockError::DriverGone(_))), "{r:?}");
        }
        let took = killed_at.elapsed();
        if watch_pid {
            assert!(
                took >= limit,
                "failed after {took:?}, before the restart window"
            );
        }
        assert!(took < limit + Duration::from_secs(3), "took {took:?}");
        assert!(matches!(client.flush(), Err(BlockError::DriverGone(_))));
        eprintln!("no successor, watch_pid {watch_pid}: waiters failed {took:?} after the kill");
    }
}
