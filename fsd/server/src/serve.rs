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
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::InHeader;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseChannel, FuseSession};

use crate::fuse::MoltFuse;
use fsd_core::fs::Atime;

/// The kernel marks a request it resends (FUSE_NOTIFY_RESEND) with this bit of `unique`.
const RESEND_BIT: u64 = 1 << 63;

/// Bytes the kernel may put in one request: the library's fixed read buffer.
pub const MAX_READ: usize = 1_052_672 - 4096;

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
pub fn atime_of_mount(mountpoint: &Path) -> Option<Atime> {
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
pub fn stop_serving(session: &FuseSession, stopping: &AtomicBool) -> io::Result<()> {
    stopping.store(true, Ordering::SeqCst);
    session.wake().map_err(|e| io::Error::other(e.to_string()))
}

/// Opens one channel per worker. Done before the serve loop starts, so that a
/// `stop_serving` issued as soon as serving is announced reaches every worker.
pub fn open_channels(session: &FuseSession, threads: usize) -> io::Result<Vec<FuseChannel>> {
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

/// Inodes one background conversion step moves (one journal transaction, one lock hold).
const CONVERT_BATCH: u64 = 64;

/// Progress of the on-disk format conversion this server runs, for `status`.
#[derive(Default)]
struct Conversion {
    /// When this server started (or resumed) converting, and how far it was then.
    since: std::sync::Mutex<Option<(Instant, u64)>>,
    done: std::sync::atomic::AtomicU64,
    total: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
    /// Inodes moved to the new layout by this server.
    inodes: std::sync::atomic::AtomicU64,
    /// The longest conversion step, microseconds; all steps and their total time.
    longest_step_us: std::sync::atomic::AtomicU64,
    steps: std::sync::atomic::AtomicU64,
    steps_us: std::sync::atomic::AtomicU64,
}

impl Conversion {
    fn started(&self, fs: &fsd_core::fs::Fs) {
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        if since.is_none() && fs.conversion_target().is_some() {
            *since = Some((Instant::now(), self.done.load(Ordering::Relaxed)));
        }
    }

    fn record(&self, p: &fsd_core::fs::Progress) {
        self.inodes.fetch_add(p.inodes_moved, Ordering::Relaxed);
        self.done.store(p.done_inodes, Ordering::Relaxed);
        self.total.store(p.total_inodes, Ordering::Relaxed);
        self.bytes.fetch_add(p.bytes_moved, Ordering::Relaxed);
    }

    /// ` conv_target=N conv_done=.. conv_total=.. conv_rate=.. conv_bytes=..` while a
    /// conversion runs; empty otherwise.
    fn status_fields(&self, fs: &fsd_core::fs::Fs) -> String {
        let Some(target) = fs.conversion_target() else {
            return String::new();
        };
        let done = self.done.load(Ordering::Relaxed);
        let rate = match *self.since.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((t, from)) if t.elapsed().as_secs_f64() > 0.0 => {
                (done.saturating_sub(from) as f64 / t.elapsed().as_secs_f64()) as u64
            }
            _ => 0,
        };
        format!(
            " conv_target={} conv_done={done} conv_total={} conv_rate={rate} conv_bytes={}",
            target.0,
            self.total.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed)
        )
    }
}

/// The server's background work while it serves: commits changes left in memory about a
/// second old, and moves a format conversion in progress forward a batch at a time
/// (resuming one a predecessor, a crash or an earlier mount left unfinished).
/// `each_second` runs about once a second.
fn background(
    fs: &fsd_core::fs::Fs,
    conversion: &Conversion,
    stopped: &std::sync::mpsc::Receiver<()>,
    each_second: &dyn Fn(),
) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut pause = Duration::from_millis(100);
    let mut last_tick = Instant::now();
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(pause) {
        let _ = fs.commit_older_than(Duration::from_secs(1));
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            each_second();
        }
        pause = Duration::from_millis(100);
        if fs.conversion_target().is_none() {
            continue;
        }
        conversion.started(fs);
        let step = Instant::now();
        let result = fs.convert_step(CONVERT_BATCH);
        // A step holds the filesystem lock throughout (including a checkpoint its commit
        // may run): the longest one bounds the pause the conversion itself causes.
        let took = step.elapsed().as_micros() as u64;
        conversion
            .longest_step_us
            .fetch_max(took, Ordering::Relaxed);
        conversion.steps_us.fetch_add(took, Ordering::Relaxed);
        conversion.steps.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(p) => {
                conversion.record(&p);
                if p.finished {
                    let since = *conversion.since.lock().unwrap_or_else(|p| p.into_inner());
                    let steps = conversion.steps.load(Ordering::Relaxed).max(1);
                    eprintln!(
                        "fsd serve: conversion to format v{} finished: {} inodes and {} bytes of metadata rewritten by this server in {} ms; {steps} steps, longest {} us, mean {} us",
                        fs.format_version().0,
                        conversion.inodes.load(Ordering::Relaxed),
                        conversion.bytes.load(Ordering::Relaxed),
                        since.map_or(0, |(t, _)| t.elapsed().as_millis()),
                        conversion.longest_step_us.load(Ordering::Relaxed),
                        conversion.steps_us.load(Ordering::Relaxed) / steps,
                    );
                } else {
                    // Between batches the lock is free for I/O a moment.
                    pause = Duration::from_millis(1);
                }
            }
            Err(e) => eprintln!("fsd serve: conversion step failed: {e}"),
        }
    }
}

/// Applies the options of the mount at `mnt` that the server implements (atime).
fn follow_mount_options(molt: &MoltFuse, mnt: &Path) {
    if let Some(atime) = atime_of_mount(mnt) {
        molt.set_atime(atime);
    }
}

/// The thread that commits changes left in memory (times of overwritten files).
struct Flusher {
    stop: std::sync::mpsc::Sender<()>,
    handle: thread::JoinHandle<()>,
}

impl Flusher {
    fn finish(self) {
        drop(self.stop);
        let _ = self.handle.join();
    }
}

/// Asks the kernel to queue again every request read from this connection and not yet
/// answered (FUSE_NOTIFY_RESEND): after a crash, those of the dead server.
fn notify_resend(session: &FuseSession) -> io::Result<()> {
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

/// Connects a ring client on duplicates of the ring descriptors (the originals stay, so
/// the process can reconnect after a rolled-back update).
fn connect(ring: &ServerRing) -> anyhow::Result<Arc<crate::host::RingStore>> {
    let region = blockdev::ring::RingRegion::open(ring.ring.try_clone()?)?;
    // No pidfd: the driver may be replaced by a live update; liveness is the heartbeat's.
    let client = blockdev::Client::connect(
        region,
        ring.sq_eventfd.try_clone()?,
        ring.cq_eventfd.try_clone()?,
        None,
        Default::default(),
    )?;
    Ok(Arc::new(crate::host::RingStore(Arc::new(client))))
}

struct ServerRing {
    ring: std::os::fd::OwnedFd,
    sq_eventfd: std::os::fd::OwnedFd,
    cq_eventfd: std::os::fd::OwnedFd,
}

/// A required state a live update asks the server to reach before it drains.
fn required_state_reached(molt: &MoltFuse, states: &[String]) -> Result<(), String> {
    for s in states {
        match s.as_str() {
            "quiescent" | "no-reads-in-flight" | "no-writes-in-flight" | "" => {}
            "no-open-files" => {
                let n = molt.open_handles().len();
                if n > 0 {
                    return Err(format!("{n} files or directories are open"));
                }
            }
            "every-open-file-touched" => {
                let n = molt.export().untouched_files();
                if n > 0 {
                    return Err(format!(
                        "{n} open files have not been read or written since they were opened"
                    ));
                }
            }
            other => return Err(format!("unknown required state {other}")),
        }
    }
    Ok(())
}

/// The filesystem server process. Start-up (line protocol on `ctl`):
/// - mount: "fs-ready" once the image is mounted over the ring; waits for "mounted"
///   (the supervisor made the FUSE mount); then serves and says "serving".
/// - adopt: "spawned" once its FUSE session exists; receives the "state" blob; imports it
///   (no writes) and says "imported"; waits for "commit" (or "abort"); serves, "serving".
///
/// While serving it answers "status", and "prepare <deadline_ms> [states]": it converges
/// to the required states (or answers "error: ..." and keeps serving), stops its workers
/// between requests, makes the image consistent, and sends the "ready" state blob. It then
/// holds: "resume" serves again, "exit" ends the process without touching the mount.
/// When the kernel ends the connection (unmount) it makes the image clean and exits.
pub fn run_server(args: &ServerArgs, fds: ServerFds) -> anyhow::Result<()> {
    use crate::control::{ControlLink, Msg};
    use crate::persist::{FsdStateV1, STATE_CAP};
    let mut ctl = ControlLink::new(fds.ctl, STATE_CAP)?;
    let ring = ServerRing {
        ring: fds.ring,
        sq_eventfd: fds.sq_eventfd,
        cq_eventfd: fds.cq_eventfd,
    };
    let fail = |ctl: &mut ControlLink, e: anyhow::Error| -> anyhow::Error {
        let _ = ctl.send(&format!("error: {e:#}"));
        e
    };
    // The session checks that its path is a directory. After a crash nobody answers on
    // the mountpoint, so a recovering server names another one (it never mounts).
    let session_path: &Path = if args.recover.is_some() {
        Path::new("/")
    } else {
        &args.mountpoint
    };
    let mut session = match FuseSession::new(session_path, "molt", "molt", false) {
        Ok(s) => s,
        Err(e) => return Err(fail(&mut ctl, anyhow::anyhow!("{e}"))),
    };
    session.set_fuse_file(fds.fuse);
    // A session unmounts by path when dropped. The mount outlives every server process
    // (a successor or the kernel ends it), so the session is never dropped.
    let session = Arc::new(std::mem::ManuallyDrop::new(session));

    let (fs, molt) = if args.adopt {
        ctl.send("spawned")?;
        let blob = match ctl.recv()? {
            Msg::Blob(tag, b) if tag == "state" => b,
            other => anyhow::bail!("expected the state blob, got {other:?}"),
        };
        // Import: decode and check the state; nothing touches the ring or the image until
        // the commit, so the predecessor (or a predecessor driver) can still resume.
        let state = match FsdStateV1::decode(&blob)
            .map_err(anyhow::Error::from)
            .and_then(|state| {
                if state.init_flags != crate::fuse::wanted_init_flags().bits() {
                    anyhow::bail!(
                    "the connection was negotiated with INIT flags {:#x}, this version needs {:#x}",
                    state.init_flags,
                    crate::fuse::wanted_init_flags().bits()
                );
                }
                Ok(state)
            }) {
            Ok(s) => s,
            Err(e) => return Err(fail(&mut ctl, e)),
        };
        ctl.send("imported")?;
        match ctl.recv()? {
            Msg::Line(l) if l == "commit" => {}
            // Aborted: leave without touching the mount or the image.
            _ => std::process::exit(0),
        }
        let adopted = (|| -> anyhow::Result<(Arc<fsd_core::fs::Fs>, Arc<MoltFuse>)> {
            let fs = Arc::new(fsd_core::fs::Fs::adopt(connect(&ring)?, &state.withheld)?);
            fs.attach_redo_log(crate::host::open_redo_log(&fds.redo)?);
            let molt = Arc::new(MoltFuse::import(fs.clone(), &state));
            Ok((fs, molt))
        })();
        let (fs, molt) = match adopted {
            Ok(v) => v,
            Err(e) => return Err(fail(&mut ctl, e)),
        };
        (fs, molt)
    } else if let Some(recovery) = args.recover {
        // The predecessor died: the supervisor settled the ring; the kernel holds the
        // requests it had read until the resend below.
        let recovered = (|| -> anyhow::Result<(Arc<fsd_core::fs::Fs>, Arc<MoltFuse>)> {
            let (fs, completed) =
                fsd_core::fs::Fs::recover(connect(&ring)?, crate::host::open_redo_log(&fds.redo)?)?;
            let fs = Arc::new(fs);
            let molt = Arc::new(MoltFuse::recovered(fs.clone(), completed, recovery));
            Ok((fs, molt))
        })();
        match recovered {
            Ok(v) => v,
            Err(e) => return Err(fail(&mut ctl, e)),
        }
    } else {
        let mounted = (|| -> anyhow::Result<Arc<fsd_core::fs::Fs>> {
            let fs = fsd_core::fs::Fs::mount(connect(&ring)?)?;
            fs.attach_redo_log(crate::host::open_redo_log(&fds.redo)?);
            Ok(Arc::new(fs))
        })();
        let fs = match mounted {
            Ok(fs) => fs,
            Err(e) => return Err(fail(&mut ctl, e)),
        };
        ctl.send("fs-ready")?;
        ctl.expect("mounted")?;
        let molt = Arc::new(MoltFuse::new(fs.clone()));
        (fs, molt)
    };

    if let Some(fuse) = session.get_fuse_file() {
        molt.set_notifier(fuse.try_clone()?);
    }

    if args.recover.is_some() {
        // Requests the dead predecessor had read go back to the queue, marked. Before this
        // process reads any: a resend also takes back requests being served, which would
        // then run twice.
        if let Err(e) = notify_resend(&session) {
            return Err(fail(
                &mut ctl,
                anyhow::anyhow!("resending the dead server's requests: {e}"),
            ));
        }
    }

    // Commands arrive on their own thread so that the main loop also notices an unmount.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut reader = ctl.try_clone()?;
    thread::spawn(move || loop {
        let m = reader.recv();
        let end = m.is_err();
        if tx.send(m).is_err() || end {
            return;
        }
    });

    // A prepare whose required state was lost during the drain is retried (serving again
    // meanwhile) until its deadline; the supervisor keeps waiting for "ready".
    let mut retry: Option<(Instant, Vec<String>)> = None;
    let conversion = Arc::new(Conversion::default());
    loop {
        let stopping = Arc::new(AtomicBool::new(false));
        let channels = open_channels(&session, args.threads)?;
        let serving = {
            let (molt, stopping) = (molt.clone(), stopping.clone());
            thread::spawn(move || serve(molt, channels, stopping))
        };
        // Commits times left in memory by overwrites within about a second.
        // Also runs an on-disk format conversion in progress, one short batch at a time.
        // Dropping the sender stops it at once (a drain must not wait for its sleep).
        let mut flusher = Some({
            let (fs, conversion) = (fs.clone(), conversion.clone());
            let (molt, mnt) = (molt.clone(), args.mountpoint.clone());
            let (stop, stopped) = std::sync::mpsc::channel::<()>();
            let handle = thread::spawn(move || {
                // Follows a remount that changes the atime option.
                let follow = || follow_mount_options(&molt, &mnt);
                follow();
                background(&fs, &conversion, &stopped, &follow)
            });
            Flusher { stop, handle }
        });
        if retry.is_none() {
            ctl.send("serving")?;
        }
        let mut prepared = false;
        'commands: loop {
            if serving.is_finished() && !prepared {
                break 'commands;
            }
            let msg = match retry.take() {
                Some((deadline, states)) => {
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .as_millis();
                    Ok(Msg::Line(format!("prepare {left} {}", states.join(","))))
                }
                None => match rx.recv_timeout(Duration::from_millis(20)) {
                    Ok(m) => m,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                    // The supervisor is gone; keep serving (it kills us if it means to).
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        if serving.is_finished() {
                            break 'commands;
                        }
                        thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                },
            };
            let line = match msg {
                Ok(Msg::Line(l)) => l,
                Ok(Msg::Blob(..)) => continue,
                Err(_) => continue,
            };
            let mut words = line.split_whitespace();
            match words.next() {
                Some("status") => {
                    let st = molt.export();
                    ctl.send(&format!(
                        "status version={} schema={} lookups={} handles={} requests={} format={}{}",
                        st.version,
                        crate::persist::STATE_SCHEMA,
                        st.lookups.len(),
                        st.handles.len(),
                        st.requests,
                        fs.format_version().0,
                        conversion.status_fields(&fs),
                    ))?;
                }
                Some("space") => {
                    // Free space a conversion to format N needs, and what the image has.
                    let to = words.next().and_then(|w| w.parse::<u32>().ok());
                    let reply = match to.map(formats::version::FormatVersion) {
                        Some(v) => fs
                            .conversion_space_needed(v)
                            .map(|needed| {
                                let free = fs.statfs().free_blocks * formats::BLOCK_SIZE as u64;
                                format!("space needed={needed} free={free}")
                            })
                            .unwrap_or_else(|e| format!("error: {e}")),
                        None => "error: space needs a format version".into(),
                    };
                    ctl.send(&reply)?;
                }
                Some("convert") if !prepared => {
                    let to = words.next().and_then(|w| w.parse::<u32>().ok());
                    let reply = match to.map(formats::version::FormatVersion) {
                        Some(v) => match fs.start_conversion(v) {
                            Ok(()) => {
                                conversion.started(&fs);
                                "converting".to_string()
                            }
                            Err(e) => format!("error: {e}"),
                        },
                        None => "error: convert needs a format version".into(),
                    };
                    ctl.send(&reply)?;
                }
                Some("prepare") if !prepared => {
                    let deadline_ms: u64 =
                        words.next().and_then(|w| w.parse().ok()).unwrap_or(5000);
                    let states: Vec<String> = words
                        .next()
                        .map(|w| w.split(',').map(str::to_string).collect())
                        .unwrap_or_default();
                    let deadline = Instant::now() + Duration::from_millis(deadline_ms);
                    // Preparation: keep serving while converging to the required state.
                    let reached = loop {
                        match required_state_reached(&molt, &states) {
                            Ok(()) => break Ok(()),
                            Err(why) if Instant::now() >= deadline => break Err(why),
                            Err(_) => thread::sleep(Duration::from_millis(5)),
                        }
                    };
                    if let Err(why) = reached {
                        ctl.send(&format!(
                            "error: required state not reached by the deadline: {why}"
                        ))?;
                        continue;
                    }
                    eprintln!("fsd serve: prepare: state reached, draining");
                    stop_serving(&session, &stopping)?;
                    while !serving.is_finished() {
                        thread::sleep(Duration::from_micros(200));
                    }
                    if let Some(f) = flusher.take() {
                        f.finish();
                    }
                    prepared = true;
                    eprintln!("fsd serve: prepare: drained");
                    // Re-check: a request served during the drain may have changed it
                    // (a file opened and not yet read). Serve again and retry.
                    if required_state_reached(&molt, &states).is_err() && Instant::now() < deadline
                    {
                        retry = Some((deadline, states));
                        prepared = false;
                        break 'commands;
                    }
                    let state = required_state_reached(&molt, &states)
                        .map_err(anyhow::Error::msg)
                        .and_then(|()| fs.quiesce().map_err(anyhow::Error::from))
                        .map(|withheld| {
                            let mut st = molt.export();
                            st.withheld = withheld;
                            st
                        });
                    match state {
                        Ok(st) => ctl.send_blob("ready", &st.encode())?,
                        Err(e) => {
                            ctl.send(&format!("error: {e:#}"))?;
                            break 'commands;
                        }
                    }
                }
                Some("resume") if prepared => {
                    // A successor may have used the ring: reconnect from its current positions.
                    fs.replace_store(connect(&ring)?);
                    break 'commands;
                }
                Some("exit") if prepared => std::process::exit(0),
                _ => ctl.send(&format!("error: unexpected command {line:?}"))?,
            }
        }
        stopping.store(true, Ordering::SeqCst);
        if let Some(f) = flusher.take() {
            f.finish();
        }
        let reason = serving
            .join()
            .map_err(|_| anyhow::anyhow!("serve loop panicked"))??;
        if reason == StopReason::Disconnected && !prepared {
            // Unmounted: make the image clean.
            fs.unmount()?;
            return Ok(());
        }
    }
}
