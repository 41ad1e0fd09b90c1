//! The interface a filesystem implements to be served: one method per operation, typed
//! arguments, and results that are either the reply's content or an errno. Every method
//! has a default that answers ENOSYS, so a filesystem implements what it serves and the
//! kernel learns (and stops asking for) the rest. The protocol's bookkeeping — reply
//! layout, xattr size probing, directory entry packing, INIT — is the session's.

use std::time::Duration;

use crate::abi;
pub use crate::session::Negotiated;

/// An errno value (positive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const ERANGE: Errno = Errno(libc::ERANGE);
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Errno {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

pub type Result<T> = std::result::Result<T, Errno>;

/// Who sent a request, and which one it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    /// The request's id, with [`abi::UNIQUE_RESEND`] set on a request the kernel sends
    /// again after FUSE_NOTIFY_RESEND.
    pub unique: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Context {
    /// Whether the kernel sends this request a second time.
    pub fn is_resend(&self) -> bool {
        self.unique & abi::UNIQUE_RESEND != 0
    }
}

/// A name's inode, as LOOKUP and the creating operations return it. The kernel takes
/// one lookup reference on `nodeid` per entry returned (FORGET gives them back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub nodeid: u64,
    pub generation: u64,
    pub attr: abi::Attr,
    pub entry_ttl: Duration,
    pub attr_ttl: Duration,
}

/// An open file or directory: the handle and the `FOPEN_*` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub fh: u64,
    pub open_flags: u32,
}

/// The reply buffer of READDIR and READDIRPLUS: entries are packed while they fit in
/// the size the kernel asked for.
pub struct DirBuf<'a> {
    out: &'a mut Vec<u8>,
    max: usize,
    plus: bool,
}

impl<'a> DirBuf<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>, max: usize, plus: bool) -> DirBuf<'a> {
        out.clear();
        DirBuf { out, max, plus }
    }

    /// A reply buffer of at most `max` bytes, for filesystems' own tests.
    pub fn new_for_tests(out: &'a mut Vec<u8>, max: usize, plus: bool) -> DirBuf<'a> {
        DirBuf::new(out, max, plus)
    }

    /// Whether this is a READDIRPLUS reply (entries carry attributes).
    pub fn is_plus(&self) -> bool {
        self.plus
    }

    /// Adds a READDIR entry; `next` is the offset a later read continues from. Returns
    /// false (and adds nothing) when it does not fit: the listing stops there.
    pub fn add(&mut self, ino: u64, next: u64, typ: u32, name: &[u8]) -> bool {
        debug_assert!(!self.plus);
        self.push(None, ino, next, typ, name)
    }

    /// Adds a READDIRPLUS entry. With `entry` the kernel takes a lookup reference on its
    /// node if (and only if) this returns true; without one ("." and "..", or an entry
    /// the filesystem would rather not describe) it takes none.
    pub fn add_plus(
        &mut self,
        entry: Option<&Entry>,
        ino: u64,
        next: u64,
        typ: u32,
        name: &[u8],
    ) -> bool {
        debug_assert!(self.plus);
        self.push(entry, ino, next, typ, name)
    }

    fn push(&mut self, entry: Option<&Entry>, ino: u64, next: u64, typ: u32, name: &[u8]) -> bool {
        use zerocopy::IntoBytes;
        let head = if self.plus {
            core::mem::size_of::<abi::EntryOut>()
        } else {
            0
        } + core::mem::size_of::<abi::Dirent>();
        let len = abi::dirent_align(head + name.len());
        if self.out.len() + len > self.max {
            return false;
        }
        let start = self.out.len();
        if self.plus {
            let e = entry.map(crate::session::entry_out).unwrap_or_default();
            self.out.extend_from_slice(e.as_bytes());
        }
        let d = abi::Dirent {
            ino,
            off: next,
            namelen: name.len() as u32,
            typ,
        };
        self.out.extend_from_slice(d.as_bytes());
        self.out.extend_from_slice(name);
        self.out.resize(start + len, 0);
        true
    }
}

/// A filesystem served over FUSE. Node ids are the kernel's names for inodes
/// ([`abi::ROOT_ID`] is the root); handles are the filesystem's own numbers.
#[allow(unused_variables)]
pub trait Filesystem: Send + Sync {
    /// The connection's parameters are known (after INIT, or on adopting a connection).
    fn init(&self, negotiated: &Negotiated) {}
    /// Called before every request is served, on the thread that serves it.
    fn begin(&self, ctx: &Context) {}
    /// Called after every request has been served and before its reply is sent.
    fn end(&self, ctx: &Context) {}
    fn destroy(&self) {}

    fn lookup(&self, ctx: &Context, parent: u64, name: &[u8]) -> Result<Entry> {
        Err(Errno::ENOSYS)
    }
    fn forget(&self, nodeid: u64, nlookup: u64) {}
    fn batch_forget(&self, nodes: &[abi::ForgetOne]) {
        for n in nodes {
            self.forget(n.nodeid, n.nlookup);
        }
    }
    fn getattr(
        &self,
        ctx: &Context,
        nodeid: u64,
        fh: Option<u64>,
    ) -> Result<(abi::Attr, Duration)> {
        Err(Errno::ENOSYS)
    }
    /// STATX: the extended attributes (creation time) where the filesystem has them.
    fn statx(
        &self,
        ctx: &Context,
        nodeid: u64,
        arg: &abi::StatxIn,
    ) -> Result<(abi::Statx, Duration)> {
        Err(Errno::ENOSYS)
    }
    fn setattr(
        &self,
        ctx: &Context,
        nodeid: u64,
        arg: &abi::SetattrIn,
    ) -> Result<(abi::Attr, Duration)> {
        Err(Errno::ENOSYS)
    }
    fn readlink(&self, ctx: &Context, nodeid: u64) -> Result<Vec<u8>> {
        Err(Errno::ENOSYS)
    }
    fn symlink(&self, ctx: &Context, parent: u64, name: &[u8], target: &[u8]) -> Result<Entry> {
        Err(Errno::ENOSYS)
    }
    fn mknod(&self, ctx: &Context, parent: u64, name: &[u8], arg: &abi::MknodIn) -> Result<Entry> {
        Err(Errno::ENOSYS)
    }
    fn mkdir(&self, ctx: &Context, parent: u64, name: &[u8], arg: &abi::MkdirIn) -> Result<Entry> {
        Err(Errno::ENOSYS)
    }
    fn unlink(&self, ctx: &Context, parent: u64, name: &[u8]) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    fn rmdir(&self, ctx: &Context, parent: u64, name: &[u8]) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    fn rename(
        &self,
        ctx: &Context,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    fn link(&self, ctx: &Context, nodeid: u64, newparent: u64, newname: &[u8]) -> Result<Entry> {
        Err(Errno::ENOSYS)
    }
    fn open(&self, ctx: &Context, nodeid: u64, arg: &abi::OpenIn) -> Result<Opened> {
        Err(Errno::ENOSYS)
    }
    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &[u8],
        arg: &abi::CreateIn,
    ) -> Result<(Entry, Opened)> {
        Err(Errno::ENOSYS)
    }
    /// At most `arg.size` bytes from `arg.offset`; fewer only at the end of the file.
    fn read(&self, ctx: &Context, nodeid: u64, arg: &abi::ReadIn) -> Result<Vec<u8>> {
        Err(Errno::ENOSYS)
    }
    /// Returns how many bytes of `data` were written.
    fn write(&self, ctx: &Context, nodeid: u64, arg: &abi::WriteIn, data: &[u8]) -> Result<u32> {
        Err(Errno::ENOSYS)
    }
    fn flush(&self, ctx: &Context, nodeid: u64, arg: &abi::FlushIn) -> Result<()> {
        Ok(())
    }
    fn release(&self, ctx: &Context, nodeid: u64, arg: &abi::ReleaseIn) -> Result<()> {
        Ok(())
    }
    fn fsync(&self, ctx: &Context, nodeid: u64, arg: &abi::FsyncIn) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    fn statfs(&self, ctx: &Context, nodeid: u64) -> Result<abi::Kstatfs> {
        Err(Errno::ENOSYS)
    }
    fn setxattr(
        &self,
        ctx: &Context,
        nodeid: u64,
        name: &[u8],
        value: &[u8],
        arg: &abi::SetxattrIn,
    ) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    /// The whole value; the session answers size probes and ERANGE.
    fn getxattr(&self, ctx: &Context, nodeid: u64, name: &[u8]) -> Result<Vec<u8>> {
        Err(Errno::ENOSYS)
    }
    /// The names, each followed by a NUL; the session answers size probes and ERANGE.
    fn listxattr(&self, ctx: &Context, nodeid: u64) -> Result<Vec<u8>> {
        Err(Errno::ENOSYS)
    }
    fn removexattr(&self, ctx: &Context, nodeid: u64, name: &[u8]) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    fn opendir(&self, ctx: &Context, nodeid: u64, arg: &abi::OpenIn) -> Result<Opened> {
        Err(Errno::ENOSYS)
    }
    /// READDIR and READDIRPLUS ([`DirBuf::is_plus`]) from offset `arg.offset`.
    fn readdir(
        &self,
        ctx: &Context,
        nodeid: u64,
        arg: &abi::ReadIn,
        out: &mut DirBuf<'_>,
    ) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    fn releasedir(&self, ctx: &Context, nodeid: u64, arg: &abi::ReleaseIn) -> Result<()> {
        Ok(())
    }
    fn fsyncdir(&self, ctx: &Context, nodeid: u64, arg: &abi::FsyncIn) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    fn access(&self, ctx: &Context, nodeid: u64, mask: u32) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    fn fallocate(&self, ctx: &Context, nodeid: u64, arg: &abi::FallocateIn) -> Result<()> {
        Err(Errno::ENOSYS)
    }
    fn lseek(&self, ctx: &Context, nodeid: u64, arg: &abi::LseekIn) -> Result<u64> {
        Err(Errno::ENOSYS)
    }
    fn syncfs(&self, ctx: &Context) -> Result<()> {
        Err(Errno::ENOSYS)
    }
}
