//! The supervisor's own succession: what it keeps of itself so that another supervisor
//! process can take over the mount, in two ways (docs/live-update.md, "The supervisor").
//!
//! - **Live update** (a package naming `supervisor`): the running supervisor execs the new
//!   binary in its own process (same pid: the components stay its children, a service
//!   manager keeps its main pid). What it holds crosses the exec as descriptors without
//!   close-on-exec, described by a [`Succession`] in a sealed memfd. The new binary checks
//!   the state and every descriptor and asks both components for their status before it
//!   commits; a failure (or a panic) before the commit execs the previous binary back with
//!   the same descriptors, which resumes in charge and reports the update rolled back.
//! - **Adoption** after a supervisor died: the components keep serving without it. Every
//!   change of the supervisor's state is saved in the runtime directory
//!   ([`save`]); a new supervisor (`fsd mount` on the same mountpoint, or one the
//!   filesystem server starts) reads it, takes duplicates of the descriptors from the
//!   components themselves (`pidfd_getfd`), connects to their relink sockets and carries
//!   on with the history and sequence number intact.
//!
//! One supervisor at a time: each holds an exclusive lock on `supervisor.lock` in the
//! runtime directory for its life (the lock crosses the exec with its descriptor).

use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use blockdev::image::Image;
use blockdev::ring::RingRegion;
use blockdev::spawn::RingSetup;
use molt_control::{Command, ComponentInfo, Reply};
use updater::protocol::{Outcome, Phase, PhaseState, UpdateRecord};

use crate::component::ComponentProc;
use crate::identity::{SupervisorIdentity, STATE_VERSION, STATE_VERSIONS_READ};
use crate::process::{process_start_time, Process};
use crate::stack::{MountError, MountOptions, Stack};

const STATE_MAGIC: u32 = u32::from_le_bytes(*b"MSUP");
/// Largest state accepted, checked before the length is used.
const STATE_CAP: u64 = 16 << 20;
const STATE_FILE: &str = "supervisor.state";
const LOCK_FILE: &str = "supervisor.lock";

/// The mount options, as strings the options parser reads back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SavedOptions {
    image: PathBuf,
    threads: usize,
    transport: String,
    engine: String,
    keyring: PathBuf,
    allowed_uids: Vec<u32>,
    flags: String,
}

impl SavedOptions {
    fn of(o: &MountOptions) -> SavedOptions {
        SavedOptions {
            image: o.image.clone(),
            threads: o.threads,
            transport: o.transport.as_str().to_string(),
            engine: o.engine.as_str().to_string(),
            keyring: o.keyring.clone(),
            allowed_uids: o.allowed_uids.clone(),
            flags: o.flags.to_options(),
        }
    }

    fn restore(&self, mountpoint: &Path) -> Result<MountOptions, String> {
        let flags = crate::options::parse(&self.flags, false)
            .map_err(|e| format!("saved mount flags {:?}: {e}", self.flags))?
            .flags;
        Ok(MountOptions {
            image: self.image.clone(),
            mountpoint: mountpoint.to_path_buf(),
            threads: self.threads,
            transport: self
                .transport
                .parse()
                .map_err(|e| format!("saved transport {:?}: {e}", self.transport))?,
            engine: self
                .engine
                .parse()
                .map_err(|e| format!("saved engine {:?}: {e}", self.engine))?,
            keyring: self.keyring.clone(),
            allowed_uids: self.allowed_uids.clone(),
            flags,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SavedComponent {
    pid: u32,
    /// With the pid, names the process (see [`process_start_time`]).
    start_time: u64,
    binary: PathBuf,
    info: ComponentInfo,
}

impl SavedComponent {
    fn of(c: &ComponentProc) -> SavedComponent {
        SavedComponent {
            pid: c.pid(),
            start_time: process_start_time(c.pid()).unwrap_or(0),
            binary: c.binary.clone(),
            info: c.info.clone(),
        }
    }
}

/// The negotiated NBD export, for an image that is one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SavedNbd {
    uri: String,
    size: u64,
    flags: u16,
}

/// Everything a supervisor knows of its mount besides descriptors and live links.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedStack {
    mountpoint: PathBuf,
    options: SavedOptions,
    nbd: Option<SavedNbd>,
    format_version: u32,
    pub history: Vec<UpdateRecord>,
    pub last_sequence: u64,
    recovered: u64,
    /// Ages of the crash recoveries inside the crash-loop window, in milliseconds.
    recovery_ages_ms: Vec<u64>,
    server: SavedComponent,
    driver: SavedComponent,
    pub supervisor: SupervisorIdentity,
    /// A live update of the supervisor handed to a new binary that has not committed yet:
    /// a supervisor that adopts the mount from this state reports it rolled back.
    pending: Option<PendingUpdate>,
}

impl SavedStack {
    pub fn of(s: &Stack) -> SavedStack {
        let now = Instant::now();
        SavedStack {
            mountpoint: s.mnt.clone(),
            options: SavedOptions::of(&s.opts),
            nbd: s.image.nbd().map(|t| SavedNbd {
                uri: t.uri.to_string(),
                size: t.info.size,
                flags: t.info.flags,
            }),
            format_version: s.format_version,
            history: s.history.clone(),
            last_sequence: s.last_sequence,
            recovered: s.recovered,
            recovery_ages_ms: s
                .recoveries
                .iter()
                .map(|t| now.duration_since(*t).as_millis() as u64)
                .collect(),
            server: SavedComponent::of(&s.server),
            driver: SavedComponent::of(&s.driver),
            supervisor: s.supervisor.clone(),
            pending: None,
        }
    }

    /// Checks what a supervisor relies on before it uses the state: it names this
    /// mount, both components and their binaries, and a sequence its history agrees with.
    fn check(&self, mountpoint: &Path) -> Result<(), String> {
        if self.mountpoint != mountpoint {
            return Err(format!(
                "the state is of {}, not {}",
                self.mountpoint.display(),
                mountpoint.display()
            ));
        }
        for (what, c) in [("fsd", &self.server), ("blockdev", &self.driver)] {
            if c.pid == 0 || c.binary.as_os_str().is_empty() {
                return Err(format!("the state names no {what} process"));
            }
        }
        let newest = self
            .history
            .iter()
            .filter(|r| r.outcome == Outcome::Committed)
            .map(|r| r.sequence)
            .max()
            .unwrap_or(0);
        if newest > self.last_sequence {
            return Err(format!(
                "the history holds sequence {newest}, above the last applied {}",
                self.last_sequence
            ));
        }
        Ok(())
    }

    fn encode(&self) -> Vec<u8> {
        formats::frame::encode_serde(STATE_MAGIC, STATE_VERSION, self)
    }

    fn decode(bytes: &[u8]) -> Result<SavedStack, String> {
        let frame = formats::frame::decode("supervisor state", bytes, STATE_MAGIC, STATE_CAP)
            .map_err(|e| e.to_string())?;
        if !STATE_VERSIONS_READ.contains(&frame.version) {
            return Err(format!(
                "supervisor state schema {} (this build reads {STATE_VERSIONS_READ:?})",
                frame.version
            ));
        }
        formats::frame::decode_serde::<SavedStack>("supervisor state", frame.payload)
            .map_err(|e| e.to_string())
    }

    fn restore_recoveries(&self) -> Vec<Instant> {
        let now = Instant::now();
        self.recovery_ages_ms
            .iter()
            .filter_map(|ms| now.checked_sub(Duration::from_millis(*ms)))
            .collect()
    }

    fn nbd_target(&self) -> Result<Option<blockdev::nbd::NbdTarget>, String> {
        self.nbd
            .as_ref()
            .map(|n| {
                Ok(blockdev::nbd::NbdTarget {
                    uri: blockdev::nbd::NbdUri::parse(&n.uri).map_err(|e| e.to_string())?,
                    info: blockdev::nbd::ExportInfo {
                        size: n.size,
                        flags: n.flags,
                    },
                })
            })
            .transpose()
    }
}

/// What a supervisor taking a mount over holds besides the saved state.
struct Held {
    image: Image,
    ring: RingSetup,
    fuse_dev: File,
    redo: File,
    session: File,
    server: ComponentProc,
    driver: ComponentProc,
    lock: File,
}

impl SavedStack {
    /// The stack this state and `held` make, run by this process (`how` it took over).
    fn restore(&self, opts: MountOptions, held: Held, how: &str) -> Stack {
        Stack {
            mnt: self.mountpoint.clone(),
            opts,
            image: held.image,
            ring: held.ring,
            fuse_dev: held.fuse_dev,
            redo: held.redo,
            session: held.session,
            server: held.server,
            driver: held.driver,
            format_version: self.format_version,
            history: self.history.clone(),
            last_sequence: self.last_sequence,
            recoveries: self.restore_recoveries(),
            recovered: self.recovered,
            supervisor: SupervisorIdentity::of_this_process(how),
            lock: held.lock,
            control_socket: None,
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Stack {
    /// Adds a record to the update history and saves the state, so that a supervisor
    /// that adopts the mount after this one died has it (and refuses a replayed package).
    pub(crate) fn record(&mut self, r: UpdateRecord) {
        self.history.push(r);
        self.save();
    }

    /// Saves the state in the runtime directory (see [`save`]).
    pub(crate) fn save(&self) {
        if let Err(e) = save(self) {
            molt_sys::errln!("fsd: saving the supervisor state: {e}");
        }
    }
}

/// Saves the supervisor's state in the runtime directory (write, then rename: a reader
/// sees the old state or the new one), with the binary that adopts the mount should this
/// supervisor die (`supervisor-binary`, read by the filesystem server).
pub fn save(s: &Stack) -> io::Result<()> {
    save_state(&s.mnt, &SavedStack::of(s))
}

fn save_state(mnt: &Path, saved: &SavedStack) -> io::Result<()> {
    let dir = crate::runtime::dir_for(mnt);
    let replace = |name: &str, bytes: &[u8]| {
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, dir.join(name))
    };
    replace(STATE_FILE, &saved.encode())?;
    replace(
        RESTART_BINARY_FILE,
        saved.supervisor.binary.as_os_str().as_encoded_bytes(),
    )
}

/// The runtime directory's record of the supervisor binary to restart.
pub const RESTART_BINARY_FILE: &str = "supervisor-binary";

/// Takes the mount's supervisor lock, or says which supervisor holds it.
pub fn lock(mnt: &Path) -> Result<File, MountError> {
    let path = crate::runtime::dir_for(mnt).join(LOCK_FILE);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| MountError::Os("opening the supervisor lock", e))?;
    match molt_sys::try_lock_exclusive(f.as_fd()) {
        Ok(true) => Ok(f),
        Ok(false) => Err(MountError::Failed(format!(
            "{} already has a running supervisor (pid {})",
            mnt.display(),
            crate::runtime::supervisor_pid(mnt).unwrap_or(0)
        ))),
        Err(e) => Err(MountError::Os("locking the supervisor lock", e)),
    }
}

/// Whether `mnt` is a Molt mount whose supervisor is gone, so that `fsd mount` adopts it.
pub fn is_orphaned(mnt: &Path) -> bool {
    let dir = crate::runtime::dir_for(mnt);
    if !dir.join(STATE_FILE).exists() || !crate::stack::is_mountpoint(mnt) {
        return false;
    }
    let Ok(f) = File::open(dir.join(LOCK_FILE)) else {
        return false;
    };
    // Taken and let go at once: only whether a supervisor holds it matters.
    matches!(molt_sys::try_lock_exclusive(f.as_fd()), Ok(true))
}

/// The descriptors a supervisor holds, as numbers in a [`Succession`] or borrowed for an
/// exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Fds<T> {
    image: T,
    ring: T,
    sq_eventfd: T,
    cq_eventfd: T,
    fuse_dev: T,
    redo: T,
    session: T,
    server_link: T,
    driver_link: T,
    control_socket: T,
    lock: T,
    /// The `updater apply` connection waiting for the outcome.
    client: Option<T>,
    /// The binary of the supervisor that execs (for a roll-back).
    previous_exe: T,
}

impl<T> Fds<T> {
    fn map<U>(&self, mut f: impl FnMut(&T) -> io::Result<U>) -> io::Result<Fds<U>> {
        Ok(Fds {
            image: f(&self.image)?,
            ring: f(&self.ring)?,
            sq_eventfd: f(&self.sq_eventfd)?,
            cq_eventfd: f(&self.cq_eventfd)?,
            fuse_dev: f(&self.fuse_dev)?,
            redo: f(&self.redo)?,
            session: f(&self.session)?,
            server_link: f(&self.server_link)?,
            driver_link: f(&self.driver_link)?,
            control_socket: f(&self.control_socket)?,
            lock: f(&self.lock)?,
            client: self.client.as_ref().map(&mut f).transpose()?,
            previous_exe: f(&self.previous_exe)?,
        })
    }
}

impl Fds<OwnedFd> {
    fn borrow(&self) -> Fds<BorrowedFd<'_>> {
        Fds {
            image: self.image.as_fd(),
            ring: self.ring.as_fd(),
            sq_eventfd: self.sq_eventfd.as_fd(),
            cq_eventfd: self.cq_eventfd.as_fd(),
            fuse_dev: self.fuse_dev.as_fd(),
            redo: self.redo.as_fd(),
            session: self.session.as_fd(),
            server_link: self.server_link.as_fd(),
            driver_link: self.driver_link.as_fd(),
            control_socket: self.control_socket.as_fd(),
            lock: self.lock.as_fd(),
            client: self.client.as_ref().map(|c| c.as_fd()),
            previous_exe: self.previous_exe.as_fd(),
        }
    }
}

/// A supervisor update in flight, as the exec hands it on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PendingUpdate {
    /// The history record so far (phases up to the exec).
    pub record: UpdateRecord,
    pub new_version: String,
}

/// What crosses the exec of a new supervisor binary (in a sealed memfd).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Succession {
    stack: SavedStack,
    fds: Fds<RawFd>,
    update: PendingUpdate,
    /// Set when a new binary failed to take over and hands the mount back: why.
    rolled_back: Option<String>,
}

const SUCCESSION_MAGIC: u32 = u32::from_le_bytes(*b"MSUC");

/// Replaces this process's image with `binary` (`supervisor-takeover`), handing it
/// `fds` and the state. Returns only if the exec failed (nothing was handed over).
fn exec_with(
    binary: &Path,
    stack: SavedStack,
    fds: &Fds<BorrowedFd<'_>>,
    update: PendingUpdate,
    rolled_back: Option<String>,
) -> io::Error {
    let attempt = || -> io::Result<io::Error> {
        // Inheritable duplicates, alive until the exec; dropped (closed) if it fails.
        let kept = fds.map(|fd| molt_sys::dup_for_exec(*fd))?;
        let numbers = kept.map(|fd| Ok(fd.as_raw_fd()))?;
        let succession = Succession {
            stack,
            fds: numbers,
            update,
            rolled_back,
        };
        let bytes = formats::frame::encode_serde(SUCCESSION_MAGIC, STATE_VERSION, &succession);
        let memfd = molt_sys::memfd_sealed(c"molt-supervisor-state", &bytes)?;
        let state = molt_sys::dup_for_exec(memfd.as_fd())?;
        let err = std::process::Command::new(binary)
            .arg("supervisor-takeover")
            .arg("--state-fd")
            .arg(state.as_raw_fd().to_string())
            .exec();
        drop(kept);
        Ok(err)
    };
    attempt().unwrap_or_else(|e| e)
}

/// The live update of the supervisor: checks `binary` against the state (a trial run
/// of `supervisor-takeover --check`), then execs it. Returns only on a failure before
/// the exec, with the mount untouched and this supervisor still in charge.
pub(crate) fn exec_update(
    s: &Stack,
    binary: &Path,
    client: BorrowedFd<'_>,
    update: PendingUpdate,
) -> String {
    let Some(control_socket) = s.control_socket.as_ref() else {
        return "this supervisor holds no control socket to hand over".into();
    };
    let previous_exe = match File::open("/proc/self/exe") {
        Ok(f) => f,
        Err(e) => return format!("opening this supervisor's own binary: {e}"),
    };
    let saved = SavedStack::of(s);
    if let Err(why) = trial(binary, &saved) {
        return why;
    }
    // Should the new binary die before it commits, whoever adopts the mount knows.
    let mut marked = saved.clone();
    marked.pending = Some(update.clone());
    if let Err(e) = save_state(&s.mnt, &marked) {
        return format!("saving the state: {e}");
    }
    let fds = Fds {
        image: s.image.file().as_fd(),
        ring: s.ring.ring.fd(),
        sq_eventfd: s.ring.sq_eventfd.as_fd(),
        cq_eventfd: s.ring.cq_eventfd.as_fd(),
        fuse_dev: s.fuse_dev.as_fd(),
        redo: s.redo.as_fd(),
        session: s.session.as_fd(),
        server_link: s.server.link_fd(),
        driver_link: s.driver.link_fd(),
        control_socket: control_socket.as_fd(),
        lock: s.lock.as_fd(),
        client: Some(client),
        previous_exe: previous_exe.as_fd(),
    };
    let e = exec_with(binary, saved.clone(), &fds, update, None);
    let _ = save_state(&s.mnt, &saved);
    format!("starting {}: {e}", binary.display())
}

/// Runs `binary supervisor-takeover --check` on the state: the new build must read it
/// (and say so) before this process is replaced by it.
fn trial(binary: &Path, saved: &SavedStack) -> Result<(), String> {
    let memfd = molt_sys::memfd_sealed(c"molt-supervisor-state", &saved.encode())
        .map_err(|e| format!("sealing the state: {e}"))?;
    let mut cmd = std::process::Command::new(binary);
    cmd.args(["supervisor-takeover", "--check", "--state-fd", "3"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let guard = molt_sys::pass_fds(&mut cmd, &[(memfd.as_fd(), 3)], Default::default())
        .map_err(|e| format!("preparing the trial: {e}"))?;
    let out = cmd
        .output()
        .map_err(|e| format!("running {}: {e}", binary.display()))?;
    drop(guard);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "the new supervisor refused the state ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `supervisor-takeover --check --state-fd N`: decodes and checks a saved state.
pub fn check_state_fd(fd: OwnedFd) -> Result<(), String> {
    let bytes = read_sealed(fd)?;
    let saved = SavedStack::decode(&bytes)?;
    saved.check(&saved.mountpoint.clone())?;
    saved.options.restore(&saved.mountpoint)?;
    saved.nbd_target()?;
    Ok(())
}

fn read_sealed(fd: OwnedFd) -> Result<Vec<u8>, String> {
    let mut f = File::from(fd);
    if !molt_sys::is_fully_sealed(&f) {
        return Err("the state is not in a sealed memfd".into());
    }
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if len > STATE_CAP + 64 {
        return Err(format!("the state is {len} bytes, above the cap"));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.rewind().map_err(|e| e.to_string())?;
    f.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// What a process that was exec'd into takes over: the stack, the control socket to
/// serve, and the connection to answer.
pub struct TakenOver {
    pub stack: Stack,
    pub control_socket: UnixListener,
    pub client: Option<UnixStream>,
    /// The history record of this update, completed.
    pub outcome: Outcome,
    pub message: String,
}

/// Holds, until the new supervisor commits, what a roll-back hands back to the previous
/// binary (duplicates: the stack being built owns the originals).
struct RollBack {
    stack: SavedStack,
    fds: Fds<OwnedFd>,
    update: PendingUpdate,
}

static ROLL_BACK: std::sync::Mutex<Option<RollBack>> = std::sync::Mutex::new(None);

impl RollBack {
    /// Execs the previous binary with the descriptors; returns only if that failed.
    fn exec(self, why: String) -> io::Error {
        let exe = PathBuf::from(format!(
            "/proc/self/fd/{}",
            self.fds.previous_exe.as_raw_fd()
        ));
        let borrowed = self.fds.borrow();
        exec_with(
            &exe,
            self.stack.clone(),
            &borrowed,
            self.update.clone(),
            Some(why),
        )
    }
}

/// `supervisor-takeover --state-fd N`: this process was exec'd by the previous
/// supervisor of a mount. Takes the mount over, or (before anything is committed) hands
/// it back by exec'ing the previous binary, which then reports the update rolled back.
pub fn take_over(state_fd: OwnedFd) -> Result<TakenOver, MountError> {
    let bytes = read_sealed(state_fd).map_err(MountError::Failed)?;
    let succession: Succession =
        formats::frame::decode("supervisor succession", &bytes, SUCCESSION_MAGIC, STATE_CAP)
            .and_then(|frame| formats::frame::decode_serde("supervisor succession", frame.payload))
            .map_err(|e| MountError::Failed(format!("the handed-over state: {e}")))?;
    let fds = succession
        .fds
        .map(|n| molt_sys::adopt_inherited_fd(*n))
        .map_err(|e| MountError::Os("adopting the handed-over descriptors", e))?;
    let rolling_back = succession.rolled_back.clone();
    if rolling_back.is_none() {
        // Until the commit a failure, and a panic, hands the mount back.
        let copies = fds
            .map(|fd| fd.try_clone())
            .map_err(|e| MountError::Os("keeping the descriptors for a roll-back", e))?;
        *ROLL_BACK.lock().unwrap_or_else(|p| p.into_inner()) = Some(RollBack {
            stack: succession.stack.clone(),
            fds: copies,
            update: succession.update.clone(),
        });
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            roll_back(format!(
                "the new supervisor panicked while taking over: {info}"
            ));
        }));
    }
    match build(&succession, fds) {
        Ok(mut t) => {
            if rolling_back.is_none() {
                // The commit: from here on this binary is the mount's supervisor.
                let _ = std::panic::take_hook();
                drop(ROLL_BACK.lock().unwrap_or_else(|p| p.into_inner()).take());
            }
            let mut record = succession.update.record.clone();
            let elapsed = record.phases.last().map_or(0, |p| p.1);
            record
                .phases
                .push((Phase::Replacement, elapsed, PhaseState::Finished));
            let (outcome, message) = match &rolling_back {
                None => (
                    Outcome::Committed,
                    format!(
                        "supervisor {} (pid {}) took over from {}",
                        t.stack.supervisor.version,
                        std::process::id(),
                        succession.stack.supervisor.version
                    ),
                ),
                Some(why) => (
                    Outcome::RolledBack,
                    format!(
                        "{why}; supervisor {} resumed in charge",
                        t.stack.supervisor.version
                    ),
                ),
            };
            if outcome == Outcome::Committed {
                t.stack.last_sequence = record.sequence.max(t.stack.last_sequence);
            }
            record.outcome = outcome;
            record.message = message.clone();
            t.stack.history.push(record);
            t.outcome = outcome;
            t.message = message;
            let _ = save(&t.stack);
            Ok(t)
        }
        Err(e) if rolling_back.is_none() => {
            roll_back(format!("the new supervisor could not take over: {e}"));
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// Hands the mount back to the previous binary (no-op once committed, or if there is
/// nothing to hand back).
fn roll_back(why: String) {
    let plan = ROLL_BACK.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(plan) = plan {
        molt_sys::errln!("fsd: {why}; handing the mount back to the previous supervisor");
        let e = plan.exec(why);
        molt_sys::errln!("fsd: handing the mount back failed: {e}");
    }
}

fn build(succession: &Succession, fds: Fds<OwnedFd>) -> Result<TakenOver, MountError> {
    let saved = &succession.stack;
    let failed = |what: &str, e: &dyn std::fmt::Display| MountError::Failed(format!("{what}: {e}"));
    saved
        .check(&saved.mountpoint)
        .map_err(|e| failed("the state", &e))?;
    let opts = saved
        .options
        .restore(&saved.mountpoint)
        .map_err(|e| failed("the state", &e))?;
    let image = image_from(fds.image, saved).map_err(|e| failed("the image", &e))?;
    let ring = RingSetup {
        ring: RingRegion::open(fds.ring).map_err(|e| failed("the ring", &e))?,
        sq_eventfd: fds.sq_eventfd,
        cq_eventfd: fds.cq_eventfd,
    };
    check_kind(fds.fuse_dev.as_fd(), "/dev/fuse").map_err(|e| failed("the FUSE device", &e))?;
    let server = relinked(
        Process::of_child(saved.server.pid).map_err(|e| failed("the filesystem server", &e))?,
        &saved.server,
        UnixStream::from(fds.server_link),
        fsd_server::persist::STATE_CAP,
    )?;
    let driver = relinked(
        Process::of_child(saved.driver.pid).map_err(|e| failed("the block driver", &e))?,
        &saved.driver,
        UnixStream::from(fds.driver_link),
        blockdev::persist::STATE_CAP,
    )?;
    let held = Held {
        image,
        ring,
        fuse_dev: File::from(fds.fuse_dev),
        redo: File::from(fds.redo),
        session: File::from(fds.session),
        server,
        driver,
        lock: File::from(fds.lock),
    };
    let how = if succession.rolled_back.is_some() {
        "rolled back"
    } else {
        "live update"
    };
    let mut stack = saved.restore(opts, held, how);
    answers(&mut stack)?;
    #[cfg(feature = "takeover-fault")]
    panic!("a fault built into this supervisor: it crashes while taking over");
    #[allow(unreachable_code)]
    Ok(TakenOver {
        stack,
        control_socket: UnixListener::from(fds.control_socket),
        client: fds.client.map(UnixStream::from),
        outcome: Outcome::Committed,
        message: String::new(),
    })
}

/// Both components answer a status request on their links.
fn answers(s: &mut Stack) -> Result<(), MountError> {
    for c in [&mut s.server, &mut s.driver] {
        match c.request(&Command::Status, Duration::from_secs(5)) {
            Ok(Reply::Status(_)) => {}
            other => {
                return Err(MountError::Failed(format!(
                    "{} (pid {}) does not answer on its control link: {other:?}",
                    c.info.name,
                    c.pid()
                )))
            }
        }
    }
    Ok(())
}

fn relinked(
    process: Process,
    saved: &SavedComponent,
    link: UnixStream,
    cap: u64,
) -> Result<ComponentProc, MountError> {
    ComponentProc::new(process, saved.binary.clone(), saved.info.clone(), link, cap)
        .map_err(|e| MountError::Os("the control link", e))
}

fn image_from(fd: OwnedFd, saved: &SavedStack) -> Result<Image, String> {
    match saved.nbd_target()? {
        Some(target) => Ok(Image::from_connected_nbd(fd, target)),
        None => Image::from_fd(fd).map_err(|e| e.to_string()),
    }
}

/// `fd` is a descriptor of `want` (as /proc names it).
fn check_kind(fd: BorrowedFd<'_>, want: &str) -> Result<(), String> {
    let got = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| e.to_string())?;
    let got = got.to_string_lossy();
    if got == want || got.starts_with(want) {
        Ok(())
    } else {
        Err(format!("is {got}, not {want}"))
    }
}

/// A supervisor started on a mount whose supervisor died: adopts the running
/// components and the mount's descriptors (duplicated from the components), with the
/// saved history. The caller holds the supervisor lock (`lock`).
pub fn adopt(mnt: &Path, lock: File) -> Result<Stack, MountError> {
    let dir = crate::runtime::dir_for(mnt);
    let failed = |what: &str, e: &dyn std::fmt::Display| MountError::Failed(format!("{what}: {e}"));
    let bytes = std::fs::read(dir.join(STATE_FILE))
        .map_err(|e| MountError::Os("reading the saved supervisor state", e))?;
    let saved = SavedStack::decode(&bytes).map_err(|e| failed("the saved supervisor state", &e))?;
    saved
        .check(mnt)
        .map_err(|e| failed("the saved supervisor state", &e))?;
    let opts = saved
        .options
        .restore(mnt)
        .map_err(|e| failed("the saved supervisor state", &e))?;
    let server = Process::adopted(saved.server.pid, saved.server.start_time).map_err(|e| {
        MountError::Failed(format!(
            "the filesystem server (pid {}) is gone too ({e}): the mount cannot be recovered; \
             unmount it (`umount -l {}`) and mount it again (the journal recovers the image)",
            saved.server.pid,
            mnt.display()
        ))
    })?;
    // The server holds every shared descriptor at the numbers it was started with.
    use fsd_server::serve::{
        SERVE_CQ_FD, SERVE_FUSE_FD, SERVE_REDO_FD, SERVE_RING_FD, SERVE_SESSION_FD, SERVE_SQ_FD,
    };
    let take = |p: &Process, n: RawFd, want: &str| -> Result<OwnedFd, MountError> {
        let fd = molt_sys::pidfd_getfd(p.pidfd(), n)
            .map_err(|e| failed(&format!("taking descriptor {n} of pid {}", p.id()), &e))?;
        check_kind(fd.as_fd(), want)
            .map_err(|e| failed(&format!("descriptor {n} of pid {}", p.id()), &e))?;
        Ok(fd)
    };
    let ring = RingSetup {
        ring: RingRegion::open(take(&server, SERVE_RING_FD, "/memfd:molt-ring")?)
            .map_err(|e| failed("the ring", &e))?,
        sq_eventfd: take(&server, SERVE_SQ_FD, "anon_inode:[eventfd]")?,
        cq_eventfd: take(&server, SERVE_CQ_FD, "anon_inode:[eventfd]")?,
    };
    let fuse_dev = File::from(take(&server, SERVE_FUSE_FD, "/dev/fuse")?);
    let redo = File::from(take(&server, SERVE_REDO_FD, "/memfd:molt-redo")?);
    let session = File::from(take(&server, SERVE_SESSION_FD, "/memfd:molt-session")?);
    let server = ComponentProc::new(
        server,
        saved.server.binary.clone(),
        saved.server.info.clone(),
        connect_relink(&dir, "fsd", saved.server.pid)?,
        fsd_server::persist::STATE_CAP,
    )
    .map_err(|e| MountError::Os("the server's control link", e))?;
    let driver_process = Process::adopted(saved.driver.pid, saved.driver.start_time);
    let (image, driver) = match driver_process {
        Ok(p) => {
            let fd = molt_sys::pidfd_getfd(p.pidfd(), blockdev::spawn::IMAGE_FD)
                .map_err(|e| failed("taking the driver's image descriptor", &e))?;
            let image = image_from(fd, &saved).map_err(|e| failed("the image", &e))?;
            let link = connect_relink(&dir, "blockdev", saved.driver.pid)?;
            let c = ComponentProc::new(
                p,
                saved.driver.binary.clone(),
                saved.driver.info.clone(),
                link,
                blockdev::persist::STATE_CAP,
            )
            .map_err(|e| MountError::Os("the driver's control link", e))?;
            (image, c)
        }
        // The driver died with the supervisor: a new one takes the ring over, as after
        // any driver crash (the image is opened again; its lock died with its holders).
        Err(_) => {
            let image = Image::open_named(&opts.image)
                .map_err(|e| failed("opening the image again", &e))?;
            if image.nbd().is_none() {
                crate::stack::lock_image(image.file().as_fd(), &opts.image)?;
            }
            std::thread::sleep(Duration::from_millis(20));
            let c = crate::stack::start_driver(
                &ring,
                &image,
                opts.engine,
                &saved.driver.binary,
                blockdev::spawn::StartMode::Adopt,
                &dir,
            )?;
            (image, c)
        }
    };
    let held = Held {
        image,
        ring,
        fuse_dev,
        redo,
        session,
        server,
        driver,
        lock,
    };
    let mut stack = saved.restore(opts, held, "adopted after a crash");
    answers(&mut stack)?;
    if let Some(p) = &saved.pending {
        let mut r = p.record.clone();
        r.outcome = Outcome::RolledBack;
        r.phases.push((Phase::Replacement, 0, PhaseState::Failed));
        r.message = format!(
            "the new supervisor {} died while taking over; supervisor {} adopted the mount",
            p.new_version, stack.supervisor.version
        );
        stack.history.push(r);
    }
    stack.recovered += 1;
    stack.history.push(UpdateRecord {
        package: "(supervisor recovery)".into(),
        sequence: 0,
        nature: "supervisor-recovery".into(),
        started_unix: now_unix(),
        phases: vec![(Phase::Replacement, 0, PhaseState::Finished)],
        outcome: Outcome::Committed,
        message: format!(
            "the supervisor (pid {}, {}) was gone; {} (pid {}) adopted fsd (pid {}) and \
             blockdev (pid {})",
            saved.supervisor.pid,
            saved.supervisor.version,
            stack.supervisor.version,
            std::process::id(),
            stack.server.pid(),
            stack.driver.pid()
        ),
    });
    Ok(stack)
}

/// Connects to a component's relink socket; the listening end must be that process.
fn connect_relink(dir: &Path, component: &str, pid: u32) -> Result<UnixStream, MountError> {
    let path = molt_control::relink_socket_path(dir, component, pid);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match UnixStream::connect(&path) {
            Ok(s) => {
                let peer = molt_sys::peer_credentials(s.as_fd())
                    .map_err(|e| MountError::Os("checking the relink socket's peer", e))?;
                if peer.pid != pid as i32 {
                    return Err(MountError::Failed(format!(
                        "{} is held by pid {}, not {component} pid {pid}",
                        path.display(),
                        peer.pid
                    )));
                }
                return Ok(s);
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(MountError::Failed(format!(
                    "{component} (pid {pid}) does not accept a new supervisor at {}: {e}",
                    path.display()
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved() -> SavedStack {
        let info = ComponentInfo {
            name: "fsd".into(),
            version: "0.1.0".into(),
            state_schema: 3,
            state_schema_reads: vec![3],
            ring: 1,
            errcodes: 1,
        };
        let component = |pid| SavedComponent {
            pid,
            start_time: 7,
            binary: PathBuf::from("/usr/bin/fsd"),
            info: info.clone(),
        };
        SavedStack {
            mountpoint: PathBuf::from("/mnt/molt"),
            options: SavedOptions {
                image: PathBuf::from("/srv/molt.img"),
                threads: 4,
                transport: "dev".into(),
                engine: "uring".into(),
                keyring: PathBuf::from("/etc/molt/keyring"),
                allowed_uids: vec![1000],
                flags: "rw,nodev,nosuid,exec,relatime".into(),
            },
            nbd: None,
            format_version: 3,
            history: vec![UpdateRecord {
                package: "p".into(),
                sequence: 5,
                nature: "one-component".into(),
                started_unix: 1,
                phases: vec![],
                outcome: Outcome::Committed,
                message: String::new(),
            }],
            last_sequence: 5,
            recovered: 1,
            recovery_ages_ms: vec![10],
            server: component(10),
            driver: component(11),
            pending: None,
            supervisor: SupervisorIdentity {
                version: "0.1.0".into(),
                binary: PathBuf::from("/usr/bin/fsd"),
                pid: 9,
                took_over_unix: 1,
                how: "mount".into(),
            },
        }
    }

    #[test]
    fn a_saved_state_round_trips_and_restores_its_options() {
        let s = saved();
        let back = SavedStack::decode(&s.encode()).unwrap();
        assert_eq!(back, s);
        back.check(Path::new("/mnt/molt")).unwrap();
        let o = back.options.restore(Path::new("/mnt/molt")).unwrap();
        assert_eq!(o.threads, 4);
        assert_eq!(o.allowed_uids, vec![1000]);
        assert_eq!(o.flags.to_options(), s.options.flags);
    }

    #[test]
    fn a_damaged_or_foreign_state_is_refused() {
        let s = saved();
        let mut bytes = s.encode();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        assert!(SavedStack::decode(&bytes).is_err());
        // A schema this build does not read is refused before its payload is decoded.
        let future = formats::frame::encode_serde(STATE_MAGIC, 99, &s);
        let e = SavedStack::decode(&future).unwrap_err();
        assert!(e.contains("schema 99"), "{e}");
        // Of another mount.
        assert!(s.check(Path::new("/mnt/other")).is_err());
        // A history ahead of its sequence number.
        let mut ahead = s.clone();
        ahead.last_sequence = 4;
        assert!(ahead.check(Path::new("/mnt/molt")).is_err());
    }

    #[test]
    fn a_state_must_be_sealed_to_be_read() {
        let s = saved();
        let open = molt_sys::memfd_create(c"t", 0).unwrap();
        assert!(read_sealed(open.into()).is_err());
        let sealed = molt_sys::memfd_sealed(c"t", &s.encode()).unwrap();
        check_state_fd(sealed.into()).unwrap();
    }
}
