//! The io_uring engine against the plain-syscall oracle (and a byte model of the image).

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::image::{DiscardMode, ScratchImage};

const NBLOCKS: u64 = 48;

#[derive(Debug, Clone)]
enum TOp {
    Read(u64, u64),
    Write(u64, u64, u8),
    Flush,
    Discard(u64, u64),
}

impl TOp {
    fn range(&self) -> Option<(u64, u64, bool)> {
        match *self {
            TOp::Read(l, n) => Some((l, n, false)),
            TOp::Write(l, n, _) => Some((l, n, true)),
            TOp::Discard(l, n) => Some((l, n, true)),
            TOp::Flush => None,
        }
    }

    fn conflicts(&self, other: &TOp) -> bool {
        match (self.range(), other.range()) {
            (Some((a, an, aw)), Some((b, bn, bw))) => (aw || bw) && a < b + bn && b < a + an,
            _ => false,
        }
    }
}

fn op_strategy() -> impl Strategy<Value = TOp> {
    // Mostly in range; lba up to NBLOCKS + 4 and counts up to 6 also reach past the end.
    let range = (0..NBLOCKS + 4, 1u64..=6);
    prop_oneof![
        4 => range.clone().prop_map(|(l, n)| TOp::Read(l, n)),
        4 => (range.clone(), any::<u8>()).prop_map(|((l, n), s)| TOp::Write(l, n, s)),
        1 => Just(TOp::Flush),
        2 => range.prop_map(|(l, n)| TOp::Discard(l, n)),
    ]
}

fn fill(seed: u8, lba: u64, n: u64) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(n as usize);
    for (i, x) in b.iter_mut().enumerate() {
        *x = seed.wrapping_add((i as u64 / 7 + lba) as u8) ^ (i as u8);
    }
    b
}

/// Groups ops into batches without conflicting ranges (in-flight requests are unordered).
fn batches(ops: &[TOp], max: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..ops.len() {
        if i - start == max || ops[start..i].iter().any(|o| o.conflicts(&ops[i])) {
            out.push(start..i);
            start = i;
        }
    }
    if start < ops.len() {
        out.push(start..ops.len());
    }
    out
}

type Outcome = Result<Option<Vec<u8>>, Errno>;

/// Runs `ops` on `engine` in conflict-free batches; returns each op's outcome.
fn run(engine: &mut Engine, ops: &[TOp]) -> Vec<Outcome> {
    let mut results: Vec<Option<Outcome>> = vec![None; ops.len()];
    for batch in batches(ops, 16) {
        for i in batch.clone() {
            let op = match ops[i] {
                TOp::Read(l, n) => IoOp::Read {
                    lba: Lba(l),
                    buf: IoBuf::Owned(AlignedBuf::zeroed(n as usize)),
                },
                TOp::Write(l, n, s) => IoOp::Write {
                    lba: Lba(l),
                    buf: IoBuf::Owned(fill(s, l, n)),
                },
                TOp::Flush => IoOp::Flush,
                TOp::Discard(l, n) => IoOp::Discard {
                    lba: Lba(l),
                    nblocks: n,
                },
            };
            engine
                .push(IoRequest {
                    user_data: i as u64,
                    op,
                })
                .expect("batch fits the engine");
        }
        engine.submit().unwrap();
        let mut got = HashMap::new();
        let mut out = Vec::new();
        while got.len() < batch.len() {
            engine.reap(&mut out);
            for c in out.drain(..) {
                let data = match ops[c.user_data as usize] {
                    TOp::Read(..) => c.buf.map(|b| b.to_vec()),
                    _ => None,
                };
                got.insert(c.user_data as usize, c.result.map(|()| data));
            }
            if got.len() < batch.len() {
                engine.wait(None, Duration::from_secs(5)).unwrap();
            }
        }
        for (i, r) in got {
            results[i] = Some(r);
        }
    }
    assert_eq!(engine.in_flight(), 0);
    results
        .into_iter()
        .map(|r| r.expect("every op completed"))
        .collect()
}

/// Applies `ops` to a byte model.
fn model(ops: &[TOp]) -> (Vec<Outcome>, Vec<u8>) {
    let bs = BLOCK_SIZE;
    let mut img = vec![0u8; NBLOCKS as usize * bs];
    let mut res = Vec::new();
    for op in ops {
        if let Some((l, n, _)) = op.range() {
            if l + n > NBLOCKS {
                res.push(Err(Errno(libc::ERANGE)));
                continue;
            }
        }
        res.push(Ok(match *op {
            TOp::Read(l, n) => Some(img[l as usize * bs..(l + n) as usize * bs].to_vec()),
            TOp::Write(l, n, s) => {
                img[l as usize * bs..(l + n) as usize * bs].copy_from_slice(&fill(s, l, n));
                None
            }
            TOp::Discard(l, n) => {
                img[l as usize * bs..(l + n) as usize * bs].fill(0);
                None
            }
            TOp::Flush => None,
        }));
    }
    (res, img)
}

fn engine_on(kind: EngineKind, scratch: &ScratchImage, discard: DiscardMode) -> Engine {
    let image = scratch.open().unwrap().with_discard_mode(discard);
    Engine::new(kind, image, 16).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every read and the final image agree between io_uring, the syscall oracle and the
    /// model; discarded blocks read as zeros; out-of-range requests fail on both.
    #[test]
    fn uring_matches_sync_oracle(ops in proptest::collection::vec(op_strategy(), 1..80), punch: bool) {
        let discard = if punch { DiscardMode::PunchHole } else { DiscardMode::WriteZeros };
        let (a, b) = (ScratchImage::create(NBLOCKS).unwrap(), ScratchImage::create(NBLOCKS).unwrap());
        let mut uring = engine_on(EngineKind::Uring, &a, discard);
        let mut sync = engine_on(EngineKind::Sync, &b, discard);
        let ru = run(&mut uring, &ops);
        let rs = run(&mut sync, &ops);
        let (rm, img) = model(&ops);
        for i in 0..ops.len() {
            prop_assert_eq!(&ru[i], &rs[i], "op {} {:?}: uring vs sync", i, ops[i]);
            prop_assert_eq!(&rs[i], &rm[i], "op {} {:?}: sync vs model", i, ops[i]);
        }
        drop((uring, sync));
        prop_assert!(a.contents().unwrap() == img, "uring image differs from the model");
        prop_assert!(b.contents().unwrap() == img, "sync image differs from the model");
    }
}

#[test]
fn image_opens_direct_here() {
    let s = ScratchImage::create(4).unwrap();
    let img = s.open().unwrap();
    assert_eq!(img.num_blocks(), 4);
    // The temp directory of the test machines is ext4, which supports O_DIRECT; the
    // fallback path is exercised wherever it does not.
    molt_sys::errln!(
        "O_DIRECT: {}, discard: {:?}",
        img.is_direct(),
        img.discard_mode()
    );
}

#[test]
fn bad_fixed_buffer_and_lengths_fail_cleanly() {
    for kind in [EngineKind::Uring, EngineKind::Sync] {
        let s = ScratchImage::create(8).unwrap();
        let mut e = Engine::new(kind, s.open().unwrap(), 4).unwrap();
        let c = e
            .run_one(IoOp::Read {
                lba: Lba(0),
                buf: IoBuf::Fixed {
                    index: 0,
                    len: 4096,
                },
            })
            .unwrap();
        assert_eq!(c.result, Err(Errno(libc::EFAULT)), "{kind:?}");
        let c = e
            .run_one(IoOp::Discard {
                lba: Lba(7),
                nblocks: 2,
            })
            .unwrap();
        assert_eq!(c.result, Err(Errno(libc::ERANGE)), "{kind:?}");
        let c = e
            .run_one(IoOp::Discard {
                lba: Lba(u64::MAX),
                nblocks: 2,
            })
            .unwrap();
        assert_eq!(c.result, Err(Errno(libc::ERANGE)), "{kind:?}");
        assert_eq!(e.in_flight(), 0);
    }
}

#[test]
fn fault_engine_fails_the_nth_write() {
    let s = ScratchImage::create(8).unwrap();
    let inner = Engine::new(EngineKind::Sync, s.open().unwrap(), 4).unwrap();
    let mut e = inner.with_faults(FaultPlan {
        fail_nth_write: Some(2),
        ..FaultPlan::default()
    });
    let w = || IoOp::Write {
        lba: Lba(1),
        buf: IoBuf::Owned(AlignedBuf::zeroed(1)),
    };
    assert!(e.run_one(w()).unwrap().result.is_ok());
    assert_eq!(e.run_one(w()).unwrap().result, Err(Errno(libc::EIO)));
    assert!(e.run_one(w()).unwrap().result.is_ok());
}

mod nbd {
    //! The NBD engine against real servers (qemu-nbd over raw and qcow2 images, nbdkit's
    //! file and memory plugins; unix sockets and loopback TCP) and against scripted
    //! misbehaving ones.

    use std::io::{Read, Write};
    use std::net::TcpListener;

    use super::*;
    use crate::nbd::server::{Export, Listen, NbdServer};
    use crate::nbd::{NbdClient, NbdConnection, NbdError, NbdUri};

    fn qcow2(nblocks: u64) -> (tempdir::Dir, PathBuf) {
        let d = tempdir::Dir::new();
        let p = d.0.join("img.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&p)
            .arg((nblocks * BLOCK_SIZE as u64).to_string())
            .status()
            .unwrap();
        assert!(st.success());
        (d, p)
    }

    mod tempdir {
        /// A private directory, removed on drop.
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU64, Ordering};
                static N: AtomicU64 = AtomicU64::new(0);
                let p = std::env::temp_dir().join(format!(
                    "molt-nbd-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    use std::path::PathBuf;

    fn engine(server: &NbdServer, depth: u32, bound: Duration) -> Engine {
        let conn = NbdConnection::connect(server.uri()).unwrap();
        Engine::nbd(conn, depth, bound).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        /// Reads, writes, flushes and discards over NBD agree with the byte model, with up
        /// to 16 requests in flight; discarded blocks read as zeros; the file behind the
        /// export ends as the model.
        #[test]
        fn qemu_nbd_matches_the_model(ops in proptest::collection::vec(op_strategy(), 1..80)) {
            let img = ScratchImage::create(NBLOCKS).unwrap();
            let server = NbdServer::start(
                Export::Qemu { image: img.path().to_path_buf(), format: "raw".into() },
                Listen::Unix,
            ).unwrap();
            let mut e = engine(&server, 16, Duration::from_secs(5));
            let got = run(&mut e, &ops);
            let (want, bytes) = model(&ops);
            for i in 0..ops.len() {
                prop_assert_eq!(&got[i], &want[i], "op {} {:?}", i, ops[i]);
            }
            drop(e);
            drop(server);
            prop_assert!(img.contents().unwrap() == bytes, "image differs from the model");
        }
    }

    /// The same workload on every server and transport gives the model's results.
    #[test]
    fn every_server_round_trips() {
        let ops: Vec<TOp> = (0..200u64)
            .map(|i| match i % 7 {
                0..=2 => TOp::Write((i * 5) % (NBLOCKS - 4), 1 + i % 4, i as u8),
                3..=4 => TOp::Read((i * 3) % (NBLOCKS - 4), 1 + i % 4),
                5 => TOp::Discard((i * 11) % (NBLOCKS - 4), 1 + i % 3),
                _ => TOp::Flush,
            })
            .collect();
        let (want, _) = model(&ops);
        let raw = ScratchImage::create(NBLOCKS).unwrap();
        let kit_file = ScratchImage::create(NBLOCKS).unwrap();
        let (_d, q) = qcow2(NBLOCKS);
        let exports = [
            (
                Export::Qemu {
                    image: raw.path().into(),
                    format: "raw".into(),
                },
                Listen::Tcp,
            ),
            (
                Export::Qemu {
                    image: q,
                    format: "qcow2".into(),
                },
                Listen::Unix,
            ),
            (
                Export::KitFile {
                    image: kit_file.path().into(),
                },
                Listen::Unix,
            ),
            (
                Export::KitMemory {
                    size: NBLOCKS * BLOCK_SIZE as u64,
                },
                Listen::Tcp,
            ),
        ];
        for (export, listen) in exports {
            let name = format!("{export:?} over {listen:?}");
            let server = NbdServer::start(export, listen).unwrap();
            let mut e = engine(&server, 32, Duration::from_secs(5));
            assert_eq!(e.num_blocks(), NBLOCKS, "{name}");
            let got = run(&mut e, &ops);
            for i in 0..ops.len() {
                assert_eq!(got[i], want[i], "{name}: op {i} {:?}", ops[i]);
            }
        }
    }

    /// 32 requests in flight at once, replies matched by cookie whatever their order.
    #[test]
    fn a_full_queue_completes() {
        let server = NbdServer::start(Export::KitMemory { size: 64 << 20 }, Listen::Unix).unwrap();
        let mut e = engine(&server, 32, Duration::from_secs(5));
        for round in 0..20u64 {
            for i in 0..32u64 {
                let lba = Lba(i * 64 + round % 4);
                let op = if round % 2 == 0 {
                    IoOp::Write {
                        lba,
                        buf: IoBuf::Owned(fill(i as u8, lba.0, 16)),
                    }
                } else {
                    IoOp::Read {
                        lba: Lba(i * 64 + (round - 1) % 4),
                        buf: IoBuf::Owned(AlignedBuf::zeroed(16)),
                    }
                };
                e.push(IoRequest { user_data: i, op }).unwrap();
            }
            assert!(
                e.push(IoRequest {
                    user_data: 99,
                    op: IoOp::Flush
                })
                .is_err(),
                "a 33rd request is refused"
            );
            e.submit().unwrap();
            let mut out = Vec::new();
            while out.len() < 32 {
                e.reap(&mut out);
                if out.len() < 32 {
                    e.wait(None, Duration::from_secs(5)).unwrap();
                }
            }
            for c in out {
                assert_eq!(c.result, Ok(()));
                if round % 2 == 1 {
                    let i = c.user_data;
                    let want = fill(i as u8, i * 64 + (round - 1) % 4, 16);
                    assert!(c.buf.unwrap()[..] == want[..], "read {i} of round {round}");
                }
            }
        }
    }

    /// Replies in another order than the requests: a write delayed by the server completes
    /// after a read submitted behind it, each matched to its own request.
    #[test]
    fn out_of_order_replies_are_matched_by_cookie() {
        let args = ["--filter=delay", "memory", "4M", "wdelay=300ms"].map(String::from);
        let server = NbdServer::start(Export::Kit(args.to_vec()), Listen::Unix).unwrap();
        let mut e = engine(&server, 8, Duration::from_secs(5));
        e.push(IoRequest {
            user_data: 1,
            op: IoOp::Write {
                lba: Lba(3),
                buf: IoBuf::Owned(fill(9, 3, 2)),
            },
        })
        .unwrap();
        e.push(IoRequest {
            user_data: 2,
            op: IoOp::Read {
                lba: Lba(100),
                buf: IoBuf::Owned(AlignedBuf::zeroed(1)),
            },
        })
        .unwrap();
        e.submit().unwrap();
        let mut order = Vec::new();
        let mut out = Vec::new();
        while order.len() < 2 {
            e.reap(&mut out);
            for c in out.drain(..) {
                assert_eq!(c.result, Ok(()));
                order.push(c.user_data);
            }
            e.wait(None, Duration::from_secs(1)).unwrap();
        }
        assert_eq!(order, [2, 1], "the read's reply came first");
        let c = e
            .run_one(IoOp::Read {
                lba: Lba(3),
                buf: IoBuf::Owned(AlignedBuf::zeroed(2)),
            })
            .unwrap();
        assert!(c.buf.unwrap()[..] == fill(9, 3, 2)[..]);
    }

    /// An export without WRITE_ZEROES: discards become zero-filled writes and still read
    /// back as zeros.
    #[test]
    fn discard_without_write_zeroes_writes_zeros() {
        let args = ["--filter=nozero", "memory", "8M", "zeromode=none"].map(String::from);
        let server = NbdServer::start(Export::Kit(args.to_vec()), Listen::Tcp).unwrap();
        let mut e = engine(&server, 8, Duration::from_secs(5));
        let c = e
            .run_one(IoOp::Write {
                lba: Lba(0),
                buf: IoBuf::Owned(fill(5, 0, 300)),
            })
            .unwrap();
        assert_eq!(c.result, Ok(()));
        let c = e
            .run_one(IoOp::Discard {
                lba: Lba(10),
                nblocks: 280,
            })
            .unwrap();
        assert_eq!(c.result, Ok(()));
        let c = e
            .run_one(IoOp::Read {
                lba: Lba(0),
                buf: IoBuf::Owned(AlignedBuf::zeroed(300)),
            })
            .unwrap();
        let b = c.buf.unwrap();
        let want = fill(5, 0, 300);
        assert!(b[..10 * 4096] == want[..10 * 4096]);
        assert!(b[10 * 4096..290 * 4096].iter().all(|&x| x == 0));
        assert!(b[290 * 4096..] == want[290 * 4096..]);
    }

    /// The tools' blocking client: writes, reads, zeroes, trims and flushes.
    #[test]
    fn blocking_client_round_trips() {
        let img = ScratchImage::create(256).unwrap();
        let server = NbdServer::start(
            Export::Qemu {
                image: img.path().into(),
                format: "raw".into(),
            },
            Listen::Unix,
        )
        .unwrap();
        let c = NbdClient::connect(server.uri()).unwrap();
        assert_eq!(c.size(), 256 * 4096);
        let data: Vec<u8> = (0..64 * 4096).map(|i| (i % 251) as u8).collect();
        c.write_at(4096, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        c.read_at(4096, &mut back).unwrap();
        assert_eq!(back, data);
        c.write_zeroes(8 * 4096, 4 * 4096).unwrap();
        c.read_at(4096, &mut back).unwrap();
        assert!(back[7 * 4096..11 * 4096].iter().all(|&b| b == 0));
        assert_eq!(back[11 * 4096..], data[11 * 4096..]);
        c.trim(100 * 4096, 16 * 4096).unwrap();
        c.flush().unwrap();
        let e = c.read_at(255 * 4096, &mut back).unwrap_err();
        assert!(e.to_string().contains("outside the export"), "{e}");
    }

    /// A wrong export name is refused with the server's reason.
    #[test]
    fn unknown_export_is_a_clear_error() {
        let img = ScratchImage::create(16).unwrap();
        let server = NbdServer::start(
            Export::Qemu {
                image: img.path().into(),
                format: "raw".into(),
            },
            Listen::Unix,
        )
        .unwrap();
        let mut uri = server.uri().clone();
        uri.export = "nope".into();
        let e = NbdConnection::connect(&uri).unwrap_err();
        assert!(matches!(e, NbdError::Refused { .. }), "{e}");
        assert!(e.to_string().contains("NBD_REP_ERR_UNKNOWN"), "{e}");
        let mut gone = server.uri().clone();
        if let crate::nbd::NbdAddress::Unix { socket } = &mut gone.address {
            socket.push_str(".missing");
        }
        let e = NbdConnection::connect(&gone).unwrap_err().to_string();
        assert!(e.contains("connecting to nbd+unix"), "{e}");
    }

    /// A scripted server on loopback: a correct handshake for a 1 MiB export, then
    /// whatever `reply` writes for the first request.
    fn scripted(reply: impl FnOnce(&mut std::net::TcpStream) + Send + 'static) -> NbdUri {
        use crate::nbd::proto::*;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut g = INIT_MAGIC.to_be_bytes().to_vec();
            g.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
            g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
            s.write_all(&g).unwrap();
            let mut head = [0u8; 20];
            s.read_exact(&mut head).unwrap();
            let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
            let mut rest = vec![0u8; len as usize];
            s.read_exact(&mut rest).unwrap();
            let mut info = REP_MAGIC.to_be_bytes().to_vec();
            info.extend_from_slice(&OPT_GO.to_be_bytes());
            info.extend_from_slice(&REP_INFO.to_be_bytes());
            info.extend_from_slice(&12u32.to_be_bytes());
            info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
            info.extend_from_slice(&(1u64 << 20).to_be_bytes());
            info.extend_from_slice(&(flags::HAS_FLAGS | flags::SEND_FLUSH).to_be_bytes());
            info.extend_from_slice(&REP_MAGIC.to_be_bytes());
            info.extend_from_slice(&OPT_GO.to_be_bytes());
            info.extend_from_slice(&REP_ACK.to_be_bytes());
            info.extend_from_slice(&0u32.to_be_bytes());
            s.write_all(&info).unwrap();
            let mut req = [0u8; 28];
            if s.read_exact(&mut req).is_ok() {
                reply(&mut s);
            }
            // Keep the socket open a moment so that the client sees the reply first.
            std::thread::sleep(Duration::from_millis(300));
        });
        NbdUri {
            address: crate::nbd::NbdAddress::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            export: String::new(),
        }
    }

    /// A misbehaving server never panics the engine: the connection is dropped, the
    /// engine tries to reconnect (nobody listens any more), and after the bound the read
    /// fails with EIO.
    #[test]
    fn misbehaving_servers_give_eio_after_the_bound() {
        use crate::nbd::proto::SIMPLE_REPLY_MAGIC;
        type Reply = Box<dyn FnOnce(&mut std::net::TcpStream) + Send>;
        let cases: Vec<(&str, Reply)> = vec![
            (
                "bad magic",
                Box::new(|s| {
                    s.write_all(&[0xde; 16]).unwrap();
                }),
            ),
            (
                "unknown cookie",
                Box::new(|s| {
                    let mut r = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
                    r.extend_from_slice(&0u32.to_be_bytes());
                    r.extend_from_slice(&12345u64.to_be_bytes());
                    s.write_all(&r).unwrap();
                }),
            ),
            (
                "short reply",
                Box::new(|s| {
                    s.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes()).unwrap();
                }),
            ),
            ("silence then close", Box::new(|_| {})),
        ];
        for (what, reply) in cases {
            let uri = scripted(reply);
            let conn = NbdConnection::connect(&uri).unwrap();
            let mut e = Engine::nbd(conn, 4, Duration::from_millis(300)).unwrap();
            let start = std::time::Instant::now();
            let c = e
                .run_one(IoOp::Read {
                    lba: Lba(0),
                    buf: IoBuf::Owned(AlignedBuf::zeroed(1)),
                })
                .unwrap();
            assert_eq!(c.result, Err(Errno(libc::EIO)), "{what}");
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{what}: {:?}",
                start.elapsed()
            );
            // New requests fail at once while there is no server.
            let c = e.run_one(IoOp::Flush).unwrap();
            assert_eq!(c.result, Err(Errno(libc::EIO)), "{what}");
        }
    }

    /// A server that keeps the connection but never answers: after the reply timeout the
    /// connection is taken for lost, and past the bound the request fails with EIO.
    #[test]
    fn a_hung_server_gives_eio() {
        let uri = scripted(|_| std::thread::sleep(Duration::from_secs(5)));
        let conn = NbdConnection::connect(&uri).unwrap();
        let e = crate::engine::NbdEngine::new(conn, 4, Duration::from_millis(300))
            .unwrap()
            .with_reply_timeout(Duration::from_millis(300))
            .unwrap();
        let mut e = Engine::Nbd(e);
        let start = std::time::Instant::now();
        let c = e
            .run_one(IoOp::Read {
                lba: Lba(0),
                buf: IoBuf::Owned(AlignedBuf::zeroed(1)),
            })
            .unwrap();
        assert_eq!(c.result, Err(Errno(libc::EIO)));
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
    }

    /// The server restarts while requests wait: they are sent again on a new connection
    /// and complete; the data written before and during the restart is there.
    #[test]
    fn server_restart_reconnects_and_resends() {
        let img = ScratchImage::create(1024).unwrap();
        let mut server = NbdServer::start(
            Export::Qemu {
                image: img.path().into(),
                format: "raw".into(),
            },
            Listen::Unix,
        )
        .unwrap();
        let mut e = engine(&server, 32, Duration::from_secs(10));
        let write = |e: &mut Engine, i: u64| {
            e.push(IoRequest {
                user_data: i,
                op: IoOp::Write {
                    lba: Lba(i * 4),
                    buf: IoBuf::Owned(fill(i as u8, i, 4)),
                },
            })
            .unwrap();
        };
        for i in 0..16 {
            write(&mut e, i);
        }
        e.submit().unwrap();
        server.kill();
        for i in 16..32 {
            write(&mut e, i);
        }
        e.submit().unwrap();
        let restarter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            server.restart().unwrap();
            server
        });
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while out.len() < 32 && std::time::Instant::now() < deadline {
            e.reap(&mut out);
            e.submit().unwrap();
            e.wait(None, Duration::from_millis(50)).unwrap();
        }
        let _server = restarter.join().unwrap();
        assert_eq!(out.len(), 32);
        assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
        for i in 0..32u64 {
            let c = e
                .run_one(IoOp::Read {
                    lba: Lba(i * 4),
                    buf: IoBuf::Owned(AlignedBuf::zeroed(4)),
                })
                .unwrap();
            assert!(c.buf.unwrap()[..] == fill(i as u8, i, 4)[..], "write {i}");
        }
    }
}
