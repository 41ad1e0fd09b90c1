//! One read-only pass over an image: walks the tree from the root and orphan directories,
//! checks every structure it reaches, compares the bitmaps with what is reachable, and
//! plans the repairs that are safe.
//!
//! Nothing read from disk is trusted before it is checked: addresses against the geometry,
//! counts against what the block holds, chains against a visited set.

use std::collections::{BTreeMap, HashSet, VecDeque};

use formats::bitmap;
use formats::block::{BlockAddr, BlockKind, Ino, BLOCK_SIZE, PAYLOAD_SIZE};
use formats::dir::{self, Bucket, DirHeader, OVERFLOW_BASE};
use formats::extent::Extent;
use formats::inode::{self, InlineArea, Inode, INODE_SIZE};
use formats::superblock::{FsState, Geometry, Superblock, ORPHAN_INO, ROOT_INO};
use formats::version::FormatVersion;
use formats::xattr::XattrSet;
use formats::FormatError;

use super::{FsckError, FsckStats, MetaRange, Problem};
use crate::store::BlockStore;

/// Problems of one kind reported one by one before the rest are summarised.
const CAP_PER_KIND: usize = 50;

pub(super) const SUPERBLOCK: &str = "superblock";
pub(super) const JOURNAL_SUPER: &str = "journal superblock";
pub(super) const INODE: &str = "inode";
pub(super) const DIRECTORY: &str = "directory";

/// Path shown for the orphan directory, which has no name in the tree.
const ORPHAN_PATH: &str = "<orphan directory>";

/// What a pass found, and what a repair may do about it.
pub(super) struct Pass {
    pub problems: Vec<Found>,
    pub notes: Vec<String>,
    pub stats: FsckStats,
    pub meta: Vec<MetaRange>,
    pub plan: Plan,
}

pub(super) struct Found {
    pub problem: Problem,
    /// Whether `plan` holds the action that fixes it.
    pub fixable: bool,
}

/// Repairs a pass judged safe. Every write is a whole block, made from structures that
/// decoded with valid checksums or rebuilt from what is reachable.
#[derive(Default)]
pub(super) struct Plan {
    /// (inode, correct link count).
    pub nlink: Vec<(Ino, u32)>,
    /// (directory, header block, header with the right entry count).
    pub entry_count: Vec<(Ino, u64, DirHeader)>,
    /// Inodes to free: unreachable ones and orphans. Their blocks drop out of `block_bits`.
    pub free_inodes: Vec<Ino>,
    /// Empties the orphan directory: (header block, header, bucket blocks).
    pub empty_orphan_dir: Option<(u64, DirHeader, Vec<u64>)>,
    /// Bitmap payloads as they should be; blocks that failed to verify are left alone.
    pub inode_bits: Vec<u8>,
    pub block_bits: Vec<u8>,
    pub inode_bitmap_ok: Vec<bool>,
    pub block_bitmap_ok: Vec<bool>,
    pub orphans_freed: usize,
}

/// A block range owned by an inode.
#[derive(Clone, Copy)]
struct Owned {
    start: u64,
    len: u64,
    ino: u32,
    what: &'static str,
}

/// What the walk learned of one reachable inode.
struct Rec {
    inode: Inode,
    /// The whole block map, sorted, when it decoded completely.
    extents: Vec<Extent>,
    map_ok: bool,
    path: String,
    /// Entries naming it, outside the orphan directory.
    refs: u32,
    /// Entries naming it in the orphan directory.
    orphan_refs: u32,
    /// Subdirectories found in it (directories only).
    subdirs: u32,
    /// Entries found in it, when every bucket decoded (directories only).
    entries: Option<u64>,
}

/// What a directory entry needs to be checked against its target.
struct Entry {
    entry: dir::DirEntry,
    bucket_block: u64,
}

struct Reporter {
    found: Vec<Found>,
    counts: BTreeMap<&'static str, usize>,
    summary: BTreeMap<&'static str, (&'static str, bool)>,
}

impl Reporter {
    fn push(&mut self, structure: &'static str, location: String, message: String, fixable: bool) {
        self.push_kind(structure, structure, location, message, fixable);
    }

    /// Reports a problem of a kind that can come in thousands; past the cap only a count is
    /// kept.
    fn push_kind(
        &mut self,
        kind: &'static str,
        structure: &'static str,
        location: String,
        message: String,
        fixable: bool,
    ) {
        let n = self.counts.entry(kind).or_insert(0);
        *n += 1;
        if *n > CAP_PER_KIND && kind != structure {
            let s = self.summary.entry(kind).or_insert((structure, fixable));
            s.1 &= fixable;
            return;
        }
        self.found.push(Found {
            problem: problem(structure, location, message),
            fixable,
        });
    }

    fn finish(mut self) -> Vec<Found> {
        for (kind, (structure, fixable)) in self.summary {
            let more = self.counts[kind] - CAP_PER_KIND;
            self.found.push(Found {
                problem: Problem {
                    structure: structure.to_string(),
                    location: "several places".to_string(),
                    message: format!("{more} more problems like the above ({kind})"),
                    repaired: false,
                },
                fixable,
            });
        }
        self.found
    }
}

pub(super) struct Checker<'a> {
    store: &'a dyn BlockStore,
    sb: Superblock,
    geo: Geometry,
    /// The newest inode layout the image may hold.
    newest: FormatVersion,
    rep: Reporter,
    notes: Vec<String>,
    meta: Vec<MetaRange>,
    /// Every inode an entry (or the walk's start) names: `None` when it could not be used.
    inodes: BTreeMap<u32, Option<Rec>>,
    owned: Vec<Owned>,
    /// False once anything that may hide reachable inodes or blocks failed to decode: then
    /// a repair must not free what looks unreachable.
    complete: bool,
    inode_bits: Vec<u8>,
    block_bits: Vec<u8>,
    inode_bitmap_ok: Vec<bool>,
    block_bitmap_ok: Vec<bool>,
    /// Orphan-directory facts for the repair: (header block, header, bucket blocks).
    orphan_dir: Option<(u64, DirHeader, Vec<u64>)>,
    entry_fixes: Vec<(Ino, u64, DirHeader)>,
    itable_cache: Option<(u64, Vec<u8>)>,
}

/// Reads and decodes block 0. `Ok(Err(problem))` when the magic is right but the block is
/// not a valid superblock.
pub(super) fn read_superblock(
    store: &dyn BlockStore,
) -> Result<Result<Superblock, Problem>, FsckError> {
    if store.num_blocks() == 0 {
        return Err(FsckError::NotMolt(
            "the image is smaller than one block".into(),
        ));
    }
    let mut b = vec![0u8; BLOCK_SIZE];
    store.read(0, &mut b)?;
    if let Err(FormatError::Checksum { .. }) = Superblock::decode(&b) {
        // A torn in-place write of a superblock the journal still holds: replay restores
        // it, so judge the image by that one.
        if let Some(image) = crate::fs::convert::journaled_superblock(store)? {
            b = image;
        }
    }
    match Superblock::decode(&b) {
        Ok(sb) => Ok(Ok(sb)),
        Err(FormatError::BadMagic { found, .. })
            if found == u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) =>
        {
            Err(FsckError::NotMolt(format!(
                "block 0 has magic {found:#018x}"
            )))
        }
        Err(FormatError::UnsupportedVersion {
            found, supported, ..
        }) => Err(FsckError::Unsupported(format!(
            "format version {found}; this build checks up to version {supported}"
        ))),
        Err(e) => Ok(Err(problem(SUPERBLOCK, "block 0".into(), e.to_string()))),
    }
}

pub(super) fn problem(structure: &str, location: String, message: String) -> Problem {
    // Decoder errors start with the structure's name, which the problem line already shows.
    let message = match message
        .strip_prefix(structure)
        .and_then(|m| m.strip_prefix(": "))
    {
        Some(rest) => rest.to_string(),
        None => message,
    };
    Problem {
        structure: structure.to_string(),
        location,
        message,
        repaired: false,
    }
}

fn join(path: &str, name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    if path == "/" {
        format!("/{name}")
    } else {
        format!("{path}/{name}")
    }
}

fn count_set(bits: &[u8], from: u64, to: u64) -> u64 {
    let mut n = 0u64;
    let mut i = from;
    while i < to {
        if i & 7 == 0 && i + 8 <= to {
            n += bits[(i / 8) as usize].count_ones() as u64;
            i += 8;
        } else {
            n += bitmap::get_bit(bits, i as usize) as u64;
            i += 1;
        }
    }
    n
}

fn set_range(bits: &mut [u8], from: u64, to: u64) {
    let to = to.min(bits.len() as u64 * 8);
    let mut i = from;
    while i < to {
        if i & 7 == 0 && i + 8 <= to {
            bits[(i / 8) as usize] = 0xff;
            i += 8;
        } else {
            bitmap::set_bit(bits, i as usize, true);
            i += 1;
        }
    }
}

fn type_name(mode: u32) -> Option<&'static str> {
    Some(match mode & inode::S_IFMT {
        inode::S_IFREG => "regular file",
        inode::S_IFDIR => "directory",
        inode::S_IFLNK => "symlink",
        inode::S_IFCHR => "character device",
        inode::S_IFBLK => "block device",
        inode::S_IFIFO => "fifo",
        inode::S_IFSOCK => "socket",
        _ => return None,
    })
}

impl<'a> Checker<'a> {
    pub(super) fn new(store: &'a dyn BlockStore, sb: Superblock) -> Self {
        let geo = sb.geometry;
        Checker {
            store,
            newest: sb.newest_layout(),
            sb,
            geo,
            rep: Reporter {
                found: Vec::new(),
                counts: BTreeMap::new(),
                summary: BTreeMap::new(),
            },
            notes: Vec::new(),
            meta: Vec::new(),
            inodes: BTreeMap::new(),
            owned: Vec::new(),
            complete: true,
            inode_bits: Vec::new(),
            block_bits: Vec::new(),
            inode_bitmap_ok: Vec::new(),
            block_bitmap_ok: Vec::new(),
            orphan_dir: None,
            entry_fixes: Vec::new(),
            itable_cache: None,
        }
    }

    fn read(&self, addr: u64) -> Result<Vec<u8>, FsckError> {
        debug_assert!(addr < self.geo.total_blocks);
        let mut b = vec![0u8; BLOCK_SIZE];
        self.store.read(addr, &mut b)?;
        Ok(b)
    }

    fn meta(&mut self, block: u64, bytes: std::ops::Range<usize>, structure: &'static str) {
        self.meta.push(MetaRange {
            block,
            bytes,
            structure,
        });
    }

    /// Runs the whole pass. The caller has checked that the store holds `total_blocks`.
    pub(super) fn run(mut self) -> Result<Pass, FsckError> {
        self.meta(0, 0..BLOCK_SIZE, SUPERBLOCK);
        match self.sb.state {
            FsState::Clean => {}
            FsState::Mounted => self
                .notes
                .push("the image was not cleanly unmounted (state: mounted)".into()),
            FsState::Errors => self
                .notes
                .push("the image is marked as having errors".into()),
        }
        if let Some(t) = self.sb.conversion_target {
            self.notes.push(format!(
                "a conversion from format v{} to v{} is in progress at inode {}; `fsd convert --to {}` finishes it",
                self.sb.format_version.0, t.0, self.sb.conversion_cursor, t.0
            ));
        }
        self.meta(self.geo.journal_start, 0..BLOCK_SIZE, JOURNAL_SUPER);
        self.load_bitmaps()?;
        self.walk()?;
        let (link_problems, nlink_plan) = self.link_counts();
        let mut plan = Plan {
            nlink: nlink_plan,
            ..Plan::default()
        };
        for (loc, msg, fixable) in link_problems {
            self.rep.push(INODE, loc, msg, fixable);
        }
        plan.entry_count = std::mem::take(&mut self.entry_fixes);
        self.double_ownership();
        self.orphans(&mut plan);
        self.compare_bitmaps(&mut plan);
        self.free_counts();
        let stats = self.stats();
        plan.inode_bitmap_ok = self.inode_bitmap_ok;
        plan.block_bitmap_ok = self.block_bitmap_ok;
        Ok(Pass {
            problems: self.rep.finish(),
            notes: self.notes,
            stats,
            meta: self.meta,
            plan,
        })
    }

    // ---- bitmaps ---------------------------------------------------------------------

    fn load_bitmaps(&mut self) -> Result<(), FsckError> {
        for (kind, start, count) in [
            (
                BlockKind::InodeBitmap,
                self.geo.inode_bitmap_start,
                self.geo.inode_bitmap_blocks,
            ),
            (
                BlockKind::BlockBitmap,
                self.geo.block_bitmap_start,
                self.geo.block_bitmap_blocks,
            ),
        ] {
            let mut bits = vec![0u8; count as usize * PAYLOAD_SIZE];
            let mut ok = Vec::with_capacity(count as usize);
            for i in 0..count as u64 {
                let addr = start + i;
                let b = self.read(addr)?;
                match bitmap::decode(kind, &b, BlockAddr(addr)) {
                    Ok(payload) => {
                        bits[i as usize * PAYLOAD_SIZE..(i as usize + 1) * PAYLOAD_SIZE]
                            .copy_from_slice(payload);
                        ok.push(true);
                    }
                    Err(e) => {
                        self.rep
                            .push(kind.name(), format!("block {addr}"), e.to_string(), false);
                        ok.push(false);
                    }
                }
                self.meta(addr, 0..BLOCK_SIZE, kind.name());
            }
            if kind == BlockKind::InodeBitmap {
                self.inode_bits = bits;
                self.inode_bitmap_ok = ok;
            } else {
                self.block_bits = bits;
                self.block_bitmap_ok = ok;
            }
        }
        Ok(())
    }

    // ---- the walk --------------------------------------------------------------------

    fn walk(&mut self) -> Result<(), FsckError> {
        let mut queue: VecDeque<(u32, Option<u32>, String)> = VecDeque::new();
        for (ino, path) in [(ROOT_INO, "/"), (ORPHAN_INO, ORPHAN_PATH)] {
            self.load_inode(ino.0, path)?;
            match self.inodes.get(&ino.0) {
                Some(Some(r)) if r.inode.is_dir() => {
                    queue.push_back((ino.0, Some(ino.0), path.to_string()))
                }
                Some(Some(r)) => {
                    let t = type_name(r.inode.mode).unwrap_or("inode of unknown type");
                    self.rep.push(
                        INODE,
                        format!("inode {} ({path})", ino.0),
                        format!("is a {t}, not a directory"),
                        false,
                    );
                    self.complete = false;
                }
                Some(None) | None => self.complete = false,
            }
        }
        while let Some((ino, parent, path)) = queue.pop_front() {
            let children = self.check_dir(ino, parent, &path)?;
            queue.extend(children);
        }
        Ok(())
    }

    fn inode_location_text(&self, ino: u32, path: &str) -> String {
        let (addr, _) = self.geo.inode_location(Ino(ino));
        format!("inode {ino} ({path}), block {}", addr.0)
    }

    /// Decodes and checks inode `ino` the first time a walk reaches it.
    fn load_inode(&mut self, ino: u32, path: &str) -> Result<(), FsckError> {
        if self.inodes.contains_key(&ino) {
            return Ok(());
        }
        let (addr, off) = self.geo.inode_location(Ino(ino));
        let block = match &self.itable_cache {
            Some((a, b)) if *a == addr.0 => b.clone(),
            _ => {
                let b = self.read(addr.0)?;
                self.itable_cache = Some((addr.0, b.clone()));
                b
            }
        };
        let loc = self.inode_location_text(ino, path);
        let inode = match Inode::decode(Ino(ino), &block[off..off + INODE_SIZE], self.newest) {
            Err(e) => {
                self.rep.push(INODE, loc, e.to_string(), false);
                self.complete = false;
                self.inodes.insert(ino, None);
                return Ok(());
            }
            Ok(None) => {
                self.rep.push(
                    INODE,
                    loc,
                    "is free (an all-zero slot) but is in use".into(),
                    false,
                );
                self.inodes.insert(ino, None);
                return Ok(());
            }
            Ok(Some(i)) if i.mode == 0 => {
                self.meta(addr.0, off..off + INODE_SIZE, INODE);
                self.rep
                    .push(INODE, loc, "is free (mode 0) but is in use".into(), false);
                self.inodes.insert(ino, None);
                return Ok(());
            }
            Ok(Some(i)) => i,
        };
        self.meta(addr.0, off..off + INODE_SIZE, INODE);
        if let Some(why) = self.layout_problem(ino, inode.layout) {
            self.rep.push(INODE, loc.clone(), why, false);
        }
        if type_name(inode.mode).is_none() {
            self.rep.push(
                INODE,
                loc,
                format!("invalid file type in mode {:#o}", inode.mode),
                false,
            );
            self.complete = false;
            self.inodes.insert(ino, None);
            return Ok(());
        }
        let (extents, map_ok) = self.block_map(ino, &inode, path)?;
        self.inodes.insert(
            ino,
            Some(Rec {
                inode,
                extents,
                map_ok,
                path: path.to_string(),
                refs: 0,
                orphan_refs: 0,
                subdirs: 0,
                entries: None,
            }),
        );
        Ok(())
    }

    /// Whether a live inode's layout is one the image may hold at its number: the image's
    /// version outside a conversion; during one, the target below the cursor and the old
    /// version or the target from it on.
    fn layout_problem(&self, ino: u32, layout: FormatVersion) -> Option<String> {
        let version = self.sb.format_version;
        let ok = match self.sb.conversion_target {
            None => layout == version,
            Some(t) if (ino as u64) < self.sb.conversion_cursor => layout == t,
            Some(t) => layout == t || layout == version,
        };
        (!ok).then(|| match self.sb.conversion_target {
            None => format!(
                "has the v{} layout in a format v{} image",
                layout.0, version.0
            ),
            Some(t) => format!(
                "has the v{} layout during a conversion from v{} to v{} at inode {}",
                layout.0, version.0, t.0, self.sb.conversion_cursor
            ),
        })
    }

    fn own(&mut self, start: u64, len: u64, ino: u32, what: &'static str) {
        self.owned.push(Owned {
            start,
            len,
            ino,
            what,
        });
    }

    /// Checks the block map, extent chain, xattr block and block count of an inode and
    /// records what it owns. Returns the whole map and whether it decoded completely.
    fn block_map(
        &mut self,
        ino: u32,
        inode: &Inode,
        path: &str,
    ) -> Result<(Vec<Extent>, bool), FsckError> {
        let loc = self.inode_location_text(ino, path);
        let mut ok = true;
        let mut extents = inode.inline_extents().to_vec();
        let mut extent_blocks = 0u64;
        let is_special = !(inode.is_reg() || inode.is_dir() || inode.is_symlink());
        if matches!(inode.inline, InlineArea::Symlink(_)) && inode.extent_block != 0 {
            self.rep.push(
                INODE,
                loc.clone(),
                "inline symlink with an extent block".into(),
                false,
            );
        }
        if is_special && (inode.extent_count != 0 || inode.extent_block != 0) {
            self.rep.push(
                INODE,
                loc.clone(),
                "special file with a block map".into(),
                false,
            );
        }
        let mut cur = inode.extent_block;
        let mut visited = HashSet::new();
        while cur != 0 {
            if !self.geo.is_data_block(cur) {
                self.rep.push(
                    INODE,
                    loc.clone(),
                    format!("extent block address {cur} is outside the data area"),
                    false,
                );
                ok = false;
                break;
            }
            if !visited.insert(cur) {
                self.rep.push(
                    INODE,
                    loc.clone(),
                    format!("extent chain loops back to block {cur}"),
                    false,
                );
                ok = false;
                break;
            }
            // Claimed even when it does not decode, so a repair never hands it out.
            self.own(cur, 1, ino, "extent block");
            extent_blocks += 1;
            let b = self.read(cur)?;
            // The chain is in the inode's own layout.
            match inode.codec().decode_block(&b, Ino(ino), BlockAddr(cur)) {
                Ok((next, list)) => {
                    self.meta(cur, 0..BLOCK_SIZE, BlockKind::ExtentBlock.name());
                    if extents.len() + list.len() > inode.extent_count as usize {
                        self.rep.push(
                            BlockKind::ExtentBlock.name(),
                            format!("block {cur}, inode {ino} ({path})"),
                            format!(
                                "chain holds more than the inode's extent_count {}",
                                inode.extent_count
                            ),
                            false,
                        );
                        ok = false;
                        break;
                    }
                    extents.extend(list);
                    cur = next;
                }
                Err(e) => {
                    self.rep.push(
                        BlockKind::ExtentBlock.name(),
                        format!("block {cur}, inode {ino} ({path})"),
                        e.to_string(),
                        false,
                    );
                    self.complete = false;
                    ok = false;
                    break;
                }
            }
        }
        if ok && extents.len() != inode.extent_count as usize {
            self.rep.push(
                INODE,
                loc.clone(),
                format!(
                    "extent_count is {} but the block map holds {} extents",
                    inode.extent_count,
                    extents.len()
                ),
                false,
            );
            ok = false;
        }
        for w in extents.windows(2) {
            if w[1].logical < w[0].logical_end() {
                self.rep.push(
                    INODE,
                    loc.clone(),
                    format!(
                        "extents overlap or are unsorted at file block {}",
                        w[1].logical
                    ),
                    false,
                );
                ok = false;
                break;
            }
        }
        let mut data_blocks = 0u64;
        for e in &extents {
            data_blocks += e.len as u64;
            if e.physical < self.geo.data_start || e.physical_end() > self.geo.total_blocks {
                self.rep.push(
                    INODE,
                    loc.clone(),
                    format!(
                        "extent at file block {} maps blocks {}..{}, outside the data area {}..{}",
                        e.logical,
                        e.physical,
                        e.physical_end(),
                        self.geo.data_start,
                        self.geo.total_blocks
                    ),
                    false,
                );
                ok = false;
            } else {
                self.own(e.physical, e.len as u64, ino, "data");
            }
        }
        let mut xattr_blocks = 0u64;
        let x = inode.xattr_block;
        if x != 0 {
            if !self.geo.is_data_block(x) {
                self.rep.push(
                    INODE,
                    loc.clone(),
                    format!("xattr block address {x} is outside the data area"),
                    false,
                );
            } else {
                self.own(x, 1, ino, "xattr block");
                xattr_blocks = 1;
                let b = self.read(x)?;
                match XattrSet::decode(&b, Ino(ino), BlockAddr(x)) {
                    Ok(_) => self.meta(x, 0..BLOCK_SIZE, BlockKind::XattrBlock.name()),
                    Err(e) => self.rep.push(
                        BlockKind::XattrBlock.name(),
                        format!("block {x}, inode {ino} ({path})"),
                        e.to_string(),
                        false,
                    ),
                }
            }
        }
        let owned = data_blocks + extent_blocks + xattr_blocks;
        if ok && inode.blocks != owned {
            self.rep.push(
                INODE,
                loc.clone(),
                format!(
                    "blocks is {} but it owns {owned} ({data_blocks} data, {extent_blocks} extent, {xattr_blocks} xattr)",
                    inode.blocks
                ),
                false,
            );
        }
        if inode.is_symlink() && matches!(inode.inline, InlineArea::Extents(_)) {
            let one_block = extents.len() == 1 && extents[0].logical == 0 && extents[0].len == 1;
            if !one_block || inode.size == 0 || inode.size >= BLOCK_SIZE as u64 {
                self.rep.push(
                    INODE,
                    loc.clone(),
                    format!(
                        "symlink of {} bytes with {} extents: a long symlink is one mapped block of 1..4095 bytes",
                        inode.size,
                        extents.len()
                    ),
                    false,
                );
            }
        }
        Ok((extents, ok))
    }

    fn dir_loc(&self, block: u64, ino: u32, path: &str) -> String {
        format!("block {block}, directory inode {ino} ({path})")
    }

    /// Checks one directory and returns the subdirectories to walk next.
    fn check_dir(
        &mut self,
        ino: u32,
        parent: Option<u32>,
        path: &str,
    ) -> Result<Vec<(u32, Option<u32>, String)>, FsckError> {
        let Some(Some(rec)) = self.inodes.get(&ino) else {
            return Ok(Vec::new());
        };
        let extents = rec.extents.clone();
        let size = rec.inode.size;
        let map_ok = rec.map_ok;
        let iloc = self.inode_location_text(ino, path);
        if !map_ok {
            // Its entries cannot all be found.
            self.complete = false;
        }
        let lookup = |fb: u64| -> Option<u64> {
            let i = extents.partition_point(|e| e.logical_end() <= fb);
            let e = extents.get(i)?;
            (e.logical <= fb && !e.unwritten).then(|| e.physical + (fb - e.logical))
        };
        let mapped: u64 = extents.iter().map(|e| e.len as u64).sum();
        let Some(haddr) = lookup(0) else {
            self.rep.push(
                DIRECTORY,
                iloc,
                "file block 0 (the header) is not mapped".into(),
                false,
            );
            self.complete = false;
            return Ok(Vec::new());
        };
        let hloc = self.dir_loc(haddr, ino, path);
        let header = match DirHeader::decode(&self.read(haddr)?, Ino(ino), BlockAddr(haddr)) {
            Ok(h) => h,
            Err(e) => {
                self.rep
                    .push(BlockKind::DirHeader.name(), hloc, e.to_string(), false);
                self.complete = false;
                return Ok(Vec::new());
            }
        };
        self.meta(haddr, 0..BLOCK_SIZE, BlockKind::DirHeader.name());
        let expected_parent = match ino {
            1 | 2 => Some(ino),
            _ => parent,
        };
        if let Some(p) = expected_parent {
            if header.parent.0 != p {
                self.rep.push(
                    BlockKind::DirHeader.name(),
                    hloc.clone(),
                    format!(
                        "parent is inode {} but the directory is reached from inode {p}",
                        header.parent.0
                    ),
                    false,
                );
            }
        }
        let buckets = header.bucket_count();
        let want_size = (1 + buckets) * BLOCK_SIZE as u64;
        if size != want_size {
            self.rep.push(
                INODE,
                iloc.clone(),
                format!("directory size is {size}, expected {want_size} for {buckets} buckets"),
                false,
            );
        }
        if buckets >= mapped {
            self.rep.push(
                BlockKind::DirHeader.name(),
                hloc,
                format!("records {buckets} buckets but the directory maps only {mapped} blocks"),
                false,
            );
            self.complete = false;
            return Ok(Vec::new());
        }
        let overflow_end = OVERFLOW_BASE + header.overflow_next as u64;
        for e in &extents {
            let in_table = e.logical_end() <= 1 + buckets;
            let in_overflow = e.logical >= OVERFLOW_BASE && e.logical_end() <= overflow_end;
            if !in_table && !in_overflow {
                self.rep.push(
                    DIRECTORY,
                    iloc.clone(),
                    format!(
                        "maps file blocks {}..{}, outside its header, {buckets} buckets and {} overflow blocks",
                        e.logical,
                        e.logical_end(),
                        header.overflow_next
                    ),
                    false,
                );
            }
        }

        let mut all_ok = map_ok;
        let mut names: HashSet<Vec<u8>> = HashSet::new();
        let mut seen_overflow: HashSet<u64> = HashSet::new();
        let mut entries: Vec<Entry> = Vec::new();
        let mut bucket_blocks = Vec::new();
        for i in 0..buckets {
            let fb = DirHeader::bucket_block(i);
            let Some(mut addr) = lookup(fb) else {
                self.rep.push(
                    BlockKind::DirBucket.name(),
                    iloc.clone(),
                    format!("bucket {i} (file block {fb}) is not mapped"),
                    false,
                );
                all_ok = false;
                continue;
            };
            bucket_blocks.push(addr);
            let mut what = format!("bucket {i}");
            loop {
                let bloc = format!("block {addr}, {what} of directory inode {ino} ({path})");
                let bucket = match Bucket::decode(&self.read(addr)?, Ino(ino), BlockAddr(addr)) {
                    Ok(b) => b,
                    Err(e) => {
                        self.rep
                            .push(BlockKind::DirBucket.name(), bloc, e.to_string(), false);
                        all_ok = false;
                        break;
                    }
                };
                self.meta(addr, 0..BLOCK_SIZE, BlockKind::DirBucket.name());
                for e in bucket.entries {
                    let want = header.bucket_of(dir::name_hash(&e.name));
                    if want != i {
                        self.rep.push(
                            BlockKind::DirBucket.name(),
                            bloc.clone(),
                            format!(
                                "entry {:?} hashes to bucket {want} but is in bucket {i}",
                                String::from_utf8_lossy(&e.name)
                            ),
                            false,
                        );
                    }
                    if !names.insert(e.name.clone()) {
                        self.rep.push(
                            BlockKind::DirBucket.name(),
                            bloc.clone(),
                            format!("name {:?} appears twice", String::from_utf8_lossy(&e.name)),
                            false,
                        );
                    }
                    entries.push(Entry {
                        entry: e,
                        bucket_block: addr,
                    });
                }
                let next = bucket.next;
                if next == 0 {
                    break;
                }
                if next < OVERFLOW_BASE || next >= overflow_end {
                    self.rep.push(
                        BlockKind::DirBucket.name(),
                        bloc,
                        format!(
                            "overflow link to file block {next}, outside the overflow area {OVERFLOW_BASE}..{overflow_end}"
                        ),
                        false,
                    );
                    all_ok = false;
                    break;
                }
                if !seen_overflow.insert(next) {
                    self.rep.push(
                        BlockKind::DirBucket.name(),
                        bloc,
                        format!("overflow link to file block {next}, which is already in a chain"),
                        false,
                    );
                    all_ok = false;
                    break;
                }
                let Some(a) = lookup(next) else {
                    self.rep.push(
                        BlockKind::DirBucket.name(),
                        bloc,
                        format!("overflow file block {next} is not mapped"),
                        false,
                    );
                    all_ok = false;
                    break;
                };
                addr = a;
                what = format!("overflow block {} of bucket {i}", next - OVERFLOW_BASE);
            }
        }
        if !all_ok {
            self.complete = false;
        }
        let count = entries.len() as u64;
        if count != header.entry_count {
            // Fixable only when every entry was seen.
            self.rep.push(
                BlockKind::DirHeader.name(),
                self.dir_loc(haddr, ino, path),
                format!(
                    "entry_count is {} but the buckets hold {count} entries",
                    header.entry_count
                ),
                all_ok,
            );
            if all_ok {
                self.entry_fixes.push((
                    Ino(ino),
                    haddr,
                    DirHeader {
                        entry_count: count,
                        ..header
                    },
                ));
            }
        }
        if ino == ORPHAN_INO.0 {
            self.orphan_dir = all_ok.then_some((haddr, header, bucket_blocks));
        }

        let mut children = Vec::new();
        let mut subdirs = 0u32;
        for Entry {
            entry: e,
            bucket_block,
        } in entries
        {
            let cpath = join(path, &e.name);
            let eloc = format!("block {bucket_block}, directory inode {ino} ({path})");
            let shown = String::from_utf8_lossy(&e.name).into_owned();
            if !self.geo.is_valid_ino(e.ino) {
                self.rep.push(
                    BlockKind::DirBucket.name(),
                    eloc,
                    format!(
                        "entry {shown:?} names inode {}, outside 1..={}",
                        e.ino.0, self.geo.inode_count
                    ),
                    false,
                );
                continue;
            }
            if e.ino == ROOT_INO || e.ino == ORPHAN_INO {
                self.rep.push(
                    BlockKind::DirBucket.name(),
                    eloc,
                    format!(
                        "entry {shown:?} names inode {}, which no entry may name",
                        e.ino.0
                    ),
                    false,
                );
                continue;
            }
            let first = !self.inodes.contains_key(&e.ino.0);
            self.load_inode(e.ino.0, &cpath)?;
            let Some(Some(child)) = self.inodes.get_mut(&e.ino.0) else {
                if first {
                    continue;
                }
                self.rep.push(
                    BlockKind::DirBucket.name(),
                    eloc,
                    format!(
                        "entry {shown:?} names inode {}, which is unusable (see above)",
                        e.ino.0
                    ),
                    false,
                );
                continue;
            };
            let dtype = dir::dtype_of_mode(child.inode.mode);
            let child_is_dir = child.inode.is_dir();
            let mut problems: Vec<String> = Vec::new();
            if dtype != e.dtype {
                problems.push(format!(
                    "entry {shown:?} has type {} but inode {} has type {dtype}",
                    e.dtype, e.ino.0
                ));
            }
            if ino == ORPHAN_INO.0 {
                child.orphan_refs += 1;
                if shown != e.ino.0.to_string() {
                    problems.push(format!(
                        "orphan entry {shown:?} is not named by its inode number {}",
                        e.ino.0
                    ));
                }
                // Not a link: the orphan directory's own count stays 2.
                if child_is_dir && first {
                    children.push((e.ino.0, None, cpath));
                }
            } else if child_is_dir {
                if first {
                    subdirs += 1;
                    children.push((e.ino.0, Some(ino), cpath));
                } else {
                    problems.push(format!(
                        "entry {shown:?} reaches directory inode {} ({}) a second time (a hard link to a directory or a cycle)",
                        e.ino.0, child.path
                    ));
                }
            } else {
                child.refs += 1;
            }
            for p in problems {
                self.rep
                    .push(BlockKind::DirBucket.name(), eloc.clone(), p, false);
            }
        }
        if let Some(Some(rec)) = self.inodes.get_mut(&ino) {
            rec.subdirs = subdirs;
            rec.entries = all_ok.then_some(count);
        }
        Ok(children)
    }

    // ---- after the walk --------------------------------------------------------------

    /// Link counts: a directory has 2 + its subdirectories (0 when it hangs in the orphan
    /// directory, whose entries are not links); anything else has one link per entry outside
    /// the orphan directory.
    #[allow(clippy::type_complexity)]
    fn link_counts(&self) -> (Vec<(String, String, bool)>, Vec<(Ino, u32)>) {
        let mut problems = Vec::new();
        let mut plan = Vec::new();
        for (&ino, rec) in &self.inodes {
            let Some(rec) = rec else { continue };
            if rec.orphan_refs > 0 && rec.refs > 0 {
                problems.push((
                    self.inode_location_text(ino, &rec.path),
                    format!(
                        "is in the orphan directory but also has {} entries in the tree",
                        rec.refs
                    ),
                    false,
                ));
                continue;
            }
            let want = if rec.inode.is_dir() {
                if rec.orphan_refs > 0 {
                    0
                } else if rec.entries.is_none() {
                    // Its buckets did not all decode: the count of subdirectories is unknown.
                    continue;
                } else {
                    2 + rec.subdirs
                }
            } else {
                rec.refs
            };
            if rec.inode.nlink != want {
                let why = if rec.orphan_refs > 0 {
                    "it is in the orphan directory"
                } else if rec.inode.is_dir() {
                    "2 + its subdirectories"
                } else {
                    "the entries naming it"
                };
                problems.push((
                    self.inode_location_text(ino, &rec.path),
                    format!(
                        "link count is {} but should be {want} ({why})",
                        rec.inode.nlink
                    ),
                    self.complete,
                ));
                if self.complete {
                    plan.push((Ino(ino), want));
                }
            }
        }
        (problems, plan)
    }

    /// Reports blocks claimed by more than one owner.
    fn double_ownership(&mut self) {
        self.owned.sort_by_key(|o| (o.start, o.len));
        let mut reach: Option<Owned> = None;
        let mut found = Vec::new();
        for o in &self.owned {
            if let Some(r) = reach {
                let r_end = r.start + r.len;
                if o.start < r_end {
                    let end = (o.start + o.len).min(r_end);
                    found.push((*o, r, o.start, end));
                }
                if o.start + o.len > r_end {
                    reach = Some(*o);
                }
            } else {
                reach = Some(*o);
            }
        }
        for (o, r, from, to) in found {
            let path = |ino: u32| match self.inodes.get(&ino) {
                Some(Some(rec)) => rec.path.clone(),
                _ => "?".into(),
            };
            let loc = format!("block {from}, inode {} ({})", o.ino, path(o.ino));
            let msg = format!(
                "blocks {from}..{to} ({}) are also owned by inode {} ({}, {})",
                o.what,
                r.ino,
                path(r.ino),
                r.what
            );
            self.rep
                .push_kind("blocks owned twice", INODE, loc, msg, false);
        }
    }

    /// Orphans are a normal leftover of a crash: a note, and freed by a repair when every
    /// one of them can be.
    fn orphans(&mut self, plan: &mut Plan) {
        let orphans: Vec<(u32, bool)> = self
            .inodes
            .iter()
            .filter_map(|(&ino, r)| {
                let r = r.as_ref()?;
                (r.orphan_refs > 0).then(|| {
                    let empty_dir = r.inode.is_dir() && r.entries == Some(0);
                    (
                        ino,
                        r.refs == 0 && r.orphan_refs == 1 && (!r.inode.is_dir() || empty_dir),
                    )
                })
            })
            .collect();
        let Some(Some(odir)) = self.inodes.get(&ORPHAN_INO.0) else {
            return;
        };
        let listed = odir.entries.unwrap_or(0);
        if orphans.is_empty() && listed == 0 {
            return;
        }
        self.notes.push(format!(
            "the orphan directory holds {listed} inodes unlinked while open; mounting or fsck --repair frees them"
        ));
        let freeable =
            self.complete && orphans.iter().all(|&(_, ok)| ok) && orphans.len() as u64 == listed;
        if let (true, Some(od)) = (freeable, self.orphan_dir.clone()) {
            plan.free_inodes
                .extend(orphans.iter().map(|&(i, _)| Ino(i)));
            plan.orphans_freed = orphans.len();
            plan.empty_orphan_dir = Some(od);
            if odir.inode.nlink != 2 {
                plan.nlink.retain(|(i, _)| *i != ORPHAN_INO);
                plan.nlink.push((ORPHAN_INO, 2));
            }
        }
    }

    /// Compares the bitmaps on disk with what the walk found, and builds the bitmaps a
    /// repair writes.
    fn compare_bitmaps(&mut self, plan: &mut Plan) {
        let g = self.geo;
        let ibits_len = self.inode_bits.len() as u64 * 8;
        let bbits_len = self.block_bits.len() as u64 * 8;

        // What is reachable, as this pass sees it (orphans included).
        let mut want_i = vec![0u8; self.inode_bits.len()];
        bitmap::set_bit(&mut want_i, 0, true);
        set_range(&mut want_i, g.inode_count as u64 + 1, ibits_len);
        let mut want_b = vec![0u8; self.block_bits.len()];
        set_range(&mut want_b, 0, g.data_start);
        set_range(&mut want_b, g.total_blocks, bbits_len);
        // Inodes an entry names that could not be decoded: their bits are unknown.
        let mut unknown_i: HashSet<u32> = HashSet::new();
        for (&ino, rec) in &self.inodes {
            match rec {
                Some(_) => bitmap::set_bit(&mut want_i, ino as usize, true),
                None => {
                    unknown_i.insert(ino);
                }
            }
        }
        bitmap::set_bit(&mut want_i, ROOT_INO.0 as usize, true);
        bitmap::set_bit(&mut want_i, ORPHAN_INO.0 as usize, true);
        for o in &self.owned {
            set_range(&mut want_b, o.start, o.start + o.len);
        }

        // Inode bitmap.
        for (bi, ok) in self.inode_bitmap_ok.clone().into_iter().enumerate() {
            if !ok {
                continue;
            }
            let addr = g.inode_bitmap_start + bi as u64;
            let range = bi * PAYLOAD_SIZE..(bi + 1) * PAYLOAD_SIZE;
            for byte in range {
                let (have, want) = (self.inode_bits[byte], want_i[byte]);
                if have == want {
                    continue;
                }
                for bit in 0..8 {
                    let i = byte as u64 * 8 + bit;
                    let (h, w) = (have & (1 << bit) != 0, want & (1 << bit) != 0);
                    if h == w || unknown_i.contains(&(i as u32)) {
                        continue;
                    }
                    let loc = format!("block {addr}, bit of inode {i}");
                    let (kind, msg, fixable) = if i == 0 || i > g.inode_count as u64 {
                        (
                            "inode bitmap padding",
                            "padding bit is clear (inode 0 and bits past the last inode stay set)"
                                .to_string(),
                            true,
                        )
                    } else if w {
                        (
                            "inodes marked free",
                            format!("inode {i} is in use but marked free"),
                            true,
                        )
                    } else {
                        (
                            "inodes unreachable",
                            format!("inode {i} is marked in use but no directory reaches it"),
                            self.complete,
                        )
                    };
                    self.rep
                        .push_kind(kind, BlockKind::InodeBitmap.name(), loc, msg, fixable);
                    if !w && i != 0 && i <= g.inode_count as u64 && self.complete {
                        plan.free_inodes.push(Ino(i as u32));
                    }
                }
            }
        }

        // Block bitmap.
        for (bi, ok) in self.block_bitmap_ok.clone().into_iter().enumerate() {
            if !ok {
                continue;
            }
            let addr = g.block_bitmap_start + bi as u64;
            let range = bi * PAYLOAD_SIZE..(bi + 1) * PAYLOAD_SIZE;
            for byte in range {
                let (have, want) = (self.block_bits[byte], want_b[byte]);
                if have == want {
                    continue;
                }
                for bit in 0..8 {
                    let i = byte as u64 * 8 + bit;
                    let (h, w) = (have & (1 << bit) != 0, want & (1 << bit) != 0);
                    if h == w {
                        continue;
                    }
                    let loc = format!("block {addr}, bit of block {i}");
                    let (kind, msg, fixable) = if i < g.data_start {
                        (
                            "metadata blocks marked free",
                            format!("metadata block {i} is marked free"),
                            true,
                        )
                    } else if i >= g.total_blocks {
                        (
                            "block bitmap padding",
                            "padding bit past the last block is clear".to_string(),
                            true,
                        )
                    } else if w {
                        (
                            "blocks marked free",
                            format!("block {i} is in use but marked free"),
                            true,
                        )
                    } else {
                        (
                            "blocks unowned",
                            format!("block {i} is marked in use but nothing owns it"),
                            self.complete,
                        )
                    };
                    self.rep
                        .push_kind(kind, BlockKind::BlockBitmap.name(), loc, msg, fixable);
                }
            }
        }

        // The bitmaps a repair writes: orphans being freed drop out; when the walk was
        // incomplete nothing is ever cleared.
        let freed: HashSet<u32> = plan.free_inodes.iter().map(|i| i.0).collect();
        if !freed.is_empty() {
            for &i in &freed {
                bitmap::set_bit(&mut want_i, i as usize, false);
            }
            want_b = vec![0u8; self.block_bits.len()];
            set_range(&mut want_b, 0, g.data_start);
            set_range(&mut want_b, g.total_blocks, bbits_len);
            for o in self.owned.iter().filter(|o| !freed.contains(&o.ino)) {
                set_range(&mut want_b, o.start, o.start + o.len);
            }
        }
        if !self.complete {
            for (w, h) in want_i.iter_mut().zip(&self.inode_bits) {
                *w |= h;
            }
            for (w, h) in want_b.iter_mut().zip(&self.block_bits) {
                *w |= h;
            }
        } else {
            for &i in &unknown_i {
                let h = bitmap::get_bit(&self.inode_bits, i as usize);
                bitmap::set_bit(&mut want_i, i as usize, h);
            }
        }
        plan.inode_bits = want_i;
        plan.block_bits = want_b;
    }

    /// Free counts are exact only in a cleanly unmounted image.
    fn free_counts(&mut self) {
        if self.sb.state != FsState::Clean {
            return;
        }
        if self
            .inode_bitmap_ok
            .iter()
            .chain(&self.block_bitmap_ok)
            .any(|ok| !ok)
        {
            return;
        }
        let g = self.geo;
        let free_blocks = g.total_blocks - count_set(&self.block_bits, 0, g.total_blocks);
        let free_inodes =
            g.inode_count as u64 - count_set(&self.inode_bits, 1, g.inode_count as u64 + 1);
        if self.sb.free_blocks != free_blocks {
            self.rep.push(
                SUPERBLOCK,
                "block 0".into(),
                format!(
                    "free_blocks is {} but the block bitmap has {free_blocks} free",
                    self.sb.free_blocks
                ),
                true,
            );
        }
        if self.sb.free_inodes as u64 != free_inodes {
            self.rep.push(
                SUPERBLOCK,
                "block 0".into(),
                format!(
                    "free_inodes is {} but the inode bitmap has {free_inodes} free",
                    self.sb.free_inodes
                ),
                true,
            );
        }
    }

    fn stats(&self) -> FsckStats {
        let recs = self.inodes.values().flatten();
        let mut s = FsckStats {
            blocks_used: self.geo.data_start,
            ..FsckStats::default()
        };
        for r in recs {
            s.inodes += 1;
            if r.inode.is_dir() {
                s.directories += 1;
            } else if r.inode.is_reg() {
                s.files += 1;
            }
        }
        // Owned ranges are sorted by now; count each block once.
        let mut end = 0u64;
        for o in &self.owned {
            let from = o.start.max(end);
            let to = o.start + o.len;
            if to > from {
                s.blocks_used += to - from;
                end = to;
            }
        }
        s
    }
}

/// Counts of set bits, for the repaired superblock: (free blocks, free inodes).
pub(super) fn free_from_bits(geo: &Geometry, inode_bits: &[u8], block_bits: &[u8]) -> (u64, u32) {
    let fb = geo.total_blocks - count_set(block_bits, 0, geo.total_blocks);
    let fi = geo.inode_count as u64 - count_set(inode_bits, 1, geo.inode_count as u64 + 1);
    (fb, fi as u32)
}

/// Every free inode slot a repair writes: mode 0, keeping the generation when the old
/// inode decodes (as the filesystem frees inodes).
pub(super) fn freed_slot(ino: Ino, old: &[u8], newest: FormatVersion) -> Vec<u8> {
    let mut out = vec![0u8; INODE_SIZE];
    if let Ok(Some(i)) = Inode::decode(ino, old, newest) {
        if Inode::freed(i.generation).encode(ino, &mut out).is_err() {
            out.fill(0);
        }
    }
    out
}
