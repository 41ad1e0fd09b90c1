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

/// How `fsd serve` starts.
#[derive(Debug, Clone)]
pub struct ServerArgs {
    pub mountpoint: std::path::PathBuf,
    pub threads: usize,
    /// Take over from a running predecessor (live update) instead of mounting.
    pub adopt: bool,
}

/// Connects a ring client on duplicates of the ring descriptors (the originals stay, so
/// the process can reconnect after a rolled-back update).
fn connect(ring: &ServerRing) -> anyhow::Result<Arc<blockdev::Client>> {
    let region = blockdev::ring::RingRegion::open(ring.ring.try_clone()?)?;
    // No pidfd: the driver may be replaced by a live update; liveness is the heartbeat's.
    let client = blockdev::Client::connect(
        region,
        ring.sq_eventfd.try_clone()?,
        ring.cq_eventfd.try_clone()?,
        None,
        Default::default(),
    )?;
    Ok(Arc::new(client))
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
    let mut session = match FuseSession::new(&args.mountpoint, "molt", "molt", false) {
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
        let adopted = (|| -> anyhow::Result<(Arc<crate::fs::Fs>, Arc<MoltFuse>)> {
            let fs = Arc::new(crate::fs::Fs::adopt(connect(&ring)?, &state.withheld)?);
            let molt = Arc::new(MoltFuse::import(fs.clone(), &state));
            Ok((fs, molt))
        })();
        let (fs, molt) = match adopted {
            Ok(v) => v,
            Err(e) => return Err(fail(&mut ctl, e)),
        };
        (fs, molt)
    } else {
        let mounted = (|| -> anyhow::Result<Arc<crate::fs::Fs>> {
            Ok(Arc::new(crate::fs::Fs::mount(connect(&ring)?)?))
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
    loop {
        let stopping = Arc::new(AtomicBool::new(false));
        let channels = open_channels(&session, args.threads)?;
        let serving = {
            let (molt, stopping) = (molt.clone(), stopping.clone());
            thread::spawn(move || serve(molt, channels, stopping))
        };
        // Commits times left in memory by overwrites within about a second.
        let mut flusher = Some({
            let (fs, stopping) = (fs.clone(), stopping.clone());
            thread::spawn(move || {
                while !stopping.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(100));
                    if !stopping.load(Ordering::SeqCst) {
                        let _ = fs.commit_older_than(Duration::from_secs(1));
                    }
                }
            })
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
                        "status version={} schema={} lookups={} handles={} requests={}",
                        st.version,
                        crate::persist::STATE_SCHEMA,
                        st.lookups.len(),
                        st.handles.len(),
                        st.requests
                    ))?;
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
                        let _ = f.join();
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
            let _ = f.join();
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
