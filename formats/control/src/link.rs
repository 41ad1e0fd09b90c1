//! The framing: one message per frame, `[u32 little-endian length][bincode message]`. The
//! length is checked against the link's cap before the body is read, and a frame whose
//! body does not decode to exactly one message is refused. Both components and the
//! manager use this one type.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Bytes a frame adds to its message (the length field).
const FRAME_OVERHEAD: u64 = 4;

/// Room for a message's own encoding (variant tags, lengths) on top of the state blob a
/// message may carry.
const MESSAGE_SLACK: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The peer closed the link (or its process exited).
    #[error("control link closed")]
    Closed,
    /// No frame began within the read timeout. The link is still usable.
    #[error("no message within the timeout")]
    Timeout,
    #[error("frame of {0} bytes exceeds the link's cap of {1}")]
    TooLong(u64, u64),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("control link: {0}")]
    Io(#[from] io::Error),
}

/// One end of a control link.
#[derive(Debug)]
pub struct Link {
    stream: UnixStream,
    cap: u64,
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// The link's socket (to hand it across an exec).
impl std::os::fd::AsFd for Link {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl Link {
    /// A link whose messages may carry a state blob of up to `state_cap` bytes.
    pub fn new(stream: UnixStream, state_cap: u64) -> Link {
        Link {
            stream,
            cap: state_cap + MESSAGE_SLACK,
        }
    }

    /// A second handle on the same socket (a reader thread's, typically).
    pub fn try_clone(&self) -> io::Result<Link> {
        Ok(Link {
            stream: self.stream.try_clone()?,
            cap: self.cap,
        })
    }

    /// Sets how long [`Link::recv`] waits for a frame to begin (`None`: for ever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream
            .set_read_timeout(timeout.map(|t| t.max(Duration::from_millis(1))))
    }

    pub fn send<T: Serialize>(&mut self, message: &T) -> Result<(), LinkError> {
        let body = bincode::serde::encode_to_vec(message, config())
            .map_err(|e| LinkError::Malformed(e.to_string()))?;
        if body.len() as u64 > self.cap {
            return Err(LinkError::TooLong(body.len() as u64, self.cap));
        }
        let mut frame = Vec::with_capacity(body.len() + FRAME_OVERHEAD as usize);
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        self.stream.write_all(&frame).map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => LinkError::Closed,
            _ => LinkError::Io(e),
        })
    }

    /// The next message. [`LinkError::Timeout`] only when no byte of a frame arrived; a
    /// frame cut short by the timeout or the peer is an error that leaves the link unusable.
    pub fn recv<T: DeserializeOwned>(&mut self) -> Result<T, LinkError> {
        let mut len = [0u8; 4];
        let first = loop {
            match self.stream.read(&mut len[..1]) {
                Ok(0) => return Err(LinkError::Closed),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(LinkError::Timeout)
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(LinkError::Closed)
                }
                Err(e) => return Err(LinkError::Io(e)),
            }
        };
        self.read_rest(&mut len[first..])?;
        let len = u32::from_le_bytes(len) as u64;
        if len > self.cap {
            return Err(LinkError::TooLong(len, self.cap));
        }
        let mut body = vec![0u8; len as usize];
        self.read_rest(&mut body)?;
        let (message, used) = bincode::serde::decode_from_slice(&body, config())
            .map_err(|e| LinkError::Malformed(e.to_string()))?;
        if used != body.len() {
            return Err(LinkError::Malformed(format!(
                "{} bytes after the message",
                body.len() - used
            )));
        }
        Ok(message)
    }

    fn read_rest(&mut self, buf: &mut [u8]) -> Result<(), LinkError> {
        self.stream.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => LinkError::Closed,
            _ => LinkError::Malformed(format!("frame cut short: {e}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;
    use formats::version::FormatVersion;
    use proptest::prelude::*;

    fn pair(cap: u64) -> (Link, Link) {
        let (a, b) = UnixStream::pair().unwrap();
        (Link::new(a, cap), Link::new(b, cap))
    }

    fn every_command() -> Vec<Command> {
        vec![
            Command::Prepare {
                deadline_ms: 500,
                required: RequiredState::ALL.to_vec(),
            },
            Command::Resume,
            Command::Exit,
            Command::Status,
            Command::State(b"\n\x00state".to_vec()),
            Command::Commit,
            Command::Abort,
            Command::Mounted,
            Command::ConversionSpace(FormatVersion(3)),
            Command::Convert(FormatVersion(2)),
        ]
    }

    fn every_reply() -> Vec<Reply> {
        let status = Status {
            phase: ServingPhase::Held,
            pid: 42,
            version: "0.2.0+ring48".into(),
            state_schema: 2,
            counters: vec![("reads".into(), 7), ("writes".into(), u64::MAX)],
            format: Some(FormatVersion(2)),
            conversion: Some(ConversionProgress {
                to: FormatVersion(3),
                done: 5,
                total: 9,
                rate_per_s: 100,
                bytes: 4096,
            }),
            last_conversion: Some(ConversionResult {
                to: FormatVersion(2),
                inodes: 1,
                bytes: 2,
                millis: 3,
                steps: 4,
                longest_step_us: 5,
                mean_step_us: 6,
            }),
            fuse: Some(FuseInfo {
                transport: "uring".into(),
                protocol: Some("7.44".into()),
            }),
        };
        vec![
            Reply::Spawned,
            Reply::FsReady,
            Reply::Ready(vec![0xff; 300]),
            Reply::Serving,
            Reply::Imported,
            Reply::Status(status),
            Reply::Space {
                needed: 1 << 40,
                free: 0,
            },
            Reply::Converting,
            Reply::Error(ControlError::Deadline("3 files are open".into())),
            Reply::Error(ControlError::UnsupportedSchema(9)),
            Reply::Error(ControlError::StateRefused("bad crc".into())),
            Reply::Error(ControlError::Unexpected("Commit".into())),
            Reply::Error(ControlError::Failed("no space".into())),
        ]
    }

    #[test]
    fn every_command_and_reply_round_trips() {
        let (mut a, mut b) = pair(1 << 20);
        for c in every_command() {
            a.send(&c).unwrap();
            assert_eq!(b.recv::<Command>().unwrap(), c);
        }
        for r in every_reply() {
            b.send(&r).unwrap();
            assert_eq!(a.recv::<Reply>().unwrap(), r);
        }
    }

    #[test]
    fn a_frame_over_the_cap_is_refused_before_its_body_is_read() {
        let (mut a, mut b) = pair(0);
        // The sender's cap is as small; write the frame header by hand.
        let big = (MESSAGE_SLACK as u32 + 1).to_le_bytes();
        a.stream.write_all(&big).unwrap();
        match b.recv::<Command>() {
            Err(LinkError::TooLong(n, _)) => assert_eq!(n, MESSAGE_SLACK + 1),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            a.send(&Command::State(vec![0; MESSAGE_SLACK as usize + 1])),
            Err(LinkError::TooLong(..))
        ));
    }

    #[test]
    fn garbage_trailing_bytes_and_a_cut_frame_are_errors_not_messages() {
        let (mut a, mut b) = pair(1024);
        a.stream.write_all(&[1, 0, 0, 0, 0xee]).unwrap();
        assert!(matches!(b.recv::<Command>(), Err(LinkError::Malformed(_))));
        let (mut a, mut b) = pair(1024);
        let mut body = bincode::serde::encode_to_vec(&Command::Resume, config()).unwrap();
        body.push(0);
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&body);
        a.stream.write_all(&frame).unwrap();
        assert!(matches!(b.recv::<Command>(), Err(LinkError::Malformed(_))));
        let (mut a, mut b) = pair(1024);
        a.stream.write_all(&[9, 0, 0, 0, 1]).unwrap();
        drop(a);
        assert!(matches!(b.recv::<Command>(), Err(LinkError::Closed)));
    }

    #[test]
    fn a_timeout_before_a_frame_leaves_the_link_usable() {
        let (mut a, mut b) = pair(1024);
        b.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
        assert!(matches!(b.recv::<Reply>(), Err(LinkError::Timeout)));
        a.send(&Reply::Serving).unwrap();
        assert_eq!(b.recv::<Reply>().unwrap(), Reply::Serving);
    }

    #[test]
    fn required_states_parse_by_their_manifest_names() {
        for r in RequiredState::ALL {
            assert_eq!(r.as_str().parse::<RequiredState>(), Ok(r));
        }
        assert!("drained".parse::<RequiredState>().is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let (mut a, mut b) = pair(1024);
            let mut frame = (bytes.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&bytes);
            a.stream.write_all(&frame).unwrap();
            let _ = b.recv::<Command>();
            let (mut a, mut b) = pair(1024);
            a.stream.write_all(&frame).unwrap();
            let _ = b.recv::<Reply>();
        }

        #[test]
        fn state_blobs_of_any_content_round_trip(blob in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let (mut a, mut b) = pair(4096);
            a.send(&Command::State(blob.clone())).unwrap();
            prop_assert_eq!(b.recv::<Command>().unwrap(), Command::State(blob.clone()));
            b.send(&Reply::Ready(blob.clone())).unwrap();
            prop_assert_eq!(a.recv::<Reply>().unwrap(), Reply::Ready(blob));
        }
    }
}
