//! The io_uring engine: one ring per worker thread, up to `queue_depth` data requests
//! outstanding. Metadata operations, opens, closes and flushes stay synchronous on the
//! worker thread while its data requests are in flight.
//!
//! Every buffer and file a request uses is owned by the in-flight table entry of that
//! request until its completion has been reaped; if waiting for completions ever fails,
//! the table and ring are leaked rather than freed under the kernel.

use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};

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
    ring: IoUring,
    bufs: Vec<AlignedBuf>,
}

impl UringEngine {
    pub fn new(queue_depth: u32, block_size: u32) -> io::Result<UringEngine> {
        let ring = IoUring::new(queue_depth.next_power_of_two().max(2))?;
        let bufs = (0..queue_depth)
            .map(|_| AlignedBuf::new(block_size as usize))
            .collect();
        Ok(UringEngine { ring, bufs })
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
                    // The kernel may still write into the buffers of the outstanding
                    // requests: never free them.
                    std::mem::forget(table);
                    std::mem::forget(self);
                    return;
                }
            }
            let done: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (idx, res) in done {
                let idx = idx as usize;
                let Some(f) = table.get_mut(idx).and_then(Option::take) else {
                    continue;
                };
                outstanding -= 1;
                let res = if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res as usize)
                };
                match f.kind {
                    OpKind::Write => {
                        w.complete_write(idx, f.start, f.g, f.seq, res, f.handle.file())
                    }
                    _ => {
                        w.complete_read(idx, f.start, f.g, f.before, res, self.bufs[idx].as_slice())
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
            block::fill(self.bufs[idx].as_mut_slice(), file, off, seq);
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

    /// Queues the request of table slot `idx`; false if the submission queue is full.
    fn push(&mut self, w: &Worker<'_>, idx: usize, table: &[Option<InFlight<'_>>]) -> bool {
        let f = table[idx].as_ref().expect("slot filled");
        let (_, off) = w.locate(f.g);
        let fd = types::Fd(f.handle.file().as_raw_fd());
        let buf = &mut self.bufs[idx];
        let len = buf.len() as u32;
        let ptr = buf.as_mut_slice().as_mut_ptr();
        let entry = match f.kind {
            OpKind::Write => opcode::Write::new(fd, ptr, len).offset(off).build(),
            _ => opcode::Read::new(fd, ptr, len).offset(off).build(),
        }
        .user_data(idx as u64);
        // SAFETY: the buffer `self.bufs[idx]` (heap memory that does not move) and the
        // file behind `fd` (owned by, or borrowed for the whole run through,
        // `table[idx]`) stay alive and untouched until the completion with user data
        // `idx` is reaped in `run`; slot `idx` is not reused before that, and `run`
        // leaks both rather than dropping them if it can no longer wait.
        unsafe { self.ring.submission().push(&entry).is_ok() }
    }
}
