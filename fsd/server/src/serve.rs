//! The FUSE serve loop of the filesystem process and the `mount(2)` call that attaches a
//! `/dev/fuse` connection to a mountpoint.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use fuse_backend_rs::abi::fuse_abi::InHeader;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseChannel, FuseSession};

use crate::fuse::MoltFuse;
use fsd_core::fs::Atime;

/// The kernel marks a request it resends (FUSE_NOTIFY_RESEND) with this bit of `unique`.
const RESEND_BIT: u64 = 1 << 63;

/// Bytes the kernel may put in one request: the library's fixed read buffer.
pub(crate) const MAX_READ: usize = 1_052_672 - 4096;

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

/// The per-mount options `fsd mount -o` takes (as mount(8) spells them). Defaults: no
/// device files and no set-id execution (the safe choice for images of unknown origin),
/// programs may run, and `relatime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountFlags {
    pub dev: bool,
    pub suid: bool,
    pub exec: bool,
    pub atime: Atime,
}

impl Default for MountFlags {
    fn default() -> MountFlags {
        MountFlags {
            dev: false,
            suid: false,
            exec: true,
            atime: Atime::Relative,
        }
    }
}

impl MountFlags {
    /// Parses a comma-separated option list; a later option overrides an earlier one. An
    /// option this version does not know is refused with its name.
    pub fn parse(list: &str) -> Result<MountFlags, String> {
        let mut f = MountFlags::default();
        for opt in list.split(',').filter(|o| !o.is_empty()) {
            match opt {
                "dev" => f.dev = true,
                "nodev" => f.dev = false,
                "suid" => f.suid = true,
                "nosuid" => f.suid = false,
                "exec" => f.exec = true,
                "noexec" => f.exec = false,
                "relatime" => f.atime = Atime::Relative,
                "strictatime" => f.atime = Atime::Always,
                "noatime" => f.atime = Atime::Never,
                other => return Err(format!("unknown mount option {other:?}")),
            }
        }
        Ok(f)
    }

    /// The option list that parses back to these flags.
    pub fn to_options(self) -> String {
        let atime = match self.atime {
            Atime::Never => "noatime",
            Atime::Relative => "relatime",
            Atime::Always => "strictatime",
        };
        format!(
            "{},{},{},{atime}",
            if self.dev { "dev" } else { "nodev" },
            if self.suid { "suid" } else { "nosuid" },
            if self.exec { "exec" } else { "noexec" },
        )
    }

    fn ms_flags(self) -> libc::c_ulong {
        let mut ms = 0;
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

/// Why the serve loop returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `FuseSession::wake` asked the workers to return between requests.
    Woken,
    /// The kernel ended the connection (unmount or abort).
    Disconnected,
}

/// Asks the workers of `serve` to return between requests.
pub(crate) fn stop_serving(session: &FuseSession, stopping: &AtomicBool) -> io::Result<()> {
    stopping.store(true, Ordering::SeqCst);
    session.wake().map_err(|e| io::Error::other(e.to_string()))
}

/// Opens one channel per worker. Done before the serve loop starts, so that a
/// `stop_serving` issued as soon as serving is announced reaches every worker.
pub(crate) fn open_channels(session: &FuseSession, threads: usize) -> io::Result<Vec<FuseChannel>> {
    (0..threads.max(1))
        .map(|_| {
            session
                .new_channel()
                .map_err(|e| io::Error::other(e.to_string()))
        })
        .collect()
}

/// Serves requests on `channels`, one worker each, until `stop_serving` wakes them or the
/// connection ends. Workers return only between requests, never holding one unanswered.
pub fn serve(
    molt: Arc<MoltFuse>,
    channels: Vec<FuseChannel>,
    stopping: Arc<AtomicBool>,
) -> io::Result<StopReason> {
    let server = Arc::new(Server::new(molt.clone()));
    let mut workers = Vec::new();
    for (i, ch) in channels.into_iter().enumerate() {
        let server = server.clone();
        let stopping = stopping.clone();
        let molt = molt.clone();
        let name = format!("fuse-{i}");
        workers.push(
            thread::Builder::new()
                .name(name)
                .spawn(move || worker(server, ch, &stopping, &molt))?,
        );
    }
    let mut reason = StopReason::Woken;
    for w in workers {
        if w.join().unwrap_or(StopReason::Disconnected) == StopReason::Disconnected {
            reason = StopReason::Disconnected;
        }
    }
    Ok(reason)
}

fn worker(
    server: Arc<Server<Arc<MoltFuse>>>,
    mut ch: FuseChannel,
    stopping: &AtomicBool,
    molt: &MoltFuse,
) -> StopReason {
    loop {
        match ch.get_request() {
            Ok(Some((reader, writer))) => {
                molt.requests.fetch_add(1, Ordering::Relaxed);
                // The request id goes with the operation's changes to the redo log; a
                // request resent after a crash is marked so that one already completed
                // is answered, not run again.
                let unique = reader
                    .clone()
                    .read_obj::<InHeader>()
                    .map(|h| h.unique)
                    .unwrap_or(0);
                fsd_core::fs::redo::set_current_request(unique & !RESEND_BIT);
                crate::fuse::set_replay(unique & RESEND_BIT != 0 && molt.completed_before(unique));
                let r = server.handle_message(reader, writer.into(), None, None);
                fsd_core::fs::redo::set_current_request(0);
                crate::fuse::set_replay(false);
                if let Err(e) = r {
                    if let fuse_backend_rs::Error::EncodeMessage(io_err) = &e {
                        if io_err.raw_os_error() == Some(libc::ENODEV)
                            || io_err.raw_os_error() == Some(libc::EBADF)
                        {
                            return StopReason::Disconnected;
                        }
                    }
                    eprintln!("fsd: request failed: {e}");
                }
            }
            // The library reports both a wake-up and an unmount (ENODEV) as `None`.
            Ok(None) if stopping.load(Ordering::SeqCst) => return StopReason::Woken,
            Ok(None) => return StopReason::Disconnected,
            Err(_) => return StopReason::Disconnected,
        }
    }
}

/// Asks the kernel to queue again every request read from this connection and not yet
/// answered (FUSE_NOTIFY_RESEND): after a crash, those of the dead server.
pub(crate) fn notify_resend(session: &FuseSession) -> io::Result<()> {
    use std::io::Write;
    const NOTIFY_RESEND: i32 = 7;
    let file = session
        .get_fuse_file()
        .ok_or_else(|| io::Error::other("no FUSE connection"))?;
    // fuse_out_header: len, error (the notify code), unique 0.
    let mut msg = [0u8; 16];
    msg[0..4].copy_from_slice(&16u32.to_le_bytes());
    msg[4..8].copy_from_slice(&NOTIFY_RESEND.to_le_bytes());
    (&*file).write_all(&msg)
}

/// Fd numbers `fsd serve` receives its descriptors on (the supervisor passes them there).
pub const SERVE_RING_FD: i32 = 3;
pub const SERVE_SQ_FD: i32 = 4;
pub const SERVE_CQ_FD: i32 = 5;
pub const SERVE_FUSE_FD: i32 = 6;
pub const SERVE_CTL_FD: i32 = 7;
pub const SERVE_REDO_FD: i32 = 8;

/// Descriptors `fsd serve` is started with.
pub struct ServerFds {
    pub ring: std::os::fd::OwnedFd,
    pub sq_eventfd: std::os::fd::OwnedFd,
    pub cq_eventfd: std::os::fd::OwnedFd,
    pub fuse: File,
    pub ctl: std::os::unix::net::UnixStream,
    /// The redo log (a memfd the supervisor keeps across server processes).
    pub redo: File,
}

/// How `fsd serve` starts.
#[derive(Debug, Clone)]
pub struct ServerArgs {
    pub mountpoint: std::path::PathBuf,
    pub threads: usize,
    /// Take over from a running predecessor (live update) instead of mounting.
    pub adopt: bool,
    /// Take over from a predecessor that died (the `n`-th recovery of this mount).
    pub recover: Option<u64>,
}
