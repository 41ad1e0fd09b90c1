//! A component process as the supervisor watches it, through a pidfd: a child this
//! supervisor spawned (or that the supervisor it was exec'd from spawned: a live update of
//! the supervisor keeps the pid, so the components stay its children), or a process it
//! adopted after the previous supervisor died (a child of someone else, whose exit status
//! it cannot read).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// How a watched process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Status(ExitStatus),
    /// It exited, but it was not this process's child, so its status is not known here.
    Unknown,
}

impl Ended {
    /// Whether it exited with status 0 (`None`: not known).
    pub fn success(self) -> Option<bool> {
        match self {
            Ended::Status(st) => Some(st.success()),
            Ended::Unknown => None,
        }
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Status(st) => write!(f, "{st}"),
            Ended::Unknown => f.write_str("exited (status unknown: not our child)"),
        }
    }
}

pub struct Process {
    pid: u32,
    pidfd: OwnedFd,
    /// This process may reap it (`waitid`); otherwise its end is seen on the pidfd only.
    child: bool,
    ended: Option<Ended>,
}

impl Process {
    /// A child just spawned. The `Child` is let go: the pidfd reaps it.
    pub fn spawned(child: Child) -> io::Result<Process> {
        Process::of_child(child.id())
    }

    /// A child of this process by pid (after an exec of the supervisor).
    pub fn of_child(pid: u32) -> io::Result<Process> {
        Ok(Process {
            pid,
            pidfd: molt_sys::pidfd_open(pid as libc::pid_t)?,
            child: true,
            ended: None,
        })
    }

    /// A process this one did not start. `start_time` (field 22 of `/proc/PID/stat`)
    /// must match, so that a pid reused since it was recorded is not taken for it.
    pub fn adopted(pid: u32, start_time: u64) -> io::Result<Process> {
        let pidfd = molt_sys::pidfd_open(pid as libc::pid_t)?;
        // Checked after the pidfd is open: the pidfd then names the process checked.
        if process_start_time(pid)? != start_time {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("pid {pid} is another process now"),
            ));
        }
        Ok(Process {
            pid,
            pidfd,
            child: false,
            ended: None,
        })
    }

    pub fn id(&self) -> u32 {
        self.pid
    }

    pub fn pidfd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// How it ended, once it has (a child is reaped here).
    pub fn try_wait(&mut self) -> Option<Ended> {
        if self.ended.is_none() {
            self.ended = if self.child {
                match molt_sys::pidfd_try_wait(self.pidfd.as_fd()) {
                    Ok(Some(st)) => Some(Ended::Status(st)),
                    Ok(None) => None,
                    // Reaped by someone else: it is gone all the same.
                    Err(_) => molt_sys::pidfd_exited(self.pidfd.as_fd()).then_some(Ended::Unknown),
                }
            } else {
                molt_sys::pidfd_exited(self.pidfd.as_fd()).then_some(Ended::Unknown)
            };
        }
        self.ended
    }

    pub fn signal(&self, sig: libc::c_int) -> io::Result<()> {
        molt_sys::pidfd_send_signal(self.pidfd.as_fd(), sig)
    }

    /// Kills it and waits (up to 10 s) until it is gone.
    pub fn kill(&mut self) {
        if self.try_wait().is_some() {
            return;
        }
        let _ = self.signal(libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.try_wait().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// When process `pid` started, in clock ticks since boot (`/proc/PID/stat` field 22):
/// with the pid, a name for one process that a later one cannot take.
pub fn process_start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| io::Error::other("malformed /proc stat"))?;
    after
        .split_whitespace()
        .nth(19)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::other("malformed /proc stat"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_spawned_child_is_reaped_with_its_status() {
        let mut p =
            Process::spawned(Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let ended = loop {
            if let Some(e) = p.try_wait() {
                break e;
            }
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(2));
        };
        assert_eq!(ended.success(), Some(false));
        match ended {
            Ended::Status(st) => assert_eq!(st.code(), Some(7)),
            Ended::Unknown => panic!("a child's status is known"),
        }
    }

    #[test]
    fn an_adopted_process_is_named_by_its_start_time_too() {
        let me = std::process::id();
        let t = process_start_time(me).unwrap();
        let p = Process::adopted(me, t).unwrap();
        assert_eq!(p.id(), me);
        assert!(Process::adopted(me, t + 1).is_err());
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let mut p = Process::adopted(child.id(), process_start_time(child.id()).unwrap()).unwrap();
        assert!(p.try_wait().is_none());
        p.signal(libc::SIGKILL).unwrap();
        child.wait().unwrap();
        assert_eq!(p.try_wait(), Some(Ended::Unknown));
    }
}
