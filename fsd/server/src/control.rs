//! The line protocol between the supervisor and a component process over a Unix socket
//! pair. A message is one ASCII line; a blob is a line `<tag> <length>` followed by exactly
//! `length` raw bytes, with the length checked against a cap before anything is read.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Longest line accepted.
const LINE_CAP: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Line(String),
    Blob(String, Vec<u8>),
}

pub struct ControlLink {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    blob_cap: u64,
}

/// Tags whose line is followed by a blob.
const BLOB_TAGS: &[&str] = &["state", "ready"];

impl ControlLink {
    pub fn new(stream: UnixStream, blob_cap: u64) -> io::Result<ControlLink> {
        Ok(ControlLink {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            blob_cap,
        })
    }

    pub fn try_clone(&self) -> io::Result<ControlLink> {
        ControlLink::new(self.writer.try_clone()?, self.blob_cap)
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.writer.set_read_timeout(t)
    }

    pub fn send(&mut self, line: &str) -> io::Result<()> {
        debug_assert!(!line.contains('\n'));
        self.writer.write_all(format!("{line}\n").as_bytes())
    }

    pub fn send_blob(&mut self, tag: &str, bytes: &[u8]) -> io::Result<()> {
        debug_assert!(BLOB_TAGS.contains(&tag));
        let mut msg = format!("{tag} {}\n", bytes.len()).into_bytes();
        msg.extend_from_slice(bytes);
        self.writer.write_all(&msg)
    }

    /// The next message; `UnexpectedEof` when the peer closed the link.
    pub fn recv(&mut self) -> io::Result<Msg> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(LINE_CAP as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "control link closed",
            ));
        }
        if line.last() != Some(&b'\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "control line too long or cut",
            ));
        }
        let line = String::from_utf8(line)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "control line is not UTF-8"))?;
        let line = line.trim_end().to_string();
        let mut parts = line.splitn(2, ' ');
        let tag = parts.next().unwrap_or_default();
        if BLOB_TAGS.contains(&tag) {
            let len: u64 = parts.next().and_then(|l| l.parse().ok()).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "blob without a length")
            })?;
            if len > self.blob_cap {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("blob of {len} bytes exceeds the cap"),
                ));
            }
            let mut bytes = vec![0u8; len as usize];
            self.reader.read_exact(&mut bytes)?;
            return Ok(Msg::Blob(tag.to_string(), bytes));
        }
        Ok(Msg::Line(line))
    }

    /// Waits for the exact line `want`; an `error: ...` line or anything else is an error.
    pub fn expect(&mut self, want: &str) -> io::Result<()> {
        match self.recv()? {
            Msg::Line(l) if l == want => Ok(()),
            Msg::Line(l) => Err(io::Error::other(
                l.strip_prefix("error: ").unwrap_or(&l).to_string(),
            )),
            Msg::Blob(t, _) => Err(io::Error::other(format!("expected {want}, got a {t} blob"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_blobs_round_trip_and_caps_hold() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut a = ControlLink::new(a, 100).unwrap();
        let mut b = ControlLink::new(b, 100).unwrap();
        a.send("prepare 500").unwrap();
        a.send_blob("state", b"\n\x00binary").unwrap();
        a.send_blob("ready", &[7u8; 101]).unwrap();
        assert_eq!(b.recv().unwrap(), Msg::Line("prepare 500".into()));
        assert_eq!(
            b.recv().unwrap(),
            Msg::Blob("state".into(), b"\n\x00binary".to_vec())
        );
        assert!(
            b.recv().is_err(),
            "a blob over the cap is refused before it is read"
        );
    }
}
