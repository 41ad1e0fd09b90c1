//! NBD URIs: `nbd://HOST[:PORT]/EXPORT` (TCP, default port 10809) and
//! `nbd+unix:///EXPORT?socket=PATH` (a unix socket). The one place image names that are
//! not paths are recognised.

use std::fmt;

/// The port an `nbd://` URI without one names.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// A host name or address and a port; an IPv6 address is kept without its brackets.
    Tcp { host: String, port: u16 },
    /// A unix socket path.
    Unix { socket: String },
}

/// A parsed NBD URI: the server and the export name (empty: the server's default export).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: NbdAddress,
    pub export: String,
}

/// Why a string is not a usable NBD URI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("{0:?} is not an NBD URI (expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)")]
    NotNbd(String),
    #[error("{uri:?}: {why}")]
    Invalid { uri: String, why: String },
}

impl NbdUri {
    /// Whether `s` names an NBD export rather than a file (it starts with an NBD scheme).
    /// Such a string either parses or is refused with a clear error; it is never taken
    /// for a path.
    pub fn is_nbd(s: &str) -> bool {
        scheme_of(s).is_some()
    }

    pub fn parse(s: &str) -> Result<NbdUri, UriError> {
        let invalid = |why: &str| UriError::Invalid {
            uri: s.to_string(),
            why: why.to_string(),
        };
        let (scheme, rest) = scheme_of(s).ok_or_else(|| UriError::NotNbd(s.to_string()))?;
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        if before_query.contains('#') || query.is_some_and(|q| q.contains('#')) {
            return Err(invalid("fragments (#) are not allowed"));
        }
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i + 1..]),
            None => (before_query, ""),
        };
        let export = percent_decode(path).map_err(|why| invalid(&why))?;
        let mut socket = None;
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if pair.is_empty() {
                continue;
            }
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "socket" if scheme == Scheme::Unix => {
                    if socket.is_some() {
                        return Err(invalid("socket= is given twice"));
                    }
                    socket = Some(percent_decode(v).map_err(|why| invalid(&why))?);
                }
                _ => return Err(invalid(&format!("unsupported query parameter {k:?}"))),
            }
        }
        let address = match scheme {
            Scheme::Tcp => {
                let (host, port) = split_host_port(authority).map_err(|why| invalid(&why))?;
                NbdAddress::Tcp { host, port }
            }
            Scheme::Unix => {
                if !authority.is_empty() {
                    return Err(invalid(
                        "nbd+unix:// takes no host (write nbd+unix:///EXPORT?socket=PATH)",
                    ));
                }
                match socket {
                    Some(p) if !p.is_empty() => NbdAddress::Unix { socket: p },
                    _ => return Err(invalid("nbd+unix:// needs ?socket=PATH")),
                }
            }
        };
        Ok(NbdUri { address, export })
    }
}

impl fmt::Display for NbdUri {
    /// The canonical form; parsing it gives the same URI back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(&self.export);
        match &self.address {
            NbdAddress::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{export}")
            }
            NbdAddress::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{export}"),
            NbdAddress::Unix { socket } => {
                write!(f, "nbd+unix:///{export}?socket={}", percent_encode(socket))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Tcp,
    Unix,
}

fn scheme_of(s: &str) -> Option<(Scheme, &str)> {
    if let Some(r) = s.strip_prefix("nbd://") {
        Some((Scheme::Tcp, r))
    } else {
        s.strip_prefix("nbd+unix://").map(|r| (Scheme::Unix, r))
    }
}

fn split_host_port(authority: &str) -> Result<(String, u16), String> {
    if authority.contains('@') {
        return Err("user information (user@) is not supported".into());
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or("an IPv6 address opened with [ is not closed with ]")?;
        match after {
            "" => (h, None),
            p => (
                h,
                Some(
                    p.strip_prefix(':')
                        .ok_or("expected :PORT after the IPv6 address")?,
                ),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return Err("an IPv6 address must be written in brackets".into()),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("nbd:// needs a host".into());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(format!("port {p:?} is not a number in 1..=65535")),
        },
    };
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent escapes do not decode to UTF-8".into())
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            address: NbdAddress::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn tcp_forms() {
        assert_eq!(
            NbdUri::parse("nbd://localhost/disk").unwrap(),
            tcp("localhost", 10809, "disk")
        );
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1:10900/").unwrap(),
            tcp("127.0.0.1", 10900, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1").unwrap(),
            tcp("127.0.0.1", 10809, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]:2000/a%20b").unwrap(),
            tcp("::1", 2000, "a b")
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]/x").unwrap(),
            tcp("::1", 10809, "x")
        );
        assert_eq!(
            NbdUri::parse("nbd://h/dir/export").unwrap(),
            tcp("h", 10809, "dir/export")
        );
    }

    #[test]
    fn unix_forms() {
        let u = NbdUri::parse("nbd+unix:///disk?socket=/run/nbd.sock").unwrap();
        assert_eq!(
            u,
            NbdUri {
                address: NbdAddress::Unix {
                    socket: "/run/nbd.sock".into()
                },
                export: "disk".into()
            }
        );
        let u = NbdUri::parse("nbd+unix://?socket=/tmp/a%20b").unwrap();
        assert_eq!(u.export, "");
        assert_eq!(
            u.address,
            NbdAddress::Unix {
                socket: "/tmp/a b".into()
            }
        );
    }

    #[test]
    fn refusals_name_the_problem() {
        for (bad, says) in [
            ("nbd://", "needs a host"),
            ("nbd://:10809/x", "needs a host"),
            ("nbd://h:0/x", "port"),
            ("nbd://h:70000/x", "port"),
            ("nbd://h:+1/x", "port"),
            ("nbd://::1/x", "brackets"),
            ("nbd://[::1/x", "not closed"),
            ("nbd://u@h/x", "user"),
            ("nbd://h/x?socket=/a", "unsupported query"),
            ("nbd+unix:///x", "needs ?socket"),
            ("nbd+unix:///x?socket=", "needs ?socket"),
            ("nbd+unix://host/x?socket=/a", "takes no host"),
            ("nbd+unix:///x?socket=/a&socket=/b", "twice"),
            ("nbd+unix:///x?tls=on&socket=/a", "unsupported query"),
            ("nbd://h/x%zz", "percent"),
            ("nbd://h/x#frag", "fragment"),
        ] {
            let e = NbdUri::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(matches!(
            NbdUri::parse("/srv/molt.img"),
            Err(UriError::NotNbd(_))
        ));
        assert!(!NbdUri::is_nbd("/srv/molt.img"));
        assert!(!NbdUri::is_nbd("nbd.img"));
        assert!(NbdUri::is_nbd("nbd+unix:///x?socket=/a"));
    }

    proptest! {
        /// Every URI prints to a string that parses back to it.
        #[test]
        fn display_round_trips(
            host in "[a-z][a-z0-9.-]{0,20}",
            v6 in proptest::bool::ANY,
            port in 1u16..,
            export in "\\PC{0,30}",
            socket in "/[\\PC]{1,40}",
            unix in proptest::bool::ANY,
        ) {
            let address = if unix {
                NbdAddress::Unix { socket }
            } else if v6 {
                NbdAddress::Tcp { host: "fe80::1".into(), port }
            } else {
                NbdAddress::Tcp { host, port }
            };
            let u = NbdUri { address, export };
            prop_assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        }

        /// Arbitrary text after a scheme parses or is refused; it never panics.
        #[test]
        fn never_panics(rest in "\\PC{0,60}", unix in proptest::bool::ANY) {
            let s = format!("{}{rest}", if unix { "nbd+unix://" } else { "nbd://" });
            let _ = NbdUri::parse(&s);
        }
    }
}
