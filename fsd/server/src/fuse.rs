//! The FUSE binding: the only module that speaks the FUSE protocol. It adapts
//! `fuse-backend-rs`'s `FileSystem` trait to the filesystem core and keeps what the kernel
//! holds: lookup counts per inode and open handles. Errors become errno values here and
//! nowhere else.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use formats::block::Ino;
use formats::dir::DT_DIR;
use formats::inode::{Timespec, S_IFDIR, S_IFMT, S_IFREG};
use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};

use formats::acl::{self, Acl, Caller};

use crate::persist::{self, FsdState};
use fsd_core::fs::{Atime, Attr, Fs, FsError, SetAttr, TimeSet, WriteMode, XattrFlags};

/// How long the kernel may cache attributes and names. Every change made through this
/// mount passes through the kernel, which updates or invalidates its caches itself.
const TTL: Duration = Duration::from_secs(1);
const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_IXGRP: u32 = 0o0010;
/// `write_flags` bit: the writer lacks CAP_FSETID, so the write must drop set-id bits
/// (FUSE_WRITE_KILL_SUIDGID, with HANDLE_KILLPRIV_V2).
const WRITE_KILL_SUIDGID: u32 = 1 << 2;
/// `open_flags` bit of OPEN and CREATE: an O_TRUNC open by a caller without CAP_FSETID
/// (FUSE_OPEN_KILL_SUIDGID).
const OPEN_KILL_SUIDGID: u32 = 1 << 0;

/// The INIT flags Molt asks for. Frozen across versions: a server that adopts a live
/// connection must assume exactly what its predecessor negotiated.
///
/// HANDLE_KILLPRIV_V2: the kernel tells, per write, truncate and chown, whether the
/// caller lacks CAP_FSETID, and the server drops set-id bits by the kernel's rules (v1
/// left the server no way to know the caller's privilege). POSIX_ACL: the kernel
/// enforces ACLs (with default_permissions) and leaves the umask to the server, which
/// applies default ACLs instead when the parent has one; DONT_MASK hands it the umask.
pub(crate) fn wanted_init_flags() -> FsOptions {
    FsOptions::ASYNC_READ
        | FsOptions::BIG_WRITES
        | FsOptions::WRITEBACK_CACHE
        | FsOptions::MAX_PAGES
        | FsOptions::PARALLEL_DIROPS
        | FsOptions::HANDLE_KILLPRIV_V2
        | FsOptions::CACHE_SYMLINKS
        | FsOptions::EXPORT_SUPPORT
        | FsOptions::ASYNC_DIO
        | FsOptions::POSIX_ACL
        | FsOptions::DONT_MASK
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
    crate::credentials::of_request(ctx.pid as u32, ctx.uid, ctx.gid)
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn to_io(e: FsError) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

fn cname(name: &CStr) -> &[u8] {
    name.to_bytes()
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
fn die_after_completing(name: &CStr) {
    static TARGET: std::sync::OnceLock<Option<Vec<u8>>> = std::sync::OnceLock::new();
    let target = TARGET.get_or_init(|| {
        std::env::var_os("MOLT_FAULT_DIE_AFTER")
            .map(|v| std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str()).to_vec())
    });
    if target.as_deref() == Some(cname(name)) {
        eprintln!("fsd serve: fault injection: dying before replying for {name:?}");
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
    /// The INIT flags in force on the connection.
    negotiated: AtomicU64,
    /// The connection, for notifications to the kernel (absent in tests).
    notifier: std::sync::OnceLock<std::fs::File>,
}

/// Handle numbers a server recovered after its `n`-th crash gives out start at
/// `(n + 1) << RECOVERY_HANDLE_SHIFT`, above any a predecessor can have reached.
const RECOVERY_HANDLE_SHIFT: u32 = 44;

/// The virtual, read-only extended attribute holding a file's usage counter.
pub(crate) const USAGE_XATTR: &[u8] = b"user.molt.usage";
/// The virtual, read-only extended attribute holding an inode's creation time (format v2
/// and later) as decimal `SEC.NSEC`; absent on inodes without one. (Not `statx` btime:
/// the FUSE binding speaks protocol 7.33, and `FUSE_STATX` arrived in 7.39.)
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

/// The open flags of every file. O_DIRECT opens take the kernel's own direct-I/O path
/// (not FOPEN_DIRECT_IO, which would refuse a shared mmap of the file with ENODEV): the
/// kernel sends their reads and writes straight to the server all the same, after writing
/// back any cached pages of the range.
fn open_options() -> OpenOptions {
    OpenOptions::empty()
}

fn stat_of(a: &Attr) -> stat64 {
    let mut st: stat64 = molt_sys::zeroed_stat64();
    st.st_ino = a.ino.0 as u64;
    st.st_mode = a.mode;
    st.st_nlink = a.nlink as _;
    st.st_uid = a.uid;
    st.st_gid = a.gid;
    st.st_rdev = a.rdev as _;
    st.st_size = a.size as i64;
    st.st_blksize = 4096;
    st.st_blocks = a.blocks as i64;
    st.st_atime = a.atime.sec;
    st.st_atime_nsec = a.atime.nsec as i64;
    st.st_mtime = a.mtime.sec;
    st.st_mtime_nsec = a.mtime.nsec as i64;
    st.st_ctime = a.ctime.sec;
    st.st_ctime_nsec = a.ctime.nsec as i64;
    st
}

fn entry_of(a: &Attr) -> Entry {
    Entry {
        inode: a.ino.0 as u64,
        generation: a.generation as u64,
        attr: stat_of(a),
        attr_flags: 0,
        attr_timeout: TTL,
        entry_timeout: TTL,
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
            negotiated: AtomicU64::new(wanted_init_flags().bits()),
            notifier: std::sync::OnceLock::new(),
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
    fn replayed_entry(&self, parent: u64, name: &CStr) -> Option<Entry> {
        if !replaying() {
            return None;
        }
        let a = self.fs.lookup(Ino(parent as u32), cname(name)).ok()?;
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
            negotiated: AtomicU64::new(wanted_init_flags().bits()),
            notifier: std::sync::OnceLock::new(),
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
            init_flags: wanted_init_flags().bits(),
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

    pub fn fs(&self) -> &Arc<Fs> {
        &self.fs
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
    fn listing(&self, ino: Ino) -> io::Result<Vec<(Vec<u8>, Ino, u8)>> {
        let list = self.fs.readdir(ino).map_err(to_io)?;
        let parent = self.fs.parent_of(ino).map_err(to_io)?;
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
    fn new_inode(&self, ctx: &Context, parent: u64, mode: u32, umask: u32) -> io::Result<NewInode> {
        let p = self.fs.getattr(Ino(parent as u32)).map_err(to_io)?;
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

    /// Whether the connection negotiated POSIX ACLs (the kernel then enforces them).
    fn acls_enabled(&self) -> bool {
        FsOptions::from_bits_truncate(self.negotiated.load(Ordering::Relaxed))
            .contains(FsOptions::POSIX_ACL)
    }

    /// The ACL stored under `name` on `ino`, if any.
    fn stored_acl(&self, ino: u64, name: &[u8]) -> io::Result<Option<Acl>> {
        match self.fs.getxattr(Ino(ino as u32), name) {
            Ok(v) => Acl::decode(&v).map(Some).map_err(|_| {
                to_io(FsError::Corrupted(format!(
                    "inode {ino} holds a malformed ACL"
                )))
            }),
            Err(FsError::NoAttr) => Ok(None),
            Err(e) => Err(to_io(e)),
        }
    }

    /// Gives the server the connection to send notifications on.
    pub(crate) fn set_notifier(&self, fuse: std::fs::File) {
        let _ = self.notifier.set(fuse);
    }

    /// Tells the kernel that the attributes it caches for `ino` are stale
    /// (FUSE_NOTIFY_INVAL_INODE with a negative offset: attributes only, no data). For
    /// a change made while serving a request whose reply carries no attributes.
    fn invalidate_attributes(&self, ino: u64) {
        use std::io::Write;
        const NOTIFY_INVAL_INODE: i32 = 2;
        let Some(fuse) = self.notifier.get() else {
            return;
        };
        // fuse_out_header (len, error = notify code, unique 0), then
        // fuse_notify_inval_inode_out (ino, off, len).
        let mut msg = [0u8; 40];
        msg[0..4].copy_from_slice(&40u32.to_le_bytes());
        msg[4..8].copy_from_slice(&NOTIFY_INVAL_INODE.to_le_bytes());
        msg[16..24].copy_from_slice(&ino.to_le_bytes());
        msg[24..32].copy_from_slice(&(-1i64).to_le_bytes());
        // A lost notification leaves the kernel's copy stale for at most the TTL.
        let _ = (&*fuse).write_all(&msg);
    }

    /// Drops the set-id bits a data change by `ctx` must drop (see `suidgid_to_drop`);
    /// `kernel_found_unprivileged` when the kernel said the caller lacks CAP_FSETID.
    /// Reads the caller's groups and capabilities only when the file has a set-id bit.
    fn drop_suidgid(
        &self,
        ctx: &Context,
        ino: u64,
        kernel_found_unprivileged: bool,
    ) -> io::Result<()> {
        let a = self.fs.getattr(Ino(ino as u32)).map_err(to_io)?;
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
                .map_err(to_io)?;
            self.invalidate_attributes(ino);
        }
        Ok(())
    }

    /// Makes a new inode of any type but directory and symlink (`mode` carries the type).
    fn make_node(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Attr> {
        let n = self.new_inode(ctx, parent, mode, umask)?;
        let xattrs = n.xattr_refs();
        self.fs
            .mknod_with(
                Ino(parent as u32),
                cname(name),
                n.mode,
                rdev,
                (n.uid, n.gid),
                &xattrs,
            )
            .map_err(to_io)
    }

    /// CREATE of a name that another process created since the kernel looked it up: opens
    /// that file as open(2) without O_EXCL would. The kernel takes a CREATE's file as new
    /// and checks no permission and truncates nothing, so both are done here.
    fn open_created_meanwhile(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: &CreateIn,
    ) -> io::Result<Attr> {
        let a = self
            .fs
            .lookup(Ino(parent as u32), cname(name))
            .map_err(to_io)?;
        match a.mode & S_IFMT {
            S_IFREG => {}
            S_IFDIR => return Err(errno(libc::EISDIR)),
            // A FIFO, device or symlink cannot be opened through CREATE's reply.
            _ => return Err(errno(libc::EEXIST)),
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
            return Err(errno(libc::EACCES));
        }
        if trunc {
            let drop = suidgid_to_drop(a.mode, a.gid, &caller);
            let s = SetAttr {
                size: Some(0),
                mode: (drop != 0).then_some(a.mode & 0o7777 & !drop),
                ..Default::default()
            };
            return self.fs.setattr(a.ino, s).map_err(to_io);
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
    ) -> io::Result<()> {
        if !self.acls_enabled() {
            return Err(errno(libc::EOPNOTSUPP));
        }
        let a = self.fs.getattr(Ino(ino as u32)).map_err(to_io)?;
        let parsed = match value {
            Some(v) => Acl::decode_for_setxattr(v).map_err(|_| errno(libc::EINVAL))?,
            None => None,
        };
        let is_access = name == acl::ACCESS_XATTR;
        if !is_access && a.mode & S_IFMT != S_IFDIR && parsed.is_some() {
            return Err(errno(libc::EACCES));
        }
        let mut attrs = SetAttr::default();
        let stored = match (&parsed, is_access) {
            (Some(acl), true) => {
                let (mode, keep) = acl::update_mode(acl, a.mode);
                let mut mode = mode & 0o7777;
                let caller = caller_of(ctx);
                if !(caller.in_group(a.gid) || caller.cap_fsetid) {
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
            .map_err(to_io)
    }

    /// The access ACL of `ino` after its mode became `mode` (chmod): `posix_acl_chmod`.
    fn acl_after_chmod(&self, ino: u64, mode: u32) -> io::Result<Option<Vec<u8>>> {
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

impl FileSystem for MoltFuse {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let enabled = capable & wanted_init_flags();
        self.negotiated.store(enabled.bits(), Ordering::Relaxed);
        Ok(enabled)
    }

    fn destroy(&self) {}

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let ino = Ino(parent as u32);
        let a = match cname(name) {
            // Lookups by inode number: how the kernel turns a file handle (NFS export,
            // open_by_handle_at) back into an inode. The kernel compares the generation.
            b"." => self.fs.getattr_by_handle(ino),
            b".." => self
                .fs
                .parent_of(ino)
                .and_then(|p| self.fs.getattr_by_handle(p)),
            other => self.fs.lookup(ino, other),
        }
        .map_err(to_io)?;
        Ok(self.counted(a))
    }

    fn forget(&self, _ctx: &Context, inode: u64, count: u64) {
        self.forget_one(inode, count)
    }

    fn batch_forget(&self, _ctx: &Context, requests: Vec<(u64, u64)>) {
        for (ino, n) in requests {
            self.forget_one(ino, n);
        }
    }

    fn getattr(
        &self,
        _ctx: &Context,
        inode: u64,
        _h: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        let a = self.fs.getattr(Ino(inode as u32)).map_err(to_io)?;
        Ok((stat_of(&a), TTL))
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        _h: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let ino = Ino(inode as u32);
        let time = |now: bool, sec: i64, nsec: i64| {
            if now {
                TimeSet::Now
            } else {
                TimeSet::At(Timespec {
                    sec,
                    nsec: nsec as u32,
                })
            }
        };
        for (set, nsec) in [
            (
                valid.contains(SetattrValid::ATIME) && !valid.contains(SetattrValid::ATIME_NOW),
                attr.st_atime_nsec,
            ),
            (
                valid.contains(SetattrValid::MTIME) && !valid.contains(SetattrValid::MTIME_NOW),
                attr.st_mtime_nsec,
            ),
            (valid.contains(SetattrValid::CTIME), attr.st_ctime_nsec),
        ] {
            if set && !(0..1_000_000_000).contains(&nsec) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
        }
        let mut s = SetAttr::default();
        if valid.contains(SetattrValid::MODE) {
            s.mode = Some(attr.st_mode);
        }
        if valid.contains(SetattrValid::UID) {
            s.uid = Some(attr.st_uid);
        }
        if valid.contains(SetattrValid::GID) {
            s.gid = Some(attr.st_gid);
        }
        if valid.contains(SetattrValid::SIZE) {
            s.size = Some(attr.st_size as u64);
        }
        if valid.contains(SetattrValid::ATIME) {
            s.atime = Some(time(
                valid.contains(SetattrValid::ATIME_NOW),
                attr.st_atime,
                attr.st_atime_nsec,
            ));
        }
        if valid.contains(SetattrValid::MTIME) {
            s.mtime = Some(time(
                valid.contains(SetattrValid::MTIME_NOW),
                attr.st_mtime,
                attr.st_mtime_nsec,
            ));
        }
        if valid.contains(SetattrValid::CTIME) {
            s.ctime = Some(Timespec {
                sec: attr.st_ctime,
                nsec: attr.st_ctime_nsec as u32,
            });
        }
        let chown = s.uid.is_some() || s.gid.is_some();
        let cur = self.fs.getattr(ino).map_err(to_io)?;
        if valid.contains(SetattrValid::KILL_SUIDGID) && cur.mode & (S_ISUID | S_ISGID) != 0 {
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
            Some(mode) if valid.contains(SetattrValid::MODE) => self
                .acl_after_chmod(inode, mode)?
                .map(|v| (acl::ACCESS_XATTR, v)),
            _ => None,
        };
        let a = self
            .fs
            .setattr_with_xattr(ino, s, acl.as_ref().map(|(n, v)| (*n, Some(v.as_slice()))))
            .map_err(to_io)?;
        Ok((stat_of(&a), TTL))
    }

    fn readlink(&self, _ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.fs.readlink(Ino(inode as u32)).map_err(to_io)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        if let Some(e) = self.replayed_entry(parent, name) {
            return Ok(e);
        }
        let n = self.new_inode(ctx, parent, formats::inode::S_IFLNK | 0o777, 0)?;
        let a = self
            .fs
            .symlink(
                Ino(parent as u32),
                cname(name),
                cname(linkname),
                n.uid,
                n.gid,
            )
            .map_err(to_io)?;
        Ok(self.counted(a))
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        if let Some(e) = self.replayed_entry(parent, name) {
            return Ok(e);
        }
        let a = self.make_node(ctx, parent, name, mode, rdev, umask)?;
        Ok(self.counted(a))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        if let Some(e) = self.replayed_entry(parent, name) {
            return Ok(e);
        }
        let n = self.new_inode(ctx, parent, (mode & 0o7777) | S_IFDIR, umask)?;
        let xattrs = n.xattr_refs();
        let a = self
            .fs
            .mkdir_with(
                Ino(parent as u32),
                cname(name),
                n.mode & 0o7777,
                (n.uid, n.gid),
                &xattrs,
            )
            .map_err(to_io)?;
        die_after_completing(name);
        Ok(self.counted(a))
    }

    fn unlink(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        if replaying() {
            return Ok(());
        }
        self.fs
            .unlink(Ino(parent as u32), cname(name))
            .map_err(to_io)?;
        die_after_completing(name);
        Ok(())
    }

    fn rmdir(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        if replaying() {
            return Ok(());
        }
        self.fs
            .rmdir(Ino(parent as u32), cname(name))
            .map(|_| ())
            .map_err(to_io)
    }

    fn rename(
        &self,
        _ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if replaying() {
            return Ok(());
        }
        self.fs
            .rename(
                Ino(olddir as u32),
                cname(oldname),
                Ino(newdir as u32),
                cname(newname),
                noreplace,
                exchange,
            )
            .map_err(to_io)?;
        die_after_completing(oldname);
        Ok(())
    }

    fn link(
        &self,
        _ctx: &Context,
        inode: u64,
        newparent: u64,
        newname: &CStr,
    ) -> io::Result<Entry> {
        if let Some(e) = self.replayed_entry(newparent, newname) {
            return Ok(e);
        }
        let a = self
            .fs
            .link(Ino(inode as u32), Ino(newparent as u32), cname(newname))
            .map_err(to_io)?;
        Ok(self.counted(a))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let a = self.fs.getattr(Ino(inode as u32)).map_err(to_io)?;
        if a.mode & S_IFMT == S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        // Only with ATOMIC_O_TRUNC does an open carry O_TRUNC; without it (Molt's
        // choice) the kernel truncates with a SETATTR of its own.
        if flags & libc::O_TRUNC as u32 != 0 && fuse_flags & OPEN_KILL_SUIDGID != 0 {
            self.drop_suidgid(ctx, inode, true)?;
        }
        let h = self.add_handle(Handle::File {
            ino: Ino(inode as u32),
            flags,
            touched: false,
            reads: 0,
            writes: 0,
        });
        if !cfg!(feature = "usage-on-touch") {
            self.count_usage(inode);
        }
        let opts = open_options();
        Ok((Some(h), opts, None))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let mode = if args.mode & S_IFMT == 0 {
            args.mode | S_IFREG
        } else {
            args.mode
        };
        let replayed = replaying()
            .then(|| self.fs.lookup(Ino(parent as u32), cname(name)).ok())
            .flatten();
        let a = match replayed {
            Some(a) => a,
            None => match self.make_node(ctx, parent, name, mode, 0, args.umask) {
                Ok(a) => a,
                Err(e)
                    if e.raw_os_error() == Some(libc::EEXIST)
                        && args.flags & libc::O_EXCL as u32 == 0 =>
                {
                    self.open_created_meanwhile(ctx, parent, name, &args)?
                }
                Err(e) => return Err(e),
            },
        };
        let h = self.add_handle(Handle::File {
            ino: a.ino,
            flags: args.flags,
            touched: false,
            reads: 0,
            writes: 0,
        });
        if !cfg!(feature = "usage-on-touch") {
            self.count_usage(a.ino.0 as u64);
        }
        let opts = open_options();
        Ok((self.counted(a), Some(h), opts, None))
    }

    fn read(
        &self,
        _ctx: &Context,
        inode: u64,
        _h: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        self.touch(_h, false);
        let data = self
            .fs
            .read_with(Ino(inode as u32), offset, size, self.atime())
            .map_err(to_io)?;
        w.write_all(&data)?;
        Ok(data.len())
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        _h: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        _lock: Option<u64>,
        delayed: bool,
        _flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.touch(_h, true);
        let mut data = vec![0u8; size as usize];
        r.read_exact(&mut data)?;
        if fuse_flags & WRITE_KILL_SUIDGID != 0 {
            self.drop_suidgid(ctx, inode, true)?;
        }
        // A write-back of cached pages (delayed): the kernel stamped the times when the
        // program wrote and sends them itself; stamping now would move mtime after the
        // fact. Its pages cannot be written in part either.
        let how = WriteMode {
            stamp_times: !delayed,
            whole: delayed,
        };
        self.fs
            .write_with(Ino(inode as u32), offset, &data, how)
            .map_err(to_io)
    }

    fn flush(&self, _ctx: &Context, _inode: u64, _h: u64, _lock_owner: u64) -> io::Result<()> {
        Ok(())
    }

    fn fsync(&self, _ctx: &Context, inode: u64, _datasync: bool, _h: u64) -> io::Result<()> {
        self.fs.fsync(Ino(inode as u32)).map_err(to_io)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        _h: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        // The kernel passes fallocate on without dropping set-id bits or saying whether
        // the caller may keep them, so the caller's own capabilities decide (as
        // `file_modified` does on a local filesystem).
        self.drop_suidgid(ctx, inode, false)?;
        self.fs
            .fallocate(Ino(inode as u32), mode as i32, offset, length)
            .map_err(to_io)
    }

    fn release(
        &self,
        _ctx: &Context,
        _inode: u64,
        _flags: u32,
        h: u64,
        _flush: bool,
        _flock: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.handles.lock().expect("handles").remove(&h);
        Ok(())
    }

    fn statfs(&self, _ctx: &Context, _inode: u64) -> io::Result<statvfs64> {
        let s = self.fs.statfs();
        let mut st: statvfs64 = molt_sys::zeroed_statvfs64();
        st.f_bsize = s.block_size as _;
        st.f_frsize = s.block_size as _;
        st.f_blocks = s.blocks;
        st.f_bfree = s.free_blocks;
        st.f_bavail = s.free_blocks;
        st.f_files = s.files;
        st.f_ffree = s.free_files;
        st.f_favail = s.free_files;
        st.f_namemax = s.name_max as _;
        Ok(st)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        if cname(name) == USAGE_XATTR || cname(name) == CRTIME_XATTR {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        if replaying() {
            return Ok(());
        }
        if cname(name) == acl::ACCESS_XATTR || cname(name) == acl::DEFAULT_XATTR {
            return self.set_acl(ctx, inode, cname(name), Some(value));
        }
        let f = XattrFlags {
            create: flags & libc::XATTR_CREATE as u32 != 0,
            replace: flags & libc::XATTR_REPLACE as u32 != 0,
        };
        self.fs
            .setxattr(Ino(inode as u32), cname(name), value, f)
            .map_err(to_io)
    }

    fn getxattr(
        &self,
        _ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let v = if cname(name) == USAGE_XATTR {
            self.fs.getattr(Ino(inode as u32)).map_err(to_io)?;
            let n = self
                .usage
                .lock()
                .expect("usage")
                .get(&inode)
                .copied()
                .unwrap_or(0);
            n.to_string().into_bytes()
        } else if cname(name) == CRTIME_XATTR {
            let a = self.fs.getattr(Ino(inode as u32)).map_err(to_io)?;
            let t = a.crtime.ok_or_else(|| to_io(FsError::NoAttr))?;
            crtime_value(t)
        } else {
            self.fs
                .getxattr(Ino(inode as u32), cname(name))
                .map_err(to_io)?
        };
        if size == 0 {
            Ok(GetxattrReply::Count(v.len() as u32))
        } else if v.len() > size as usize {
            Err(io::Error::from_raw_os_error(libc::ERANGE))
        } else {
            Ok(GetxattrReply::Value(v))
        }
    }

    fn listxattr(&self, _ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        let ino = Ino(inode as u32);
        let mut names = self.fs.listxattr(ino).map_err(to_io)?;
        if self.fs.getattr(ino).map_err(to_io)?.crtime.is_some() {
            names.push(CRTIME_XATTR.to_vec());
        }
        let mut buf = Vec::new();
        for n in names {
            buf.extend_from_slice(&n);
            buf.push(0);
        }
        if size == 0 {
            Ok(ListxattrReply::Count(buf.len() as u32))
        } else if buf.len() > size as usize {
            Err(io::Error::from_raw_os_error(libc::ERANGE))
        } else {
            Ok(ListxattrReply::Names(buf))
        }
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        if cname(name) == CRTIME_XATTR {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        if replaying() {
            return Ok(());
        }
        if cname(name) == acl::ACCESS_XATTR || cname(name) == acl::DEFAULT_XATTR {
            if self.stored_acl(inode, cname(name))?.is_none() {
                return Err(to_io(FsError::NoAttr));
            }
            return self.set_acl(ctx, inode, cname(name), None);
        }
        self.fs
            .removexattr(Ino(inode as u32), cname(name))
            .map_err(to_io)
    }

    fn opendir(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let ino = Ino(inode as u32);
        let a = self.fs.getattr(ino).map_err(to_io)?;
        if a.mode & S_IFMT != S_IFDIR {
            return Err(errno(libc::ENOTDIR));
        }
        // The listing is taken by the first read, at offset 0.
        let h = self.add_handle(Handle::Dir {
            ino,
            entries: Arc::new(Vec::new()),
        });
        Ok((Some(h), OpenOptions::empty()))
    }

    fn readdir(
        &self,
        _ctx: &Context,
        _inode: u64,
        h: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let known = match self.handles.lock().expect("handles").get(&h) {
            Some(Handle::Dir { entries, .. }) => Some(entries.clone()),
            _ => None,
        };
        let entries = match known {
            // A read from the start (the first, or after rewinddir) lists the directory
            // as it is now; later reads continue that listing, so a stream read forwards
            // sees every name that exists throughout exactly once.
            Some(_) if offset == 0 => {
                let ino = Ino(_inode as u32);
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
                let e = Arc::new(self.listing(Ino(_inode as u32))?);
                self.handles.lock().expect("handles").insert(
                    h,
                    Handle::Dir {
                        ino: Ino(_inode as u32),
                        entries: e.clone(),
                    },
                );
                e
            }
            None => return Err(io::Error::from_raw_os_error(libc::EBADF)),
        };
        for (i, (name, ino, dtype)) in entries.iter().enumerate().skip(offset as usize) {
            let n = add_entry(DirEntry {
                ino: ino.0 as u64,
                offset: i as u64 + 1,
                type_: *dtype as u32,
                name,
            })?;
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    fn releasedir(&self, _ctx: &Context, _inode: u64, _flags: u32, h: u64) -> io::Result<()> {
        self.handles.lock().expect("handles").remove(&h);
        Ok(())
    }

    fn fsyncdir(&self, _ctx: &Context, _inode: u64, _datasync: bool, _h: u64) -> io::Result<()> {
        self.fs.sync().map_err(to_io)
    }

    fn access(&self, _ctx: &Context, inode: u64, _mask: u32) -> io::Result<()> {
        // Permission checks are the kernel's (default_permissions); only existence here.
        self.fs
            .getattr(Ino(inode as u32))
            .map(|_| ())
            .map_err(to_io)
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
            uid: 0,
            gid: 0,
            pid: std::process::id() as libc::pid_t,
        };
        let name = |s: &str| std::ffi::CString::new(s).unwrap();
        let d = m.mkdir(&ctx, 1, &name("d"), S_IFDIR | 0o755, 0).unwrap();
        let create = CreateIn {
            flags: libc::O_RDWR as u32,
            mode: S_IFREG | 0o644,
            umask: 0o022,
            fuse_flags: 0,
        };
        let (f, fh, ..) = m.create(&ctx, d.inode, &name("f"), create).unwrap();
        let (dh, _) = m.opendir(&ctx, d.inode, 0).unwrap();
        let mut listed = 0;
        m.readdir(&ctx, d.inode, dh.unwrap(), 4096, 0, &mut |_| {
            listed += 1;
            Ok(1)
        })
        .unwrap();
        assert_eq!(listed, 3, ". .. f");
        let (root, _) = m.opendir(&ctx, 1, 0).unwrap();
        m.lookup(&ctx, d.inode, &name("f")).unwrap();
        m.forget(&ctx, f.inode, 1);

        let mut st = m.export();
        st.withheld = fs.quiesce().unwrap();
        assert_eq!(st.handles.len(), 3);
        assert!(st.handles.contains_key(&fh.unwrap()) && st.handles.contains_key(&root.unwrap()));
        assert_eq!(st.lookups.get(&f.inode), Some(&1));
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
