//! What the integration tests share: a reply sink that records every reply, a request
//! builder over the ABI structures, the INIT a 7.44 kernel sends, a small filesystem that
//! implements a few operations (the rest answer ENOSYS by default), and a well-formed
//! request body for every opcode with the answer that filesystem gives it.

// Each test crate uses its own part of this module.
#![allow(dead_code)]

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use molt_fuse::abi::{self, init, opcode, InHeader};
use molt_fuse::{
    Context, DirBuf, Entry, Errno, Filesystem, InitPolicy, Negotiated, Opened, ReplySink, Served,
    Session,
};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// One reply as the session sent it, its parts joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub unique: u64,
    pub error: i32,
    pub payload: Vec<u8>,
}

/// A sink that keeps every reply.
#[derive(Debug, Default)]
pub struct Recorder {
    pub replies: Vec<Reply>,
}

impl ReplySink for Recorder {
    fn send(&mut self, unique: u64, error: i32, payload: &[&[u8]]) -> io::Result<()> {
        self.replies.push(Reply {
            unique,
            error,
            payload: payload.concat(),
        });
        Ok(())
    }
}

/// A request header from a typical caller; `len` is filled in by [`build`].
pub fn header(op: u32, unique: u64, nodeid: u64) -> InHeader {
    InHeader {
        len: 0,
        opcode: op,
        unique,
        nodeid,
        uid: 1000,
        gid: 1000,
        pid: 4242,
        total_extlen: 0,
        padding: 0,
    }
}

/// A request: `h` with its `len` set to the whole request's, then the parts.
pub fn build(mut h: InHeader, parts: &[&[u8]]) -> Vec<u8> {
    let body = parts.concat();
    h.len = (core::mem::size_of::<InHeader>() + body.len()) as u32;
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(&body);
    v
}

/// A request exactly as given: the header's `len` is not touched.
pub fn raw(h: InHeader, body: &[u8]) -> Vec<u8> {
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// A NUL-terminated name.
pub fn cname(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// What Linux 6.14 (protocol 7.44) offers at INIT without DAX, passthrough or io_uring.
pub const KERNEL_OFFER: u64 = init::ASYNC_READ
    | init::POSIX_LOCKS
    | init::ATOMIC_O_TRUNC
    | init::EXPORT_SUPPORT
    | init::BIG_WRITES
    | init::DONT_MASK
    | init::SPLICE_WRITE
    | init::SPLICE_MOVE
    | init::SPLICE_READ
    | init::FLOCK_LOCKS
    | init::HAS_IOCTL_DIR
    | init::AUTO_INVAL_DATA
    | init::DO_READDIRPLUS
    | init::READDIRPLUS_AUTO
    | init::ASYNC_DIO
    | init::WRITEBACK_CACHE
    | init::NO_OPEN_SUPPORT
    | init::PARALLEL_DIROPS
    | init::HANDLE_KILLPRIV
    | init::POSIX_ACL
    | init::ABORT_ERROR
    | init::MAX_PAGES
    | init::CACHE_SYMLINKS
    | init::NO_OPENDIR_SUPPORT
    | init::EXPLICIT_INVAL_DATA
    | init::HANDLE_KILLPRIV_V2
    | init::SETXATTR_EXT
    | init::INIT_EXT
    | init::SECURITY_CTX
    | init::CREATE_SUPP_GROUP
    | init::HAS_EXPIRE_ONLY
    | init::DIRECT_IO_ALLOW_MMAP
    | init::NO_EXPORT_SUPPORT
    | init::HAS_RESEND
    | init::ALLOW_IDMAP
    | init::REQUEST_TIMEOUT;

/// The INIT argument of a kernel offering `flags` (split into `flags`/`flags2`).
pub fn init_in(minor: u32, flags: u64) -> abi::InitIn {
    abi::InitIn {
        major: abi::KERNEL_VERSION,
        minor,
        max_readahead: 128 << 10,
        flags: flags as u32,
        flags2: (flags >> 32) as u32,
        unused: [0; 11],
    }
}

/// The INIT a 7.44 kernel sends.
pub fn kernel_init_in() -> abi::InitIn {
    init_in(44, KERNEL_OFFER)
}

/// The flags the kernel learns from an INIT reply (`process_init_reply`): `flags2` counts
/// only when the reply's `flags` has INIT_EXT.
pub fn kernel_view(out: &abi::InitOut) -> u64 {
    let mut f = out.flags as u64;
    if f & init::INIT_EXT != 0 {
        f |= (out.flags2 as u64) << 32;
    }
    f
}

/// A session over a [`TestFs`] with a recording sink and its own `unique` counter.
pub struct Harness {
    pub session: Session<TestFs>,
    pub sink: Recorder,
    pub scratch: Vec<u8>,
    next_unique: u64,
}

impl Harness {
    /// A fresh session that has not seen INIT.
    pub fn new(policy: InitPolicy) -> Harness {
        Harness {
            session: Session::new(Arc::new(TestFs::default()), policy),
            sink: Recorder::default(),
            scratch: Vec::new(),
            next_unique: 2,
        }
    }

    /// A session that has answered the kernel's INIT (`init_in`) successfully.
    pub fn initialized_with(policy: InitPolicy, init_in: abi::InitIn) -> Harness {
        let mut h = Harness::new(policy);
        let r = h.one(opcode::INIT, 0, &[init_in.as_bytes()]);
        assert_eq!(r.error, 0, "INIT refused");
        assert_eq!(r.payload.len(), 64, "init_out is 64 bytes");
        assert!(h.session.negotiated().is_some());
        h
    }

    /// A session that has answered a 7.44 kernel's INIT under the local policy.
    pub fn initialized() -> Harness {
        Harness::initialized_with(
            InitPolicy::new(InitPolicy::LOCAL_FILESYSTEM),
            kernel_init_in(),
        )
    }

    pub fn fs(&self) -> &TestFs {
        self.session.fs()
    }

    pub fn unique(&mut self) -> u64 {
        self.next_unique += 2;
        self.next_unique
    }

    /// Hands `buf` to the session; returns the outcome and the replies it sent.
    pub fn send(&mut self, buf: &[u8]) -> (io::Result<Served>, Vec<Reply>) {
        let served = self.session.handle(buf, &mut self.sink, &mut self.scratch);
        (served, std::mem::take(&mut self.sink.replies))
    }

    /// Sends a well-formed request; returns its unique, the outcome and the replies.
    pub fn call(&mut self, op: u32, nodeid: u64, parts: &[&[u8]]) -> (u64, Served, Vec<Reply>) {
        let unique = self.unique();
        let (served, replies) = self.send(&build(header(op, unique, nodeid), parts));
        (
            unique,
            served.expect("a request with a header is served"),
            replies,
        )
    }

    /// Sends a request that takes a reply and checks it gets exactly one, to its unique.
    pub fn one(&mut self, op: u32, nodeid: u64, parts: &[&[u8]]) -> Reply {
        let (unique, served, replies) = self.call(op, nodeid, parts);
        assert_ne!(served, Served::NoReply, "opcode {op}");
        assert_eq!(replies.len(), 1, "opcode {op}: one reply, got {replies:?}");
        assert_eq!(replies[0].unique, unique, "opcode {op}: the reply's unique");
        replies.into_iter().next().unwrap()
    }

    /// Sends a request and checks it is answered with errno `errno` and no payload.
    pub fn expect_errno(&mut self, op: u32, nodeid: u64, parts: &[&[u8]], errno: i32) {
        let r = self.one(op, nodeid, parts);
        assert_eq!(
            r.error, -errno,
            "opcode {op}: expected errno {errno}, got {r:?}"
        );
        assert!(
            r.payload.is_empty(),
            "opcode {op}: an error reply has no payload"
        );
    }
}

/// Reads a reply payload as `T`, which must be exactly its size.
pub fn parse<T: FromBytes>(payload: &[u8]) -> T {
    T::read_from_bytes(payload).unwrap_or_else(|_| {
        panic!(
            "payload of {} bytes, expected {}",
            payload.len(),
            core::mem::size_of::<T>()
        )
    })
}

// The test filesystem's nodes.
pub const ROOT: u64 = abi::ROOT_ID;
pub const FILE: u64 = 2;
pub const DIR: u64 = 3;
/// A file whose `read` ignores the size asked for.
pub const GREEDY: u64 = 4;
/// A file whose `write` claims more than it was given.
pub const BOASTFUL: u64 = 5;
/// A node whose `getattr` panics.
pub const PANICKY: u64 = 6;
/// The node CREATE makes.
pub const CREATED: u64 = 10;

pub const FILE_DATA: &[u8] = b"the quick brown fox jumps over the lazy dog";
pub const XATTR_VALUE: &[u8] = b"a value";
pub const XATTR_LIST: &[u8] = b"user.test\0user.empty\0";
pub const TTL: Duration = Duration::from_millis(1500);

/// The listing of every directory: names of lengths that need no padding (`exactly8`),
/// some, and a lot (a long name), with a large entry before small ones.
pub fn listing() -> Vec<(&'static [u8], u64, u32)> {
    const LONG: &[u8] = b"a-long-name-that-needs-more-than-one-hundred-bytes-of-directory-entry-to-hold-it-and-its-header";
    vec![
        (b".", DIR, libc::DT_DIR as u32),
        (b"..", ROOT, libc::DT_DIR as u32),
        (b"file", FILE, libc::DT_REG as u32),
        (b"dir", DIR, libc::DT_DIR as u32),
        (b"nine-char", FILE, libc::DT_REG as u32),
        (b"exactly8", FILE, libc::DT_REG as u32),
        (LONG, FILE, libc::DT_REG as u32),
        (b"x", FILE, libc::DT_REG as u32),
    ]
}

pub fn attr(node: u64) -> abi::Attr {
    let dir = node == DIR || node == ROOT;
    abi::Attr {
        ino: node,
        size: if dir { 4096 } else { FILE_DATA.len() as u64 },
        blocks: 8,
        atime: 1_700_000_000,
        mtime: 1_700_000_001,
        ctime: 1_700_000_002,
        mode: if dir {
            libc::S_IFDIR | 0o755
        } else {
            libc::S_IFREG | 0o644
        },
        nlink: if dir { 2 } else { 1 },
        uid: 1000,
        gid: 1000,
        blksize: 4096,
        ..Default::default()
    }
}

pub fn entry(node: u64) -> Entry {
    Entry {
        nodeid: node,
        generation: 7,
        attr: attr(node),
        entry_ttl: TTL,
        attr_ttl: TTL * 2,
    }
}

/// A SETXATTR as the filesystem received it: name, value, argument.
pub type SetxattrCall = (Vec<u8>, Vec<u8>, abi::SetxattrIn);

/// A small filesystem that records what it is asked to do.
#[derive(Default)]
pub struct TestFs {
    pub inits: Mutex<Vec<Negotiated>>,
    pub forgets: Mutex<Vec<(u64, u64)>>,
    pub writes: Mutex<Vec<Vec<u8>>>,
    /// Each SETXATTR's name, value and argument.
    pub setxattrs: Mutex<Vec<SetxattrCall>>,
    pub begins: AtomicUsize,
    pub ends: AtomicUsize,
    pub destroyed: AtomicUsize,
}

impl Filesystem for TestFs {
    fn init(&self, negotiated: &Negotiated) {
        self.inits.lock().unwrap().push(*negotiated);
    }

    fn begin(&self, _ctx: &Context) {
        self.begins.fetch_add(1, Ordering::SeqCst);
    }

    fn end(&self, _ctx: &Context) {
        self.ends.fetch_add(1, Ordering::SeqCst);
    }

    fn destroy(&self) {
        self.destroyed.fetch_add(1, Ordering::SeqCst);
    }

    fn lookup(&self, _ctx: &Context, _parent: u64, name: &[u8]) -> molt_fuse::Result<Entry> {
        match name {
            b"file" => Ok(entry(FILE)),
            b"dir" => Ok(entry(DIR)),
            b"panic" => panic!("a filesystem bug, on purpose"),
            b"errno-zero" => Err(Errno(0)),
            b"errno-negative" => Err(Errno(-libc::ENOENT)),
            b"errno-huge" => Err(Errno(4096)),
            _ => Err(Errno(libc::ENOENT)),
        }
    }

    fn forget(&self, nodeid: u64, nlookup: u64) {
        self.forgets.lock().unwrap().push((nodeid, nlookup));
    }

    fn getattr(
        &self,
        _ctx: &Context,
        nodeid: u64,
        _fh: Option<u64>,
    ) -> molt_fuse::Result<(abi::Attr, Duration)> {
        if nodeid == PANICKY {
            panic!("getattr of a panicky node, on purpose");
        }
        Ok((attr(nodeid), TTL))
    }

    fn statx(
        &self,
        _ctx: &Context,
        nodeid: u64,
        arg: &abi::StatxIn,
    ) -> molt_fuse::Result<(abi::Statx, Duration)> {
        let a = attr(nodeid);
        let stat = abi::Statx {
            mask: arg.sx_mask & (libc::STATX_BASIC_STATS | libc::STATX_BTIME),
            blksize: a.blksize,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            mode: a.mode as u16,
            ino: a.ino,
            size: a.size,
            blocks: a.blocks,
            btime: abi::SxTime {
                tv_sec: 1_600_000_000,
                tv_nsec: 5,
                reserved: 0,
            },
            ..Default::default()
        };
        Ok((stat, TTL))
    }

    fn open(&self, _ctx: &Context, nodeid: u64, _arg: &abi::OpenIn) -> molt_fuse::Result<Opened> {
        Ok(Opened {
            fh: 100 + nodeid,
            open_flags: abi::fopen::KEEP_CACHE,
        })
    }

    fn opendir(
        &self,
        _ctx: &Context,
        nodeid: u64,
        _arg: &abi::OpenIn,
    ) -> molt_fuse::Result<Opened> {
        Ok(Opened {
            fh: 200 + nodeid,
            open_flags: abi::fopen::CACHE_DIR,
        })
    }

    fn create(
        &self,
        _ctx: &Context,
        _parent: u64,
        _name: &[u8],
        _arg: &abi::CreateIn,
    ) -> molt_fuse::Result<(Entry, Opened)> {
        Ok((
            entry(CREATED),
            Opened {
                fh: 100 + CREATED,
                open_flags: 0,
            },
        ))
    }

    fn read(&self, _ctx: &Context, nodeid: u64, arg: &abi::ReadIn) -> molt_fuse::Result<Vec<u8>> {
        if nodeid == GREEDY {
            return Ok(FILE_DATA.repeat(4));
        }
        let start = usize::try_from(arg.offset)
            .unwrap_or(usize::MAX)
            .min(FILE_DATA.len());
        let end = start.saturating_add(arg.size as usize).min(FILE_DATA.len());
        Ok(FILE_DATA[start..end].to_vec())
    }

    fn write(
        &self,
        _ctx: &Context,
        nodeid: u64,
        _arg: &abi::WriteIn,
        data: &[u8],
    ) -> molt_fuse::Result<u32> {
        self.writes.lock().unwrap().push(data.to_vec());
        let n = data.len() as u32;
        Ok(if nodeid == BOASTFUL { n + 100 } else { n })
    }

    fn statfs(&self, _ctx: &Context, _nodeid: u64) -> molt_fuse::Result<abi::Kstatfs> {
        Ok(abi::Kstatfs {
            blocks: 1 << 20,
            bfree: 1 << 19,
            bavail: 1 << 19,
            files: 1 << 16,
            ffree: 1 << 15,
            bsize: 4096,
            namelen: 255,
            frsize: 4096,
            ..Default::default()
        })
    }

    fn setxattr(
        &self,
        _ctx: &Context,
        _nodeid: u64,
        name: &[u8],
        value: &[u8],
        arg: &abi::SetxattrIn,
    ) -> molt_fuse::Result<()> {
        self.setxattrs
            .lock()
            .unwrap()
            .push((name.to_vec(), value.to_vec(), *arg));
        Ok(())
    }

    fn getxattr(&self, _ctx: &Context, _nodeid: u64, name: &[u8]) -> molt_fuse::Result<Vec<u8>> {
        match name {
            b"user.test" => Ok(XATTR_VALUE.to_vec()),
            b"user.empty" => Ok(Vec::new()),
            _ => Err(Errno(libc::ENODATA)),
        }
    }

    fn listxattr(&self, _ctx: &Context, _nodeid: u64) -> molt_fuse::Result<Vec<u8>> {
        Ok(XATTR_LIST.to_vec())
    }

    fn readdir(
        &self,
        _ctx: &Context,
        _nodeid: u64,
        arg: &abi::ReadIn,
        out: &mut DirBuf<'_>,
    ) -> molt_fuse::Result<()> {
        let start = usize::try_from(arg.offset).unwrap_or(usize::MAX);
        for (i, (name, ino, typ)) in listing().into_iter().enumerate().skip(start) {
            let next = i as u64 + 1;
            let added = if out.is_plus() {
                let e = (name != b"." && name != b"..").then(|| entry(ino));
                out.add_plus(e.as_ref(), ino, next, typ, name)
            } else {
                out.add(ino, next, typ, name)
            };
            if !added {
                break;
            }
        }
        Ok(())
    }

    fn lseek(&self, _ctx: &Context, _nodeid: u64, arg: &abi::LseekIn) -> molt_fuse::Result<u64> {
        Ok(arg.offset)
    }
}

// Kernel argument structures Molt does not decode (it answers their opcodes ENOSYS), as
// `include/uapi/linux/fuse.h` defines them, so their requests are well-formed too.

#[repr(C)]
#[derive(Default, IntoBytes, Immutable, KnownLayout)]
pub struct BmapIn {
    block: u64,
    blocksize: u32,
    padding: u32,
}

#[repr(C)]
#[derive(Default, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlIn {
    fh: u64,
    flags: u32,
    cmd: u32,
    arg: u64,
    in_size: u32,
    out_size: u32,
}

#[repr(C)]
#[derive(Default, IntoBytes, Immutable, KnownLayout)]
pub struct PollIn {
    fh: u64,
    kh: u64,
    flags: u32,
    events: u32,
}

#[repr(C)]
#[derive(Default, IntoBytes, Immutable, KnownLayout)]
pub struct NotifyRetrieveIn {
    dummy1: u64,
    offset: u64,
    size: u32,
    dummy2: u32,
    dummy3: u64,
    dummy4: u64,
}

#[repr(C)]
#[derive(Default, IntoBytes, Immutable, KnownLayout)]
pub struct CopyFileRangeIn {
    fh_in: u64,
    off_in: u64,
    nodeid_out: u64,
    fh_out: u64,
    off_out: u64,
    len: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default, IntoBytes, Immutable, KnownLayout)]
pub struct SetupmappingIn {
    fh: u64,
    foffset: u64,
    len: u64,
    flags: u64,
    moffset: u64,
}

#[repr(C)]
#[derive(Default, IntoBytes, Immutable, KnownLayout)]
pub struct RemovemappingIn {
    count: u32,
}

#[repr(C)]
#[derive(Default, IntoBytes, Immutable, KnownLayout)]
pub struct RemovemappingOne {
    moffset: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default, IntoBytes, Immutable, KnownLayout)]
pub struct SyncfsIn {
    padding: u64,
}

#[repr(C)]
#[derive(Default, IntoBytes, Immutable, KnownLayout)]
pub struct CuseInitIn {
    major: u32,
    minor: u32,
    unused: u32,
    flags: u32,
}

const _: () = {
    assert!(core::mem::size_of::<BmapIn>() == 16);
    assert!(core::mem::size_of::<IoctlIn>() == 32);
    assert!(core::mem::size_of::<PollIn>() == 24);
    assert!(core::mem::size_of::<NotifyRetrieveIn>() == 40);
    assert!(core::mem::size_of::<CopyFileRangeIn>() == 56);
    assert!(core::mem::size_of::<SetupmappingIn>() == 40);
    assert!(core::mem::size_of::<RemovemappingIn>() == 4);
    assert!(core::mem::size_of::<RemovemappingOne>() == 16);
    assert!(core::mem::size_of::<SyncfsIn>() == 8);
    assert!(core::mem::size_of::<CuseInitIn>() == 16);
};

/// What the kernel expects back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Success with a payload of exactly this many bytes.
    Ok(usize),
    /// Success with a payload whose size depends on the content (a directory listing).
    Listing,
    /// This errno.
    Errno(i32),
    /// No reply at all.
    None,
}

pub const ENOSYS: Expect = Expect::Errno(libc::ENOSYS);

/// A well-formed request for `op` after INIT (which negotiated SETXATTR_EXT): the node,
/// the argument bytes, and the answer the test filesystem gives.
pub fn well_formed(op: u32) -> (u64, Vec<u8>, Expect) {
    use opcode::*;
    let read_in = abi::ReadIn {
        fh: 100 + FILE,
        offset: 0,
        size: 4096,
        ..Default::default()
    };
    let release_in = abi::ReleaseIn {
        fh: 100 + FILE,
        flags: libc::O_RDWR as u32,
        ..Default::default()
    };
    let fsync_in = abi::FsyncIn {
        fh: 100 + FILE,
        fsync_flags: abi::FSYNC_FDATASYNC,
        padding: 0,
    };
    let lk_in = abi::LkIn {
        fh: 100 + FILE,
        owner: 9,
        lk: abi::FileLock {
            start: 0,
            end: u64::MAX,
            typ: libc::F_WRLCK as u32,
            pid: 4242,
        },
        ..Default::default()
    };
    let create_in = abi::CreateIn {
        flags: (libc::O_CREAT | libc::O_RDWR) as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0o022,
        open_flags: 0,
    };
    let open_in = abi::OpenIn {
        flags: libc::O_RDWR as u32,
        open_flags: 0,
    };
    let cat = |parts: &[&[u8]]| parts.concat();
    let entry_out = core::mem::size_of::<abi::EntryOut>();
    let open_out = core::mem::size_of::<abi::OpenOut>();
    match op {
        LOOKUP => (ROOT, cname("file"), Expect::Ok(entry_out)),
        FORGET => (
            FILE,
            abi::ForgetIn { nlookup: 3 }.as_bytes().to_vec(),
            Expect::None,
        ),
        GETATTR => {
            let g = abi::GetattrIn {
                getattr_flags: abi::GETATTR_FH,
                dummy: 0,
                fh: 100 + FILE,
            };
            (FILE, g.as_bytes().to_vec(), Expect::Ok(104))
        }
        SETATTR => {
            let s = abi::SetattrIn {
                valid: abi::fattr::SIZE | abi::fattr::FH,
                fh: 100 + FILE,
                size: 10,
                ..Default::default()
            };
            (FILE, s.as_bytes().to_vec(), ENOSYS)
        }
        READLINK => (FILE, Vec::new(), ENOSYS),
        SYMLINK => (
            ROOT,
            cat(&[&cname("link"), &cname("target/of/link")]),
            ENOSYS,
        ),
        MKNOD => {
            let m = abi::MknodIn {
                mode: libc::S_IFIFO | 0o644,
                rdev: 0,
                umask: 0o022,
                padding: 0,
            };
            (ROOT, cat(&[m.as_bytes(), &cname("fifo")]), ENOSYS)
        }
        MKDIR => {
            let m = abi::MkdirIn {
                mode: 0o755,
                umask: 0o022,
            };
            (ROOT, cat(&[m.as_bytes(), &cname("newdir")]), ENOSYS)
        }
        UNLINK => (ROOT, cname("file"), ENOSYS),
        RMDIR => (ROOT, cname("dir"), ENOSYS),
        RENAME => {
            let r = abi::RenameIn { newdir: DIR };
            (
                ROOT,
                cat(&[r.as_bytes(), &cname("file"), &cname("moved")]),
                ENOSYS,
            )
        }
        LINK => {
            let l = abi::LinkIn { oldnodeid: FILE };
            (DIR, cat(&[l.as_bytes(), &cname("hardlink")]), ENOSYS)
        }
        OPEN => (FILE, open_in.as_bytes().to_vec(), Expect::Ok(open_out)),
        READ => (
            FILE,
            read_in.as_bytes().to_vec(),
            Expect::Ok(FILE_DATA.len()),
        ),
        WRITE => {
            let w = abi::WriteIn {
                fh: 100 + FILE,
                offset: 0,
                size: 5,
                ..Default::default()
            };
            (FILE, cat(&[w.as_bytes(), b"hello"]), Expect::Ok(8))
        }
        STATFS => (ROOT, Vec::new(), Expect::Ok(80)),
        RELEASE => (FILE, release_in.as_bytes().to_vec(), Expect::Ok(0)),
        FSYNC => (FILE, fsync_in.as_bytes().to_vec(), ENOSYS),
        SETXATTR => {
            let s = abi::SetxattrIn {
                size: 3,
                flags: libc::XATTR_CREATE as u32,
                setxattr_flags: 0,
                padding: 0,
            };
            (
                FILE,
                cat(&[s.as_bytes(), &cname("user.new"), b"abc"]),
                Expect::Ok(0),
            )
        }
        GETXATTR => {
            let g = abi::GetxattrIn {
                size: 0,
                padding: 0,
            };
            (
                FILE,
                cat(&[g.as_bytes(), &cname("user.test")]),
                Expect::Ok(8),
            )
        }
        LISTXATTR => {
            let g = abi::GetxattrIn {
                size: 0,
                padding: 0,
            };
            (FILE, g.as_bytes().to_vec(), Expect::Ok(8))
        }
        REMOVEXATTR => (FILE, cname("user.test"), ENOSYS),
        FLUSH => {
            let f = abi::FlushIn {
                fh: 100 + FILE,
                lock_owner: 9,
                ..Default::default()
            };
            (FILE, f.as_bytes().to_vec(), Expect::Ok(0))
        }
        // A second INIT is a protocol error.
        INIT => (
            0,
            kernel_init_in().as_bytes().to_vec(),
            Expect::Errno(libc::EIO),
        ),
        OPENDIR => (DIR, open_in.as_bytes().to_vec(), Expect::Ok(open_out)),
        READDIR | READDIRPLUS => (DIR, read_in.as_bytes().to_vec(), Expect::Listing),
        RELEASEDIR => (DIR, release_in.as_bytes().to_vec(), Expect::Ok(0)),
        FSYNCDIR => (DIR, fsync_in.as_bytes().to_vec(), ENOSYS),
        GETLK | SETLK | SETLKW => (FILE, lk_in.as_bytes().to_vec(), ENOSYS),
        ACCESS => {
            let a = abi::AccessIn {
                mask: libc::R_OK as u32,
                padding: 0,
            };
            (FILE, a.as_bytes().to_vec(), ENOSYS)
        }
        CREATE => (
            ROOT,
            cat(&[create_in.as_bytes(), &cname("new")]),
            Expect::Ok(entry_out + open_out),
        ),
        // The interrupt is answered, not the request it names.
        INTERRUPT => (
            0,
            abi::InterruptIn { unique: 1000 }.as_bytes().to_vec(),
            ENOSYS,
        ),
        BMAP => {
            let b = BmapIn {
                block: 7,
                blocksize: 4096,
                padding: 0,
            };
            (FILE, b.as_bytes().to_vec(), ENOSYS)
        }
        DESTROY => (0, Vec::new(), Expect::Ok(0)),
        IOCTL => {
            let i = IoctlIn {
                fh: 100 + FILE,
                cmd: 0x5401,
                out_size: 60,
                ..Default::default()
            };
            (FILE, i.as_bytes().to_vec(), ENOSYS)
        }
        POLL => {
            let p = PollIn {
                fh: 100 + FILE,
                kh: 1,
                flags: 1,
                events: libc::POLLIN as u32,
            };
            (FILE, p.as_bytes().to_vec(), ENOSYS)
        }
        NOTIFY_REPLY => {
            let n = NotifyRetrieveIn {
                offset: 0,
                size: 4,
                ..Default::default()
            };
            (FILE, cat(&[n.as_bytes(), b"data"]), Expect::None)
        }
        BATCH_FORGET => {
            let head = abi::BatchForgetIn { count: 2, dummy: 0 };
            let a = abi::ForgetOne {
                nodeid: FILE,
                nlookup: 1,
            };
            let b = abi::ForgetOne {
                nodeid: DIR,
                nlookup: 2,
            };
            (
                0,
                cat(&[head.as_bytes(), a.as_bytes(), b.as_bytes()]),
                Expect::None,
            )
        }
        FALLOCATE => {
            let f = abi::FallocateIn {
                fh: 100 + FILE,
                offset: 0,
                length: 1 << 20,
                mode: 0,
                padding: 0,
            };
            (FILE, f.as_bytes().to_vec(), ENOSYS)
        }
        RENAME2 => {
            let r = abi::Rename2In {
                newdir: DIR,
                flags: libc::RENAME_NOREPLACE,
                padding: 0,
            };
            (
                ROOT,
                cat(&[r.as_bytes(), &cname("file"), &cname("moved")]),
                ENOSYS,
            )
        }
        LSEEK => {
            let l = abi::LseekIn {
                fh: 100 + FILE,
                offset: 12,
                whence: libc::SEEK_DATA as u32,
                padding: 0,
            };
            (FILE, l.as_bytes().to_vec(), Expect::Ok(8))
        }
        COPY_FILE_RANGE => {
            let c = CopyFileRangeIn {
                fh_in: 100 + FILE,
                nodeid_out: FILE,
                fh_out: 100 + FILE,
                off_out: 4096,
                len: 4096,
                ..Default::default()
            };
            (FILE, c.as_bytes().to_vec(), ENOSYS)
        }
        SETUPMAPPING => {
            let s = SetupmappingIn {
                fh: 100 + FILE,
                len: 2 << 20,
                ..Default::default()
            };
            (FILE, s.as_bytes().to_vec(), ENOSYS)
        }
        REMOVEMAPPING => {
            let one = RemovemappingOne {
                moffset: 0,
                len: 2 << 20,
            };
            (
                FILE,
                cat(&[RemovemappingIn { count: 1 }.as_bytes(), one.as_bytes()]),
                ENOSYS,
            )
        }
        SYNCFS => (ROOT, SyncfsIn::default().as_bytes().to_vec(), ENOSYS),
        TMPFILE => (ROOT, cat(&[create_in.as_bytes(), &cname("/")]), ENOSYS),
        STATX => {
            let s = abi::StatxIn {
                getattr_flags: 0,
                reserved: 0,
                fh: 0,
                sx_flags: 0,
                sx_mask: libc::STATX_BASIC_STATS | libc::STATX_BTIME,
            };
            (FILE, s.as_bytes().to_vec(), Expect::Ok(288))
        }
        CUSE_INIT => {
            let c = CuseInitIn {
                major: 7,
                minor: 44,
                ..Default::default()
            };
            (0, c.as_bytes().to_vec(), ENOSYS)
        }
        other => panic!("opcode {other} has no case here: add one"),
    }
}
