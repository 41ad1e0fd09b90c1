//! What the supervisor holds for a mount (the [`Stack`]: its duplicates of every
//! descriptor a component needs, and the two component processes) and how a component
//! process is started on it. Both components start the same way: probe the binary, pass
//! the descriptors at fixed numbers, connect the control link.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blockdev::image::Image;
use blockdev::spawn::{DriverConfig, DriverFds, RingSetup};
use fsd_server::serve;

use crate::component::{probe, ComponentProc};
use molt_control::ComponentInfo;

/// Longest wait for a component to start or for a mount to finish unmounting.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("image {0} not found")]
    ImageNotFound(PathBuf),
    #[error("{0} is not a Molt image (make one with `fsd mkfs`)")]
    NotMolt(PathBuf),
    #[error("image {0} needs fsck: {1}; run `fsd fsck --repair {0}`")]
    NeedsFsck(PathBuf, String),
    #[error("mountpoint {0} does not exist or is not a directory")]
    BadMountpoint(PathBuf),
    #[error("{0} is already a mount point (busy or already mounted)")]
    AlreadyMounted(PathBuf),
    #[error(
        "image {0} was not unmounted cleanly: a read-only mount cannot replay its journal \
         (replaying writes); mount it read-write once, or run `fsd fsck --repair {0}`"
    )]
    DirtyReadOnly(PathBuf),
    #[error("image {0} is in use by another mount")]
    ImageInUse(PathBuf),
    #[error("{0} is not mounted")]
    NotMounted(PathBuf),
    #[error("{0} is busy: files are open on it")]
    Busy(PathBuf),
    #[error("{0}")]
    Failed(String),
    #[error("{0}: {1}")]
    Os(&'static str, io::Error),
}

#[derive(Debug, Clone)]
pub struct MountOptions {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    /// FUSE worker threads in the filesystem server.
    pub threads: usize,
    /// The FUSE transport asked for; the supervisor resolves `auto` at mount.
    pub transport: serve::TransportChoice,
    pub engine: blockdev::engine::EngineKind,
    /// Directory of trusted package signing keys (root-owned).
    pub keyring: PathBuf,
    /// Users besides root allowed on the control socket.
    pub allowed_uids: Vec<u32>,
    /// Per-mount options (`-o`).
    pub flags: serve::MountFlags,
}

/// Where trusted package keys live unless `fsd mount --keyring` says otherwise.
pub const DEFAULT_KEYRING: &str = "/etc/molt/keyring";

/// Everything the supervisor holds for a mount: its own duplicates of every descriptor
/// that must outlive a component (image, ring, FUSE connection) and the components.
pub struct Stack {
    pub mnt: PathBuf,
    pub opts: MountOptions,
    /// Keeps the image open and locked for the life of the mount.
    pub image: Image,
    pub ring: RingSetup,
    pub fuse_dev: File,
    /// The servers' redo log: acknowledged operations not yet in the journal.
    pub redo: File,
    /// The FUSE connection's record (what its INIT negotiated), for a recovering server.
    pub session: File,
    pub server: ComponentProc,
    pub driver: ComponentProc,
    /// On-disk format version of the image.
    pub format_version: u32,
    /// Live updates applied or attempted, in order.
    pub history: Vec<updater::protocol::UpdateRecord>,
    pub last_sequence: u64,
    /// When each crashed component was replaced, for the crash-loop limit.
    pub recoveries: Vec<Instant>,
    /// Crash recoveries since the mount.
    pub recovered: u64,
    /// This supervisor process: version, binary, since when.
    pub supervisor: crate::identity::SupervisorIdentity,
    /// The mount's supervisor lock, held for this supervisor's life (one at a time).
    pub lock: File,
    /// A duplicate of the control socket's listener, to hand over to a successor.
    pub control_socket: Option<OwnedFd>,
}

/// Whether `path` is the root of a mount (its device differs from its parent's, or it is
/// listed in the mount table).
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let want = path.as_os_str().to_string_lossy();
    mounts.lines().any(|l| {
        l.split(' ')
            .nth(1)
            .map(serve::unescape_mount_path)
            .as_deref()
            == Some(&*want)
    })
}

/// Takes an exclusive lock on the image so that two mounts never share it; waits a while
/// for a previous mount that is still finishing its unmount.
pub(crate) fn lock_image(fd: BorrowedFd<'_>, path: &Path) -> Result<(), MountError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if matches!(molt_sys::try_lock_exclusive(fd), Ok(true)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(MountError::ImageInUse(path.to_path_buf()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How a filesystem server process starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServerStart {
    /// Mounts the image (a new mount).
    Mount,
    /// Takes over from a running predecessor (live update).
    Adopt,
    /// Takes over from a predecessor that died; the n-th recovery of the mount.
    Recover(u64),
}

impl Stack {
    /// Starts a filesystem server from `binary` on this stack's descriptors.
    pub(crate) fn start_server(
        &self,
        binary: &Path,
        adopt: bool,
    ) -> Result<ComponentProc, MountError> {
        let start = if adopt {
            ServerStart::Adopt
        } else {
            ServerStart::Mount
        };
        start_server(self, binary, start)
    }

    pub(crate) fn kill_all(&mut self) {
        self.server.kill();
        self.driver.kill();
    }
}

/// What a filesystem server is started on.
pub(crate) struct ServerEnv<'a> {
    pub(crate) mnt: &'a Path,
    pub(crate) opts: &'a MountOptions,
    pub(crate) ring: &'a RingSetup,
    pub(crate) fuse_dev: &'a File,
    pub(crate) redo: &'a File,
    pub(crate) session: &'a File,
}

pub(crate) fn start_server(
    stack: &Stack,
    binary: &Path,
    start: ServerStart,
) -> Result<ComponentProc, MountError> {
    start_server_on(
        &ServerEnv {
            mnt: &stack.mnt,
            opts: &stack.opts,
            ring: &stack.ring,
            fuse_dev: &stack.fuse_dev,
            redo: &stack.redo,
            session: &stack.session,
        },
        binary,
        start,
    )
}

pub(crate) fn start_server_on(
    env: &ServerEnv<'_>,
    binary: &Path,
    start: ServerStart,
) -> Result<ComponentProc, MountError> {
    let ServerEnv {
        mnt,
        opts,
        ring,
        fuse_dev,
        redo,
        session,
    } = *env;
    let info = probe(binary).map_err(MountError::Failed)?;
    let (ctl, child_ctl) =
        UnixStream::pair().map_err(|e| MountError::Os("creating the control channel", e))?;
    let fds = [
        ring.ring.fd(),
        ring.sq_eventfd.as_fd(),
        ring.cq_eventfd.as_fd(),
        fuse_dev.as_fd(),
        child_ctl.as_fd(),
        redo.as_fd(),
        session.as_fd(),
    ];
    let mut cmd = Command::new(binary);
    cmd.arg("serve")
        .arg(mnt)
        .args(["--threads", &opts.threads.to_string()])
        .args(["--transport", opts.transport.as_str()])
        .arg("--relink-dir")
        .arg(crate::runtime::dir_for(mnt));
    if opts.flags.read_only {
        cmd.arg("--read-only");
    }
    match start {
        ServerStart::Mount => {}
        ServerStart::Adopt => {
            cmd.arg("--adopt");
        }
        ServerStart::Recover(n) => {
            cmd.args(["--recover", &n.to_string()]);
        }
    }
    let guard = pass_fds(&mut cmd, &fds, serve::SERVE_RING_FD)
        .map_err(|e| MountError::Os("preparing the server", e))?;
    let link = ControlPair {
        ours: ctl,
        child: child_ctl,
    };
    let child = Launch {
        cmd,
        guard,
        binary,
        info,
    };
    child.start(
        "starting the filesystem server",
        link,
        fsd_server::persist::STATE_CAP,
    )
}

/// The two ends of a component's control link before it starts.
struct ControlPair {
    ours: UnixStream,
    child: UnixStream,
}

/// A component's command line, with `guard` holding the descriptors it inherits until
/// it has started.
struct Launch<'a, G> {
    cmd: Command,
    guard: G,
    binary: &'a Path,
    info: ComponentInfo,
}

impl<G> Launch<'_, G> {
    /// Starts the process, lets go of what only the child needed, and connects the link.
    fn start(
        self,
        what: &'static str,
        link: ControlPair,
        state_cap: u64,
    ) -> Result<ComponentProc, MountError> {
        let mut cmd = self.cmd;
        let child = cmd.spawn().map_err(|e| MountError::Os(what, e))?;
        drop(self.guard);
        drop(link.child);
        let process =
            crate::process::Process::spawned(child).map_err(|e| MountError::Os(what, e))?;
        ComponentProc::new(
            process,
            self.binary.to_path_buf(),
            self.info,
            link.ours,
            state_cap,
        )
        .map_err(|e| MountError::Os("control channel", e))
    }
}

/// Starts a block driver from `binary` on a stack's descriptors.
pub fn start_driver(
    ring: &RingSetup,
    image: &Image,
    engine: blockdev::engine::EngineKind,
    binary: &Path,
    mode: blockdev::spawn::StartMode,
    relink_dir: &Path,
) -> Result<ComponentProc, MountError> {
    let info = probe(binary).map_err(MountError::Failed)?;
    let config = DriverConfig {
        engine,
        binary: Some(binary.to_path_buf()),
        nbd: image.nbd().cloned(),
        relink_dir: Some(relink_dir.to_path_buf()),
        ..DriverConfig::default()
    };
    let (ctl, child_ctl) =
        UnixStream::pair().map_err(|e| MountError::Os("creating the driver control channel", e))?;
    let fds = DriverFds {
        ring: ring.ring.fd(),
        sq_eventfd: ring.sq_eventfd.as_fd(),
        cq_eventfd: ring.cq_eventfd.as_fd(),
        image: image.file().as_fd(),
    };
    let (cmd, guard) = blockdev::spawn::driver_command_with_control(
        fds,
        &config,
        // Not the supervisor's pid: the driver outlives a supervisor that dies.
        None,
        child_ctl.as_fd(),
        mode,
    )
    .map_err(|e| MountError::Os("preparing the block driver", e))?;
    let link = ControlPair {
        ours: ctl,
        child: child_ctl,
    };
    let child = Launch {
        cmd,
        guard,
        binary,
        info,
    };
    child.start(
        "starting the block driver",
        link,
        blockdev::persist::STATE_CAP,
    )
}

/// Arranges for `fds` to appear as consecutive descriptors from `first` in the child.
/// The child does not die with the supervisor: components serve on without one until
/// another adopts them. Returns duplicates that must live until the command is spawned.
pub fn pass_fds(cmd: &mut Command, fds: &[BorrowedFd<'_>], first: i32) -> io::Result<Vec<OwnedFd>> {
    let targets = fds
        .iter()
        .enumerate()
        .map(|(i, fd)| (*fd, first + i as i32));
    molt_sys::pass_fds(
        cmd,
        &targets.collect::<Vec<_>>(),
        molt_sys::ChildOptions::default(),
    )
}
