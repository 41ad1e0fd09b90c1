//! A component process as the supervisor sees it: the child, its control link (read by a
//! dedicated thread so every wait can have a deadline and be aborted), and its version.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use fsd_server::{ControlLink, Msg};

pub struct Component {
    pub child: Child,
    pub binary: PathBuf,
    pub version: String,
    link: ControlLink,
    inbox: Receiver<io::Result<Msg>>,
    /// A `status` exchange is in progress (its reply is wanted).
    pub want_status: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("deadline passed")]
    Deadline,
    #[error("aborted")]
    Aborted,
    #[error("the component exited")]
    Gone,
    #[error("{0}")]
    Said(String),
    #[error("unexpected reply: {0}")]
    Unexpected(String),
    #[error("control link: {0}")]
    Io(#[from] io::Error),
}

impl Component {
    pub fn new(
        child: Child,
        binary: PathBuf,
        version: String,
        stream: UnixStream,
        blob_cap: u64,
    ) -> io::Result<Component> {
        let link = ControlLink::new(stream, blob_cap)?;
        let mut reader = link.try_clone()?;
        let (tx, inbox) = mpsc::channel();
        std::thread::spawn(move || loop {
            let m = reader.recv();
            let end = m.is_err();
            if tx.send(m).is_err() || end {
                return;
            }
        });
        Ok(Component {
            child,
            binary,
            version,
            link,
            inbox,
            want_status: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn send(&mut self, line: &str) -> io::Result<()> {
        self.link.send(line)
    }

    pub fn send_blob(&mut self, tag: &str, bytes: &[u8]) -> io::Result<()> {
        self.link.send_blob(tag, bytes)
    }

    /// Discards messages that arrived unasked or too late for an earlier exchange.
    pub fn drain_inbox(&mut self) {
        while let Ok(Ok(_)) = self.inbox.try_recv() {}
    }

    /// The next message, by `deadline`, unless `abort` is raised first. Status lines
    /// answering an earlier, timed-out `status` are skipped.
    pub fn recv(&mut self, deadline: Instant, abort: &AtomicBool) -> Result<Msg, LinkError> {
        loop {
            if abort.load(Ordering::SeqCst) {
                return Err(LinkError::Aborted);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(LinkError::Deadline);
            }
            match self
                .inbox
                .recv_timeout((deadline - now).min(Duration::from_millis(20)))
            {
                Ok(Ok(Msg::Line(l))) if l.starts_with("status ") && !self.want_status => continue,
                Ok(Ok(m)) => return Ok(m),
                Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(LinkError::Gone)
                }
                Ok(Err(e)) => return Err(LinkError::Io(e)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(LinkError::Gone),
            }
        }
    }

    /// Waits for the line `want`.
    pub fn expect(
        &mut self,
        want: &str,
        deadline: Instant,
        abort: &AtomicBool,
    ) -> Result<(), LinkError> {
        match self.recv(deadline, abort)? {
            Msg::Line(l) if l == want => Ok(()),
            Msg::Line(l) => match l.strip_prefix("error: ") {
                Some(why) => Err(LinkError::Said(why.to_string())),
                None => Err(LinkError::Unexpected(l)),
            },
            Msg::Blob(t, _) => Err(LinkError::Unexpected(format!("{t} blob"))),
        }
    }

    /// Waits for a blob tagged `want`.
    pub fn expect_blob(
        &mut self,
        want: &str,
        deadline: Instant,
        abort: &AtomicBool,
    ) -> Result<Vec<u8>, LinkError> {
        match self.recv(deadline, abort)? {
            Msg::Blob(t, b) if t == want => Ok(b),
            Msg::Line(l) => match l.strip_prefix("error: ") {
                Some(why) => Err(LinkError::Said(why.to_string())),
                None => Err(LinkError::Unexpected(l)),
            },
            Msg::Blob(t, _) => Err(LinkError::Unexpected(format!("{t} blob"))),
        }
    }

    /// Kills the process and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `within` for the process to exit by itself; kills it after that.
    pub fn reap(&mut self, within: Duration) {
        reap_child(&mut self.child, within);
    }
}

/// Waits up to `within` for a child to exit by itself; kills and reaps it after that.
pub fn reap_child(child: &mut Child, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
}
