//! Block maps and file data: mapping file blocks, reading, writing, truncating,
//! preallocating and punching holes.

use formats::block::{Ino, BLOCK_SIZE};
use formats::extent::Extent;

use super::{FsError, FsResult, Inner, Node};

const BS: u64 = BLOCK_SIZE as u64;
/// Largest file size: file block numbers are 32-bit in every format version.
pub(crate) const MAX_FILE_SIZE: u64 = (1u64 << 32) * BS;
/// Extents removed per transaction when shrinking a file, to bound transaction size.
const FREE_EXTENTS_PER_TX: usize = 128;

/// Index of the extent containing file block `fb`, or where one would be inserted.
pub(crate) fn find(exts: &[Extent], fb: u64) -> Result<usize, usize> {
    let i = exts.partition_point(|e| e.logical_end() <= fb);
    if i < exts.len() && exts[i].logical <= fb {
        Ok(i)
    } else {
        Err(i)
    }
}

fn mergeable(a: &Extent, b: &Extent, max_len: u32) -> bool {
    a.logical_end() == b.logical
        && a.physical_end() == b.physical
        && a.unwritten == b.unwritten
        && a.len as u64 + b.len as u64 <= max_len as u64
}

/// Inserts an extent over a hole, merging with its neighbours where possible.
pub(crate) fn insert(exts: &mut Vec<Extent>, e: Extent, max_len: u32) {
    let i = exts.partition_point(|x| x.logical < e.logical);
    debug_assert!(i == 0 || exts[i - 1].logical_end() <= e.logical);
    debug_assert!(i == exts.len() || e.logical_end() <= exts[i].logical);
    exts.insert(i, e);
    if i + 1 < exts.len() && mergeable(&exts[i], &exts[i + 1], max_len) {
        exts[i].len += exts[i + 1].len;
        exts.remove(i + 1);
    }
    if i > 0 && mergeable(&exts[i - 1], &exts[i], max_len) {
        exts[i - 1].len += exts[i].len;
        exts.remove(i);
    }
}

/// Removes the mapping of file blocks `[start, end)`; returns the physical runs freed.
pub(crate) fn remove_range(exts: &mut Vec<Extent>, start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut freed = Vec::new();
    let mut out = Vec::with_capacity(exts.len() + 1);
    for e in exts.drain(..) {
        if e.logical_end() <= start || e.logical >= end {
            out.push(e);
            continue;
        }
        let cut_from = e.logical.max(start);
        let cut_to = e.logical_end().min(end);
        if e.logical < cut_from {
            out.push(Extent {
                len: (cut_from - e.logical) as u32,
                ..e
            });
        }
        freed.push((e.physical + (cut_from - e.logical), cut_to - cut_from));
        if cut_to < e.logical_end() {
            let skip = cut_to - e.logical;
            out.push(Extent {
                logical: cut_to,
                physical: e.physical + skip,
                len: (e.len as u64 - skip) as u32,
                unwritten: e.unwritten,
            });
        }
    }
    *exts = out;
    freed
}

/// Marks file blocks `[start, end)` written where they are mapped unwritten. Only the
/// extents the range touches and their two neighbours (which the written pieces may
/// merge with) are rebuilt.
pub(crate) fn set_written(exts: &mut Vec<Extent>, start: u64, end: u64, max_len: u32) {
    let first = exts.partition_point(|e| e.logical_end() <= start);
    let last = exts.partition_point(|e| e.logical < end);
    if !exts[first..last.max(first)].iter().any(|e| e.unwritten) {
        return;
    }
    let lo = first.saturating_sub(1);
    let hi = (last + 1).min(exts.len());
    let mut out: Vec<Extent> = Vec::with_capacity(hi - lo + 2);
    for &e in &exts[lo..hi] {
        if !e.unwritten || e.logical_end() <= start || e.logical >= end {
            out.push(e);
            continue;
        }
        let a = e.logical.max(start);
        let b = e.logical_end().min(end);
        let piece = |from: u64, to: u64, unwritten: bool| Extent {
            logical: from,
            physical: e.physical + (from - e.logical),
            len: (to - from) as u32,
            unwritten,
        };
        if e.logical < a {
            out.push(piece(e.logical, a, true));
        }
        out.push(piece(a, b, false));
        if b < e.logical_end() {
            out.push(piece(b, e.logical_end(), true));
        }
    }
    // Re-merge neighbours that became alike.
    let mut merged: Vec<Extent> = Vec::with_capacity(out.len());
    for e in out {
        match merged.last_mut() {
            Some(last) if mergeable(last, &e, max_len) => last.len += e.len,
            _ => merged.push(e),
        }
    }
    exts.splice(lo..hi, merged);
}

/// One run of file blocks a planned write covers: where they are on the device, whether
/// their old contents show at partial edges (written blocks), and whether the write must
/// mark them written when it is published (new or unwritten blocks).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DataRun {
    pub fb: u64,
    pub n: u64,
    pub physical: u64,
    pub keeps_old: bool,
    pub publish: bool,
}

/// Puts a planned write's data on the device: whole blocks, the old contents kept at the
/// partial edges of written blocks and zeros at those of new ones, every run handed to
/// the device together. Runs without the filesystem lock.
pub(crate) fn write_data_runs(
    store: &dyn crate::store::BlockStore,
    runs: &[DataRun],
    offset: u64,
    data: &[u8],
) -> std::io::Result<()> {
    let end = offset + data.len() as u64;
    let mut bufs = Vec::with_capacity(runs.len());
    for r in runs {
        let mut buf = vec![0u8; (r.n * BS) as usize];
        let run_start = r.fb * BS;
        let run_end = (r.fb + r.n) * BS;
        let data_from = offset.max(run_start);
        let data_to = end.min(run_end);
        if r.keeps_old && data_from > run_start {
            store.read(r.physical, &mut buf[..BLOCK_SIZE])?;
        }
        if r.keeps_old && data_to < run_end && !(r.n == 1 && data_from > run_start) {
            let last = r.n - 1;
            let off = (last * BS) as usize;
            store.read(r.physical + last, &mut buf[off..off + BLOCK_SIZE])?;
        }
        buf[(data_from - run_start) as usize..(data_to - run_start) as usize]
            .copy_from_slice(&data[(data_from - offset) as usize..(data_to - offset) as usize]);
        bufs.push((r.physical, buf));
    }
    let writes: Vec<(u64, &[u8])> = bufs.iter().map(|(p, b)| (*p, &b[..])).collect();
    store.write_many(&writes)
}

/// The device reads that serve one file read.
#[derive(Debug, Default)]
pub(crate) struct ReadPlan {
    /// (offset in the block-aligned buffer, physical block, blocks)
    pub runs: Vec<(usize, u64, u64)>,
    pub buf_len: usize,
    /// Bytes to drop at the front (the read's offset within its first block).
    pub skip: usize,
    pub len: usize,
}

impl ReadPlan {
    pub(crate) fn execute(&self, store: &dyn crate::store::BlockStore) -> std::io::Result<Vec<u8>> {
        if self.len == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; self.buf_len];
        for &(off, physical, n) in &self.runs {
            store.read(physical, &mut buf[off..off + (n * BS) as usize])?;
        }
        buf.drain(..self.skip);
        buf.truncate(self.len);
        Ok(buf)
    }
}

/// Where file block `fb` lives: (physical, unwritten, blocks left in the extent), or the
/// number of blocks until the next mapped block (None = no more mappings).
pub(crate) enum Lookup {
    Mapped {
        physical: u64,
        unwritten: bool,
        run: u64,
    },
    Hole {
        run: Option<u64>,
    },
}

pub(crate) fn lookup(node: &Node, fb: u64) -> Lookup {
    match find(&node.extents, fb) {
        Ok(i) => {
            let e = &node.extents[i];
            Lookup::Mapped {
                physical: e.physical + (fb - e.logical),
                unwritten: e.unwritten,
                run: e.logical_end() - fb,
            }
        }
        Err(i) => Lookup::Hole {
            run: node.extents.get(i).map(|e| e.logical - fb),
        },
    }
}

impl Inner {
    fn goal_for(&self, node: &Node, fb: u64) -> u64 {
        match find(&node.extents, fb) {
            Ok(i) | Err(i) if i > 0 => {
                let prev = &node.extents[i - 1];
                prev.physical_end() + (fb - prev.logical_end().min(fb))
            }
            _ => self.geo.data_start + (node.inode.generation as u64 % 64) * 64,
        }
    }

    /// Maps a hole at file block `fb` of at most `want` blocks to new blocks, returning
    /// (physical, len). The new extent is `unwritten` when asked (fallocate).
    fn map_new(&mut self, ino: Ino, fb: u64, want: u64, unwritten: bool) -> FsResult<(u64, u64)> {
        let goal = {
            let node = self.node(ino)?;
            let node = node.clone();
            self.goal_for(&node, fb)
        };
        let (phys, len) = self.alloc_blocks(goal, want)?;
        let max_len = self.codec.max_len();
        let node = self.node(ino)?;
        insert(
            &mut node.extents,
            Extent {
                logical: fb,
                physical: phys,
                len: len as u32,
                unwritten,
            },
            max_len,
        );
        self.mark_dirty(ino);
        Ok((phys, len))
    }

    /// Physical block of file block `fb`, if mapped.
    pub(crate) fn fblock_addr(&mut self, ino: Ino, fb: u64) -> FsResult<Option<u64>> {
        let node = self.node(ino)?;
        Ok(match lookup(node, fb) {
            Lookup::Mapped { physical, .. } => Some(physical),
            Lookup::Hole { .. } => None,
        })
    }

    /// Maps file block `fb` (a hole) to a new block, for metadata files (directories).
    pub(crate) fn fblock_alloc(&mut self, ino: Ino, fb: u64) -> FsResult<u64> {
        Ok(self.map_new(ino, fb, 1, false)?.0)
    }

    pub(crate) fn fblock_free(&mut self, ino: Ino, fb: u64) -> FsResult<()> {
        let node = self.node(ino)?;
        let freed = remove_range(&mut node.extents, fb, fb + 1);
        self.mark_dirty(ino);
        for (s, l) in freed {
            self.free_blocks_tx(s, l);
        }
        Ok(())
    }

    /// Plans a read from the in-memory block map: which device runs fill which part of
    /// the buffer. Holes and unwritten extents stay zero.
    pub(crate) fn read_plan(&mut self, ino: Ino, offset: u64, size: u32) -> FsResult<ReadPlan> {
        let node = self.node(ino)?;
        if node.inode.is_dir() {
            return Err(FsError::IsDir);
        }
        let file_size = node.inode.size;
        if offset >= file_size || size == 0 {
            return Ok(ReadPlan::default());
        }
        let end = (offset + size as u64).min(file_size);
        let fb_start = offset / BS;
        let fb_end = end.div_ceil(BS);
        let mut runs = Vec::new();
        let mut fb = fb_start;
        while fb < fb_end {
            match lookup(node, fb) {
                Lookup::Mapped {
                    physical,
                    unwritten,
                    run,
                } => {
                    let n = run.min(fb_end - fb);
                    if !unwritten {
                        runs.push((((fb - fb_start) * BS) as usize, physical, n));
                    }
                    fb += n;
                }
                Lookup::Hole { run } => fb += run.unwrap_or(fb_end - fb).min(fb_end - fb),
            }
        }
        Ok(ReadPlan {
            runs,
            buf_len: ((fb_end - fb_start) * BS) as usize,
            skip: (offset - fb_start * BS) as usize,
            len: (end - offset) as usize,
        })
    }

    pub(crate) fn file_read(&mut self, ino: Ino, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let plan = self.read_plan(ino, offset, size)?;
        Ok(plan.execute(self.store.as_ref())?)
    }

    /// Where a block-aligned overwrite of `len` bytes at `offset` goes on the device —
    /// (from, to, physical): bytes `from..to` of the data to blocks from `physical` on —
    /// when every block it covers is allocated and written and it ends within the file.
    /// Such a write changes no metadata but the times. `None` for any other write.
    pub(crate) fn overwrite_plan(
        &mut self,
        ino: Ino,
        offset: u64,
        len: usize,
    ) -> FsResult<Option<Vec<(usize, usize, u64)>>> {
        let len = len as u64;
        if len == 0 || !offset.is_multiple_of(BS) || !len.is_multiple_of(BS) {
            return Ok(None);
        }
        let end = offset.checked_add(len).ok_or(FsError::TooBig)?;
        let node = self.node(ino)?;
        if !node.inode.is_reg() || end > node.inode.size {
            return Ok(None);
        }
        let (fb_start, fb_end) = (offset / BS, end / BS);
        let mut runs = Vec::new();
        let mut fb = fb_start;
        while fb < fb_end {
            match lookup(node, fb) {
                Lookup::Mapped {
                    physical,
                    unwritten: false,
                    run,
                } => {
                    let n = run.min(fb_end - fb);
                    let from = ((fb - fb_start) * BS) as usize;
                    runs.push((from, from + (n * BS) as usize, physical));
                    fb += n;
                }
                _ => return Ok(None),
            }
        }
        Ok(Some(runs))
    }

    /// The times after an overwrite planned by `overwrite_plan` reached the device: the
    /// size is left alone (another operation may have changed it meanwhile), and an
    /// inode gone meanwhile is not brought back.
    pub(crate) fn finish_overwrite(&mut self, ino: Ino, stamp_times: bool) {
        if !stamp_times {
            return;
        }
        let now = crate::mkfs::now();
        if let Some(node) = self.nodes.get_mut(&ino.0) {
            node.inode.mtime = now;
            node.inode.ctime = now;
            self.mark_dirty(ino);
        }
    }

    /// Writes `data` at `offset`, allocating as needed. Leaves metadata dirty for commit.
    /// `stamp_times` sets mtime and ctime to now.
    pub(crate) fn file_write(
        &mut self,
        ino: Ino,
        offset: u64,
        data: &[u8],
        stamp_times: bool,
    ) -> FsResult<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(FsError::TooBig)?;
        if end > MAX_FILE_SIZE {
            return Err(FsError::TooBig);
        }
        let fb_start = offset / BS;
        let fb_end = end.div_ceil(BS);
        let max_len = self.codec.max_len();
        let mut fb = fb_start;
        while fb < fb_end {
            let found = {
                let node = self.node(ino)?;
                lookup(node, fb)
            };
            let (physical, n, was_unwritten, fresh) = match found {
                Lookup::Mapped {
                    physical,
                    unwritten,
                    run,
                } => (physical, run.min(fb_end - fb), unwritten, false),
                Lookup::Hole { run } => {
                    let want = run.unwrap_or(fb_end - fb).min(fb_end - fb);
                    match self.map_new(ino, fb, want, false) {
                        Ok((p, n)) => (p, n, false, true),
                        // Out of space after some runs were written: the size covers
                        // what was written (no block is held past the end of the file)
                        // and the caller still gets the error. A short count would be
                        // taken as success by the kernel's writeback.
                        Err(FsError::NoSpace) if fb > fb_start => {
                            self.finish_write(ino, (fb * BS).min(end), stamp_times);
                            return Err(FsError::NoSpace);
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            // Build the full blocks of this run: existing contents at partial edges of
            // written blocks, zeros elsewhere, then the caller's bytes.
            let mut buf = vec![0u8; (n * BS) as usize];
            let run_start = fb * BS;
            let run_end = (fb + n) * BS;
            let data_from = offset.max(run_start);
            let data_to = end.min(run_end);
            let keeps_old = !fresh && !was_unwritten;
            if keeps_old && data_from > run_start {
                self.store.read(physical, &mut buf[..BLOCK_SIZE])?;
            }
            if keeps_old && data_to < run_end && !(n == 1 && data_from > run_start) {
                let last = n - 1;
                let off = (last * BS) as usize;
                self.store
                    .read(physical + last, &mut buf[off..off + BLOCK_SIZE])?;
            }
            buf[(data_from - run_start) as usize..(data_to - run_start) as usize]
                .copy_from_slice(&data[(data_from - offset) as usize..(data_to - offset) as usize]);
            let r = self.store.write(physical, &buf);
            self.latch(r)?;
            if was_unwritten {
                let node = self.node(ino)?;
                set_written(&mut node.extents, fb, fb + n, max_len);
                self.mark_dirty(ino);
            }
            fb += n;
        }
        self.finish_write(ino, end, stamp_times);
        Ok(data.len())
    }

    /// Blocks a write of `[offset, offset+len)` must allocate (the holes it covers).
    /// Plans a write of `len` bytes at `offset` whose data goes to the device outside the
    /// lock (the caller holds the inode's data lock exclusively). Holes get new blocks,
    /// mapped as unwritten: until the write is published they read as zeros, and a
    /// commit that carries them meanwhile leaves a valid file (preallocated blocks) that
    /// never shows another file's old data. On running out of space the blocks mapped
    /// here are unmapped again and nothing else changed.
    pub(crate) fn plan_data_write(
        &mut self,
        ino: Ino,
        offset: u64,
        len: u64,
    ) -> FsResult<Vec<DataRun>> {
        let end = offset.checked_add(len).ok_or(FsError::TooBig)?;
        let fb_end = end.div_ceil(BS);
        let mut runs: Vec<DataRun> = Vec::new();
        let mut fb = offset / BS;
        while fb < fb_end {
            let found = lookup(self.node(ino)?, fb);
            let run = match found {
                Lookup::Mapped {
                    physical,
                    unwritten,
                    run,
                } => DataRun {
                    fb,
                    n: run.min(fb_end - fb),
                    physical,
                    keeps_old: !unwritten,
                    publish: unwritten,
                },
                Lookup::Hole { run } => {
                    let want = run.unwrap_or(fb_end - fb).min(fb_end - fb);
                    match self.map_new(ino, fb, want, true) {
                        Ok((physical, n)) => DataRun {
                            fb,
                            n,
                            physical,
                            keeps_old: false,
                            publish: true,
                        },
                        Err(e) => {
                            for r in runs.iter().filter(|r| r.publish && !r.keeps_old) {
                                self.unmap_new(ino, r.fb, r.fb + r.n)?;
                            }
                            return Err(e);
                        }
                    }
                }
            };
            fb += run.n;
            runs.push(run);
        }
        Ok(runs)
    }

    /// Unmaps blocks `plan_data_write` mapped for a write that does not happen.
    fn unmap_new(&mut self, ino: Ino, start: u64, end: u64) -> FsResult<()> {
        let node = self.node(ino)?;
        let freed = remove_range(&mut node.extents, start, end);
        self.mark_dirty(ino);
        for (s, l) in freed {
            self.free_blocks_tx(s, l);
        }
        Ok(())
    }

    /// Publishes a write planned by `plan_data_write` once its data is on the device:
    /// its new and unwritten blocks become written, the size and times follow.
    pub(crate) fn publish_data_write(
        &mut self,
        ino: Ino,
        runs: &[DataRun],
        end: u64,
        stamp_times: bool,
    ) -> FsResult<()> {
        let max_len = self.codec.max_len();
        let node = self.node(ino)?;
        for r in runs.iter().filter(|r| r.publish) {
            set_written(&mut node.extents, r.fb, r.fb + r.n, max_len);
        }
        self.finish_write(ino, end, stamp_times);
        Ok(())
    }

    pub(crate) fn blocks_to_allocate(&mut self, ino: Ino, offset: u64, len: u64) -> FsResult<u64> {
        let end = offset.saturating_add(len);
        let fb_end = end.div_ceil(BS);
        let mut fb = offset / BS;
        let mut holes = 0;
        let node = self.node(ino)?;
        while fb < fb_end {
            match lookup(node, fb) {
                Lookup::Mapped { run, .. } => fb += run.min(fb_end - fb),
                Lookup::Hole { run } => {
                    let n = run.unwrap_or(fb_end - fb).min(fb_end - fb);
                    holes += n;
                    fb += n;
                }
            }
        }
        Ok(holes)
    }

    /// Size and times after a write that reached byte `end`.
    fn finish_write(&mut self, ino: Ino, end: u64, stamp_times: bool) {
        let now = crate::mkfs::now();
        if let Some(node) = self.nodes.get_mut(&ino.0) {
            node.inode.size = node.inode.size.max(end);
            if stamp_times {
                node.inode.mtime = now;
                node.inode.ctime = now;
            }
        }
        self.mark_dirty(ino);
    }

    /// Zeroes bytes `[from, to)` inside one file block if it holds written data.
    fn zero_in_block(&mut self, ino: Ino, from: u64, to: u64) -> FsResult<()> {
        debug_assert!(from / BS == (to - 1) / BS);
        let found = {
            let node = self.node(ino)?;
            lookup(node, from / BS)
        };
        if let Lookup::Mapped {
            physical,
            unwritten: false,
            ..
        } = found
        {
            let mut b = vec![0u8; BLOCK_SIZE];
            self.store.read(physical, &mut b)?;
            b[(from % BS) as usize..((to - 1) % BS + 1) as usize].fill(0);
            let r = self.store.write(physical, &b);
            self.latch(r)?;
        }
        Ok(())
    }

    /// Unmaps whole file blocks `[start, end)`, committing in bounded steps.
    fn unmap_blocks(&mut self, ino: Ino, start: u64, end: u64) -> FsResult<()> {
        loop {
            let node = self.node(ino)?;
            let first = node.extents.partition_point(|e| e.logical_end() <= start);
            let last = node.extents.partition_point(|e| e.logical < end);
            if first >= last {
                return Ok(());
            }
            // Remove from the end backwards, a bounded number of extents per transaction.
            let from_idx = last.saturating_sub(FREE_EXTENTS_PER_TX).max(first);
            let cut_start = node.extents[from_idx].logical.max(start);
            let freed = remove_range(&mut node.extents, cut_start, end);
            self.mark_dirty(ino);
            for (s, l) in freed {
                self.free_blocks_tx(s, l);
            }
            if from_idx > first {
                self.commit()?;
            } else {
                return Ok(());
            }
        }
    }

    /// Sets the size, freeing blocks past a smaller end and zeroing the tail of the new
    /// last block so that growing the file again reads zeros.
    pub(crate) fn truncate(&mut self, ino: Ino, new_size: u64) -> FsResult<()> {
        if new_size > MAX_FILE_SIZE {
            return Err(FsError::TooBig);
        }
        let old = self.node(ino)?.inode.size;
        if new_size < old && !new_size.is_multiple_of(BS) {
            self.zero_in_block(ino, new_size, (new_size / BS + 1) * BS)?;
        }
        // Blocks past the new end are freed even when growing: preallocation past EOF
        // (fallocate KEEP_SIZE) does not survive a truncate.
        self.unmap_blocks(ino, new_size.div_ceil(BS), u32::MAX as u64 + 1)?;
        let now = crate::mkfs::now();
        let node = self.node(ino)?;
        node.inode.size = new_size;
        node.inode.mtime = now;
        node.inode.ctime = now;
        self.mark_dirty(ino);
        Ok(())
    }

    /// Preallocates `[offset, offset+len)` as unwritten extents.
    pub(crate) fn preallocate(
        &mut self,
        ino: Ino,
        offset: u64,
        len: u64,
        keep_size: bool,
    ) -> FsResult<()> {
        let end = offset.checked_add(len).ok_or(FsError::TooBig)?;
        if end > MAX_FILE_SIZE {
            return Err(FsError::TooBig);
        }
        let fb_end = end.div_ceil(BS);
        let mut fb = offset / BS;
        while fb < fb_end {
            let found = {
                let node = self.node(ino)?;
                lookup(node, fb)
            };
            match found {
                Lookup::Mapped { run, .. } => fb += run.min(fb_end - fb),
                Lookup::Hole { run } => {
                    let want = run.unwrap_or(fb_end - fb).min(fb_end - fb);
                    let (_, n) = self.map_new(ino, fb, want, true)?;
                    fb += n;
                    if self.tx_large() {
                        self.commit()?;
                    }
                }
            }
        }
        let now = crate::mkfs::now();
        let node = self.node(ino)?;
        if !keep_size && end > node.inode.size {
            node.inode.size = end;
        }
        node.inode.ctime = now;
        self.mark_dirty(ino);
        Ok(())
    }

    /// Deallocates `[offset, offset+len)`: whole blocks are unmapped, partial edges zeroed.
    pub(crate) fn punch_hole(&mut self, ino: Ino, offset: u64, len: u64) -> FsResult<()> {
        let size = self.node(ino)?.inode.size;
        let end = offset.saturating_add(len).min(size.max(offset));
        if end <= offset {
            return Ok(());
        }
        let first_full = offset.div_ceil(BS);
        let last_full = end / BS;
        if first_full > last_full {
            self.zero_in_block(ino, offset, end)?;
        } else {
            if !offset.is_multiple_of(BS) {
                self.zero_in_block(ino, offset, first_full * BS)?;
            }
            if end % BS != 0 {
                self.zero_in_block(ino, last_full * BS, end)?;
            }
            self.unmap_blocks(ino, first_full, last_full)?;
        }
        let now = crate::mkfs::now();
        let node = self.node(ino)?;
        node.inode.mtime = now;
        node.inode.ctime = now;
        self.mark_dirty(ino);
        Ok(())
    }

    fn tx_large(&self) -> bool {
        self.tx.len() + self.dirty_nodes.len() * 2 > 64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(l: u64, p: u64, n: u32) -> Extent {
        Extent {
            logical: l,
            physical: p,
            len: n,
            unwritten: false,
        }
    }

    #[test]
    fn insert_merges_and_remove_splits() {
        let mut v = vec![];
        insert(&mut v, e(0, 100, 2), 65535);
        insert(&mut v, e(2, 102, 3), 65535);
        assert_eq!(v, vec![e(0, 100, 5)]);
        insert(&mut v, e(10, 200, 1), 65535);
        let freed = remove_range(&mut v, 1, 3);
        assert_eq!(freed, vec![(101, 2)]);
        assert_eq!(v, vec![e(0, 100, 1), e(3, 103, 2), e(10, 200, 1)]);
        assert_eq!(find(&v, 3), Ok(1));
        assert_eq!(find(&v, 5), Err(2));
    }

    #[test]
    fn set_written_splits_unwritten() {
        let mut v = vec![Extent {
            logical: 0,
            physical: 50,
            len: 10,
            unwritten: true,
        }];
        set_written(&mut v, 3, 5, 65535);
        assert_eq!(v.len(), 3);
        assert!(v[0].unwritten && !v[1].unwritten && v[2].unwritten);
        assert_eq!((v[1].logical, v[1].physical, v[1].len), (3, 53, 2));
        set_written(&mut v, 0, 10, 65535);
        assert_eq!(v, vec![e(0, 50, 10)]);
    }

    /// Random block maps of written and unwritten extents, random ranges marked written:
    /// every block keeps its place, blocks in the range become written, the rest keep
    /// their state, and the map stays sorted, disjoint and within `max_len`.
    #[test]
    fn set_written_agrees_with_a_block_by_block_model() {
        let max_len = 16;
        let mut rng = crate::fs::crash_tests::Rng(0x2545_F491_4F6C_DD1Du64);
        let mut rand = |k: u64| rng.below(k);
        let blocks = |v: &[Extent]| -> std::collections::BTreeMap<u64, (u64, bool)> {
            v.iter()
                .flat_map(|e| {
                    (0..e.len as u64).map(move |k| (e.logical + k, (e.physical + k, e.unwritten)))
                })
                .collect()
        };
        for _ in 0..2000 {
            let mut v = Vec::new();
            let (mut logical, mut physical) = (rand(4), 1000);
            for _ in 0..rand(12) {
                let len = 1 + rand(max_len as u64);
                v.push(Extent {
                    logical,
                    physical,
                    len: len as u32,
                    unwritten: rand(3) != 0,
                });
                logical += len + rand(3);
                physical += len + rand(2) * 7;
            }
            let before = blocks(&v);
            let start = rand(logical + 4);
            let end = start + 1 + rand(30);
            set_written(&mut v, start, end, max_len);
            let mut want = before.clone();
            for (b, (_, unwritten)) in want.iter_mut() {
                if (start..end).contains(b) {
                    *unwritten = false;
                }
            }
            assert_eq!(blocks(&v), want, "[{start}, {end}) of {v:?}");
            for w in v.windows(2) {
                assert!(w[0].logical_end() <= w[1].logical, "{v:?}");
            }
            assert!(v.iter().all(|e| e.len >= 1 && e.len <= max_len), "{v:?}");
        }
    }
}
