//! The control protocol between the `updater` CLI and the supervisor's update manager.
//!
//! One Unix stream connection carries one [`Request`]; the supervisor answers with a stream
//! of [`Event`]s and closes. Each message is a `formats::frame` (magic "MLUC", version 1)
//! whose payload is bincode (serde, standard config). The frame length is checked against
//! the direction's cap before anything is allocated: [`REQUESTS`] (600 MiB, a package fits)
//! and [`EVENTS`] (16 MiB).

use std::fmt;
use std::io::{self, Read, Write};

use formats::frame::{self, FRAME_HEADER, FRAME_TRAILER};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use crate::requirements::CheckItem;

/// Frame magic of every control message: "MLUC" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"MLUC");
pub const VERSION: u32 = 1;

/// One direction of the protocol: its frame magic, version and length cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Channel {
    pub what: &'static str,
    pub magic: u32,
    pub version: u32,
    /// Largest payload accepted or sent, bytes.
    pub cap: u64,
}

/// CLI → supervisor.
pub const REQUESTS: Channel = Channel {
    what: "control request",
    magic: MAGIC,
    version: VERSION,
    cap: 600 << 20,
};

/// Supervisor → CLI.
pub const EVENTS: Channel = Channel {
    what: "control event",
    magic: MAGIC,
    version: VERSION,
    cap: 16 << 20,
};

/// The bincode decoder's own allocation limit: the larger cap (a frame was already held
/// to its direction's cap before decoding).
const DECODE_LIMIT: usize = 600 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Verify the package and run every compatibility and requirement check; change nothing.
    Check {
        #[serde(with = "serde_bytes")]
        package: Vec<u8>,
    },
    /// Check, then update. `deadline_ms` overrides the manifest's deadline for reaching the
    /// required state. With `no_wait` the supervisor answers `Done { Started }` once the
    /// checks pass and carries on alone.
    Apply {
        #[serde(with = "serde_bytes")]
        package: Vec<u8>,
        deadline_ms: Option<u64>,
        no_wait: bool,
    },
    /// Answered by one `Event::Status`.
    Status,
    /// Abort the update in progress (before its commit). Answered by `Done`: `Aborted` when
    /// an update was aborted, `Refused` when there was none or it had already committed.
    Abort,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// One per compatibility or requirement check, in the order run.
    Check(CheckItem),
    Phase {
        phase: Phase,
        state: PhaseState,
        /// Time since the phase started (0 for `Started`).
        elapsed_ms: u64,
        detail: String,
    },
    Progress {
        what: String,
        done: u64,
        total: u64,
    },
    /// The last event of a `Check`, `Apply` or `Abort` conversation.
    Done {
        outcome: Outcome,
        message: String,
    },
    Status(Box<StatusReport>),
}

/// The phases of the cooperative live update model, plus the on-disk conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    Initialization,
    Notification,
    Preparation,
    StateChecking,
    StateTransfer,
    Replacement,
    Conversion,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Initialization => "initialization",
            Phase::Notification => "notification",
            Phase::Preparation => "preparation",
            Phase::StateChecking => "state checking",
            Phase::StateTransfer => "state transfer",
            Phase::Replacement => "replacement",
            Phase::Conversion => "conversion",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PhaseState {
    Started,
    Finished,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// The new version runs; the old one has exited.
    Committed,
    /// `Check` only: every check passed.
    Passed,
    /// Refused before anything changed: bad package, failed check, not live-updatable.
    Refused,
    /// Deadline missed or `Abort`: the old version resumed.
    Aborted,
    /// A failure after notification: the old version resumed with its state.
    RolledBack,
    /// Anything else (including a failure that could not be rolled back).
    Failed,
    /// `Apply { no_wait: true }`: the checks passed and the update runs on; see `Status`.
    Started,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::Passed => "passed",
            Outcome::Refused => "refused",
            Outcome::Aborted => "aborted",
            Outcome::RolledBack => "rolled back",
            Outcome::Failed => "failed",
            Outcome::Started => "started",
        }
    }

    /// The `updater` exit code for this outcome of `check` or `apply`.
    pub fn exit_code(self) -> i32 {
        use crate::exit;
        match self {
            Outcome::Committed | Outcome::Passed | Outcome::Started => exit::OK,
            Outcome::Refused => exit::REFUSED,
            Outcome::Aborted => exit::ABORTED,
            Outcome::RolledBack => exit::ROLLED_BACK,
            Outcome::Failed => exit::FAILURE,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StatusReport {
    pub components: Vec<ComponentStatus>,
    /// On-disk format version of the mounted image.
    pub format_version: u32,
    /// Updates since the mount, oldest first.
    pub history: Vec<UpdateRecord>,
    /// Name of the package being applied.
    pub update_in_progress: Option<String>,
    /// The online conversion in progress.
    pub conversion: Option<ConversionStatus>,
    /// The last conversion the running server finished, as it measured it.
    pub last_conversion: Option<molt_control::ConversionResult>,
    pub supervisor: Option<SupervisorStatus>,
    /// How the filesystem server's FUSE connection is served (transport, protocol).
    pub fuse: Option<molt_control::FuseInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentStatus {
    pub name: String,
    pub version: String,
    pub pid: u32,
    pub state_schema: u32,
    pub counters: Vec<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRecord {
    pub package: String,
    pub sequence: u64,
    /// The manifest's nature name ("one-component", …).
    pub nature: String,
    pub started_unix: u64,
    /// Each phase reached, with its duration in milliseconds.
    pub phases: Vec<(Phase, u64, PhaseState)>,
    pub outcome: Outcome,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversionStatus {
    pub done: u64,
    pub total: u64,
    pub rate_per_s: f64,
}

/// The supervisor (and update manager) of a mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorStatus {
    pub pid: u32,
    pub version: String,
    /// Where it and the components log.
    pub log: String,
    /// When this supervisor took the mount over (Unix seconds).
    pub took_over_unix: u64,
    /// How: "mount", "live update", "rolled back", "adopted after a crash".
    pub how: String,
}

#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection at a message boundary.
    #[error("control connection closed")]
    Closed,
    #[error("{what}: length {len} exceeds the cap of {cap}")]
    TooLarge {
        what: &'static str,
        len: u64,
        cap: u64,
    },
    #[error("{what}: bad magic {found:#010x}")]
    BadMagic { what: &'static str, found: u32 },
    #[error("{what}: protocol version {found} is not supported (this build speaks {VERSION})")]
    UnsupportedVersion { what: &'static str, found: u32 },
    #[error("{what}: corrupted: {detail}")]
    Corrupted { what: &'static str, detail: String },
}

/// Encodes and writes one message. A message over the channel's cap is refused unsent.
pub fn write_msg<T: Serialize>(
    w: &mut impl Write,
    channel: &Channel,
    msg: &T,
) -> Result<(), ProtocolError> {
    let payload = bincode::serde::encode_to_vec(msg, bincode::config::standard()).map_err(|e| {
        ProtocolError::Corrupted {
            what: channel.what,
            detail: e.to_string(),
        }
    })?;
    if payload.len() as u64 > channel.cap {
        return Err(ProtocolError::TooLarge {
            what: channel.what,
            len: payload.len() as u64,
            cap: channel.cap,
        });
    }
    w.write_all(&frame::encode(channel.magic, channel.version, &payload))?;
    w.flush()?;
    Ok(())
}

/// Reads one message: the header first, whose magic, version and length (against the
/// channel's cap) are checked before the body is read or any buffer sized by it; then the
/// CRC; then the decode, which must use every byte. `Closed` on a clean end of stream.
pub fn read_msg<T: DeserializeOwned>(
    r: &mut impl Read,
    channel: &Channel,
) -> Result<T, ProtocolError> {
    let mut header = [0u8; FRAME_HEADER];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(ProtocolError::Closed),
            Ok(0) => {
                return Err(ProtocolError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a message header",
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let magic = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    if magic != channel.magic {
        return Err(ProtocolError::BadMagic {
            what: channel.what,
            found: magic,
        });
    }
    let version = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if version != channel.version {
        return Err(ProtocolError::UnsupportedVersion {
            what: channel.what,
            found: version,
        });
    }
    let len = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    if len > channel.cap {
        return Err(ProtocolError::TooLarge {
            what: channel.what,
            len,
            cap: channel.cap,
        });
    }
    let body = len + FRAME_TRAILER as u64;
    // Grown as bytes arrive, so a peer that claims much and sends little costs little.
    let mut buf = Vec::with_capacity(FRAME_HEADER + (body as usize).min(1 << 20));
    buf.extend_from_slice(&header);
    r.take(body).read_to_end(&mut buf)?;
    if (buf.len() as u64) < FRAME_HEADER as u64 + body {
        return Err(ProtocolError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed inside a message",
        )));
    }
    let frame = frame::decode(channel.what, &buf, channel.magic, channel.cap).map_err(|e| {
        ProtocolError::Corrupted {
            what: channel.what,
            detail: e.to_string(),
        }
    })?;
    let cfg = bincode::config::standard().with_limit::<DECODE_LIMIT>();
    let (msg, used) = bincode::serde::decode_from_slice(frame.payload, cfg).map_err(|e| {
        ProtocolError::Corrupted {
            what: channel.what,
            detail: e.to_string(),
        }
    })?;
    if used != frame.payload.len() {
        return Err(ProtocolError::Corrupted {
            what: channel.what,
            detail: format!("{} trailing bytes", frame.payload.len() - used),
        });
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn events() -> Vec<Event> {
        vec![
            Event::Check(CheckItem::new(
                "memory",
                false,
                "need 64 MiB, have 32 MiB available",
            )),
            Event::Phase {
                phase: Phase::Preparation,
                state: PhaseState::Finished,
                elapsed_ms: 12,
                detail: "blockdev quiescent".into(),
            },
            Event::Progress {
                what: "converting inodes".into(),
                done: 10,
                total: 100,
            },
            Event::Done {
                outcome: Outcome::RolledBack,
                message: "state check failed".into(),
            },
            Event::Status(Box::new(StatusReport {
                components: vec![ComponentStatus {
                    name: "blockdev".into(),
                    version: "0.2.0".into(),
                    pid: 42,
                    state_schema: 2,
                    counters: vec![("reads".into(), u64::MAX)],
                }],
                format_version: 1,
                history: vec![UpdateRecord {
                    package: "p".into(),
                    sequence: 7,
                    nature: "one-component".into(),
                    started_unix: 1_700_000_000,
                    phases: vec![(Phase::Initialization, 3, PhaseState::Finished)],
                    outcome: Outcome::Committed,
                    message: String::new(),
                }],
                update_in_progress: Some("q".into()),
                conversion: Some(ConversionStatus {
                    done: 1,
                    total: 2,
                    rate_per_s: 1.5,
                }),
                last_conversion: Some(molt_control::ConversionResult {
                    to: formats::version::FormatVersion(3),
                    inodes: 1,
                    bytes: 2,
                    millis: 3,
                    steps: 4,
                    longest_step_us: 5,
                    mean_step_us: 6,
                }),
                supervisor: Some(SupervisorStatus {
                    pid: 7,
                    version: "0.1.0".into(),
                    log: "/run/molt/x.log".into(),
                    took_over_unix: 1_700_000_000,
                    how: "live update".into(),
                }),
                fuse: Some(molt_control::FuseInfo {
                    transport: "dev".into(),
                    protocol: Some("7.44".into()),
                }),
            })),
        ]
    }

    #[test]
    fn round_trip_over_a_stream() {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let reqs = vec![
            Request::Check {
                package: vec![1, 2, 3],
            },
            Request::Apply {
                package: vec![0; 100_000],
                deadline_ms: Some(5000),
                no_wait: true,
            },
            Request::Status,
            Request::Abort,
        ];
        let writer = {
            let reqs = reqs.clone();
            std::thread::spawn(move || {
                for r in &reqs {
                    write_msg(&mut a, &REQUESTS, r).unwrap();
                }
                for e in &events() {
                    write_msg(&mut a, &EVENTS, e).unwrap();
                }
            })
        };
        for r in &reqs {
            assert_eq!(&read_msg::<Request>(&mut b, &REQUESTS).unwrap(), r);
        }
        for e in &events() {
            assert_eq!(&read_msg::<Event>(&mut b, &EVENTS).unwrap(), e);
        }
        writer.join().unwrap();
        assert!(matches!(
            read_msg::<Event>(&mut b, &EVENTS),
            Err(ProtocolError::Closed)
        ));
    }

    #[test]
    fn package_bytes_are_encoded_compactly() {
        let mut out = Vec::new();
        let pkg = vec![0xffu8; 10_000];
        write_msg(&mut out, &REQUESTS, &Request::Check { package: pkg }).unwrap();
        assert!(out.len() < 10_000 + 32, "{}", out.len());
    }

    #[test]
    fn huge_claimed_length_is_refused_before_allocation() {
        let mut f = frame::encode(MAGIC, VERSION, b"x");
        f[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            read_msg::<Event>(&mut &f[..], &EVENTS),
            Err(ProtocolError::TooLarge { len: u64::MAX, .. })
        ));
        // Just over each cap.
        for ch in [REQUESTS, EVENTS] {
            f[8..16].copy_from_slice(&(ch.cap + 1).to_le_bytes());
            assert!(matches!(
                read_msg::<Request>(&mut &f[..], &ch),
                Err(ProtocolError::TooLarge { .. })
            ));
        }
    }

    #[test]
    fn oversized_message_is_not_sent() {
        let mut out = Vec::new();
        let small = Channel { cap: 8, ..EVENTS };
        let e = Event::Done {
            outcome: Outcome::Failed,
            message: "a message longer than eight bytes".into(),
        };
        assert!(matches!(
            write_msg(&mut out, &small, &e),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn framing_errors_are_kept_apart() {
        let mut good = Vec::new();
        write_msg(&mut good, &EVENTS, &events()[0]).unwrap();
        let mut b = good.clone();
        b[0] ^= 1;
        assert!(matches!(
            read_msg::<Event>(&mut &b[..], &EVENTS),
            Err(ProtocolError::BadMagic { .. })
        ));
        let mut b = good.clone();
        b[4] = 9;
        assert!(matches!(
            read_msg::<Event>(&mut &b[..], &EVENTS),
            Err(ProtocolError::UnsupportedVersion { found: 9, .. })
        ));
        let mut b = good.clone();
        b[20] ^= 1;
        assert!(matches!(
            read_msg::<Event>(&mut &b[..], &EVENTS),
            Err(ProtocolError::Corrupted { .. })
        ));
        assert!(matches!(
            read_msg::<Event>(&mut &good[..good.len() - 1], &EVENTS),
            Err(ProtocolError::Io(_))
        ));
        assert!(matches!(
            read_msg::<Event>(&mut &good[..5], &EVENTS),
            Err(ProtocolError::Io(_))
        ));
        // A well-framed payload that is not an Event.
        let f = frame::encode(MAGIC, VERSION, &[200, 1, 2, 3]);
        assert!(matches!(
            read_msg::<Event>(&mut &f[..], &EVENTS),
            Err(ProtocolError::Corrupted { .. })
        ));
    }

    proptest! {
        #[test]
        fn any_single_flip_is_an_error_never_a_panic(pos: usize, bit in 0u8..8) {
            let mut b = Vec::new();
            write_msg(&mut b, &EVENTS, &events()[4]).unwrap();
            let i = pos % b.len();
            b[i] ^= 1 << bit;
            prop_assert!(read_msg::<Event>(&mut &b[..], &EVENTS).is_err());
        }

        #[test]
        fn arbitrary_payloads_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let f = frame::encode(MAGIC, VERSION, &data);
            let _ = read_msg::<Event>(&mut &f[..], &EVENTS);
            let _ = read_msg::<Request>(&mut &f[..], &REQUESTS);
        }
    }
}
