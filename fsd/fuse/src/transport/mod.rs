//! The transports that carry requests from the kernel to a [`Session`](crate::Session)
//! and its replies back, and the notifications a server sends on its own.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use zerocopy::IntoBytes;

use crate::abi;

pub mod dev;
#[allow(unsafe_code)]
pub mod uring;

/// Why a transport stopped serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// [`Stopper::stop`] asked it to, between requests.
    Woken,
    /// The kernel ended the connection (unmount or abort).
    Disconnected,
}

/// Asks a transport's workers to return between requests: none returns holding a
/// request it read and has not answered.
pub struct Stopper {
    stopping: AtomicBool,
    wake: OwnedFd,
}

impl Stopper {
    pub fn new() -> io::Result<Arc<Stopper>> {
        Ok(Arc::new(Stopper {
            stopping: AtomicBool::new(false),
            wake: molt_sys::eventfd()?,
        }))
    }

    /// Asks every worker to return; they see it at their next wait. The eventfd stays
    /// readable, so it reaches every worker, however many.
    pub fn stop(&self) -> io::Result<()> {
        self.stopping.store(true, Ordering::SeqCst);
        molt_sys::eventfd_signal(self.wake.as_fd())
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub(crate) fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }
}

/// Messages the server sends the kernel on its own (notifications), on the connection's
/// `/dev/fuse` descriptor, whatever transport carries the requests.
#[derive(Debug)]
pub struct Notifier {
    fuse: File,
}

impl Notifier {
    pub fn new(fuse: File) -> Notifier {
        Notifier { fuse }
    }

    fn send(&self, code: i32, parts: &[&[u8]]) -> io::Result<()> {
        let len =
            core::mem::size_of::<abi::OutHeader>() + parts.iter().map(|p| p.len()).sum::<usize>();
        let h = abi::OutHeader {
            len: len as u32,
            error: code,
            unique: 0,
        };
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(h.as_bytes());
        for p in parts {
            msg.extend_from_slice(p);
        }
        (&self.fuse).write_all(&msg)
    }

    /// The attributes the kernel caches for `ino` are stale (a negative offset: the
    /// attributes only, no data).
    pub fn inval_inode_attributes(&self, ino: u64) -> io::Result<()> {
        let arg = abi::NotifyInvalInodeOut {
            ino,
            off: -1,
            len: 0,
        };
        self.send(abi::notify::INVAL_INODE, &[arg.as_bytes()])
    }

    /// Asks the kernel to queue again every request it handed to a server and has no
    /// reply for (after a crash: the dead server's), marked with [`abi::UNIQUE_RESEND`].
    pub fn resend(&self) -> io::Result<()> {
        self.send(abi::notify::RESEND, &[])
    }
}
