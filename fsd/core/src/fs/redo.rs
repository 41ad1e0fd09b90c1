//! The redo log: what a filesystem server has acknowledged but not yet committed to the
//! journal, kept where it survives the server process (a memfd the supervisor owns).
//!
//! Group commit keeps operations in memory for up to a second before their journal
//! transaction is written. A server that dies in that window must not take acknowledged
//! operations with it: after every operation, before its reply, the metadata blocks it
//! staged are appended here as one record. A successor recovering from the crash replays
//! the records (in order, the later image of a block wins) as one journal transaction.
//! Each journal commit empties the log by moving to a new generation, so the log never
//! holds more than one open transaction. A generation records the sequence number of the
//! journal transaction that will carry its records (the next commit holds every change
//! staged until then, the records' blocks at their latest): a successor that finds that
//! transaction in the journal replays nothing from the log, since the records are older
//! images of what the journal already holds. (The commit's transaction is on the device
//! before the log moves on, so a server killed between the two leaves both.)
//!
//! The log also remembers the FUSE request ids (`unique`) of the last completed
//! operations, so that a request the kernel resends after the crash (FUSE_NOTIFY_RESEND)
//! is answered without running a non-idempotent operation twice.
//!
//! Layout (little endian): header at 0 (magic, version, generation, completed count,
//! then two slots of (generation, sequence of the journal transaction that carries that
//! generation's records), generation `g` in slot `g % 2`: a reset fills the new
//! generation's slot before it moves the generation on, one store, so a server killed
//! at any point of it leaves a generation whose slot is right. A generation without its
//! slot, moved on by a build that did not fill them, has its records replayed),
//! the ring of completed request ids at `DONE_OFF`, records from `RECORDS_OFF`:
//! `magic u32 | nblocks u32 | generation u64 | unique u64 | crc u32 | 0 u32`, then
//! `nblocks` addresses (u64), then the `nblocks` block images. The crc covers everything
//! after the magic except itself. A record is valid only with the header's generation and
//! a matching crc, so a record torn by the crash and records of earlier generations left
//! further on are never replayed.

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::ops::DerefMut;

use formats::block::BLOCK_SIZE;

use super::Block;

const MAGIC: u64 = u64::from_le_bytes(*b"MOLTREDO");
const VERSION: u32 = 1;
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"RDO1");
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_GENERATION: usize = 16;
const OFF_DONE_COUNT: usize = 24;
/// Two slots of 16 bytes: generation, covering journal sequence.
const OFF_COVERED_SLOTS: usize = 32;
const DONE_OFF: usize = 4096;
/// Completed request ids remembered: more than the kernel can have outstanding.
const DONE_SLOTS: usize = 8192;
const RECORDS_OFF: usize = DONE_OFF + DONE_SLOTS * 8;
const RECORD_HEADER: usize = 32;
/// Size of the log the supervisor creates.
pub const REDO_LOG_SIZE: u64 = 64 << 20;

/// The memory a redo log lives in: in a server, a mapping of the supervisor's memfd, which
/// outlives the process; in tests, plain memory.
pub trait RedoRegion: DerefMut<Target = [u8]> + Send {}

impl<T: DerefMut<Target = [u8]> + Send> RedoRegion for T {}

thread_local! {
    /// The FUSE request the current thread is serving (0: none), recorded with the
    /// operation's changes.
    static CURRENT_REQUEST: Cell<u64> = const { Cell::new(0) };
}

/// Names the request this thread serves from now on (0 when it is done).
pub fn set_current_request(unique: u64) {
    CURRENT_REQUEST.with(|c| c.set(unique));
}

fn current_request() -> u64 {
    CURRENT_REQUEST.with(|c| c.get())
}

/// What a recovering server takes over from the log.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Latest image of every block changed by acknowledged, uncommitted operations.
    pub blocks: BTreeMap<u64, Box<Block>>,
    /// Requests whose operation completed (their changes are in the journal or above).
    pub completed: HashSet<u64>,
    pub records: usize,
    /// The journal transaction that carries these records, if the log recorded it.
    pub covered_by: Option<u64>,
}

pub struct RedoLog {
    map: Box<dyn RedoRegion>,
    /// Where the next record goes.
    end: usize,
}

impl RedoLog {
    /// The log in `map` (`REDO_LOG_SIZE` bytes or more). A region without a header (new)
    /// is initialised; one with a header keeps its contents for `recover`.
    pub fn new(map: Box<dyn RedoRegion>) -> std::io::Result<RedoLog> {
        let len = map.len();
        if len < RECORDS_OFF + RECORD_HEADER + BLOCK_SIZE {
            return Err(std::io::Error::other(format!(
                "redo log of {len} bytes is too small"
            )));
        }
        let mut log = RedoLog {
            map,
            end: RECORDS_OFF,
        };
        if log.u64_at(OFF_MAGIC) != MAGIC || log.u32_at(OFF_VERSION) != VERSION {
            log.put_u64(OFF_MAGIC, MAGIC);
            log.put_u32(OFF_VERSION, VERSION);
            log.put_u64(OFF_GENERATION, 1);
            log.put_u64(OFF_DONE_COUNT, 0);
        }
        Ok(log)
    }

    /// Gives the memory back (a test reopens it as a successor would).
    #[cfg(test)]
    pub(crate) fn into_region(self) -> Box<dyn RedoRegion> {
        self.map
    }

    /// A copy of the log's memory, as a successor would find it now (tests).
    #[cfg(test)]
    pub(crate) fn region_copy(&self) -> Vec<u8> {
        self.map.to_vec()
    }

    fn u64_at(&self, off: usize) -> u64 {
        formats::bytes::get_u64(&self.map, off)
    }
    fn u32_at(&self, off: usize) -> u32 {
        formats::bytes::get_u32(&self.map, off)
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.map[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        self.map[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn generation(&self) -> u64 {
        self.u64_at(OFF_GENERATION)
    }

    /// Whether a record of `nblocks` blocks still fits.
    pub fn fits(&self, nblocks: usize) -> bool {
        self.end + record_len(nblocks) <= self.map.len()
    }

    /// Appends one operation's staged blocks, tagged with the request being served. The
    /// caller checked `fits`.
    pub fn append(&mut self, blocks: &[(u64, &Block)]) {
        let generation = self.generation();
        let unique = current_request();
        let start = self.end;
        let len = record_len(blocks.len());
        let mut off = start + RECORD_HEADER;
        for (addr, _) in blocks {
            self.put_u64(off, *addr);
            off += 8;
        }
        for (_, b) in blocks {
            self.map[off..off + BLOCK_SIZE].copy_from_slice(&b[..]);
            off += BLOCK_SIZE;
        }
        self.put_u32(start + 4, blocks.len() as u32);
        self.put_u64(start + 8, generation);
        self.put_u64(start + 16, unique);
        self.put_u32(start + 28, 0);
        let crc = record_crc(&self.map[start..start + len]);
        self.put_u32(start + 24, crc);
        // The magic last: a record is visible only once complete.
        self.put_u32(start, RECORD_MAGIC);
        self.end = start + len;
        self.note_completed(unique);
    }

    /// Remembers that the current request's operation completed (changes, if any, are
    /// in the log or the journal).
    pub(crate) fn complete_current(&mut self) {
        let unique = current_request();
        self.note_completed(unique);
    }

    fn note_completed(&mut self, unique: u64) {
        if unique == 0 {
            return;
        }
        let n = self.u64_at(OFF_DONE_COUNT);
        self.put_u64(DONE_OFF + (n as usize % DONE_SLOTS) * 8, unique);
        self.put_u64(OFF_DONE_COUNT, n + 1);
    }

    /// Forgets every record: their blocks are now in a journal transaction (or in
    /// place). The records of the new generation will be carried by the journal
    /// transaction `next_journal_sequence`. The completed request ids stay.
    pub(crate) fn reset(&mut self, next_journal_sequence: u64) {
        let g = self.generation() + 1;
        // The old generation's slot stays as it was until the generation moves on.
        let slot = covered_slot(g);
        self.put_u64(slot, g);
        self.put_u64(slot + 8, next_journal_sequence);
        self.put_u64(OFF_GENERATION, g);
        self.end = RECORDS_OFF;
    }

    /// Reads what a dead predecessor left: every valid record of the current generation
    /// and the completed request ids. Leaves the log as it is until `reset`.
    pub fn recover(&mut self) -> Recovered {
        let mut out = Recovered::default();
        let done = (self.u64_at(OFF_DONE_COUNT) as usize).min(DONE_SLOTS);
        for i in 0..done {
            let u = self.u64_at(DONE_OFF + i * 8);
            if u != 0 {
                out.completed.insert(u);
            }
        }
        let generation = self.generation();
        let slot = covered_slot(generation);
        out.covered_by = (self.u64_at(slot) == generation).then(|| self.u64_at(slot + 8));
        let mut off = RECORDS_OFF;
        while off + RECORD_HEADER <= self.map.len() {
            if self.u32_at(off) != RECORD_MAGIC || self.u64_at(off + 8) != generation {
                break;
            }
            let n = self.u32_at(off + 4) as usize;
            let len = record_len(n);
            if off + len > self.map.len()
                || record_crc(&self.map[off..off + len]) != self.u32_at(off + 24)
            {
                break;
            }
            let unique = self.u64_at(off + 16);
            if unique != 0 {
                out.completed.insert(unique);
            }
            let data = off + RECORD_HEADER + n * 8;
            for i in 0..n {
                let addr = self.u64_at(off + RECORD_HEADER + i * 8);
                let mut b = Box::new([0u8; BLOCK_SIZE]);
                b.copy_from_slice(&self.map[data + i * BLOCK_SIZE..data + (i + 1) * BLOCK_SIZE]);
                out.blocks.insert(addr, b);
            }
            out.records += 1;
            off += len;
        }
        self.end = off;
        out
    }
}

/// Where generation `g`'s covering sequence is kept.
fn covered_slot(g: u64) -> usize {
    OFF_COVERED_SLOTS + (g % 2) as usize * 16
}

fn record_len(nblocks: usize) -> usize {
    RECORD_HEADER + nblocks * (8 + BLOCK_SIZE)
}

/// CRC of a record: bytes 4..24 of its header and everything after the header.
fn record_crc(record: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&record[4..24]);
    h.update(&record[RECORD_HEADER..]);
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(v: u8) -> Block {
        [v; BLOCK_SIZE]
    }

    fn fresh() -> RedoLog {
        RedoLog::new(Box::new(vec![0u8; REDO_LOG_SIZE as usize])).unwrap()
    }

    fn reopen(log: RedoLog) -> RedoLog {
        RedoLog::new(log.into_region()).unwrap()
    }

    #[test]
    fn records_survive_and_the_later_image_wins() {
        let mut log = fresh();
        set_current_request(7);
        log.append(&[(5, &block(1)), (6, &block(2))]);
        set_current_request(8);
        log.append(&[(5, &block(3))]);
        set_current_request(0);
        let mut again = reopen(log);
        let r = again.recover();
        assert_eq!(r.records, 2);
        assert_eq!(r.blocks[&5][0], 3);
        assert_eq!(r.blocks[&6][0], 2);
        assert!(r.completed.contains(&7) && r.completed.contains(&8));
    }

    #[test]
    fn a_reset_log_replays_nothing_but_remembers_requests() {
        let mut log = fresh();
        set_current_request(9);
        log.append(&[(5, &block(1))]);
        log.reset(3);
        set_current_request(0);
        let r = reopen(log).recover();
        assert_eq!(r.records, 0);
        assert!(r.blocks.is_empty());
        assert!(r.completed.contains(&9));
    }

    /// Each generation names the journal transaction that carries its records, and a
    /// reset cut short anywhere before it moves the generation on leaves the old
    /// generation's name as it was. A log whose generation has no name (moved on by a
    /// build that did not record it) names none.
    #[test]
    fn a_generation_names_the_transaction_that_carries_it() {
        let mut log = fresh();
        assert_eq!(log.recover().covered_by, None);
        log.reset(10);
        log.append(&[(5, &block(1))]);
        assert_eq!(log.recover().covered_by, Some(10));
        // Killed after the new generation's slot, before the generation moved on.
        let next = log.generation() + 1;
        log.put_u64(covered_slot(next), next);
        log.put_u64(covered_slot(next) + 8, 11);
        let r = reopen(log).recover();
        assert_eq!((r.covered_by, r.records), (Some(10), 1));
        // Moved on without a slot.
        let mut log = fresh();
        log.reset(10);
        let g = log.generation();
        log.put_u64(OFF_GENERATION, g + 2);
        assert_eq!(log.recover().covered_by, None);
    }

    #[test]
    fn a_torn_record_ends_the_log() {
        let mut log = fresh();
        log.append(&[(5, &block(1))]);
        log.append(&[(6, &block(2))]);
        // Tear the second record's block image.
        let second = RECORDS_OFF + record_len(1);
        log.map[second + RECORD_HEADER + 8 + 100] ^= 0xff;
        let r = log.recover();
        assert_eq!(r.records, 1);
        assert!(r.blocks.contains_key(&5) && !r.blocks.contains_key(&6));
    }

    #[test]
    fn a_small_region_is_refused() {
        assert!(RedoLog::new(Box::new(vec![0u8; 4096])).is_err());
    }
}
