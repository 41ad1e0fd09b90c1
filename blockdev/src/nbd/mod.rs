//! Images served by an NBD server: URIs ([`uri`]), the wire protocol ([`proto`]), the
//! connection, and a blocking client for tools ([`NbdClient`]). The driver's engine over a
//! connection is the engine module's `NbdEngine`.
//!
//! The handshake runs once per connection; what it learned (export size and transmission
//! flags) travels with the connected socket ([`NbdConnection`]), so a process that
//! inherits the socket (a live-update successor) uses it without a second handshake.

pub mod proto;
pub mod server;
pub mod uri;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

pub use proto::{flags, ExportInfo};
pub use uri::{NbdAddress, NbdUri, UriError};

use crate::BLOCK_SIZE;
use proto::Cmd;

/// What went wrong talking to an NBD server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error(transparent)]
    Uri(#[from] UriError),
    #[error("connecting to {target}: {source}")]
    Connect { target: String, source: io::Error },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    #[error("the server refused export {export:?}: {reply}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Refused {
        export: String,
        reply: &'static str,
        message: String,
    },
    #[error("export {export:?} is read-only")]
    ReadOnly { export: String },
    #[error("export {export:?} has {size} bytes, not a multiple of the {BLOCK_SIZE}-byte block")]
    Unaligned { export: String, size: u64 },
}

impl NbdError {
    pub(crate) fn io(what: &'static str, source: io::Error) -> NbdError {
        NbdError::Io { what, source }
    }
}

impl From<NbdError> for io::Error {
    fn from(e: NbdError) -> io::Error {
        let kind = match &e {
            NbdError::Uri(_) => io::ErrorKind::InvalidInput,
            NbdError::Connect { source, .. } | NbdError::Io { source, .. } => source.kind(),
            NbdError::Refused { .. } => io::ErrorKind::NotFound,
            NbdError::ReadOnly { .. } => io::ErrorKind::PermissionDenied,
            NbdError::Protocol(_) | NbdError::Unaligned { .. } => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e.to_string())
    }
}

/// A connected socket to an NBD server.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn connect(address: &NbdAddress, timeout: Duration) -> io::Result<Stream> {
        match address {
            NbdAddress::Unix { socket } => UnixStream::connect(socket).map(Stream::Unix),
            NbdAddress::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for a in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            // Requests are written whole; do not hold their tails back.
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    /// Wraps an inherited descriptor of the kind `address` names.
    fn from_fd(address: &NbdAddress, fd: OwnedFd) -> Stream {
        match address {
            NbdAddress::Unix { .. } => Stream::Unix(UnixStream::from(fd)),
            NbdAddress::Tcp { .. } => Stream::Tcp(TcpStream::from(fd)),
        }
    }

    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Ends the connection for every descriptor of it (a reader blocked on it returns).
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub(crate) fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where an export lives and what its handshake said: everything needed to use a
/// connection to it, or to open a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTarget {
    pub uri: NbdUri,
    pub info: ExportInfo,
}

impl NbdTarget {
    pub fn num_blocks(&self) -> u64 {
        self.info.size / BLOCK_SIZE as u64
    }

    /// Arguments that describe this target to a driver process that inherits the socket.
    pub fn driver_args(&self) -> Vec<String> {
        vec![
            "--nbd".into(),
            self.uri.to_string(),
            "--nbd-size".into(),
            self.info.size.to_string(),
            "--nbd-flags".into(),
            self.info.flags.to_string(),
        ]
    }
}

/// How long one connection attempt (connect and handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A socket in the transmission phase and the export it reached.
#[derive(Debug)]
pub struct NbdConnection {
    pub(crate) stream: Stream,
    pub target: NbdTarget,
}

impl NbdConnection {
    /// Connects to `uri` and negotiates its export. Refuses a read-only export and one
    /// whose size is not whole blocks, naming it.
    pub fn connect(uri: &NbdUri) -> Result<NbdConnection, NbdError> {
        NbdConnection::connect_within(uri, CONNECT_TIMEOUT)
    }

    /// [`NbdConnection::connect`], with `timeout` for the connection and each read or
    /// write of the handshake.
    pub fn connect_within(uri: &NbdUri, timeout: Duration) -> Result<NbdConnection, NbdError> {
        let mut stream =
            Stream::connect(&uri.address, timeout).map_err(|source| NbdError::Connect {
                target: uri.to_string(),
                source,
            })?;
        // A server that accepts and then says nothing must not hang the caller.
        stream
            .set_timeouts(Some(timeout))
            .map_err(|e| NbdError::io("setting socket timeouts", e))?;
        let info = proto::handshake(&mut stream, &uri.export)?;
        stream
            .set_timeouts(None)
            .map_err(|e| NbdError::io("setting socket timeouts", e))?;
        if info.has(flags::READ_ONLY) {
            return Err(NbdError::ReadOnly {
                export: uri.export.clone(),
            });
        }
        if info.size % BLOCK_SIZE as u64 != 0 {
            return Err(NbdError::Unaligned {
                export: uri.export.clone(),
                size: info.size,
            });
        }
        Ok(NbdConnection {
            stream,
            target: NbdTarget {
                uri: uri.clone(),
                info,
            },
        })
    }

    /// Adopts an inherited socket already in the transmission phase with `target`.
    pub fn from_fd(fd: OwnedFd, target: NbdTarget) -> NbdConnection {
        NbdConnection {
            stream: Stream::from_fd(&target.uri.address, fd),
            target,
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.stream.as_fd().try_clone_to_owned()
    }

    pub fn into_fd(self) -> OwnedFd {
        match self.stream {
            Stream::Unix(s) => s.into(),
            Stream::Tcp(s) => s.into(),
        }
    }
}

/// Largest data length of one request: servers commonly refuse more than 32 MiB.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;

/// A blocking client for tools (mkfs, fsck, convert, the supervisor's checks): one
/// request at a time, each answered before the next is sent.
#[derive(Debug)]
pub struct NbdClient {
    conn: Mutex<(Stream, u64)>,
    target: NbdTarget,
}

impl NbdClient {
    pub fn connect(uri: &NbdUri) -> Result<NbdClient, NbdError> {
        let c = NbdConnection::connect(uri)?;
        Ok(NbdClient {
            conn: Mutex::new((c.stream, 1)),
            target: c.target,
        })
    }

    pub fn target(&self) -> &NbdTarget {
        &self.target
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.target.info.size
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "bytes {offset}..+{len} outside the export of {} bytes",
                    self.size()
                ),
            )),
        }
    }

    /// Sends one request and waits for its reply; a read's data lands in `read_into`.
    fn request(
        &self,
        cmd: Cmd,
        cmd_flags: u16,
        offset: u64,
        len: u32,
        write: &[u8],
        read_into: &mut [u8],
    ) -> io::Result<()> {
        let mut g = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let (stream, next) = &mut *g;
        let cookie = *next;
        *next += 1;
        let head = proto::encode_request(cmd, cmd_flags, cookie, offset, len);
        let mut msg = Vec::with_capacity(head.len() + write.len());
        msg.extend_from_slice(&head);
        msg.extend_from_slice(write);
        stream
            .write_all(&msg)
            .map_err(|e| NbdError::io("sending a request", e))?;
        let reply = proto::read_reply_header(stream)?;
        if reply.cookie != cookie {
            stream.shutdown();
            return Err(NbdError::Protocol(format!(
                "reply for cookie {} while only {cookie} is outstanding",
                reply.cookie
            ))
            .into());
        }
        if reply.error != 0 {
            return Err(io::Error::from_raw_os_error(proto::errno_of(reply.error)));
        }
        if cmd == Cmd::Read {
            stream
                .read_exact(read_into)
                .map_err(|e| NbdError::io("reading the data of a read reply", e))?;
        }
        Ok(())
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_REQUEST_BYTES as usize);
            let off = offset + done as u64;
            self.request(Cmd::Read, 0, off, n as u32, &[], &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`. Where the export can flush, durability waits for
    /// [`NbdClient::flush`]; where it offers only FUA, every write is sent with FUA.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let fua = self.write_through();
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_REQUEST_BYTES as usize);
            let off = offset + done as u64;
            self.request(
                Cmd::Write,
                fua,
                off,
                n as u32,
                &buf[done..done + n],
                &mut [],
            )?;
            done += n;
        }
        Ok(())
    }

    /// The command flags every write needs: FUA when the export has FUA but no flush.
    fn write_through(&self) -> u16 {
        let i = self.target.info;
        if !i.has(flags::SEND_FLUSH) && i.has(flags::SEND_FUA) {
            proto::CMD_FLAG_FUA
        } else {
            0
        }
    }

    /// Makes every completed write durable (a no-op where the export has no flush: it
    /// then writes through, with FUA or by itself).
    pub fn flush(&self) -> io::Result<()> {
        if !self.target.info.has(flags::SEND_FLUSH) {
            return Ok(());
        }
        self.request(Cmd::Flush, 0, 0, 0, &[], &mut [])
    }

    /// Zeroes a range: `NBD_CMD_WRITE_ZEROES` (the server may punch a hole) where the
    /// export has it, else zero-filled writes.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        let fua = self.write_through();
        let zero_cmd = self.target.info.has(flags::SEND_WRITE_ZEROES);
        let zeros = if zero_cmd {
            Vec::new()
        } else {
            vec![0u8; len.min(1 << 20) as usize]
        };
        let mut done = 0u64;
        while done < len {
            let chunk = if zero_cmd {
                1 << 30
            } else {
                zeros.len() as u64
            };
            let n = (len - done).min(chunk);
            if zero_cmd {
                self.request(Cmd::WriteZeroes, fua, offset + done, n as u32, &[], &mut [])?;
            } else {
                self.request(
                    Cmd::Write,
                    fua,
                    offset + done,
                    n as u32,
                    &zeros[..n as usize],
                    &mut [],
                )?;
            }
            done += n;
        }
        Ok(())
    }

    /// A hint that a range is no longer needed (`NBD_CMD_TRIM`); what it reads afterwards
    /// is up to the server. Refused when the export does not offer trim.
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        if !self.target.info.has(flags::SEND_TRIM) {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(1 << 30);
            self.request(Cmd::Trim, 0, offset + done, n as u32, &[], &mut [])?;
            done += n;
        }
        Ok(())
    }
}

impl Drop for NbdClient {
    /// Says goodbye (`NBD_CMD_DISC`) so that the server closes its side at once.
    fn drop(&mut self) {
        let g = self.conn.get_mut().unwrap_or_else(|p| p.into_inner());
        let head = proto::encode_request(Cmd::Disconnect, 0, 0, 0, 0);
        let _ = g.0.write_all(&head);
        g.0.shutdown();
    }
}
