//! Live update of the driver: handovers under load, refused imports, missed deadlines,
//! and protocol version checks.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use blockdev::engine::{Engine, EngineKind, FaultPlan};
use blockdev::handover::driver::{serve_controlled, DriverExit};
use blockdev::handover::StateBlob;
use molt_control::ServingPhase;

use crate::driver_control::{DriverControl, HandoverError};
use blockdev::image::{Image, ScratchImage};
use blockdev::persist::{DriverState, STATE_MAGIC};
use blockdev::ring::{
    DriverPhase, ProtocolVersion, RingError, RingGeometry, RingRegion, StatusTable,
};
use blockdev::server::{Server, ServerConfig};
use blockdev::spawn::{driver_command_with_control, DriverFds, RingSetup, StartMode};
use blockdev::{BlockError, Client, ClientConfig, Lba, BLOCK_SIZE};

use super::{config, pattern, wait_until, DEADLINE};

pub(crate) const GEOMETRY: RingGeometry = RingGeometry {
    queue_depth: 8,
    slot_size: 4 * BLOCK_SIZE as u32,
};

struct Driver {
    child: Child,
    ctl: DriverControl,
}

fn start_driver(setup: &RingSetup, image: &Image, engine: EngineKind, mode: StartMode) -> Driver {
    start_binary(
        setup,
        image,
        engine,
        mode,
        env!("CARGO_BIN_EXE_blockdev").into(),
    )
}

fn start_binary(
    setup: &RingSetup,
    image: &Image,
    engine: EngineKind,
    mode: StartMode,
    binary: std::path::PathBuf,
) -> Driver {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let fds = DriverFds {
        ring: setup.ring.fd(),
        sq_eventfd: setup.sq_eventfd.as_fd(),
        cq_eventfd: setup.cq_eventfd.as_fd(),
        image: image.file().as_fd(),
    };
    let cfg = blockdev::DriverConfig {
        binary: Some(binary),
        ..config(engine)
    };
    let (mut cmd, guard) =
        driver_command_with_control(fds, &cfg, Some(std::process::id()), theirs.as_fd(), mode)
            .unwrap();
    let child = cmd.spawn().unwrap();
    drop(guard);
    drop(theirs);
    Driver {
        child,
        ctl: DriverControl::new(ours).unwrap(),
    }
}

pub(crate) fn wait_exit(child: &mut Child) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(start.elapsed() < DEADLINE, "driver did not exit");
        thread::yield_now();
    }
}

pub(crate) fn connect(setup: &RingSetup, pidfd: Option<std::os::fd::OwnedFd>) -> Arc<Client> {
    let (ring_fd, sq, cq) = setup.try_clone_fds().unwrap();
    let ring = RingRegion::open(ring_fd).unwrap();
    Arc::new(Client::connect(ring, sq, cq, pidfd, ClientConfig::default()).unwrap())
}

/// Request counts the load generator saw succeed; one ring request each.
#[derive(Debug, Default, Clone, Copy)]
struct Done {
    reads: u64,
    writes: u64,
    flushes: u64,
}

/// Threads doing verified random writes and reads, each in its own block range.
struct Load {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Result<Done, String>>>,
}

fn start_load(client: Arc<Client>, threads: u64, blocks_each: u64) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let threads = (0..threads)
        .map(|t| {
            let (client, stop, ops) = (client.clone(), stop.clone(), ops.clone());
            thread::spawn(move || {
                let base = t * blocks_each;
                let mut model = vec![vec![0u8; BLOCK_SIZE]; blocks_each as usize];
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (t + 1);
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let mut done = Done::default();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let at = next() % blocks_each;
                    let n = (1 + next() % 4).min(blocks_each - at) as usize;
                    let lba = Lba(base + at);
                    if next() & 1 == 0 {
                        let data = pattern(next(), n);
                        client
                            .write(lba, &data)
                            .map_err(|e| format!("write {lba}: {e}"))?;
                        for (k, chunk) in data.chunks(BLOCK_SIZE).enumerate() {
                            model[at as usize + k].copy_from_slice(chunk);
                        }
                        done.writes += 1;
                    } else {
                        let mut buf = vec![0u8; n * BLOCK_SIZE];
                        client
                            .read(lba, &mut buf)
                            .map_err(|e| format!("read {lba}: {e}"))?;
                        for (k, chunk) in buf.chunks(BLOCK_SIZE).enumerate() {
                            if chunk != &model[at as usize + k][..] {
                                return Err(format!("block {} read back wrong", lba.0 + k as u64));
                            }
                        }
                        done.reads += 1;
                    }
                    if i & 63 == 0 {
                        client.flush().map_err(|e| format!("flush: {e}"))?;
                        done.flushes += 1;
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                Ok(done)
            })
        })
        .collect();
    Load { stop, ops, threads }
}

impl Load {
    /// Waits until the load made `n` more operations (it runs between handovers).
    fn progress(&self, n: u64) {
        let from = self.ops.load(Ordering::Relaxed);
        wait_until("the load to make progress", || {
            self.ops.load(Ordering::Relaxed) >= from + n
                || self.threads.iter().any(|t| t.is_finished())
        });
    }

    fn finish(self) -> Done {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Done::default();
        for t in self.threads {
            let d = t
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("client saw: {e}"));
            total.reads += d.reads;
            total.writes += d.writes;
            total.flushes += d.flushes;
        }
        total
    }
}

/// Notification → preparation → state checking → transfer → replacement.
fn hand_over(
    setup: &RingSetup,
    image: &Image,
    old: &mut Driver,
    engine: EngineKind,
) -> (Driver, Duration, DriverState) {
    let mut new = start_driver(setup, image, engine, StartMode::Adopt);
    // The successor is up (engine built, buffers registered) before the pause begins.
    let st = new.ctl.status().unwrap();
    assert_eq!(st.phase, ServingPhase::Adopting);
    let start = Instant::now();
    let blob = old.ctl.prepare(Duration::from_secs(2)).unwrap();
    let state = blob.check().unwrap();
    new.ctl.send_state(&blob).unwrap();
    new.ctl.wait_imported().unwrap();
    new.ctl.commit().unwrap();
    let pause = start.elapsed();
    old.ctl.exit().unwrap();
    let status = wait_exit(&mut old.child);
    assert!(status.success(), "old driver: {status:?}");
    (new, pause, state)
}

fn end(mut d: Driver) {
    d.ctl.prepare(Duration::from_secs(2)).unwrap();
    d.ctl.exit().unwrap();
    assert!(wait_exit(&mut d.child).success());
}

#[test]
fn ten_handovers_under_load_lose_nothing() {
    let img = ScratchImage::create(256).unwrap();
    let image = img.open().unwrap();
    let setup = RingSetup::new(GEOMETRY).unwrap();
    let mut driver = start_driver(&setup, &image, EngineKind::Uring, StartMode::Fresh);
    // No pidfd: liveness by heartbeat, which a handover must not trip.
    let client = connect(&setup, None);
    let load = start_load(client.clone(), 2, 64);
    load.progress(200);
    let mut last = DriverState::import(
        &driver
            .ctl
            .prepare(Duration::from_secs(2))
            .unwrap()
            .into_bytes(),
    )
    .unwrap();
    driver.ctl.resume().unwrap();
    let mut pauses = Vec::new();
    let mut epoch = setup.ring.driver_epoch().epoch;
    for i in 0..10 {
        load.progress(200);
        let engine = if i & 1 == 0 {
            EngineKind::Sync
        } else {
            EngineKind::Uring
        };
        let (new, pause, state) = hand_over(&setup, &image, &mut driver, engine);
        driver = new;
        pauses.push(pause);
        // Each commit starts one new driver epoch, at the drained position.
        let e = setup.ring.driver_epoch();
        assert_eq!((e.epoch, e.sq_head), (epoch + 1, state.sq_head));
        epoch = e.epoch;
        // Counters carried over: never go back.
        let c = state.counters;
        assert!(c.reads >= last.counters.reads && c.writes >= last.counters.writes);
        assert!(c.reads + c.writes > last.counters.reads + last.counters.writes);
        assert_eq!(c.errors, 0);
        let st = driver.ctl.status().unwrap();
        assert_eq!(st.phase, ServingPhase::Serving);
        assert!(st.counter("writes").unwrap() >= c.writes);
        assert_eq!(
            Some(st.pid as u64),
            Some(driver.child.id() as u64),
            "the successor serves"
        );
        last = state;
    }
    load.progress(200);
    let done = load.finish();
    // Every request the client made was counted once, across eleven drivers.
    let c = client.counters();
    assert_eq!(
        (c.reads, c.writes, c.flushes, c.errors, c.in_flight),
        (done.reads, done.writes, done.flushes, 0, 0)
    );
    // A drained handover leaves nothing to resubmit.
    let r = client.recovery_stats();
    assert_eq!((r.resubmitted, r.abandoned), (0, 0), "{r:?}");
    pauses.sort();
    eprintln!(
        "handover pause: min {:?} median {:?} max {:?}",
        pauses[0], pauses[5], pauses[9]
    );
    assert!(pauses[9] < Duration::from_secs(1), "{pauses:?}");
    end(driver);
}

#[test]
fn client_with_a_pidfd_follows_the_successor() {
    let img = ScratchImage::create(128).unwrap();
    let image = img.open().unwrap();
    let setup = RingSetup::new(GEOMETRY).unwrap();
    let mut driver = start_driver(&setup, &image, EngineKind::Uring, StartMode::Fresh);
    let pidfd = blockdev_pidfd(driver.child.id());
    let client = connect(&setup, Some(pidfd));
    let load = start_load(client.clone(), 2, 64);
    for _ in 0..3 {
        load.progress(100);
        driver = hand_over(&setup, &image, &mut driver, EngineKind::Uring).0;
    }
    load.progress(100);
    let done = load.finish();
    assert_eq!(client.counters().writes, done.writes);
    end(driver);
}

fn blockdev_pidfd(pid: u32) -> std::os::fd::OwnedFd {
    molt_sys::pidfd_open(pid as libc::pid_t).unwrap_or_else(|e| panic!("pidfd_open({pid}): {e}"))
}

#[test]
fn refused_imports_leave_the_old_driver_serving() {
    let img = ScratchImage::create(128).unwrap();
    let image = img.open().unwrap();
    let setup = RingSetup::new(GEOMETRY).unwrap();
    let mut old = start_driver(&setup, &image, EngineKind::Uring, StartMode::Fresh);
    let client = connect(&setup, None);
    let load = start_load(client.clone(), 2, 64);
    let old_pid = old.child.id();

    // A corrupt blob: the successor refuses it and exits 1; the old driver resumes.
    load.progress(100);
    let mut new = start_driver(&setup, &image, EngineKind::Uring, StartMode::Adopt);
    let blob = old.ctl.prepare(Duration::from_secs(2)).unwrap();
    let mut bytes = blob.into_bytes();
    bytes[30] ^= 0x10;
    new.ctl.send_state(&StateBlob::from_bytes(bytes)).unwrap();
    let e = new.ctl.wait_imported().unwrap_err();
    assert!(
        matches!(e, HandoverError::Refused(ref m) if m.contains("corrupt")),
        "{e}"
    );
    assert_eq!(wait_exit(&mut new.child).code(), Some(1));
    old.ctl.resume().unwrap();

    // A schema the successor does not know: refused with its number.
    load.progress(100);
    let mut new = start_driver(&setup, &image, EngineKind::Uring, StartMode::Adopt);
    old.ctl.prepare(Duration::from_secs(2)).unwrap();
    let future = formats::frame::encode(STATE_MAGIC, 7, &[0; 104]);
    new.ctl.send_state(&StateBlob::from_bytes(future)).unwrap();
    let e = new.ctl.wait_imported().unwrap_err();
    assert!(matches!(e, HandoverError::UnsupportedSchema(7)), "{e}");
    assert_eq!(wait_exit(&mut new.child).code(), Some(1));
    old.ctl.resume().unwrap();

    load.progress(100);
    let done = load.finish();
    assert_eq!(setup.ring.driver_pid(), old_pid);
    let c = client.counters();
    assert_eq!((c.writes, c.reads, c.errors), (done.writes, done.reads, 0));
    end(old);
}

#[test]
fn a_successor_touches_nothing_before_commit() {
    let img = ScratchImage::create(64).unwrap();
    let image = img.open().unwrap();
    let setup = RingSetup::new(GEOMETRY).unwrap();
    let mut old = start_driver(&setup, &image, EngineKind::Uring, StartMode::Fresh);
    let client = connect(&setup, None);
    client.write(Lba(3), &pattern(3, 2)).unwrap();
    let blob = old.ctl.prepare(Duration::from_secs(2)).unwrap();
    let ring = &setup.ring;
    let snapshot = || {
        (
            ring.driver_phase(),
            ring.driver_pid(),
            ring.num_blocks(),
            ring.counters(),
            ring.latched(),
            ring.heartbeat().load(Ordering::Relaxed),
            ring.sq_head().load(Ordering::Relaxed),
            ring.cq_tail().load(Ordering::Relaxed),
        )
    };
    let before = snapshot();
    assert_eq!(before.0, Some(DriverPhase::Quiesced));
    // A request submitted now waits in the ring.
    let c2 = client.clone();
    let waiting = thread::spawn(move || c2.write(Lba(9), &pattern(9, 1)));
    wait_until("the entry to wait", || {
        ring.sq_tail().load(Ordering::Acquire) != ring.sq_head().load(Ordering::Acquire)
    });
    let mut new = start_driver(&setup, &image, EngineKind::Sync, StartMode::Adopt);
    new.ctl.send_state(&blob).unwrap();
    new.ctl.wait_imported().unwrap();
    let st = new.ctl.status().unwrap();
    assert_eq!(st.phase, ServingPhase::Imported);
    assert_eq!(st.counter("writes"), Some(1));
    assert_eq!(snapshot(), before);
    new.ctl.abort().unwrap();
    assert!(wait_exit(&mut new.child).success());
    assert_eq!(snapshot(), before);
    // The old driver serves the waiting request after resuming.
    old.ctl.resume().unwrap();
    waiting.join().unwrap().unwrap();
    let mut b = vec![0u8; BLOCK_SIZE];
    client.read(Lba(9), &mut b).unwrap();
    assert!(b == pattern(9, 1));
    end(old);
}

/// A deadline the drain cannot meet (a write held back by the engine): the driver says
/// so and serves on; nothing fails.
#[test]
fn a_missed_deadline_resumes_serving() {
    let img = ScratchImage::create(64).unwrap();
    let setup = RingSetup::new(GEOMETRY).unwrap();
    let (ring_fd, sq, cq) = setup.try_clone_fds().unwrap();
    let engine = Engine::new(EngineKind::Uring, img.open().unwrap(), GEOMETRY.queue_depth)
        .unwrap()
        .with_faults(FaultPlan {
            delay_nth_write: Some(2),
            delay: Duration::from_millis(1500),
            ..FaultPlan::default()
        });
    let server = Server::new(
        RingRegion::open(ring_fd).unwrap(),
        engine,
        sq,
        cq,
        ServerConfig::default(),
    )
    .unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let driver = thread::spawn(move || serve_controlled(server, theirs, None).unwrap());
    let mut ctl = DriverControl::new(ours).unwrap();
    let client = connect(&setup, None);
    client.write(Lba(0), &pattern(0, 1)).unwrap();
    let c2 = client.clone();
    let slow = thread::spawn(move || c2.write(Lba(1), &pattern(1, 1)));
    // Taken from the ring (the second entry): from now on it is in flight.
    wait_until("the slow write to be taken", || {
        setup.ring.sq_head().load(Ordering::Acquire) == 2
    });
    let e = ctl.prepare(Duration::from_millis(100)).unwrap_err();
    assert!(matches!(e, HandoverError::Deadline), "{e}");
    assert_eq!(ctl.status().unwrap().phase, ServingPhase::Serving);
    // Still serving: other requests complete while the slow one is held.
    client.write(Lba(2), &pattern(2, 1)).unwrap();
    slow.join().unwrap().unwrap();
    // With time enough it drains, holds, resumes, and finally hands over.
    let blob = ctl.prepare(Duration::from_secs(5)).unwrap();
    assert_eq!(blob.check().unwrap().counters.writes, 3);
    ctl.resume().unwrap();
    let mut b = vec![0u8; BLOCK_SIZE];
    client.read(Lba(1), &mut b).unwrap();
    assert!(b == pattern(1, 1));
    ctl.prepare(Duration::from_secs(5)).unwrap();
    ctl.exit().unwrap();
    assert!(matches!(driver.join().unwrap(), DriverExit::HandedOver));
}

fn other_version() -> ProtocolVersion {
    if ProtocolVersion::CURRENT == ProtocolVersion::V1 {
        ProtocolVersion::V2
    } else {
        ProtocolVersion::V1
    }
}

fn other_table() -> StatusTable {
    if StatusTable::CURRENT == StatusTable::V1 {
        StatusTable::V2
    } else {
        StatusTable::V1
    }
}

#[test]
fn peers_refuse_a_ring_of_another_version_or_status_table() {
    let img = ScratchImage::create(64).unwrap();
    let image = img.open().unwrap();
    for (v, t) in [
        (other_version(), StatusTable::CURRENT),
        (ProtocolVersion::CURRENT, other_table()),
    ] {
        let setup = RingSetup {
            ring: RingRegion::create_versioned(GEOMETRY, v, t).unwrap(),
            sq_eventfd: RingSetup::new(GEOMETRY).unwrap().sq_eventfd,
            cq_eventfd: RingSetup::new(GEOMETRY).unwrap().cq_eventfd,
        };
        let (ring_fd, sq, cq) = setup.try_clone_fds().unwrap();
        let e = Client::connect(
            RingRegion::open(ring_fd).unwrap(),
            sq,
            cq,
            None,
            ClientConfig::default(),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                BlockError::Setup(
                    RingError::ProtocolMismatch { .. } | RingError::StatusTableMismatch { .. }
                )
            ),
            "{e}"
        );
        let mut d = start_driver(&setup, &image, EngineKind::Uring, StartMode::Fresh);
        assert_eq!(wait_exit(&mut d.child).code(), Some(1));
        assert_eq!(setup.ring.driver_phase(), Some(DriverPhase::NotStarted));
    }
}

/// The supervisor's part of an interaction update: relabel the ring only while it is
/// quiet; a driver held for an update that is rolled back refuses a relabelled ring until
/// the label is restored.
#[test]
fn relabelling_needs_a_quiet_ring_and_is_checked_on_resume() {
    let img = ScratchImage::create(64).unwrap();
    let image = img.open().unwrap();
    let mut setup = RingSetup::new(GEOMETRY).unwrap();
    let mut d = start_driver(&setup, &image, EngineKind::Uring, StartMode::Fresh);
    let client = connect(&setup, None);
    client.write(Lba(0), &pattern(0, 1)).unwrap();
    assert!(matches!(
        setup.ring.set_protocol_version(other_version()),
        Err(RingError::NotQuiet(_))
    ));
    d.ctl.prepare(Duration::from_secs(2)).unwrap();
    setup.ring.set_protocol_version(other_version()).unwrap();
    assert!(matches!(d.ctl.resume(), Err(HandoverError::Refused(_))));
    setup
        .ring
        .set_protocol_version(ProtocolVersion::CURRENT)
        .unwrap();
    setup.ring.set_status_table(other_table()).unwrap();
    assert!(matches!(d.ctl.resume(), Err(HandoverError::Refused(_))));
    setup.ring.set_status_table(StatusTable::CURRENT).unwrap();
    d.ctl.resume().unwrap();
    client.write(Lba(1), &pattern(1, 1)).unwrap();
    end(d);
}

/// The "one component" update between two real builds. Set `MOLT_BLOCKDEV_OLD_BIN` to a
/// driver built with `--features legacy-counters-u32` (state schema 1) to run it:
/// old → this build succeeds (schema 1 widens); this build → old is refused (schema 2 is
/// newer than it reads) and this build serves on.
#[test]
fn update_from_the_u32_counter_build() {
    let Some(old_bin) = std::env::var_os("MOLT_BLOCKDEV_OLD_BIN") else {
        eprintln!("MOLT_BLOCKDEV_OLD_BIN not set: skipped");
        return;
    };
    let img = ScratchImage::create(128).unwrap();
    let image = img.open().unwrap();
    let setup = RingSetup::new(GEOMETRY).unwrap();
    let mut old = start_binary(
        &setup,
        &image,
        EngineKind::Uring,
        StartMode::Fresh,
        old_bin.clone().into(),
    );
    assert_eq!(old.ctl.status().unwrap().state_schema, 1);
    let client = connect(&setup, None);
    let load = start_load(client.clone(), 2, 64);
    load.progress(200);
    let mut new = start_driver(&setup, &image, EngineKind::Uring, StartMode::Adopt);
    let blob = old.ctl.prepare(Duration::from_secs(2)).unwrap();
    assert_eq!(blob.schema().map(|v| v.0), Some(1));
    let carried = blob.check().unwrap().counters;
    new.ctl.send_state(&blob).unwrap();
    new.ctl.wait_imported().unwrap();
    new.ctl.commit().unwrap();
    old.ctl.exit().unwrap();
    assert!(wait_exit(&mut old.child).success());
    let st = new.ctl.status().unwrap();
    assert_eq!(st.state_schema, 2);
    assert!(st.counter("writes").unwrap() >= carried.writes);
    load.progress(200);
    // Back to the old build: it refuses the newer schema; the new driver serves on.
    let mut back = start_binary(
        &setup,
        &image,
        EngineKind::Uring,
        StartMode::Adopt,
        old_bin.into(),
    );
    let blob = new.ctl.prepare(Duration::from_secs(2)).unwrap();
    back.ctl.send_state(&blob).unwrap();
    assert!(matches!(
        back.ctl.wait_imported(),
        Err(HandoverError::UnsupportedSchema(2))
    ));
    assert_eq!(wait_exit(&mut back.child).code(), Some(1));
    new.ctl.resume().unwrap();
    load.progress(200);
    let done = load.finish();
    let c = client.counters();
    assert_eq!((c.reads, c.writes, c.errors), (done.reads, done.writes, 0));
    end(new);
}
