//! Live update of the driver process: the control line protocol between a supervisor and
//! a driver, the state blob they exchange, and both ends of it.
//!
//! - [`DriverControl`] is the supervisor's end (one per driver process).
//! - [`driver`] is the driver's end: [`driver::serve_controlled`] for a driver that serves
//!   and can be prepared, [`driver::adopt_controlled`] for a successor that imports its
//!   predecessor's state and writes nothing to the ring until commit (or, when the
//!   ring's driver died, takes the ring over at once: crash recovery).
//!
//! `RING.md` ("Live update") is the normative description of the lines.

mod control;
pub mod driver;

use std::io::{self, BufRead, Read};

pub use control::{DriverControl, DriverStatus};

use crate::persist::{DriverState, StateError, StateVersion};

/// Longest control line accepted, newline included (a state blob is a few hundred hex
/// digits).
pub const MAX_LINE: usize = 64 * 1024;

/// A framed driver state as it travels between drivers (through the supervisor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateBlob(Vec<u8>);

impl StateBlob {
    pub fn from_bytes(bytes: Vec<u8>) -> StateBlob {
        StateBlob(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// The schema named in the frame header (not checked).
    pub fn schema(&self) -> Option<StateVersion> {
        DriverState::schema_of(&self.0)
    }

    /// The state checking phase, for a supervisor: decodes the blob in any schema this
    /// code knows and checks its invariants (nothing in flight, queue positions agree…).
    /// Whether the successor imports this schema is its own decision.
    pub fn check(&self) -> Result<DriverState, StateError> {
        DriverState::import_accepting(&self.0, &[StateVersion::V1, StateVersion::V2])
    }

    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(self.0.len() * 2);
        for b in &self.0 {
            s.push(DIGITS[(b >> 4) as usize] as char);
            s.push(DIGITS[(b & 15) as usize] as char);
        }
        s
    }

    pub fn from_hex(hex: &str) -> Result<StateBlob, StateError> {
        let bad = || StateError::Corrupted("state blob is not an even run of hex digits".into());
        let hex = hex.as_bytes();
        if hex.len() & 1 != 0 {
            return Err(bad());
        }
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        hex.chunks(2)
            .map(|p| Some((digit(p[0])? << 4) | digit(p[1])?))
            .collect::<Option<Vec<u8>>>()
            .map(StateBlob)
            .ok_or_else(bad)
    }
}

/// Why a control exchange failed, as the supervisor sees it.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("control channel: {0}")]
    Io(#[from] io::Error),
    #[error("no reply to {0} in time")]
    Timeout(&'static str),
    #[error("the driver closed the control channel")]
    Closed,
    /// The driver could not drain in time and serves on.
    #[error("the driver missed the drain deadline and serves on")]
    Deadline,
    /// The successor does not import this state schema (it exits).
    #[error("the driver does not import state schema {0}")]
    UnsupportedSchema(u32),
    /// The driver answered `error: …`.
    #[error("the driver refused: {0}")]
    Refused(String),
    #[error("unexpected control reply: {0:?}")]
    Protocol(String),
    #[error("state: {0}")]
    State(#[from] StateError),
}

/// Reads one line of at most [`MAX_LINE`] bytes, without its newline. `None` at end of
/// stream.
pub(crate) fn read_line(r: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        if n == MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "control line too long",
            ));
        }
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "control line cut short",
        ));
    }
    buf.pop();
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "control line is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects() {
        let b = StateBlob::from_bytes((0..=255u8).collect());
        assert_eq!(StateBlob::from_hex(&b.to_hex()).unwrap(), b);
        assert!(StateBlob::from_hex("abc").is_err());
        assert!(StateBlob::from_hex("zz").is_err());
        assert!(StateBlob::from_hex("+1").is_err());
    }

    #[test]
    fn lines_are_capped() {
        let long = vec![b'a'; MAX_LINE + 10];
        let mut r = io::BufReader::new(&long[..]);
        assert!(read_line(&mut r).is_err());
        let mut r = io::BufReader::new(&b"status\nready 00\npartial"[..]);
        assert_eq!(read_line(&mut r).unwrap().as_deref(), Some("status"));
        assert_eq!(read_line(&mut r).unwrap().as_deref(), Some("ready 00"));
        assert!(read_line(&mut r).is_err());
        assert_eq!(read_line(&mut r).unwrap(), None);
    }
}
