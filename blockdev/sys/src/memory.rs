//! Memfds and shared mappings of files.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use memmap2::{MmapMut, MmapRaw};

use crate::cvt;

/// Creates a close-on-exec memfd named `name` of `len` bytes (zeros), sealed against
/// shrinking, so no holder of a descriptor can truncate it under a mapping.
pub fn memfd_create(name: &CStr, len: u64) -> io::Result<File> {
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the flags are
    // valid constants.
    let fd = cvt(unsafe {
        libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    add_seals(&file, libc::F_SEAL_SHRINK)?;
    Ok(file)
}

/// Creates a close-on-exec memfd named `name` holding `data`, sealed against every
/// change (write, grow, shrink, further seals): whoever is handed it reads exactly what
/// was written here.
pub fn memfd_sealed(name: &CStr, data: &[u8]) -> io::Result<File> {
    use std::io::Write;
    // SAFETY: as in `memfd_create`.
    let fd = cvt(unsafe {
        libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(data)?;
    add_seals(
        &file,
        libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
    )?;
    Ok(file)
}

/// Whether `file` is a memfd sealed against every change (as [`memfd_sealed`] makes).
pub fn is_fully_sealed(file: &File) -> bool {
    let all = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: F_GET_SEALS only reads the file's seals.
    matches!(cvt(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) }), Ok(s) if s & all == all)
}

fn add_seals(file: &File, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int argument; `file` keeps the descriptor open.
    cvt(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) }).map(|_| ())
}

/// Maps the whole of memfd `file` shared, readable and writable.
///
/// Fails with `InvalidInput` when `file` is not a memfd (or another sealable shared-memory
/// file): only those are accepted, because they have no name in any filesystem that
/// another process could open. A memfd that allows sealing and is not yet sealed against
/// shrinking is sealed here (every memfd [`memfd_create`] makes already is), so the
/// mapping cannot lose its pages under it.
///
/// # Sharing
/// The bytes are shared with every process holding a descriptor of the memfd. The
/// returned slice is sound only while no other process writes them: Molt passes such a
/// memfd only between its own processes, of which one writes at a time (the redo log: the
/// supervisor keeps a descriptor and never maps it; a successor server maps it only after
/// its predecessor has stopped writing).
pub fn map_memfd(file: &File) -> io::Result<MmapMut> {
    // SAFETY: F_GET_SEALS only reads the file's seals; it fails with EINVAL on any file
    // that is not a memfd or other sealable shared memory.
    let seals = match cvt(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) }) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a memfd: only a memfd is mapped shared",
            ))
        }
        Err(e) => return Err(e),
    };
    if seals & libc::F_SEAL_SHRINK == 0 && seals & libc::F_SEAL_SEAL == 0 {
        match add_seals(file, libc::F_SEAL_SHRINK) {
            // A memfd made without MFD_ALLOW_SEALING (by an older build) cannot be sealed.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            r => r?,
        }
    }
    // SAFETY: memmap2 makes this call unsafe because a file's bytes may change under the
    // mapping, or its pages vanish when it is truncated. `file` is a memfd (checked
    // above), reachable only through descriptors, not by any path; it is sealed against
    // shrinking wherever the memfd allows seals; and the one-writer rule of the
    // function's documentation, which Molt's processes keep, rules out the rest.
    unsafe { MmapMut::map_mut(file) }
}

/// A shared, writable mapping of a file, touched only by copying into and out of it: no
/// reference to the mapped bytes is ever handed out, so another process changing the
/// file concurrently changes what a later copy sees, nothing more. Unmapped when dropped.
#[derive(Debug)]
pub struct SharedMapping {
    map: MmapRaw,
}

impl SharedMapping {
    /// Maps the whole of `file` (open for reading and writing) `MAP_SHARED`, readable and
    /// writable.
    pub fn new(file: &File) -> io::Result<SharedMapping> {
        Ok(SharedMapping {
            map: MmapRaw::map_raw(file)?,
        })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    fn check(&self, off: usize, len: usize) -> io::Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.map.len() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range outside the mapping",
            )),
        }
    }

    /// Copies `data` into the mapping at byte `off`.
    pub fn write_at(&self, off: usize, data: &[u8]) -> io::Result<()> {
        self.check(off, data.len())?;
        // SAFETY: `off..off + data.len()` lies inside the mapping (checked), which stays
        // mapped while `self` lives; the source is a separate, live slice, so the ranges
        // do not overlap. The destination is written through a raw pointer only.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.map.as_mut_ptr().add(off), data.len())
        };
        Ok(())
    }

    /// Copies `buf.len()` bytes of the mapping from byte `off` into `buf`.
    pub fn read_at(&self, off: usize, buf: &mut [u8]) -> io::Result<()> {
        self.check(off, buf.len())?;
        // SAFETY: `off..off + buf.len()` lies inside the mapping (checked), which stays
        // mapped while `self` lives; `buf` is a separate, live, writable slice. The source
        // is read through a raw pointer only.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(off), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Writes the mapping's dirty pages back to the file and waits (`msync(MS_SYNC)`).
    pub fn sync(&self) -> io::Result<()> {
        self.map.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_memfd_holds_its_bytes_and_refuses_changes() {
        use std::io::{Read, Seek, Write};
        let mut f = memfd_sealed(c"molt-test", b"state").unwrap();
        assert!(is_fully_sealed(&f));
        assert!(f.write_all(b"x").is_err());
        assert!(f.set_len(1).is_err());
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "state");
        assert!(!is_fully_sealed(&memfd_create(c"molt-test", 8).unwrap()));
    }
    use std::io::{Read, Seek};

    #[test]
    fn a_memfd_maps_and_refuses_to_shrink() {
        let f = memfd_create(c"molt-sys-test", 8192).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 8192);
        let mut map = map_memfd(&f).unwrap();
        assert_eq!(map.len(), 8192);
        map[10] = 7;
        let mut b = [0u8; 11];
        (&f).read_exact(&mut b).unwrap();
        assert_eq!(b[10], 7);
        assert!(f.set_len(4096).is_err(), "sealed against shrinking");
    }

    #[test]
    fn only_a_memfd_is_mapped() {
        let path = std::env::temp_dir().join(format!("molt-sys-map-{}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(4096).unwrap();
        let e = map_memfd(&f).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // Any file maps as a shared mapping that is only copied into and out of.
        let m = SharedMapping::new(&f).unwrap();
        m.write_at(100, b"molt").unwrap();
        m.sync().unwrap();
        let mut got = [0u8; 4];
        m.read_at(100, &mut got).unwrap();
        assert_eq!(&got, b"molt");
        let mut f2 = File::open(&path).unwrap();
        f2.seek(std::io::SeekFrom::Start(100)).unwrap();
        f2.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"molt");
        assert!(m.write_at(4093, b"molt").is_err());
        assert!(m.read_at(usize::MAX, &mut got).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
