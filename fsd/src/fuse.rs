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

use crate::fs::{Attr, Fs, FsError, SetAttr, TimeSet, XattrFlags};
use crate::persist::{FsdStateV1, HandleV1};

/// How long the kernel may cache attributes and names. Every change made through this
/// mount passes through the kernel, which updates or invalidates its caches itself.
const TTL: Duration = Duration::from_secs(1);
const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_IXGRP: u32 = 0o0010;
/// `fuse_flags` bit of a write that must clear set-id bits (HANDLE_KILLPRIV).
const WRITE_KILL_PRIV: u32 = 4;

/// The INIT flags Molt asks for. Frozen across versions: a server that adopts a live
/// connection must assume exactly what its predecessor negotiated.
pub fn wanted_init_flags() -> FsOptions {
    FsOptions::ASYNC_READ
        | FsOptions::BIG_WRITES
        | FsOptions::WRITEBACK_CACHE
        | FsOptions::MAX_PAGES
        | FsOptions::PARALLEL_DIROPS
        | FsOptions::HANDLE_KILLPRIV
        | FsOptions::CACHE_SYMLINKS
        | FsOptions::EXPORT_SUPPORT
        | FsOptions::ASYNC_DIO
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
pub fn set_replay(on: bool) {
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
        // SAFETY: kill(2) of this very process; no memory is involved.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
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
}

/// Handle numbers a server recovered after its `n`-th crash gives out start at
/// `(n + 1) << RECOVERY_HANDLE_SHIFT`, above any a predecessor can have reached.
const RECOVERY_HANDLE_SHIFT: u32 = 44;

/// The virtual, read-only extended attribute holding a file's usage counter.
pub const USAGE_XATTR: &[u8] = b"user.molt.usage";
/// The virtual, read-only extended attribute holding an inode's creation time (format v2
/// and later) as decimal `SEC.NSEC`; absent on inodes without one. (Not `statx` btime:
/// the FUSE binding speaks protocol 7.33, and `FUSE_STATX` arrived in 7.39.)
pub const CRTIME_XATTR: &[u8] = b"user.molt.crtime";

/// The value of `CRTIME_XATTR`: seconds, a dot, nanoseconds as nine digits.
pub fn crtime_value(t: Timespec) -> Vec<u8> {
    format!("{}.{:09}", t.sec, t.nsec).into_bytes()
}

fn stat_of(a: &Attr) -> stat64 {
    // SAFETY: stat64 is a plain C struct of integers; all-zero is a valid value.
    let mut st: stat64 = unsafe { std::mem::zeroed() };
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
    pub fn completed_before(&self, unique: u64) -> bool {
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
    pub fn import(fs: Arc<Fs>, state: &FsdStateV1) -> MoltFuse {
        let handles = state
            .handles
            .iter()
            .map(|(id, h)| {
                let h = match h {
                    HandleV1::File {
                        ino,
                        flags,
                        touched,
                        reads,
                        writes,
                    } => Handle::File {
                        ino: Ino(*ino as u32),
                        flags: *flags,
                        touched: *touched,
                        reads: *reads,
                        writes: *writes,
                    },
                    HandleV1::Dir { ino, entries } => Handle::Dir {
                        ino: Ino(*ino as u32),
                        entries: Arc::new(
                            entries
                                .iter()
                                .map(|(n, i, t)| (n.clone(), Ino(*i as u32), *t))
                                .collect(),
                        ),
                    },
                };
                (*id, h)
            })
            .collect();
        MoltFuse {
            fs,
            lookups: Mutex::new(state.lookups.iter().copied().collect()),
            handles: Mutex::new(handles),
            next_handle: AtomicU64::new(state.next_handle),
            usage: Mutex::new(state.usage.iter().copied().collect()),
            requests: AtomicU64::new(state.requests),
            completed: Default::default(),
        }
    }

    /// The state a successor needs. Call only when no request is being served.
    pub fn export(&self) -> FsdStateV1 {
        let mut lookups: Vec<(u64, u64)> = self
            .lookups
            .lock()
            .expect("lookups")
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        lookups.sort_unstable();
        let mut handles: Vec<(u64, HandleV1)> = self
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
                    } => HandleV1::File {
                        ino: ino.0 as u64,
                        flags: *flags,
                        touched: *touched,
                        reads: *reads,
                        writes: *writes,
                    },
                    Handle::Dir { ino, entries } => HandleV1::Dir {
                        ino: ino.0 as u64,
                        entries: entries
                            .iter()
                            .map(|(n, i, t)| (n.clone(), i.0 as u64, *t))
                            .collect(),
                    },
                };
                (*id, h)
            })
            .collect();
        handles.sort_by_key(|(id, _)| *id);
        let mut usage: Vec<(u64, u64)> = self
            .usage
            .lock()
            .expect("usage")
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        usage.sort_unstable();
        FsdStateV1 {
            version: crate::persist::component_version(),
            init_flags: wanted_init_flags().bits(),
            lookups,
            handles,
            next_handle: self.next_handle.load(Ordering::SeqCst),
            usage,
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

    /// Owner of a new inode: the caller, with the group of a set-group-ID directory.
    fn new_owner(&self, ctx: &Context, parent: u64, mode: u32) -> io::Result<(u32, u32, u32)> {
        let p = self.fs.getattr(Ino(parent as u32)).map_err(to_io)?;
        if p.mode & S_ISGID != 0 {
            let mode = if mode & S_IFMT == S_IFDIR {
                mode | S_ISGID
            } else {
                mode
            };
            Ok((ctx.uid, p.gid, mode))
        } else {
            Ok((ctx.uid, ctx.gid, mode))
        }
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

    /// Clears set-user-ID, and set-group-ID when group-executable, as a write or an
    /// ownership change must.
    fn kill_priv(&self, ino: u64) -> io::Result<()> {
        let a = self.fs.getattr(Ino(ino as u32)).map_err(to_io)?;
        let mut mode = a.mode & 0o7777;
        let before = mode;
        mode &= !S_ISUID;
        if mode & S_IXGRP != 0 {
            mode &= !S_ISGID;
        }
        if mode != before {
            self.fs
                .setattr(
                    Ino(ino as u32),
                    SetAttr {
                        mode: Some(mode),
                        ..Default::default()
                    },
                )
                .map_err(to_io)?;
        }
        Ok(())
    }

    /// Lookup counts held by the kernel (for state transfer and checks).
    pub fn lookup_counts(&self) -> HashMap<u64, u64> {
        self.lookups.lock().expect("lookups").clone()
    }

    pub fn open_handles(&self) -> HashMap<u64, Handle> {
        self.handles.lock().expect("handles").clone()
    }
}

impl FileSystem for MoltFuse {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        Ok(capable & wanted_init_flags())
    }

    fn destroy(&self) {}

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let a = self
            .fs
            .lookup(Ino(parent as u32), cname(name))
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
        _ctx: &Context,
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
        let kill = valid.contains(SetattrValid::KILL_SUIDGID) || (chown && s.mode.is_none());
        if kill && s.mode.is_none() {
            let cur = self.fs.getattr(ino).map_err(to_io)?;
            if cur.mode & S_IFMT != S_IFDIR {
                let mut mode = cur.mode & 0o7777 & !S_ISUID;
                if mode & S_IXGRP != 0 {
                    mode &= !S_ISGID;
                }
                if mode != cur.mode & 0o7777 {
                    s.mode = Some(mode);
                }
            }
        }
        let a = self.fs.setattr(ino, s).map_err(to_io)?;
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
        let (uid, gid, _) = self.new_owner(ctx, parent, 0)?;
        let a = self
            .fs
            .symlink(Ino(parent as u32), cname(name), cname(linkname), uid, gid)
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
        _umask: u32,
    ) -> io::Result<Entry> {
        if let Some(e) = self.replayed_entry(parent, name) {
            return Ok(e);
        }
        let (uid, gid, mode) = self.new_owner(ctx, parent, mode)?;
        let a = self
            .fs
            .mknod(Ino(parent as u32), cname(name), mode, rdev, uid, gid)
            .map_err(to_io)?;
        Ok(self.counted(a))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        _umask: u32,
    ) -> io::Result<Entry> {
        if let Some(e) = self.replayed_entry(parent, name) {
            return Ok(e);
        }
        let (uid, gid, mode) = self.new_owner(ctx, parent, mode | S_IFDIR)?;
        let a = self
            .fs
            .mkdir(Ino(parent as u32), cname(name), mode & 0o7777, uid, gid)
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
        _ctx: &Context,
        inode: u64,
        flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let a = self.fs.getattr(Ino(inode as u32)).map_err(to_io)?;
        if a.mode & S_IFMT == S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
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
        let mut opts = OpenOptions::empty();
        if flags & libc::O_DIRECT as u32 != 0 {
            opts |= OpenOptions::DIRECT_IO;
        }
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
            None => {
                let (uid, gid, mode) = self.new_owner(ctx, parent, mode)?;
                self.fs
                    .mknod(Ino(parent as u32), cname(name), mode, 0, uid, gid)
                    .map_err(to_io)?
            }
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
        let mut opts = OpenOptions::empty();
        if args.flags & libc::O_DIRECT as u32 != 0 {
            opts |= OpenOptions::DIRECT_IO;
        }
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
            .read(Ino(inode as u32), offset, size)
            .map_err(to_io)?;
        w.write_all(&data)?;
        Ok(data.len())
    }

    fn write(
        &self,
        _ctx: &Context,
        inode: u64,
        _h: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        _lock: Option<u64>,
        _delayed: bool,
        _flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.touch(_h, true);
        let mut data = vec![0u8; size as usize];
        r.read_exact(&mut data)?;
        if fuse_flags & WRITE_KILL_PRIV != 0 {
            self.kill_priv(inode)?;
        }
        self.fs
            .write(Ino(inode as u32), offset, &data)
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
        _ctx: &Context,
        inode: u64,
        _h: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
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
        // SAFETY: statvfs64 is a plain C struct of integers; all-zero is a valid value.
        let mut st: statvfs64 = unsafe { std::mem::zeroed() };
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
        _ctx: &Context,
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

    fn removexattr(&self, _ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        if cname(name) == CRTIME_XATTR {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        if replaying() {
            return Ok(());
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
        let entries = self.listing(ino)?;
        let h = self.add_handle(Handle::Dir {
            ino,
            entries: Arc::new(entries),
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
