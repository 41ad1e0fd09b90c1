//! Integration tests of the block layer: driver process, ring protocol, client.

#![forbid(unsafe_code)]

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use blockdev::engine::{Engine, EngineKind, FaultPlan};
use blockdev::image::ScratchImage;
use blockdev::persist::{DriverState, StopReason};
use blockdev::ring::codec::{self, NO_SLOT};
use blockdev::ring::{ring_doorbell, DriverPhase, ProtocolVersion, RingGeometry, Status};
use blockdev::server::{Server, ServerConfig, StopHandle};
use blockdev::spawn::{driver_command, DriverFds, RingSetup};
use blockdev::{spawn_driver, BlockError, Client, ClientConfig, DriverConfig, Lba, BLOCK_SIZE};

const DEADLINE: Duration = Duration::from_secs(20);

fn config(engine: EngineKind) -> DriverConfig {
    DriverConfig {
        engine,
        binary: Some(env!("CARGO_BIN_EXE_blockdev").into()),
        ..DriverConfig::default()
    }
}

fn pattern(seed: u64, nblocks: usize) -> Vec<u8> {
    (0..nblocks * BLOCK_SIZE)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 / 3)) as u8 ^ (i as u8))
        .collect()
}

/// A driver served by a thread of this process, so tests can inspect its returned state.
struct InProcess {
    setup: RingSetup,
    client: Arc<Client>,
    stop: StopHandle,
    /// Sends `true` to resume after a stop, `false` to end the thread.
    resume: std::sync::mpsc::Sender<bool>,
    states: std::sync::mpsc::Receiver<DriverState>,
}

fn in_process(image: &ScratchImage, geometry: RingGeometry, plan: Option<FaultPlan>) -> InProcess {
    let setup = RingSetup::new(geometry).unwrap();
    let (ring_fd, sq, cq) = setup.try_clone_fds().unwrap();
    let server_ring = blockdev::ring::RingRegion::open(ring_fd).unwrap();
    let mut engine = Engine::new(
        EngineKind::Uring,
        image.open().unwrap(),
        geometry.queue_depth,
    )
    .unwrap();
    if let Some(plan) = plan {
        engine = engine.with_faults(plan);
    }
    let mut server = Server::new(server_ring, engine, sq, cq, ServerConfig::default()).unwrap();
    let stop = server.stop_handle();
    let (resume_tx, resume_rx) = std::sync::mpsc::channel::<bool>();
    let (state_tx, state_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut state = server.run().unwrap();
        loop {
            let _ = state_tx.send(state);
            if resume_rx.recv() != Ok(true) {
                return;
            }
            state = server.resume().unwrap();
        }
    });
    let (ring_fd, sq, cq) = setup.try_clone_fds().unwrap();
    let client_ring = blockdev::ring::RingRegion::open(ring_fd).unwrap();
    let client = Client::connect(client_ring, sq, cq, None, ClientConfig::default()).unwrap();
    InProcess {
        setup,
        client: Arc::new(client),
        stop,
        resume: resume_tx,
        states: state_rx,
    }
}

impl InProcess {
    fn stop(&self) -> DriverState {
        self.stop.stop();
        self.states
            .recv_timeout(DEADLINE)
            .expect("server stops within the deadline")
    }
}

/// A raw entry in the protocol version this build speaks, with a valid crc.
fn raw_entry(op: u8, tag: u64, lba: u32, nblocks: u32, slot: u32) -> [u8; codec::SQE_SIZE] {
    codec::raw_entry(ProtocolVersion::CURRENT, op, tag, lba as u64, nblocks, slot)
}

/// Polls `cond` until it holds; fails the test after `DEADLINE`.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        thread::yield_now();
    }
}

#[test]
fn read_write_flush_discard_through_driver_process() {
    for engine in [EngineKind::Uring, EngineKind::Sync] {
        let img = ScratchImage::create(1024).unwrap();
        let (client, mut child) = spawn_driver(img.path(), config(engine)).unwrap();
        assert_eq!(client.num_blocks(), 1024);
        assert_eq!(client.block_size(), BLOCK_SIZE);
        let data = pattern(7, 300); // spans more than one 1 MiB slot
        client.write(Lba(10), &data).unwrap();
        client.flush().unwrap();
        let mut back = vec![0u8; data.len()];
        client.read(Lba(10), &mut back).unwrap();
        assert!(back == data, "{engine:?}: read back differs");
        client.discard(Lba(20), 5).unwrap();
        let mut z = vec![1u8; 5 * BLOCK_SIZE];
        client.read(Lba(20), &mut z).unwrap();
        assert!(
            z.iter().all(|&b| b == 0),
            "{engine:?}: discarded blocks are not zero"
        );
        assert!(matches!(
            client.read(Lba(1020), &mut vec![0; 5 * BLOCK_SIZE]),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            client.write(Lba(0), &[0u8; 100]),
            Err(BlockError::Misaligned(100))
        ));
        drop(client);
        child.kill().unwrap();
        child.wait().unwrap();
        // What the driver wrote is in the image file.
        let file = img.contents().unwrap();
        assert!(file[10 * BLOCK_SIZE..20 * BLOCK_SIZE] == data[..10 * BLOCK_SIZE]);
        assert!(file[20 * BLOCK_SIZE..25 * BLOCK_SIZE]
            .iter()
            .all(|&b| b == 0));
        assert!(file[25 * BLOCK_SIZE..310 * BLOCK_SIZE] == data[15 * BLOCK_SIZE..]);
    }
}

#[test]
fn counters_are_consistent_after_a_workload() {
    let img = ScratchImage::create(2048).unwrap();
    let geometry = RingGeometry {
        queue_depth: 8,
        slot_size: 64 * 1024,
    };
    let (client, mut child) = spawn_driver(
        img.path(),
        DriverConfig {
            geometry,
            ..config(EngineKind::Uring)
        },
    )
    .unwrap();
    // 16 blocks per slot: a 40-block write is 3 ring requests (16 + 16 + 8).
    let big = pattern(1, 40);
    client.write(Lba(100), &big).unwrap();
    for i in 0..10u64 {
        client.write(Lba(i), &pattern(i, 1)).unwrap();
    }
    let mut buf = vec![0u8; 40 * BLOCK_SIZE];
    client.read(Lba(100), &mut buf).unwrap();
    assert!(buf == big);
    let mut b = client.batch();
    let mut bufs: Vec<Vec<u8>> = (0..10).map(|_| vec![0u8; BLOCK_SIZE]).collect();
    for (i, buf) in bufs.iter_mut().enumerate() {
        b.read(Lba(i as u64), buf);
    }
    b.flush();
    b.discard(Lba(500), 100);
    b.run_all().unwrap();
    for (i, buf) in bufs.iter().enumerate() {
        assert!(*buf == pattern(i as u64, 1));
    }
    client.flush().unwrap();
    let c = client.counters();
    assert_eq!(c.writes, 3 + 10);
    assert_eq!(c.bytes_written, (40 + 10) * BLOCK_SIZE as u64);
    assert_eq!(c.reads, 3 + 10);
    assert_eq!(c.bytes_read, (40 + 10) * BLOCK_SIZE as u64);
    assert_eq!(c.flushes, 2);
    assert_eq!(c.discards, 1);
    assert_eq!(c.errors, 0);
    assert_eq!(c.in_flight, 0);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn many_threads_share_one_client() {
    let img = ScratchImage::create(4096).unwrap();
    let geometry = RingGeometry {
        queue_depth: 16,
        slot_size: 64 * 1024,
    };
    let (client, mut child) = spawn_driver(
        img.path(),
        DriverConfig {
            geometry,
            ..config(EngineKind::Uring)
        },
    )
    .unwrap();
    let client = Arc::new(client);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let client = client.clone();
            thread::spawn(move || {
                let base = t * 1000;
                for round in 0..30u64 {
                    let n = 1 + (round as usize * 7 + t as usize) % 40;
                    let lba = Lba(base + (round * 13) % 900);
                    let data = pattern(t * 1000 + round, n);
                    client.write(lba, &data).unwrap();
                    let mut back = vec![0u8; data.len()];
                    client.read(lba, &mut back).unwrap();
                    assert!(back == data, "thread {t} round {round}: read back differs");
                    if round % 10 == 0 {
                        client.flush().unwrap();
                    }
                }
                // Final layout of this thread's region, written as one batch.
                let blocks: Vec<Vec<u8>> = (0..64).map(|i| pattern(t * 7777 + i, 1)).collect();
                let mut b = client.batch();
                for (i, d) in blocks.iter().enumerate() {
                    b.write(Lba(base + i as u64), d);
                }
                b.run_all().unwrap();
                blocks
            })
        })
        .collect();
    let expected: Vec<Vec<Vec<u8>>> = threads.into_iter().map(|h| h.join().unwrap()).collect();
    for (t, blocks) in expected.iter().enumerate() {
        let mut back = vec![0u8; 64 * BLOCK_SIZE];
        client.read(Lba(t as u64 * 1000), &mut back).unwrap();
        assert!(back == blocks.concat(), "thread {t}: final contents differ");
    }
    assert_eq!(client.counters().errors, 0);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Writes raw entries into the submission queue, rings the doorbell, and returns the next
/// `n` completions.
fn raw_submit(setup: &RingSetup, entries: &[[u8; codec::SQE_SIZE]]) -> Vec<codec::Completion> {
    let ring = &setup.ring;
    let tail = ring.sq_tail().load(Ordering::Acquire);
    let head = ring.cq_head().load(Ordering::Acquire);
    for (i, e) in entries.iter().enumerate() {
        ring.write_sqe(tail.wrapping_add(i as u32), e);
    }
    ring.sq_tail()
        .store(tail.wrapping_add(entries.len() as u32), Ordering::Release);
    ring_doorbell(setup.sq_eventfd.as_fd()).unwrap();
    wait_until("completions", || {
        ring.cq_tail().load(Ordering::Acquire).wrapping_sub(head) >= entries.len() as u32
    });
    let out = (0..entries.len() as u32)
        .map(|i| codec::decode_completion(&ring.read_cqe(head.wrapping_add(i))))
        .collect();
    ring.cq_head()
        .store(head.wrapping_add(entries.len() as u32), Ordering::Release);
    out
}

#[test]
fn malformed_entries_get_error_completions_and_touch_nothing() {
    // 64 blocks plus a partial tail block the device must never expose.
    let img = ScratchImage::create(64).unwrap();
    let mut original = pattern(99, 64);
    original.extend_from_slice(&[0xA5; 1000]);
    std::fs::write(img.path(), &original).unwrap();
    let geometry = RingGeometry {
        queue_depth: 8,
        slot_size: 16 * 1024,
    };
    let p = in_process(&img, geometry, None);
    assert_eq!(p.client.num_blocks(), 64);
    let ring = &p.setup.ring;
    const WRITE: u8 = 2;
    let mut corrupt = raw_entry(WRITE, 1, 0, 1, 0);
    corrupt[16] ^= 0x40; // flip a bit of the block address after the crc was computed
    let cases: Vec<([u8; codec::SQE_SIZE], Status)> = vec![
        (corrupt, Status::Corrupt),
        (raw_entry(9, 2, 0, 1, 0), Status::Unsupported),
        (raw_entry(WRITE, 3, 64, 1, 0), Status::OutOfRange),
        (raw_entry(WRITE, 4, 63, 2, 0), Status::OutOfRange),
        (raw_entry(WRITE, 5, u32::MAX, 2, 0), Status::OutOfRange),
        (raw_entry(WRITE, 6, 0, 1, 8), Status::BadSlot),
        (raw_entry(WRITE, 7, 0, 1, NO_SLOT), Status::BadSlot),
        (raw_entry(WRITE, 8, 0, 5, 0), Status::Invalid), // 5 blocks > 16 KiB slot
        (raw_entry(WRITE, 9, 0, 0, 0), Status::Invalid),
        (raw_entry(3, 10, 1, 0, NO_SLOT), Status::Invalid), // flush with an address
        (raw_entry(4, 11, 60, 10, NO_SLOT), Status::OutOfRange),
        (raw_entry(4, 12, 0, 1, 0), Status::Invalid), // discard with a slot
    ];
    // Fill the slot the bad writes name, so a write that slipped through would show.
    ring.copy_to_slot(0, 0, &[0xEE; 16 * 1024]);
    for chunk in cases.chunks(8) {
        let entries: Vec<_> = chunk.iter().map(|c| c.0).collect();
        let got = raw_submit(&p.setup, &entries);
        for ((entry, want), c) in chunk.iter().zip(got) {
            let tag = u64::from_le_bytes(entry[8..16].try_into().unwrap());
            assert_eq!(c.tag, tag);
            assert_eq!(Status::from_code(c.result), Some(*want), "tag {tag}");
        }
    }
    // The driver still serves well-formed requests (raw too: the queues are now past
    // where the `Client` of this ring believes they are, so it is not used here).
    let got = raw_submit(&p.setup, &[raw_entry(1, 100, 63, 1, 1)]);
    assert_eq!((got[0].tag, got[0].result), (100, 0));
    let mut b = vec![0u8; BLOCK_SIZE];
    ring.copy_from_slot(1, 0, &mut b);
    assert!(b[..] == original[63 * BLOCK_SIZE..64 * BLOCK_SIZE]);
    let state = p.stop();
    assert_eq!(state.counters.errors, cases.len() as u64);
    assert_eq!((state.counters.writes, state.counters.reads), (0, 1));
    assert_eq!(state.reason, StopReason::Requested);
    assert!(img.contents().unwrap() == original, "the image changed");
}

#[test]
fn a_runaway_submission_tail_rejects_the_client() {
    let img = ScratchImage::create(16).unwrap();
    let geometry = RingGeometry {
        queue_depth: 4,
        slot_size: 4096,
    };
    let p = in_process(&img, geometry, None);
    let ring = &p.setup.ring;
    let head = ring.sq_head().load(Ordering::Acquire);
    ring.sq_tail()
        .store(head.wrapping_add(1000), Ordering::Release);
    ring_doorbell(p.setup.sq_eventfd.as_fd()).unwrap();
    let state = p
        .states
        .recv_timeout(DEADLINE)
        .expect("driver stops serving the client");
    assert!(
        matches!(state.reason, StopReason::ProtocolViolation(_)),
        "{:?}",
        state.reason
    );
    assert_eq!(ring.driver_phase(), Some(DriverPhase::Rejected));
    assert!(matches!(
        p.client.read(Lba(0), &mut [0u8; 4096]),
        Err(BlockError::Protocol(_))
    ));
}

#[test]
fn write_errors_latch_until_reopen() {
    let img = ScratchImage::create(64).unwrap();
    let plan = FaultPlan {
        fail_nth_write: Some(3),
        ..FaultPlan::default()
    };
    let p = in_process(
        &img,
        RingGeometry {
            queue_depth: 4,
            slot_size: 8192,
        },
        Some(plan),
    );
    let c = &p.client;
    c.write(Lba(1), &pattern(1, 1)).unwrap();
    c.write(Lba(2), &pattern(2, 1)).unwrap();
    assert!(matches!(
        c.write(Lba(3), &pattern(3, 1)),
        Err(BlockError::Io(Status::Io))
    ));
    assert_eq!(c.latched_error(), Some(Status::Io));
    // Never retried: every later write, flush and discard fails with the latched code.
    assert!(matches!(
        c.write(Lba(4), &pattern(4, 1)),
        Err(BlockError::Io(Status::Latched))
    ));
    assert!(matches!(c.flush(), Err(BlockError::Io(Status::Latched))));
    assert!(matches!(
        c.discard(Lba(1), 1),
        Err(BlockError::Io(Status::Latched))
    ));
    // Reads still work and see the writes that succeeded.
    let mut b = vec![0u8; BLOCK_SIZE];
    c.read(Lba(2), &mut b).unwrap();
    assert!(b == pattern(2, 1));
    let state = p.stop();
    assert_eq!(state.latched, Some(Status::Io));
    assert_eq!(state.counters.errors, 4);
    assert_eq!(state.counters.writes, 2);
    // Reopening the image (a new driver) clears the latch.
    let fresh = in_process(
        &img,
        RingGeometry {
            queue_depth: 4,
            slot_size: 8192,
        },
        None,
    );
    fresh.client.write(Lba(4), &pattern(4, 1)).unwrap();
    fresh.client.flush().unwrap();
}

#[test]
fn flush_failure_latches_too() {
    let img = ScratchImage::create(16).unwrap();
    let plan = FaultPlan {
        fail_nth_flush: Some(1),
        errno: libc::EIO,
        ..FaultPlan::default()
    };
    let p = in_process(
        &img,
        RingGeometry {
            queue_depth: 4,
            slot_size: 4096,
        },
        Some(plan),
    );
    p.client.write(Lba(1), &pattern(1, 1)).unwrap();
    assert!(matches!(p.client.flush(), Err(BlockError::Io(Status::Io))));
    assert!(matches!(
        p.client.flush(),
        Err(BlockError::Io(Status::Latched))
    ));
    assert!(matches!(
        p.client.write(Lba(1), &pattern(1, 1)),
        Err(BlockError::Io(Status::Latched))
    ));
}

#[test]
fn stop_between_requests_then_resume() {
    let img = ScratchImage::create(64).unwrap();
    let p = in_process(
        &img,
        RingGeometry {
            queue_depth: 4,
            slot_size: 4096,
        },
        None,
    );
    p.client.write(Lba(1), &pattern(1, 1)).unwrap();
    let state = p.stop();
    assert_eq!(state.reason, StopReason::Requested);
    assert_eq!(state.counters.writes, 1);
    assert_eq!(state.counters.in_flight, 0);
    assert_eq!(p.setup.ring.driver_phase(), Some(DriverPhase::Quiesced));
    // A request submitted while stopped waits in the ring...
    let client = p.client.clone();
    let writer = thread::spawn(move || client.write(Lba(2), &pattern(2, 1)));
    let ring = &p.setup.ring;
    wait_until("the entry to wait in the ring", || {
        ring.sq_tail().load(Ordering::Acquire) != ring.sq_head().load(Ordering::Acquire)
    });
    assert_eq!(ring.sq_head().load(Ordering::Acquire), state.sq_head);
    // ...and is served after resume.
    p.resume.send(true).unwrap();
    writer.join().unwrap().unwrap();
    let state = p.stop();
    assert_eq!(state.counters.writes, 2);
    let mut b = vec![0u8; BLOCK_SIZE];
    p.resume.send(true).unwrap();
    p.client.read(Lba(2), &mut b).unwrap();
    assert!(b == pattern(2, 1));
}

#[test]
fn driver_death_fails_waiting_calls() {
    let img = ScratchImage::create(64).unwrap();
    let (client, mut child) = spawn_driver(img.path(), config(EngineKind::Uring)).unwrap();
    client.write(Lba(0), &pattern(0, 1)).unwrap();
    // Freeze the driver so the next request certainly waits, then kill it.
    assert_eq!(send_signal(child.id(), libc::SIGSTOP), 0);
    let client = Arc::new(client);
    let c2 = client.clone();
    let reader = thread::spawn(move || {
        let start = Instant::now();
        let r = c2.read(Lba(0), &mut vec![0u8; BLOCK_SIZE]);
        (r, start.elapsed())
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let (r, took) = reader.join().unwrap();
    assert!(matches!(r, Err(BlockError::DriverGone(_))), "{r:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // Later calls fail at once.
    assert!(matches!(client.flush(), Err(BlockError::DriverGone(_))));
}

fn send_signal(pid: u32, sig: i32) -> i32 {
    molt_sys::kill(pid as i32, sig).map_or(-1, |()| 0)
}

#[test]
fn stalled_driver_without_pidfd_times_out() {
    let img = ScratchImage::create(64).unwrap();
    let setup = RingSetup::new(RingGeometry {
        queue_depth: 4,
        slot_size: 4096,
    })
    .unwrap();
    let image = img.open().unwrap();
    let fds = DriverFds {
        ring: setup.ring.fd(),
        sq_eventfd: setup.sq_eventfd.as_fd(),
        cq_eventfd: setup.cq_eventfd.as_fd(),
        image: image.file().as_fd(),
    };
    let (mut cmd, guard) = driver_command(fds, &config(EngineKind::Uring), None).unwrap();
    let mut child = cmd.spawn().unwrap();
    drop(guard);
    let (ring_fd, sq, cq) = setup.try_clone_fds().unwrap();
    let cfg = ClientConfig {
        driver_timeout: Duration::from_millis(500),
        ..ClientConfig::default()
    };
    let client = Client::connect(
        blockdev::ring::RingRegion::open(ring_fd).unwrap(),
        sq,
        cq,
        None,
        cfg,
    )
    .unwrap();
    client.write(Lba(0), &pattern(0, 1)).unwrap();
    assert_eq!(send_signal(child.id(), libc::SIGSTOP), 0);
    let start = Instant::now();
    let r = client.read(Lba(0), &mut vec![0u8; BLOCK_SIZE]);
    assert!(matches!(r, Err(BlockError::DriverGone(_))), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn driver_stops_cleanly_when_its_client_vanishes() {
    let img = ScratchImage::create(64).unwrap();
    let setup = RingSetup::new(RingGeometry {
        queue_depth: 4,
        slot_size: 4096,
    })
    .unwrap();
    let image = img.open().unwrap();
    // The client is a process of its own that exits when its stdin (the gate) closes; its
    // last request is already in the ring by then.
    let mut vanishing = std::process::Command::new("cat")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let gate = vanishing.stdin.take().unwrap();
    let pid = vanishing.id();
    setup.ring.copy_to_slot(0, 0, &pattern(5, 1));
    let entry = raw_entry(2, 1, 5, 1, 0);
    let fds = DriverFds {
        ring: setup.ring.fd(),
        sq_eventfd: setup.sq_eventfd.as_fd(),
        cq_eventfd: setup.cq_eventfd.as_fd(),
        image: image.file().as_fd(),
    };
    let (mut cmd, guard) = driver_command(fds, &config(EngineKind::Uring), Some(pid)).unwrap();
    let mut driver = cmd.spawn().unwrap();
    drop(guard);
    wait_until("the driver to serve", || {
        setup.ring.driver_phase() == Some(DriverPhase::Serving)
    });
    setup.ring.write_sqe(0, &entry);
    setup.ring.sq_tail().store(1, Ordering::Release);
    molt_sys::eventfd_signal(setup.sq_eventfd.as_fd()).unwrap();
    drop(gate);
    assert!(vanishing.wait().unwrap().success());
    let start = Instant::now();
    let exit = loop {
        if let Some(s) = driver.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "driver did not stop after its client exited"
        );
        thread::yield_now();
    };
    assert!(exit.success(), "driver exit: {exit:?}");
    // Nothing outside the one block the client may have written changed.
    let file = img.contents().unwrap();
    assert!(file[..5 * BLOCK_SIZE]
        .iter()
        .chain(&file[6 * BLOCK_SIZE..])
        .all(|&b| b == 0));
}

mod driver_control;
mod handover;
mod recovery;
mod relink;
