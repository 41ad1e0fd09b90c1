//! A component process as the supervisor sees it, the same for the block driver and the
//! filesystem server: the child, what its binary said of itself, and its control link
//! (`molt-control`), read by a dedicated thread so that every wait has a deadline and can
//! be aborted.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command as ProcessCommand;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use molt_control::{Command, ComponentInfo, ControlError, Link, LinkError, Reply};

use crate::process::Process;

pub struct ComponentProc {
    pub process: Process,
    pub binary: PathBuf,
    pub info: ComponentInfo,
    link: Link,
    inbox: Receiver<Result<Reply, LinkError>>,
    /// A status exchange is in progress (its reply is wanted).
    want_status: bool,
}

/// Why an exchange with a component failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("deadline passed")]
    Deadline,
    #[error("aborted")]
    Aborted,
    #[error("the component exited")]
    Gone,
    /// The component answered with an error.
    #[error("{0}")]
    Said(ControlError),
    #[error("unexpected reply: {0}")]
    Unexpected(String),
    #[error("{0}")]
    Link(#[from] LinkError),
}

/// Asks a component binary what it is (`<binary> component-info`).
pub fn probe(binary: &Path) -> Result<ComponentInfo, String> {
    let out = ProcessCommand::new(binary)
        .arg("component-info")
        .output()
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} does not say what it is (component-info exited with {})",
            binary.display(),
            out.status
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "{} does not say what it is (component-info: {e})",
            binary.display()
        )
    })
}

impl ComponentProc {
    /// The supervisor's end of the control link (to hand it across an exec).
    pub(crate) fn link_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.link.as_fd()
    }

    pub fn new(
        process: Process,
        binary: PathBuf,
        info: ComponentInfo,
        stream: UnixStream,
        state_cap: u64,
    ) -> io::Result<ComponentProc> {
        let link = Link::new(stream, state_cap);
        let mut reader = link.try_clone()?;
        let (tx, inbox) = mpsc::channel();
        std::thread::spawn(move || loop {
            let m = reader.recv::<Reply>();
            let end = matches!(m, Err(LinkError::Closed | LinkError::Io(_)));
            if tx.send(m).is_err() || end {
                return;
            }
        });
        Ok(ComponentProc {
            process,
            binary,
            info,
            link,
            inbox,
            want_status: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    pub fn send(&mut self, command: &Command) -> Result<(), ExchangeError> {
        Ok(self.link.send(command)?)
    }

    /// Discards replies that arrived unasked or too late for an earlier exchange.
    pub(crate) fn drain_inbox(&mut self) {
        while let Ok(Ok(_)) = self.inbox.try_recv() {}
    }

    /// The next reply, by `deadline`, unless `abort` is raised first. An error reply is
    /// [`ExchangeError::Said`]. Status replies answering an earlier, timed-out status
    /// request are skipped.
    pub fn recv(&mut self, deadline: Instant, abort: &AtomicBool) -> Result<Reply, ExchangeError> {
        loop {
            if abort.load(Ordering::SeqCst) {
                return Err(ExchangeError::Aborted);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ExchangeError::Deadline);
            }
            match self
                .inbox
                .recv_timeout((deadline - now).min(Duration::from_millis(20)))
            {
                Ok(Ok(Reply::Status(_))) if !self.want_status => continue,
                Ok(Ok(Reply::Error(e))) => return Err(ExchangeError::Said(e)),
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(LinkError::Closed)) | Err(RecvTimeoutError::Disconnected) => {
                    return Err(ExchangeError::Gone)
                }
                Ok(Err(e)) => return Err(ExchangeError::Link(e)),
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Waits for the reply `want` (one without data: spawned, serving, imported…).
    pub fn expect(
        &mut self,
        want: &Reply,
        deadline: Instant,
        abort: &AtomicBool,
    ) -> Result<(), ExchangeError> {
        match self.recv(deadline, abort)? {
            r if &r == want => Ok(()),
            r => Err(ExchangeError::Unexpected(format!("{r:?}"))),
        }
    }

    /// Waits for a prepared component's exported state.
    pub(crate) fn expect_ready(
        &mut self,
        deadline: Instant,
        abort: &AtomicBool,
    ) -> Result<Vec<u8>, ExchangeError> {
        match self.recv(deadline, abort)? {
            Reply::Ready(blob) => Ok(blob),
            r => Err(ExchangeError::Unexpected(format!("{r:?}"))),
        }
    }

    /// Sends `command` and returns the reply, within `within` (status, conversion
    /// requests). Earlier unread replies are discarded first.
    pub fn request(&mut self, command: &Command, within: Duration) -> Result<Reply, ExchangeError> {
        let never = AtomicBool::new(false);
        self.drain_inbox();
        self.send(command)?;
        self.want_status = matches!(command, Command::Status);
        let reply = self.recv(Instant::now() + within, &never);
        self.want_status = false;
        reply
    }

    /// Kills the process and reaps it.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Waits up to `within` for the process to exit by itself; kills it after that.
    pub fn reap(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.process.try_wait().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.kill();
    }
}
