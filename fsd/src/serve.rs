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

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseChannel, FuseSession};

use crate::fuse::MoltFuse;

/// Bytes the kernel may put in one request: the library's fixed read buffer.
pub const MAX_READ: usize = 1_052_672 - 4096;

/// Opens `/dev/fuse` for a new connection.
pub fn open_fuse_device() -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
}

/// Mounts a FUSE connection `dev` on `mountpoint` (root only).
pub fn mount_fuse(dev: &File, mountpoint: &Path, fsname: &str) -> io::Result<()> {
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
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches a mount. `lazy` uses MNT_DETACH.
pub fn unmount(mountpoint: &Path, lazy: bool) -> io::Result<()> {
    let target = CString::new(mountpoint.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in mountpoint"))?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `target` is a NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(target.as_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
pub fn stop_serving(session: &FuseSession, stopping: &AtomicBool) -> io::Result<()> {
    stopping.store(true, Ordering::SeqCst);
    session.wake().map_err(|e| io::Error::other(e.to_string()))
}

/// Serves requests with `threads` workers until `stop_serving` wakes them or the
/// connection ends. Workers return only between requests, never holding one unanswered.
pub fn serve(
    server: Arc<Server<Arc<MoltFuse>>>,
    session: &FuseSession,
    threads: usize,
    stopping: Arc<AtomicBool>,
) -> io::Result<StopReason> {
    let mut workers = Vec::new();
    for i in 0..threads.max(1) {
        let ch = session.new_channel().map_err(|e| io::Error::other(e.to_string()))?;
        let server = server.clone();
        let stopping = stopping.clone();
        let name = format!("fuse-{i}");
        workers.push(thread::Builder::new().name(name).spawn(move || worker(server, ch, &stopping))?);
    }
    let mut reason = StopReason::Woken;
    for w in workers {
        if w.join().unwrap_or(StopReason::Disconnected) == StopReason::Disconnected {
            reason = StopReason::Disconnected;
        }
    }
    Ok(reason)
}

fn worker(server: Arc<Server<Arc<MoltFuse>>>, mut ch: FuseChannel, stopping: &AtomicBool) -> StopReason {
    loop {
        match ch.get_request() {
            Ok(Some((reader, writer))) => {
                if let Err(e) = server.handle_message(reader, writer.into(), None, None) {
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

/// Descriptors `fsd serve` is started with.
pub struct ServerFds {
    pub ring: std::os::fd::OwnedFd,
    pub sq_eventfd: std::os::fd::OwnedFd,
    pub cq_eventfd: std::os::fd::OwnedFd,
    pub fuse: File,
    pub ctl: std::os::unix::net::UnixStream,
}

/// The filesystem server process: mounts the image over the ring, tells the supervisor
/// (line protocol on `ctl`: "fs-ready", then waits for "mounted", then "serving"), serves
/// until the kernel ends the connection, then makes the image clean.
pub fn run_server(
    mountpoint: &Path,
    driver_pid: Option<i32>,
    threads: usize,
    fds: ServerFds,
) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let mut ctl = fds.ctl;
    let mut reader = BufReader::new(ctl.try_clone()?);
    let setup = || -> anyhow::Result<(Arc<crate::fs::Fs>, FuseSession)> {
        let ring = blockdev::ring::RingRegion::open(fds.ring)?;
        let pidfd = driver_pid.map(pidfd_open).transpose()?;
        let client = blockdev::Client::connect(
            ring,
            fds.sq_eventfd,
            fds.cq_eventfd,
            pidfd,
            Default::default(),
        )?;
        let fs = Arc::new(crate::fs::Fs::mount(Arc::new(client))?);
        let mut session = FuseSession::new(mountpoint, "molt", "molt", false)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        session.set_fuse_file(fds.fuse);
        Ok((fs, session))
    };
    let (fs, session) = match setup() {
        Ok(v) => v,
        Err(e) => {
            let _ = writeln!(ctl, "error: {e:#}");
            return Err(e);
        }
    };
    writeln!(ctl, "fs-ready")?;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.trim() != "mounted" {
        anyhow::bail!("supervisor did not mount: {line:?}");
    }
    let server = Arc::new(Server::new(Arc::new(MoltFuse::new(fs.clone()))));
    let session = Arc::new(session);
    let worker_session = session.clone();
    let stopping = Arc::new(AtomicBool::new(false));
    let serving = thread::spawn(move || serve(server, &worker_session, threads, stopping));
    writeln!(ctl, "serving")?;
    let reason = serving
        .join()
        .map_err(|_| anyhow::anyhow!("serve loop panicked"))??;
    // Dropping a session unmounts by path; the mount is gone or handed over already.
    std::mem::forget(session);
    if reason == StopReason::Disconnected {
        fs.unmount()?;
    }
    Ok(())
}

/// A pidfd for `pid` (the block driver), so ring waits notice its death at once.
fn pidfd_open(pid: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor returned by the kernel and owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}
