//! FUSE over io_uring (`FUSE_OVER_IO_URING`, protocol 7.42, Linux 6.14 and later): the
//! kernel hands requests to *entries* (a header buffer and a payload buffer the server
//! registers) through `IORING_OP_URING_CMD` submissions on a `/dev/fuse` descriptor, and
//! takes each reply from the same buffers when the server commits it.
//!
//! # What the kernel requires
//!
//! - The module parameter `enable_uring` ([`kernel_support`], [`enable`]) is on **when the
//!   connection is mounted**: the kernel offers `FUSE_OVER_IO_URING` in INIT only then.
//! - INIT has been answered on `/dev/fuse` with `FUSE_OVER_IO_URING` (an `INIT_EXT` flag)
//!   before any entry is registered (a REGISTER before it completes with `-EAGAIN`). With
//!   the flag echoed, every new request then waits in the kernel until the ring is ready.
//! - One queue per *possible* CPU (`num_possible_cpus()`), each with at least one entry:
//!   only then is the ring ready. A request goes to the queue of the CPU its requester runs
//!   on, and waits there for one of that queue's entries; queues never lend entries.
//! - 128-byte submission entries (`IORING_SETUP_SQE128`): the command
//!   ([`abi::UringCmdReq`]) sits in the entry's 80 command bytes.
//! - The payload buffer holds at least `max(8192, max_write, max_pages × page size)`
//!   bytes; a smaller one fails REGISTER with `-EINVAL`, and the kernel then silently
//!   serves the connection on `/dev/fuse`.
//! - FORGET, BATCH_FORGET and INTERRUPT still arrive on `/dev/fuse`, and notifications
//!   are still written there ([`Notifier`](super::Notifier)): [`UringQueues::serve`] runs
//!   a `/dev/fuse` worker alongside the queues.
//!
//! # How a request lies in an entry, and how it becomes a `/dev/fuse` request
//!
//! `fuse_uring_copy_to_ring()` → `fuse_uring_args_to_ring()` (fs/fuse/dev_uring.c) fills
//! an entry from the request's input arguments `in_args[0..in_numargs]`:
//!
//! - `op_in[0..in_args[0].size]` ([`abi::UringReqHeader::op_in`]): the first argument,
//!   the per-opcode structure (`fuse_getattr_in`, `fuse_read_in`, `fuse_write_in`,
//!   `fuse_open_in`, ...), copied only if its size is not zero. Operations whose first
//!   argument on `/dev/fuse` is a name (LOOKUP, UNLINK, RMDIR, SYMLINK, REMOVEXATTR) carry
//!   a zero-sized placeholder first (`fuse_set_zero_arg0()`), so their names are not here;
//!   operations without arguments (STATFS, READLINK, DESTROY) copy nothing.
//! - The payload buffer: `in_args[1..]`, one after another exactly as `/dev/fuse` lays
//!   them out (names with their NUL, the data of a WRITE, the request extensions last);
//!   `ent_in_out.payload_sz` is their total.
//! - `in_out[0..40]`: the request's `fuse_in_header`, whose `len` is, as on `/dev/fuse`,
//!   40 + the size of *every* input argument (set by `fuse_send_one()` and
//!   `fuse_request_queue_background_uring()` before the request is queued).
//! - `ent_in_out.commit_id`: the header's `unique`.
//!
//! The first argument's size is written nowhere, but it is `len − 40 − payload_sz`.
//! Header, then `op_in[..that]`, then the payload's `payload_sz` bytes is byte for byte
//! what a read of `/dev/fuse` returns for the same request, so each request is rebuilt so
//! in a buffer of its queue (no allocation per request) and served by
//! [`Session::handle`]. A header whose `len` is below `40 + payload_sz` or leaves more
//! than 128 bytes for `op_in` is answered EIO.
//!
//! # How a reply goes back
//!
//! The entry's sink writes the `fuse_out_header` into `in_out[0..16]`, the reply's parts
//! one after another at the start of the payload buffer, and their total into
//! `ent_in_out.payload_sz` (the kernel checks it against the reply size it expects, as it
//! checks `len` on `/dev/fuse`). COMMIT_AND_FETCH with `commit_id` = the request's
//! `unique` hands the reply to the kernel and makes the entry available again: its
//! completion is the entry's next request. A reply larger than the payload buffer is
//! answered EIO; a request the session answers nothing to is answered EIO too, since an
//! entry is only ever re-armed by a commit.
//!
//! # Threads, stopping and resuming
//!
//! Each queue has its own io_uring and its own thread, pinned to the queue's CPU, for the
//! life of the [`UringQueues`]: the thread registers the entries and submits every
//! commit. It outlives each [`UringQueues::serve`] because the kernel cancels the
//! commands a thread submitted when that thread exits (an available entry cancelled so
//! is lost for good), and because it is in the submitting thread's context that the
//! kernel copies a request into an entry. Between two serves the thread waits for the
//! next; a request the kernel hands to an entry meanwhile is copied into it and its
//! completion waits in the ring, and once every entry of a queue holds one, further
//! requests wait in the kernel: all are served when serving resumes, none is lost.
//!
//! The buffers are never freed while the kernel may still write into them: a queue frees
//! them only once every one of its entries has completed with an error (the connection
//! ended); dropping [`UringQueues`] while the connection lives leaks them on purpose.

use std::alloc::{self, Layout};
use std::collections::VecDeque;
use std::fs::{self, File};
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, TryLockError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes};

use super::{dev, StopReason, Stopper};
use crate::abi::{self, init, uring as cmd, InHeader, OutHeader, UringCmdReq, UringReqHeader};
use crate::filesystem::Filesystem;
use crate::session::{Negotiated, ReplySink, Served, Session};

/// The module parameter that lets connections use io_uring (`bool`, mode 0644).
const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";
/// The CPUs that may ever exist: the kernel makes one queue for each.
const POSSIBLE_CPUS: &str = "/sys/devices/system/cpu/possible";

/// Whether this kernel can serve FUSE over io_uring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// It cannot, for the reason given.
    Unavailable(String),
    /// It can, but `enable_uring` is off: a connection mounted now will not offer it.
    Disabled,
    /// It can, and connections mounted now offer it.
    Enabled,
}

/// Whether this kernel can serve FUSE over io_uring (the `enable_uring` module parameter
/// exists), and whether it is on.
pub fn kernel_support() -> Support {
    match fs::read_to_string(ENABLE_URING) {
        Ok(v) => match v.trim() {
            "Y" | "y" | "1" => Support::Enabled,
            "N" | "n" | "0" => Support::Disabled,
            other => Support::Unavailable(format!("{ENABLE_URING} reads {other:?}")),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Support::Unavailable(if Path::new("/sys/module/fuse").exists() {
                format!(
                    "the fuse module has no {ENABLE_URING}: a kernel without \
                     CONFIG_FUSE_IO_URING (or older than 6.14)"
                )
            } else {
                "the fuse module is not loaded (no /sys/module/fuse)".to_string()
            })
        }
        Err(e) => Support::Unavailable(format!("reading {ENABLE_URING}: {e}")),
    }
}

/// Turns `enable_uring` on (root only). It counts for connections mounted afterwards.
pub fn enable() -> io::Result<()> {
    set_enabled(true)
}

/// Turns `enable_uring` on or off (root only). A connection that negotiated io_uring
/// keeps it when the parameter is turned off.
pub fn set_enabled(on: bool) -> io::Result<()> {
    if let Support::Unavailable(why) = kernel_support() {
        return Err(io::Error::new(io::ErrorKind::Unsupported, why));
    }
    fs::write(ENABLE_URING, if on { "Y" } else { "N" })
        .map_err(|e| io::Error::new(e.kind(), format!("writing {ENABLE_URING} (root only): {e}")))
}

/// The number of CPUs in a kernel CPU list such as `0-3,6,8-9`.
fn count_cpus(list: &str) -> io::Result<usize> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{POSSIBLE_CPUS}: not a CPU list: {list:?}"),
        )
    };
    let mut n = 0;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let a: usize = a.parse().map_err(|_| bad())?;
        let b: usize = b.parse().map_err(|_| bad())?;
        if b < a {
            return Err(bad());
        }
        n += b - a + 1;
    }
    if n == 0 {
        return Err(bad());
    }
    Ok(n)
}

/// How many queues the kernel makes for a connection: one per possible CPU.
pub fn queue_count() -> io::Result<usize> {
    count_cpus(&fs::read_to_string(POSSIBLE_CPUS)?)
}

fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// The payload buffer an entry needs: at least the kernel's `max_payload_sz`,
/// `max(FUSE_MIN_READ_BUFFER, max_write, max_pages * PAGE_SIZE)` with the values the
/// kernel took from INIT (`max_write` at least 4096; `max_pages` 32 without
/// `FUSE_MAX_PAGES`, and never more than the reply's). Rounded up to whole pages.
fn payload_size(n: &Negotiated, page: usize) -> usize {
    let pages = if n.has(init::MAX_PAGES) {
        n.max_pages.max(1) as usize
    } else {
        32
    };
    let size = abi::MIN_READ_BUFFER
        .max(n.max_write.max(4096) as usize)
        .max(pages * page);
    size.div_ceil(page) * page
}

/// The 128-byte submission entry of an `IORING_OP_URING_CMD` on a ring set up with
/// `IORING_SETUP_SQE128` (`struct io_uring_sqe`, include/uapi/linux/io_uring.h). Built
/// here because the io-uring crate's `UringCmd80` cannot set `len`, which REGISTER needs.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable)]
struct CmdSqe {
    opcode: u8,
    flags: u8,
    ioprio: u16,
    fd: i32,
    /// The union with `off`: the command's sub-operation, then 4 bytes of padding.
    cmd_op: u32,
    pad1: u32,
    addr: u64,
    len: u32,
    uring_cmd_flags: u32,
    user_data: u64,
    buf_index: u16,
    personality: u16,
    file_index: u32,
    /// `sqe->cmd`: 16 bytes in the first 64, and the 64 of the second half.
    cmd: [u8; 80],
}

const _: () = assert!(size_of::<CmdSqe>() == 128);
const _: () = assert!(size_of::<squeue::Entry128>() == 128);
const _: () = assert!(size_of::<UringCmdReq>() <= 80);

/// A REGISTER (with the entry's two iovecs) or COMMIT_AND_FETCH for `fuse`.
fn uring_cmd(
    fuse: RawFd,
    cmd_op: u32,
    req: &UringCmdReq,
    iov: Option<*const libc::iovec>,
    user_data: u64,
) -> squeue::Entry128 {
    let mut sqe = CmdSqe::new_zeroed();
    sqe.opcode = opcode::UringCmd80::CODE;
    sqe.fd = fuse;
    sqe.cmd_op = cmd_op;
    if let Some(iov) = iov {
        sqe.addr = iov as u64;
        sqe.len = cmd::IOV_SEGS;
    }
    sqe.user_data = user_data;
    sqe.cmd[..size_of::<UringCmdReq>()].copy_from_slice(req.as_bytes());
    // SAFETY: both types are 128 bytes (checked above); `Entry128` is `repr(C)` and made
    // only of integers (the kernel's `io_uring_sqe` and a byte array), so every byte
    // pattern is a valid value, and `CmdSqe` has no padding, so every byte is initialised.
    unsafe { std::mem::transmute::<CmdSqe, squeue::Entry128>(sqe) }
}

/// `user_data` of the poll on the stopper's eventfd: this bit and the serve's number.
const TAG_STOP_POLL: u64 = 1 << 63;
/// `user_data` of the cancellation of a poll no longer wanted.
const TAG_CANCEL: u64 = 1 << 62;
/// Room for an entry's header buffer: a page, so that its payload buffer is page-aligned.
const HEADER_ROOM: usize = 4096;
const _: () = assert!(size_of::<UringReqHeader>() <= HEADER_ROOM);
/// How long a queue retries REGISTER while the kernel has not yet processed INIT's reply.
const REGISTER_RETRY: Duration = Duration::from_secs(2);

/// Whether an entry's failure means the connection is gone.
fn is_disconnect(errno: i32) -> bool {
    matches!(errno, libc::ENOTCONN | libc::ENODEV | libc::ECONNABORTED)
}

/// The entries' buffers of one queue, in one allocation: per entry a header buffer
/// ([`HEADER_ROOM`] bytes, of which the kernel uses 288) and the payload buffer after it.
struct Buffers {
    base: *mut u8,
    layout: Layout,
    slot: usize,
}

impl Buffers {
    fn new(depth: usize, payload: usize) -> io::Result<Buffers> {
        let slot = HEADER_ROOM + payload;
        let layout = depth
            .checked_mul(slot)
            .and_then(|len| Layout::from_size_align(len, HEADER_ROOM).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "entries too large"))?;
        // SAFETY: the layout's size is not zero (depth ≥ 1 and slot > 0).
        let base = unsafe { alloc::alloc_zeroed(layout) };
        if base.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(Buffers { base, layout, slot })
    }

    fn header(&self, i: usize) -> *mut u8 {
        self.base.wrapping_add(i * self.slot)
    }

    fn payload(&self, i: usize) -> *mut u8 {
        self.base.wrapping_add(i * self.slot + HEADER_ROOM)
    }
}

/// Replies into an entry's buffers (see the module's documentation).
struct EntryReply {
    header: *mut u8,
    payload: *mut u8,
    capacity: usize,
    sent: bool,
}

impl ReplySink for EntryReply {
    fn send(&mut self, unique: u64, error: i32, payload: &[&[u8]]) -> io::Result<()> {
        let mut total: usize = payload.iter().map(|p| p.len()).sum();
        let mut error = error;
        if error != 0 || total > self.capacity {
            if error == 0 {
                error = -libc::EIO;
            }
            total = 0;
        }
        if total > 0 {
            // SAFETY: the entry holds a request (its command completed), so until this
            // thread commits it the kernel neither reads nor writes its buffers, and
            // nothing else refers to them; the payload buffer has `capacity` bytes.
            let out = unsafe { std::slice::from_raw_parts_mut(self.payload, self.capacity) };
            let mut at = 0;
            for p in payload {
                out[at..at + p.len()].copy_from_slice(p);
                at += p.len();
            }
        }
        let h = OutHeader {
            len: (size_of::<OutHeader>() + total) as u32,
            error,
            unique,
        };
        // SAFETY: as above; the header buffer has `size_of::<UringReqHeader>()` bytes.
        let hb =
            unsafe { std::slice::from_raw_parts_mut(self.header, size_of::<UringReqHeader>()) };
        hb[..size_of::<OutHeader>()].copy_from_slice(h.as_bytes());
        let at = offset_of!(UringReqHeader, ring_ent_in_out)
            + offset_of!(abi::UringEntInOut, payload_sz);
        hb[at..at + 4].copy_from_slice(&(total as u32).to_ne_bytes());
        self.sent = true;
        Ok(())
    }
}

/// What serves one rebuilt request: the session, behind a type the queue threads share
/// whatever the filesystem.
type Dispatch = dyn Fn(&[u8], &mut dyn ReplySink, &mut Vec<u8>) -> io::Result<Served> + Send + Sync;

/// One queue: its io_uring, its entries and the buffers to serve them, owned by its thread.
struct Queue {
    qid: u16,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    fuse: File,
    buffers: Buffers,
    /// Each entry's two iovecs, named by its REGISTER; never moved.
    iovecs: Box<[[libc::iovec; 2]]>,
    /// Whether the entry still belongs to the kernel's queue (no failed completion).
    live: Vec<bool>,
    /// Entries holding a request whose completion was taken from the ring but not served.
    pending: VecDeque<usize>,
    payload: usize,
    /// The request rebuilt contiguously, and the session's scratch buffer.
    request: Vec<u8>,
    scratch: Vec<u8>,
    serves: u64,
    disconnected: bool,
    failure: Option<i32>,
    served: Arc<AtomicU64>,
}

impl Queue {
    fn new(
        qid: u16,
        fuse: File,
        depth: usize,
        payload: usize,
        served: Arc<AtomicU64>,
    ) -> io::Result<Queue> {
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build((depth + 8).next_power_of_two() as u32)?;
        let buffers = Buffers::new(depth, payload)?;
        let iovecs = (0..depth)
            .map(|i| {
                [
                    libc::iovec {
                        iov_base: buffers.header(i).cast(),
                        iov_len: size_of::<UringReqHeader>(),
                    },
                    libc::iovec {
                        iov_base: buffers.payload(i).cast(),
                        iov_len: payload,
                    },
                ]
            })
            .collect();
        Ok(Queue {
            qid,
            ring,
            fuse,
            buffers,
            iovecs,
            live: vec![true; depth],
            pending: VecDeque::new(),
            payload,
            request: Vec::with_capacity(size_of::<InHeader>() + cmd::OP_IN_OUT_SZ + payload),
            scratch: Vec::with_capacity(64 << 10),
            serves: 0,
            disconnected: false,
            failure: None,
            served,
        })
    }

    fn push(&mut self, sqe: &squeue::Entry128) -> io::Result<()> {
        for _ in 0..64 {
            // SAFETY: what a submission points to outlives its use by the kernel: a
            // REGISTER's iovecs live as long as the queue and are never moved, and the
            // buffers they name are freed only after the kernel released every entry; a
            // COMMIT_AND_FETCH, poll or cancel points to no memory (the poll's eventfd
            // is held by the kernel for as long as the poll is pending).
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
        Err(io::Error::other("the submission queue stays full"))
    }

    /// Hands every submission queued to the kernel.
    fn flush(&mut self) -> io::Result<()> {
        for _ in 0..64 {
            if self.ring.submission().is_empty() {
                return Ok(());
            }
            self.ring.submit()?;
        }
        Err(io::Error::other("the kernel takes no submissions"))
    }

    /// Submits what is queued and waits up to `timeout` for a completion.
    fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn next_completion(&mut self) -> Option<(u64, i32)> {
        self.ring
            .completion()
            .next()
            .map(|c| (c.user_data(), c.result()))
    }

    fn register_sqe(&self, i: usize) -> squeue::Entry128 {
        let req = UringCmdReq {
            qid: self.qid,
            ..Default::default()
        };
        let iov = self.iovecs[i].as_ptr();
        uring_cmd(
            self.fuse.as_raw_fd(),
            cmd::CMD_REGISTER,
            &req,
            Some(iov),
            i as u64,
        )
    }

    /// Registers every entry. A REGISTER that fails completes at once; one that succeeds
    /// completes only with a request (kept in `pending`).
    fn register(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + REGISTER_RETRY;
        let mut todo: Vec<usize> = (0..self.live.len()).collect();
        loop {
            for i in todo.drain(..) {
                let sqe = self.register_sqe(i);
                self.push(&sqe)?;
            }
            self.flush()?;
            self.wait(Duration::from_millis(20))?;
            while let Some((ud, res)) = self.next_completion() {
                let i = ud as usize;
                if i >= self.live.len() {
                    continue;
                }
                if res >= 0 {
                    self.pending.push_back(i);
                } else if -res == libc::EAGAIN {
                    // The kernel has not processed INIT's reply yet.
                    todo.push(i);
                } else {
                    self.live[i] = false;
                    return Err(io::Error::new(
                        io::Error::from_raw_os_error(-res).kind(),
                        format!(
                            "REGISTER of entry {i} of queue {}: {}",
                            self.qid,
                            io::Error::from_raw_os_error(-res)
                        ),
                    ));
                }
            }
            if todo.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "REGISTER keeps failing with EAGAIN: the kernel has not seen INIT answered",
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn commit(&mut self, i: usize, commit_id: u64) -> io::Result<()> {
        let req = UringCmdReq {
            commit_id,
            qid: self.qid,
            ..Default::default()
        };
        let sqe = uring_cmd(
            self.fuse.as_raw_fd(),
            cmd::CMD_COMMIT_AND_FETCH,
            &req,
            None,
            i as u64,
        );
        self.push(&sqe)
    }

    /// Serves the request entry `i` holds and queues its commit.
    fn serve_entry(&mut self, i: usize, dispatch: &Dispatch) -> io::Result<Served> {
        let header_ptr = self.buffers.header(i);
        let payload_ptr = self.buffers.payload(i);
        // SAFETY: entry `i`'s command completed with a request, so until this thread
        // commits it the kernel neither reads nor writes the entry's buffers, and
        // nothing else refers to them; the header buffer has that many bytes.
        let raw = unsafe { std::slice::from_raw_parts(header_ptr, size_of::<UringReqHeader>()) };
        let header = UringReqHeader::read_from_bytes(raw).unwrap_or_else(|_| {
            // The slice has the structure's size.
            UringReqHeader::new_zeroed()
        });
        let ent = header.ring_ent_in_out;
        let h = InHeader::read_from_prefix(&header.in_out[..])
            .map(|(h, _)| h)
            .unwrap_or_default();
        let payload_len = ent.payload_sz as usize;
        let first = (h.len as usize)
            .checked_sub(size_of::<InHeader>() + payload_len)
            .filter(|&n| n <= cmd::OP_IN_OUT_SZ && payload_len <= self.payload);
        let mut reply = EntryReply {
            header: header_ptr,
            payload: payload_ptr,
            capacity: self.payload,
            sent: false,
        };
        let served = match first {
            Some(first) => {
                self.request.clear();
                self.request
                    .extend_from_slice(&header.in_out[..size_of::<InHeader>()]);
                self.request.extend_from_slice(&header.op_in[..first]);
                // SAFETY: as above; `payload_len` is within the payload buffer.
                let payload = unsafe { std::slice::from_raw_parts(payload_ptr, payload_len) };
                self.request.extend_from_slice(payload);
                dispatch(&self.request, &mut reply, &mut self.scratch)
            }
            None => Ok(Served::Replied),
        };
        if !reply.sent {
            // Only a commit re-arms the entry: answer what got no answer.
            reply.send(ent.commit_id, -libc::EIO, &[])?;
        }
        self.commit(i, ent.commit_id)?;
        self.served.fetch_add(1, Ordering::Relaxed);
        Ok(served.unwrap_or(Served::Replied))
    }

    fn entry_failed(&mut self, i: usize, errno: i32) {
        self.live[i] = false;
        if is_disconnect(errno) {
            self.disconnected = true;
        } else {
            self.failure = Some(errno);
        }
    }

    /// Why serving cannot go on with no entry left.
    fn all_gone(&self) -> io::Result<StopReason> {
        match self.failure {
            Some(e) if !self.disconnected => Err(io::Error::new(
                io::Error::from_raw_os_error(e).kind(),
                format!(
                    "every entry of queue {} failed, the last with {}",
                    self.qid,
                    io::Error::from_raw_os_error(e)
                ),
            )),
            _ => Ok(StopReason::Disconnected),
        }
    }

    fn serve(&mut self, dispatch: &Dispatch, stopper: &Stopper) -> io::Result<StopReason> {
        self.serves += 1;
        let poll_tag = TAG_STOP_POLL | self.serves;
        let poll = opcode::PollAdd::new(types::Fd(stopper.wake_fd()), libc::POLLIN as u32)
            .build()
            .user_data(poll_tag);
        self.push(&poll.into())?;
        let mut poll_pending = true;
        let outcome = self.serve_until(dispatch, stopper, poll_tag, &mut poll_pending);
        if poll_pending {
            let cancel = opcode::AsyncCancel::new(poll_tag)
                .build()
                .user_data(TAG_CANCEL);
            self.push(&cancel.into())?;
        }
        // Every commit queued reaches the kernel before serving returns.
        self.flush()?;
        outcome
    }

    fn serve_until(
        &mut self,
        dispatch: &Dispatch,
        stopper: &Stopper,
        poll_tag: u64,
        poll_pending: &mut bool,
    ) -> io::Result<StopReason> {
        loop {
            // Checked before each completion is taken: those not taken wait in the ring
            // for the next serve, with their requests in their entries.
            if stopper.is_stopping() {
                return Ok(StopReason::Woken);
            }
            let next = match self.pending.pop_front() {
                Some(i) => Some((i as u64, 0)),
                None => self.next_completion(),
            };
            let Some((ud, res)) = next else {
                if !self.live.iter().any(|&l| l) {
                    return self.all_gone();
                }
                // Submits the commits queued and waits; the poll on the stopper's
                // eventfd ends the wait, the timeout only bounds it.
                self.wait(Duration::from_secs(1))?;
                continue;
            };
            if ud == poll_tag {
                *poll_pending = false;
                continue;
            }
            if ud & (TAG_STOP_POLL | TAG_CANCEL) != 0 {
                // An earlier serve's poll, or its cancellation.
                continue;
            }
            let i = ud as usize;
            if i >= self.live.len() {
                continue;
            }
            if res < 0 {
                self.entry_failed(i, -res);
                continue;
            }
            if self.serve_entry(i, dispatch)? == Served::Destroyed {
                return Ok(StopReason::Disconnected);
            }
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        if self.live.iter().all(|&l| !l) {
            // SAFETY: every entry completed with an error, so the kernel released them
            // all and holds no address in these buffers; they were allocated with this
            // layout and are freed once.
            unsafe { alloc::dealloc(self.buffers.base, self.buffers.layout) };
        }
        // Otherwise the kernel may still copy a request into them: they are leaked.
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `cpu_set_t` is a plain bit mask, for which all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE, so the bit is inside the mask.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid mask of the size passed; pid 0 is the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

enum Command {
    Serve {
        dispatch: Arc<Dispatch>,
        stopper: Arc<Stopper>,
        done: mpsc::Sender<io::Result<StopReason>>,
    },
}

/// A queue's thread: registers its entries, reports, then serves each time it is asked,
/// until the [`UringQueues`] is dropped.
fn queue_thread(
    qid: usize,
    fuse: File,
    depth: usize,
    payload: usize,
    served: Arc<AtomicU64>,
    ready: mpsc::Sender<io::Result<()>>,
    commands: mpsc::Receiver<Command>,
) {
    // A CPU that is possible but offline cannot be pinned to; its queue still needs
    // entries for the ring to be ready, and serves unpinned.
    let _ = pin_to_cpu(qid);
    let queue = Queue::new(qid as u16, fuse, depth, payload, served).and_then(|mut q| {
        q.register()?;
        Ok(q)
    });
    let mut queue = match queue {
        Ok(q) => {
            let _ = ready.send(Ok(()));
            q
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    drop(ready);
    for command in commands.iter() {
        match command {
            Command::Serve {
                dispatch,
                stopper,
                done,
            } => {
                let r = queue.serve(&*dispatch, &stopper);
                if !matches!(r, Ok(StopReason::Woken)) {
                    // The others stop too: the connection is gone, or this queue is.
                    let _ = stopper.stop();
                }
                let _ = done.send(r);
            }
        }
    }
}

struct QueueHandle {
    commands: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
}

/// The queues of one connection: one io_uring per possible CPU, `depth` entries each,
/// registered once after INIT was answered and kept for the life of the process, so that
/// serving can stop and resume (a live update's drain, a rolled-back update) without
/// losing a request: a request the kernel hands to an entry while serving is stopped
/// waits there until serving resumes.
pub struct UringQueues {
    queues: Vec<QueueHandle>,
    depth: usize,
    payload: usize,
    served: Arc<AtomicU64>,
    serving: Mutex<()>,
}

impl UringQueues {
    /// Registers `depth` entries on each queue of the connection `fuse` (one thread per
    /// queue, pinned to its CPU). `session` must have answered INIT with
    /// `FUSE_OVER_IO_URING` ([`answer_init`]). On an error the connection may have
    /// fallen back to `/dev/fuse` (a failed REGISTER turns io_uring off for it): serve it
    /// with [`dev::serve`].
    pub fn register<F: Filesystem + 'static>(
        session: &Arc<Session<F>>,
        fuse: &File,
        depth: usize,
    ) -> io::Result<UringQueues> {
        let negotiated = session.negotiated().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "INIT has not been answered: queues are registered after it",
            )
        })?;
        if !negotiated.has(init::OVER_IO_URING) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the connection did not negotiate FUSE_OVER_IO_URING (enable_uring was off \
                 when it was mounted, or the session's policy does not ask for it)",
            ));
        }
        if depth == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a queue needs at least one entry",
            ));
        }
        let payload = payload_size(&negotiated, page_size());
        let served = Arc::new(AtomicU64::new(0));
        let mut queues = UringQueues {
            queues: Vec::new(),
            depth,
            payload,
            served: served.clone(),
            serving: Mutex::new(()),
        };
        let mut readies = Vec::new();
        for qid in 0..queue_count()? {
            let (tx, rx) = mpsc::channel();
            let (ready_tx, ready_rx) = mpsc::channel();
            let fuse = fuse.try_clone()?;
            let served = served.clone();
            let thread = thread::Builder::new()
                .name(format!("fuse-uring-{qid}"))
                .spawn(move || queue_thread(qid, fuse, depth, payload, served, ready_tx, rx))?;
            queues.queues.push(QueueHandle {
                commands: Some(tx),
                thread: Some(thread),
            });
            readies.push(ready_rx);
        }
        for (qid, ready) in readies.iter().enumerate() {
            match ready.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(io::Error::new(e.kind(), format!("queue {qid}: {e}"))),
                Err(_) => return Err(io::Error::other(format!("queue {qid}'s thread ended"))),
            }
        }
        Ok(queues)
    }

    /// The number of queues (the possible CPUs).
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Entries per queue.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The size of each entry's payload buffer.
    pub fn payload_size(&self) -> usize {
        self.payload
    }

    /// How many requests the queues have answered so far.
    pub fn requests_served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Serves until `stopper` asks (returns [`StopReason::Woken`], having answered every
    /// request it took) or the connection ends ([`StopReason::Disconnected`]). Each queue
    /// is served by its own thread; a `/dev/fuse` worker ([`dev::serve`]) serves what the
    /// kernel still sends there (FORGET, INTERRUPT). When one of them stops on its own
    /// (the connection ended, or an error), the others are stopped too.
    pub fn serve<F: Filesystem + 'static>(
        &self,
        session: &Arc<Session<F>>,
        fuse: &File,
        stopper: &Arc<Stopper>,
    ) -> io::Result<StopReason> {
        let _serving = match self.serving.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                return Err(io::Error::other("these queues are already being served"))
            }
        };
        // The queues and the /dev/fuse worker stop on this one: the caller's stop is
        // forwarded to it, and so is any part's end.
        let inner = Stopper::new()?;
        let handler = session.clone();
        let dispatch: Arc<Dispatch> = Arc::new(
            move |buf: &[u8], sink: &mut dyn ReplySink, scratch: &mut Vec<u8>| {
                handler.handle(buf, sink, scratch)
            },
        );
        thread::scope(|s| {
            let dev_worker = s.spawn(|| {
                let r = dev::serve(session, fuse, 1, &inner);
                if !matches!(r, Ok(StopReason::Woken)) {
                    let _ = inner.stop();
                }
                r
            });
            let (done_tx, done_rx) = mpsc::channel();
            let mut asked = 0;
            for q in &self.queues {
                let sent = q.commands.as_ref().is_some_and(|tx| {
                    tx.send(Command::Serve {
                        dispatch: dispatch.clone(),
                        stopper: inner.clone(),
                        done: done_tx.clone(),
                    })
                    .is_ok()
                });
                if sent {
                    asked += 1;
                }
            }
            drop(done_tx);
            let mut result: io::Result<StopReason> = Ok(StopReason::Woken);
            if asked < self.queues.len() {
                result = Err(io::Error::other("a queue's thread is gone"));
            } else {
                let fds = [stopper.wake_fd(), inner.wake_fd()];
                while !stopper.is_stopping() && !inner.is_stopping() {
                    match molt_sys::poll_readable(&fds, Duration::from_secs(1)) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
            }
            let _ = inner.stop();
            let mut parts = Vec::new();
            for _ in 0..asked {
                parts.push(
                    done_rx
                        .recv()
                        .unwrap_or_else(|_| Err(io::Error::other("a queue's thread panicked"))),
                );
            }
            parts.push(
                dev_worker
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("the /dev/fuse worker panicked"))),
            );
            for part in parts {
                match part {
                    Ok(StopReason::Woken) => {}
                    Ok(StopReason::Disconnected) => {
                        if result.is_ok() {
                            result = Ok(StopReason::Disconnected);
                        }
                    }
                    Err(e) => {
                        if result.is_ok() {
                            result = Err(e);
                        }
                    }
                }
            }
            result
        })
    }
}

impl Drop for UringQueues {
    fn drop(&mut self) {
        for q in &mut self.queues {
            q.commands.take();
        }
        for q in &mut self.queues {
            if let Some(t) = q.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Answers the connection's INIT on `/dev/fuse` (the first request of a new connection)
/// and returns the parameters negotiated; the kernel has processed the reply when this
/// returns, so queues can be registered. A session that has answered INIT already
/// returns at once.
pub fn answer_init<F: Filesystem + 'static>(
    session: &Arc<Session<F>>,
    fuse: &File,
    timeout: Duration,
) -> io::Result<Negotiated> {
    if let Some(n) = session.negotiated() {
        return Ok(n);
    }
    let stopper = Stopper::new()?;
    let deadline = Instant::now() + timeout;
    thread::scope(|s| {
        let worker = s.spawn(|| dev::serve(session, fuse, 1, &stopper));
        // The session knows the parameters just before it writes the reply; the worker
        // returns only after the write, between requests.
        while session.negotiated().is_none() && !worker.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        let stopped = stopper.stop();
        let served = worker
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the /dev/fuse worker panicked")));
        stopped?;
        match (session.negotiated(), served) {
            (Some(n), _) => Ok(n),
            (None, Err(e)) => Err(e),
            (None, Ok(StopReason::Disconnected)) => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection ended before INIT",
            )),
            (None, Ok(StopReason::Woken)) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no INIT within the time allowed",
            )),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(count_cpus("0").unwrap(), 1);
        assert_eq!(count_cpus("0-1\n").unwrap(), 2);
        assert_eq!(count_cpus("0-3,6,8-9").unwrap(), 7);
        assert!(count_cpus("").is_err());
        assert!(count_cpus("3-1").is_err());
        assert!(count_cpus("x").is_err());
    }

    #[test]
    fn payload_covers_the_kernels_max_payload() {
        let mut n = Negotiated {
            minor: 44,
            flags: init::MAX_PAGES,
            max_write: 1 << 20,
            max_readahead: 0,
            max_pages: 256,
            max_background: 16,
            congestion_threshold: 12,
            time_gran: 1,
        };
        assert_eq!(payload_size(&n, 4096), 1 << 20);
        n.max_write = 4096;
        n.max_pages = 1;
        assert_eq!(payload_size(&n, 4096), 8192);
        // Without FUSE_MAX_PAGES the kernel keeps its default of 32 pages.
        n.flags = 0;
        assert_eq!(payload_size(&n, 4096), 32 * 4096);
    }

    #[test]
    fn the_command_sits_where_the_kernel_reads_it() {
        let req = UringCmdReq {
            flags: 0,
            commit_id: 0x1122_3344_5566_7788,
            qid: 3,
            padding: [0; 6],
        };
        let iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 2];
        let sqe = uring_cmd(7, cmd::CMD_REGISTER, &req, Some(iov.as_ptr()), 42);
        // SAFETY: the same sizes, and `CmdSqe` (integers only) is valid for any bytes.
        let bytes = unsafe { std::mem::transmute::<squeue::Entry128, CmdSqe>(sqe) };
        let b = bytes.as_bytes();
        assert_eq!(b[0], 46, "IORING_OP_URING_CMD");
        assert_eq!(&b[4..8], &7i32.to_ne_bytes(), "fd");
        assert_eq!(&b[8..12], &cmd::CMD_REGISTER.to_ne_bytes(), "cmd_op");
        assert_eq!(&b[16..24], &(iov.as_ptr() as u64).to_ne_bytes(), "addr");
        assert_eq!(&b[24..28], &2u32.to_ne_bytes(), "len");
        assert_eq!(&b[32..40], &42u64.to_ne_bytes(), "user_data");
        assert_eq!(
            &b[48 + 8..48 + 16],
            &req.commit_id.to_ne_bytes(),
            "commit_id"
        );
        assert_eq!(&b[48 + 16..48 + 18], &3u16.to_ne_bytes(), "qid");
    }
}
