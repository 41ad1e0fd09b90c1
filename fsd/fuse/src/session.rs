//! A FUSE session: the negotiated connection parameters and the dispatch of each request
//! to the filesystem, with exactly one reply for every request that takes one.
//!
//! A session is either fresh (it answers the kernel's INIT with what [`InitPolicy`] asks
//! for and the kernel offers) or adopted (a live successor, or a server recovering from
//! its predecessor's death, takes over a connection whose INIT was answered long ago; it
//! is given the [`Negotiated`] parameters from the handover state and never sees INIT).

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zerocopy::IntoBytes;

use crate::abi::{self, init, opcode};
use crate::filesystem::{Context, DirBuf, Entry, Errno, Filesystem};
use crate::request::{decode, DecodeError, Operation};

/// What a session asks of the kernel at INIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitPolicy {
    /// INIT flags wanted; the connection gets those the kernel offers too.
    pub wanted: u64,
    /// Largest WRITE (and READ) in bytes; `max_pages` pages of 4 KiB.
    pub max_write: u32,
    pub max_pages: u16,
    /// Background requests (readahead, write-back, asynchronous direct I/O) the kernel
    /// keeps in flight, and where it starts to throttle their producers.
    pub max_background: u16,
    pub congestion_threshold: u16,
}

/// Pages of the largest request: the kernel's default limit (`max_pages_limit`).
pub const MAX_PAGES: u16 = 256;

impl InitPolicy {
    /// What a fast local filesystem negotiates; docs/design.md says why each flag is used
    /// or not. The filesystem adds its own semantics (ACLs, umask handling, export).
    pub const LOCAL_FILESYSTEM: u64 = init::ASYNC_READ
        | init::BIG_WRITES
        | init::MAX_PAGES
        | init::WRITEBACK_CACHE
        | init::ASYNC_DIO
        | init::PARALLEL_DIROPS
        | init::HANDLE_KILLPRIV_V2
        | init::CACHE_SYMLINKS
        | init::DO_READDIRPLUS
        | init::READDIRPLUS_AUTO
        | init::SETXATTR_EXT
        | init::HAS_RESEND
        | init::ABORT_ERROR
        | init::DIRECT_IO_ALLOW_MMAP
        | init::HAS_EXPIRE_ONLY
        | init::INIT_EXT;

    pub fn new(wanted: u64) -> InitPolicy {
        InitPolicy {
            wanted,
            max_write: MAX_PAGES as u32 * 4096,
            max_pages: MAX_PAGES,
            max_background: 256,
            congestion_threshold: 192,
        }
    }
}

/// The parameters of a connection, fixed by its INIT; part of a server's handover state,
/// since a successor must serve the connection exactly as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Negotiated {
    pub minor: u32,
    pub flags: u64,
    pub max_write: u32,
    pub max_readahead: u32,
    pub max_pages: u16,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub time_gran: u32,
}

impl Negotiated {
    /// The parameters for the kernel's offer `kernel` under `policy`.
    pub fn from_init(
        kernel: &abi::InitIn,
        policy: &InitPolicy,
    ) -> std::result::Result<Negotiated, Errno> {
        if kernel.major != abi::KERNEL_VERSION || kernel.minor < abi::OLDEST_MINOR {
            return Err(Errno(libc::EPROTO));
        }
        let mut offered = kernel.flags as u64;
        // flags2 counts only when both sides use INIT_EXT: the kernel reads the reply's
        // flags2 only if its flags carry INIT_EXT.
        if offered & policy.wanted & init::INIT_EXT != 0 {
            offered |= (kernel.flags2 as u64) << 32;
        }
        Ok(Negotiated {
            minor: kernel.minor.min(abi::KERNEL_MINOR_VERSION),
            flags: offered & policy.wanted,
            max_write: policy.max_write,
            max_readahead: kernel.max_readahead,
            max_pages: policy.max_pages,
            max_background: policy.max_background,
            congestion_threshold: policy.congestion_threshold,
            time_gran: 1,
        })
    }

    pub fn has(&self, flag: u64) -> bool {
        self.flags & flag == flag
    }

    /// The INIT reply that establishes these parameters.
    pub fn init_out(&self) -> abi::InitOut {
        abi::InitOut {
            major: abi::KERNEL_VERSION,
            minor: self.minor,
            max_readahead: self.max_readahead,
            flags: self.flags as u32,
            max_background: self.max_background,
            congestion_threshold: self.congestion_threshold,
            max_write: self.max_write,
            time_gran: self.time_gran,
            max_pages: self.max_pages,
            flags2: (self.flags >> 32) as u32,
            ..Default::default()
        }
    }

    /// The size of a buffer that holds any request of this connection.
    pub fn request_buffer_size(&self) -> usize {
        (self.max_write as usize + 4096).max(abi::MIN_READ_BUFFER)
    }
}

/// Where a session's replies go: the transport puts the header and the payload where its
/// kernel interface wants them.
pub trait ReplySink {
    /// Sends the reply to `unique`: `error` is 0 or a negated errno; `payload` is the
    /// reply's content in parts, sent as one message.
    fn send(&mut self, unique: u64, error: i32, payload: &[&[u8]]) -> io::Result<()>;
}

/// What serving one request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Replied,
    /// A request that takes no reply (FORGET, BATCH_FORGET, NOTIFY_REPLY).
    NoReply,
    /// DESTROY: the kernel is ending the connection.
    Destroyed,
}

/// The reply content an operation produced.
enum Outcome {
    /// The session's scratch buffer holds it.
    Scratch,
    Owned(Vec<u8>),
    Empty,
    NoReply,
    Destroyed,
}

/// The kernel's entry reply for `e`.
pub(crate) fn entry_out(e: &Entry) -> abi::EntryOut {
    abi::EntryOut {
        nodeid: e.nodeid,
        generation: e.generation,
        entry_valid: e.entry_ttl.as_secs(),
        attr_valid: e.attr_ttl.as_secs(),
        entry_valid_nsec: e.entry_ttl.subsec_nanos(),
        attr_valid_nsec: e.attr_ttl.subsec_nanos(),
        attr: e.attr,
    }
}

fn attr_out(attr: abi::Attr, ttl: Duration) -> abi::AttrOut {
    abi::AttrOut {
        attr_valid: ttl.as_secs(),
        attr_valid_nsec: ttl.subsec_nanos(),
        dummy: 0,
        attr,
    }
}

fn put<T: IntoBytes + zerocopy::Immutable>(scratch: &mut Vec<u8>, v: &T) -> Outcome {
    scratch.clear();
    scratch.extend_from_slice(v.as_bytes());
    Outcome::Scratch
}

/// The reply of GETXATTR/LISTXATTR: the length for a probe (`size` 0), ERANGE when the
/// value does not fit, else the value.
fn sized(scratch: &mut Vec<u8>, value: Vec<u8>, size: u32) -> Result<Outcome, Errno> {
    if size == 0 {
        let out = abi::GetxattrOut {
            size: value.len() as u32,
            padding: 0,
        };
        Ok(put(scratch, &out))
    } else if value.len() > size as usize {
        Err(Errno::ERANGE)
    } else {
        Ok(Outcome::Owned(value))
    }
}

/// The errno a reply carries: a valid errno, or EIO for anything else.
fn wire_error(e: Errno) -> i32 {
    if e.0 > 0 && e.0 < 4096 {
        -e.0
    } else {
        -libc::EIO
    }
}

/// A FUSE session over filesystem `F`.
pub struct Session<F> {
    fs: Arc<F>,
    policy: InitPolicy,
    negotiated: OnceLock<Negotiated>,
}

impl<F: Filesystem> Session<F> {
    /// A session for a new connection: it answers INIT.
    pub fn new(fs: Arc<F>, policy: InitPolicy) -> Session<F> {
        Session {
            fs,
            policy,
            negotiated: OnceLock::new(),
        }
    }

    /// A session that takes over a connection negotiated as `negotiated`.
    pub fn adopted(fs: Arc<F>, policy: InitPolicy, negotiated: Negotiated) -> Session<F> {
        let s = Session::new(fs, policy);
        s.fs.init(&negotiated);
        let _ = s.negotiated.set(negotiated);
        s
    }

    pub fn fs(&self) -> &Arc<F> {
        &self.fs
    }

    pub fn policy(&self) -> &InitPolicy {
        &self.policy
    }

    /// The connection's parameters, once INIT has been answered (or on adoption).
    pub fn negotiated(&self) -> Option<Negotiated> {
        self.negotiated.get().copied()
    }

    /// The size of a buffer any request fits in (before INIT: the largest the policy
    /// allows).
    pub fn request_buffer_size(&self) -> usize {
        match self.negotiated.get() {
            Some(n) => n.request_buffer_size(),
            None => (self.policy.max_write as usize + 4096).max(abi::MIN_READ_BUFFER),
        }
    }

    /// Serves one request read from the kernel and sends its reply (if it takes one).
    /// `scratch` is the caller's reusable buffer. Errors are the sink's (the connection
    /// is gone) or an undecodable request without a header (the connection cannot go on).
    pub fn handle(
        &self,
        buf: &[u8],
        sink: &mut dyn ReplySink,
        scratch: &mut Vec<u8>,
    ) -> io::Result<Served> {
        let ext = self
            .negotiated
            .get()
            .is_some_and(|n| n.has(init::SETXATTR_EXT));
        let req = match decode(buf, ext) {
            Ok(r) => r,
            Err(DecodeError::NoHeader(n)) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a {n}-byte request without a header"),
                ))
            }
            Err(DecodeError::Malformed {
                unique,
                opcode,
                errno,
                ..
            }) => {
                if !opcode::has_reply(opcode) {
                    return Ok(Served::NoReply);
                }
                sink.send(unique, -errno, &[])?;
                return Ok(Served::Replied);
            }
        };
        let h = req.header;
        let ctx = Context {
            unique: h.unique,
            uid: h.uid,
            gid: h.gid,
            pid: h.pid,
        };
        let is_init = matches!(req.op, Operation::Init(_));
        if self.negotiated.get().is_none() != is_init {
            // Before INIT nothing else is served; a second INIT is a protocol error.
            if opcode::has_reply(h.opcode) {
                sink.send(h.unique, -libc::EIO, &[])?;
                return Ok(Served::Replied);
            }
            return Ok(Served::NoReply);
        }
        // A panic anywhere in the filesystem's code becomes an EIO reply: the request is
        // answered, `end` still runs, and the worker goes on.
        let begun = catch_unwind(AssertUnwindSafe(|| self.fs.begin(&ctx))).is_ok();
        let outcome = match begun {
            true => catch_unwind(AssertUnwindSafe(|| {
                self.serve(&ctx, h.nodeid, req.op, scratch)
            }))
            .unwrap_or(Err(Errno::EIO)),
            false => Err(Errno::EIO),
        };
        let _ = catch_unwind(AssertUnwindSafe(|| self.fs.end(&ctx)));
        match outcome {
            Ok(Outcome::NoReply) => Ok(Served::NoReply),
            Ok(Outcome::Destroyed) => {
                sink.send(h.unique, 0, &[])?;
                Ok(Served::Destroyed)
            }
            Ok(Outcome::Empty) => sink.send(h.unique, 0, &[]).map(|_| Served::Replied),
            Ok(Outcome::Scratch) => sink.send(h.unique, 0, &[scratch]).map(|_| Served::Replied),
            Ok(Outcome::Owned(v)) => sink.send(h.unique, 0, &[&v]).map(|_| Served::Replied),
            Err(e) => sink
                .send(h.unique, wire_error(e), &[])
                .map(|_| Served::Replied),
        }
    }

    fn serve(
        &self,
        ctx: &Context,
        node: u64,
        op: Operation<'_>,
        scratch: &mut Vec<u8>,
    ) -> Result<Outcome, Errno> {
        use Operation as O;
        let fs = &self.fs;
        let entry = |scratch: &mut Vec<u8>, e: Entry| put(scratch, &entry_out(&e));
        Ok(match op {
            // A kernel of a newer major version gets ours and sends INIT again in it.
            O::Init(kernel) if kernel.major > abi::KERNEL_VERSION => put(
                scratch,
                &abi::InitOut {
                    major: abi::KERNEL_VERSION,
                    minor: abi::KERNEL_MINOR_VERSION,
                    ..Default::default()
                },
            ),
            O::Init(kernel) => {
                let n = Negotiated::from_init(&kernel, &self.policy)?;
                let _ = self.negotiated.set(n);
                fs.init(&n);
                put(scratch, &n.init_out())
            }
            O::Destroy => {
                fs.destroy();
                Outcome::Destroyed
            }
            O::Lookup { name } => entry(scratch, fs.lookup(ctx, node, name)?),
            O::Forget { nlookup } => {
                fs.forget(node, nlookup);
                Outcome::NoReply
            }
            O::BatchForget { nodes } => {
                fs.batch_forget(&nodes);
                Outcome::NoReply
            }
            O::Getattr { fh } => {
                let (a, ttl) = fs.getattr(ctx, node, fh)?;
                put(scratch, &attr_out(a, ttl))
            }
            O::Statx(arg) => {
                let (stat, ttl) = fs.statx(ctx, node, &arg)?;
                let out = abi::StatxOut {
                    attr_valid: ttl.as_secs(),
                    attr_valid_nsec: ttl.subsec_nanos(),
                    stat,
                    ..Default::default()
                };
                put(scratch, &out)
            }
            O::Setattr(arg) => {
                let (a, ttl) = fs.setattr(ctx, node, &arg)?;
                put(scratch, &attr_out(a, ttl))
            }
            O::Readlink => Outcome::Owned(fs.readlink(ctx, node)?),
            O::Symlink { name, target } => entry(scratch, fs.symlink(ctx, node, name, target)?),
            O::Mknod { arg, name } => entry(scratch, fs.mknod(ctx, node, name, &arg)?),
            O::Mkdir { arg, name } => entry(scratch, fs.mkdir(ctx, node, name, &arg)?),
            O::Unlink { name } => {
                fs.unlink(ctx, node, name)?;
                Outcome::Empty
            }
            O::Rmdir { name } => {
                fs.rmdir(ctx, node, name)?;
                Outcome::Empty
            }
            O::Rename {
                newdir,
                flags,
                name,
                newname,
            } => {
                fs.rename(ctx, node, name, newdir, newname, flags)?;
                Outcome::Empty
            }
            O::Link { oldnodeid, name } => entry(scratch, fs.link(ctx, oldnodeid, node, name)?),
            O::Open(arg) => {
                let o = fs.open(ctx, node, &arg)?;
                put(scratch, &open_out(o))
            }
            O::Opendir(arg) => {
                let o = fs.opendir(ctx, node, &arg)?;
                put(scratch, &open_out(o))
            }
            O::Create { arg, name } => {
                let (e, o) = fs.create(ctx, node, name, &arg)?;
                scratch.clear();
                scratch.extend_from_slice(entry_out(&e).as_bytes());
                scratch.extend_from_slice(open_out(o).as_bytes());
                Outcome::Scratch
            }
            O::Read(arg) => {
                let mut data = fs.read(ctx, node, &arg)?;
                data.truncate(arg.size as usize);
                Outcome::Owned(data)
            }
            O::Readdir(arg) => {
                let mut out = DirBuf::new(scratch, arg.size as usize, false);
                fs.readdir(ctx, node, &arg, &mut out)?;
                Outcome::Scratch
            }
            O::Readdirplus(arg) => {
                let mut out = DirBuf::new(scratch, arg.size as usize, true);
                fs.readdir(ctx, node, &arg, &mut out)?;
                Outcome::Scratch
            }
            O::Write { arg, data } => {
                let n = fs.write(ctx, node, &arg, data)?;
                let out = abi::WriteOut {
                    size: n.min(arg.size),
                    padding: 0,
                };
                put(scratch, &out)
            }
            O::Flush(arg) => {
                fs.flush(ctx, node, &arg)?;
                Outcome::Empty
            }
            O::Release(arg) => {
                fs.release(ctx, node, &arg)?;
                Outcome::Empty
            }
            O::Releasedir(arg) => {
                fs.releasedir(ctx, node, &arg)?;
                Outcome::Empty
            }
            O::Fsync(arg) => {
                fs.fsync(ctx, node, &arg)?;
                Outcome::Empty
            }
            O::Fsyncdir(arg) => {
                fs.fsyncdir(ctx, node, &arg)?;
                Outcome::Empty
            }
            O::Statfs => put(
                scratch,
                &abi::StatfsOut {
                    st: fs.statfs(ctx, node)?,
                },
            ),
            O::Setxattr { arg, name, value } => {
                fs.setxattr(ctx, node, name, value, &arg)?;
                Outcome::Empty
            }
            O::Getxattr { size, name } => {
                let v = fs.getxattr(ctx, node, name)?;
                sized(scratch, v, size)?
            }
            O::Listxattr { size } => {
                let v = fs.listxattr(ctx, node)?;
                sized(scratch, v, size)?
            }
            O::Removexattr { name } => {
                fs.removexattr(ctx, node, name)?;
                Outcome::Empty
            }
            O::Access { mask } => {
                fs.access(ctx, node, mask)?;
                Outcome::Empty
            }
            O::Fallocate(arg) => {
                fs.fallocate(ctx, node, &arg)?;
                Outcome::Empty
            }
            O::Lseek(arg) => {
                let offset = fs.lseek(ctx, node, &arg)?;
                put(scratch, &abi::LseekOut { offset })
            }
            O::Syncfs => {
                fs.syncfs(ctx)?;
                Outcome::Empty
            }
            // Molt's operations are short and not interruptible: ENOSYS tells the kernel
            // to stop sending interrupts (and it answers the interrupt, not the request).
            O::Interrupt { .. } => return Err(Errno::ENOSYS),
            O::NotifyReply => Outcome::NoReply,
            O::Unsupported(_) => return Err(Errno::ENOSYS),
        })
    }
}

fn open_out(o: crate::filesystem::Opened) -> abi::OpenOut {
    abi::OpenOut {
        fh: o.fh,
        open_flags: o.open_flags,
        backing_id: 0,
    }
}
