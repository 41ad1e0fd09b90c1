//! Files by path and by handle, and the kernel's plain structs.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::cvt;

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(OsStr::as_bytes(p.as_os_str()))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

/// `truncate(2)`: sets the length of the file at `path` (by path, not through an open
/// file, unlike `File::set_len`).
pub fn truncate(path: &Path, len: u64) -> io::Result<()> {
    let c = c_path(path)?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    cvt(unsafe { libc::truncate(c.as_ptr(), len) }).map(|_| ())
}

/// `MAX_HANDLE_SZ`: the largest file handle the kernel makes.
const MAX_HANDLE_SZ: usize = 128;

/// A file handle (`name_to_handle_at(2)`): names a file on its filesystem independently of
/// any path, as NFS exports do.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FileHandle {
    // The kernel's `struct file_handle` with room for the largest handle; only
    // `name_to_handle_at` fills it, so `handle_bytes` never exceeds that room.
    handle_bytes: u32,
    handle_type: libc::c_int,
    f_handle: [u8; MAX_HANDLE_SZ],
}

impl std::fmt::Debug for FileHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "handle type {:#x} [", self.handle_type)?;
        for b in self.bytes() {
            write!(f, "{b:02x}")?;
        }
        write!(f, "]")
    }
}

impl FileHandle {
    /// The handle of the file at `path` (symbolic links not followed at the end) and the
    /// id of the mount it is on.
    pub fn of(path: &Path) -> io::Result<(FileHandle, libc::c_int)> {
        let c = c_path(path)?;
        let mut h = FileHandle {
            handle_bytes: MAX_HANDLE_SZ as u32,
            handle_type: 0,
            f_handle: [0; MAX_HANDLE_SZ],
        };
        let mut mount_id: libc::c_int = 0;
        // SAFETY: `c` is NUL-terminated; `h` is a `struct file_handle` header followed by
        // `handle_bytes` bytes of room (repr(C)), and `mount_id` a valid out pointer; all
        // outlive the call.
        cvt(unsafe {
            libc::name_to_handle_at(
                libc::AT_FDCWD,
                c.as_ptr(),
                (&mut h as *mut FileHandle).cast(),
                &mut mount_id,
                0,
            )
        })?;
        Ok((h, mount_id))
    }

    /// The handle's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.f_handle[..(self.handle_bytes as usize).min(MAX_HANDLE_SZ)]
    }

    /// `open_by_handle_at(2)`: opens the file this handle names on the filesystem of
    /// `mount` (any descriptor on it) with `flags` (`O_*`; close-on-exec is added). Needs
    /// `CAP_DAC_READ_SEARCH`.
    pub fn open(&self, mount: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<File> {
        let mut h = *self;
        // SAFETY: `h` is a complete `struct file_handle` (header and `handle_bytes` <=
        // MAX_HANDLE_SZ bytes, as the kernel filled it) that outlives the call; `mount` is
        // borrowed, so open for the call.
        let fd = cvt(unsafe {
            libc::open_by_handle_at(
                mount.as_raw_fd(),
                (&mut h as *mut FileHandle).cast(),
                flags | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

/// An all-zero `stat64`, to fill in field by field (it has private padding fields, so
/// it cannot be written as a literal).
pub fn zeroed_stat64() -> libc::stat64 {
    // SAFETY: stat64 is a plain C struct of integers; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// An all-zero `statvfs64`, to fill in field by field (it has private padding fields).
pub fn zeroed_statvfs64() -> libc::statvfs64 {
    // SAFETY: statvfs64 is a plain C struct of integers; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_sets_the_length_by_path() {
        let p = std::env::temp_dir().join(format!("molt-sys-trunc-{}", std::process::id()));
        std::fs::write(&p, b"0123456789").unwrap();
        truncate(&p, 4).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"0123");
        truncate(&p, 6).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"0123\0\0");
        std::fs::remove_file(&p).unwrap();
        assert_eq!(truncate(&p, 0).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn zeroed_structs_are_zero() {
        assert_eq!(zeroed_stat64().st_ino, 0);
        assert_eq!(zeroed_statvfs64().f_blocks, 0);
    }

    #[test]
    fn a_handle_names_one_file() {
        let dir = std::env::temp_dir();
        let p = dir.join(format!("molt-sys-handle-{}", std::process::id()));
        std::fs::write(&p, b"x").unwrap();
        match FileHandle::of(&p) {
            Ok((h, _)) => {
                assert!(!h.bytes().is_empty());
                assert_eq!(h, FileHandle::of(&p).unwrap().0);
            }
            // Not every filesystem the temporary directory may be on exports handles.
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}"),
        }
        std::fs::remove_file(&p).unwrap();
    }
}
