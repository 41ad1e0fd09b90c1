//! Thin, checked wrappers over the few raw syscalls the crate needs.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

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
    // SAFETY: the buffer is a live 8-byte u64, as eventfd requires.
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
    // SAFETY: the buffer is a live, writable 8-byte u64.
    let ret = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    ret == 8
}

/// Waits until one of `fds` is readable or `timeout` passes. Returns the readable mask.
pub fn poll_readable(fds: &[RawFd], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfds` is a live array of `pfds.len()` pollfd structs.
    let ret = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(err);
    }
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}

/// Opens a pidfd for `pid` (readable once the process has exited).
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether the process behind `pidfd` has exited.
pub fn pidfd_exited(pidfd: BorrowedFd<'_>) -> bool {
    matches!(poll_readable(&[pidfd.as_raw_fd()], Duration::ZERO), Ok(v) if v[0])
}

/// Whether no process `pid` runs: it never existed, was reaped, or is a zombie. An error
/// other than "no such process" counts as running (the caller must not take over from a
/// process that may be alive).
pub fn process_gone(pid: u32) -> bool {
    // Larger than any pid the kernel hands out.
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    match pidfd_open(pid) {
        Ok(fd) => pidfd_exited(fd.as_fd()),
        Err(e) => e.raw_os_error() == Some(libc::ESRCH),
    }
}

/// Duplicates `fd` to a close-on-exec descriptor numbered at least `min`.
pub fn dup_at_least(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC takes an int argument and returns a new fd.
    let new = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) })?;
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Reads exactly `len` bytes at `off` into raw memory.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes for the duration of the call.
pub unsafe fn pread_all(fd: RawFd, ptr: *mut u8, len: usize, off: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        // SAFETY: the caller guarantees `ptr..ptr+len` is writable; `done < len`.
        let n = unsafe {
            libc::pread(
                fd,
                ptr.add(done).cast(),
                len - done,
                (off + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        done += n as usize;
    }
    Ok(())
}

/// Writes exactly `len` bytes from raw memory at `off`.
///
/// # Safety
/// `ptr` must be valid for reads of `len` bytes for the duration of the call.
pub unsafe fn pwrite_all(fd: RawFd, ptr: *const u8, len: usize, off: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        // SAFETY: the caller guarantees `ptr..ptr+len` is readable; `done < len`.
        let n = unsafe {
            libc::pwrite(
                fd,
                ptr.add(done).cast(),
                len - done,
                (off + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        done += n as usize;
    }
    Ok(())
}

pub fn fdatasync(fd: RawFd) -> io::Result<()> {
    // SAFETY: fdatasync takes only a descriptor.
    cvt(unsafe { libc::fdatasync(fd) }).map(|_| ())
}

pub fn fallocate(fd: RawFd, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate takes only integers.
    cvt(unsafe { libc::fallocate(fd, mode, off as libc::off_t, len as libc::off_t) }).map(|_| ())
}
