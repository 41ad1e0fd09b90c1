//! Writing and replaying the metadata journal (format in `formats::journal`).
//!
//! Invariant: a metadata block is written in place only after the transaction that
//! carries it is durable in the journal (a flush has completed since it was written).
//! The filesystem keeps such blocks pinned in memory until the next checkpoint.

use std::collections::BTreeMap;
use std::io;

use formats::block::{BlockAddr, BLOCK_SIZE};
use formats::journal::{self, JournalSuper, MAX_TX_BLOCKS};
use formats::superblock::Geometry;

use crate::store::BlockStore;

/// One complete transaction found in the log.
#[derive(Debug, Clone)]
pub(crate) struct ReplayTx {
    pub blocks: Vec<(u64, Vec<u8>)>,
}

/// What the log holds: the complete transactions to apply, in order, and the sequence
/// number the next transaction must carry.
#[derive(Debug, Clone)]
pub(crate) struct LogScan {
    pub transactions: Vec<ReplayTx>,
    pub next_sequence: u64,
    /// Journal block (relative to the region) where the next transaction would start.
    pub head: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal superblock: {0}")]
    Super(formats::FormatError),
    #[error("journal records {found} blocks, the superblock says {expected}")]
    SizeMismatch { found: u32, expected: u32 },
    #[error(
        "journal transaction {sequence} targets block {target}: the journal region or past the end"
    )]
    BadTarget { sequence: u64, target: u64 },
    #[error("I/O error on the journal: {0}")]
    Io(#[from] io::Error),
}

/// Reads the journal region in windows of this many blocks: one device request per
/// window instead of one per block.
const SCAN_WINDOW: u64 = 256;

/// Sequential reader of the journal region with a read-ahead window.
struct WindowReader<'a> {
    store: &'a dyn BlockStore,
    end: u64,
    start: u64,
    buf: Vec<u8>,
}

impl WindowReader<'_> {
    fn block(&mut self, addr: u64) -> io::Result<Vec<u8>> {
        let have = self.buf.len() as u64 / BLOCK_SIZE as u64;
        if addr < self.start || addr >= self.start + have {
            let n = SCAN_WINDOW.min(self.end.saturating_sub(addr)).max(1);
            self.buf.resize(n as usize * BLOCK_SIZE, 0);
            self.store.read(addr, &mut self.buf)?;
            self.start = addr;
        }
        let off = (addr - self.start) as usize * BLOCK_SIZE;
        Ok(self.buf[off..off + BLOCK_SIZE].to_vec())
    }
}

fn read_block(store: &dyn BlockStore, addr: u64) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; BLOCK_SIZE];
    store.read(addr, &mut b)?;
    Ok(b)
}

/// Reads the log without changing anything. A transaction is complete when its
/// descriptor, every block image and its commit are present and the commit's data
/// checksum matches; the scan stops at the first block that is not.
pub(crate) fn scan(store: &dyn BlockStore, geo: &Geometry) -> Result<LogScan, JournalError> {
    let start = geo.journal_start;
    let raw = read_block(store, start)?;
    let jsb = JournalSuper::decode_allowing_torn_reset(&raw, BlockAddr(start))
        .map_err(JournalError::Super)?;
    if jsb.blocks != geo.journal_blocks {
        return Err(JournalError::SizeMismatch {
            found: jsb.blocks,
            expected: geo.journal_blocks,
        });
    }
    if JournalSuper::decode(&raw, BlockAddr(start)).is_err() && geo.journal_blocks > 1 {
        // Read as a torn reset: the reset follows every transaction still at journal
        // block 1, so one there with this sequence or a later one means the sequence
        // itself is damaged.
        let first = read_block(store, start + 1)?;
        if let Ok((first_seq, _)) = journal::decode_descriptor(&first, BlockAddr(start + 1)) {
            if first_seq >= jsb.sequence {
                return Err(JournalError::Super(formats::FormatError::corrupted(
                    "journal superblock",
                    "checksum mismatch, and its sequence is not past the log's",
                )));
            }
        }
    }
    let mut reader = WindowReader {
        store,
        end: start + geo.journal_blocks as u64,
        start: 0,
        buf: Vec::new(),
    };
    let mut pos = 1u64;
    let mut seq = jsb.sequence;
    let mut txs = Vec::new();
    let end = geo.journal_blocks as u64;
    loop {
        if pos + 2 > end {
            break;
        }
        let daddr = start + pos;
        let desc = reader.block(daddr)?;
        let Ok((dseq, targets)) = journal::decode_descriptor(&desc, BlockAddr(daddr)) else {
            break;
        };
        if dseq != seq || pos + journal::tx_footprint(targets.len()) > end {
            break;
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&desc);
        let mut blocks = Vec::with_capacity(targets.len());
        for (i, t) in targets.iter().enumerate() {
            let b = reader.block(daddr + 1 + i as u64)?;
            crc.update(&b);
            blocks.push((*t, b));
        }
        let caddr = daddr + 1 + targets.len() as u64;
        let commit = reader.block(caddr)?;
        let Ok((cseq, count, data_crc)) = journal::decode_commit(&commit, BlockAddr(caddr)) else {
            break;
        };
        if cseq != seq || count as usize != targets.len() || data_crc != crc.finalize() {
            break;
        }
        for t in &targets {
            // Only metadata lives in the journal; data blocks never do, and the journal
            // itself is never a target. Block 0 is one in a format conversion's steps.
            if (*t >= geo.journal_start && *t < geo.journal_start + end) || *t >= geo.total_blocks {
                return Err(JournalError::BadTarget {
                    sequence: seq,
                    target: *t,
                });
            }
        }
        txs.push(ReplayTx { blocks });
        pos += journal::tx_footprint(targets.len());
        seq += 1;
    }
    Ok(LogScan {
        transactions: txs,
        next_sequence: seq,
        head: pos,
    })
}

/// Applies every complete transaction in place, flushes, and retires the log.
/// Returns how many transactions were replayed.
pub fn replay(store: &dyn BlockStore, geo: &Geometry) -> Result<(usize, u64), JournalError> {
    let log = scan(store, geo)?;
    for tx in &log.transactions {
        for (addr, b) in &tx.blocks {
            store.write(*addr, b)?;
        }
    }
    store.flush()?;
    reset(store, geo, log.next_sequence)?;
    Ok((log.transactions.len(), log.next_sequence))
}

/// Retires the log: the next transaction is `sequence` at journal block 1.
/// Call only when every transaction written so far is durable in place.
pub(crate) fn reset(store: &dyn BlockStore, geo: &Geometry, sequence: u64) -> io::Result<()> {
    let jsb = JournalSuper {
        blocks: geo.journal_blocks,
        sequence,
    };
    store.write(
        geo.journal_start,
        &jsb.encode(BlockAddr(geo.journal_start))[..],
    )?;
    store.flush()
}

/// Appends transactions to the log. Not thread-safe by itself: the filesystem serialises.
pub(crate) struct JournalWriter {
    start: u64,
    blocks: u64,
    head: u64,
    sequence: u64,
}

impl JournalWriter {
    /// A writer for a freshly reset log.
    pub fn new(geo: &Geometry, sequence: u64) -> JournalWriter {
        JournalWriter {
            start: geo.journal_start,
            blocks: geo.journal_blocks as u64,
            head: 1,
            sequence,
        }
    }

    /// A writer that continues a log a predecessor left: the next transaction goes at
    /// `head` with `sequence` (live update; nothing is checkpointed in between).
    pub(crate) fn continuing(geo: &Geometry, head: u64, sequence: u64) -> JournalWriter {
        JournalWriter {
            start: geo.journal_start,
            blocks: geo.journal_blocks as u64,
            head,
            sequence,
        }
    }

    /// The sequence number the next transaction will carry.
    pub(crate) fn next_sequence(&self) -> u64 {
        self.sequence
    }

    /// Most block images one transaction may carry in this journal.
    pub(crate) fn max_tx_blocks(&self) -> usize {
        MAX_TX_BLOCKS.min((self.blocks - 3) as usize)
    }

    /// Whether a transaction of `n` images fits before the end of the region.
    pub fn fits(&self, n: usize) -> bool {
        self.head + journal::tx_footprint(n) <= self.blocks
    }

    /// Fraction of the region in use.
    pub(crate) fn used_fraction(&self) -> f64 {
        self.head as f64 / self.blocks as f64
    }

    /// Writes one transaction (not flushed). The caller checked `fits`.
    pub fn append(
        &mut self,
        store: &dyn BlockStore,
        blocks: &BTreeMap<u64, Box<[u8; BLOCK_SIZE]>>,
    ) -> io::Result<()> {
        assert!(
            !blocks.is_empty() && blocks.len() <= self.max_tx_blocks() && self.fits(blocks.len())
        );
        let targets: Vec<u64> = blocks.keys().copied().collect();
        let daddr = self.start + self.head;
        let desc = journal::encode_descriptor(self.sequence, &targets, BlockAddr(daddr))
            .map_err(|e| io::Error::other(e.to_string()))?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&desc[..]);
        let mut buf = Vec::with_capacity((blocks.len() + 2) * BLOCK_SIZE);
        buf.extend_from_slice(&desc[..]);
        for b in blocks.values() {
            crc.update(&b[..]);
            buf.extend_from_slice(&b[..]);
        }
        let caddr = daddr + 1 + blocks.len() as u64;
        let commit = journal::encode_commit(
            self.sequence,
            blocks.len() as u32,
            crc.finalize(),
            BlockAddr(caddr),
        );
        buf.extend_from_slice(&commit[..]);
        store.write(daddr, &buf)?;
        self.head += journal::tx_footprint(blocks.len());
        self.sequence += 1;
        Ok(())
    }

    /// Restarts the log at block 1 (the caller has made every in-place write durable).
    pub(crate) fn reset(&mut self, store: &dyn BlockStore, geo: &Geometry) -> io::Result<()> {
        reset(store, geo, self.sequence)?;
        self.head = 1;
        Ok(())
    }
}
