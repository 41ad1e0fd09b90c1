//! One worker thread: chooses operations, issues them through the sync path or the
//! io_uring engine, verifies what comes back and records everything.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::block;
use super::config::{OpContext, OpKind, Pattern, Phase, SyncKind};
use super::files::{data_file_rel, AlignedBuf};
use super::ledger::{self, Snapshot, Verdict};
use super::report::{ErrorKind, OpError};
use super::rng::Rng;
use super::runner::Shared;
use super::uring::UringEngine;

/// Size of the files in the metadata namespace.
const META_FILE_LEN: usize = 64;
/// File id written into metadata files' blocks (never a data file id).
const META_FILE_ID: u32 = u32::MAX;

/// An operation chosen but not yet issued.
pub enum Planned {
    /// `seq` is the claimed write sequence (0 for reads).
    Data {
        kind: OpKind,
        g: u64,
        seq: u64,
    },
    Meta(OpKind),
}

enum Source {
    /// Prepare (write) or verify (read) every block in `next..end` once.
    Range {
        next: u64,
        end: u64,
        write: bool,
    },
    Main {
        cursor: u64,
    },
}

/// A data file handle: one of the held files or one opened for this operation.
pub enum Handle<'a> {
    Held(&'a File),
    Owned(File),
}

impl Handle<'_> {
    pub fn file(&self) -> &File {
        match self {
            Handle::Held(f) => f,
            Handle::Owned(f) => f,
        }
    }
}

/// This thread's files in the metadata namespace and what the tool expects of them.
struct MetaNs {
    dir: PathBuf,
    rel: String,
    live: Vec<u64>,
    next: u64,
}

pub struct Worker<'a> {
    pub sh: &'a Shared,
    pub thread: u32,
    pub phase: Phase,
    rng: Rng,
    src: Source,
    meta: Option<MetaNs>,
    writes_since_sync: u32,
    index: u64,
    /// Watch slot for operations done synchronously (metadata, open, close, flush).
    sync_slot: usize,
    bs: usize,
}

impl<'a> Worker<'a> {
    pub fn new(sh: &'a Shared, thread: u32, phase: Phase, sync_slot: usize) -> Worker<'a> {
        let cfg = &sh.cfg;
        let total = cfg.total_blocks();
        let start = total * u64::from(thread) / u64::from(cfg.threads);
        let src = match phase {
            Phase::Prepare | Phase::Verify => Source::Range {
                next: start,
                end: total * u64::from(thread + 1) / u64::from(cfg.threads),
                write: phase == Phase::Prepare,
            },
            Phase::Main => Source::Main { cursor: start },
        };
        let meta = (phase == Phase::Main && cfg.mix.has_metadata()).then(|| MetaNs {
            dir: meta_dir(sh, thread),
            rel: format!("meta/t{thread}"),
            live: Vec::new(),
            next: 0,
        });
        Worker {
            sh,
            thread,
            phase,
            rng: Rng::new(cfg.seed ^ (u64::from(thread) + 1).wrapping_mul(0xA24B_AED4_963E_E407)),
            src,
            meta,
            writes_since_sync: 0,
            index: 0,
            sync_slot,
            bs: cfg.block_size as usize,
        }
    }

    /// Runs the phase to its end (or until the run is stopped).
    pub fn run(mut self, engine: Option<UringEngine>) {
        match engine {
            Some(e) => e.run(&mut self),
            None => self.run_sync(),
        }
    }

    fn run_sync(&mut self) {
        let mut buf = AlignedBuf::new(self.bs);
        while !self.sh.stopping() {
            match self.next() {
                None => break,
                Some(Planned::Meta(k)) => self.meta_op(k),
                Some(Planned::Data { kind, g, seq }) => self.data_sync(kind, g, seq, &mut buf),
            }
        }
    }

    /// (file, byte offset) of global block `g`.
    pub fn locate(&self, g: u64) -> (u32, u64) {
        let bpf = self.sh.cfg.blocks_per_file();
        ((g / bpf) as u32, (g % bpf) * self.bs as u64)
    }

    /// The next operation, or `None` when the phase's work is done.
    pub fn next(&mut self) -> Option<Planned> {
        let sh = self.sh;
        let cfg = &sh.cfg;
        let total = cfg.total_blocks();
        match &mut self.src {
            Source::Range { next, end, write } => {
                if *next >= *end {
                    return None;
                }
                let g = *next;
                *next += 1;
                if !*write {
                    return Some(Planned::Data {
                        kind: OpKind::Read,
                        g,
                        seq: 0,
                    });
                }
                // Ranges of different threads are disjoint, so the block is free.
                let seq = sh.ledger.try_begin_write(g)?;
                Some(Planned::Data {
                    kind: OpKind::Write,
                    g,
                    seq,
                })
            }
            Source::Main { cursor } => {
                if let Some(limit) = cfg.ops {
                    if sh.ops_claimed.fetch_add(1, Ordering::Relaxed) >= limit {
                        return None;
                    }
                }
                let kind = cfg.mix.pick(self.rng.below(cfg.mix.total()));
                if !kind.is_data() {
                    return Some(Planned::Meta(kind));
                }
                let mut pick = |rng: &mut Rng| match cfg.pattern {
                    Pattern::Rand => rng.below(total),
                    Pattern::Seq => {
                        let g = *cursor;
                        *cursor = (*cursor + 1) % total;
                        g
                    }
                };
                let mut g = pick(&mut self.rng);
                if kind == OpKind::Write {
                    // A block with a write in flight is skipped; after a few busy
                    // blocks in a row the op becomes a read so op counts stay exact.
                    for _ in 0..16 {
                        if let Some(seq) = sh.ledger.try_begin_write(g) {
                            return Some(Planned::Data { kind, g, seq });
                        }
                        g = pick(&mut self.rng);
                    }
                }
                Some(Planned::Data {
                    kind: OpKind::Read,
                    g,
                    seq: 0,
                })
            }
        }
    }

    /// Starts timing an operation in watch slot `slot`, running the delay hook.
    /// Returns the start time (ns since the run start).
    pub fn begin(
        &mut self,
        slot: usize,
        op: OpKind,
        file: Option<u32>,
        offset: Option<u64>,
    ) -> u64 {
        let start = self.sh.now_ns();
        self.sh.threads[self.thread as usize]
            .watch
            .begin(slot, start, op, file, offset);
        if let Some(hook) = &self.sh.cfg.delay_hook {
            let ctx = OpContext {
                phase: self.phase,
                thread: self.thread,
                op,
                file,
                offset,
                index: self.index,
            };
            if let Some(d) = (hook.0)(&ctx) {
                std::thread::sleep(d);
            }
        }
        self.index += 1;
        start
    }

    /// Ends the operation in `slot` and records it.
    pub fn finish(&mut self, slot: usize, op: OpKind, start: u64, ok: bool, bytes: u64) {
        let sh = self.sh;
        let end = sh.now_ns();
        let t = &sh.threads[self.thread as usize];
        t.watch.end(slot);
        {
            let mut st = t.stats.lock().unwrap_or_else(|e| e.into_inner());
            if st.ops.is_empty() {
                st.ops.resize_with(OpKind::ALL.len(), Default::default);
            }
            let acc = &mut st.ops[op.index()];
            acc.hist.record(end.saturating_sub(start));
            acc.count += 1;
            acc.errors += u64::from(!ok);
            acc.bytes += bytes;
            st.timeline.record(end);
        }
        sh.stall.completion(end);
        sh.progress.ops.fetch_add(1, Ordering::Relaxed);
        match op {
            OpKind::Read => sh.progress.bytes_read.fetch_add(bytes, Ordering::Relaxed),
            OpKind::Write => sh
                .progress
                .bytes_written
                .fetch_add(bytes, Ordering::Relaxed),
            _ => 0,
        };
    }

    #[allow(clippy::too_many_arguments)]
    pub fn report(
        &self,
        kind: ErrorKind,
        op: OpKind,
        file: Option<u32>,
        path: Option<String>,
        offset: Option<u64>,
        errno: Option<i32>,
        detail: String,
    ) {
        let now = self.sh.now_ns();
        self.sh.record_error(OpError {
            kind,
            op,
            phase: self.phase,
            thread: self.thread,
            path: path.or_else(|| file.map(data_file_rel)),
            file,
            offset,
            errno,
            detail,
            time: Duration::from_nanos(now),
            unix_ms: self.sh.t0_unix_ms + now / 1_000_000,
        });
    }

    fn io_error(
        &self,
        op: OpKind,
        file: Option<u32>,
        path: Option<String>,
        offset: Option<u64>,
        e: &io::Error,
    ) {
        self.report(
            ErrorKind::Io,
            op,
            file,
            path,
            offset,
            e.raw_os_error(),
            e.to_string(),
        );
    }

    /// A handle for data file `file`: the held one, or a freshly opened one (timed as
    /// an open). `None` after an open failure, which has been reported.
    pub fn handle(&mut self, file: u32) -> Option<Handle<'a>> {
        let sh: &'a Shared = self.sh;
        if let Some(f) = sh.files.held(file) {
            return Some(Handle::Held(f));
        }
        let slot = self.sync_slot;
        let start = self.begin(slot, OpKind::Open, Some(file), None);
        let res = sh.files.open(file);
        self.finish(slot, OpKind::Open, start, res.is_ok(), 0);
        match res {
            Ok(f) => Some(Handle::Owned(f)),
            Err(e) => {
                self.io_error(OpKind::Open, Some(file), None, None, &e);
                None
            }
        }
    }

    /// Closes a per-operation handle, timed as a close, reporting its errors (a FUSE
    /// flush can fail there).
    pub fn release(&mut self, h: Handle<'a>, file: u32) {
        let Handle::Owned(f) = h else { return };
        let slot = self.sync_slot;
        let start = self.begin(slot, OpKind::Close, Some(file), None);
        let res = molt_sys::close(f.into());
        self.finish(slot, OpKind::Close, start, res.is_ok(), 0);
        if let Err(e) = res {
            self.io_error(OpKind::Close, Some(file), None, None, &e);
        }
    }

    fn data_sync(&mut self, kind: OpKind, g: u64, seq: u64, buf: &mut AlignedBuf) {
        let (file, off) = self.locate(g);
        let Some(h) = self.handle(file) else {
            if kind == OpKind::Write {
                self.sh.ledger.abort_write(g, seq);
            }
            return;
        };
        let slot = self.sync_slot;
        if kind == OpKind::Write {
            block::fill(buf.as_mut_slice(), file, off, seq);
            let start = self.begin(slot, kind, Some(file), Some(off));
            let res = h.file().write_at(buf.as_slice(), off);
            self.complete_write(slot, start, g, seq, res, h.file());
        } else {
            let start = self.begin(slot, kind, Some(file), Some(off));
            let before = self.sh.ledger.snapshot(g);
            let res = h.file().read_at(buf.as_mut_slice(), off);
            self.complete_read(slot, start, g, before, res, buf.as_slice());
        }
        self.release(h, file);
    }

    /// Records and verifies a finished read of block `g` into `buf`.
    pub fn complete_read(
        &mut self,
        slot: usize,
        start: u64,
        g: u64,
        before: Snapshot,
        res: io::Result<usize>,
        buf: &[u8],
    ) {
        let after = self.sh.ledger.snapshot(g);
        let (file, off) = self.locate(g);
        let (op, bs) = (OpKind::Read, self.bs);
        match res {
            Err(e) => {
                self.finish(slot, op, start, false, 0);
                self.io_error(op, Some(file), None, Some(off), &e);
            }
            Ok(n) if n < bs => {
                self.finish(slot, op, start, false, n as u64);
                let detail = format!("read returned {n} of {bs} bytes");
                self.report(
                    ErrorKind::ShortRead,
                    op,
                    Some(file),
                    None,
                    Some(off),
                    None,
                    detail,
                );
            }
            Ok(n) => {
                let verdict = ledger::judge(&buf[..bs], file, off, before, after);
                let ok = !matches!(verdict, Verdict::Mismatch(_));
                self.finish(slot, op, start, ok, n as u64);
                let v = &self.sh.verify;
                match verdict {
                    Verdict::Ok => v.blocks_verified.fetch_add(1, Ordering::Relaxed),
                    Verdict::Torn => v.torn_reads.fetch_add(1, Ordering::Relaxed),
                    Verdict::Unverified => v.unverified.fetch_add(1, Ordering::Relaxed),
                    Verdict::Mismatch(d) => {
                        self.report(
                            ErrorKind::Mismatch,
                            op,
                            Some(file),
                            None,
                            Some(off),
                            None,
                            d,
                        );
                        0
                    }
                };
            }
        }
    }

    /// Records a finished write of version `seq` to block `g`, then flushes `f` when the
    /// sync policy says so.
    pub fn complete_write(
        &mut self,
        slot: usize,
        start: u64,
        g: u64,
        seq: u64,
        res: io::Result<usize>,
        f: &File,
    ) {
        let (file, off) = self.locate(g);
        let (op, bs) = (OpKind::Write, self.bs);
        let ok = matches!(res, Ok(n) if n == bs);
        self.sh.ledger.end_write(g, seq, ok);
        match res {
            Ok(n) if n == bs => self.finish(slot, op, start, true, n as u64),
            Ok(n) => {
                self.finish(slot, op, start, false, n as u64);
                let detail = format!("write returned {n} of {bs} bytes");
                self.report(
                    ErrorKind::ShortWrite,
                    op,
                    Some(file),
                    None,
                    Some(off),
                    None,
                    detail,
                );
            }
            Err(e) => {
                self.finish(slot, op, start, false, 0);
                self.io_error(op, Some(file), None, Some(off), &e);
            }
        }
        if ok {
            self.maybe_sync(file, f);
        }
    }

    fn maybe_sync(&mut self, file: u32, f: &File) {
        let Some(policy) = self.sh.cfg.sync else {
            return;
        };
        self.writes_since_sync += 1;
        if self.writes_since_sync < policy.every {
            return;
        }
        self.writes_since_sync = 0;
        let slot = self.sync_slot;
        let start = self.begin(slot, OpKind::Fsync, Some(file), None);
        let res = match policy.kind {
            SyncKind::Fsync => f.sync_all(),
            SyncKind::Fdatasync => f.sync_data(),
        };
        self.finish(slot, OpKind::Fsync, start, res.is_ok(), 0);
        if let Err(e) = res {
            // Never retried: after a failed flush the page cache may have dropped the
            // data, so a retry that succeeds would prove nothing.
            self.io_error(OpKind::Fsync, Some(file), None, None, &e);
        }
    }

    /// One metadata operation in this thread's own directory, checked against the
    /// thread's model of that directory.
    pub fn meta_op(&mut self, kind: OpKind) {
        let Some(mut ns) = self.meta.take() else {
            return;
        };
        let cap = self.sh.cfg.meta_files as usize;
        let kind = match kind {
            OpKind::Create if ns.live.len() >= cap => OpKind::Unlink,
            OpKind::Stat | OpKind::Rename | OpKind::Unlink if ns.live.is_empty() => OpKind::Create,
            k => k,
        };
        let slot = self.sync_slot;
        let name = |n: u64| format!("m{n:08}");
        match kind {
            OpKind::Create => {
                let n = ns.next;
                ns.next += 1;
                let p = ns.dir.join(name(n));
                let mut content = [0u8; META_FILE_LEN];
                block::fill(&mut content, META_FILE_ID, n, u64::from(self.thread) + 1);
                let start = self.begin(slot, kind, None, None);
                let res = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&p)
                    .and_then(|mut f| f.write_all(&content));
                self.finish(slot, kind, start, res.is_ok(), 0);
                if res.is_ok() || p.symlink_metadata().is_ok() {
                    ns.live.push(n);
                }
                if let Err(e) = res {
                    self.io_error(
                        kind,
                        None,
                        Some(format!("{}/{}", ns.rel, name(n))),
                        None,
                        &e,
                    );
                }
            }
            OpKind::Stat => {
                let n = ns.live[self.rng.below(ns.live.len() as u64) as usize];
                let rel = format!("{}/{}", ns.rel, name(n));
                let start = self.begin(slot, kind, None, None);
                let res = ns.dir.join(name(n)).symlink_metadata();
                let good = matches!(&res, Ok(m) if m.is_file() && m.len() == META_FILE_LEN as u64);
                self.finish(slot, kind, start, good, 0);
                match res {
                    Err(e) => self.io_error(kind, None, Some(rel), None, &e),
                    Ok(m) if !good => {
                        let d = format!(
                            "expected a regular file of {META_FILE_LEN} bytes, found {:?} of {} bytes",
                            m.file_type(),
                            m.len()
                        );
                        self.report(ErrorKind::Mismatch, kind, None, Some(rel), None, None, d);
                    }
                    Ok(_) => {}
                }
            }
            OpKind::Rename => {
                let i = self.rng.below(ns.live.len() as u64) as usize;
                let (from, to) = (ns.live[i], ns.next);
                ns.next += 1;
                let (pf, pt) = (ns.dir.join(name(from)), ns.dir.join(name(to)));
                let start = self.begin(slot, kind, None, None);
                let res = fs::rename(&pf, &pt);
                self.finish(slot, kind, start, res.is_ok(), 0);
                if res.is_ok() || pt.symlink_metadata().is_ok() {
                    ns.live[i] = to;
                }
                if let Err(e) = res {
                    self.io_error(
                        kind,
                        None,
                        Some(format!("{}/{}", ns.rel, name(from))),
                        None,
                        &e,
                    );
                }
            }
            OpKind::Unlink => {
                let i = self.rng.below(ns.live.len() as u64) as usize;
                let n = ns.live[i];
                let p = ns.dir.join(name(n));
                let start = self.begin(slot, kind, None, None);
                let res = fs::remove_file(&p);
                self.finish(slot, kind, start, res.is_ok(), 0);
                if res.is_ok() || p.symlink_metadata().is_err() {
                    ns.live.swap_remove(i);
                }
                if let Err(e) = res {
                    self.io_error(
                        kind,
                        None,
                        Some(format!("{}/{}", ns.rel, name(n))),
                        None,
                        &e,
                    );
                }
            }
            OpKind::Readdir => {
                let start = self.begin(slot, kind, None, None);
                let res: io::Result<Vec<String>> = fs::read_dir(&ns.dir).and_then(|rd| {
                    rd.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                        .collect()
                });
                let mut want: Vec<String> = ns.live.iter().map(|&n| name(n)).collect();
                want.sort();
                let listing = res.map(|mut got| {
                    got.sort();
                    got
                });
                let good = matches!(&listing, Ok(got) if *got == want);
                self.finish(slot, kind, start, good, 0);
                match listing {
                    Err(e) => self.io_error(kind, None, Some(ns.rel.clone()), None, &e),
                    Ok(got) if !good => {
                        let missing: Vec<_> =
                            want.iter().filter(|w| !got.contains(w)).take(5).collect();
                        let extra: Vec<_> =
                            got.iter().filter(|g| !want.contains(g)).take(5).collect();
                        let d = format!(
                            "listing has {} entries, expected {}; missing {missing:?}, unexpected {extra:?}",
                            got.len(),
                            want.len()
                        );
                        self.report(
                            ErrorKind::Mismatch,
                            kind,
                            None,
                            Some(ns.rel.clone()),
                            None,
                            None,
                            d,
                        );
                    }
                    Ok(_) => {}
                }
            }
            _ => {}
        }
        self.meta = Some(ns);
    }
}

/// Metadata directory of `thread`.
pub fn meta_dir(sh: &Shared, thread: u32) -> PathBuf {
    sh.cfg.dir.join("meta").join(format!("t{thread}"))
}
