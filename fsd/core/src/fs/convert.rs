//! Online format conversion (`docs/format.md`, "Format conversion"): moves a mounted image
//! to a newer format version a batch of inodes at a time, while operations go on.
//!
//! Invariants, kept by every journal transaction:
//! * every live inode numbered below `conversion_cursor` has the target's layout; one at
//!   or past it has the old layout or the target's. Only a batch moves an existing inode
//!   to the target's layout (`encode_node` writes each inode in its own); an inode made
//!   during the conversion gets the target's layout from the start. So an operation never
//!   needs extent blocks a conversion step has not checked there is room for;
//! * the superblock's conversion fields change only in a journal transaction, together
//!   with the inodes a batch converts, so a crash leaves the image at a step boundary and
//!   the next mount resumes from the recorded cursor.
//!
//! A batch holds the filesystem lock for a bounded number of inodes and journal blocks,
//! so the stall an operation sees does not grow with the image.

use formats::block::{BlockAddr, Ino, BLOCK_SIZE};
use formats::extent::ExtentCodec;
use formats::inode::{Inode, INODE_SIZE};
use formats::journal::JournalSuper;
use formats::superblock::{Geometry, Superblock};
use formats::version::FormatVersion;
use formats::FormatError;

use super::{chain_blocks, journal, Fs, FsError, FsResult, Inner};
use crate::store::BlockStore;

/// Inode slots a step looks at, at most (free ones cost a bitmap test each).
const MAX_SLOTS_PER_STEP: u64 = 65536;
/// Free blocks a conversion leaves beyond what it allocates, so that operations running
/// alongside keep the reserve a file creation needs.
pub(crate) const HEADROOM_BLOCKS: u64 = 16;

/// Where a conversion stands after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Inode numbers the conversion has gone past (`conversion_cursor − 1`; all of them
    /// once finished).
    pub done_inodes: u64,
    /// Inode numbers of the image (`inode_count`).
    pub total_inodes: u64,
    /// Metadata this step rewrote in the new layout: inodes and their extent blocks.
    pub bytes_moved: u64,
    /// Inodes this step moved to the new layout.
    pub inodes_moved: u64,
    /// No conversion runs (any more): the image has the target version.
    pub finished: bool,
}

/// Moves `inode` to `layout` (never backwards). An inode that gains a creation time gets
/// its `ctime` as it is now: the real creation time is unknown.
fn upgrade_layout(inode: &mut Inode, layout: FormatVersion) {
    if inode.layout >= layout || inode.is_free() {
        return;
    }
    if layout.has_crtime() && inode.crtime.is_none() {
        inode.crtime = Some(inode.ctime);
    }
    inode.layout = layout;
}

/// After journal replay: takes the superblock replay may have rewritten.
pub(super) fn reread_superblock(store: &dyn BlockStore, sb: &mut Superblock) -> FsResult<()> {
    let mut b = vec![0u8; BLOCK_SIZE];
    store.read(0, &mut b)?;
    *sb = Superblock::decode(&b)?;
    Ok(())
}

/// Before anything else believes block 0 (in `b`): when it carries the magic but fails its
/// checksum, a checkpoint's in-place write of a journaled superblock may have been torn;
/// the journal then still holds the superblock's image, which `b` becomes (replay writes
/// it back).
pub(super) fn recover_torn_superblock(store: &dyn BlockStore, b: &mut [u8]) -> FsResult<()> {
    if !matches!(Superblock::decode(b), Err(FormatError::Checksum { .. })) {
        return Ok(());
    }
    if let Some(image) = journaled_superblock(store)? {
        b.copy_from_slice(&image);
    }
    Ok(())
}

/// The newest image of block 0 among the complete transactions of the journal, if one
/// decodes. The journal starts at block 1 in every version and its superblock gives its
/// size, so this needs nothing from block 0.
pub(crate) fn journaled_superblock(store: &dyn BlockStore) -> std::io::Result<Option<Vec<u8>>> {
    let start = 1u64;
    if store.num_blocks() <= start {
        return Ok(None);
    }
    let mut b = vec![0u8; BLOCK_SIZE];
    store.read(start, &mut b)?;
    let Ok(jsb) = JournalSuper::decode_allowing_torn_reset(&b, BlockAddr(start)) else {
        return Ok(None);
    };
    if start + jsb.blocks as u64 > store.num_blocks() || jsb.blocks < 3 {
        return Ok(None);
    }
    // Only the journal's place matters to the scan; targets are checked against the device.
    let geo = Geometry {
        total_blocks: store.num_blocks(),
        inode_count: 0,
        journal_start: start,
        journal_blocks: jsb.blocks,
        inode_bitmap_start: 0,
        inode_bitmap_blocks: 0,
        block_bitmap_start: 0,
        block_bitmap_blocks: 0,
        inode_table_start: 0,
        inode_table_blocks: 0,
        data_start: 0,
    };
    let log = match journal::scan(store, &geo) {
        Ok(log) => log,
        Err(journal::JournalError::Io(e)) => return Err(e),
        Err(_) => return Ok(None),
    };
    let newest = log
        .transactions
        .into_iter()
        .flat_map(|t| t.blocks)
        .filter(|(addr, _)| *addr == 0)
        .map(|(_, image)| image)
        .next_back();
    Ok(newest.filter(|image| Superblock::decode(image).is_ok()))
}

impl Fs {
    /// The format version of the image (the old one while a conversion runs).
    pub fn format_version(&self) -> FormatVersion {
        self.lock().sb.format_version
    }

    /// The version a running conversion converts to. A conversion interrupted by a crash
    /// is still running after the next mount: keep calling `convert_step`.
    pub fn conversion_target(&self) -> Option<FormatVersion> {
        self.lock().sb.conversion_target
    }

    /// Starts converting the image to format `to`: records the target, the cursor and
    /// the `CONVERTING` feature in the superblock in one journal transaction. From then
    /// on new inodes get `to`'s layout; `convert_step` moves the existing ones. A no-op
    /// when that conversion already runs or the image already has version `to`.
    pub fn start_conversion(&self, to: FormatVersion) -> FsResult<()> {
        if !to.is_supported() {
            return Err(FsError::Unsupported(
                "this build cannot convert to that format version",
            ));
        }
        let mut g = self.lock();
        g.check_writable()?;
        match g.sb.conversion_target {
            Some(t) if t == to => return Ok(()),
            Some(_) => {
                return Err(FsError::Invalid(
                    "a conversion to another format version is in progress",
                ))
            }
            None if to == g.sb.format_version => return Ok(()),
            None if to < g.sb.format_version => {
                return Err(FsError::Invalid(
                    "an image cannot be converted to an older format version",
                ))
            }
            None => {}
        }
        let from = g.sb.format_version;
        g.sb.conversion_target = Some(to);
        g.sb.conversion_cursor = 1;
        g.sb.incompat = Superblock::incompat_for(from, Some(to));
        g.codec = ExtentCodec::for_version(to);
        let sb = g.sb.encode();
        g.stage(0, sb);
        g.commit()
    }

    /// Converts the next batch of at most `max_inodes` live inodes (and as many as one
    /// journal transaction holds) and advances the cursor, in one journal transaction;
    /// the batch that reaches the last inode also finishes the conversion (version bumped,
    /// `CONVERTING` cleared). Holds the filesystem lock for that batch only.
    pub fn convert_step(&self, max_inodes: u64) -> FsResult<Progress> {
        let mut g = self.lock();
        g.check_writable()?;
        let total = g.geo.inode_count as u64;
        let Some(target) = g.sb.conversion_target else {
            return Ok(Progress {
                done_inodes: total,
                total_inodes: total,
                bytes_moved: 0,
                inodes_moved: 0,
                finished: true,
            });
        };
        // The batch gets a transaction of its own to fill.
        if g.has_pending_changes() {
            g.commit()?;
        }
        let before = g.changes;
        match g.convert_batch(target, max_inodes.max(1)) {
            Ok(p) => {
                g.commit()?;
                Ok(p)
            }
            Err(e) if g.changes == before => Err(e),
            Err(e) => {
                g.abort_tx();
                g.failed
                    .get_or_insert_with(|| format!("conversion step failed half-way: {e}"));
                Err(e)
            }
        }
    }

    /// Bytes of free space a conversion to `to` needs: the extent blocks the narrower v3
    /// extent blocks add to the maps of inodes not yet in `to`'s layout, plus
    /// `HEADROOM_BLOCKS`. 0 when the image has version `to` already.
    pub fn conversion_space_needed(&self, to: FormatVersion) -> FsResult<u64> {
        let (table_blocks, table_start, from) = {
            let g = self.lock();
            (
                g.geo.inode_table_blocks as u64,
                g.geo.inode_table_start,
                g.sb.format_version,
            )
        };
        if to <= from {
            return Ok(0);
        }
        let codec = ExtentCodec::for_version(to);
        let per_block = formats::superblock::INODES_PER_BLOCK;
        let mut blocks = HEADROOM_BLOCKS;
        // One inode-table block per lock: the estimate need not be atomic.
        for t in 0..table_blocks {
            let mut g = self.lock();
            for slot in 0..per_block {
                let ino = t * per_block + slot;
                if ino == 0 || ino > g.geo.inode_count as u64 || !g.ibitmap.is_set(ino) {
                    continue;
                }
                let (layout, extents) = match g.nodes.get(&(ino as u32)) {
                    Some(n) => (
                        n.inode.layout,
                        n.inode.has_block_map().then_some(n.extents.len()),
                    ),
                    None => {
                        let b = g.read_meta(table_start + t)?;
                        let off = slot as usize * INODE_SIZE;
                        let newest = g.codec.version();
                        match Inode::decode(Ino(ino as u32), &b[off..off + INODE_SIZE], newest)? {
                            Some(i) if !i.is_free() => (
                                i.layout,
                                i.has_block_map().then_some(i.extent_count as usize),
                            ),
                            _ => continue,
                        }
                    }
                };
                if let (true, Some(n)) = (layout < to, extents) {
                    let now = chain_blocks(n, ExtentCodec::for_version(layout));
                    blocks += chain_blocks(n, codec).saturating_sub(now);
                }
            }
        }
        Ok(blocks * BLOCK_SIZE as u64)
    }
}

impl Inner {
    /// Converts inodes from the cursor on into `target`'s layout (marking them dirty, so
    /// the commit writes them) and stages the superblock with the new cursor, or with the
    /// conversion finished.
    fn convert_batch(&mut self, target: FormatVersion, max_inodes: u64) -> FsResult<Progress> {
        let total = self.geo.inode_count as u64;
        let codec = ExtentCodec::for_version(target);
        let max_tx = self.journal.max_tx_blocks() as u64;
        // Half a transaction: the commit adds bitmap blocks and dirty directories.
        let budget = (max_tx / 2).max(4);
        // The superblock and the bitmap blocks the batch touches.
        let mut used = 3u64;
        let mut cursor = self.sb.conversion_cursor.max(1);
        let (mut live, mut visited, mut bytes, mut moved) = (0u64, 0u64, 0u64, 0u64);
        while cursor <= total && live < max_inodes && visited < MAX_SLOTS_PER_STEP {
            visited += 1;
            if !self.ibitmap.is_set(cursor) {
                cursor += 1;
                continue;
            }
            live += 1;
            let ino = Ino(cursor as u32);
            let n = self.node(ino)?;
            if n.inode.layout < target {
                let new_chain = if n.inode.has_block_map() {
                    chain_blocks(n.extents.len(), codec)
                } else {
                    0
                };
                let grow = new_chain.saturating_sub(n.chain.len() as u64);
                // The inode's table block, its whole new chain, a bitmap block.
                let cost = 1 + new_chain + u64::from(grow > 0);
                if bytes > 0 && used + cost > budget {
                    break;
                }
                if used + cost > max_tx {
                    return Err(FsError::Unsupported(
                        "an inode's block map is too large to convert in one journal transaction",
                    ));
                }
                if grow > 0 && !self.can_allocate(grow)? {
                    if bytes > 0 {
                        break;
                    }
                    return Err(FsError::NoSpace);
                }
                let n = self.node(ino)?;
                upgrade_layout(&mut n.inode, target);
                self.mark_dirty(ino);
                used += cost;
                bytes += INODE_SIZE as u64 + new_chain * BLOCK_SIZE as u64;
                moved += 1;
            }
            cursor += 1;
        }
        let finished = cursor > total;
        if finished {
            self.sb.format_version = target;
            self.sb.conversion_target = None;
            self.sb.conversion_cursor = 0;
            self.sb.incompat = Superblock::incompat_for(target, None);
        } else {
            self.sb.conversion_cursor = cursor;
        }
        let sb = self.sb.encode();
        self.stage(0, sb);
        Ok(Progress {
            done_inodes: cursor - 1,
            total_inodes: total,
            bytes_moved: bytes,
            inodes_moved: moved,
            finished,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use formats::inode::S_IFREG;
    use formats::superblock::ROOT_INO;

    use super::*;
    use crate::fs::crash_tests::{manifest, populated_v1};
    use crate::fs::{SetAttr, XattrFlags};
    use crate::fsck::{check, FsckOptions};
    use crate::mkfs::{mkfs, MkfsOptions};
    use crate::store::MemStore;

    fn mount(store: &Arc<MemStore>) -> Fs {
        Fs::mount(store.clone() as Arc<dyn BlockStore>).unwrap()
    }

    fn clean(store: &MemStore, when: &str) -> crate::fsck::FsckReport {
        let r = check(store, &FsckOptions::default()).unwrap();
        assert!(r.is_clean(), "{when}: {:#?}", r.problems);
        r
    }

    fn lookup(fs: &Fs, path: &str) -> Ino {
        let mut ino = ROOT_INO;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = fs.lookup(ino, part.as_bytes()).unwrap().ino;
        }
        ino
    }

    fn finish(fs: &Fs, to: FormatVersion, batch: u64) {
        fs.start_conversion(to).unwrap();
        while !fs.convert_step(batch).unwrap().finished {}
        assert_eq!((fs.format_version(), fs.conversion_target()), (to, None));
    }

    #[test]
    fn new_inodes_get_a_creation_time_that_stays() {
        let s = Arc::new(MemStore::new(4096));
        mkfs(s.as_ref(), "mem", &MkfsOptions::default()).unwrap();
        let fs = mount(&s);
        assert_eq!(fs.format_version(), FormatVersion::CURRENT);
        let root = fs.getattr(ROOT_INO).unwrap();
        assert!(root.crtime.is_some());
        let a = fs.mknod(ROOT_INO, b"f", S_IFREG | 0o644, 0, 0, 0).unwrap();
        assert_eq!(a.crtime, Some(a.ctime));
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = fs
            .setattr(
                a.ino,
                SetAttr {
                    mode: Some(0o600),
                    ..SetAttr::default()
                },
            )
            .unwrap();
        assert_ne!(b.ctime, a.ctime);
        assert_eq!(b.crtime, a.crtime);
        fs.unmount().unwrap();
        let fs = mount(&s);
        assert_eq!(fs.getattr(a.ino).unwrap().crtime, a.crtime);
    }

    #[test]
    fn v1_to_v2_gives_inodes_their_ctime_and_checks_clean_half_way() {
        let s = populated_v1(4096);
        let fs = mount(&s);
        let before = manifest(&fs);
        let hello = lookup(&fs, "/a/hello");
        let old = fs.getattr(hello).unwrap();
        assert_eq!(old.crtime, None);
        fs.start_conversion(FormatVersion::V2).unwrap();
        assert_eq!(fs.conversion_target(), Some(FormatVersion::V2));
        let mut p = fs.convert_step(4).unwrap();
        for _ in 0..4 {
            p = fs.convert_step(4).unwrap();
        }
        assert!(!p.finished && p.done_inodes > 10, "{p:?}");
        // A half-converted image is consistent, and says where the conversion stands.
        fs.sync().unwrap();
        let r = clean(s.as_ref(), "half-converted");
        assert!(
            r.notes
                .iter()
                .any(|n| n.contains("conversion from format v1 to v2")),
            "{:?}",
            r.notes
        );
        // A file made during the conversion has the new layout and its own crtime.
        let made = fs.mknod(ROOT_INO, b"new", S_IFREG, 0, 0, 0).unwrap();
        assert_eq!(made.crtime, Some(made.ctime));
        while !fs.convert_step(4).unwrap().finished {}
        assert_eq!(fs.format_version(), FormatVersion::V2);
        let now = fs.getattr(hello).unwrap();
        assert_eq!(now.crtime, Some(old.ctime));
        assert_eq!(now.ctime, old.ctime);
        fs.unlink(ROOT_INO, b"new").unwrap();
        fs.release(made.ino).unwrap();
        assert_eq!(manifest(&fs), before);
        fs.unmount().unwrap();
        clean(s.as_ref(), "v2");
        let fs = mount(&s);
        assert_eq!(fs.getattr(hello).unwrap().crtime, Some(old.ctime));
    }

    #[test]
    fn v3_rewrites_block_maps_with_the_space_it_said_it_needs() {
        let s = populated_v1(4096);
        let fs = mount(&s);
        let before = manifest(&fs);
        let big = lookup(&fs, "/a/b/c/frag1000");
        let blocks = fs.getattr(big).unwrap().blocks;
        let free = fs.statfs().free_blocks;
        // frag1000 is the one map that needs another extent block: 3 of 339 records
        // in v1, 4 of 254 in v3.
        let needed = fs.conversion_space_needed(FormatVersion::V3).unwrap();
        assert_eq!(needed, (1 + HEADROOM_BLOCKS) * BLOCK_SIZE as u64);
        assert_eq!(fs.conversion_space_needed(FormatVersion::V1).unwrap(), 0);
        finish(&fs, FormatVersion::V3, 7);
        assert_eq!(fs.conversion_space_needed(FormatVersion::V3).unwrap(), 0);
        assert_eq!(fs.statfs().free_blocks, free - 1);
        assert_eq!(fs.getattr(big).unwrap().blocks, blocks + 8);
        assert_eq!(manifest(&fs), before);
        fs.unmount().unwrap();
        clean(s.as_ref(), "v3");
    }

    #[test]
    fn operations_go_on_during_a_conversion() {
        let s = populated_v1(4096);
        let fs = mount(&s);
        fs.start_conversion(FormatVersion::V3).unwrap();
        for _ in 0..5 {
            fs.convert_step(3).unwrap();
        }
        // Change files on both sides of the cursor, make and remove some.
        let frag40 = lookup(&fs, "/a/b/c/frag40");
        fs.write(frag40, 200 * BLOCK_SIZE as u64, b"appended")
            .unwrap();
        let small = lookup(&fs, "/a/b/c/small");
        fs.setxattr(small, b"user.k", b"v", XattrFlags::default())
            .unwrap();
        let d = fs.mkdir(ROOT_INO, b"during", 0o755, 0, 0).unwrap().ino;
        let f = fs.mknod(d, b"f", S_IFREG | 0o644, 0, 0, 0).unwrap().ino;
        fs.write(f, 0, b"made during the conversion").unwrap();
        let many = lookup(&fs, "/many");
        let f3 = fs.unlink(many, b"f3").unwrap();
        fs.release(f3).unwrap();
        fs.sync().unwrap();
        clean(s.as_ref(), "operations during the conversion");
        let before = manifest(&fs);
        while !fs.convert_step(3).unwrap().finished {}
        assert_eq!(manifest(&fs), before);
        let back = fs.read(frag40, 200 * BLOCK_SIZE as u64, 100).unwrap();
        assert_eq!(back, b"appended");
        fs.unmount().unwrap();
        clean(s.as_ref(), "converted");
    }

    #[test]
    fn conversions_that_make_no_sense_are_refused() {
        let s = populated_v1(4096);
        let fs = mount(&s);
        // Nothing to do without a conversion.
        assert!(fs.convert_step(10).unwrap().finished);
        // Converting to the version the image has changes nothing.
        fs.start_conversion(FormatVersion::V1).unwrap();
        assert_eq!(fs.conversion_target(), None);
        assert!(matches!(
            fs.start_conversion(FormatVersion(9)),
            Err(FsError::Unsupported(_))
        ));
        fs.start_conversion(FormatVersion::V2).unwrap();
        fs.start_conversion(FormatVersion::V2).unwrap();
        assert!(matches!(
            fs.start_conversion(FormatVersion::V3),
            Err(FsError::Invalid(_))
        ));
        while !fs.convert_step(100).unwrap().finished {}
        assert!(matches!(
            fs.start_conversion(FormatVersion::V1),
            Err(FsError::Invalid(_))
        ));
        // None of this latched the filesystem.
        fs.mknod(ROOT_INO, b"still", S_IFREG, 0, 0, 0).unwrap();
        fs.unmount().unwrap();
    }

    #[test]
    fn an_interrupted_conversion_resumes_after_mount() {
        let s = populated_v1(4096);
        let fs = mount(&s);
        let before = manifest(&fs);
        fs.start_conversion(FormatVersion::V3).unwrap();
        let p = fs.convert_step(5).unwrap();
        fs.convert_step(5).unwrap();
        fs.sync().unwrap();
        // The process dies: no unmount.
        drop(fs);
        let fs = mount(&s);
        assert_eq!(fs.format_version(), FormatVersion::V1);
        assert_eq!(fs.conversion_target(), Some(FormatVersion::V3));
        let q = fs.convert_step(5).unwrap();
        assert!(q.done_inodes > p.done_inodes, "{p:?} then {q:?}");
        while !fs.convert_step(5).unwrap().finished {}
        assert_eq!(manifest(&fs), before);
        fs.unmount().unwrap();
        clean(s.as_ref(), "resumed");
    }

    #[test]
    fn a_torn_superblock_is_taken_from_the_journal() {
        let s = populated_v1(4096);
        let fs = mount(&s);
        fs.start_conversion(FormatVersion::V2).unwrap();
        fs.convert_step(3).unwrap();
        fs.sync().unwrap();
        drop(fs);
        // A checkpoint's in-place write of block 0 torn after its first sector.
        let mut image = s.image();
        let sb = Superblock::decode(&image[..BLOCK_SIZE]).unwrap();
        assert_eq!(sb.conversion_target, None, "not yet checkpointed");
        let mut journaled = journaled_superblock(s.as_ref()).unwrap().unwrap();
        journaled[512..].copy_from_slice(&image[512..BLOCK_SIZE]);
        image[..BLOCK_SIZE].copy_from_slice(&journaled);
        assert!(matches!(
            Superblock::decode(&image[..BLOCK_SIZE]),
            Err(FormatError::Checksum { .. })
        ));
        let torn = Arc::new(MemStore::from_image(image.clone()));
        clean(torn.as_ref(), "torn superblock, before mount");
        let fs = mount(&torn);
        assert_eq!(fs.conversion_target(), Some(FormatVersion::V2));
        while !fs.convert_step(8).unwrap().finished {}
        fs.unmount().unwrap();
        clean(torn.as_ref(), "after recovery");
        // Without a journaled copy, a torn superblock is corruption as before.
        let empty = populated_v1(2048).image();
        let mut bad = empty.clone();
        bad[4000] ^= 1;
        let bad = Arc::new(MemStore::from_image(bad));
        assert!(matches!(
            Fs::mount(bad.clone() as Arc<dyn BlockStore>),
            Err(FsError::Corrupted(_))
        ));
        assert!(!check(bad.as_ref(), &FsckOptions::default())
            .unwrap()
            .is_clean());
    }

    #[test]
    fn a_step_out_of_space_changes_nothing_and_the_conversion_goes_on_later() {
        use crate::mkfs::{mkfs, MkfsOptions};
        let s = Arc::new(MemStore::new(8192));
        let opts = MkfsOptions {
            version: FormatVersion::V1,
            ..MkfsOptions::default()
        };
        mkfs(s.as_ref(), "mem", &opts).unwrap();
        let fs = mount(&s);
        let bs = BLOCK_SIZE as u64;
        // Two maps of 3400 extents: 10 extent blocks in v1, 14 in v3.
        for name in [&b"a"[..], b"b"] {
            let f = fs
                .mknod(ROOT_INO, name, S_IFREG | 0o644, 0, 0, 0)
                .unwrap()
                .ino;
            for k in 0..3400 {
                fs.write(f, 2 * k * bs, b"x").unwrap();
            }
        }
        // Fill what is left with files of at most 12 one-block extents (no extent blocks):
        // the free space is all one-block holes between the extents above.
        let mut fillers = Vec::new();
        'fill: loop {
            let name = format!("fill{}", fillers.len());
            let Ok(a) = fs.mknod(ROOT_INO, name.as_bytes(), S_IFREG, 0, 0, 0) else {
                break;
            };
            fillers.push(a.ino);
            for k in 0..12 {
                if fs.write(a.ino, k * bs, b"y").is_err() {
                    break 'fill;
                }
            }
        }
        fs.sync().unwrap();
        let needed = fs.conversion_space_needed(FormatVersion::V3).unwrap();
        assert!(needed > fs.statfs().free_blocks * bs);
        fs.start_conversion(FormatVersion::V3).unwrap();
        let mut err = None;
        for _ in 0..100 {
            match fs.convert_step(1) {
                Ok(p) if p.finished => break,
                Ok(_) => {}
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        assert!(matches!(err, Some(FsError::NoSpace)), "{err:?}");
        // Nothing latched: the filesystem still works, and the conversion still runs.
        fs.sync().unwrap();
        assert_eq!(fs.conversion_target(), Some(FormatVersion::V3));
        for (i, ino) in fillers.into_iter().enumerate() {
            fs.unlink(ROOT_INO, format!("fill{i}").as_bytes()).unwrap();
            fs.release(ino).unwrap();
        }
        while !fs.convert_step(1).unwrap().finished {}
        fs.unmount().unwrap();
        clean(s.as_ref(), "after ENOSPC");
    }
}
