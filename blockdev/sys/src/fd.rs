//! Descriptors: eventfds, duplicates, inherited descriptors, checked close, locks, flags.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use crate::cvt;

/// Creates a non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; flags are valid constants.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: `fd` was just returned by eventfd, so it is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd counter (wakes a sleeper).
pub fn eventfd_signal(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: u64 = 1;
    // SAFETY: the buffer is a live 8-byte u64, as eventfd requires; `fd` is borrowed, so
    // it stays open for the call.
    let ret = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    if ret == 8 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    // EAGAIN means the counter is saturated: a wakeup is pending anyway.
    if err.kind() == io::ErrorKind::WouldBlock {
        Ok(())
    } else {
        Err(err)
    }
}

/// Resets a non-blocking eventfd counter; returns whether it was non-zero.
pub fn eventfd_drain(fd: BorrowedFd<'_>) -> bool {
    let mut v: u64 = 0;
    // SAFETY: the buffer is a live, writable 8-byte u64; `fd` stays open for the call.
    let ret = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    ret == 8
}

/// Duplicates `fd` to a close-on-exec descriptor numbered at least `min`.
pub fn dup_at_least(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC takes an int argument and returns a new fd.
    let new = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) })?;
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Serialises [`adopt_inherited_fd`]'s check and its marking of the descriptor.
static ADOPTING: Mutex<()> = Mutex::new(());

/// Takes ownership of descriptor `fd`, which this process was started with (passed
/// across `exec` by its parent).
///
/// Fails with `EBADF` when `fd` is a standard stream (0, 1, 2), is not open, or is
/// close-on-exec. The last check is what makes the adoption sound: the standard library
/// and this crate open every descriptor close-on-exec, so one without the flag was not
/// opened by them in this process and has no owner here yet, while one that survived an
/// `exec` cannot have had the flag. Adopting sets the flag, so the same number is never
/// adopted twice and does not leak into this process's own children.
pub fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    let _guard = ADOPTING.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: F_GETFD only reads the descriptor table's flags of `fd`; no memory is
    // involved, and an unused number is reported as EBADF.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    if flags & libc::FD_CLOEXEC != 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: F_SETFD only changes the descriptor's flags; `fd` was open just above and,
    // having no owner in this process (see the function's documentation), nobody closes
    // it in between.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) })?;
    // SAFETY: `fd` is open, was inherited and is owned by nobody in this process (it
    // lacked FD_CLOEXEC), and is adopted exactly once: it is close-on-exec from here on, so
    // a second adoption fails the check above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Closes `fd` and reports what close(2) said (dropping an `OwnedFd` ignores it: a FUSE
/// flush, for one, can fail there).
pub fn close(fd: OwnedFd) -> io::Result<()> {
    let raw = fd.into_raw_fd();
    // SAFETY: `raw` came from `into_raw_fd`, so this function owns it and closes it once.
    cvt(unsafe { libc::close(raw) }).map(|_| ())
}

/// The file status flags of `fd`'s open file description (`F_GETFL`: `O_DIRECT`,
/// `O_APPEND`, the access mode, ...).
pub fn status_flags(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFL only reads the open file description's flags.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })
}

/// `_IOR(0x12, 114, size_t)`: the size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// The size in bytes of the block device open as `fd` (`BLKGETSIZE64`).
pub fn block_device_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which is a live local; on a
    // descriptor that is not a block device the ioctl fails without writing.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) })?;
    Ok(size)
}

/// Takes an exclusive `flock` on `fd`'s open file description without waiting: `false`
/// when another open description holds a lock on the file. The lock lasts while any
/// descriptor of the description stays open.
pub fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: flock takes a descriptor (borrowed, so open for the call) and a constant.
    if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// `fdatasync(2)`.
pub fn fdatasync(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fdatasync takes only a descriptor, borrowed for the call.
    cvt(unsafe { libc::fdatasync(fd.as_raw_fd()) }).map(|_| ())
}

/// `fallocate(2)` with `mode` (`FALLOC_FL_*`, 0 to allocate).
pub fn fallocate(fd: BorrowedFd<'_>, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: fallocate takes a descriptor (borrowed for the call) and integers.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off, len) }).map(|_| ())
}

/// Duplicates `fd` to a descriptor that is *not* close-on-exec, numbered 3 or above, for
/// this process's own `exec` of a successor binary (which adopts it with
/// [`adopt_inherited_fd`]). Keep the duplicate only until the exec: a child spawned
/// meanwhile would inherit it.
pub fn dup_for_exec(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD takes an int argument and returns a new fd.
    let new = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD, 3) })?;
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn an_eventfd_counts_signals_until_drained() {
        let fd = eventfd().unwrap();
        assert!(!eventfd_drain(fd.as_fd()));
        eventfd_signal(fd.as_fd()).unwrap();
        eventfd_signal(fd.as_fd()).unwrap();
        assert!(eventfd_drain(fd.as_fd()));
        assert!(!eventfd_drain(fd.as_fd()));
    }

    #[test]
    fn a_duplicate_is_numbered_at_least_min_and_close_on_exec() {
        let fd = eventfd().unwrap();
        let dup = dup_at_least(fd.as_fd(), 200).unwrap();
        assert!(dup.as_raw_fd() >= 200);
        // Close-on-exec, so it is no inherited descriptor.
        let e = adopt_inherited_fd(dup.as_raw_fd()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        close(dup).unwrap();
    }

    #[test]
    fn only_open_non_standard_descriptors_are_adopted() {
        for fd in [0, 1, 2, 100_000] {
            let e = adopt_inherited_fd(fd).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EBADF), "fd {fd}");
        }
    }

    #[test]
    fn a_lock_is_exclusive_between_open_descriptions() {
        let dir = std::env::temp_dir().join(format!("molt-sys-lock-{}", std::process::id()));
        std::fs::write(&dir, b"x").unwrap();
        let a = std::fs::File::open(&dir).unwrap();
        let b = std::fs::File::open(&dir).unwrap();
        assert!(try_lock_exclusive(a.as_fd()).unwrap());
        assert!(!try_lock_exclusive(b.as_fd()).unwrap());
        drop(a);
        assert!(try_lock_exclusive(b.as_fd()).unwrap());
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn status_flags_show_the_access_mode() {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(
            status_flags(f.as_fd()).unwrap() & libc::O_ACCMODE,
            libc::O_RDONLY
        );
        assert!(block_device_size(f.as_fd()).is_err());
    }
}
