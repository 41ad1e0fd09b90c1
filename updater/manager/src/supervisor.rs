//! `fsd mount` / `fsd unmount`: the supervisor that starts the stack.
//!
//! The supervisor opens the image and `/dev/fuse`, creates the ring, and starts two
//! components: the block driver (`blockdev serve`) and the filesystem server
//! (`fsd serve`). It keeps its own duplicate of every descriptor that must outlive a
//! component. It performs the `mount(2)` once the filesystem server has mounted the image
//! over the ring, and reports "ready" only after a `stat` of the mountpoint has been
//! answered through the new mount.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockdev::image::Image;
use blockdev::spawn::{DriverConfig, RingSetup};
use formats::superblock::{FsState, Superblock};
use formats::FormatError;

use crate::process::Ended;
use crate::runtime;
use crate::stack::{
    start_driver, start_server, start_server_on, ServerEnv, ServerStart, Stack, START_TIMEOUT,
};

use fsd_server::serve;
use molt_control::{Command as ControlCommand, Reply};

pub use crate::stack::{MountError, MountOptions, DEFAULT_KEYRING};

pub use crate::stack::is_mountpoint;

/// Checks everything that can be checked before starting processes, with clear errors.
pub(crate) fn precheck(opts: &MountOptions) -> Result<PathBuf, MountError> {
    let nbd = fsd_server::host::is_nbd_name(&opts.image);
    if !nbd && !opts.image.exists() {
        return Err(MountError::ImageNotFound(opts.image.clone()));
    }
    let store = fsd_server::host::open_store(&opts.image, false)
        .map_err(|e| MountError::Os("opening the image", e))?;
    if store.num_blocks() == 0 {
        return Err(MountError::NotMolt(opts.image.clone()));
    }
    let mut b = vec![0u8; formats::BLOCK_SIZE];
    store
        .read(0, &mut b)
        .map_err(|e| MountError::Os("reading the superblock", e))?;
    match Superblock::decode(&b) {
        Err(FormatError::BadMagic { .. }) => return Err(MountError::NotMolt(opts.image.clone())),
        Err(e) => return Err(MountError::NeedsFsck(opts.image.clone(), e.to_string())),
        Ok(sb) if sb.state == FsState::Errors => {
            return Err(MountError::NeedsFsck(
                opts.image.clone(),
                "the image is marked as having errors".into(),
            ))
        }
        Ok(sb) if sb.geometry.total_blocks > store.num_blocks() => {
            return Err(MountError::NeedsFsck(
                opts.image.clone(),
                "the image is shorter than its superblock says".into(),
            ))
        }
        // A read-only mount writes nothing, so it cannot replay a journal.
        Ok(sb) if opts.flags.read_only && sb.state != FsState::Clean => {
            return Err(MountError::DirtyReadOnly(opts.image.clone()))
        }
        Ok(_) => {}
    }
    let mnt = opts
        .mountpoint
        .canonicalize()
        .map_err(|_| MountError::BadMountpoint(opts.mountpoint.clone()))?;
    if !mnt.is_dir() {
        return Err(MountError::BadMountpoint(mnt));
    }
    if is_mountpoint(&mnt) {
        return Err(MountError::AlreadyMounted(mnt));
    }
    Ok(mnt)
}

/// Checks what a mount of `opts` would check before starting a process (`mount -f`).
pub fn check_mount(opts: &MountOptions) -> Result<(), MountError> {
    precheck(opts).map(|_| ())
}

/// Runs `fsd mount`: starts a detached supervisor and returns once the mount is usable.
pub fn mount_daemon(opts: &MountOptions, exe: &Path) -> Result<(), MountError> {
    // A mount whose supervisor died is adopted by the new one (see `start_and_wait`).
    let (mnt, adopting) = match opts.mountpoint.canonicalize() {
        Ok(m) if crate::succession::is_orphaned(&m) => (m, true),
        _ => (precheck(opts)?, false),
    };
    let (mut rd, wr) = UnixStream::pair().map_err(|e| MountError::Os("creating a pipe", e))?;
    let log = log_file(&mnt, !adopting);
    let mut cmd = Command::new(exe);
    cmd.arg("mount")
        .arg(&opts.image)
        .arg(&mnt)
        .arg("--foreground")
        .args(["--threads", &opts.threads.to_string()])
        .args(["--transport", opts.transport.as_str()])
        .args(["--engine", opts.engine.as_str()])
        .arg("--keyring")
        .arg(&opts.keyring)
        .args(["-o", &opts.flags.to_options()])
        .args(
            opts.allowed_uids
                .iter()
                .flat_map(|u| ["--allow-uid".to_string(), u.to_string()]),
        )
        .args(["--ready-fd", "3"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.map(Stdio::from).unwrap_or_else(|_| Stdio::null()));
    let session = molt_sys::ChildOptions {
        new_session: true,
        die_with_parent: false,
    };
    let wr_dup = molt_sys::pass_fds(&mut cmd, &[(wr.as_fd(), 3)], session)
        .map_err(|e| MountError::Os("starting the supervisor", e))?;
    let mut child = cmd
        .spawn()
        .map_err(|e| MountError::Os("starting the supervisor", e))?;
    drop(wr);
    drop(wr_dup);
    let mut msg = String::new();
    let _ = rd.read_to_string(&mut msg);
    let msg = msg.trim();
    if msg == "ok" {
        return Ok(());
    }
    let _ = child.wait();
    Err(MountError::Failed(
        msg.strip_prefix("error: ")
            .unwrap_or(if msg.is_empty() {
                "the supervisor exited before the mount was ready"
            } else {
                msg
            })
            .to_string(),
    ))
}

/// A mount's log (its supervisor's and components' stderr) is appended to across mounts
/// of the same mountpoint; past this size a new mount moves it to `<log>.1`, replacing
/// the one before, so the two files together stay under twice this size per mountpoint.
const LOG_ROTATE_BYTES: u64 = 4 << 20;

/// The mount's log, rotated first if `may_rotate` (a new mount, not a supervisor adopting
/// components that still write to the log they were given).
fn log_file(mnt: &Path, may_rotate: bool) -> io::Result<File> {
    std::fs::create_dir_all(runtime::run_root())?;
    let path = runtime::log_path(mnt);
    if may_rotate {
        rotate_if_over(&path, LOG_ROTATE_BYTES)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
}

/// Moves `log` to `<log>.1` (replacing it) if it is larger than `limit` bytes.
fn rotate_if_over(log: &Path, limit: u64) -> io::Result<()> {
    if std::fs::metadata(log).is_ok_and(|m| m.len() > limit) {
        std::fs::rename(log, runtime::rotated_log_path(log))?;
    }
    Ok(())
}

/// Tells the waiting `fsd mount` how the start went (no-op in plain foreground mode).
struct Ready(Option<File>);

impl Ready {
    fn send(&mut self, msg: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(msg.as_bytes());
        }
    }
}

/// Runs the supervisor in this process until the filesystem is unmounted.
/// `ready_fd` is a descriptor on which "ok" or "error: ..." is reported once.
pub fn supervise(
    opts: &MountOptions,
    exe: &Path,
    ready_fd: Option<OwnedFd>,
) -> Result<(), MountError> {
    let mut ready = Ready(ready_fd.map(File::from));
    // SIGTERM (a service manager stopping the unit) and SIGINT stop the mount cleanly:
    // the supervisor unmounts, and the server makes the image clean as for any unmount.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| MountError::Os("handling SIGTERM", e))?;
    }
    match start_and_wait(opts, exe, &mut ready, &stop) {
        Ok(()) => Ok(()),
        Err(e) => {
            ready.send(&format!("error: {e}"));
            Err(e)
        }
    }
}

fn start_and_wait(
    opts: &MountOptions,
    exe: &Path,
    ready: &mut Ready,
    stop: &AtomicBool,
) -> Result<(), MountError> {
    let mnt = opts
        .mountpoint
        .canonicalize()
        .map_err(|_| MountError::BadMountpoint(opts.mountpoint.clone()))?;
    // A mount whose supervisor died is adopted, not mounted again.
    let stack = if crate::succession::is_orphaned(&mnt) {
        let lock = crate::succession::lock(&mnt)?;
        molt_sys::errln!(
            "fsd: {} has no supervisor: adopting its components",
            mnt.display()
        );
        let stack = crate::succession::adopt(&mnt, lock)?;
        runtime::record_supervisor(&mnt, std::process::id())
            .map_err(|e| MountError::Os("recording the supervisor", e))?;
        stack
    } else {
        // The components listen in the runtime directory, so it exists before they start.
        precheck(opts)?;
        runtime::create(&mnt, &opts.image, std::process::id())
            .map_err(|e| MountError::Os("creating the runtime directory", e))?;
        let lock = crate::succession::lock(&mnt)?;
        match start(opts, exe, lock) {
            Ok(s) => s,
            Err(e) => {
                runtime::remove(&mnt);
                return Err(e);
            }
        }
    };
    serve_stack(stack, ready, stop, None)
}

/// Runs the control socket (`listener`, when one was handed over, else a new one) and
/// the watch loop over a stack until the mount ends.
fn serve_stack(
    stack: Stack,
    ready: &mut Ready,
    stop: &AtomicBool,
    listener: Option<std::os::unix::net::UnixListener>,
) -> Result<(), MountError> {
    let mnt = stack.mnt.clone();
    let opts = stack.opts.clone();
    stack.save();
    let stack = Arc::new(Mutex::new(stack));
    let control = Arc::new(crate::manager::Control {
        mountpoint: mnt.clone(),
        abort: AtomicBool::new(false),
        in_progress: Mutex::new(None),
        keyring_dir: opts.keyring.clone(),
        allowed_uids: opts.allowed_uids.clone(),
    });
    if let Err(e) = crate::manager::start(&stack, control, listener) {
        let mut s = stack.lock().unwrap_or_else(|p| p.into_inner());
        s.kill_all();
        let _ = serve::unmount(&mnt, true);
        runtime::remove(&mnt);
        return Err(MountError::Os("creating the control socket", e));
    }
    ready.send("ok");
    crate::notify::ready(&format!(
        "serving {} on {}{}",
        opts.image.display(),
        mnt.display(),
        if opts.flags.read_only {
            " (read-only)"
        } else {
            ""
        }
    ));
    let r = run(&stack, stop);
    crate::notify::stopping("unmounted");
    r
}

/// `fsd supervisor-takeover --state-fd N`: this process was exec'd by the mount's
/// previous supervisor (a live update of the supervisor, or the roll-back of one); it
/// takes the mount over and answers the `updater apply` that asked for it.
pub fn supervise_takeover(state_fd: OwnedFd) -> Result<(), MountError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| MountError::Os("handling SIGTERM", e))?;
    }
    let t = crate::succession::take_over(state_fd)?;
    molt_sys::errln!(
        "fsd: supervisor {} (pid {}) serves {}: {}",
        t.stack.supervisor.version,
        std::process::id(),
        t.stack.mnt.display(),
        t.message
    );
    if let Some(mut client) = t.client {
        let _ = updater::protocol::write_msg(
            &mut client,
            &updater::protocol::EVENTS,
            &updater::protocol::Event::Done {
                outcome: t.outcome,
                message: t.message.clone(),
            },
        );
    }
    crate::notify::status(&format!(
        "serving {}; supervisor {}: {:?}",
        t.stack.mnt.display(),
        t.stack.supervisor.version,
        t.outcome
    ));
    serve_stack(t.stack, &mut Ready(None), &stop, Some(t.control_socket))
}

/// Starts the driver and the server and makes the mount.
/// `opts` with `--transport auto` resolved: io_uring when the kernel has it, else
/// `/dev/fuse`, saying why in one log line.
fn with_resolved_transport(opts: &MountOptions) -> Result<MountOptions, MountError> {
    let (t, why) =
        serve::resolve_transport(opts.transport).map_err(|e| MountError::Failed(e.to_string()))?;
    if let Some(why) = why {
        molt_sys::errln!("fsd mount: serving /dev/fuse, not io_uring: {why}");
    }
    Ok(MountOptions {
        transport: match t {
            fsd_server::persist::Transport::Uring => serve::TransportChoice::Uring,
            fsd_server::persist::Transport::Dev => serve::TransportChoice::Dev,
        },
        ..opts.clone()
    })
}

fn start(opts: &MountOptions, exe: &Path, lock: File) -> Result<Stack, MountError> {
    let mnt = precheck(opts)?;
    let opts = &with_resolved_transport(opts)?;
    // Read before the stack's own connection opens: an NBD server may take one client.
    let format_version = format_version_of(&opts.image);
    // A read-only mount's driver gets a read-only descriptor: no write reaches the image
    // (an NBD export's connection is the server's to restrict).
    let image = if opts.flags.read_only && !fsd_server::host::is_nbd_name(&opts.image) {
        Image::open_read_only(&opts.image)
    } else {
        Image::open_named(&opts.image)
    }
    .map_err(|e| MountError::Failed(format!("opening the image: {e}")))?;
    // An NBD export's server decides who may connect; there is no file to lock.
    if image.nbd().is_none() {
        crate::stack::lock_image(image.file().as_fd(), &opts.image)?;
    }

    let config = DriverConfig {
        engine: opts.engine,
        ..DriverConfig::default()
    };
    let ring = RingSetup::new(config.geometry)
        .map_err(|e| MountError::Failed(format!("creating the ring: {e}")))?;
    let driver_binary = blockdev::spawn::driver_binary(&config);
    if !driver_binary.is_file() {
        return Err(MountError::Failed(format!(
            "the block driver {} is missing: install `blockdev` in the directory of the `fsd` \
             binary, or name it with MOLT_BLOCKDEV_BIN",
            driver_binary.display()
        )));
    }
    let mut driver = start_driver(
        &ring,
        &image,
        opts.engine,
        &driver_binary,
        blockdev::spawn::StartMode::Fresh,
        &runtime::dir_for(&mnt),
    )?;
    let fuse_dev = match serve::open_fuse_device() {
        Ok(f) => f,
        Err(e) => {
            driver.kill();
            return Err(MountError::Os("opening /dev/fuse", e));
        }
    };
    let redo = match fsd_server::host::create_redo_log_file() {
        Ok(f) => f,
        Err(e) => {
            driver.kill();
            return Err(MountError::Os("creating the redo log", e));
        }
    };
    let session = match fsd_server::host::create_session_file() {
        Ok(f) => f,
        Err(e) => {
            driver.kill();
            return Err(MountError::Os("creating the connection record", e));
        }
    };
    let env = ServerEnv {
        mnt: &mnt,
        opts,
        ring: &ring,
        fuse_dev: &fuse_dev,
        redo: &redo,
        session: &session,
    };
    let server = match start_server_on(&env, exe, ServerStart::Mount) {
        Ok(c) => c,
        Err(e) => {
            driver.kill();
            return Err(e);
        }
    };
    let mut stack = Stack {
        mnt: mnt.clone(),
        opts: opts.clone(),
        image,
        ring,
        fuse_dev,
        redo,
        session,
        server,
        driver,
        format_version,
        history: Vec::new(),
        last_sequence: 0,
        recoveries: Vec::new(),
        recovered: 0,
        supervisor: crate::identity::SupervisorIdentity::of_this_process("mount"),
        lock,
        control_socket: None,
    };
    let never = AtomicBool::new(false);
    let deadline = Instant::now() + START_TIMEOUT;
    let started = (|| {
        stack
            .server
            .expect(&Reply::FsReady, deadline, &never)
            .map_err(|e| MountError::Failed(e.to_string()))?;
        serve::mount_fuse(
            &stack.fuse_dev,
            &mnt,
            &opts.image.to_string_lossy(),
            opts.flags,
        )
        .map_err(|e| MountError::Os("mounting", e))?;
        stack
            .server
            .send(&ControlCommand::Mounted)
            .map_err(|e| MountError::Failed(e.to_string()))?;
        stack
            .server
            .expect(&Reply::Serving, deadline, &never)
            .map_err(|e| MountError::Failed(e.to_string()))?;
        std::fs::metadata(&mnt).map_err(|e| MountError::Os("checking the new mount", e))?;
        Ok(())
    })();
    if let Err(e) = started {
        stack.kill_all();
        if is_mountpoint(&mnt) {
            let _ = serve::unmount(&mnt, true);
        }
        return Err(e);
    }
    Ok(stack)
}

fn format_version_of(image: &Path) -> u32 {
    let mut b = vec![0u8; formats::BLOCK_SIZE];
    fsd_server::host::open_store(image, false)
        .and_then(|s| s.read(0, &mut b))
        .ok()
        .and_then(|()| Superblock::decode(&b).ok())
        .map(|sb| sb.format_version.0)
        .unwrap_or(0)
}

/// Watches the components until the filesystem server exits: after an unmount it makes
/// the image clean and exits 0. A component that dies is replaced by a new process of the
/// same version, which recovers its state while the workload waits (crash recovery). If
/// that fails, or components keep dying, the whole stack goes down so that the next mount
/// recovers from the journal.
fn run(stack: &Arc<Mutex<Stack>>, stop: &AtomicBool) -> Result<(), MountError> {
    let mut stopping = false;
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let mut s = stack.lock().unwrap_or_else(|p| p.into_inner());
        if stop.load(std::sync::atomic::Ordering::Relaxed) && !stopping {
            stopping = true;
            stop_mount(&s.mnt);
        }
        let server_end = s.server.process.try_wait();
        let driver_end = s.driver.process.try_wait();
        if server_end.is_none() && driver_end.is_none() {
            continue;
        }
        // A server ends by itself only after the unmount; one adopted after a supervisor
        // crash has no status here, so the mount still being there says it crashed.
        let server_failed = server_end
            .map(|st| st.success().map_or_else(|| is_mountpoint(&s.mnt), |ok| !ok))
            .unwrap_or(false);
        let crashed = match (server_end, driver_end) {
            (Some(st), None) if server_failed => Some(Crashed::Server(st)),
            (None, Some(st)) => Some(Crashed::Driver(st)),
            _ => None,
        };
        // A component that ends while the mount is being stopped is not replaced (a
        // terminal's Ctrl-C reaches the whole process group).
        if let Some(what) = crashed.filter(|_| !stopping) {
            match recover(&mut s, what) {
                Ok(()) => continue,
                Err(e) => {
                    molt_sys::errln!("fsd: crash recovery failed, taking the stack down: {e}")
                }
            }
        }
        let clean = server_end.is_some() && !server_failed && driver_end.is_none();
        if server_end.is_none() {
            s.server.kill();
        }
        let _ = s.driver.process.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.driver.process.try_wait().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        s.driver.kill();
        let mnt = s.mnt.clone();
        if !clean && is_mountpoint(&mnt) {
            let _ = serve::unmount(&mnt, true);
        }
        runtime::remove(&mnt);
        return if clean {
            Ok(())
        } else {
            Err(MountError::Failed(format!(
                "a component ended: server {server_end:?}, driver {driver_end:?}"
            )))
        };
    }
}

/// Ends the mount on a stop signal: a plain unmount, so that the server sees the
/// connection end and makes the image clean; if files are still open, a lazy one (the
/// kernel ends the connection when the last of them is closed). The run loop then sees
/// the server exit as after any unmount.
fn stop_mount(mnt: &Path) {
    crate::notify::stopping(&format!("unmounting {}", mnt.display()));
    molt_sys::errln!("fsd: stop signal: unmounting {}", mnt.display());
    match serve::unmount(mnt, false) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            molt_sys::errln!(
                "fsd: {} is busy; detaching it, the image is made clean when the last open file closes",
                mnt.display()
            );
            if let Err(e) = serve::unmount(mnt, true) {
                molt_sys::errln!("fsd: detaching {}: {e}", mnt.display());
            }
        }
        Err(e) => molt_sys::errln!("fsd: unmounting {}: {e}", mnt.display()),
    }
}

/// A component that ended without being asked to.
#[derive(Debug, Clone, Copy)]
enum Crashed {
    Server(Ended),
    Driver(Ended),
}

/// At most this many crash recoveries within `RECOVERY_WINDOW`; more means a component
/// that cannot run, and the stack goes down instead.
const MAX_RECOVERIES: usize = 5;
const RECOVERY_WINDOW: Duration = Duration::from_secs(60);
/// Wait between a block driver's death and the start of its successor.
const DRIVER_RESTART_GRACE: Duration = Duration::from_millis(20);

/// Replaces a crashed component with a new process of its last committed version.
fn recover(s: &mut Stack, what: Crashed) -> Result<(), MountError> {
    let now = Instant::now();
    s.recoveries
        .retain(|t| now.duration_since(*t) < RECOVERY_WINDOW);
    if s.recoveries.len() >= MAX_RECOVERIES {
        return Err(MountError::Failed(format!(
            "{} crashes within {RECOVERY_WINDOW:?}",
            s.recoveries.len()
        )));
    }
    if !is_mountpoint(&s.mnt) {
        return Err(MountError::NotMounted(s.mnt.clone()));
    }
    s.recoveries.push(now);
    s.recovered += 1;
    let n = s.recovered;
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let message = match what {
        Crashed::Server(status) => {
            molt_sys::errln!(
                "fsd: the filesystem server (pid {}) died ({status}); recovering",
                s.server.pid()
            );
            settle_abandoned_ring(&s.ring, Instant::now() + START_TIMEOUT)?;
            let binary = s.server.binary.clone();
            let mut new = start_server(s, &binary, ServerStart::Recover(n))?;
            let never = AtomicBool::new(false);
            if let Err(e) = new.expect(&Reply::Serving, Instant::now() + START_TIMEOUT, &never) {
                new.kill();
                return Err(MountError::Failed(format!(
                    "the recovering server failed: {e}"
                )));
            }
            let mut dead = std::mem::replace(&mut s.server, new);
            let dead_pid = dead.pid();
            dead.kill();
            molt_sys::errln!("fsd: filesystem server recovered (pid {})", s.server.pid());
            format!(
                "fsd (pid {dead_pid}) died ({status}); {} (pid {}) recovered its state",
                s.server.info.version,
                s.server.pid()
            )
        }
        Crashed::Driver(status) => {
            molt_sys::errln!(
                "fsd: the block driver (pid {}) died ({status}); recovering",
                s.driver.pid()
            );
            // The kernel finishes a dead process's io_uring requests while it exits; an
            // O_DIRECT write already at the device may complete just after the reap. Give
            // it a device latency's grace so that no stale write lands after the
            // successor re-executes the request (blockdev/RING.md, driver crash recovery).
            std::thread::sleep(DRIVER_RESTART_GRACE);
            // An NBD connection the dead driver used may hold half a request or unread
            // replies: the successor gets a new one (it resends what the client had
            // submitted, as for a file).
            if s.image.nbd().is_some() {
                let old = std::mem::replace(&mut s.image, placeholder_image()?);
                s.image = old.reconnect().map_err(|e| {
                    MountError::Failed(format!("reconnecting to the NBD export: {e}"))
                })?;
            }
            let binary = s.driver.binary.clone();
            let new = start_driver(
                &s.ring,
                &s.image,
                s.opts.engine,
                &binary,
                blockdev::spawn::StartMode::Adopt,
                &crate::runtime::dir_for(&s.mnt),
            )?;
            let mut dead = std::mem::replace(&mut s.driver, new);
            let dead_pid = dead.pid();
            dead.kill();
            molt_sys::errln!("fsd: block driver recovered (pid {})", s.driver.pid());
            format!(
                "blockdev (pid {dead_pid}) died ({status}); {} (pid {}) took the ring over",
                s.driver.info.version,
                s.driver.pid()
            )
        }
    };
    // Shown by `updater status` with the updates: a replacement of a dead process.
    s.record(updater::protocol::UpdateRecord {
        package: "(crash recovery)".into(),
        sequence: 0,
        nature: "crash-recovery".into(),
        started_unix,
        phases: vec![(
            updater::protocol::Phase::Replacement,
            now.elapsed().as_millis() as u64,
            updater::protocol::PhaseState::Finished,
        )],
        outcome: updater::protocol::Outcome::Committed,
        message,
    });
    Ok(())
}

/// Makes a ring whose client died usable by a new client: the driver finishes the
/// entries the dead client submitted (their effects are like writes completed just
/// before a crash, which the journal tolerates), and their completions are discarded.
/// Afterwards no request is in flight, no entry waits, and every slot is free.
fn settle_abandoned_ring(ring: &RingSetup, deadline: Instant) -> Result<(), MountError> {
    loop {
        ring.ring.discard_completions();
        // The driver may sleep waiting for room in the completion queue.
        let _ = blockdev::ring::ring_doorbell(ring.sq_eventfd.as_fd());
        std::thread::sleep(Duration::from_millis(1));
        if ring.ring.abandoned_work_settled() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(MountError::Failed(
                "the block driver did not finish the dead server's requests".into(),
            ));
        }
    }
}

/// Something to hold in the stack's image field for the moment an NBD image is replaced
/// by a new connection (a memfd: no file, no connection).
fn placeholder_image() -> Result<Image, MountError> {
    let f = molt_sys::memfd_create(c"molt-no-image", 0)
        .map_err(|e| MountError::Os("creating a placeholder", e))?;
    Image::from_fd(f.into()).map_err(|e| MountError::Os("creating a placeholder", e))
}

/// `fsd unmount`: unmounts, then waits for the stack to make the image clean and exit.
pub fn unmount(mountpoint: &Path) -> Result<(), MountError> {
    let mnt = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_path_buf());
    if !is_mountpoint(&mnt) {
        return Err(MountError::NotMounted(mnt));
    }
    let pid = runtime::supervisor_pid(&mnt);
    match serve::unmount(&mnt, false) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Err(MountError::Busy(mnt)),
        Err(e) => return Err(MountError::Os("unmounting", e)),
    }
    if let Some(pid) = pid {
        let deadline = Instant::now() + START_TIMEOUT;
        let pid_file = runtime::dir_for(&mnt).join("pid");
        // Signal 0 only checks that the process exists.
        while pid_file.exists() && molt_sys::kill(pid, 0).is_ok() {
            if Instant::now() >= deadline {
                return Err(MountError::Failed(format!(
                    "the supervisor (pid {pid}) did not finish within {START_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log over the limit moves to `.1`, replacing the one before; one within it stays.
    #[test]
    fn a_log_over_the_limit_is_rotated_once() {
        let dir = std::env::temp_dir().join(format!("molt-log-rotate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("m.log");
        let previous = dir.join("m.log.1");
        std::fs::write(&previous, b"older").unwrap();
        std::fs::write(&log, b"small").unwrap();
        rotate_if_over(&log, 10).unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"small");
        std::fs::write(&log, b"more than ten bytes").unwrap();
        rotate_if_over(&log, 10).unwrap();
        assert!(!log.exists());
        assert_eq!(std::fs::read(&previous).unwrap(), b"more than ten bytes");
        // No log yet: nothing to do.
        rotate_if_over(&log, 10).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
