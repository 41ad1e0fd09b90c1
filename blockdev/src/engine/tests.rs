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
    eprintln!(
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
