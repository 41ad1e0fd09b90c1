//! The filesystem's FUSE operations: Molt's FUSE layer (`molt-fuse`) calls them through
//! its `Filesystem` interface, and they run them on the filesystem core, keeping what the
//! kernel holds: lookup counts per inode and open handles. Errors become errno values
//! here and nowhere else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use formats::block::Ino;
use formats::dir::DT_DIR;
use formats::inode::{Timespec, S_IFDIR, S_IFMT, S_IFREG};
use molt_fuse::abi::{self, fattr, fopen, init};
use molt_fuse::{Context, DirBuf, Entry, Errno, Filesystem, Negotiated, Notifier, Opened, Result};

use formats::acl::{self, Acl, Caller};

use crate::persist::{self, FsdState};
use fsd_core::fs::{Atime, Attr, Fs, FsError, SetAttr, TimeSet, WriteMode, XattrFlags};

/// How long the kernel may cache attributes and names. Every change made through this
/// mount passes through the kernel, which updates or invalidates its caches itself.
const TTL: Duration = Duration::from_secs(1);
const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_IXGRP: u32 = 0o0010;
/// The INIT flags the filesystem asks for, beyond what a fast local filesystem does
/// ([`molt_fuse::InitPolicy::LOCAL_FILESYSTEM`]).
///
/// HANDLE_KILLPRIV_V2: the kernel tells, per write, truncate and chown, whether the
/// caller lacks CAP_FSETID, and the server drops set-id bits by the kernel's rules (v1
/// left the server no way to know the caller's privilege). POSIX_ACL: the kernel
/// enforces ACLs (with default_permissions) and leaves the umask to the server, which
/// applies default ACLs instead when the parent has one; DONT_MASK hands it the umask.
/// EXPORT_SUPPORT: lookups of "." and ".." are served (by inode number), so the mount
/// can be exported and file handles opened.
/// With `uring`, OVER_IO_URING too (the queues are registered after INIT).
pub(crate) fn init_policy(uring: bool) -> molt_fuse::InitPolicy {
    let transport = if uring { init::OVER_IO_URING } else { 0 };
    molt_fuse::InitPolicy::new(
        molt_fuse::InitPolicy::LOCAL_FILESYSTEM
            | init::HANDLE_KILLPRIV_V2
            | init::POSIX_ACL
            | init::DONT_MASK
            | init::EXPORT_SUPPORT
            | transport,
    )
}

/// Set-id bits a change of the data or size of a file with `mode` and group `gid`, made
/// by `caller`, must drop: the kernel's `setattr_should_drop_suidgid`. Set-user-ID always;
/// set-group-ID when group-executable (a real set-group-ID) or when the caller is not in
/// the file's group; nothing for a caller with CAP_FSETID or for a non-regular file.
fn suidgid_to_drop(mode: u32, gid: u32, caller: &Caller) -> u32 {
    if mode & S_IFMT != S_IFREG || caller.cap_fsetid {
        return 0;
    }
    let mut drop = mode & S_ISUID;
    if mode & S_ISGID != 0 && (mode & S_IXGRP != 0 || !caller.in_group(gid)) {
        drop |= S_ISGID;
    }
    drop
}

/// Set-id bits a change of owner or group must drop (`chown_common`): set-user-ID always,
/// set-group-ID by `setattr_should_drop_sgid`; directories keep theirs.
fn suidgid_to_drop_on_chown(mode: u32, gid: u32, caller: &Caller) -> u32 {
    if mode & S_IFMT == S_IFDIR {
        return 0;
    }
    let mut drop = mode & S_ISUID;
    if mode & S_ISGID != 0 && (mode & S_IXGRP != 0 || !(caller.in_group(gid) || caller.cap_fsetid))
    {
        drop |= S_ISGID;
    }
    drop
}

/// The caller of a request, with the groups and capabilities the kernel's rules need.
fn caller_of(ctx: &Context) -> Caller {
    crate::credentials::of_request(ctx.pid, ctx.uid, ctx.gid)
}

fn to_errno(e: FsError) -> Errno {
    Errno(e.errno())
}

/// An open file or directory.
#[derive(Debug, Clone)]
pub enum Handle {
    File {
        ino: Ino,
        flags: u32,
        touched: bool,
        reads: u64,
        writes: u64,
    },
    /// A directory listing taken at opendir: offsets index it, so entries that exist
    /// for the whole listing are returned exactly once whatever changes meanwhile.
    Dir {
        ino: Ino,
        entries: Arc<Vec<(Vec<u8>, Ino, u8)>>,
    },
}

thread_local! {
    /// The request this thread serves is a resend of one that already completed.
    static REPLAY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the request this thread serves as the resend of a completed one (or not).
pub(crate) fn set_replay(on: bool) {
    REPLAY.with(|r| r.set(on));
}

/// Whether the request being served already ran to completion in a server that died
/// before replying: a non-idempotent operation must then not run again.
fn replaying() -> bool {
    REPLAY.with(|r| r.get())
}

/// Fault injection for the crash-recovery tests: with `MOLT_FAULT_DIE_AFTER=NAME` in its
/// environment, the server dies right after an operation on an entry named NAME has
/// completed and before its reply is sent, the one window where a resent request must
/// not run again. Never set outside tests.
fn die_after_completing(name: &[u8]) {
    static TARGET: std::sync::OnceLock<Option<Vec<u8>>> = std::sync::OnceLock::new();
    let target = TARGET.get_or_init(|| {
        std::env::var_os("MOLT_FAULT_DIE_AFTER")
            .map(|v| std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str()).to_vec())
    });
    if target.as_deref() == Some(name) {
        let shown = String::from_utf8_lossy(name);
        molt_sys::errln!("fsd serve: fault injection: dying before replying for {shown:?}");
        let _ = molt_sys::kill(std::process::id() as libc::pid_t, libc::SIGKILL);
    }
}

/// The kernel-facing state of a mount.
pub struct MoltFuse {
    fs: Arc<Fs>,
    lookups: Mutex<HashMap<u64, u64>>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    /// Per-file usage counters, readable as `user.molt.usage`. This version counts
    /// opens; the `usage-on-touch` variant counts the first read or write after an open.
    usage: Mutex<HashMap<u64, u64>>,
    /// Requests served since the mount, across versions.
    pub requests: AtomicU64,
    /// Requests a crashed predecessor completed (empty unless recovered).
    completed: std::collections::HashSet<u64>,
    /// The mount's access-time policy (`Atime` as a number), kept in step with the
    /// mount's options by the server.
    atime: std::sync::atomic::AtomicU8,
    /// The connection's parameters, once negotiated or adopted.
    connection: std::sync::OnceLock<Negotiated>,
    /// Notifications to the kernel (absent in tests).
    notifier: std::sync::OnceLock<Notifier>,
    /// The transport requests arrive on (`persist::Transport::Uring` as 1).
    transport: std::sync::atomic::AtomicU8,
    /// Where the connection's parameters are recorded when they are known, for a
    /// successor that recovers after this process dies (absent in tests).
    record: std::sync::OnceLock<std::fs::File>,
}

/// Handle numbers a server recovered after its `n`-th crash gives out start at
/// `(n + 1) << RECOVERY_HANDLE_SHIFT`, above any a predecessor can have reached.
const RECOVERY_HANDLE_SHIFT: u32 = 44;

/// The virtual, read-only extended attribute holding a file's usage counter.
pub(crate) const USAGE_XATTR: &[u8] = b"user.molt.usage";
/// The virtual, read-only extended attribute holding an inode's creation time (format v2
/// and later) as decimal `SEC.NSEC`; absent on inodes without one. Not listed: `statx`
/// reports the creation time as `stx_btime`.
pub(crate) const CRTIME_XATTR: &[u8] = b"user.molt.crtime";

/// The value of `CRTIME_XATTR`: seconds, a dot, nanoseconds as nine digits.
pub(crate) fn crtime_value(t: Timespec) -> Vec<u8> {
    format!("{}.{:09}", t.sec, t.nsec).into_bytes()
}

/// Owner, mode and initial extended attributes of an inode about to be made.
struct NewInode {
    uid: u32,
    gid: u32,
    mode: u32,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl NewInode {
    fn xattr_refs(&self) -> Vec<(&[u8], &[u8])> {
        self.xattrs
            .iter()
            .map(|(n, v)| (n.as_slice(), v.as_slice()))
            .collect()
    }
}

fn atime_code(a: Atime) -> u8 {
    match a {
        Atime::Never => 0,
        Atime::Relative => 1,
        Atime::Always => 2,
    }
}

fn atime_from_code(c: u8) -> Atime {
    match c {
        0 => Atime::Never,
        2 => Atime::Always,
        _ => Atime::Relative,
    }
}

/// The attributes the kernel caches for `a`.
fn attr_of(a: &Attr) -> abi::Attr {
    abi::Attr {
        ino: a.ino.0 as u64,
        size: a.size,
        blocks: a.blocks,
        atime: a.atime.sec as u64,
        mtime: a.mtime.sec as u64,
        ctime: a.ctime.sec as u64,
        atimensec: a.atime.nsec,
        mtimensec: a.mtime.nsec,
        ctimensec: a.ctime.nsec,
        mode: a.mode,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// `statx`'s view of `a`: the basic attributes, and the creation time where the inode
/// has one (format v2 and later).
fn statx_of(a: &Attr) -> abi::Statx {
    let t = |t: Timespec| abi::SxTime {
        tv_sec: t.sec,
        tv_nsec: t.nsec,
        reserved: 0,
    };
    let mut mask = libc::STATX_BASIC_STATS;
    let btime = match a.crtime {
        Some(c) => {
            mask |= libc::STATX_BTIME;
            t(c)
        }
        None => abi::SxTime::default(),
    };
    abi::Statx {
        mask,
        blksize: 4096,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        mode: a.mode as u16,
        ino: a.ino.0 as u64,
        size: a.size,
        blocks: a.blocks,
        atime: t(a.atime),
        btime,
        ctime: t(a.ctime),
        mtime: t(a.mtime),
        rdev_major: libc::major(a.rdev as libc::dev_t),
        rdev_minor: libc::minor(a.rdev as libc::dev_t),
        ..Default::default()
    }
}

fn entry_of(a: &Attr) -> Entry {
    Entry {
        nodeid: a.ino.0 as u64,
        generation: a.generation as u64,
        attr: attr_of(a),
        entry_ttl: TTL,
        attr_ttl: TTL,
    }
}

impl MoltFuse {
    pub fn new(fs: Arc<Fs>) -> MoltFuse {
        MoltFuse {
            fs,
            lookups: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            usage: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
            completed: Default::default(),
            atime: std::sync::atomic::AtomicU8::new(atime_code(Atime::default())),
            connection: std::sync::OnceLock::new(),
            notifier: std::sync::OnceLock::new(),
            transport: std::sync::atomic::AtomicU8::new(0),
            record: std::sync::OnceLock::new(),
        }
    }

    /// The kernel-facing state after the server died: the kernel's lookup counts and
    /// handles are unknown. Lookups start at zero (an orphan then waits for the next
    /// mount to be freed), handles the kernel still holds are rebuilt on first use, and
    /// new handle numbers start above any the dead server can have given out.
    pub fn recovered(
        fs: Arc<Fs>,
        completed: std::collections::HashSet<u64>,
        recovery: u64,
    ) -> MoltFuse {
        let mut m = MoltFuse::new(fs);
        m.completed = completed;
        m.next_handle = AtomicU64::new((recovery + 1) << RECOVERY_HANDLE_SHIFT);
        m
    }

    /// Whether `unique` (a resent request) completed in the server that died.
    pub(crate) fn completed_before(&self, unique: u64) -> bool {
        self.completed.contains(&(unique & !(1 << 63)))
    }

    /// A resent creation that already completed: answers with the entry it made.
    fn replayed_entry(&self, parent: u64, name: &[u8]) -> Option<Entry> {
        if !replaying() {
            return None;
        }
        let a = self.fs.lookup(Ino(parent as u32), name).ok()?;
        Some(self.counted(a))
    }

    /// Rebuilds the kernel-facing state a predecessor exported.
    pub fn import(fs: Arc<Fs>, state: &FsdState) -> MoltFuse {
        let handles = state
            .handles
            .iter()
            .map(|(id, h)| {
                let h = match h {
                    persist::Handle::File {
                        ino,
                        flags,
                        touched,
                        reads,
                        writes,
                    } => Handle::File {
                        ino: *ino,
                        flags: *flags,
                        touched: *touched,
                        reads: *reads,
                        writes: *writes,
                    },
                    persist::Handle::Dir { ino, entries } => Handle::Dir {
                        ino: *ino,
                        entries: Arc::new(entries.clone()),
                    },
                };
                (*id, h)
            })
            .collect();
        let map = |m: &std::collections::BTreeMap<u64, u64>| {
            m.iter().map(|(k, v)| (*k, *v)).collect::<HashMap<_, _>>()
        };
        MoltFuse {
            fs,
            lookups: Mutex::new(map(&state.lookups)),
            handles: Mutex::new(handles),
            next_handle: AtomicU64::new(state.next_handle),
            usage: Mutex::new(map(&state.usage)),
            requests: AtomicU64::new(state.requests),
            completed: Default::default(),
            atime: std::sync::atomic::AtomicU8::new(atime_code(Atime::default())),
            connection: std::sync::OnceLock::new(),
            notifier: std::sync::OnceLock::new(),
            transport: std::sync::atomic::AtomicU8::new(0),
            record: std::sync::OnceLock::new(),
        }
    }

    /// The state a successor needs (without the withheld blocks, which the filesystem
    /// reports when it quiesces). Call only when no request is being served.
    pub fn export(&self) -> FsdState {
        let map = |m: &Mutex<HashMap<u64, u64>>| {
            m.lock()
                .expect("kernel state")
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect()
        };
        let handles = self
            .handles
            .lock()
            .expect("handles")
            .iter()
            .map(|(id, h)| {
                let h = match h {
                    Handle::File {
                        ino,
                        flags,
                        touched,
                        reads,
                        writes,
                    } => persist::Handle::File {
                        ino: *ino,
                        flags: *flags,
                        touched: *touched,
                        reads: *reads,
                        writes: *writes,
                    },
                    Handle::Dir { ino, entries } => persist::Handle::Dir {
                        ino: *ino,
                        entries: entries.to_vec(),
                    },
                };
                (*id, h)
            })
            .collect();
        FsdState {
            version: persist::component_version(),
            init_flags: self.init_flags(),
            connection: self
                .connection
                .get()
                .map(|n| persist::Connection::new(n, self.transport())),
            lookups: map(&self.lookups),
            handles,
            next_handle: self.next_handle.load(Ordering::SeqCst),
            usage: map(&self.usage),
            requests: self.requests.load(Ordering::SeqCst),
            withheld: Vec::new(),
        }
    }

    fn count_usage(&self, ino: u64) {
        *self.usage.lock().expect("usage").entry(ino).or_insert(0) += 1;
    }

    /// Records a read or write through handle `h`: its first one counts as a use in the
    /// `usage-on-touch` variant.
    fn touch(&self, h: u64, is_write: bool) {
        let first = match self.handles.lock().expect("handles").get_mut(&h) {
            Some(Handle::File {
                ino,
                touched,
                reads,
                writes,
                ..
            }) => {
                if is_write {
                    *writes += 1;
                } else {
                    *reads += 1;
                }
                (!std::mem::replace(touched, true)).then_some(ino.0 as u64)
            }
            _ => None,
        };
        if let (Some(ino), true) = (first, cfg!(feature = "usage-on-touch")) {
            self.count_usage(ino);
        }
    }

    /// Counts one more kernel reference to the inode of a returned entry.
    fn counted(&self, a: Attr) -> Entry {
        *self
            .lookups
            .lock()
            .expect("lookups")
            .entry(a.ino.0 as u64)
            .or_insert(0) += 1;
        entry_of(&a)
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let id = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().expect("handles").insert(id, h);
        id
    }

    /// The listing a directory handle serves: ".", "..", then every entry.
    fn listing(&self, ino: Ino) -> Result<Vec<(Vec<u8>, Ino, u8)>> {
        let list = self.fs.readdir(ino).map_err(to_errno)?;
        let parent = self.fs.parent_of(ino).map_err(to_errno)?;
        let mut entries = Vec::with_capacity(list.len() + 2);
        entries.push((b".".to_vec(), ino, DT_DIR));
        entries.push((b"..".to_vec(), parent, DT_DIR));
        entries.extend(list.into_iter().map(|e| (e.name, e.ino, e.dtype)));
        Ok(entries)
    }

    /// Owner, mode and inherited ACLs of a new inode (`mode` carries the type) made by
    /// `ctx` in `parent`: the kernel's `inode_init_owner` (the group of a set-group-ID
    /// directory, and its set-group-ID bit for subdirectories), then `posix_acl_create`
    /// (the parent's default ACL masks the mode in place of the umask; without one the
    /// umask applies). Symlinks take no ACL and no umask.
    fn new_inode(&self, ctx: &Context, parent: u64, mode: u32, umask: u32) -> Result<NewInode> {
        let p = self.fs.getattr(Ino(parent as u32)).map_err(to_errno)?;
        let is_dir = mode & S_IFMT == S_IFDIR;
        let (gid, mut mode) = if p.mode & S_ISGID != 0 {
            (p.gid, if is_dir { mode | S_ISGID } else { mode })
        } else {
            (ctx.gid, mode)
        };
        let mut xattrs = Vec::new();
        if mode & S_IFMT != formats::inode::S_IFLNK {
            let default = if self.acls_enabled() {
                self.stored_acl(parent, acl::DEFAULT_XATTR)?
            } else {
                None
            };
            let inherited = acl::inherit(default.as_ref(), mode & 0o777, umask & 0o777, is_dir);
            mode = (mode & !0o777) | (inherited.mode & 0o777);
            if let Some(a) = inherited.access {
                xattrs.push((acl::ACCESS_XATTR.to_vec(), a.encode()));
            }
            if let Some(d) = inherited.default {
                xattrs.push((acl::DEFAULT_XATTR.to_vec(), d.encode()));
            }
        }
        Ok(NewInode {
            uid: ctx.uid,
            gid,
            mode,
            xattrs,
        })
    }

    /// The INIT flags in force on the connection (none before INIT).
    fn init_flags(&self) -> u64 {
        self.connection.get().map_or(0, |n| n.flags)
    }

    /// Whether the connection negotiated POSIX ACLs (the kernel then enforces them).
    fn acls_enabled(&self) -> bool {
        self.init_flags() & init::POSIX_ACL != 0
    }

    /// The ACL stored under `name` on `ino`, if any.
    fn stored_acl(&self, ino: u64, name: &[u8]) -> Result<Option<Acl>> {
        match self.fs.getxattr(Ino(ino as u32), name) {
            Ok(v) => Acl::decode(&v).map(Some).map_err(|_| {
                to_errno(FsError::Corrupted(format!(
                    "inode {ino} holds a malformed ACL"
                )))
            }),
            Err(FsError::NoAttr) => Ok(None),
            Err(e) => Err(to_errno(e)),
        }
    }

    /// Records the transport requests arrive on (exported with the state, and in the
    /// connection record once the connection is negotiated).
    pub(crate) fn set_transport(&self, t: persist::Transport) {
        self.transport
            .store((t == persist::Transport::Uring) as u8, Ordering::SeqCst);
        if let Some(n) = self.connection.get() {
            self.write_record(n);
        }
    }

    pub(crate) fn transport(&self) -> persist::Transport {
        match self.transport.load(Ordering::SeqCst) {
            1 => persist::Transport::Uring,
            _ => persist::Transport::Dev,
        }
    }

    /// Records the connection's parameters for a server that recovers after this one
    /// dies (before the INIT reply, and again if the transport changes).
    fn write_record(&self, negotiated: &Negotiated) {
        if let Some(file) = self.record.get() {
            let c = persist::Connection::new(negotiated, self.transport());
            let record = persist::encode_connection_record(negotiated.flags, &c);
            if let Err(e) = crate::host::write_session_record(file, &record) {
                molt_sys::errln!("fsd serve: writing the connection record: {e}");
            }
        }
    }

    /// Gives the server the memfd the connection's parameters are recorded in.
    pub(crate) fn set_session_record(&self, file: std::fs::File) {
        let _ = self.record.set(file);
    }

    /// Gives the server the connection to send notifications on.
    pub(crate) fn set_notifier(&self, notifier: Notifier) {
        let _ = self.notifier.set(notifier);
    }

    /// Tells the kernel that the attributes it caches for `ino` are stale, for a change
    /// made while serving a request whose reply carries no attributes.
    fn invalidate_attributes(&self, ino: u64) {
        if let Some(n) = self.notifier.get() {
            // A lost notification leaves the kernel's copy stale for at most the TTL.
            let _ = n.inval_inode_attributes(ino);
        }
    }

    /// The `FOPEN_*` flags of an open with `flags`. An O_DIRECT open is served as direct
    /// I/O with parallel writes (FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES), so the
    /// kernel sends concurrent writes to one file side by side instead of one at a time
    /// under the inode lock; that needs DIRECT_IO_ALLOW_MMAP, without which a direct-I/O
    /// file refuses a shared mmap (ENODEV), so without it O_DIRECT opens take the
    /// kernel's cached path, which sends their I/O straight to the server all the same.
    fn open_flags(&self, flags: u32) -> u32 {
        let direct = flags & libc::O_DIRECT as u32 != 0;
        if direct && self.init_flags() & init::DIRECT_IO_ALLOW_MMAP != 0 {
            fopen::DIRECT_IO | fopen::PARALLEL_DIRECT_WRITES
        } else {
            0
        }
    }

    /// Drops the set-id bits a data change by `ctx` must drop (see `suidgid_to_drop`);
    /// `kernel_found_unprivileged` when the kernel said the caller lacks CAP_FSETID.
    /// Reads the caller's groups and capabilities only when the file has a set-id bit.
    fn drop_suidgid(&self, ctx: &Context, ino: u64, kernel_found_unprivileged: bool) -> Result<()> {
        let a = self.fs.getattr(Ino(ino as u32)).map_err(to_errno)?;
        if a.mode & (S_ISUID | S_ISGID) == 0 {
            return Ok(());
        }
        let mut caller = caller_of(ctx);
        if kernel_found_unprivileged {
            caller.cap_fsetid = false;
        }
        let drop = suidgid_to_drop(a.mode, a.gid, &caller);
        if drop != 0 {
            self.fs
                .setattr(
                    Ino(ino as u32),
                    SetAttr {
                        mode: Some(a.mode & 0o7777 & !drop),
                        ..Default::default()
                    },
                )
                .map_err(to_errno)?;
            self.invalidate_attributes(ino);
        }
        Ok(())
    }

    /// Makes a new inode of any type but directory and symlink (`mode` carries the type).
    fn make_node(
        &self,
        ctx: &Context,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> Result<Attr> {
        let n = self.new_inode(ctx, parent, mode, umask)?;
        let xattrs = n.xattr_refs();
        self.fs
            .mknod_with(
                Ino(parent as u32),
                name,
                n.mode,
                rdev,
                (n.uid, n.gid),
                &xattrs,
            )
            .map_err(to_errno)
    }

    /// CREATE of a name that another process created since the kernel looked it up: opens
    /// that file as open(2) without O_EXCL would. The kernel takes a CREATE's file as new
    /// and checks no permission and truncates nothing, so both are done here.
    fn open_created_meanwhile(
        &self,
        ctx: &Context,
        parent: u64,
        name: &[u8],
        args: &abi::CreateIn,
    ) -> Result<Attr> {
        let a = self.fs.lookup(Ino(parent as u32), name).map_err(to_errno)?;
        match a.mode & S_IFMT {
            S_IFREG => {}
            S_IFDIR => return Err(Errno(libc::EISDIR)),
            // A FIFO, device or symlink cannot be opened through CREATE's reply.
            _ => return Err(Errno(libc::EEXIST)),
        }
        let caller = caller_of(ctx);
        let trunc = args.flags & libc::O_TRUNC as u32 != 0;
        let mut want = match args.flags & libc::O_ACCMODE as u32 {
            f if f == libc::O_WRONLY as u32 => acl::WRITE,
            f if f == libc::O_RDWR as u32 => acl::READ | acl::WRITE,
            _ => acl::READ,
        };
        if trunc {
            want |= acl::WRITE;
        }
        let file_acl = if self.acls_enabled() {
            self.stored_acl(a.ino.0 as u64, acl::ACCESS_XATTR)?
        } else {
            None
        };
        if !acl::permission(
            file_acl.as_ref(),
            a.mode,
            a.uid,
            a.gid,
            &caller,
            want,
            false,
        ) {
            return Err(Errno(libc::EACCES));
        }
        if trunc {
            let drop = suidgid_to_drop(a.mode, a.gid, &caller);
            let s = SetAttr {
                size: Some(0),
                mode: (drop != 0).then_some(a.mode & 0o7777 & !drop),
                ..Default::default()
            };
            return self.fs.setattr(a.ino, s).map_err(to_errno);
        }
        Ok(a)
    }

    /// Sets (or with `None` removes) the ACL `name` of `ino` for `ctx`: an access ACL also
    /// sets the mode bits it mirrors (and is not stored when the mode says it all), and
    /// drops set-group-ID unless the caller is in the file's group or has CAP_FSETID
    /// (`posix_acl_update_mode`). Permission to change it is the kernel's check.
    fn set_acl(
        &self,
        ctx: &Context,
        ino: u64,
        name: &[u8],
        value: Option<&[u8]>,
        kernel_kills_sgid: bool,
    ) -> Result<()> {
        if !self.acls_enabled() {
            return Err(Errno(libc::EOPNOTSUPP));
        }
        let a = self.fs.getattr(Ino(ino as u32)).map_err(to_errno)?;
        let parsed = match value {
            Some(v) => Acl::decode_for_setxattr(v).map_err(|_| Errno(libc::EINVAL))?,
            None => None,
        };
        let is_access = name == acl::ACCESS_XATTR;
        if !is_access && a.mode & S_IFMT != S_IFDIR && parsed.is_some() {
            return Err(Errno(libc::EACCES));
        }
        let mut attrs = SetAttr::default();
        let stored = match (&parsed, is_access) {
            (Some(acl), true) => {
                let (mode, keep) = acl::update_mode(acl, a.mode);
                let mut mode = mode & 0o7777;
                let caller = caller_of(ctx);
                if kernel_kills_sgid || !(caller.in_group(a.gid) || caller.cap_fsetid) {
                    mode &= !S_ISGID;
                }
                attrs.mode = Some(mode);
                keep.map(|k| k.encode())
            }
            (Some(acl), false) => Some(acl.encode()),
            (None, _) => None,
        };
        self.fs
            .setattr_with_xattr(Ino(ino as u32), attrs, Some((name, stored.as_deref())))
            .map(|_| ())
            .map_err(to_errno)
    }

    /// The access ACL of `ino` after its mode became `mode` (chmod): `posix_acl_chmod`.
    fn acl_after_chmod(&self, ino: u64, mode: u32) -> Result<Option<Vec<u8>>> {
        if !self.acls_enabled() {
            return Ok(None);
        }
        Ok(self
            .stored_acl(ino, acl::ACCESS_XATTR)?
            .map(|a| a.chmod(mode).encode()))
    }

    fn atime(&self) -> Atime {
        atime_from_code(self.atime.load(Ordering::Relaxed))
    }

    /// Sets the access-time policy (the mount's atime option).
    pub fn set_atime(&self, atime: Atime) {
        self.atime.store(atime_code(atime), Ordering::Relaxed);
    }

    fn forget_one(&self, ino: u64, count: u64) {
        let gone = {
            let mut l = self.lookups.lock().expect("lookups");
            match l.get_mut(&ino) {
                Some(n) if *n > count => {
                    *n -= count;
                    false
                }
                Some(_) => {
                    l.remove(&ino);
                    true
                }
                None => false,
            }
        };
        if gone {
            // Frees the inode if it has no names left; errors leave it to the next mount.
            let _ = self.fs.release(Ino(ino as u32));
        }
    }

    pub(crate) fn open_handles(&self) -> HashMap<u64, Handle> {
        self.handles.lock().expect("handles").clone()
    }
}

impl Filesystem for MoltFuse {
    fn init(&self, negotiated: &Negotiated) {
        let _ = self.connection.set(*negotiated);
        self.write_record(negotiated);
    }

    fn begin(&self, ctx: &Context) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        // The request id goes with the operation's changes to the redo log; a request
        // resent after a crash is marked so that one already completed is answered, not
        // run again.
        fsd_core::fs::redo::set_current_request(ctx.unique & !abi::UNIQUE_RESEND);
        set_replay(ctx.is_resend() && self.completed_before(ctx.unique));
    }

    fn end(&self, _ctx: &Context) {
        fsd_core::fs::redo::set_current_request(0);
        set_replay(false);
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &[u8]) -> Result<Entry> {
        let ino = Ino(parent as u32);
        let a = match name {
            // Lookups by inode number: how the kernel turns a file handle (NFS export,
            // open_by_handle_at) back into an inode. The kernel compares the generation.
            b"." => self.fs.getattr_by_handle(ino),
            b".." => self
                .fs
                .parent_of(ino)
                .and_then(|p| self.fs.getattr_by_handle(p)),
            other => self.fs.lookup(ino, other),
        }
        .map_err(to_errno)?;
        Ok(self.counted(a))
    }

    fn forget(&self, nodeid: u64, nlookup: u64) {
        self.forget_one(nodeid, nlookup)
    }

    fn getattr(
        &self,
        _ctx: &Context,
        nodeid: u64,
        _fh: Option<u64>,
    ) -> Result<(abi::Attr, Duration)> {
        let a = self.fs.getattr(Ino(nodeid as u32)).map_err(to_errno)?;
        Ok((attr_of(&a), TTL))
    }

    fn statx(
        &self,
        _ctx: &Context,
        nodeid: u64,
        _arg: &abi::StatxIn,
    ) -> Result<(abi::Statx, Duration)> {
        let a = self.fs.getattr(Ino(nodeid as u32)).map_err(to_errno)?;
        Ok((statx_of(&a), TTL))
    }

    fn setattr(
        &self,
        ctx: &Context,
        nodeid: u64,
        arg: &abi::SetattrIn,
    ) -> Result<(abi::Attr, Duration)> {
        let ino = Ino(nodeid as u32);
        let valid = arg.valid;
        let has = |bit: u32| valid & bit != 0;
        let time = |now: bool, sec: u64, nsec: u32| {
            if now {
                TimeSet::Now
            } else {
                TimeSet::At(Timespec {
                    sec: sec as i64,
                    nsec,
                })
            }
        };
        for (set, nsec) in [
            (has(fattr::ATIME) && !has(fattr::ATIME_NOW), arg.atimensec),
            (has(fattr::MTIME) && !has(fattr::MTIME_NOW), arg.mtimensec),
            (has(fattr::CTIME), arg.ctimensec),
        ] {
            if set && nsec >= 1_000_000_000 {
                return Err(Errno(libc::EINVAL));
            }
        }
        let mut s = SetAttr::default();
        if has(fattr::MODE) {
            s.mode = Some(arg.mode);
        }
        if has(fattr::UID) {
            s.uid = Some(arg.uid);
        }
        if has(fattr::GID) {
            s.gid = Some(arg.gid);
        }
        if has(fattr::SIZE) {
            s.size = Some(arg.size);
        }
        if has(fattr::ATIME) {
            s.atime = Some(time(has(fattr::ATIME_NOW), arg.atime, arg.atimensec));
        }
        if has(fattr::MTIME) {
            s.mtime = Some(time(has(fattr::MTIME_NOW), arg.mtime, arg.mtimensec));
        }
        if has(fattr::CTIME) {
            s.ctime = Some(Timespec {
                sec: arg.ctime as i64,
                nsec: arg.ctimensec,
            });
        }
        let chown = s.uid.is_some() || s.gid.is_some();
        let cur = self.fs.getattr(ino).map_err(to_errno)?;
        if has(fattr::KILL_SUIDGID) && cur.mode & (S_ISUID | S_ISGID) != 0 {
            // Sent for every chown of a non-directory, and for a truncate by a caller
            // without CAP_FSETID (HANDLE_KILLPRIV_V2).
            let base = s.mode.unwrap_or(cur.mode) & 0o7777;
            let drop = if chown {
                suidgid_to_drop_on_chown(cur.mode, cur.gid, &caller_of(ctx))
            } else {
                let caller = Caller {
                    cap_fsetid: false,
                    ..caller_of(ctx)
                };
                suidgid_to_drop(cur.mode, cur.gid, &caller)
            };
            if base & drop != 0 {
                s.mode = Some(base & !drop);
            }
        }
        // A new mode reaches the ACL too: its mask (or group) entry mirrors the group bits.
        let acl = match s.mode {
            Some(mode) if has(fattr::MODE) => self
                .acl_after_chmod(nodeid, mode)?
                .map(|v| (acl::ACCESS_XATTR, v)),
            _ => None,
        };
        let a = self
            .fs
            .setattr_with_xattr(ino, s, acl.as_ref().map(|(n, v)| (*n, Some(v.as_slice()))))
            .map_err(to_errno)?;
        Ok((attr_of(&a), TTL))
    }

    fn readlink(&self, _ctx: &Context, nodeid: u64) -> Result<Vec<u8>> {
        self.fs.readlink(Ino(nodeid as u32)).map_err(to_errno)
    }

    fn symlink(&self, ctx: &Context, parent: u64, name: &[u8], target: &[u8]) -> Result<Entry> {
        if let Some(e) = self.replayed_entry(parent, name) {
            return Ok(e);
        }
        let n = self.new_inode(ctx, parent, formats::inode::S_IFLNK | 0o777, 0)?;
        let a = self
            .fs
            .symlink(Ino(parent as u32), name, target, n.uid, n.gid)
            .map_err(to_errno)?;
        Ok(self.counted(a))
    }

    fn mknod(&self, ctx: &Context, parent: u64, name: &[u8], arg: &abi::MknodIn) -> Result<Entry> {
        if let Some(e) = self.replayed_entry(parent, name) {
            return Ok(e);
        }
        let a = self.make_node(ctx, parent, name, arg.mode, arg.rdev, arg.umask)?;
        Ok(self.counted(a))
    }

    fn mkdir(&self, ctx: &Context, parent: u64, name: &[u8], arg: &abi::MkdirIn) -> Result<Entry> {
        if let Some(e) = self.replayed_entry(parent, name) {
            return Ok(e);
        }
        let n = self.new_inode(ctx, parent, (arg.mode & 0o7777) | S_IFDIR, arg.umask)?;
        let xattrs = n.xattr_refs();
        let a = self
            .fs
            .mkdir_with(
                Ino(parent as u32),
                name,
                n.mode & 0o7777,
                (n.uid, n.gid),
                &xattrs,
            )
            .map_err(to_errno)?;
        die_after_completing(name);
        Ok(self.counted(a))
    }

    fn unlink(&self, _ctx: &Context, parent: u64, name: &[u8]) -> Result<()> {
        if replaying() {
            return Ok(());
        }
        self.fs.unlink(Ino(parent as u32), name).map_err(to_errno)?;
        die_after_completing(name);
        Ok(())
    }

    fn rmdir(&self, _ctx: &Context, parent: u64, name: &[u8]) -> Result<()> {
        if replaying() {
            return Ok(());
        }
        self.fs
            .rmdir(Ino(parent as u32), name)
            .map(|_| ())
            .map_err(to_errno)
    }

    fn rename(
        &self,
        _ctx: &Context,
        olddir: u64,
        oldname: &[u8],
        newdir: u64,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return Err(Errno(libc::EINVAL));
        }
        if replaying() {
            return Ok(());
        }
        self.fs
            .rename(
                Ino(olddir as u32),
                oldname,
                Ino(newdir as u32),
                newname,
                noreplace,
                exchange,
            )
            .map_err(to_errno)?;
        die_after_completing(oldname);
        Ok(())
    }

    fn link(&self, _ctx: &Context, nodeid: u64, newparent: u64, newname: &[u8]) -> Result<Entry> {
        if let Some(e) = self.replayed_entry(newparent, newname) {
            return Ok(e);
        }
        let a = self
            .fs
            .link(Ino(nodeid as u32), Ino(newparent as u32), newname)
            .map_err(to_errno)?;
        Ok(self.counted(a))
    }

    fn open(&self, ctx: &Context, nodeid: u64, arg: &abi::OpenIn) -> Result<Opened> {
        let a = self.fs.getattr(Ino(nodeid as u32)).map_err(to_errno)?;
        if a.mode & S_IFMT == S_IFDIR {
            return Err(Errno(libc::EISDIR));
        }
        // Only with ATOMIC_O_TRUNC does an open carry O_TRUNC; without it (Molt's
        // choice) the kernel truncates with a SETATTR of its own.
        if arg.flags & libc::O_TRUNC as u32 != 0 && arg.open_flags & abi::OPEN_KILL_SUIDGID != 0 {
            self.drop_suidgid(ctx, nodeid, true)?;
        }
        let fh = self.add_handle(Handle::File {
            ino: Ino(nodeid as u32),
            flags: arg.flags,
            touched: false,
            reads: 0,
            writes: 0,
        });
        if !cfg!(feature = "usage-on-touch") {
            self.count_usage(nodeid);
        }
        Ok(Opened {
            fh,
            open_flags: self.open_flags(arg.flags),
        })
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &[u8],
        arg: &abi::CreateIn,
    ) -> Result<(Entry, Opened)> {
        let mode = if arg.mode & S_IFMT == 0 {
            arg.mode | S_IFREG
        } else {
            arg.mode
        };
        let replayed = replaying()
            .then(|| self.fs.lookup(Ino(parent as u32), name).ok())
            .flatten();
        let a = match replayed {
            Some(a) => a,
            None => match self.make_node(ctx, parent, name, mode, 0, arg.umask) {
                Ok(a) => a,
                Err(e) if e.0 == libc::EEXIST && arg.flags & libc::O_EXCL as u32 == 0 => {
                    self.open_created_meanwhile(ctx, parent, name, arg)?
                }
                Err(e) => return Err(e),
            },
        };
        let fh = self.add_handle(Handle::File {
            ino: a.ino,
            flags: arg.flags,
            touched: false,
            reads: 0,
            writes: 0,
        });
        if !cfg!(feature = "usage-on-touch") {
            self.count_usage(a.ino.0 as u64);
        }
        let opened = Opened {
            fh,
            open_flags: self.open_flags(arg.flags),
        };
        Ok((self.counted(a), opened))
    }

    fn read(&self, _ctx: &Context, nodeid: u64, arg: &abi::ReadIn) -> Result<Vec<u8>> {
        self.touch(arg.fh, false);
        self.fs
            .read_with(Ino(nodeid as u32), arg.offset, arg.size, self.atime())
            .map_err(to_errno)
    }

    fn write(&self, ctx: &Context, nodeid: u64, arg: &abi::WriteIn, data: &[u8]) -> Result<u32> {
        self.touch(arg.fh, true);
        if arg.write_flags & abi::WRITE_KILL_SUIDGID != 0 {
            self.drop_suidgid(ctx, nodeid, true)?;
        }
        // A write-back of cached pages (delayed): the kernel stamped the times when the
        // program wrote and sends them itself; stamping now would move mtime after the
        // fact. Its pages cannot be written in part either.
        let delayed = arg.write_flags & abi::WRITE_CACHE != 0;
        let how = WriteMode {
            stamp_times: !delayed,
            whole: delayed,
        };
        self.fs
            .write_with(Ino(nodeid as u32), arg.offset, data, how)
            .map(|n| n as u32)
            .map_err(to_errno)
    }

    fn fsync(&self, _ctx: &Context, nodeid: u64, _arg: &abi::FsyncIn) -> Result<()> {
        self.fs.fsync(Ino(nodeid as u32)).map_err(to_errno)
    }

    fn fallocate(&self, ctx: &Context, nodeid: u64, arg: &abi::FallocateIn) -> Result<()> {
        // The kernel passes fallocate on without dropping set-id bits or saying whether
        // the caller may keep them, so the caller's own capabilities decide (as
        // `file_modified` does on a local filesystem).
        self.drop_suidgid(ctx, nodeid, false)?;
        self.fs
            .fallocate(Ino(nodeid as u32), arg.mode as i32, arg.offset, arg.length)
            .map_err(to_errno)
    }

    fn release(&self, _ctx: &Context, _nodeid: u64, arg: &abi::ReleaseIn) -> Result<()> {
        self.handles.lock().expect("handles").remove(&arg.fh);
        Ok(())
    }

    fn statfs(&self, _ctx: &Context, _nodeid: u64) -> Result<abi::Kstatfs> {
        let s = self.fs.statfs();
        Ok(abi::Kstatfs {
            blocks: s.blocks,
            bfree: s.free_blocks,
            bavail: s.free_blocks,
            files: s.files,
            ffree: s.free_files,
            bsize: s.block_size,
            namelen: s.name_max,
            frsize: s.block_size,
            ..Default::default()
        })
    }

    fn setxattr(
        &self,
        ctx: &Context,
        nodeid: u64,
        name: &[u8],
        value: &[u8],
        arg: &abi::SetxattrIn,
    ) -> Result<()> {
        if name == USAGE_XATTR || name == CRTIME_XATTR {
            return Err(Errno(libc::EPERM));
        }
        if replaying() {
            return Ok(());
        }
        if name == acl::ACCESS_XATTR || name == acl::DEFAULT_XATTR {
            let kill_sgid = arg.setxattr_flags & abi::SETXATTR_ACL_KILL_SGID != 0;
            return self.set_acl(ctx, nodeid, name, Some(value), kill_sgid);
        }
        let f = XattrFlags {
            create: arg.flags & libc::XATTR_CREATE as u32 != 0,
            replace: arg.flags & libc::XATTR_REPLACE as u32 != 0,
        };
        self.fs
            .setxattr(Ino(nodeid as u32), name, value, f)
            .map_err(to_errno)
    }

    fn getxattr(&self, _ctx: &Context, nodeid: u64, name: &[u8]) -> Result<Vec<u8>> {
        let ino = Ino(nodeid as u32);
        if name == USAGE_XATTR {
            self.fs.getattr(ino).map_err(to_errno)?;
            let usage = self.usage.lock().expect("usage");
            Ok(usage
                .get(&nodeid)
                .copied()
                .unwrap_or(0)
                .to_string()
                .into_bytes())
        } else if name == CRTIME_XATTR {
            let a = self.fs.getattr(ino).map_err(to_errno)?;
            let t = a.crtime.ok_or_else(|| to_errno(FsError::NoAttr))?;
            Ok(crtime_value(t))
        } else {
            self.fs.getxattr(ino, name).map_err(to_errno)
        }
    }

    /// The stored names only: the virtual attributes (usage, creation time) can be read
    /// but not set, so listing them would make copying tools fail on them.
    fn listxattr(&self, _ctx: &Context, nodeid: u64) -> Result<Vec<u8>> {
        let names = self.fs.listxattr(Ino(nodeid as u32)).map_err(to_errno)?;
        let mut buf = Vec::new();
        for n in names {
            buf.extend_from_slice(&n);
            buf.push(0);
        }
        Ok(buf)
    }

    fn removexattr(&self, ctx: &Context, nodeid: u64, name: &[u8]) -> Result<()> {
        if name == CRTIME_XATTR || name == USAGE_XATTR {
            return Err(Errno(libc::EPERM));
        }
        if replaying() {
            return Ok(());
        }
        if name == acl::ACCESS_XATTR || name == acl::DEFAULT_XATTR {
            if self.stored_acl(nodeid, name)?.is_none() {
                return Err(to_errno(FsError::NoAttr));
            }
            return self.set_acl(ctx, nodeid, name, None, false);
        }
        self.fs
            .removexattr(Ino(nodeid as u32), name)
            .map_err(to_errno)
    }

    fn opendir(&self, _ctx: &Context, nodeid: u64, _arg: &abi::OpenIn) -> Result<Opened> {
        let ino = Ino(nodeid as u32);
        let a = self.fs.getattr(ino).map_err(to_errno)?;
        if a.mode & S_IFMT != S_IFDIR {
            return Err(Errno(libc::ENOTDIR));
        }
        // The listing is taken by the first read, at offset 0.
        let fh = self.add_handle(Handle::Dir {
            ino,
            entries: Arc::new(Vec::new()),
        });
        Ok(Opened { fh, open_flags: 0 })
    }

    fn readdir(
        &self,
        _ctx: &Context,
        nodeid: u64,
        arg: &abi::ReadIn,
        out: &mut DirBuf<'_>,
    ) -> Result<()> {
        let (h, offset, ino) = (arg.fh, arg.offset, Ino(nodeid as u32));
        let known = match self.handles.lock().expect("handles").get(&h) {
            Some(Handle::Dir { entries, .. }) => Some(entries.clone()),
            _ => None,
        };
        let entries = match known {
            // A read from the start (the first, or after rewinddir) lists the directory
            // as it is now; later reads continue that listing, so a stream read forwards
            // sees every name that exists throughout exactly once.
            Some(_) if offset == 0 => {
                let e = Arc::new(self.listing(ino)?);
                if let Some(Handle::Dir { entries, .. }) =
                    self.handles.lock().expect("handles").get_mut(&h)
                {
                    *entries = e.clone();
                }
                let _ = self.fs.note_access(ino, self.atime());
                e
            }
            Some(e) => e,
            // A handle given out before and not released (the kernel never uses a
            // released one) that this process does not know: a directory a crashed
            // predecessor opened. List it afresh under the same number (entries changed
            // meanwhile may be missed or repeated).
            None if h < self.next_handle.load(Ordering::Relaxed) => {
                let e = Arc::new(self.listing(ino)?);
                self.handles.lock().expect("handles").insert(
                    h,
                    Handle::Dir {
                        ino,
                        entries: e.clone(),
                    },
                );
                e
            }
            None => return Err(Errno(libc::EBADF)),
        };
        for (i, (name, child, dtype)) in entries.iter().enumerate().skip(offset as usize) {
            let (child, next, typ) = (child.0 as u64, i as u64 + 1, *dtype as u32);
            let added = if !out.is_plus() {
                out.add(child, next, typ, name)
            } else if i < 2 {
                // "." and "..": the kernel takes no reference on them.
                out.add_plus(None, child, next, typ, name)
            } else {
                // The kernel caches an entry's name and node as a lookup's, so attributes
                // go only with a name that still names the inode listed: the listing may
                // be older than the name's removal, and the inode number may be another
                // file's by now.
                match self.fs.lookup(ino, name) {
                    // The kernel takes a reference on the entry's node exactly when the
                    // entry fits: counted then.
                    Ok(a) if a.ino.0 as u64 == child => {
                        let e = entry_of(&a);
                        let fits = out.add_plus(Some(&e), child, next, typ, name);
                        if fits {
                            self.counted(a);
                        }
                        fits
                    }
                    // Removed (or replaced) since the listing was taken: listed without
                    // attributes.
                    _ => out.add_plus(None, child, next, typ, name),
                }
            };
            if !added {
                break;
            }
        }
        Ok(())
    }

    fn releasedir(&self, _ctx: &Context, _nodeid: u64, arg: &abi::ReleaseIn) -> Result<()> {
        self.handles.lock().expect("handles").remove(&arg.fh);
        Ok(())
    }

    fn fsyncdir(&self, _ctx: &Context, _nodeid: u64, _arg: &abi::FsyncIn) -> Result<()> {
        self.fs.sync().map_err(to_errno)
    }

    fn access(&self, _ctx: &Context, nodeid: u64, _mask: u32) -> Result<()> {
        // Permission checks are the kernel's (default_permissions); only existence here.
        self.fs
            .getattr(Ino(nodeid as u32))
            .map(|_| ())
            .map_err(to_errno)
    }

    fn syncfs(&self, _ctx: &Context) -> Result<()> {
        self.fs.sync().map_err(to_errno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crtime_text_is_seconds_a_dot_and_nine_digits() {
        let t = Timespec {
            sec: 1_700_000_000,
            nsec: 42,
        };
        assert_eq!(crtime_value(t), b"1700000000.000000042");
    }

    /// What the FUSE layer exports after opens, a listing and lookups passes the state
    /// check, and a successor rebuilt from it exports the same state.
    #[test]
    fn the_exported_state_passes_the_state_check() {
        use crate::persist::StateVersion;
        use fsd_core::mkfs::{mkfs, MkfsOptions};
        use fsd_core::store::{BlockStore, MemStore};
        let store = Arc::new(MemStore::new(4096));
        mkfs(store.as_ref(), "mem", &MkfsOptions::default()).unwrap();
        let fs = Arc::new(Fs::mount(store as Arc<dyn BlockStore>).unwrap());
        let m = MoltFuse::new(fs.clone());
        let ctx = Context {
            unique: 1,
            uid: 0,
            gid: 0,
            pid: std::process::id(),
        };
        let mkdir = abi::MkdirIn {
            mode: S_IFDIR | 0o755,
            umask: 0,
        };
        let d = m.mkdir(&ctx, 1, b"d", &mkdir).unwrap();
        let create = abi::CreateIn {
            flags: libc::O_RDWR as u32,
            mode: S_IFREG | 0o644,
            umask: 0o022,
            open_flags: 0,
        };
        let (f, fh) = m.create(&ctx, d.nodeid, b"f", &create).unwrap();
        let dh = m.opendir(&ctx, d.nodeid, &abi::OpenIn::default()).unwrap();
        let mut buf = Vec::new();
        let mut out = DirBuf::new_for_tests(&mut buf, 4096, false);
        let list = abi::ReadIn {
            fh: dh.fh,
            size: 4096,
            ..Default::default()
        };
        m.readdir(&ctx, d.nodeid, &list, &mut out).unwrap();
        assert_eq!(buf.len(), 3 * 32, ". .. f");
        let root = m.opendir(&ctx, 1, &abi::OpenIn::default()).unwrap();
        m.lookup(&ctx, d.nodeid, b"f").unwrap();
        m.forget(f.nodeid, 1);

        let mut st = m.export();
        st.withheld = fs.quiesce().unwrap();
        assert_eq!(st.handles.len(), 3);
        assert!(st.handles.contains_key(&fh.fh) && st.handles.contains_key(&root.fh));
        assert_eq!(st.lookups.get(&f.nodeid), Some(&1));
        let blob = crate::persist::export(&st, StateVersion::CURRENT).unwrap();
        let checked = crate::persist::check(&blob).unwrap();
        assert_eq!(checked, st);
        let again = MoltFuse::import(fs, &checked).export();
        assert_eq!(again.withheld, Vec::new());
        assert_eq!(
            again,
            crate::persist::FsdState {
                withheld: Vec::new(),
                ..st
            }
        );
    }
}
