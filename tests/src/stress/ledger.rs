//! The ledger of acknowledged writes: what every block must contain.
//!
//! Invariants:
//! - At most one write per block is in flight (`pending`), over all threads and queue
//!   slots; a writer that finds a block busy picks another. So once a write has
//!   completed, the block holds exactly that version.
//! - Sequences are allocated under the block's shard lock, so the versions of one block
//!   increase in the order their writes start.
//! - A read that overlapped no write of its block must return `current` exactly. A read
//!   that overlapped one may return any version between the one current when it started
//!   and the newest one started before it ended, or a torn mix (a bad checksum), which
//!   is counted, not failed: Linux does not make reads atomic against writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::block::{self, Content};

/// `current` of a block that was never written: it reads as zeros.
pub const NEVER_WRITTEN: u64 = 0;
/// `current` of a block whose last write failed: its content is not known.
pub const UNKNOWN: u64 = u64::MAX;
const NO_PENDING: u64 = 0;
const SHARDS: u64 = 64;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub current: u64,
    pub pending: u64,
}

/// Outcome of checking one read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Overlapped a write and saw a mix of two versions.
    Torn,
    /// The block's content is unknown (its last write failed).
    Unverified,
    Mismatch(String),
}

pub struct Ledger {
    shards: Vec<Mutex<Vec<Snapshot>>>,
    next_seq: AtomicU64,
}

impl Ledger {
    /// A ledger for `blocks` blocks with the given current versions (all
    /// [`NEVER_WRITTEN`] when `seqs` is `None`).
    pub fn new(blocks: u64, seqs: Option<&[u64]>, next_seq: u64) -> Ledger {
        let mut shards: Vec<Vec<Snapshot>> = (0..SHARDS)
            .map(|s| {
                Vec::with_capacity((blocks / SHARDS + u64::from(s < blocks % SHARDS)) as usize)
            })
            .collect();
        for g in 0..blocks {
            let current = seqs.map_or(NEVER_WRITTEN, |s| s[g as usize]);
            shards[(g % SHARDS) as usize].push(Snapshot {
                current,
                pending: NO_PENDING,
            });
        }
        Ledger {
            shards: shards.into_iter().map(Mutex::new).collect(),
            next_seq: AtomicU64::new(next_seq.max(1)),
        }
    }

    fn with<R>(&self, g: u64, f: impl FnOnce(&mut Snapshot) -> R) -> R {
        let mut shard = self.shards[(g % SHARDS) as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        f(&mut shard[(g / SHARDS) as usize])
    }

    /// Claims block `g` for a write and returns its new sequence, or `None` when another
    /// write to it is in flight.
    pub fn try_begin_write(&self, g: u64) -> Option<u64> {
        self.with(g, |s| {
            if s.pending != NO_PENDING {
                return None;
            }
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            s.pending = seq;
            Some(seq)
        })
    }

    /// Ends the write of `seq` to `g`. A failed write leaves the block [`UNKNOWN`].
    pub fn end_write(&self, g: u64, seq: u64, acknowledged: bool) {
        self.with(g, |s| {
            debug_assert_eq!(s.pending, seq);
            s.pending = NO_PENDING;
            s.current = if acknowledged { seq } else { UNKNOWN };
        });
    }

    /// Releases a claim whose write was never issued; the block keeps its version.
    pub fn abort_write(&self, g: u64, seq: u64) {
        self.with(g, |s| {
            debug_assert_eq!(s.pending, seq);
            s.pending = NO_PENDING;
        });
    }

    pub fn snapshot(&self, g: u64) -> Snapshot {
        self.with(g, |s| *s)
    }

    /// The next sequence that would be handed out.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed)
    }

    /// Current versions of all blocks, in block order; `None` while a write is pending.
    pub fn currents(&self, blocks: u64) -> Option<Vec<u64>> {
        let shards: Vec<_> = self
            .shards
            .iter()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let mut out = Vec::with_capacity(blocks as usize);
        for g in 0..blocks {
            let s = shards[(g % SHARDS) as usize][(g / SHARDS) as usize];
            if s.pending != NO_PENDING {
                return None;
            }
            out.push(s.current);
        }
        Some(out)
    }
}

/// Checks a full-length read of the block at `offset` in `file`, given ledger snapshots
/// taken before the read was issued and after it completed.
pub fn judge(buf: &[u8], file: u32, offset: u64, before: Snapshot, after: Snapshot) -> Verdict {
    let content = block::decode(buf);
    if let Content::Valid(h) = &content {
        if h.file != file || h.offset != offset {
            return Verdict::Mismatch(format!(
                "block belongs to file {} offset {} (seq {})",
                h.file, h.offset, h.seq
            ));
        }
    }
    let overlapped = before.pending != NO_PENDING
        || after.pending != NO_PENDING
        || before.current != after.current;
    if !overlapped {
        return match (before.current, &content) {
            (UNKNOWN, _) => Verdict::Unverified,
            (NEVER_WRITTEN, Content::Zero) => Verdict::Ok,
            (NEVER_WRITTEN, c) => Verdict::Mismatch(format!(
                "expected zeros (never written), found {}",
                c.describe()
            )),
            (want, Content::Valid(h)) if h.seq == want => Verdict::Ok,
            (want, c) => Verdict::Mismatch(format!("expected seq {want}, found {}", c.describe())),
        };
    }
    if before.current == UNKNOWN || after.current == UNKNOWN {
        return Verdict::Unverified;
    }
    let lo = before.current;
    let hi = before.pending.max(after.pending).max(after.current);
    match content {
        Content::Zero if lo == NEVER_WRITTEN => Verdict::Ok,
        Content::Corrupt(_) => Verdict::Torn,
        Content::Valid(h) if (lo..=hi).contains(&h.seq) => Verdict::Ok,
        c => Verdict::Mismatch(format!(
            "expected a seq in {lo}..={hi} (read overlapped a write), found {}",
            c.describe()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seq: u64) -> Vec<u8> {
        let mut b = vec![0u8; 256];
        block::fill(&mut b, 1, 512, seq);
        b
    }

    #[test]
    fn quiet_block_must_match_exactly() {
        let l = Ledger::new(4, None, 1);
        let g = 2;
        let z = vec![0u8; 256];
        let s = l.snapshot(g);
        assert_eq!(judge(&z, 1, 512, s, s), Verdict::Ok);
        let seq = l.try_begin_write(g).unwrap();
        assert_eq!(l.try_begin_write(g), None, "one write per block in flight");
        l.end_write(g, seq, true);
        let s = l.snapshot(g);
        assert_eq!(judge(&block(seq), 1, 512, s, s), Verdict::Ok);
        assert!(matches!(judge(&z, 1, 512, s, s), Verdict::Mismatch(_)));
        assert!(matches!(
            judge(&block(seq + 1), 1, 512, s, s),
            Verdict::Mismatch(_)
        ));
        let mut wrong_place = vec![0u8; 256];
        block::fill(&mut wrong_place, 1, 1024, seq);
        assert!(matches!(
            judge(&wrong_place, 1, 512, s, s),
            Verdict::Mismatch(_)
        ));
    }

    #[test]
    fn overlapping_read_accepts_old_new_or_torn() {
        let l = Ledger::new(1, None, 10);
        let s1 = l.try_begin_write(0).unwrap();
        l.end_write(0, s1, true);
        let before = l.snapshot(0);
        let s2 = l.try_begin_write(0).unwrap();
        let after = l.snapshot(0);
        assert_eq!(judge(&block(s1), 1, 512, before, after), Verdict::Ok);
        assert_eq!(judge(&block(s2), 1, 512, before, after), Verdict::Ok);
        let mut torn = block(s1);
        torn[200..].copy_from_slice(&block(s2)[200..]);
        assert_eq!(judge(&torn, 1, 512, before, after), Verdict::Torn);
        assert!(matches!(
            judge(&block(s1 - 1), 1, 512, before, after),
            Verdict::Mismatch(_)
        ));
        l.end_write(0, s2, false);
        let s = l.snapshot(0);
        assert_eq!(judge(&block(s1), 1, 512, s, s), Verdict::Unverified);
    }
}
