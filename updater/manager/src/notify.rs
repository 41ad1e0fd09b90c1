//! The service manager's notification protocol (`sd_notify`), spoken directly: when
//! `NOTIFY_SOCKET` names a Unix datagram socket (a path, or `@name` for the abstract
//! namespace), every message is one datagram of newline-separated `KEY=VALUE` lines.
//! Without the variable every call does nothing, so the supervisor calls it freely.
//!
//! The supervisor sends `READY=1` (with `MAINPID=`) once the mount answers, `STATUS=`
//! lines while a live update runs its phases, and `STOPPING=1` when it starts to stop.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;

/// The variable a service manager sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Where notifications go: the socket `NOTIFY_SOCKET` named when the process started.
struct Target {
    addr: SocketAddr,
    socket: UnixDatagram,
}

/// The target, resolved once; `None` without (or with an unusable) `NOTIFY_SOCKET`.
fn target() -> Option<&'static Target> {
    static TARGET: OnceLock<Option<Target>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            let name = std::env::var_os(NOTIFY_SOCKET)?;
            match address(&name.to_string_lossy())
                .and_then(|addr| Ok((addr, UnixDatagram::unbound()?)))
            {
                Ok((addr, socket)) => Some(Target { addr, socket }),
                Err(e) => {
                    molt_sys::errln!("fsd: {NOTIFY_SOCKET}={name:?} is not usable: {e}");
                    None
                }
            }
        })
        .as_ref()
}

/// The socket address `NOTIFY_SOCKET` names: an absolute path, or `@name` in the
/// abstract namespace.
pub fn address(name: &str) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    if let Some(abstract_name) = name.strip_prefix('@') {
        SocketAddr::from_abstract_name(abstract_name.as_bytes())
    } else if name.starts_with('/') {
        SocketAddr::from_pathname(name)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "expected an absolute path or an @abstract name",
        ))
    }
}

/// Sends one notification (lines `KEY=VALUE`); a no-op without `NOTIFY_SOCKET`. A
/// failure is logged once per message, never fatal: the mount works without it.
pub fn send(message: &str) {
    if let Some(t) = target() {
        if let Err(e) = t.socket.send_to_addr(message.as_bytes(), &t.addr) {
            molt_sys::errln!("fsd: notifying the service manager: {e}");
        }
    }
}

/// `READY=1`: the mount is usable.
pub fn ready(status: &str) {
    send(&format!(
        "READY=1\nMAINPID={}\nSTATUS={}",
        std::process::id(),
        one_line(status)
    ));
}

/// `STATUS=…`: what the supervisor is doing.
pub fn status(status: &str) {
    send(&format!("STATUS={}", one_line(status)));
}

/// `STOPPING=1`: the supervisor is stopping the mount.
pub fn stopping(status: &str) {
    send(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
}

/// A status is one line: newlines would start new assignments.
fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        use std::os::linux::net::SocketAddrExt;
        let a = address("@molt/notify").unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"molt/notify"[..]));
        let p = address("/run/systemd/notify").unwrap();
        assert_eq!(
            p.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        assert!(address("relative").is_err());
        assert!(address("").is_err());
    }

    #[test]
    fn a_datagram_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("molt-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let client = UnixDatagram::unbound().unwrap();
        client
            .send_to_addr(b"READY=1", &address(&format!("@{name}")).unwrap())
            .unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert_eq!(one_line("a\nb"), "a b");
    }
}
