//! The FUSE serve loop of the filesystem process and the `mount(2)` call that attaches a
//! `/dev/fuse` connection to a mountpoint.

use crate::persist::Transport;
use fsd_core::fs::Atime;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The newest FUSE protocol minor version this server speaks.
pub const FUSE_MINOR_VERSION: u32 = molt_fuse::abi::KERNEL_MINOR_VERSION;

/// The largest READ the kernel sends: the largest request the FUSE layer negotiates.
pub(crate) const MAX_READ: usize = molt_fuse::MAX_PAGES as usize * 4096;

/// Opens `/dev/fuse` for a new connection.
/// Non-blocking: several workers wait for the same request in epoll, and the ones that
/// lose the race must go back to waiting (where a wake-up reaches them), not block in
/// read(2) until the next request arrives. Every server process shares this flag.
pub fn open_fuse_device() -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/fuse")
}

/// The per-mount flags the kernel mount carries (as mount(8) spells them). Defaults:
/// read-write, no device files and no set-id execution (the safe choice for images of
/// unknown origin), programs may run, and `relatime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountFlags {
    /// `ro`: the kernel refuses every write (EROFS) and the server opens the image
    /// without writing to it.
    pub read_only: bool,
    pub dev: bool,
    pub suid: bool,
    pub exec: bool,
    pub atime: Atime,
}

impl Default for MountFlags {
    fn default() -> MountFlags {
        MountFlags {
            read_only: false,
            dev: false,
            suid: false,
            exec: true,
            atime: Atime::Relative,
        }
    }
}

impl MountFlags {
    /// Applies one option if it is one of these flags; returns whether it was. A later
    /// option overrides an earlier one.
    pub fn apply(&mut self, opt: &str) -> bool {
        match opt {
            "ro" => self.read_only = true,
            "rw" => self.read_only = false,
            "dev" => self.dev = true,
            "nodev" => self.dev = false,
            "suid" => self.suid = true,
            "nosuid" => self.suid = false,
            "exec" => self.exec = true,
            "noexec" => self.exec = false,
            "relatime" => self.atime = Atime::Relative,
            "strictatime" => self.atime = Atime::Always,
            "noatime" => self.atime = Atime::Never,
            _ => return false,
        }
        true
    }

    /// The option list that gives these flags.
    pub fn to_options(self) -> String {
        let atime = match self.atime {
            Atime::Never => "noatime",
            Atime::Relative => "relatime",
            Atime::Always => "strictatime",
        };
        format!(
            "{},{},{},{},{atime}",
            if self.read_only { "ro" } else { "rw" },
            if self.dev { "dev" } else { "nodev" },
            if self.suid { "suid" } else { "nosuid" },
            if self.exec { "exec" } else { "noexec" },
        )
    }

    fn ms_flags(self) -> libc::c_ulong {
        let mut ms = 0;
        if self.read_only {
            ms |= libc::MS_RDONLY;
        }
        if !self.dev {
            ms |= libc::MS_NODEV;
        }
        if !self.suid {
            ms |= libc::MS_NOSUID;
        }
        if !self.exec {
            ms |= libc::MS_NOEXEC;
        }
        ms | match self.atime {
            Atime::Never => libc::MS_NOATIME,
            Atime::Relative => libc::MS_RELATIME,
            Atime::Always => libc::MS_STRICTATIME,
        }
    }
}

/// The access-time policy the mount at `mountpoint` has now (it follows a remount), read
/// from this process's mount table; `None` if it is not mounted.
pub(crate) fn atime_of_mount(mountpoint: &Path) -> Option<Atime> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mountpoint.as_os_str().to_string_lossy();
    // Fields: id parent dev root mountpoint options ...; octal escapes in paths.
    table.lines().rev().find_map(|line| {
        let mut fields = line.split(' ');
        let point = fields.nth(4)?;
        if unescape_mount_path(point) != want {
            return None;
        }
        let opts = fields.next()?;
        Some(if opts.split(',').any(|o| o == "noatime") {
            Atime::Never
        } else if opts.split(',').any(|o| o == "relatime") {
            Atime::Relative
        } else {
            Atime::Always
        })
    })
}

/// Mounts a FUSE connection `dev` on `mountpoint` (root only).
/// A path as `/proc/self/mounts` writes it, with its octal escapes undone.
pub fn unescape_mount_path(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

pub fn mount_fuse(
    dev: &File,
    mountpoint: &Path,
    fsname: &str,
    flags: MountFlags,
) -> io::Result<()> {
    let meta = std::fs::metadata(mountpoint)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "mountpoint is not a directory",
        ));
    }
    let opts = format!(
        "fd={},rootmode={:o},user_id=0,group_id=0,default_permissions,allow_other,max_read={}",
        dev.as_raw_fd(),
        meta.permissions().mode() & libc::S_IFMT,
        MAX_READ
    );
    let c = |s: &str| {
        CString::new(s)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in mount argument"))
    };
    let source = c(fsname)?;
    let target = CString::new(mountpoint.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in mountpoint"))?;
    let fstype = c("fuse.molt")?;
    let data = c(&opts)?;
    let flags = flags.ms_flags();
    molt_sys::mount(&source, &target, &fstype, flags, &data)
}

/// Detaches a mount. `lazy` uses MNT_DETACH.
pub fn unmount(mountpoint: &Path, lazy: bool) -> io::Result<()> {
    let target = CString::new(mountpoint.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in mountpoint"))?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    molt_sys::unmount(&target, flags)
}

/// Fd numbers `fsd serve` receives its descriptors on (the supervisor passes them there).
pub const SERVE_RING_FD: i32 = 3;
pub const SERVE_SQ_FD: i32 = 4;
pub const SERVE_CQ_FD: i32 = 5;
pub const SERVE_FUSE_FD: i32 = 6;
pub const SERVE_CTL_FD: i32 = 7;
pub const SERVE_REDO_FD: i32 = 8;
pub const SERVE_SESSION_FD: i32 = 9;

/// Descriptors `fsd serve` is started with.
pub struct ServerFds {
    pub ring: std::os::fd::OwnedFd,
    pub sq_eventfd: std::os::fd::OwnedFd,
    pub cq_eventfd: std::os::fd::OwnedFd,
    pub fuse: File,
    pub ctl: std::os::unix::net::UnixStream,
    /// The redo log (a memfd the supervisor keeps across server processes).
    pub redo: File,
    /// The connection's record (a memfd the supervisor keeps across server processes):
    /// what its INIT negotiated, for a server that recovers from its predecessor's death.
    pub session: File,
}

/// The transport `fsd mount --transport` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// `/dev/fuse`: every update nature and crash recovery work over it.
    #[default]
    Dev,
    /// FUSE over io_uring (refused if the kernel cannot).
    Uring,
    /// io_uring when the kernel has it (switching it on as root), else `/dev/fuse`.
    Auto,
}

impl std::str::FromStr for TransportChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dev" => Ok(TransportChoice::Dev),
            "uring" => Ok(TransportChoice::Uring),
            "auto" => Ok(TransportChoice::Auto),
            other => Err(format!("unknown transport {other:?} (auto, uring or dev)")),
        }
    }
}

impl TransportChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            TransportChoice::Dev => "dev",
            TransportChoice::Uring => "uring",
            TransportChoice::Auto => "auto",
        }
    }
}

/// The transport a mount gets for `choice`, and for `auto` without io_uring the reason
/// (one log line's worth). `uring` fails when this kernel cannot serve it.
pub fn resolve_transport(choice: TransportChoice) -> io::Result<(Transport, Option<String>)> {
    use molt_fuse::transport::uring::{enable, kernel_support, Support};
    let support = match kernel_support() {
        Support::Disabled => match enable() {
            Ok(()) => Support::Enabled,
            Err(e) => Support::Unavailable(format!("switching FUSE over io_uring on: {e}")),
        },
        s => s,
    };
    match (choice, support) {
        (TransportChoice::Dev, _) => Ok((Transport::Dev, None)),
        (_, Support::Enabled) => Ok((Transport::Uring, None)),
        (TransportChoice::Uring, Support::Unavailable(why)) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("FUSE over io_uring is not available: {why}"),
        )),
        (_, Support::Unavailable(why)) => Ok((Transport::Dev, Some(why))),
        (_, Support::Disabled) => Ok((Transport::Dev, Some("enable_uring is off".into()))),
    }
}

/// How `fsd serve` starts.
#[derive(Debug, Clone)]
pub struct ServerArgs {
    pub mountpoint: std::path::PathBuf,
    pub threads: usize,
    /// How requests arrive (the supervisor resolved `auto`).
    pub transport: Transport,
    /// Take over from a running predecessor (live update) instead of mounting.
    pub adopt: bool,
    /// Take over from a predecessor that died (the `n`-th recovery of this mount).
    pub recover: Option<u64>,
    /// The mount is read-only: the image is opened without a write, in every start mode.
    pub read_only: bool,
    /// Listen on `molt_control::relink_socket_path(dir, "fsd", pid)` for a supervisor
    /// that replaces a lost one (`molt_control::Relink`).
    pub relink_dir: Option<std::path::PathBuf>,
}
