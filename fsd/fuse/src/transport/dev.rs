//! The `/dev/fuse` transport: N workers, each reading a request, serving it and writing
//! its reply. The descriptor is non-blocking and shared: workers wait in poll(2) on it
//! and on the [`Stopper`]'s eventfd, so a stop reaches every worker between requests
//! and a worker that loses a race for a request just waits again.

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use zerocopy::IntoBytes;

use super::{StopReason, Stopper};
use crate::abi::OutHeader;
use crate::filesystem::Filesystem;
use crate::session::{ReplySink, Served, Session};

/// Replies written to `/dev/fuse`, header and payload in one writev(2).
struct DevReply<'a> {
    fuse: &'a File,
}

impl ReplySink for DevReply<'_> {
    fn send(&mut self, unique: u64, error: i32, payload: &[&[u8]]) -> io::Result<()> {
        let len =
            core::mem::size_of::<OutHeader>() + payload.iter().map(|p| p.len()).sum::<usize>();
        let h = OutHeader {
            len: len as u32,
            error,
            unique,
        };
        let mut parts = Vec::with_capacity(payload.len() + 1);
        parts.push(IoSlice::new(h.as_bytes()));
        parts.extend(payload.iter().map(|p| IoSlice::new(p)));
        match self.fuse.write_vectored(&parts) {
            Ok(n) if n == len => Ok(()),
            Ok(n) => Err(io::Error::other(format!(
                "short reply write: {n} of {len} bytes"
            ))),
            // The kernel no longer waits for this reply (the request was interrupted, or
            // it was an interrupt's answer to a finished request).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Whether an error of the connection means it is gone.
fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENODEV) | Some(libc::ECONNABORTED) | Some(libc::EBADF)
    )
}

/// Serves `session` on connection `fuse` with `threads` workers until `stopper` asks them
/// to return or the connection ends.
pub fn serve<F: Filesystem + 'static>(
    session: &Arc<Session<F>>,
    fuse: &File,
    threads: usize,
    stopper: &Arc<Stopper>,
) -> io::Result<StopReason> {
    let mut workers = Vec::new();
    for i in 0..threads.max(1) {
        let fuse = fuse.try_clone()?;
        let session = session.clone();
        let stopper = stopper.clone();
        workers.push(
            thread::Builder::new()
                .name(format!("fuse-{i}"))
                .spawn(move || worker(&session, &fuse, &stopper))?,
        );
    }
    let mut reason = Ok(StopReason::Woken);
    for w in workers {
        match w.join() {
            Ok(Ok(StopReason::Woken)) => {}
            Ok(Ok(StopReason::Disconnected)) => {
                if reason.is_ok() {
                    reason = Ok(StopReason::Disconnected);
                }
            }
            Ok(Err(e)) => reason = Err(e),
            Err(_) => reason = Err(io::Error::other("a FUSE worker panicked")),
        }
    }
    reason
}

fn worker<F: Filesystem>(
    session: &Session<F>,
    fuse: &File,
    stopper: &Stopper,
) -> io::Result<StopReason> {
    let mut buf = vec![0u8; session.request_buffer_size()];
    let mut scratch = Vec::with_capacity(64 << 10);
    let fds = [fuse.as_raw_fd(), stopper.wake_fd()];
    loop {
        if stopper.is_stopping() {
            return Ok(StopReason::Woken);
        }
        let ready = molt_sys::poll_readable(&fds, Duration::from_secs(1))?;
        if ready[1] {
            return Ok(StopReason::Woken);
        }
        if !ready[0] {
            continue;
        }
        let n = match (&*fuse).read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) if is_disconnect(&e) => return Ok(StopReason::Disconnected),
            Err(e) => return Err(e),
        };
        match session.handle(&buf[..n], &mut DevReply { fuse }, &mut scratch) {
            Ok(Served::Replied | Served::NoReply) => {}
            Ok(Served::Destroyed) => return Ok(StopReason::Disconnected),
            Err(e) if is_disconnect(&e) => return Ok(StopReason::Disconnected),
            Err(e) => return Err(e),
        }
    }
}
