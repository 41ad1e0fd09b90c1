//! A safe io_uring for reads and writes of ordinary files, one request per slot: what a
//! tool that drives many files at once needs (the stress tool's engine), without the
//! image, block addressing or registered buffers of the block engine.
//!
//! Soundness rests on ownership: a request owns its buffer from [`FileRing::push`] until
//! its completion is reaped, and the ring holds its own reference to the request's file
//! (an io_uring fixed-file slot, filled from the caller's descriptor at `push` and emptied
//! at the completion), so neither the memory nor the file the kernel uses can go away
//! under it, whatever the caller does with its descriptor meanwhile. Dropping the ring
//! waits for every request in flight; if it cannot wait, it leaks their buffers instead.

use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{opcode, types, IoUring};

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOp {
    Read,
    Write,
}

/// The outcome of a request: its slot, the byte count or error, and its buffer back.
#[derive(Debug)]
pub struct FileCompletion {
    pub slot: usize,
    pub result: io::Result<usize>,
    pub buf: Vec<u8>,
}

/// An io_uring with a fixed number of request slots.
pub struct FileRing {
    ring: IoUring,
    /// The buffer of the request in flight in each slot (heap memory: it does not move
    /// when the vector holding it does).
    in_flight: Vec<Option<Vec<u8>>>,
    outstanding: usize,
}

impl std::fmt::Debug for FileRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileRing")
            .field("slots", &self.in_flight.len())
            .field("outstanding", &self.outstanding)
            .finish_non_exhaustive()
    }
}

impl FileRing {
    /// A ring of `slots` request slots (at least one).
    pub fn new(slots: u32) -> io::Result<FileRing> {
        let slots = slots.max(1);
        let ring = IoUring::new(slots.next_power_of_two().max(2))?;
        ring.submitter().register_files(&vec![-1; slots as usize])?;
        Ok(FileRing {
            ring,
            in_flight: (0..slots).map(|_| None).collect(),
            outstanding: 0,
        })
    }

    pub fn slots(&self) -> usize {
        self.in_flight.len()
    }

    /// Requests pushed whose completions are not reaped yet.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Queues `op` on slot `slot`: a read of the file behind `fd` at byte `off` into
    /// `buf[range]`, or a write of `buf[range]` there. The request is started by the next
    /// [`FileRing::submit_and_wait`]. Gives the buffer back if the slot is taken or out of
    /// range, the range does not lie in the buffer, the submission queue is full or the
    /// ring cannot take a reference to the file.
    pub fn push(
        &mut self,
        slot: usize,
        op: FileOp,
        fd: BorrowedFd<'_>,
        off: u64,
        mut buf: Vec<u8>,
        range: Range<usize>,
    ) -> Result<(), Vec<u8>> {
        let free = matches!(self.in_flight.get(slot), Some(None));
        let len = range.end.saturating_sub(range.start);
        if !free || range.start > range.end || range.end > buf.len() || len > u32::MAX as usize {
            return Err(buf);
        }
        // The ring's own reference to the file, for as long as the request runs.
        if self
            .ring
            .submitter()
            .register_files_update(slot as u32, &[fd.as_raw_fd()])
            .is_err()
        {
            return Err(buf);
        }
        let file = types::Fixed(slot as u32);
        let ptr = buf[range].as_mut_ptr();
        let entry = match op {
            FileOp::Read => opcode::Read::new(file, ptr, len as u32).offset(off).build(),
            FileOp::Write => opcode::Write::new(file, ptr, len as u32)
                .offset(off)
                .build(),
        }
        .user_data(slot as u64);
        // SAFETY: the entry points at `len` bytes inside `buf`'s heap memory, which is
        // stored in `in_flight[slot]` below (if the push succeeds) and neither touched nor
        // freed until the completion with user data `slot` is reaped (or leaked, if the
        // ring can no longer wait); the file is the ring's fixed file `slot`, which the ring
        // holds until then.
        let pushed = unsafe { self.ring.submission().push(&entry).is_ok() };
        if !pushed {
            let _ = self
                .ring
                .submitter()
                .register_files_update(slot as u32, &[-1]);
            return Err(buf);
        }
        self.in_flight[slot] = Some(buf);
        self.outstanding += 1;
        Ok(())
    }

    /// Submits everything pushed and waits until at least `want` completions are ready.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<usize> {
        self.ring.submit_and_wait(want)
    }

    /// The completions ready now; each slot is free again.
    pub fn reap(&mut self) -> Vec<FileCompletion> {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let mut out = Vec::with_capacity(done.len());
        for (slot, res) in done {
            let slot = slot as usize;
            let Some(buf) = self.in_flight.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.outstanding -= 1;
            // Drop the ring's reference to the file, so it lives exactly as long as the
            // caller keeps it.
            let _ = self
                .ring
                .submitter()
                .register_files_update(slot as u32, &[-1]);
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(res as usize)
            };
            out.push(FileCompletion { slot, result, buf });
        }
        out
    }
}

impl Drop for FileRing {
    /// The kernel may still write into the buffers of requests in flight: wait for them
    /// all before the buffers are freed.
    fn drop(&mut self) {
        while self.outstanding > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // Cannot wait: leak the buffers rather than free memory the kernel
                    // may still write into.
                    std::mem::forget(std::mem::take(&mut self.in_flight));
                    return;
                }
            }
            let _ = self.reap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn writes_and_reads_reach_the_file_through_the_slots() {
        let path = std::env::temp_dir().join(format!("file-ring-{}", std::process::id()));
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut ring = FileRing::new(2).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let mut buf = vec![0u8; 8192 + 10];
        buf[10..].copy_from_slice(&data);
        ring.push(0, FileOp::Write, f.as_fd(), 4096, buf, 10..8202)
            .unwrap();
        let busy = ring.push(0, FileOp::Read, f.as_fd(), 0, vec![0; 8], 0..8);
        assert!(busy.is_err(), "a slot holds one request");
        assert!(ring
            .push(1, FileOp::Read, f.as_fd(), 0, vec![0; 8], 0..9)
            .is_err());
        ring.submit_and_wait(1).unwrap();
        let done = ring.reap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].slot, 0);
        assert_eq!(done[0].result.as_ref().unwrap(), &8192);
        assert_eq!(ring.outstanding(), 0);
        ring.push(1, FileOp::Read, f.as_fd(), 4096, vec![0; 8192], 0..8192)
            .unwrap();
        drop(f);
        ring.submit_and_wait(1).unwrap();
        let done = ring.reap();
        assert_eq!(
            done[0].buf, data,
            "read after the caller closed its descriptor"
        );
        std::fs::remove_file(&path).unwrap();
    }
}
