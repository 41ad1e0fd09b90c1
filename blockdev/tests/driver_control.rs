//! A test's end of a driver's control link: one blocking call per exchange, each with a
//! reply timeout (the update manager has its own, asynchronous end).

use std::os::unix::net::UnixStream;
use std::time::Duration;

use blockdev::handover::StateBlob;
use blockdev::persist::{StateError, STATE_CAP, STATE_MAGIC};
use molt_control::{Command, ControlError, Link, LinkError, Reply, Status};

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("no reply to {0} in time")]
    Timeout(&'static str),
    #[error("the driver closed the control channel")]
    Closed,
    #[error("the driver missed the drain deadline and serves on")]
    Deadline,
    #[error("the driver does not import state schema {0}")]
    UnsupportedSchema(u32),
    #[error("the driver refused: {0}")]
    Refused(String),
    #[error("unexpected control reply: {0}")]
    Protocol(String),
    #[error("control link: {0}")]
    Link(LinkError),
    #[error("state: {0}")]
    State(#[from] StateError),
}

#[derive(Debug)]
pub struct DriverControl {
    link: Link,
    reply_timeout: Duration,
}

impl DriverControl {
    pub fn new(stream: UnixStream) -> std::io::Result<DriverControl> {
        Ok(DriverControl {
            link: Link::new(stream, STATE_CAP),
            reply_timeout: Duration::from_secs(10),
        })
    }

    pub fn set_reply_timeout(&mut self, timeout: Duration) {
        self.reply_timeout = timeout;
    }

    fn send(&mut self, c: Command) -> Result<(), HandoverError> {
        self.link.send(&c).map_err(|e| match e {
            LinkError::Closed => HandoverError::Closed,
            e => HandoverError::Link(e),
        })
    }

    fn reply(&mut self, what: &'static str, timeout: Duration) -> Result<Reply, HandoverError> {
        self.link
            .set_read_timeout(Some(timeout))
            .map_err(|e| HandoverError::Link(e.into()))?;
        match self.link.recv::<Reply>() {
            Ok(Reply::Error(ControlError::Deadline(_))) => Err(HandoverError::Deadline),
            Ok(Reply::Error(ControlError::UnsupportedSchema(n))) => {
                Err(HandoverError::UnsupportedSchema(n))
            }
            Ok(Reply::Error(e)) => Err(HandoverError::Refused(e.to_string())),
            Ok(r) => Ok(r),
            Err(LinkError::Timeout) => Err(HandoverError::Timeout(what)),
            Err(LinkError::Closed) => Err(HandoverError::Closed),
            Err(e) => Err(HandoverError::Link(e)),
        }
    }

    fn expect(&mut self, what: &'static str, want: Reply) -> Result<(), HandoverError> {
        match self.reply(what, self.reply_timeout)? {
            r if r == want => Ok(()),
            r => Err(HandoverError::Protocol(format!("{r:?}"))),
        }
    }

    /// Drains within `deadline` and returns the exported state, its frame checked.
    pub fn prepare(&mut self, deadline: Duration) -> Result<StateBlob, HandoverError> {
        self.send(Command::Prepare {
            deadline_ms: deadline.as_millis() as u64,
            required: Vec::new(),
        })?;
        match self.reply("prepare", deadline + self.reply_timeout)? {
            Reply::Ready(bytes) => {
                formats::frame::decode("driver state", &bytes, STATE_MAGIC, STATE_CAP)
                    .map_err(StateError::from)?;
                Ok(StateBlob::from_bytes(bytes))
            }
            r => Err(HandoverError::Protocol(format!("{r:?}"))),
        }
    }

    pub fn resume(&mut self) -> Result<(), HandoverError> {
        self.send(Command::Resume)?;
        self.expect("resume", Reply::Serving)
    }

    pub fn exit(&mut self) -> Result<(), HandoverError> {
        self.send(Command::Exit)
    }

    pub fn status(&mut self) -> Result<Status, HandoverError> {
        self.send(Command::Status)?;
        match self.reply("status", self.reply_timeout)? {
            Reply::Status(s) => Ok(s),
            r => Err(HandoverError::Protocol(format!("{r:?}"))),
        }
    }

    pub fn send_state(&mut self, blob: &StateBlob) -> Result<(), HandoverError> {
        self.send(Command::State(blob.as_bytes().to_vec()))
    }

    pub fn wait_imported(&mut self) -> Result<(), HandoverError> {
        self.expect("state", Reply::Imported)
    }

    pub fn commit(&mut self) -> Result<(), HandoverError> {
        self.send(Command::Commit)?;
        self.expect("commit", Reply::Serving)
    }

    pub fn abort(&mut self) -> Result<(), HandoverError> {
        self.send(Command::Abort)
    }
}
