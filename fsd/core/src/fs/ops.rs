//! The public operations of `Fs`. Each one validates everything it can before changing
//! anything, then mutates, then commits one transaction.

use std::time::{Duration, Instant};

use formats::block::{Ino, BLOCK_SIZE};
use formats::dir::{dtype_of_mode, validate_name, DirEntry, MAX_NAME_LEN};
use formats::inode::{InlineArea, Inode, Timespec, INLINE_SIZE, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use formats::superblock::{ORPHAN_INO, ROOT_INO};
use formats::xattr::XattrSet;

use super::file::{self, MAX_FILE_SIZE};
use super::lock_order;
use super::{Fs, FsError, FsResult, Inner, Node};

/// Most hard links one inode may have.
pub const LINK_MAX: u32 = 65000;
/// Longest symlink target.
pub(crate) const SYMLINK_MAX: usize = BLOCK_SIZE - 1;
/// Free blocks an operation that creates a name must see before it starts, so that it
/// cannot run out of space half-way (directory split, overflow, extent block, xattr).
const CREATE_RESERVE: u64 = 16;
/// Free blocks a write keeps beyond its data, for extent blocks.
const WRITE_RESERVE: u64 = 4;
/// An unlinked inode's space comes back when the kernel forgets the inode, and the kernel
/// sends that FORGET without waiting for it: a create right after `unlink` can reach the
/// filesystem first. So an operation refused for want of space, while an inode unlinked
/// less than [`RECENT_UNLINK`] ago waits to be forgotten, waits up to this long for
/// inodes to be freed, and runs again each time one is.
pub(crate) const RELEASE_WAIT: Duration = Duration::from_millis(200);
/// How long after its last name went an unlinked inode still open is no longer waited
/// for: its FORGET is then the last close's, whenever that comes.
pub(crate) const RECENT_UNLINK: Duration = Duration::from_secs(1);

/// Attributes as `stat` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub size: u64,
    /// 512-byte units, as `st_blocks`.
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    /// Creation time; `None` for an inode without one (format v1, or not yet converted).
    pub crtime: Option<Timespec>,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub generation: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(Timespec),
}

/// A `setattr` request; `None` leaves a field alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<Timespec>,
}

/// When an access updates the access time: the mount's `noatime`, `relatime` (the
/// default) or `strictatime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Atime {
    Never,
    /// Only when the access time is not newer than the modification or change time, or
    /// is a day old (so `mutt`-style "read since modified" checks work).
    #[default]
    Relative,
    Always,
}

/// The age past which `Atime::Relative` updates the access time anyway.
const RELATIME_MAX_AGE_SECS: i64 = 24 * 60 * 60;

fn atime_due(policy: Atime, i: &Inode, now: Timespec) -> bool {
    let key = |t: Timespec| (t.sec, t.nsec);
    match policy {
        Atime::Never => false,
        Atime::Always => key(i.atime) != key(now),
        Atime::Relative => {
            key(i.atime) <= key(i.mtime)
                || key(i.atime) <= key(i.ctime)
                || now.sec.saturating_sub(i.atime.sec) >= RELATIME_MAX_AGE_SECS
        }
    }
}

/// How a write treats the file's limits and times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteMode {
    /// Stamp mtime and ctime with the current time.
    pub stamp_times: bool,
    /// Refuse with EFBIG a write that would cross the largest file size, rather than
    /// write the part below it.
    pub whole: bool,
}

impl WriteMode {
    /// A write(2) as a program makes it: stamps times, may be short at the size limit.
    pub(crate) const DIRECT: WriteMode = WriteMode {
        stamp_times: true,
        whole: false,
    };
}

#[derive(Debug, Clone, Copy, Default)]
pub struct XattrFlags {
    /// Fail with EEXIST if the attribute exists.
    pub create: bool,
    /// Fail with ENODATA if the attribute does not exist.
    pub replace: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub free_blocks: u64,
    pub files: u64,
    pub free_files: u64,
    pub block_size: u32,
    pub name_max: u32,
}

fn attr_of(ino: Ino, i: &Inode) -> Attr {
    Attr {
        ino,
        size: i.size,
        blocks: i.blocks * (BLOCK_SIZE as u64 / 512),
        atime: i.atime,
        mtime: i.mtime,
        ctime: i.ctime,
        crtime: i.crtime,
        mode: i.mode,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        generation: i.generation,
    }
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > MAX_NAME_LEN {
        return Err(FsError::NameTooLong);
    }
    validate_name(name).map_err(FsError::Invalid)
}

fn check_xattr_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty() || name.len() > formats::xattr::XATTR_NAME_MAX {
        return Err(FsError::Range);
    }
    Ok(())
}

/// The extended attributes a new inode starts with, checked before anything changes.
fn initial_xattrs(xattrs: &[(&[u8], &[u8])]) -> FsResult<Option<XattrSet>> {
    if xattrs.is_empty() {
        return Ok(None);
    }
    let mut set = XattrSet::default();
    for (name, value) in xattrs {
        check_xattr_name(name)?;
        set.set(name, value).map_err(|_| FsError::NoSpace)?;
    }
    Ok(Some(set))
}

fn orphan_name(ino: Ino) -> Vec<u8> {
    ino.0.to_string().into_bytes()
}

impl Inner {
    pub(crate) fn has_pending_changes(&self) -> bool {
        !self.tx.is_empty()
            || !self.dirty_nodes.is_empty()
            || !self.tx_free.is_empty()
            || self.ibitmap.is_dirty()
            || self.bbitmap.is_dirty()
    }

    pub(crate) fn attr(&mut self, ino: Ino) -> FsResult<Attr> {
        let n = self.node(ino)?;
        let mut a = attr_of(ino, &n.inode);
        a.blocks = super::block_count(n) * (BLOCK_SIZE as u64 / 512);
        Ok(a)
    }

    fn dir_node(&mut self, ino: Ino) -> FsResult<&mut Node> {
        let n = self.node(ino)?;
        if !n.inode.is_dir() {
            return Err(FsError::NotDir);
        }
        if n.inode.nlink == 0 {
            // A removed directory accepts no new entries.
            return Err(FsError::NotFound);
        }
        Ok(n)
    }

    fn touch_dir(&mut self, dir: Ino, now: Timespec) -> FsResult<()> {
        let n = self.node(dir)?;
        n.inode.mtime = now;
        n.inode.ctime = now;
        self.mark_dirty(dir);
        Ok(())
    }

    /// Whether an inode unlinked less than [`RECENT_UNLINK`] ago may yet give its space
    /// back: an operation refused for want of space waits for it then.
    pub(crate) fn awaits_release(&self) -> bool {
        self.orphaned.values().any(|t| t.elapsed() < RECENT_UNLINK)
    }

    fn reserve(&self, blocks: u64) -> FsResult<()> {
        if self.bbitmap.free() < blocks {
            return Err(FsError::NoSpace);
        }
        Ok(())
    }

    /// Drops one name of `ino`; at zero links it moves to the orphan directory until
    /// `release` (the kernel may still hold it open).
    fn drop_link(&mut self, ino: Ino, now: Timespec) -> FsResult<()> {
        let n = self.node(ino)?;
        let is_dir = n.inode.is_dir();
        n.inode.nlink = if is_dir {
            0
        } else {
            n.inode.nlink.saturating_sub(1)
        };
        n.inode.ctime = now;
        let gone = n.inode.nlink == 0;
        let dtype = dtype_of_mode(n.inode.mode);
        self.mark_dirty(ino);
        if gone {
            self.orphaned.insert(ino.0, Instant::now());
            self.dir_insert(
                ORPHAN_INO,
                DirEntry {
                    ino,
                    dtype,
                    name: orphan_name(ino),
                },
            )?;
        }
        Ok(())
    }

    fn is_ancestor(&mut self, ancestor: Ino, mut dir: Ino) -> FsResult<bool> {
        let mut steps = 0u64;
        loop {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            steps += 1;
            if steps > self.geo.inode_count as u64 {
                return Err(FsError::Corrupted("directory parent chain loops".into()));
            }
            dir = self.dir_parent(dir)?;
        }
    }

    fn new_node(
        &mut self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Ino> {
        check_name(name)?;
        self.dir_node(parent)?;
        if self.dir_lookup(parent, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let is_dir = mode & S_IFMT == S_IFDIR;
        if is_dir && self.node(parent)?.inode.nlink >= LINK_MAX {
            return Err(FsError::TooManyLinks);
        }
        self.reserve(CREATE_RESERVE)?;
        if self.ibitmap.free() == 0 {
            return Err(FsError::NoInodes);
        }
        let now = crate::mkfs::now();
        let ino = self.alloc_ino()?;
        let mut inode = Inode::new(self.codec.version(), mode, uid, gid, now);
        inode.generation = self.next_generation();
        inode.nlink = if is_dir { 2 } else { 1 };
        inode.rdev = rdev;
        self.nodes.insert(
            ino.0,
            Node {
                inode,
                extents: Vec::new(),
                chain: Vec::new(),
            },
        );
        self.mark_dirty(ino);
        if is_dir {
            self.dir_init(ino, parent)?;
            let p = self.node(parent)?;
            p.inode.nlink += 1;
        }
        self.dir_insert(
            parent,
            DirEntry {
                ino,
                dtype: dtype_of_mode(mode),
                name: name.to_vec(),
            },
        )?;
        self.touch_dir(parent, now)?;
        Ok(ino)
    }
}

impl Fs {
    /// Runs a mutating operation and commits it. An operation fails before it changes
    /// anything, or else its changes are committed; if it fails half-way (I/O error,
    /// space exhausted despite the reserve) the filesystem turns read-only to protect
    /// the image.
    ///
    /// Refused for want of space while a recently unlinked inode waits to be forgotten,
    /// the operation waits for the space and runs again (see [`RELEASE_WAIT`]).
    fn mutate<T>(&self, mut f: impl FnMut(&mut Inner) -> FsResult<T>) -> FsResult<T> {
        self.waiting_for_space(|| self.mutate_once(&mut f))
    }

    /// Runs `op`, and again each time an inode is freed while it is refused for want of
    /// space (or of inodes) and a recently unlinked inode still waits to be forgotten,
    /// until [`RELEASE_WAIT`] has passed. Only a refusal that left the filesystem
    /// writable is retried (one half-way latched it: its error stands).
    fn waiting_for_space<T>(&self, mut op: impl FnMut() -> FsResult<T>) -> FsResult<T> {
        let deadline = Instant::now() + RELEASE_WAIT;
        loop {
            let seen = self.releases.seen();
            let r = op();
            if !matches!(r, Err(FsError::NoSpace | FsError::NoInodes)) {
                return r;
            }
            // Releases are counted under the lock, so one that freed the last recent
            // orphan before this look shows in the count by now. The wait is not under
            // the lock: the release needs it.
            let (latched, awaits) = {
                let g = self.lock();
                (g.failed.is_some(), g.awaits_release())
            };
            let again = !latched
                && ((self.releases.seen() != seen && Instant::now() < deadline)
                    || (awaits && self.releases.wait_past(seen, deadline)));
            if !again {
                return r;
            }
        }
    }

    /// `mutate` without the wait for space.
    fn mutate_once<T>(&self, f: impl FnOnce(&mut Inner) -> FsResult<T>) -> FsResult<T> {
        let mut g = self.lock();
        g.check_writable()?;
        g.keep_headroom()?;
        let before = g.changes;
        g.changing = true;
        let r = f(&mut g);
        g.changing = false;
        match r {
            Ok(v) => {
                g.op_done()?;
                Ok(v)
            }
            Err(e) if g.changes == before => Err(e),
            Err(e) => {
                g.abort_tx();
                g.failed
                    .get_or_insert_with(|| format!("operation failed half-way: {e}"));
                Err(e)
            }
        }
    }

    fn read_only<T>(&self, f: impl FnOnce(&mut Inner) -> FsResult<T>) -> FsResult<T> {
        f(&mut self.lock())
    }

    pub fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        self.read_only(|g| g.attr(ino))
    }

    /// The attributes of an inode named by number alone (a file handle): only inodes
    /// that are part of the tree, so a handle of a removed file finds nothing (a reused
    /// number carries a new generation, which the kernel compares).
    pub fn getattr_by_handle(&self, ino: Ino) -> FsResult<Attr> {
        if ino != ROOT_INO && ino.0 < formats::superblock::FIRST_FREE_INO {
            return Err(FsError::NotFound);
        }
        let a = self.getattr(ino)?;
        if a.nlink == 0 {
            return Err(FsError::NotFound);
        }
        Ok(a)
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        self.read_only(|g| {
            if name.len() > MAX_NAME_LEN {
                return Err(FsError::NameTooLong);
            }
            g.dir_node(parent)?;
            match g.dir_lookup(parent, name)? {
                Some(e) => g.attr(e.ino),
                None => Err(FsError::NotFound),
            }
        })
    }

    /// Creates a regular file, device, FIFO or socket (`mode` carries the type).
    pub fn mknod(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        self.mknod_with(parent, name, mode, rdev, (uid, gid), &[])
    }

    /// `mknod` of an inode that starts with extended attributes `xattrs` (inherited
    /// ACLs), all in one transaction.
    pub fn mknod_with(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u32,
        (uid, gid): (u32, u32),
        xattrs: &[(&[u8], &[u8])],
    ) -> FsResult<Attr> {
        if mode & S_IFMT == S_IFDIR || mode & S_IFMT == S_IFLNK {
            return Err(FsError::Invalid("mknod of a directory or symlink"));
        }
        let mode = if mode & S_IFMT == 0 {
            mode | S_IFREG
        } else {
            mode
        };
        self.create_node(parent, name, mode, rdev, (uid, gid), xattrs)
    }

    pub fn mkdir(&self, parent: Ino, name: &[u8], mode: u32, uid: u32, gid: u32) -> FsResult<Attr> {
        self.mkdir_with(parent, name, mode, (uid, gid), &[])
    }

    /// `mkdir` of a directory that starts with extended attributes `xattrs`.
    pub fn mkdir_with(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        (uid, gid): (u32, u32),
        xattrs: &[(&[u8], &[u8])],
    ) -> FsResult<Attr> {
        self.create_node(
            parent,
            name,
            S_IFDIR | (mode & 0o7777),
            0,
            (uid, gid),
            xattrs,
        )
    }

    /// Makes a new inode with its name and its initial extended attributes in one
    /// transaction; the attributes are checked before anything changes.
    fn create_node(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u32,
        (uid, gid): (u32, u32),
        xattrs: &[(&[u8], &[u8])],
    ) -> FsResult<Attr> {
        let set = initial_xattrs(xattrs)?;
        self.mutate(|g| {
            let ino = g.new_node(parent, name, mode, rdev, uid, gid)?;
            if let Some(set) = &set {
                g.store_xattrs(ino, set)?;
            }
            g.attr(ino)
        })
    }

    pub fn symlink(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        if target.is_empty() {
            return Err(FsError::Invalid("empty symlink target"));
        }
        if target.len() > SYMLINK_MAX {
            return Err(FsError::NameTooLong);
        }
        self.mutate(|g| {
            let ino = g.new_node(parent, name, S_IFLNK | 0o777, 0, uid, gid)?;
            if target.len() <= INLINE_SIZE {
                let n = g.node(ino)?;
                n.inode.inline = InlineArea::Symlink(target.to_vec());
                n.inode.size = target.len() as u64;
            } else {
                g.file_write(ino, 0, target, true)?;
            }
            g.mark_dirty(ino);
            g.attr(ino)
        })
    }

    pub fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        self.read_only(|g| {
            let n = g.node(ino)?;
            if !n.inode.is_symlink() {
                return Err(FsError::Invalid("not a symlink"));
            }
            match &n.inode.inline {
                InlineArea::Symlink(t) => Ok(t.clone()),
                InlineArea::Extents(_) => {
                    let size = n.inode.size as u32;
                    g.file_read(ino, 0, size)
                }
            }
        })
    }

    pub fn link(&self, ino: Ino, newparent: Ino, newname: &[u8]) -> FsResult<Attr> {
        self.mutate(|g| {
            check_name(newname)?;
            let n = g.node(ino)?;
            if n.inode.is_dir() {
                return Err(FsError::NotPermitted("hard link to a directory"));
            }
            if n.inode.nlink == 0 {
                return Err(FsError::NotFound);
            }
            if n.inode.nlink >= LINK_MAX {
                return Err(FsError::TooManyLinks);
            }
            let dtype = dtype_of_mode(n.inode.mode);
            g.dir_node(newparent)?;
            if g.dir_lookup(newparent, newname)?.is_some() {
                return Err(FsError::Exists);
            }
            g.reserve(CREATE_RESERVE)?;
            let now = crate::mkfs::now();
            g.dir_insert(
                newparent,
                DirEntry {
                    ino,
                    dtype,
                    name: newname.to_vec(),
                },
            )?;
            let n = g.node(ino)?;
            n.inode.nlink += 1;
            n.inode.ctime = now;
            g.mark_dirty(ino);
            g.touch_dir(newparent, now)?;
            g.attr(ino)
        })
    }

    /// Removes a non-directory name. Returns the inode it named.
    pub fn unlink(&self, parent: Ino, name: &[u8]) -> FsResult<Ino> {
        self.mutate(|g| {
            check_name(name)?;
            g.dir_node(parent)?;
            let e = g.dir_lookup(parent, name)?.ok_or(FsError::NotFound)?;
            if g.node(e.ino)?.inode.is_dir() {
                return Err(FsError::IsDir);
            }
            let now = crate::mkfs::now();
            g.dir_remove(parent, name)?;
            g.drop_link(e.ino, now)?;
            g.touch_dir(parent, now)?;
            Ok(e.ino)
        })
    }

    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> FsResult<Ino> {
        self.mutate(|g| {
            if name == b"." {
                return Err(FsError::Invalid("rmdir of ."));
            }
            if name == b".." {
                return Err(FsError::NotEmpty);
            }
            check_name(name)?;
            g.dir_node(parent)?;
            let e = g.dir_lookup(parent, name)?.ok_or(FsError::NotFound)?;
            if !g.node(e.ino)?.inode.is_dir() {
                return Err(FsError::NotDir);
            }
            if g.dir_entry_count(e.ino)? != 0 {
                return Err(FsError::NotEmpty);
            }
            let now = crate::mkfs::now();
            g.dir_remove(parent, name)?;
            g.drop_link(e.ino, now)?;
            let p = g.node(parent)?;
            p.inode.nlink -= 1;
            g.touch_dir(parent, now)?;
            Ok(e.ino)
        })
    }

    /// rename(2) with RENAME_NOREPLACE and RENAME_EXCHANGE. Returns the inode that lost
    /// its last name, if the rename replaced one.
    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        noreplace: bool,
        exchange: bool,
    ) -> FsResult<Option<Ino>> {
        if noreplace && exchange {
            return Err(FsError::Invalid("RENAME_NOREPLACE with RENAME_EXCHANGE"));
        }
        self.mutate(|g| {
            check_name(name)?;
            check_name(newname)?;
            g.dir_node(parent)?;
            g.dir_node(newparent)?;
            let src = g.dir_lookup(parent, name)?.ok_or(FsError::NotFound)?;
            let dst = g.dir_lookup(newparent, newname)?;
            let src_is_dir = g.node(src.ino)?.inode.is_dir();
            let now = crate::mkfs::now();
            if exchange {
                let dst = dst.ok_or(FsError::NotFound)?;
                let dst_is_dir = g.node(dst.ino)?.inode.is_dir();
                if src.ino == dst.ino {
                    return Ok(None);
                }
                if src_is_dir && parent != newparent && g.is_ancestor(src.ino, newparent)? {
                    return Err(FsError::Invalid("cannot move a directory into itself"));
                }
                if dst_is_dir && parent != newparent && g.is_ancestor(dst.ino, parent)? {
                    return Err(FsError::Invalid("cannot move a directory into itself"));
                }
                g.reserve(CREATE_RESERVE)?;
                g.dir_remove(parent, name)?;
                g.dir_remove(newparent, newname)?;
                g.dir_insert(
                    parent,
                    DirEntry {
                        ino: dst.ino,
                        dtype: dst.dtype,
                        name: name.to_vec(),
                    },
                )?;
                g.dir_insert(
                    newparent,
                    DirEntry {
                        ino: src.ino,
                        dtype: src.dtype,
                        name: newname.to_vec(),
                    },
                )?;
                if parent != newparent {
                    if src_is_dir {
                        g.dir_set_parent(src.ino, newparent)?;
                        g.node(parent)?.inode.nlink -= 1;
                        g.node(newparent)?.inode.nlink += 1;
                    }
                    if dst_is_dir {
                        g.dir_set_parent(dst.ino, parent)?;
                        g.node(newparent)?.inode.nlink -= 1;
                        g.node(parent)?.inode.nlink += 1;
                    }
                }
                for ino in [src.ino, dst.ino] {
                    g.node(ino)?.inode.ctime = now;
                    g.mark_dirty(ino);
                }
                g.touch_dir(parent, now)?;
                g.touch_dir(newparent, now)?;
                return Ok(None);
            }
            if let Some(d) = &dst {
                if noreplace {
                    return Err(FsError::Exists);
                }
                if d.ino == src.ino {
                    return Ok(None);
                }
                let dst_is_dir = g.node(d.ino)?.inode.is_dir();
                if src_is_dir && !dst_is_dir {
                    return Err(FsError::NotDir);
                }
                if !src_is_dir && dst_is_dir {
                    return Err(FsError::IsDir);
                }
                if dst_is_dir && g.dir_entry_count(d.ino)? != 0 {
                    return Err(FsError::NotEmpty);
                }
            }
            if src_is_dir && parent != newparent && g.is_ancestor(src.ino, newparent)? {
                return Err(FsError::Invalid("cannot move a directory into itself"));
            }
            if src_is_dir
                && parent != newparent
                && dst.is_none()
                && g.node(newparent)?.inode.nlink >= LINK_MAX
            {
                return Err(FsError::TooManyLinks);
            }
            g.reserve(CREATE_RESERVE)?;
            let mut replaced = None;
            if let Some(d) = dst {
                let dst_is_dir = g.node(d.ino)?.inode.is_dir();
                g.dir_remove(newparent, newname)?;
                g.drop_link(d.ino, now)?;
                if dst_is_dir {
                    g.node(newparent)?.inode.nlink -= 1;
                }
                if g.node(d.ino)?.inode.nlink == 0 {
                    replaced = Some(d.ino);
                }
            }
            g.dir_remove(parent, name)?;
            g.dir_insert(
                newparent,
                DirEntry {
                    ino: src.ino,
                    dtype: src.dtype,
                    name: newname.to_vec(),
                },
            )?;
            if src_is_dir && parent != newparent {
                g.dir_set_parent(src.ino, newparent)?;
                g.node(parent)?.inode.nlink -= 1;
                g.node(newparent)?.inode.nlink += 1;
            }
            g.node(src.ino)?.inode.ctime = now;
            g.mark_dirty(src.ino);
            g.touch_dir(parent, now)?;
            g.touch_dir(newparent, now)?;
            Ok(replaced)
        })
    }

    /// Frees an inode with no names left once nothing refers to it any more (the kernel
    /// forgot it and no handle is open). A no-op for inodes that still have names.
    pub fn release(&self, ino: Ino) -> FsResult<()> {
        // Waits for the file's writes in flight, whose data goes to its blocks with the
        // filesystem lock free: an inode is freed only once none is left.
        let _data = lock_order::inode_exclusive(self.inode_data(ino));
        self.mutate_once(|g| {
            let Ok(n) = g.node(ino) else { return Ok(()) };
            if n.inode.nlink != 0 || ino == ROOT_INO || ino == ORPHAN_INO {
                return Ok(());
            }
            if g.dir_remove(ORPHAN_INO, &orphan_name(ino))?.is_some() {
                g.destroy_node(ino)?;
                // Under the lock, with the frees (see `waiting_for_space`).
                self.releases.note();
            }
            Ok(())
        })
    }

    pub fn setattr(&self, ino: Ino, s: SetAttr) -> FsResult<Attr> {
        self.setattr_with_xattr(ino, s, None)
    }

    /// `setattr` and a change of one extended attribute (`None` removes it) in one
    /// transaction: how an ACL and the mode bits it mirrors change together.
    pub fn setattr_with_xattr(
        &self,
        ino: Ino,
        s: SetAttr,
        xattr: Option<(&[u8], Option<&[u8]>)>,
    ) -> FsResult<Attr> {
        // A size change waits for the file's writes in flight (see `lock_order`).
        let _data = s
            .size
            .map(|_| lock_order::inode_exclusive(self.inode_data(ino)));
        self.mutate(|g| {
            // Everything that can refuse the change is checked before anything changes.
            let set = match xattr {
                Some((name, value)) => {
                    check_xattr_name(name)?;
                    let mut set = Self::xattrs(g, ino)?;
                    match value {
                        Some(v) => set.set(name, v).map_err(|_| FsError::NoSpace)?,
                        None => {
                            set.remove(name);
                        }
                    }
                    g.reserve(2)?;
                    Some(set)
                }
                None => None,
            };
            g.apply_setattr(ino, s)?;
            if let Some(set) = set {
                g.store_xattrs(ino, &set)?;
            }
            g.attr(ino)
        })
    }

    /// Reads file data. The block map is consulted under the lock; the device reads run
    /// outside it, so reads proceed in parallel. Blocks freed meanwhile cannot be reused
    /// while a read holds the reuse guard (see `Inner::checkpoint`).
    pub fn read(&self, ino: Ino, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        self.read_with(ino, offset, size, Atime::Never)
    }

    /// `read`, updating the access time as the mount's `atime` policy says.
    pub fn read_with(&self, ino: Ino, offset: u64, size: u32, atime: Atime) -> FsResult<Vec<u8>> {
        let mut g = self.lock();
        let plan = g.read_plan(ino, offset, size)?;
        g.note_access(ino, atime)?;
        let (store, reuse) = (g.store.clone(), g.reuse.clone());
        // Taken before the lock is let go: a block freed once the lock is free cannot be
        // released for reuse until this read is done. (Taking it under the lock never
        // waits: only holders of the lock take it exclusively.)
        let guard = lock_order::reuse_shared(&reuse);
        drop(g);
        let data = plan.execute(store.as_ref());
        drop(guard);
        Ok(data?)
    }

    /// Records an access to `ino` (a directory listed, a file read) under `atime`.
    pub fn note_access(&self, ino: Ino, atime: Atime) -> FsResult<()> {
        self.lock().note_access(ino, atime)
    }

    /// Writes file data. The data goes to the device now; the metadata it changes (block
    /// map, bitmaps, size, times) joins the next commit, which every commit makes atomic
    /// as a whole. A write the free space cannot hold, or that starts at or past the
    /// largest file size, is refused before anything is written; one that crosses that
    /// size is cut short at it (`whole` refuses it instead: a writeback of cached pages
    /// cannot report a short count). One cut short by ENOSPC keeps the size of what it
    /// wrote and reports the error. `times` says whether the write stamps mtime and ctime
    /// (with the kernel's writeback cache the kernel owns them and sends them itself).
    pub fn write_with(
        &self,
        ino: Ino,
        offset: u64,
        data: &[u8],
        how: WriteMode,
    ) -> FsResult<usize> {
        // Written again whole if refused: the bytes a write cut short did write are the
        // same bytes again.
        self.waiting_for_space(|| self.write_once(ino, offset, data, how))
    }

    fn write_once(&self, ino: Ino, offset: u64, data: &[u8], how: WriteMode) -> FsResult<usize> {
        if offset >= MAX_FILE_SIZE && !data.is_empty() {
            return Err(FsError::TooBig);
        }
        let room = (MAX_FILE_SIZE - offset.min(MAX_FILE_SIZE)) as usize;
        if data.len() > room && how.whole {
            return Err(FsError::TooBig);
        }
        let data = &data[..data.len().min(room)];
        let data_lock = self.inode_data(ino);
        {
            // Whole-block overwrites share the inode's data lock; anything else holds it
            // alone, so its read-modify-write of partial blocks races no other write.
            let _shared = lock_order::inode_shared(data_lock);
            let mut g = self.lock();
            g.check_writable()?;
            if !g.node(ino)?.inode.is_reg() {
                return Err(FsError::Invalid("write to a non-regular file"));
            }
            // A block-aligned overwrite of written blocks within the file changes no
            // metadata but the times: its data goes to the device outside the lock, so
            // such writes (O_DIRECT random writes, to one file or many) run side by side.
            // The reuse guard, taken before the lock is let go, keeps the blocks it writes
            // from being reallocated until it is done, as for a read. Two such writes to
            // one block land in either order, as two overlapping writes may.
            if let Some(runs) = g.overwrite_plan(ino, offset, data.len())? {
                let (store, reuse) = (g.store.clone(), g.reuse.clone());
                let guard = lock_order::reuse_shared(&reuse);
                drop(g);
                let writes: Vec<(u64, &[u8])> = runs
                    .iter()
                    .map(|&(from, to, physical)| (physical, &data[from..to]))
                    .collect();
                let written = store.write_many(&writes);
                drop(guard);
                let mut g = self.lock();
                g.latch(written)?;
                g.finish_overwrite(ino, how.stamp_times);
                g.op_done()?;
                return Ok(data.len());
            }
        }
        let _exclusive = lock_order::inode_exclusive(data_lock);
        let mut g = self.lock();
        g.check_writable()?;
        if !g.node(ino)?.inode.is_reg() {
            return Err(FsError::Invalid("write to a non-regular file"));
        }
        // Refuse up front a write the free space cannot hold (with room for the extent
        // blocks it may need), rather than fail half-way.
        let needed = g.blocks_to_allocate(ino, offset, data.len() as u64)?;
        if needed > 0 && !g.can_allocate(needed + WRITE_RESERVE)? {
            return Err(FsError::NoSpace);
        }
        let before = g.changes;
        let mut done = 0;
        let mut result = Ok(());
        // Each chunk: new blocks mapped (unwritten) under the lock, the data written
        // without it, the blocks marked written and the size moved under it again.
        for chunk in data.chunks(1 << 20) {
            let at = offset + done as u64;
            // Mapping may allocate: no commit may run inside it. (Outside it the mapped
            // blocks are unwritten extents of a valid file: commits may carry them.)
            g.changing = true;
            let planned = g.plan_data_write(ino, at, chunk.len() as u64);
            g.changing = false;
            let runs = match planned {
                Ok(runs) => runs,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let (store, reuse) = (g.store.clone(), g.reuse.clone());
            let guard = lock_order::reuse_shared(&reuse);
            drop(g);
            let written = file::write_data_runs(store.as_ref(), &runs, at, chunk);
            drop(guard);
            g = self.lock();
            if let Err(e) = g.latch(written) {
                result = Err(e);
                break;
            }
            if let Err(e) = g.check_writable().and_then(|()| {
                g.publish_data_write(ino, &runs, at + chunk.len() as u64, how.stamp_times)
            }) {
                result = Err(e);
                break;
            }
            done += chunk.len();
        }
        match result {
            // Refused before it changed anything: nothing to undo, nothing to latch.
            Err(e) if g.changes == before => return Err(e),
            Err(FsError::NoSpace) => {
                g.commit()?;
                return Err(FsError::NoSpace);
            }
            Err(e) => {
                g.abort_tx();
                g.failed.get_or_insert_with(|| format!("write failed: {e}"));
                return Err(e);
            }
            Ok(()) => {}
        }
        g.op_done()?;
        Ok(done)
    }

    /// A write as `write(2)` makes it (`WriteMode::DIRECT`).
    pub fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> FsResult<usize> {
        self.write_with(ino, offset, data, WriteMode::DIRECT)
    }

    /// fallocate(2): mode 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE.
    pub fn fallocate(&self, ino: Ino, mode: i32, offset: u64, len: u64) -> FsResult<()> {
        self.waiting_for_space(|| self.fallocate_once(ino, mode, offset, len))
    }

    fn fallocate_once(&self, ino: Ino, mode: i32, offset: u64, len: u64) -> FsResult<()> {
        const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        // Allocation changes wait for the file's writes in flight (see `lock_order`).
        let _data = lock_order::inode_exclusive(self.inode_data(ino));
        if len == 0 {
            return Err(FsError::Invalid("fallocate of zero length"));
        }
        // Refuse up front what the free space cannot hold (as a write does): running out
        // half-way would leave a half-made transaction and turn the filesystem read-only.
        if mode & !KEEP_SIZE == 0 || mode & !KEEP_SIZE == ZERO {
            let mut g = self.lock();
            g.check_writable()?;
            let needed = if mode & !KEEP_SIZE == ZERO {
                len.div_ceil(BLOCK_SIZE as u64)
            } else {
                g.blocks_to_allocate(ino, offset, len)?
            };
            if needed > 0 && !g.can_allocate(needed + WRITE_RESERVE)? {
                return Err(FsError::NoSpace);
            }
        }
        self.mutate_once(|g| {
            if !g.node(ino)?.inode.is_reg() {
                return Err(FsError::Invalid("fallocate on a non-regular file"));
            }
            match mode {
                0 | KEEP_SIZE => g.preallocate(ino, offset, len, mode & KEEP_SIZE != 0),
                m if m == PUNCH | KEEP_SIZE => g.punch_hole(ino, offset, len),
                m if m & !KEEP_SIZE == ZERO => {
                    g.punch_hole(ino, offset, len)?;
                    g.preallocate(ino, offset, len, m & KEEP_SIZE != 0)
                }
                _ => Err(FsError::Unsupported("fallocate mode")),
            }
        })
    }

    pub fn fsync(&self, _ino: Ino) -> FsResult<()> {
        self.sync()
    }

    /// Every entry of a directory, as a snapshot (readdir serves from it).
    pub fn readdir(&self, dir: Ino) -> FsResult<Vec<DirEntry>> {
        self.read_only(|g| {
            if !g.node(dir)?.inode.is_dir() {
                return Err(FsError::NotDir);
            }
            g.dir_list(dir)
        })
    }

    /// The parent of a directory (for `..`).
    pub fn parent_of(&self, dir: Ino) -> FsResult<Ino> {
        self.read_only(|g| g.dir_parent(dir))
    }

    fn xattrs(g: &mut Inner, ino: Ino) -> FsResult<XattrSet> {
        let addr = g.node(ino)?.inode.xattr_block;
        if addr == 0 {
            return Ok(XattrSet::default());
        }
        let b = g.read_meta(addr)?;
        Ok(XattrSet::decode(&b[..], ino, formats::BlockAddr(addr))?)
    }

    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> FsResult<Vec<u8>> {
        self.read_only(|g| {
            Self::xattrs(g, ino)?
                .get(name)
                .map(|v| v.to_vec())
                .ok_or(FsError::NoAttr)
        })
    }

    pub fn listxattr(&self, ino: Ino) -> FsResult<Vec<Vec<u8>>> {
        self.read_only(|g| {
            Ok(Self::xattrs(g, ino)?
                .entries
                .into_iter()
                .map(|(n, _)| n)
                .collect())
        })
    }

    pub fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: XattrFlags) -> FsResult<()> {
        check_xattr_name(name)?;
        self.mutate(|g| {
            let mut set = Self::xattrs(g, ino)?;
            let exists = set.get(name).is_some();
            if flags.create && exists {
                return Err(FsError::Exists);
            }
            if flags.replace && !exists {
                return Err(FsError::NoAttr);
            }
            set.set(name, value).map_err(|_| FsError::NoSpace)?;
            g.reserve(2)?;
            g.store_xattrs(ino, &set)
        })
    }

    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> FsResult<()> {
        self.mutate(|g| {
            let mut set = Self::xattrs(g, ino)?;
            if !set.remove(name) {
                return Err(FsError::NoAttr);
            }
            g.store_xattrs(ino, &set)
        })
    }

    pub fn statfs(&self) -> StatFs {
        let g = self.lock();
        StatFs {
            blocks: g.geo.total_blocks,
            free_blocks: g.bbitmap.free(),
            files: g.geo.inode_count as u64,
            free_files: g.ibitmap.free(),
            block_size: BLOCK_SIZE as u32,
            name_max: MAX_NAME_LEN as u32,
        }
    }
}

impl Inner {
    /// Updates the access time of `ino` if `policy` says the access is due one. The change
    /// joins the next group commit: a read never waits for the journal.
    fn note_access(&mut self, ino: Ino, policy: Atime) -> FsResult<()> {
        if policy == Atime::Never || self.failed.is_some() {
            return Ok(());
        }
        let now = crate::mkfs::now();
        let n = self.node(ino)?;
        if atime_due(policy, &n.inode, now) {
            n.inode.atime = now;
            self.mark_dirty(ino);
        }
        Ok(())
    }

    /// Applies a `setattr`: a size change first (it may fail), then the other fields.
    fn apply_setattr(&mut self, ino: Ino, s: SetAttr) -> FsResult<()> {
        let g = self;
        let now = crate::mkfs::now();
        if let Some(size) = s.size {
            let n = g.node(ino)?;
            if n.inode.is_dir() {
                return Err(FsError::IsDir);
            }
            if !n.inode.is_reg() {
                return Err(FsError::Invalid("truncate of a special file"));
            }
            if size > MAX_FILE_SIZE {
                return Err(FsError::TooBig);
            }
            if size != n.inode.size || size == 0 {
                g.truncate(ino, size)?;
            } else {
                n.inode.mtime = now;
            }
        }
        let n = g.node(ino)?;
        if let Some(mode) = s.mode {
            n.inode.mode = (n.inode.mode & S_IFMT) | (mode & 0o7777);
        }
        if let Some(uid) = s.uid {
            n.inode.uid = uid;
        }
        if let Some(gid) = s.gid {
            n.inode.gid = gid;
        }
        match s.atime {
            Some(TimeSet::Now) => n.inode.atime = now,
            Some(TimeSet::At(t)) => n.inode.atime = t,
            None => {}
        }
        match s.mtime {
            Some(TimeSet::Now) => n.inode.mtime = now,
            Some(TimeSet::At(t)) => n.inode.mtime = t,
            None => {}
        }
        n.inode.ctime = s.ctime.unwrap_or(now);
        g.mark_dirty(ino);
        Ok(())
    }

    fn store_xattrs(&mut self, ino: Ino, set: &XattrSet) -> FsResult<()> {
        let now = crate::mkfs::now();
        let old = self.node(ino)?.inode.xattr_block;
        let addr = if set.entries.is_empty() {
            if old != 0 {
                self.free_blocks_tx(old, 1);
            }
            0
        } else if old != 0 {
            old
        } else {
            self.alloc_blocks(self.geo.data_start, 1)?.0
        };
        if addr != 0 {
            let blk = set.encode(ino, formats::BlockAddr(addr))?;
            self.stage(addr, blk);
        }
        let n = self.node(ino)?;
        n.inode.xattr_block = addr;
        n.inode.ctime = now;
        self.mark_dirty(ino);
        Ok(())
    }
}
