//! `mount(2)` and `umount2(2)`.

use std::ffi::CStr;
use std::io;

use crate::cvt;

/// `mount(2)`: mounts `source` of type `fstype` on `target` with `flags` (`MS_*`) and the
/// option string `data`.
pub fn mount(
    source: &CStr,
    target: &CStr,
    fstype: &CStr,
    flags: libc::c_ulong,
    data: &CStr,
) -> io::Result<()> {
    // SAFETY: every pointer is a NUL-terminated string that outlives the call; the kernel
    // only reads them.
    cvt(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    })
    .map(|_| ())
}

/// `umount2(2)`: detaches the mount on `target`; `flags` as `MNT_DETACH`, `MNT_FORCE`.
pub fn unmount(target: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `target` is a NUL-terminated string that outlives the call.
    cvt(unsafe { libc::umount2(target.as_ptr(), flags) }).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmounting_what_is_not_a_mount_fails() {
        let e = unmount(c"/nonexistent-molt-sys-mountpoint", 0).unwrap_err();
        assert!(
            matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::EPERM | libc::EINVAL)
            ),
            "{e}"
        );
    }
}
