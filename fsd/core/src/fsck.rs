//! `fsd fsck`: checks every invariant of an image of any supported format version (a
//! half-converted one included) and repairs what is safe.
//!
//! A check replays nothing: complete journal transactions are applied in a read-only
//! overlay, so the image is judged as it will be after replay. `--repair` replays the
//! journal for real, then fixes what can be rebuilt from reachable, checksummed
//! structures (bitmaps, free counts, link counts, directory entry counts, orphans and
//! unreachable inodes, the clean flag), then checks again. A checksum mismatch is never
//! "repaired" by resealing the block: it stays an error.
//!
//! Exit codes are e2fsck's: 0 clean, 1 errors found and all repaired, 4 errors left,
//! 8 operational error.

mod check;
mod overlay;
#[cfg(test)]
mod tests;

use std::io;

use formats::bitmap;
use formats::block::{BlockAddr, BlockKind, BLOCK_SIZE, PAYLOAD_SIZE};
use formats::dir::Bucket;
use formats::inode::{Inode, INODE_SIZE};
use formats::superblock::{FsState, Geometry, Superblock};
use serde::Serialize;

use crate::fs::journal::{self, JournalError};
use crate::store::BlockStore;
use check::{Checker, Pass, Plan};

/// Exit codes, as e2fsck defines them.
pub(crate) const EXIT_CLEAN: i32 = 0;
pub(crate) const EXIT_REPAIRED: i32 = 1;
pub const EXIT_ERRORS_LEFT: i32 = 4;
pub const EXIT_OPERATIONAL: i32 = 8;

#[derive(Debug, Clone, Default)]
pub struct FsckOptions {
    /// Replay the journal and fix what is safe to fix.
    pub repair: bool,
}

/// Failures that stop fsck from judging the image at all (exit code 8).
#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("superblock at block 0: not a Molt image ({0})")]
    NotMolt(String),
    #[error("superblock at block 0: unsupported image: {0}")]
    Unsupported(String),
}

/// One broken invariant: which structure, where (block address, inode number, path when
/// known) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub structure: String,
    pub location: String,
    pub message: String,
    pub repaired: bool,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at {}: {}",
            self.structure, self.location, self.message
        )?;
        if self.repaired {
            write!(f, " (repaired)")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FsckStats {
    /// Reachable inodes, the root and orphan directories included.
    pub inodes: u64,
    pub directories: u64,
    /// Regular files.
    pub files: u64,
    /// Metadata regions plus every block a reachable inode owns.
    pub blocks_used: u64,
}

#[derive(Debug, Clone, Default)]
pub struct FsckReport {
    /// Problems found; with `--repair`, those fixed are marked `repaired` and the rest are
    /// what the check after the repair still found.
    pub problems: Vec<Problem>,
    /// Things worth saying that are not errors (journal to replay, not cleanly unmounted).
    pub notes: Vec<String>,
    pub stats: FsckStats,
    /// Problems were found and every one was repaired.
    pub repaired_all: bool,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn exit_code(&self) -> i32 {
        if self.problems.is_empty() {
            EXIT_CLEAN
        } else if self.problems.iter().all(|p| p.repaired) {
            EXIT_REPAIRED
        } else {
            EXIT_ERRORS_LEFT
        }
    }

    /// The human report: one line per problem, the notes, and a summary line.
    pub fn render(&self, image: &str) -> String {
        let mut out = String::new();
        for p in &self.problems {
            out.push_str(&format!("{p}\n"));
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        let s = &self.stats;
        let counts = format!(
            "{} inodes ({} directories, {} regular files), {} blocks used",
            s.inodes, s.directories, s.files, s.blocks_used
        );
        let repaired = self.problems.iter().filter(|p| p.repaired).count();
        let summary = match self.exit_code() {
            EXIT_CLEAN => format!("{image}: clean, {counts}"),
            EXIT_REPAIRED => format!("{image}: {repaired} problems found and repaired, {counts}"),
            _ => format!(
                "{image}: {} problems left ({repaired} repaired), {counts}",
                self.problems.len() - repaired
            ),
        };
        out.push_str(&summary);
        out.push('\n');
        out
    }

    /// The `--json` report: one object.
    pub fn to_json(&self, image: &str) -> serde_json::Value {
        serde_json::json!({
            "image": image,
            "clean": self.is_clean(),
            "exit_code": self.exit_code(),
            "problems": self.problems,
            "notes": self.notes,
            "stats": self.stats,
        })
    }
}

/// The `--json` report of a run that could not judge the image.
pub fn error_json(image: &str, err: &FsckError) -> serde_json::Value {
    serde_json::json!({
        "image": image,
        "clean": false,
        "exit_code": EXIT_OPERATIONAL,
        "error": err.to_string(),
        "problems": [],
        "notes": [],
        "stats": FsckStats::default(),
    })
}

/// An in-use metadata byte range: `bytes` of block `block` hold part of `structure` (named
/// as fsck names it in problems).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRange {
    pub block: u64,
    pub bytes: std::ops::Range<usize>,
    pub structure: &'static str,
}

/// Checks the image in `store`; with `opts.repair`, repairs it and checks again.
pub fn check(store: &dyn BlockStore, opts: &FsckOptions) -> Result<FsckReport, FsckError> {
    let mut sb = match check::read_superblock(store)? {
        Ok(sb) => sb,
        Err(p) => {
            return Ok(FsckReport {
                problems: vec![p],
                ..FsckReport::default()
            })
        }
    };
    if let Some(p) = size_problem(store, &sb) {
        return Ok(FsckReport {
            problems: vec![p],
            ..FsckReport::default()
        });
    }
    let geo = sb.geometry;
    let mut notes = Vec::new();
    let first = if opts.repair {
        match journal::replay(store, &geo) {
            Ok((0, _)) => {}
            Ok((n, _)) => notes.push(format!("replayed {n} journal transactions")),
            // The check below reports why the journal could not be read.
            Err(JournalError::Io(e)) => return Err(e.into()),
            Err(_) => {}
        }
        // The log may have carried a newer superblock (a conversion step).
        if let Ok(replayed) = check::read_superblock(store)? {
            sb = replayed;
        }
        run_pass(store)?
    } else {
        match journal::scan(store, &geo) {
            Ok(log) if !log.transactions.is_empty() => {
                notes.push(format!(
                    "the journal holds {} complete transactions not yet replayed; checked the image as it will be after replay",
                    log.transactions.len()
                ));
                let view = overlay::Overlay::new(
                    store,
                    log.transactions.into_iter().flat_map(|t| t.blocks),
                );
                run_pass(&view)?
            }
            Err(JournalError::Io(e)) => return Err(e.into()),
            _ => run_pass(store)?,
        }
    };
    let (mut pass, journal_problems) = first;

    if !opts.repair {
        notes.append(&mut pass.notes);
        let mut problems: Vec<Problem> = journal_problems;
        problems.extend(pass.problems.into_iter().map(|f| f.problem));
        return Ok(FsckReport {
            problems,
            notes,
            stats: pass.stats,
            repaired_all: false,
        });
    }

    let found_any = !pass.problems.is_empty() || !journal_problems.is_empty();
    let freed_orphans = pass.plan.orphans_freed;
    repair(store, &sb, &pass.plan)?;
    if freed_orphans > 0 {
        notes.push(format!("freed {freed_orphans} orphaned inodes"));
    }
    if sb.state != FsState::Clean {
        notes.push("marked the image clean".into());
    }
    let (mut second, journal_left) = run_pass(store)?;
    notes.append(&mut second.notes);
    let left: Vec<Problem> = journal_left
        .into_iter()
        .chain(second.problems.into_iter().map(|f| f.problem))
        .collect();
    if !left.is_empty() {
        mark_state(store, FsState::Errors)?;
    }
    let mut problems: Vec<Problem> = pass
        .problems
        .into_iter()
        .filter(|f| f.fixable && !left.iter().any(|l| same(l, &f.problem)))
        .map(|f| Problem {
            repaired: true,
            ..f.problem
        })
        .collect();
    problems.extend(left);
    let repaired_all = found_any && problems.iter().all(|p| p.repaired);
    notes.dedup();
    Ok(FsckReport {
        problems,
        notes,
        stats: second.stats,
        repaired_all,
    })
}

fn same(a: &Problem, b: &Problem) -> bool {
    a.structure == b.structure && a.location == b.location && a.message == b.message
}

/// Every in-use metadata byte range of the image, found by the same walk as `check`.
/// On an image whose superblock does not decode, that is the superblock alone.
pub fn metadata_map(store: &dyn BlockStore) -> Result<Vec<MetaRange>, FsckError> {
    let sb = match check::read_superblock(store)? {
        Ok(sb) => sb,
        Err(_) => {
            return Ok(vec![MetaRange {
                block: 0,
                bytes: 0..BLOCK_SIZE,
                structure: check::SUPERBLOCK,
            }])
        }
    };
    if size_problem(store, &sb).is_some() {
        return Ok(vec![MetaRange {
            block: 0,
            bytes: 0..BLOCK_SIZE,
            structure: check::SUPERBLOCK,
        }]);
    }
    let (pass, _) = run_pass(store)?;
    let mut meta = pass.meta;
    meta.sort_by_key(|m| (m.block, m.bytes.start));
    meta.dedup();
    Ok(meta)
}

fn size_problem(store: &dyn BlockStore, sb: &Superblock) -> Option<Problem> {
    let total = sb.geometry.total_blocks;
    (store.num_blocks() < total).then(|| {
        check::problem(
            check::SUPERBLOCK,
            "block 0".into(),
            format!(
                "records {total} blocks but the image holds only {}",
                store.num_blocks()
            ),
        )
    })
}

/// One pass over the image (which must be as the superblock describes): the walk's
/// findings and the journal's problems.
fn run_pass(store: &dyn BlockStore) -> Result<(Pass, Vec<Problem>), FsckError> {
    let sb = match check::read_superblock(store)? {
        Ok(sb) => sb,
        Err(p) => {
            // Only a repair writes block 0, and it writes a valid one; be safe anyway.
            return Ok((empty_pass(), vec![p]));
        }
    };
    let geo = sb.geometry;
    let mut journal_problems = Vec::new();
    let jloc = format!("block {}", geo.journal_start);
    match journal::scan(store, &geo) {
        Ok(_) => {}
        Err(JournalError::Io(e)) => return Err(e.into()),
        Err(JournalError::Super(e)) => {
            journal_problems.push(check::problem(check::JOURNAL_SUPER, jloc, e.to_string()))
        }
        Err(e @ JournalError::SizeMismatch { .. }) => {
            journal_problems.push(check::problem(check::JOURNAL_SUPER, jloc, e.to_string()))
        }
        Err(e @ JournalError::BadTarget { .. }) => journal_problems.push(check::problem(
            BlockKind::JournalDesc.name(),
            jloc,
            e.to_string(),
        )),
    }
    let mut pass = Checker::new(store, sb).run()?;
    if journal_problems.is_empty() && reset_was_torn(store, &geo)? {
        pass.notes.push(
            "the journal superblock was torn by a power cut during a checkpoint's reset (its checksum is stale, its fields are whole); the next mount rewrites it".into(),
        );
    }
    Ok((pass, journal_problems))
}

/// Whether the journal superblock is readable only as a reset a power cut tore.
fn reset_was_torn(store: &dyn BlockStore, geo: &Geometry) -> io::Result<bool> {
    use formats::journal::JournalSuper;
    let mut b = vec![0u8; BLOCK_SIZE];
    store.read(geo.journal_start, &mut b)?;
    let at = BlockAddr(geo.journal_start);
    Ok(JournalSuper::decode(&b, at).is_err()
        && JournalSuper::decode_allowing_torn_reset(&b, at).is_ok())
}

fn empty_pass() -> Pass {
    Pass {
        problems: Vec::new(),
        notes: Vec::new(),
        stats: FsckStats::default(),
        meta: Vec::new(),
        plan: Plan::default(),
    }
}

fn read_block(store: &dyn BlockStore, addr: u64) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; BLOCK_SIZE];
    store.read(addr, &mut b)?;
    Ok(b)
}

/// Applies a plan. Every structure rewritten here decoded with a valid checksum in the
/// pass that made the plan, or is rebuilt whole from what is reachable.
fn repair(store: &dyn BlockStore, sb: &Superblock, plan: &Plan) -> Result<(), FsckError> {
    let geo = sb.geometry;
    let newest = sb.newest_layout();
    let io_err = |e: formats::FormatError| FsckError::Io(io::Error::other(e.to_string()));

    for &ino in &plan.free_inodes {
        let (addr, off) = geo.inode_location(ino);
        let mut b = read_block(store, addr.0)?;
        let slot = check::freed_slot(ino, &b[off..off + INODE_SIZE], newest);
        b[off..off + INODE_SIZE].copy_from_slice(&slot);
        store.write(addr.0, &b)?;
    }
    if let Some((haddr, header, buckets)) = &plan.empty_orphan_dir {
        let owner = formats::superblock::ORPHAN_INO;
        for &a in buckets {
            store.write(
                a,
                &Bucket::default()
                    .encode(owner, BlockAddr(a))
                    .map_err(io_err)?[..],
            )?;
        }
        let h = formats::dir::DirHeader {
            entry_count: 0,
            ..*header
        };
        store.write(*haddr, &h.encode(owner, BlockAddr(*haddr))[..])?;
    }
    for &(ino, nlink) in &plan.nlink {
        if plan.free_inodes.contains(&ino) {
            continue;
        }
        let (addr, off) = geo.inode_location(ino);
        let mut b = read_block(store, addr.0)?;
        let Ok(Some(mut i)) = Inode::decode(ino, &b[off..off + INODE_SIZE], newest) else {
            continue;
        };
        i.nlink = nlink;
        i.encode(ino, &mut b[off..off + INODE_SIZE])
            .map_err(io_err)?;
        store.write(addr.0, &b)?;
    }
    for (ino, haddr, header) in &plan.entry_count {
        if *ino == formats::superblock::ORPHAN_INO && plan.empty_orphan_dir.is_some() {
            continue;
        }
        store.write(*haddr, &header.encode(*ino, BlockAddr(*haddr))[..])?;
    }
    for (kind, start, bits, ok) in [
        (
            BlockKind::InodeBitmap,
            geo.inode_bitmap_start,
            &plan.inode_bits,
            &plan.inode_bitmap_ok,
        ),
        (
            BlockKind::BlockBitmap,
            geo.block_bitmap_start,
            &plan.block_bits,
            &plan.block_bitmap_ok,
        ),
    ] {
        for (i, &good) in ok.iter().enumerate() {
            let Some(payload) = bits.get(i * PAYLOAD_SIZE..(i + 1) * PAYLOAD_SIZE) else {
                continue;
            };
            if !good {
                continue;
            }
            let addr = start + i as u64;
            let old = read_block(store, addr)?;
            if &old[..PAYLOAD_SIZE] != payload {
                store.write(addr, &bitmap::encode(kind, payload, BlockAddr(addr))[..])?;
            }
        }
    }
    let mut new_sb = sb.clone();
    if plan
        .inode_bitmap_ok
        .iter()
        .chain(&plan.block_bitmap_ok)
        .all(|ok| *ok)
        && !plan.inode_bits.is_empty()
        && !plan.block_bits.is_empty()
    {
        let (fb, fi) = check::free_from_bits(&geo, &plan.inode_bits, &plan.block_bits);
        new_sb.free_blocks = fb;
        new_sb.free_inodes = fi;
    }
    new_sb.state = FsState::Clean;
    if new_sb != *sb {
        store.write(0, &new_sb.encode()[..])?;
    }
    store.flush()?;
    Ok(())
}

fn mark_state(store: &dyn BlockStore, state: FsState) -> Result<(), FsckError> {
    if let Ok(mut sb) = check::read_superblock(store)? {
        if sb.state != state {
            sb.state = state;
            store.write(0, &sb.encode()[..])?;
            store.flush()?;
        }
    }
    Ok(())
}
