//! The filesystem core: POSIX operations on a Molt image over a `BlockStore`.
//!
//! Concurrency: one mutex serialises every operation's in-memory changes (reads, aligned
//! overwrites and background checkpoints do their device I/O outside it; the lock order
//! is in `lock_order`). Each mutating operation stages the metadata blocks it changes in
//! a transaction that a group commit writes to the journal; committed blocks stay pinned
//! in memory until a checkpoint writes them in place after a flush (see `journal`). File data is written in place, never journaled.
//! Blocks freed by a transaction become allocatable only after the next checkpoint has
//! retired every journal transaction that may still name them: otherwise a crash could
//! leave a file pointing at another file's data, or a replay could overwrite data with
//! an old metadata image of a reused block.

pub mod alloc;
pub(crate) mod convert;
mod dirops;
pub mod error;
mod file;
mod flushes;
pub mod journal;
mod lock_order;
mod ops;
mod read_only;
pub mod redo;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use formats::block::{BlockAddr, BlockKind, Ino, BLOCK_SIZE, PAYLOAD_SIZE};
use formats::extent::{Extent, ExtentCodec};
use formats::inode::{InlineArea, Inode, INODE_SIZE};
use formats::superblock::{FsState, Geometry, Superblock, ORPHAN_INO};

pub use convert::Progress;
pub use error::{FsError, FsResult};
pub use ops::{Atime, Attr, SetAttr, StatFs, TimeSet, WriteMode, XattrFlags};

use crate::store::BlockStore;
use alloc::Bitmap;
use flushes::Flushes;
use journal::JournalWriter;

type Block = [u8; BLOCK_SIZE];

/// Clean metadata blocks kept in memory before the cache is trimmed.
const CLEAN_CACHE_BLOCKS: usize = 8192;
/// Pinned blocks a background checkpoint writes between two looks at its stop signal.
const IN_PLACE_BATCH: usize = 1024;
/// Pinned blocks left after a background checkpoint's unlocked pass (those commits
/// changed meanwhile) that it writes under the lock to retire the journal; more, and it
/// runs another unlocked pass instead.
const FINAL_PASS_BLOCKS: usize = 64;
/// Adjacent blocks one in-place write request carries at most.
const IN_PLACE_RUN: usize = 64;
/// Seconds between checkpoints while the filesystem is busy.
const CHECKPOINT_INTERVAL_SECS: u64 = 5;
/// Free blocks an operation that does not count its allocations up front may need: a
/// directory block, an xattr block, extent blocks for the commit's block maps.
const OPERATION_HEADROOM: u64 = 16;

/// A mounted Molt filesystem.
pub struct Fs {
    inner: Mutex<Inner>,
    holds: LockHolds,
    releases: Releases,
    flushes: Flushes,
    /// The inodes' data locks, by inode number modulo their count (see `lock_order`).
    inode_data: Box<[std::sync::RwLock<()>]>,
}

/// The inodes [`Fs::release`] has freed, counted, so that an operation refused for want
/// of space can wait for the space an unlinked file gives back (`Fs::waiting_for_space`).
/// A release counts under the filesystem lock; a waiter waits with no lock held; nothing
/// is locked while its own lock is held.
#[derive(Default)]
struct Releases {
    count: Mutex<u64>,
    freed: Condvar,
}

impl Releases {
    fn seen(&self) -> u64 {
        *self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note(&self) {
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.freed.notify_all();
    }

    /// Waits until an inode has been freed since the count was `seen`, or `deadline`
    /// passes: whether one was.
    fn wait_past(&self, seen: u64, deadline: Instant) -> bool {
        let mut count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while *count == seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            count = self
                .freed
                .wait_timeout(count, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// Stripes of the inodes' data locks: writes to inodes on different stripes never wait
/// for each other's device I/O.
const INODE_DATA_STRIPES: usize = 64;

fn inode_data_locks() -> Box<[std::sync::RwLock<()>]> {
    (0..INODE_DATA_STRIPES)
        .map(|_| std::sync::RwLock::new(()))
        .collect()
}

/// How long the filesystem lock has been held at a time: the pauses the filesystem
/// itself imposes on every other operation.
#[derive(Default)]
struct LockHolds {
    longest_us: AtomicU64,
    /// Where the longest hold took the lock.
    longest_site: Mutex<Option<&'static std::panic::Location<'static>>>,
    over_10ms: AtomicU64,
}

/// The lock's hold times so far (see [`Fs::lock_holds`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockHoldStats {
    pub longest_us: u64,
    pub longest_site: String,
    pub over_10ms: u64,
}

/// The filesystem lock, held: measures how long on release.
pub(crate) struct FsGuard<'a> {
    guard: MutexGuard<'a, Inner>,
    _held: lock_order::Held,
    since: Instant,
    site: &'static std::panic::Location<'static>,
    holds: &'a LockHolds,
}

impl std::ops::Deref for FsGuard<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.guard
    }
}

impl std::ops::DerefMut for FsGuard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.guard
    }
}

impl Drop for FsGuard<'_> {
    fn drop(&mut self) {
        let us = self.since.elapsed().as_micros() as u64;
        if us >= 10_000 {
            self.holds.over_10ms.fetch_add(1, Ordering::Relaxed);
        }
        if us > self.holds.longest_us.fetch_max(us, Ordering::Relaxed) {
            *self
                .holds
                .longest_site
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(self.site);
        }
    }
}

/// An inode with its whole block map decoded.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub inode: Inode,
    /// The whole block map, sorted (empty for inline symlinks).
    pub extents: Vec<Extent>,
    /// Extent blocks currently holding the map past the inline records, in chain order.
    pub chain: Vec<u64>,
}

pub(crate) struct Inner {
    store: Arc<dyn BlockStore>,
    sb: Superblock,
    geo: Geometry,
    /// The codec of `sb.newest_layout()`: the layout new inodes get. An existing inode is
    /// written in its own layout; only a conversion step moves it to a newer one.
    codec: ExtentCodec,
    ibitmap: Bitmap,
    bbitmap: Bitmap,
    journal: JournalWriter,
    /// Blocks staged by the operation in progress.
    tx: BTreeMap<u64, Box<Block>>,
    /// Committed to the journal, not yet written in place.
    pinned: HashMap<u64, Arc<Block>>,
    clean: HashMap<u64, Arc<Block>>,
    nodes: HashMap<u32, Node>,
    dirty_nodes: HashSet<u32>,
    /// Freed by the transaction in progress.
    tx_free: Vec<(u64, u64)>,
    last_checkpoint: Instant,
    last_commit: Instant,
    /// Counts every change to the in-memory state (staged block, dirty inode, allocation,
    /// free): an operation that fails without moving it changed nothing.
    changes: u64,
    /// Held (shared) by reads that run outside the lock; freed blocks are released for
    /// reuse only when it can be taken exclusively.
    reuse: Arc<std::sync::RwLock<()>>,
    next_generation: u32,
    /// A failed write or flush: every later change is refused until remount.
    failed: Option<String>,
    /// Where each acknowledged operation's changes go before its reply, so that a
    /// successor can recover them if this process dies (absent in tools and tests).
    redo: Option<redo::RedoLog>,
    /// Blocks staged since the last operation was logged.
    op_staged: Vec<u64>,
    /// Checkpoints run by [`Fs::checkpoint_in_background`] (the server's), outside the
    /// lock; otherwise a commit that finds one due runs it under the lock (tools, tests).
    background_checkpoints: bool,
    /// A checkpoint is due (the journal is half full, or the interval has passed).
    checkpoint_due: bool,
    /// The in-place writes lock, held by whoever writes pinned blocks in place; its value
    /// is the checkpoint epoch, moved on by every journal reset and by a quiesce. A
    /// background checkpoint writes only while the epoch is still the one its snapshot
    /// was taken in: after a reset its images may be older than what is on disk, after a
    /// quiesce the journal is the successor's. Lock order: the filesystem lock, then this
    /// (see `lock_order`).
    in_place: Arc<Mutex<u64>>,
    /// Mounted read-only (`read_only.rs`): `failed` refuses every change from the start.
    read_only: bool,
    /// Inodes this mount moved to the orphan directory (their last name went), and when:
    /// the space they hold comes back when the kernel forgets them ([`Fs::release`]).
    orphaned: HashMap<u32, Instant>,
    /// An operation or a commit is half-way through its changes. Nothing may commit
    /// meanwhile: the journal would get half of them (a bitmap naming blocks of inodes
    /// whose new block maps are not in it, say).
    changing: bool,
}

impl Fs {
    /// Mounts the image: checks the superblock, replays the journal, frees orphans left by
    /// a crash, and marks the image mounted.
    pub fn mount(store: Arc<dyn BlockStore>) -> FsResult<Fs> {
        let fs = Fs::mount_keeping_orphans(store)?;
        fs.lock().free_orphans()?;
        Ok(fs)
    }

    /// Recovers the filesystem of a server that died while the kernel kept the mount:
    /// replays the journal, then commits what the dead server acknowledged but had not
    /// yet committed (its redo log), unless the journal already holds the transaction
    /// that carries those records (the server died between that commit and moving the
    /// log on: the records are older images of blocks the journal has newer ones of).
    /// Orphans stay: the kernel may still hold them open.
    /// Returns the filesystem, logging to `log` from now on, and the requests the dead
    /// server completed (a resent one must not run again).
    pub fn recover(
        store: Arc<dyn BlockStore>,
        mut log: redo::RedoLog,
    ) -> FsResult<(Fs, std::collections::HashSet<u64>)> {
        let recovered = log.recover();
        let mut b = vec![0u8; BLOCK_SIZE];
        store.read(0, &mut b)?;
        convert::recover_torn_superblock(store.as_ref(), &mut b)?;
        let geo = Superblock::decode(&b)?.geometry;
        let (_, next_seq) = journal::replay(store.as_ref(), &geo)?;
        let in_journal = recovered.covered_by.is_some_and(|tx| next_seq > tx);
        if !recovered.blocks.is_empty() && !in_journal {
            if let Some(bad) = recovered.blocks.keys().find(|&&a| a >= geo.total_blocks) {
                return Err(FsError::Corrupted(format!(
                    "redo log names block {bad}, outside the image"
                )));
            }
            // One journal transaction, so the recovered operations land all or none.
            let mut writer = JournalWriter::new(&geo, next_seq);
            if recovered.blocks.len() > writer.max_tx_blocks()
                || !writer.fits(recovered.blocks.len())
            {
                return Err(FsError::Corrupted(format!(
                    "redo log of {} blocks does not fit one journal transaction",
                    recovered.blocks.len()
                )));
            }
            writer.append(store.as_ref(), &recovered.blocks)?;
            store.flush()?;
            journal::replay(store.as_ref(), &geo)?;
        }
        let fs = Fs::mount_keeping_orphans(store)?;
        fs.attach_redo_log(log);
        Ok((fs, recovered.completed))
    }

    /// Starts logging every operation's changes to `log` before it is acknowledged.
    /// The log starts a new generation: it holds no record this filesystem has not
    /// committed.
    pub fn attach_redo_log(&self, mut log: redo::RedoLog) {
        let mut g = self.lock();
        g.op_staged.clear();
        log.reset(g.journal.next_sequence());
        g.redo = Some(log);
    }

    fn mount_keeping_orphans(store: Arc<dyn BlockStore>) -> FsResult<Fs> {
        let mut b = vec![0u8; BLOCK_SIZE];
        store.read(0, &mut b)?;
        convert::recover_torn_superblock(store.as_ref(), &mut b)?;
        let mut sb = decode_mountable_superblock(&b, store.as_ref())?;
        if sb.unknown_ro_compat() != 0 {
            return Err(FsError::Unsupported(
                "the image uses read-only-compatible features this version does not know; it cannot be mounted read-write",
            ));
        }
        if sb.state == FsState::Errors {
            return Err(FsError::Corrupted(
                "the image is marked as having errors".into(),
            ));
        }
        let geo = sb.geometry;
        let (_, next_seq) = journal::replay(store.as_ref(), &geo)?;
        // The log may have carried a newer superblock (a conversion step).
        convert::reread_superblock(store.as_ref(), &mut sb)?;
        let ibitmap = load_bitmap(
            store.as_ref(),
            BlockKind::InodeBitmap,
            geo.inode_bitmap_start,
            geo.inode_bitmap_blocks,
            geo.inode_count as u64 + 1,
        )?;
        let bbitmap = load_bitmap(
            store.as_ref(),
            BlockKind::BlockBitmap,
            geo.block_bitmap_start,
            geo.block_bitmap_blocks,
            geo.total_blocks,
        )?;
        let codec = formats::inode::codec_for(sb.newest_layout());
        let now = crate::mkfs::now();
        sb.state = FsState::Mounted;
        sb.mount_count = sb.mount_count.wrapping_add(1);
        sb.last_mount_sec = now.sec;
        store.write(0, &sb.encode()[..])?;
        store.flush()?;
        let inner = Inner {
            store,
            sb,
            geo,
            codec,
            ibitmap,
            bbitmap,
            journal: JournalWriter::new(&geo, next_seq),
            tx: BTreeMap::new(),
            pinned: HashMap::new(),
            clean: HashMap::new(),
            nodes: HashMap::new(),
            dirty_nodes: HashSet::new(),
            tx_free: Vec::new(),
            last_checkpoint: Instant::now(),
            last_commit: Instant::now(),
            changes: 0,
            reuse: Arc::new(std::sync::RwLock::new(())),
            next_generation: (now.nsec ^ now.sec as u32) | 1,
            failed: None,
            redo: None,
            op_staged: Vec::new(),
            background_checkpoints: false,
            checkpoint_due: false,
            in_place: Arc::new(Mutex::new(0)),
            read_only: false,
            orphaned: HashMap::new(),
            changing: false,
        };
        Ok(Fs {
            inner: Mutex::new(inner),
            holds: LockHolds::default(),
            releases: Releases::default(),
            flushes: Flushes::default(),
            inode_data: inode_data_locks(),
        })
    }

    /// Takes over an image from a predecessor that stopped (live update). Nothing is
    /// written: the journal is continued where the predecessor left it, its transactions
    /// not yet checkpointed become this filesystem's pinned blocks, and the blocks it had
    /// freed but not yet released stay withheld. Orphans stay: the kernel may hold them.
    pub fn adopt(store: Arc<dyn BlockStore>, withheld: &[(u64, u64)]) -> FsResult<Fs> {
        let mut b = vec![0u8; BLOCK_SIZE];
        store.read(0, &mut b)?;
        let sb = Superblock::decode(&b)?;
        let geo = sb.geometry;
        let log = journal::scan(store.as_ref(), &geo)?;
        let mut pinned: HashMap<u64, Arc<Block>> = HashMap::new();
        for tx in log.transactions {
            for (addr, bytes) in tx.blocks {
                let block: Box<Block> = bytes
                    .into_boxed_slice()
                    .try_into()
                    .map_err(|_| FsError::Corrupted("journal block of the wrong size".into()))?;
                pinned.insert(addr, Arc::from(block));
            }
        }
        let overlay = PinnedOverlay {
            store: store.as_ref(),
            pinned: &pinned,
        };
        let ibitmap = load_bitmap(
            &overlay,
            BlockKind::InodeBitmap,
            geo.inode_bitmap_start,
            geo.inode_bitmap_blocks,
            geo.inode_count as u64 + 1,
        )?;
        let mut bbitmap = load_bitmap(
            &overlay,
            BlockKind::BlockBitmap,
            geo.block_bitmap_start,
            geo.block_bitmap_blocks,
            geo.total_blocks,
        )?;
        for &(start, len) in withheld {
            if start
                .checked_add(len)
                .is_none_or(|end| end > geo.total_blocks)
            {
                return Err(FsError::Corrupted(format!(
                    "withheld blocks {start}+{len} out of range"
                )));
            }
            if !bbitmap.withhold(start, len) {
                return Err(FsError::Corrupted(format!(
                    "withheld blocks {start}+{len} are not free or are withheld twice"
                )));
            }
        }
        // A predecessor's uncheckpointed conversion step may hold a newer superblock.
        let sb = match pinned.get(&0) {
            Some(b) => Superblock::decode(&b[..])?,
            None => sb,
        };
        let now = crate::mkfs::now();
        let codec = formats::inode::codec_for(sb.newest_layout());
        let inner = Inner {
            store,
            sb,
            geo,
            codec,
            ibitmap,
            bbitmap,
            journal: JournalWriter::continuing(&geo, log.head, log.next_sequence),
            tx: BTreeMap::new(),
            pinned,
            clean: HashMap::new(),
            nodes: HashMap::new(),
            dirty_nodes: HashSet::new(),
            tx_free: Vec::new(),
            last_checkpoint: Instant::now(),
            last_commit: Instant::now(),
            changes: 0,
            reuse: Arc::new(std::sync::RwLock::new(())),
            next_generation: (now.nsec ^ now.sec as u32) | 1,
            failed: None,
            redo: None,
            op_staged: Vec::new(),
            background_checkpoints: false,
            checkpoint_due: false,
            in_place: Arc::new(Mutex::new(0)),
            read_only: false,
            orphaned: HashMap::new(),
            changing: false,
        };
        Ok(Fs {
            inner: Mutex::new(inner),
            holds: LockHolds::default(),
            releases: Releases::default(),
            flushes: Flushes::default(),
            inode_data: inode_data_locks(),
        })
    }

    /// Stops changing the image for a successor: every change is committed to the journal
    /// (written, not flushed: the successor reads through the same driver). Returns the
    /// blocks freed but not yet reusable, which the successor must keep withheld.
    pub fn quiesce(&self) -> FsResult<Vec<(u64, u64)>> {
        let mut g = self.lock();
        g.check_writable()?;
        // A background checkpoint still writing in place finishes its writes first, and
        // then writes nothing more: the successor owns the journal from here.
        g.next_checkpoint_epoch();
        if g.has_pending_changes() {
            g.commit()?;
        }
        Ok(g.bbitmap.withheld().to_vec())
    }

    /// From now on checkpoints are left to [`Fs::checkpoint_in_background`], which the
    /// caller runs regularly (the server's background thread); a commit runs one under
    /// the lock only when the journal has no room left.
    pub fn checkpoint_in_background_from_now(&self) {
        self.lock().background_checkpoints = true;
    }

    /// Runs a checkpoint if one is due, with the filesystem lock free while the pinned
    /// blocks are written in place: operations and commits go on meanwhile (new commits
    /// land in the journal's free space). The journal is retired only if no commit came
    /// in during the writes (or the few that did are written under the lock, a short
    /// final pass); otherwise the next round writes what they changed. `stop` is polled
    /// between batches: a checkpoint abandoned half-way leaves the journal as it was,
    /// which replay makes right. Returns whether the journal was retired.
    pub fn checkpoint_in_background(&self, stop: &dyn Fn() -> bool) -> FsResult<bool> {
        let (snapshot, store, in_place, epoch) = {
            let mut g = self.lock();
            if g.failed.is_some() || !g.checkpoint_due {
                return Ok(false);
            }
            g.checkpoint_due = false;
            let mut snapshot: Vec<(u64, Arc<Block>)> =
                g.pinned.iter().map(|(a, b)| (*a, b.clone())).collect();
            snapshot.sort_unstable_by_key(|(a, _)| *a);
            let epoch = g.checkpoint_epoch();
            (snapshot, g.store.clone(), g.in_place.clone(), epoch)
        };
        {
            let writes = lock_order::in_place(&in_place);
            if *writes != epoch {
                return Ok(false);
            }
            // The flush makes every transaction of the snapshot durable before any of
            // its blocks is written in place (the journal invariant).
            let written = store.flush().and_then(|()| {
                for part in snapshot.chunks(IN_PLACE_BATCH) {
                    if stop() {
                        return Ok(false);
                    }
                    write_in_place(store.as_ref(), part)?;
                }
                store.flush().map(|()| true)
            });
            drop(writes);
            match written {
                Ok(true) => {}
                Ok(false) => {
                    self.lock().checkpoint_due = true;
                    return Ok(false);
                }
                Err(e) => return self.lock().latch(Err(e)),
            }
        }
        let mut g = self.lock();
        if g.checkpoint_epoch() != epoch || g.failed.is_some() {
            return Ok(false);
        }
        // Blocks no commit changed meanwhile are now on disk as pinned: clean again.
        for (addr, block) in snapshot {
            if g.pinned.get(&addr).is_some_and(|p| Arc::ptr_eq(p, &block)) {
                g.pinned.remove(&addr);
                if g.clean.len() < CLEAN_CACHE_BLOCKS {
                    g.clean.insert(addr, block);
                }
            }
        }
        if g.pinned.is_empty() {
            // No commit came in: the unlocked pass's flush covered everything.
            let in_place = g.in_place.clone();
            g.retire_journal(&mut lock_order::in_place(&in_place))?;
        } else if g.pinned.len() <= FINAL_PASS_BLOCKS {
            g.checkpoint_pinned()?;
        } else {
            g.checkpoint_due = true;
            return Ok(false);
        }
        Ok(true)
    }

    /// Replaces the block store (reconnecting to the driver after a rolled-back update).
    pub fn replace_store(&self, store: Arc<dyn BlockStore>) {
        self.lock().store = store;
    }

    #[track_caller]
    pub(crate) fn lock(&self) -> FsGuard<'_> {
        let site = std::panic::Location::caller();
        let held = lock_order::waiting_for(lock_order::Rank::Filesystem);
        // A panic while holding the lock leaves a half-made transaction; refuse to go on.
        let guard = self.inner.lock().unwrap_or_else(|p| {
            let mut g = p.into_inner();
            g.failed
                .get_or_insert_with(|| "a previous operation panicked".into());
            g
        });
        FsGuard {
            guard,
            _held: held,
            since: Instant::now(),
            site,
            holds: &self.holds,
        }
    }

    /// The data lock of inode `ino` (see `lock_order`).
    pub(crate) fn inode_data(&self, ino: Ino) -> &std::sync::RwLock<()> {
        &self.inode_data[ino.0 as usize % INODE_DATA_STRIPES]
    }

    /// How long the filesystem lock has been held at a time, since mount.
    pub fn lock_holds(&self) -> LockHoldStats {
        LockHoldStats {
            longest_us: self.holds.longest_us.load(Ordering::Relaxed),
            longest_site: self
                .holds
                .longest_site
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .map_or_else(String::new, |l| format!("{}:{}", l.file(), l.line())),
            over_10ms: self.holds.over_10ms.load(Ordering::Relaxed),
        }
    }

    /// Makes everything durable and marks the image clean. Every later operation is
    /// refused: the filesystem is unmounted.
    pub fn unmount(&self) -> FsResult<()> {
        let mut g = self.lock();
        if g.read_only {
            // Nothing was changed, and the image stays exactly as it was found.
            g.failed = Some("the filesystem is unmounted".into());
            return Ok(());
        }
        g.check_writable()?;
        g.checkpoint()?;
        g.sb.state = FsState::Clean;
        g.sb.free_blocks = g.bbitmap.free();
        g.sb.free_inodes = g.ibitmap.free() as u32;
        let sb = g.sb.encode();
        let store = g.store.clone();
        let r = store.write(0, &sb[..]).and_then(|_| store.flush());
        g.latch(r)?;
        g.failed = Some("the filesystem is unmounted".into());
        Ok(())
    }

    /// Commits changes left in memory (times of overwritten files) once they are older
    /// than `age`. The server calls it periodically.
    pub fn commit_older_than(&self, age: std::time::Duration) -> FsResult<()> {
        let mut g = self.lock();
        if g.failed.is_none() && g.has_pending_changes() && g.last_commit.elapsed() >= age {
            g.commit()?;
        }
        Ok(())
    }

    /// Makes every completed operation durable (fsync/syncfs): commits what is pending
    /// under the lock, then flushes without it, so that other operations go on during the
    /// flush and concurrent syncs share one.
    pub fn sync(&self) -> FsResult<()> {
        let (store, ticket) = {
            let mut g = self.lock();
            if g.read_only {
                // Nothing is ever pending on a read-only mount.
                return Ok(());
            }
            g.check_writable()?;
            if g.has_pending_changes() {
                g.commit()?;
            }
            (g.store.clone(), self.flushes.ticket())
        };
        let flushed = self.flushes.flush_after(ticket, || store.flush());
        self.lock().latch(flushed)
    }
}

/// Blocks a node owns: data, the extent blocks its map needs in its layout, and its xattr
/// block. Derived from the map, so it is right before the node is encoded too.
pub(crate) fn block_count(n: &Node) -> u64 {
    let xattr = u64::from(n.inode.xattr_block != 0);
    if !n.inode.has_block_map() {
        return xattr;
    }
    let data: u64 = n.extents.iter().map(|e| e.len as u64).sum();
    data + chain_blocks(n.extents.len(), n.inode.codec()) + xattr
}

/// Extent blocks a map of `extents` records needs past the inline area, in `codec`.
pub(crate) fn chain_blocks(extents: usize, codec: ExtentCodec) -> u64 {
    extents
        .saturating_sub(codec.inline_capacity())
        .div_ceil(codec.records_per_block()) as u64
}

/// Decodes block 0 for a mount: a Molt superblock this version can read, of an image no
/// larger than the device.
pub(crate) fn decode_mountable_superblock(
    b: &[u8],
    store: &dyn BlockStore,
) -> FsResult<Superblock> {
    let sb = Superblock::decode(b).map_err(|e| match e {
        formats::FormatError::BadMagic { .. } => FsError::Invalid("not a Molt image"),
        formats::FormatError::UnsupportedVersion { .. }
        | formats::FormatError::UnsupportedFeatures { .. } => {
            FsError::Unsupported("the image needs a newer version of Molt")
        }
        other => FsError::Corrupted(format!("{other}")),
    })?;
    if sb.geometry.total_blocks > store.num_blocks() {
        return Err(FsError::Corrupted(format!(
            "superblock records {} blocks but the image has {}",
            sb.geometry.total_blocks,
            store.num_blocks()
        )));
    }
    Ok(sb)
}

/// Writes pinned blocks (sorted by address) in place, adjacent ones as one request, all
/// requests handed to the device together.
fn write_in_place(store: &dyn BlockStore, blocks: &[(u64, Arc<Block>)]) -> std::io::Result<()> {
    use std::borrow::Cow;
    // A lone block is written from its pinned copy; only runs are gathered into a buffer.
    let mut runs: Vec<(u64, Cow<'_, [u8]>)> = Vec::new();
    for (addr, block) in blocks {
        match runs.last_mut() {
            Some((start, buf))
                if *start + (buf.len() / BLOCK_SIZE) as u64 == *addr
                    && buf.len() < IN_PLACE_RUN * BLOCK_SIZE =>
            {
                buf.to_mut().extend_from_slice(&block[..]);
            }
            _ => runs.push((*addr, Cow::Borrowed(&block[..]))),
        }
    }
    let writes: Vec<(u64, &[u8])> = runs.iter().map(|(a, b)| (*a, &b[..])).collect();
    store.write_many(&writes)
}

/// Reads blocks through a predecessor's uncheckpointed journal transactions.
struct PinnedOverlay<'a> {
    store: &'a dyn BlockStore,
    pinned: &'a HashMap<u64, Arc<Block>>,
}

impl BlockStore for PinnedOverlay<'_> {
    fn num_blocks(&self) -> u64 {
        self.store.num_blocks()
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        match self.pinned.get(&addr) {
            Some(b) if buf.len() == BLOCK_SIZE => {
                buf.copy_from_slice(&b[..]);
                Ok(())
            }
            _ => self.store.read(addr, buf),
        }
    }
    fn write(&self, _addr: u64, _buf: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::other("read-only overlay"))
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, _addr: u64, _nblocks: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("read-only overlay"))
    }
}

fn load_bitmap(
    store: &dyn BlockStore,
    kind: BlockKind,
    start: u64,
    blocks: u32,
    items: u64,
) -> FsResult<Bitmap> {
    let mut bits = Vec::with_capacity(blocks as usize * PAYLOAD_SIZE);
    let mut b = vec![0u8; BLOCK_SIZE];
    for i in 0..blocks as u64 {
        store.read(start + i, &mut b)?;
        bits.extend_from_slice(formats::bitmap::decode(kind, &b, BlockAddr(start + i))?);
    }
    Ok(Bitmap::new(bits, items))
}

impl Inner {
    pub(crate) fn check_writable(&self) -> FsResult<()> {
        match &self.failed {
            Some(why) => Err(FsError::ReadOnly(why.clone())),
            None => Ok(()),
        }
    }

    fn latch<T>(&mut self, r: std::io::Result<T>) -> FsResult<T> {
        r.map_err(|e| {
            self.failed
                .get_or_insert_with(|| format!("image write failed: {e}"));
            FsError::Io(e)
        })
    }

    // ---- metadata blocks -------------------------------------------------------------

    /// The current contents of metadata block `addr` (staged, pinned, cached or on disk).
    pub(crate) fn read_meta(&mut self, addr: u64) -> FsResult<Arc<Block>> {
        if let Some(b) = self.tx.get(&addr) {
            return Ok(Arc::new(**b));
        }
        if let Some(b) = self.pinned.get(&addr) {
            return Ok(b.clone());
        }
        if let Some(b) = self.clean.get(&addr) {
            return Ok(b.clone());
        }
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        self.store.read(addr, &mut b[..])?;
        let b: Arc<Block> = Arc::from(b);
        if self.clean.len() >= CLEAN_CACHE_BLOCKS {
            self.clean.clear();
        }
        self.clean.insert(addr, b.clone());
        Ok(b)
    }

    pub(crate) fn stage(&mut self, addr: u64, block: Box<Block>) {
        self.changes += 1;
        // Block 0 only in a conversion step (`convert`).
        debug_assert!(addr < self.geo.total_blocks);
        if self.redo.is_some() {
            self.op_staged.push(addr);
        }
        self.tx.insert(addr, block);
    }

    // ---- inodes ----------------------------------------------------------------------

    pub(crate) fn node(&mut self, ino: Ino) -> FsResult<&mut Node> {
        if !self.geo.is_valid_ino(ino) {
            return Err(FsError::NotFound);
        }
        if !self.nodes.contains_key(&ino.0) {
            let node = self.load_node(ino)?;
            if self.nodes.len() > 65536 {
                let dirty = &self.dirty_nodes;
                self.nodes.retain(|k, _| dirty.contains(k));
            }
            self.nodes.insert(ino.0, node);
        }
        Ok(self.nodes.get_mut(&ino.0).expect("just inserted"))
    }

    fn load_node(&mut self, ino: Ino) -> FsResult<Node> {
        if !self.ibitmap.is_set(ino.0 as u64) {
            return Err(FsError::NotFound);
        }
        let (addr, off) = self.geo.inode_location(ino);
        let b = self.read_meta(addr.0)?;
        let inode = Inode::decode(ino, &b[off..off + INODE_SIZE], self.codec.version())?
            .filter(|i| i.mode != 0)
            .ok_or_else(|| FsError::Corrupted(format!("inode {} is allocated but empty", ino.0)))?;
        let mut extents = inode.inline_extents().to_vec();
        let mut chain = Vec::new();
        let mut next = inode.extent_block;
        while next != 0 {
            if chain.len() as u64 > self.geo.total_blocks
                || !self.geo.is_data_block(next)
                || chain.contains(&next)
            {
                return Err(FsError::Corrupted(format!(
                    "inode {}: bad extent chain",
                    ino.0
                )));
            }
            let b = self.read_meta(next)?;
            // The whole chain is in the inode's own layout.
            let (n, list) = inode.codec().decode_block(&b[..], ino, BlockAddr(next))?;
            chain.push(next);
            extents.extend(list);
            next = n;
        }
        if extents.len() != inode.extent_count as usize {
            return Err(FsError::Corrupted(format!(
                "inode {}: extent count mismatch",
                ino.0
            )));
        }
        Ok(Node {
            inode,
            extents,
            chain,
        })
    }

    pub(crate) fn mark_dirty(&mut self, ino: Ino) {
        self.changes += 1;
        self.dirty_nodes.insert(ino.0);
    }

    /// Writes the block map of a dirty node into its inode and extent chain, in the
    /// inode's own layout (which a conversion step may just have moved on).
    fn encode_node(&mut self, ino: Ino) -> FsResult<()> {
        let (extents, mut chain, has_map, codec) = {
            let n = self.nodes.get(&ino.0).expect("dirty node is cached");
            let has_map = n.inode.has_block_map();
            (n.extents.clone(), n.chain.clone(), has_map, n.inode.codec())
        };
        let per_block = codec.records_per_block();
        let inline = codec.inline_capacity();
        if has_map {
            let overflow = extents.len().saturating_sub(inline);
            let need = overflow.div_ceil(per_block);
            while chain.len() > need {
                let b = chain.pop().expect("non-empty");
                self.free_blocks_tx(b, 1);
            }
            while chain.len() < need {
                let goal = chain.last().copied().unwrap_or(self.geo.data_start);
                let (b, _) = self.alloc_blocks(goal, 1)?;
                chain.push(b);
            }
            for (i, addr) in chain.iter().enumerate() {
                let from = inline + i * per_block;
                let to = (from + per_block).min(extents.len());
                let next = chain.get(i + 1).copied().unwrap_or(0);
                let blk = codec.encode_block(ino, BlockAddr(*addr), next, &extents[from..to])?;
                self.stage(*addr, blk);
            }
        }
        let n = self.nodes.get_mut(&ino.0).expect("dirty node is cached");
        if has_map {
            n.inode.inline = InlineArea::Extents(extents[..extents.len().min(inline)].to_vec());
            n.inode.extent_count = extents.len() as u32;
            n.inode.extent_block = chain.first().copied().unwrap_or(0);
        }
        n.chain = chain;
        n.inode.blocks = block_count(n);
        let inode = n.inode.clone();
        let (addr, off) = self.geo.inode_location(ino);
        let mut blk = Box::new(*self.read_meta(addr.0)?);
        inode.encode(ino, &mut blk[off..off + INODE_SIZE])?;
        self.stage(addr.0, blk);
        Ok(())
    }

    // ---- allocation ------------------------------------------------------------------

    /// Allocates up to `want` contiguous blocks near `goal`: (start, len).
    pub(crate) fn alloc_blocks(&mut self, goal: u64, want: u64) -> FsResult<(u64, u64)> {
        self.changes += 1;
        let want = want.min(self.codec.max_len() as u64);
        let (start, len) = match self.bbitmap.find_run(goal, want) {
            Some(run) => run,
            None if self.bbitmap.has_withheld() => {
                self.release_freed()?;
                self.bbitmap.find_run(goal, want).ok_or(FsError::NoSpace)?
            }
            None => return Err(FsError::NoSpace),
        };
        for b in start..start + len {
            self.bbitmap.set(b, true);
        }
        Ok((start, len))
    }

    /// Whether `n` blocks can be allocated now, releasing withheld blocks if that helps.
    pub(crate) fn can_allocate(&mut self, n: u64) -> FsResult<bool> {
        if self.bbitmap.allocatable() < n && self.bbitmap.has_withheld() {
            self.release_freed()?;
        }
        Ok(self.bbitmap.allocatable() >= n)
    }

    /// Makes blocks freed by earlier transactions allocatable: they are reusable once their
    /// freeing is durable and written in place (a checkpoint). Between operations what is
    /// pending is committed first, so every free so far comes back; inside an operation
    /// or a commit (`changing`) only the frees already journaled do, since a commit now
    /// would journal half of its changes.
    fn release_freed(&mut self) -> FsResult<()> {
        if self.changing {
            self.checkpoint_pinned()?;
        } else {
            self.checkpoint()?;
        }
        // Reads outside the lock never wait for it, so this wait is bounded.
        let reuse = self.reuse.clone();
        let _quiet = lock_order::reuse_exclusive(&reuse);
        self.bbitmap.release();
        Ok(())
    }

    /// Before an operation that may allocate without counting its blocks first (a
    /// directory block, an xattr block): brings withheld blocks back while that is still
    /// a commit between operations, so that the operation does not run out half-way.
    pub(crate) fn keep_headroom(&mut self) -> FsResult<()> {
        if self.bbitmap.allocatable() < OPERATION_HEADROOM && self.bbitmap.has_withheld() {
            self.release_freed()?;
        }
        Ok(())
    }

    /// Frees blocks as part of the transaction in progress (allocatable after a flush).
    pub(crate) fn free_blocks_tx(&mut self, start: u64, len: u64) {
        self.changes += 1;
        self.tx_free.push((start, len));
        // Drop stale cached copies: the block may hold data next time it is used.
        for b in start..start + len {
            self.clean.remove(&b);
        }
    }

    pub(crate) fn alloc_ino(&mut self) -> FsResult<Ino> {
        self.changes += 1;
        let (i, _) = self
            .ibitmap
            .find_run(formats::superblock::FIRST_FREE_INO as u64, 1)
            .ok_or(FsError::NoInodes)?;
        self.ibitmap.set(i, true);
        Ok(Ino(i as u32))
    }

    pub(crate) fn next_generation(&mut self) -> u32 {
        self.next_generation = self.next_generation.wrapping_add(1);
        self.next_generation
    }

    /// Frees an inode and everything it owns (the caller removed every name of it).
    pub(crate) fn destroy_node(&mut self, ino: Ino) -> FsResult<()> {
        let node = self.node(ino)?.clone();
        for e in &node.extents {
            self.free_blocks_tx(e.physical, e.len as u64);
        }
        for b in &node.chain {
            self.free_blocks_tx(*b, 1);
        }
        if node.inode.xattr_block != 0 {
            self.free_blocks_tx(node.inode.xattr_block, 1);
        }
        let generation = node.inode.generation;
        let (addr, off) = self.geo.inode_location(ino);
        let mut blk = Box::new(*self.read_meta(addr.0)?);
        Inode::freed(generation).encode(ino, &mut blk[off..off + INODE_SIZE])?;
        self.stage(addr.0, blk);
        self.nodes.remove(&ino.0);
        self.dirty_nodes.remove(&ino.0);
        self.orphaned.remove(&ino.0);
        self.ibitmap.set(ino.0 as u64, false);
        self.changes += 1;
        Ok(())
    }

    // ---- transactions ----------------------------------------------------------------

    /// Commits if the changes gathered since the last commit are large enough that the next
    /// operations could overflow one transaction. Operations otherwise share a commit
    /// (group commit): the periodic flush, fsync, or the next checkpoint writes them.
    pub(crate) fn commit_if_due(&mut self) -> FsResult<()> {
        let pending = self.tx.len()
            + self.dirty_nodes.len() * 2
            + self.bbitmap.dirty_count()
            + self.ibitmap.dirty_count()
            + self.tx_free.len();
        if pending * 4 > self.journal.max_tx_blocks() {
            self.commit()?;
        }
        Ok(())
    }

    /// Commits the operation in progress to the journal. On failure the in-memory state
    /// may be ahead of the image, so the filesystem latches read-only.
    pub(crate) fn commit(&mut self) -> FsResult<()> {
        let r = self.commit_inner();
        if let Err(e) = &r {
            self.failed
                .get_or_insert_with(|| format!("commit failed: {e}"));
        }
        r
    }

    /// Releases the blocks the last checkpoint made reusable if no read outside the lock
    /// is running (one may still read them). Never waits.
    fn try_release(&mut self) {
        if self.bbitmap.has_releasable() {
            let reuse = self.reuse.clone();
            let quiet = reuse.try_write();
            if quiet.is_ok() {
                self.bbitmap.release();
            }
        }
    }

    /// Completes an operation that succeeded: logs its changes to the redo log (before
    /// the reply goes out), then commits if the transaction has grown large.
    pub(crate) fn op_done(&mut self) -> FsResult<()> {
        self.try_release();
        if self.redo.is_some() {
            self.prepare_tx()?;
            let mut addrs = std::mem::take(&mut self.op_staged);
            addrs.sort_unstable();
            addrs.dedup();
            let log = self.redo.as_mut().expect("checked above");
            if addrs.is_empty() {
                log.complete_current();
            } else if log.fits(addrs.len()) {
                let blocks: Vec<(u64, &Block)> = addrs
                    .iter()
                    .filter_map(|a| self.tx.get(a).map(|b| (*a, &**b)))
                    .collect();
                log.append(&blocks);
            } else {
                // The log is full: commit the transaction instead (it holds this
                // operation), which also empties the log.
                self.commit()?;
                if let Some(log) = self.redo.as_mut() {
                    log.complete_current();
                }
                return Ok(());
            }
        }
        self.commit_if_due()
    }

    /// Turns in-memory changes (dirty inodes, freed blocks, bitmaps) into staged blocks.
    fn prepare_tx(&mut self) -> FsResult<()> {
        // Encoding block maps may allocate extent blocks: no commit may run inside.
        let outer = std::mem::replace(&mut self.changing, true);
        let r = self.prepare_tx_inner();
        self.changing = outer;
        r
    }

    fn prepare_tx_inner(&mut self) -> FsResult<()> {
        let dirty: Vec<u32> = self.dirty_nodes.drain().collect();
        for ino in dirty {
            if self.nodes.contains_key(&ino) {
                self.encode_node(Ino(ino))?;
            }
        }
        // Blocks freed in this transaction go back to the bitmap now (so the bitmap blocks
        // are staged with it) but are withheld from allocation until durable.
        let freed = std::mem::take(&mut self.tx_free);
        for &(s, l) in &freed {
            self.bbitmap.free_withheld(s, l);
        }
        self.stage_bitmaps()
    }

    fn commit_inner(&mut self) -> FsResult<()> {
        self.check_writable()?;
        self.prepare_tx()?;
        if self.tx.is_empty() {
            return Ok(());
        }
        if self.tx.len() > self.journal.max_tx_blocks() {
            return Err(FsError::Corrupted(format!(
                "transaction of {} blocks exceeds the journal",
                self.tx.len()
            )));
        }
        if !self.journal.fits(self.tx.len()) {
            self.checkpoint_pinned()?;
        }
        let tx = std::mem::take(&mut self.tx);
        let store = self.store.clone();
        let r = self.journal.append(store.as_ref(), &tx);
        self.latch(r)?;
        // Written through the same driver a successor reads from: the log may forget.
        // (Killed before this, the successor finds this transaction in the journal and
        // replays none of the records it carries.)
        if let Some(log) = self.redo.as_mut() {
            log.reset(self.journal.next_sequence());
        }
        self.op_staged.clear();
        for (addr, b) in tx {
            self.clean.remove(&addr);
            self.pinned.insert(addr, Arc::from(b));
        }
        self.bbitmap.journaled();
        self.last_commit = Instant::now();
        if self.journal.used_fraction() > 0.5
            || self.last_checkpoint.elapsed().as_secs() >= CHECKPOINT_INTERVAL_SECS
        {
            if self.background_checkpoints {
                self.checkpoint_due = true;
            } else {
                self.checkpoint()?;
            }
        }
        Ok(())
    }

    fn stage_bitmaps(&mut self) -> FsResult<()> {
        for (kind, start) in [
            (BlockKind::InodeBitmap, self.geo.inode_bitmap_start),
            (BlockKind::BlockBitmap, self.geo.block_bitmap_start),
        ] {
            let dirty = if kind == BlockKind::InodeBitmap {
                self.ibitmap.take_dirty()
            } else {
                self.bbitmap.take_dirty()
            };
            for idx in dirty {
                let addr = start + idx;
                let payload = if kind == BlockKind::InodeBitmap {
                    self.ibitmap.block_payload(idx)
                } else {
                    self.bbitmap.block_payload(idx)
                };
                let blk = formats::bitmap::encode(kind, payload, BlockAddr(addr));
                self.stage(addr, blk);
            }
        }
        Ok(())
    }

    /// Writes every pinned block in place and retires the journal.
    pub(crate) fn checkpoint(&mut self) -> FsResult<()> {
        debug_assert!(!self.changing, "a commit inside an operation or a commit");
        if self.has_pending_changes() {
            self.commit()?;
        }
        self.checkpoint_pinned()
    }

    fn checkpoint_pinned(&mut self) -> FsResult<()> {
        // A background checkpoint's writes finish first, and it writes nothing after
        // these (the epoch moves on at the reset): its images of a block may be older.
        let in_place = self.in_place.clone();
        let mut writes = lock_order::in_place(&in_place);
        let store = self.store.clone();
        let r = store.flush();
        self.latch(r)?;
        let mut pinned: Vec<(u64, Arc<Block>)> = self.pinned.drain().collect();
        pinned.sort_unstable_by_key(|(a, _)| *a);
        let r = write_in_place(store.as_ref(), &pinned);
        self.latch(r)?;
        let r = store.flush();
        self.latch(r)?;
        for (addr, b) in pinned {
            if self.clean.len() < CLEAN_CACHE_BLOCKS {
                self.clean.insert(addr, b);
            }
        }
        self.retire_journal(&mut writes)
    }

    /// The checkpoint epoch (see `in_place`). Waits for a background checkpoint's
    /// writes, which only the background thread itself and checkpoints ever overlap.
    fn checkpoint_epoch(&self) -> u64 {
        *lock_order::in_place(&self.in_place)
    }

    /// Moves the checkpoint epoch on, once a background checkpoint's writes are done.
    fn next_checkpoint_epoch(&self) {
        *lock_order::in_place(&self.in_place) += 1;
    }

    /// Restarts the journal empty. Call only when every transaction in it is durable in
    /// place (nothing is pinned and a flush followed the last in-place write).
    fn retire_journal(&mut self, writes: &mut lock_order::InPlace<'_>) -> FsResult<()> {
        debug_assert!(self.pinned.is_empty());
        let store = self.store.clone();
        let geo = self.geo;
        let r = self.journal.reset(store.as_ref(), &geo);
        self.latch(r)?;
        **writes += 1;
        self.checkpoint_due = false;
        // Freed blocks become reusable only when no read started before now is running
        // (if one is, a later operation's end releases them: `op_done`); those freed by
        // changes not yet journaled stay withheld (`Bitmap::checkpointed`).
        self.bbitmap.checkpointed();
        self.try_release();
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Drops every transaction staged but not committed (after a failed operation).
    pub(crate) fn abort_tx(&mut self) {
        self.tx.clear();
    }

    /// Frees every inode left in the orphan directory by an earlier mount.
    fn free_orphans(&mut self) -> FsResult<()> {
        let entries = self.dir_list(ORPHAN_INO)?;
        for e in entries {
            self.dir_remove(ORPHAN_INO, &e.name)?;
            self.destroy_node(e.ino)?;
            self.commit()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod concurrency_tests;
#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod tests;
