//! The NBD engine: the image is an export of an NBD server, reached over one connection.
//!
//! Requests are sent as they are submitted, many in flight at once; a reader thread takes
//! the replies (in any order, matched by cookie) and hands them to the engine's thread,
//! which copies read data into place. No unsafe code: registered ring slots are read and
//! written through the ring's own copy functions.
//!
//! Invariants:
//! - Every part sent on the current connection is in `expected` until its reply is read;
//!   a reply whose cookie is not there (unknown, or answered twice) ends the connection.
//! - Only one thread reads the socket, and none once [`NbdEngine::stop_reading`] returned:
//!   a driver that holds for a live update leaves the connection, idle, to its successor.
//! - A lost connection (EOF, an I/O error, a protocol error) is replaced with backoff;
//!   every part without a reply is sent again on the new one, in its original order (reads,
//!   writes of whole blocks, zeroing and flushes are idempotent, and requests in flight are
//!   unordered). Past `reconnect_bound` without a connection, every waiting request fails
//!   with EIO; from then on each new request waits for one more attempt (at most
//!   [`FAILING_RETRY`] away) and fails with EIO if it fails, until a connection is back.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{validate, Errno, IoBuf, IoCompletion, IoOp, IoRequest, WaitOutcome};
use crate::buffer::AlignedBuf;
use crate::nbd::proto::{self, Cmd};
use crate::nbd::{flags, NbdConnection, NbdError, NbdTarget, Stream};
use crate::ring::RingRegion;
use crate::BLOCK_SIZE;
use molt_sys as sys;

/// How long the engine keeps trying to reconnect, with requests waiting, before it fails
/// them with EIO (`MOLT_NBD_RECONNECT_MS` overrides it for the driver).
pub const DEFAULT_RECONNECT_BOUND: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long one reconnection attempt may take: the serve loop waits for it, so it is
/// short (a server that accepts and then says nothing costs this much per attempt).
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A connection on which a request waits this long for its reply (or a request this long
/// to be written) is taken for lost: a server that hangs is treated like one that went
/// away.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Past the bound, how soon a new request tries the connection again.
const FAILING_RETRY: Duration = Duration::from_millis(100);
/// Largest zeroing request: far below the protocol's u32 length.
const ZEROES_CHUNK: u64 = 1 << 30;
/// Largest zero-filled write, where the export cannot zero by itself.
const ZERO_WRITE_CHUNK: usize = 1 << 20;

/// What the reader thread tells the engine.
#[derive(Debug)]
enum Event {
    Reply {
        generation: u64,
        cookie: u64,
        error: u32,
        data: Vec<u8>,
    },
    Lost {
        generation: u64,
        why: String,
    },
}

/// One NBD request; an engine request is one or more of them (a large zeroing is split).
#[derive(Debug)]
struct Part {
    req: u64,
    cmd: Cmd,
    cmd_flags: u16,
    offset: u64,
    len: u32,
    /// A write's data, kept until its reply so that it can be sent again.
    data: Option<Arc<Vec<u8>>>,
    /// Where a read's data goes in its request's buffer.
    buf_offset: usize,
    /// When it was sent on the current connection.
    sent_at: Option<Instant>,
}

#[derive(Debug)]
struct Req {
    user_data: u64,
    buf: Option<IoBuf>,
    parts_left: usize,
    result: Result<(), Errno>,
}

#[derive(Debug)]
struct Reader {
    stop: Arc<OwnedFd>,
    thread: JoinHandle<()>,
}

#[derive(Debug)]
pub struct NbdEngine {
    target: NbdTarget,
    capacity: usize,
    reconnect_bound: Duration,
    reply_timeout: Duration,
    /// The current connection; `None` while it is being replaced.
    stream: Option<Stream>,
    reader: Option<Reader>,
    /// Counts connections (and readers): events of an earlier one are ignored.
    generation: u64,
    events_tx: Sender<Event>,
    events_rx: Receiver<Event>,
    /// Signalled by the reader with each event.
    wake: Arc<OwnedFd>,
    /// Cookies sent on the current connection and the data length of their reply.
    expected: Arc<Mutex<HashMap<u64, u32>>>,
    /// Parts not yet sent on the current connection, in cookie (submission) order.
    unsent: VecDeque<u64>,
    parts: BTreeMap<u64, Part>,
    reqs: HashMap<u64, Req>,
    next_cookie: u64,
    next_req: u64,
    done: Vec<IoCompletion>,
    /// The ring whose slots [`IoBuf::Fixed`] names, and their sizes (for `validate`).
    ring: Option<RingRegion>,
    fixed: Vec<(usize, usize)>,
    down_since: Option<Instant>,
    next_attempt: Instant,
    backoff: Duration,
    /// Past the bound: requests fail until a connection is back.
    failing: bool,
    zeros: Arc<Vec<u8>>,
}

impl NbdEngine {
    /// An engine over a connection in the transmission phase (fresh, or inherited from a
    /// predecessor that drained it) that keeps up to `depth` requests in flight.
    pub fn new(
        conn: NbdConnection,
        depth: u32,
        reconnect_bound: Duration,
    ) -> io::Result<NbdEngine> {
        let (events_tx, events_rx) = channel();
        conn.stream.set_timeouts(Some(REPLY_TIMEOUT))?;
        // Cookies start from the pid: a stray reply left on an inherited connection by an
        // earlier process is far more likely to be refused as unknown than matched.
        let first_cookie = (u64::from(std::process::id()) << 32) | 1;
        Ok(NbdEngine {
            target: conn.target,
            capacity: depth.max(1) as usize,
            reconnect_bound,
            reply_timeout: REPLY_TIMEOUT,
            stream: Some(conn.stream),
            reader: None,
            generation: 0,
            events_tx,
            events_rx,
            wake: Arc::new(sys::eventfd()?),
            expected: Arc::new(Mutex::new(HashMap::new())),
            unsent: VecDeque::new(),
            parts: BTreeMap::new(),
            reqs: HashMap::new(),
            next_cookie: first_cookie,
            next_req: 0,
            done: Vec::new(),
            ring: None,
            fixed: Vec::new(),
            down_since: None,
            next_attempt: Instant::now(),
            backoff: FIRST_BACKOFF,
            failing: false,
            zeros: Arc::new(Vec::new()),
        })
    }

    /// Changes how long a reply may take before the connection is taken for lost
    /// (default [`REPLY_TIMEOUT`]).
    pub fn with_reply_timeout(mut self, t: Duration) -> io::Result<NbdEngine> {
        if let Some(s) = &self.stream {
            s.set_timeouts(Some(t))?;
        }
        self.reply_timeout = t;
        Ok(self)
    }

    pub fn target(&self) -> &NbdTarget {
        &self.target
    }

    pub fn num_blocks(&self) -> u64 {
        self.target.num_blocks()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn in_flight(&self) -> usize {
        self.reqs.len() + self.done.len()
    }

    /// Whether the engine has a connection now (tests watch reconnection).
    pub fn connected(&self) -> bool {
        self.stream.is_some()
    }

    pub(crate) fn register_ring(&mut self, ring: &RingRegion) -> io::Result<()> {
        let view = ring.try_clone().map_err(io::Error::other)?;
        let slot = ring.geometry().slot_size as usize;
        self.fixed = (0..ring.geometry().queue_depth)
            .map(|_| (0, slot))
            .collect();
        self.ring = Some(view);
        Ok(())
    }

    pub fn push(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        if self.reqs.len() + self.done.len() >= self.capacity {
            return Err(req);
        }
        let IoRequest { user_data, op } = req;
        if let Err(e) = validate(&op, self.num_blocks(), &self.fixed) {
            self.complete_now(user_data, op, Err(e));
            return Ok(());
        }
        let info = self.target.info;
        // Without a flush command, writes go through (FUA where offered): a flush then
        // has nothing left to do.
        let write_flags = if !info.has(flags::SEND_FLUSH) && info.has(flags::SEND_FUA) {
            proto::CMD_FLAG_FUA
        } else {
            0
        };
        let id = self.next_req;
        self.next_req += 1;
        let mut parts = Vec::new();
        let (buf, write_data) = match op {
            IoOp::Read { lba, buf } => {
                parts.push((Cmd::Read, 0, lba.byte_offset(), buf.len() as u32, None, 0));
                (Some(buf), None)
            }
            IoOp::Write { lba, buf } => {
                let data = self.copy_out(&buf);
                parts.push((
                    Cmd::Write,
                    write_flags,
                    lba.byte_offset(),
                    buf.len() as u32,
                    None,
                    0,
                ));
                (Some(buf), Some(Arc::new(data)))
            }
            IoOp::Flush if !info.has(flags::SEND_FLUSH) => {
                self.done.push(IoCompletion {
                    user_data,
                    result: Ok(()),
                    buf: None,
                });
                return Ok(());
            }
            IoOp::Flush => {
                parts.push((Cmd::Flush, 0, 0, 0, None, 0));
                (None, None)
            }
            IoOp::Discard { lba, nblocks } => {
                // Discarded blocks must read back as zeros: NBD_CMD_TRIM promises nothing
                // about what a trimmed range reads, so discards zero.
                let mut off = lba.byte_offset();
                let end = off + nblocks * BLOCK_SIZE as u64;
                if info.has(flags::SEND_WRITE_ZEROES) {
                    while off < end {
                        let n = (end - off).min(ZEROES_CHUNK);
                        parts.push((Cmd::WriteZeroes, write_flags, off, n as u32, None, 0));
                        off += n;
                    }
                } else {
                    if self.zeros.is_empty() {
                        self.zeros = Arc::new(vec![0u8; ZERO_WRITE_CHUNK]);
                    }
                    while off < end {
                        let n = (end - off).min(ZERO_WRITE_CHUNK as u64);
                        let data = if n as usize == self.zeros.len() {
                            self.zeros.clone()
                        } else {
                            Arc::new(vec![0u8; n as usize])
                        };
                        parts.push((Cmd::Write, write_flags, off, n as u32, Some(data), 0));
                        off += n;
                    }
                }
                (None, None)
            }
        };
        self.reqs.insert(
            id,
            Req {
                user_data,
                buf,
                parts_left: parts.len(),
                result: Ok(()),
            },
        );
        for (cmd, cmd_flags, offset, len, data, buf_offset) in parts {
            let cookie = self.next_cookie;
            self.next_cookie = self.next_cookie.wrapping_add(1);
            self.parts.insert(
                cookie,
                Part {
                    req: id,
                    cmd,
                    cmd_flags,
                    offset,
                    len,
                    data: data.or_else(|| write_data.clone()),
                    buf_offset,
                    sent_at: None,
                },
            );
            self.unsent.push_back(cookie);
        }
        Ok(())
    }

    fn complete_now(&mut self, user_data: u64, op: IoOp, result: Result<(), Errno>) {
        self.done.push(IoCompletion {
            user_data,
            result,
            buf: op.take_owned(),
        });
    }

    /// A copy of the data a write carries.
    fn copy_out(&self, buf: &IoBuf) -> Vec<u8> {
        match buf {
            IoBuf::Owned(b) => b.to_vec(),
            IoBuf::Fixed { index, len } => {
                let mut v = vec![0u8; *len as usize];
                if let Some(ring) = &self.ring {
                    ring.copy_from_slot(*index, 0, &mut v);
                }
                v
            }
        }
    }

    pub fn submit(&mut self) -> io::Result<()> {
        if self.stream.is_none() {
            self.try_reconnect();
        }
        if self.stream.is_some() && self.reader.is_none() {
            self.start_reader()?;
        }
        while let Some(&cookie) = self.unsent.front() {
            let Some(stream) = self.stream.as_mut() else {
                break;
            };
            let Some(p) = self.parts.get(&cookie) else {
                self.unsent.pop_front();
                continue;
            };
            let read_len = if p.cmd == Cmd::Read { p.len } else { 0 };
            lock(&self.expected).insert(cookie, read_len);
            let head = proto::encode_request(p.cmd, p.cmd_flags, cookie, p.offset, p.len);
            let sent = match &p.data {
                Some(d) if p.cmd == Cmd::Write => {
                    let mut msg = Vec::with_capacity(head.len() + d.len());
                    msg.extend_from_slice(&head);
                    msg.extend_from_slice(d);
                    stream.write_all(&msg)
                }
                _ => stream.write_all(&head),
            };
            match sent {
                Ok(()) => {
                    self.unsent.pop_front();
                    if let Some(p) = self.parts.get_mut(&cookie) {
                        p.sent_at = Some(Instant::now());
                    }
                }
                Err(e) => {
                    self.lose_connection(&format!("sending a request: {e}"));
                    break;
                }
            }
        }
        Ok(())
    }

    fn start_reader(&mut self) -> io::Result<()> {
        let Some(stream) = &self.stream else {
            return Ok(());
        };
        let mut rd = stream.try_clone()?;
        let stop = Arc::new(sys::eventfd()?);
        let stop2 = stop.clone();
        let tx = self.events_tx.clone();
        let wake = self.wake.clone();
        let expected = self.expected.clone();
        let generation = self.generation;
        let thread = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || {
                let why = read_replies(&mut rd, &stop2, &tx, &wake, &expected, generation);
                if let Some(why) = why {
                    let _ = tx.send(Event::Lost { generation, why });
                    let _ = sys::eventfd_signal(wake.as_fd());
                }
            })?;
        self.reader = Some(Reader { stop, thread });
        Ok(())
    }

    /// Stops the reader thread and waits for it: from here until the next submit, this
    /// process does not read the connection. Replies already read are kept for `reap`.
    pub(crate) fn stop_reading(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = sys::eventfd_signal(r.stop.as_fd());
            let _ = r.thread.join();
        }
    }

    /// Drops the connection and arranges for a new one; every part without a reply is
    /// sent again there.
    fn lose_connection(&mut self, why: &str) {
        if let Some(s) = self.stream.take() {
            molt_sys::errln!(
                "blockdev: NBD connection to {} lost ({why}); reconnecting",
                self.target.uri
            );
            s.shutdown();
        }
        self.stop_reading();
        self.generation += 1;
        lock(&self.expected).clear();
        for p in self.parts.values_mut() {
            p.sent_at = None;
        }
        self.unsent = self.parts.keys().copied().collect();
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
            self.backoff = FIRST_BACKOFF;
            self.next_attempt = Instant::now();
        }
    }

    fn try_reconnect(&mut self) {
        let now = Instant::now();
        if now < self.next_attempt {
            return;
        }
        let down_since = *self.down_since.get_or_insert(now);
        let attempt = NbdConnection::connect_within(&self.target.uri, RECONNECT_TIMEOUT);
        match attempt.and_then(|c| self.check_same(c)) {
            Ok(conn) => {
                molt_sys::errln!(
                    "blockdev: reconnected to {} after {} ms; resending {} requests",
                    self.target.uri,
                    down_since.elapsed().as_millis(),
                    self.unsent.len()
                );
                if let Err(e) = conn.stream.set_timeouts(Some(self.reply_timeout)) {
                    molt_sys::errln!("blockdev: setting NBD socket timeouts: {e}");
                }
                self.stream = Some(conn.stream);
                self.down_since = None;
                self.failing = false;
                self.backoff = FIRST_BACKOFF;
            }
            Err(e) => {
                if !self.failing && down_since.elapsed() >= self.reconnect_bound {
                    molt_sys::errln!(
                        "blockdev: no connection to {} for {} ms ({e}): failing requests \
                         with EIO until it is back",
                        self.target.uri,
                        down_since.elapsed().as_millis()
                    );
                    self.failing = true;
                }
                // Past the bound, a new request waits for one more attempt, soon.
                let wait = if self.failing {
                    FAILING_RETRY
                } else {
                    self.backoff
                };
                self.next_attempt = now + wait;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                if self.failing {
                    self.fail_all();
                }
            }
        }
    }

    /// Refuses a new connection to an export that is not the one the image was opened on.
    fn check_same(&self, conn: NbdConnection) -> Result<NbdConnection, NbdError> {
        let (was, now) = (self.target.info.size, conn.target.info.size);
        if now < was {
            return Err(NbdError::Protocol(format!(
                "the export shrank from {was} to {now} bytes"
            )));
        }
        Ok(conn)
    }

    /// Completes every request waiting for the connection with EIO.
    fn fail_all(&mut self) {
        self.unsent.clear();
        self.parts.clear();
        for (_, r) in self.reqs.drain() {
            self.done.push(IoCompletion {
                user_data: r.user_data,
                result: Err(Errno(libc::EIO)),
                buf: owned(r.buf),
            });
        }
    }

    pub fn reap(&mut self, out: &mut Vec<IoCompletion>) {
        while let Ok(ev) = self.events_rx.try_recv() {
            match ev {
                Event::Reply {
                    generation,
                    cookie,
                    error,
                    data,
                } if generation == self.generation => self.finish_part(cookie, error, data),
                Event::Lost { generation, why } if generation == self.generation => {
                    self.lose_connection(&why)
                }
                _ => {}
            }
        }
        if self.stream.is_some() {
            let oldest = self.parts.values().filter_map(|p| p.sent_at).min();
            if oldest.is_some_and(|t| t.elapsed() >= self.reply_timeout) {
                self.lose_connection(&format!(
                    "no reply for {} ms",
                    self.reply_timeout.as_millis()
                ));
            }
        }
        out.append(&mut self.done);
    }

    fn finish_part(&mut self, cookie: u64, error: u32, data: Vec<u8>) {
        let Some(p) = self.parts.remove(&cookie) else {
            return;
        };
        let Some(r) = self.reqs.get_mut(&p.req) else {
            return;
        };
        if error != 0 {
            if r.result.is_ok() {
                r.result = Err(Errno(proto::errno_of(error)));
            }
        } else if p.cmd == Cmd::Read {
            match &mut r.buf {
                Some(IoBuf::Owned(b)) => {
                    b[p.buf_offset..p.buf_offset + data.len()].copy_from_slice(&data)
                }
                Some(IoBuf::Fixed { index, .. }) => {
                    if let Some(ring) = &self.ring {
                        ring.copy_to_slot(*index, p.buf_offset, &data);
                    }
                }
                None => {}
            }
        }
        r.parts_left -= 1;
        if r.parts_left == 0 {
            if let Some(r) = self.reqs.remove(&p.req) {
                self.done.push(IoCompletion {
                    user_data: r.user_data,
                    result: r.result,
                    buf: owned(r.buf),
                });
            }
        }
    }

    pub fn wait(
        &mut self,
        doorbell: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> io::Result<WaitOutcome> {
        if !self.done.is_empty() {
            return Ok(WaitOutcome::default());
        }
        let mut timeout = timeout;
        if self.stream.is_none() && !self.reqs.is_empty() {
            timeout = timeout.min(self.next_attempt.saturating_duration_since(Instant::now()));
        }
        let mut fds = vec![self.wake.as_raw_fd()];
        fds.extend(doorbell.map(|d| d.as_raw_fd()));
        let ready = sys::poll_readable(&fds, timeout)?;
        if ready[0] {
            sys::eventfd_drain(self.wake.as_fd());
        }
        if self.stream.is_none() && !self.reqs.is_empty() {
            self.submit()?;
        }
        Ok(WaitOutcome {
            doorbell: ready.get(1).copied().unwrap_or(false),
        })
    }
}

impl Drop for NbdEngine {
    /// Stops reading but leaves the connection open: a live-update successor may be
    /// using it (the last process to close it ends it).
    fn drop(&mut self) {
        self.stop_reading();
    }
}

fn owned(buf: Option<IoBuf>) -> Option<AlignedBuf> {
    match buf {
        Some(IoBuf::Owned(b)) => Some(b),
        _ => None,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The reader thread: reads replies until told to stop (returns `None`) or the connection
/// fails (returns why). Reads only when the socket is readable, so a stop is noticed
/// between replies, never in the middle of one.
fn read_replies(
    rd: &mut Stream,
    stop: &OwnedFd,
    tx: &Sender<Event>,
    wake: &OwnedFd,
    expected: &Mutex<HashMap<u64, u32>>,
    generation: u64,
) -> Option<String> {
    loop {
        let ready = match sys::poll_readable(
            &[rd.as_fd().as_raw_fd(), stop.as_raw_fd()],
            Duration::from_secs(1),
        ) {
            Ok(r) => r,
            Err(e) => return Some(format!("polling the connection: {e}")),
        };
        if ready[1] {
            return None;
        }
        if !ready[0] {
            continue;
        }
        let head = match proto::read_reply_header(rd) {
            Ok(h) => h,
            Err(NbdError::Io { source, .. }) if source.kind() == io::ErrorKind::UnexpectedEof => {
                return Some("the server closed the connection".into())
            }
            Err(e) => return Some(e.to_string()),
        };
        let Some(read_len) = lock(expected).remove(&head.cookie) else {
            return Some(format!(
                "NBD protocol error: reply for cookie {:#x}, which has no request outstanding",
                head.cookie
            ));
        };
        let mut data = Vec::new();
        if head.error == 0 && read_len > 0 {
            data = vec![0u8; read_len as usize];
            if let Err(e) = rd.read_exact(&mut data) {
                return Some(format!("reading the data of a read reply: {e}"));
            }
        }
        if tx
            .send(Event::Reply {
                generation,
                cookie: head.cookie,
                error: head.error,
                data,
            })
            .is_err()
        {
            return None;
        }
        let _ = sys::eventfd_signal(wake.as_fd());
    }
}
