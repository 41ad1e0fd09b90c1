//! Finding and talking to a mount's control socket.
//!
//! The supervisor of the mount at canonical path `M` listens on
//! `<run root>/<key(M)>/control.sock`, where the run root is `$MOLT_RUN_DIR` or `/run/molt`
//! and `key` is the 64-bit FNV-1a hash (offset 0xcbf29ce484222325, prime 0x100000001b3) of
//! the canonical path's bytes, as 16 lower-case hex digits. This is the supervisor's
//! runtime-directory rule, restated here so that `updater` does not depend on `fsd`; a test
//! pins it to known values.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::protocol::{read_msg, write_msg, Event, ProtocolError, Request, EVENTS, REQUESTS};

pub const SOCKET_NAME: &str = "control.sock";

/// `$MOLT_RUN_DIR`, or `/run/molt`.
pub fn run_root() -> PathBuf {
    std::env::var_os("MOLT_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/molt"))
}

/// FNV-1a-64 of the path's bytes, as 16 hex digits.
pub fn mount_key(canonical_mountpoint: &Path) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in canonical_mountpoint.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The control socket of the mount at `canonical_mountpoint` (already canonical).
pub(crate) fn socket_path_for(canonical_mountpoint: &Path) -> PathBuf {
    run_root()
        .join(mount_key(canonical_mountpoint))
        .join(SOCKET_NAME)
}

/// The control socket of the mount at `mountpoint`, canonicalised first.
pub fn socket_path(mountpoint: &Path) -> io::Result<PathBuf> {
    Ok(socket_path_for(&std::fs::canonicalize(mountpoint)?))
}

/// One connection: send a request, then read events until the supervisor closes.
#[derive(Debug)]
pub struct ControlClient {
    stream: UnixStream,
}

impl ControlClient {
    pub fn connect(socket: &Path) -> io::Result<ControlClient> {
        Ok(ControlClient {
            stream: UnixStream::connect(socket)?,
        })
    }

    pub fn send(&mut self, request: &Request) -> Result<(), ProtocolError> {
        write_msg(&mut self.stream, &REQUESTS, request)
    }

    /// The next event; `ProtocolError::Closed` once the supervisor has closed.
    pub fn next_event(&mut self) -> Result<Event, ProtocolError> {
        read_msg(&mut self.stream, &EVENTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_fnv1a_64() {
        // FNV-1a-64 reference values: "" is the offset basis; "a" is 0xaf63dc4c8601ec8c.
        assert_eq!(mount_key(Path::new("")), "cbf29ce484222325");
        assert_eq!(mount_key(Path::new("a")), "af63dc4c8601ec8c");
        assert_eq!(mount_key(Path::new("/mnt/molt")).len(), 16);
    }

    #[test]
    fn socket_lives_in_the_mount_directory() {
        let p = socket_path_for(Path::new("/mnt/x"));
        assert_eq!(p.file_name().unwrap(), SOCKET_NAME);
        assert_eq!(
            p.parent().unwrap().file_name().unwrap().to_str().unwrap(),
            mount_key(Path::new("/mnt/x"))
        );
    }

    #[test]
    fn client_talks_to_a_fake_supervisor() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join(SOCKET_NAME);
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let r: Request = read_msg(&mut s, &REQUESTS).unwrap();
            assert_eq!(r, Request::Status);
            write_msg(&mut s, &EVENTS, &Event::Status(Box::default())).unwrap();
        });
        let mut c = ControlClient::connect(&sock).unwrap();
        c.send(&Request::Status).unwrap();
        assert!(matches!(c.next_event().unwrap(), Event::Status(_)));
        assert!(matches!(c.next_event(), Err(ProtocolError::Closed)));
        server.join().unwrap();
    }
}
