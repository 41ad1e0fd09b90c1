//! The supervisor's end of the control channel to one driver process.

use std::io::{self, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::{read_line, HandoverError, StateBlob};

/// The `status` reply: `key=value` pairs in the driver's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverStatus(pub Vec<(String, String)>);

impl DriverStatus {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A numeric field (counters, positions, pid).
    pub fn number(&self, key: &str) -> Option<u64> {
        self.get(key)?.parse().ok()
    }

    fn parse(rest: &str) -> Result<DriverStatus, HandoverError> {
        rest.split_whitespace()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| HandoverError::Protocol(format!("status field {kv:?}")))
            })
            .collect::<Result<_, _>>()
            .map(DriverStatus)
    }
}

/// Talks to one driver over its control socket (`--ctl-fd`). Every call sends one line and
/// waits for the reply, at most the reply timeout (default 10 s; a `prepare` waits its
/// deadline on top).
#[derive(Debug)]
pub struct DriverControl {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    reply_timeout: Duration,
}

impl DriverControl {
    pub fn new(stream: UnixStream) -> io::Result<DriverControl> {
        Ok(DriverControl {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            reply_timeout: Duration::from_secs(10),
        })
    }

    pub fn set_reply_timeout(&mut self, timeout: Duration) {
        self.reply_timeout = timeout;
    }

    fn send(&mut self, line: &str) -> Result<(), HandoverError> {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.writer.write_all(&bytes).map_err(|e| {
            if e.kind() == io::ErrorKind::BrokenPipe {
                HandoverError::Closed
            } else {
                HandoverError::Io(e)
            }
        })
    }

    /// Reads one reply; `error: …` lines become errors.
    fn reply(&mut self, what: &'static str, timeout: Duration) -> Result<String, HandoverError> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let line = match read_line(&mut self.reader) {
            Ok(Some(l)) => l,
            Ok(None) => return Err(HandoverError::Closed),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HandoverError::Timeout(what))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(HandoverError::Closed)
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(msg) = line.strip_prefix("error: ") {
            if msg == "deadline" {
                return Err(HandoverError::Deadline);
            }
            if let Some(n) = msg.strip_prefix("unsupported state schema ") {
                if let Ok(n) = n.trim().parse() {
                    return Err(HandoverError::UnsupportedSchema(n));
                }
            }
            return Err(HandoverError::Refused(msg.to_string()));
        }
        Ok(line)
    }

    fn expect(&mut self, what: &'static str, want: &str) -> Result<(), HandoverError> {
        let line = self.reply(what, self.reply_timeout)?;
        if line == want {
            Ok(())
        } else {
            Err(HandoverError::Protocol(line))
        }
    }

    /// Notification and preparation: the driver stops taking ring entries, reaps every
    /// I/O in flight, posts the completions and exports its state, all within `deadline`.
    /// On success it holds (still able to resume). [`HandoverError::Deadline`] means it
    /// serves on. The blob's frame is checked here; [`StateBlob::check`] checks the rest.
    pub fn prepare(&mut self, deadline: Duration) -> Result<StateBlob, HandoverError> {
        self.send(&format!("prepare {}", deadline.as_millis()))?;
        let line = self.reply("prepare", deadline + self.reply_timeout)?;
        let hex = line
            .strip_prefix("ready ")
            .ok_or_else(|| HandoverError::Protocol(line.clone()))?;
        let blob = StateBlob::from_hex(hex)?;
        formats::frame::decode(
            "driver state",
            blob.as_bytes(),
            crate::persist::STATE_MAGIC,
            crate::persist::STATE_CAP,
        )
        .map_err(crate::persist::StateError::from)?;
        Ok(blob)
    }

    /// Rollback: a prepared (holding) driver serves again.
    pub fn resume(&mut self) -> Result<(), HandoverError> {
        self.send("resume")?;
        self.expect("resume", "serving")
    }

    /// A prepared driver exits (status 0) without touching the ring again. No reply: wait
    /// for the process.
    pub fn exit(&mut self) -> Result<(), HandoverError> {
        self.send("exit")
    }

    pub fn status(&mut self) -> Result<DriverStatus, HandoverError> {
        self.send("status")?;
        let line = self.reply("status", self.reply_timeout)?;
        match line.strip_prefix("status") {
            Some(rest) if rest.is_empty() || rest.starts_with(' ') => DriverStatus::parse(rest),
            _ => Err(HandoverError::Protocol(line)),
        }
    }

    /// State transfer to a successor started with `--adopt`.
    pub fn send_state(&mut self, blob: &StateBlob) -> Result<(), HandoverError> {
        self.send(&format!("state {}", blob.to_hex()))
    }

    /// The successor's answer to [`DriverControl::send_state`]: it checked and imported the
    /// state. An error means it refused and exits (status 1).
    pub fn wait_imported(&mut self) -> Result<(), HandoverError> {
        self.expect("state", "imported")
    }

    /// Replacement: the successor attaches to the ring (publishes device, counters,
    /// phase) and serves. After this, tell the predecessor to [`DriverControl::exit`].
    pub fn commit(&mut self) -> Result<(), HandoverError> {
        self.send("commit")?;
        self.expect("commit", "serving")
    }

    /// The successor exits (status 0) without having touched the ring. No reply.
    pub fn abort(&mut self) -> Result<(), HandoverError> {
        self.send("abort")
    }
}
