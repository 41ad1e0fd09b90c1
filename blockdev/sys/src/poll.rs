//! Readiness of a set of descriptors.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// Waits until one of `fds` is readable or `timeout` passes. Returns the readable mask
/// (all false when a signal interrupted the wait). A number that is not open comes back
/// as ready (`POLLNVAL`), so a caller never sleeps on a descriptor it lost.
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
    // SAFETY: `pfds` is a live array of `pfds.len()` pollfd structs; poll only reads the
    // descriptor numbers (never their files) and writes `revents`.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd};

    #[test]
    fn a_signalled_eventfd_is_readable() {
        let a = crate::eventfd().unwrap();
        let b = crate::eventfd().unwrap();
        let fds = [a.as_raw_fd(), b.as_raw_fd()];
        assert_eq!(poll_readable(&fds, Duration::ZERO).unwrap(), [false, false]);
        crate::eventfd_signal(b.as_fd()).unwrap();
        assert_eq!(
            poll_readable(&fds, Duration::from_secs(5)).unwrap(),
            [false, true]
        );
    }
}
