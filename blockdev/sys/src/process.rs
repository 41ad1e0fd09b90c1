//! Processes: pidfds, signals, and what a child starts with.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use crate::{cvt, dup_at_least, poll_readable};

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

/// A duplicate of descriptor `target` of the process behind `pidfd` (close-on-exec).
/// Needs the right to ptrace that process (root, or the same user).
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes two descriptors' numbers and flags, no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends signal `sig` to the process behind `pidfd` (never to a later process that
/// reuses its pid).
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: a null siginfo pointer is allowed (the kernel fills in a SI_USER one).
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps the child behind `pidfd` if it has exited (`waitid(P_PIDFD, WNOHANG)`): its exit
/// status, or `None` while it runs. Fails with `ECHILD` when the process is not this
/// process's child.
pub fn pidfd_try_wait(pidfd: BorrowedFd<'_>) -> io::Result<Option<std::process::ExitStatus>> {
    use std::os::unix::process::ExitStatusExt;
    // SAFETY: siginfo_t is a plain C struct (integers and a union of them); all-zero is a
    // valid value, and waitid with WNOHANG leaves si_pid 0 when no child has exited.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t that outlives the call; P_PIDFD takes
    // the descriptor's number as the id.
    cvt(unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    })?;
    // SAFETY: after a successful waitid the kernel filled si_pid (0 when nothing exited)
    // and, when si_pid is set, si_status.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    // As a wait(2) status: exit code in the second byte, or the signal in the low bits.
    let raw = match info.si_code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_DUMPED => (status & 0x7f) | 0x80,
        _ => status & 0x7f,
    };
    Ok(Some(std::process::ExitStatus::from_raw(raw)))
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

/// Sends signal `sig` to process `pid` (`sig` 0 only checks that it exists and may be
/// signalled). `pid` must name one process: 0 and negative numbers, which kill(2) reads
/// as process groups or as every process, are refused with `EINVAL` (see [`kill_group`]).
pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    if pid <= 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: kill takes two integers; no memory is involved.
    cvt(unsafe { libc::kill(pid, sig) }).map(|_| ())
}

/// Sends signal `sig` to every process of process group `pgid` (which must be positive).
pub fn kill_group(pgid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    if pgid <= 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: kill takes two integers; no memory is involved.
    cvt(unsafe { libc::kill(-pgid, sig) }).map(|_| ())
}

/// What a child does between fork and exec, besides taking its descriptors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChildOptions {
    /// Start a new session (`setsid`), so the child outlives its parent's terminal.
    pub new_session: bool,
    /// Have the kernel kill the child with SIGKILL when the thread that spawned it exits
    /// (`PR_SET_PDEATHSIG`).
    pub die_with_parent: bool,
}

/// Arranges for the child that `cmd` spawns to have each `(fd, number)` of `fds` as
/// descriptor `number` (not close-on-exec), and to do what `options` asks.
///
/// Returns the duplicates the child's descriptors are made from: close-on-exec copies
/// numbered above every target (so making one target cannot clobber another's source).
/// Keep them until `cmd` has spawned; dropping them closes this process's copies.
pub fn pass_fds(
    cmd: &mut Command,
    fds: &[(BorrowedFd<'_>, RawFd)],
    options: ChildOptions,
) -> io::Result<Vec<OwnedFd>> {
    if fds.iter().any(|&(_, n)| n < 0) {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    let floor = fds
        .iter()
        .map(|&(_, n)| n.saturating_add(1))
        .max()
        .unwrap_or(0)
        .max(100);
    let mut sources = Vec::with_capacity(fds.len());
    for &(fd, _) in fds {
        sources.push(dup_at_least(fd, floor)?);
    }
    let pairs: Vec<(RawFd, RawFd)> = sources
        .iter()
        .zip(fds)
        .map(|(src, &(_, dst))| (src.as_raw_fd(), dst))
        .collect();
    let ChildOptions {
        new_session,
        die_with_parent,
    } = options;
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it calls only setsid, dup2 and prctl, which are,
    // and reads a vector allocated before the fork (no allocation, no locks). The sources
    // it duplicates are this process's to keep open until the spawn (see above); were they
    // closed early, dup2 would fail with EBADF and the spawn with it.
    unsafe {
        cmd.pre_exec(move || {
            if new_session && libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            for &(src, dst) in &pairs {
                if libc::dup2(src, dst) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(sources)
}

/// Exit status of a command whose standard output was closed by its reader
/// (`updater status | head`): the status a shell reports for a program SIGPIPE ended.
pub const STDOUT_CLOSED_EXIT: i32 = 128 + libc::SIGPIPE;
/// Exit status of a command that could not write its standard output (EX_IOERR).
pub const STDOUT_FAILED_EXIT: i32 = 74;

/// Writes to standard output for a command-line program. A reader that went away ends
/// the program quietly with [`STDOUT_CLOSED_EXIT`] (Rust ignores SIGPIPE, so `println!`
/// would panic instead); any other write error ends it with a message and
/// [`STDOUT_FAILED_EXIT`]. Used through [`outln!`](crate::outln) and [`out!`](crate::out).
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(STDOUT_CLOSED_EXIT);
        }
        eprintln!("writing to standard output: {e}");
        std::process::exit(STDOUT_FAILED_EXIT);
    }
}

/// Writes to standard error, dropping what cannot be written: a message to a reader that
/// went away (`updater apply 2>&1 | head`) or to a log on a full filesystem must not
/// end the program (`eprintln!` panics then), and there is nowhere else to report it.
/// Used through [`errln!`](crate::errln) and [`err!`](crate::err).
pub fn write_stderr(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// `println!` for command-line programs: see [`process::write_stdout`](crate::process::write_stdout).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::process::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::process::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for command-line programs: see [`process::write_stdout`](crate::process::write_stdout).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::process::write_stdout(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics: see [`process::write_stderr`](crate::process::write_stderr).
#[macro_export]
macro_rules! errln {
    () => {
        $crate::process::write_stderr(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::process::write_stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprint!` that never panics: see [`process::write_stderr`](crate::process::write_stderr).
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => {
        $crate::process::write_stderr(format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reaped_child_is_gone_and_a_running_one_is_not() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        assert!(!process_gone(pid));
        kill(pid as libc::pid_t, 0).unwrap();
        kill(pid as libc::pid_t, libc::SIGKILL).unwrap();
        child.wait().unwrap();
        assert!(process_gone(pid));
        assert!(process_gone(u32::MAX));
    }

    #[test]
    // The children are reaped through their pidfds, which is what is tested.
    #[allow(clippy::zombie_processes)]
    fn a_childs_exit_status_comes_through_its_pidfd() {
        let child = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
        let pidfd = pidfd_open(child.id() as libc::pid_t).unwrap();
        let status = loop {
            if let Some(st) = pidfd_try_wait(pidfd.as_fd()).unwrap() {
                break st;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        assert_eq!(status.code(), Some(3));
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pidfd = pidfd_open(child.id() as libc::pid_t).unwrap();
        assert!(pidfd_try_wait(pidfd.as_fd()).unwrap().is_none());
        kill(child.id() as libc::pid_t, libc::SIGKILL).unwrap();
        let status = loop {
            if let Some(st) = pidfd_try_wait(pidfd.as_fd()).unwrap() {
                break st;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // Not a child of this process: reaping it is not ours to do.
        let init = pidfd_open(1).unwrap();
        assert_eq!(
            pidfd_try_wait(init.as_fd()).unwrap_err().raw_os_error(),
            Some(libc::ECHILD)
        );
    }

    #[test]
    fn another_process_descriptor_is_duplicated_through_its_pidfd() {
        let me = pidfd_open(std::process::id() as libc::pid_t).unwrap();
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let dup = pidfd_getfd(me.as_fd(), file.as_raw_fd()).unwrap();
        assert_ne!(dup.as_raw_fd(), file.as_raw_fd());
        assert!(pidfd_getfd(me.as_fd(), 100_000).is_err());
    }

    #[test]
    fn kill_refuses_groups_and_broadcasts() {
        for pid in [0, -1, -2] {
            let e = kill(pid, 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        }
        assert_eq!(
            kill_group(0, 0).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
    }

    #[test]
    fn a_child_gets_the_descriptors_at_their_numbers() {
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "test -r /proc/self/fd/7 && ! test -e /proc/self/fd/8"]);
        let guard = pass_fds(&mut cmd, &[(file.as_fd(), 7)], ChildOptions::default()).unwrap();
        assert!(guard.iter().all(|g| g.as_raw_fd() >= 100));
        let status = cmd.status().unwrap();
        drop(guard);
        assert!(status.success());
    }

    #[test]
    fn a_pidfd_turns_readable_when_the_process_exits() {
        let mut child = Command::new("true").spawn().unwrap();
        let fd = pidfd_open(child.id() as libc::pid_t).unwrap();
        child.wait().unwrap();
        assert!(pidfd_exited(fd.as_fd()));
    }
}
