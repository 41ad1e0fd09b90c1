//! The io_uring engine: one ring per worker thread, up to `queue_depth` data requests
//! outstanding. Metadata operations, opens, closes and flushes stay synchronous on the
//! worker thread while its data requests are in flight.
//!
//! The ring is the block driver's safe [`FileRing`]: it owns each request's buffer until
//! the completion is reaped, and holds its own reference to the request's file. The
//! in-flight table keeps the handle the worker opened for the request until then, so a
//! per-request file is closed (and timed) after its I/O, as in the sync engine; if
//! waiting for completions ever fails, the table and ring are leaked.

use std::io;
use std::ops::Range;
use std::os::fd::AsFd;

use blockdev::engine::{FileOp, FileRing};

use super::block;
use super::config::OpKind;
use super::files::AlignedBuf;
use super::ledger::Snapshot;
use super::report::{ErrorKind, StopReason};
use super::worker::{Handle, Planned, Worker};

struct InFlight<'a> {
    kind: OpKind,
    g: u64,
    seq: u64,
    file: u32,
    start: u64,
    before: Snapshot,
    handle: Handle<'a>,
}

pub struct UringEngine {
    ring: FileRing,
    /// Each slot's buffer while no request of the slot is in flight (the ring holds it
    /// meanwhile), and the usable range of its allocation.
    bufs: Vec<Option<AlignedBuf>>,
    ranges: Vec<Range<usize>>,
}

impl UringEngine {
    pub fn new(queue_depth: u32, block_size: u32) -> io::Result<UringEngine> {
        let ring = FileRing::new(queue_depth)?;
        let bufs = (0..queue_depth)
            .map(|_| Some(AlignedBuf::new(block_size as usize)))
            .collect();
        let ranges = vec![0..0; queue_depth as usize];
        Ok(UringEngine { ring, bufs, ranges })
    }

    pub fn run(mut self, w: &mut Worker<'_>) {
        let qd = self.bufs.len();
        let mut table: Vec<Option<InFlight<'_>>> = (0..qd).map(|_| None).collect();
        let mut outstanding = 0usize;
        let mut exhausted = false;
        loop {
            while outstanding < qd && !exhausted && !w.sh.stopping() {
                match w.next() {
                    None => exhausted = true,
                    Some(Planned::Meta(k)) => w.meta_op(k),
                    Some(Planned::Data { kind, g, seq }) => {
                        let idx = table.iter().position(Option::is_none).expect("a free slot");
                        if let Some(f) = self.prepare(w, idx, kind, g, seq) {
                            table[idx] = Some(f);
                            if !self.push(w, idx, &table) {
                                let f = table[idx].take().expect("just set");
                                if f.kind == OpKind::Write {
                                    w.sh.ledger.abort_write(f.g, f.seq);
                                }
                                w.finish(idx, f.kind, f.start, false, 0);
                                w.release(f.handle, f.file);
                                continue;
                            }
                            outstanding += 1;
                        }
                    }
                }
            }
            if outstanding == 0 && (exhausted || w.sh.stopping()) {
                return;
            }
            if outstanding == 0 {
                continue;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    w.report(
                        ErrorKind::Io,
                        OpKind::Read,
                        None,
                        None,
                        None,
                        e.raw_os_error(),
                        format!("io_uring wait failed: {e}"),
                    );
                    w.sh.halt(StopReason::Errors);
                    // The kernel may still use the outstanding requests' buffers and
                    // files: leak them with the ring rather than wait for them in its drop.
                    std::mem::forget(table);
                    std::mem::forget(self);
                    return;
                }
            }
            for c in self.ring.reap() {
                let idx = c.slot;
                let range = self.ranges[idx].clone();
                self.bufs[idx] = Some(AlignedBuf::from_parts(c.buf, range));
                let Some(f) = table.get_mut(idx).and_then(Option::take) else {
                    continue;
                };
                outstanding -= 1;
                let res = c.result;
                match f.kind {
                    OpKind::Write => {
                        w.complete_write(idx, f.start, f.g, f.seq, res, f.handle.file())
                    }
                    _ => {
                        let buf = self.bufs[idx].as_ref().expect("given back");
                        w.complete_read(idx, f.start, f.g, f.before, res, buf.as_slice())
                    }
                }
                w.release(f.handle, f.file);
            }
        }
    }

    /// Fills the buffer and starts timing; `None` if the file could not be opened.
    fn prepare<'a>(
        &mut self,
        w: &mut Worker<'a>,
        idx: usize,
        kind: OpKind,
        g: u64,
        seq: u64,
    ) -> Option<InFlight<'a>> {
        let (file, off) = w.locate(g);
        let Some(handle) = w.handle(file) else {
            if kind == OpKind::Write {
                w.sh.ledger.abort_write(g, seq);
            }
            return None;
        };
        if kind == OpKind::Write {
            let buf = self.bufs[idx].as_mut().expect("a free slot's buffer");
            block::fill(buf.as_mut_slice(), file, off, seq);
        }
        let start = w.begin(idx, kind, Some(file), Some(off));
        let before = w.sh.ledger.snapshot(g);
        Some(InFlight {
            kind,
            g,
            seq,
            file,
            start,
            before,
            handle,
        })
    }

    /// Queues the request of table slot `idx`; false if the ring cannot take it (its
    /// submission queue is full).
    fn push(&mut self, w: &Worker<'_>, idx: usize, table: &[Option<InFlight<'_>>]) -> bool {
        let f = table[idx].as_ref().expect("slot filled");
        let (_, off) = w.locate(f.g);
        let (raw, range) = self.bufs[idx]
            .take()
            .expect("a free slot's buffer")
            .into_parts();
        self.ranges[idx] = range.clone();
        let op = match f.kind {
            OpKind::Write => FileOp::Write,
            _ => FileOp::Read,
        };
        match self
            .ring
            .push(idx, op, f.handle.file().as_fd(), off, raw, range.clone())
        {
            Ok(()) => true,
            Err(raw) => {
                self.bufs[idx] = Some(AlignedBuf::from_parts(raw, range));
                false
            }
        }
    }
}
