//! Starting the driver process and connecting to it.
//!
//! The pieces are public so that a supervisor can create the ring and eventfds itself,
//! keep duplicates of every fd, and spawn (or replace) the driver: [`RingSetup`] creates
//! them, [`driver_command`] builds the command that passes them as fds 3–6, and
//! [`Client::connect`] attaches a client.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use crate::client::{Client, ClientConfig};
use crate::engine::EngineKind;
use crate::image::Image;
use crate::nbd::NbdTarget;
use crate::ring::{RingError, RingGeometry, RingRegion};
use crate::spin::SpinMode;
use crate::BlockError;
use molt_sys as sys;

/// Environment variable naming the `blockdev` binary.
pub(crate) const BIN_ENV: &str = "MOLT_BLOCKDEV_BIN";
/// Environment variables that set [`DriverConfig::default`]'s spin: the mode (`adaptive`
/// or `fixed`) and the longest spin in microseconds. They reach every driver a process
/// starts with the default config, e.g. those of `fsd mount` (read by its supervisor).
pub const SPIN_MODE_ENV: &str = "MOLT_DRIVER_SPIN";
pub const SPIN_US_ENV: &str = "MOLT_DRIVER_SPIN_US";

/// Fd numbers the driver receives its descriptors on.
pub(crate) const RING_FD: i32 = 3;
pub(crate) const SQ_EVENTFD: i32 = 4;
pub(crate) const CQ_EVENTFD: i32 = 5;
pub const IMAGE_FD: i32 = 6;
/// Fd of the control socket (live update), when there is one.
pub(crate) const CTL_FD: i32 = 7;

/// How a driver started with a control socket begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// Attaches to the ring and serves at once; can later be prepared for an update.
    Fresh,
    /// A successor (`--adopt`): writes nothing to the ring until it has imported its
    /// predecessor's state and been told to commit — unless the ring's driver died with
    /// work taken: then it takes the ring over at once (`RING.md`, "Driver crash
    /// recovery").
    Adopt,
}

/// How to start a driver.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub engine: EngineKind,
    pub geometry: RingGeometry,
    /// Driver binary; default: `$MOLT_BLOCKDEV_BIN`, else `blockdev` next to the current
    /// executable (or one directory up, for test binaries in `deps/`).
    pub binary: Option<PathBuf>,
    /// The driver's longest spin before sleeping (`--spin-us`).
    pub driver_spin: Duration,
    /// Whether it always spins that long or learns a shorter budget (`--spin`).
    pub driver_spin_mode: SpinMode,
    /// Make the driver stop cleanly when this process exits.
    pub exit_with_client: bool,
    pub client: ClientConfig,
    /// The image is this NBD export, and the image fd a connection to it: the driver
    /// serves it with the NBD engine (`--nbd …`), whatever `engine` says.
    pub nbd: Option<NbdTarget>,
    /// Where the driver listens for a new supervisor should its own die
    /// (`--relink-dir`, see `molt_control::Relink`).
    pub relink_dir: Option<PathBuf>,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            engine: EngineKind::Uring,
            geometry: RingGeometry::default(),
            binary: None,
            driver_spin: env_or(SPIN_US_ENV, Duration::from_micros(50), |v| {
                v.parse().ok().map(Duration::from_micros)
            }),
            driver_spin_mode: env_or(SPIN_MODE_ENV, SpinMode::default(), |v| v.parse().ok()),
            exit_with_client: true,
            client: ClientConfig::default(),
            nbd: None,
            relink_dir: None,
        }
    }
}

/// The value of environment variable `name` as `parse` reads it; `default` when unset, or
/// (with a warning on stderr) when `parse` refuses it.
fn env_or<T>(name: &str, default: T, parse: impl FnOnce(&str) -> Option<T>) -> T {
    let Ok(v) = std::env::var(name) else {
        return default;
    };
    parse(&v).unwrap_or_else(|| {
        molt_sys::errln!("blockdev: ignoring {name}={v:?}: not a valid value");
        default
    })
}

/// A ring and its two eventfds, created in one process to be shared with a driver.
#[derive(Debug)]
pub struct RingSetup {
    pub ring: RingRegion,
    /// Client → driver doorbell.
    pub sq_eventfd: OwnedFd,
    /// Driver → client doorbell.
    pub cq_eventfd: OwnedFd,
}

impl RingSetup {
    pub fn new(geometry: RingGeometry) -> Result<RingSetup, RingError> {
        Ok(RingSetup {
            ring: RingRegion::create(geometry)?,
            sq_eventfd: sys::eventfd()?,
            cq_eventfd: sys::eventfd()?,
        })
    }

    /// Duplicates of the three descriptors (e.g. for a driver, or to keep in a supervisor).
    pub fn try_clone_fds(&self) -> std::io::Result<(OwnedFd, OwnedFd, OwnedFd)> {
        Ok((
            self.ring.try_clone_fd()?,
            self.sq_eventfd.try_clone()?,
            self.cq_eventfd.try_clone()?,
        ))
    }
}

/// Descriptors handed to a driver process.
#[derive(Debug, Clone, Copy)]
pub struct DriverFds<'a> {
    pub ring: BorrowedFd<'a>,
    pub sq_eventfd: BorrowedFd<'a>,
    pub cq_eventfd: BorrowedFd<'a>,
    pub image: BorrowedFd<'a>,
}

/// Locates the driver binary.
pub fn driver_binary(config: &DriverConfig) -> PathBuf {
    if let Some(b) = &config.binary {
        return b.clone();
    }
    if let Some(b) = std::env::var_os(BIN_ENV) {
        return PathBuf::from(b);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let here = dir.join("blockdev");
    if here.is_file() && exe.file_name() != Some("blockdev".as_ref()) {
        return here;
    }
    dir.parent().map(|p| p.join("blockdev")).unwrap_or(here)
}

/// Builds the driver command: `fds` become fds 3 (ring), 4 (submission eventfd),
/// 5 (completion eventfd) and 6 (image) in the child. The returned guard holds the
/// intermediate duplicates and must live until the command is spawned.
pub fn driver_command(
    fds: DriverFds<'_>,
    config: &DriverConfig,
    client_pid: Option<u32>,
) -> std::io::Result<(Command, Vec<OwnedFd>)> {
    build_command(fds, config, client_pid, None)
}

/// Like [`driver_command`], with a control socket (one end of an `AF_UNIX` stream pair;
/// the supervisor wraps the other in [`crate::handover::DriverControl`]) passed as fd 7
/// (`--ctl-fd 7`), and `--adopt` for [`StartMode::Adopt`].
pub fn driver_command_with_control(
    fds: DriverFds<'_>,
    config: &DriverConfig,
    client_pid: Option<u32>,
    ctl: BorrowedFd<'_>,
    mode: StartMode,
) -> std::io::Result<(Command, Vec<OwnedFd>)> {
    build_command(fds, config, client_pid, Some((ctl, mode)))
}

fn build_command(
    fds: DriverFds<'_>,
    config: &DriverConfig,
    client_pid: Option<u32>,
    ctl: Option<(BorrowedFd<'_>, StartMode)>,
) -> std::io::Result<(Command, Vec<OwnedFd>)> {
    let mut pass = vec![
        (fds.ring, RING_FD),
        (fds.sq_eventfd, SQ_EVENTFD),
        (fds.cq_eventfd, CQ_EVENTFD),
        (fds.image, IMAGE_FD),
    ];
    let mut cmd = Command::new(driver_binary(config));
    cmd.arg("serve")
        .args(["--ring-fd", &RING_FD.to_string()])
        .args(["--sq-eventfd", &SQ_EVENTFD.to_string()])
        .args(["--cq-eventfd", &CQ_EVENTFD.to_string()])
        .args(["--image-fd", &IMAGE_FD.to_string()])
        .args(["--engine", config.engine.as_str()])
        .args(["--spin-us", &config.driver_spin.as_micros().to_string()]);
    // Only when not the driver's default: builds from before `--spin` spin fixed and
    // refuse flags they do not know.
    if config.driver_spin_mode != SpinMode::default() {
        cmd.args(["--spin", config.driver_spin_mode.as_str()]);
    }
    if let Some(pid) = client_pid {
        cmd.args(["--client-pid", &pid.to_string()]);
    }
    if let Some(t) = &config.nbd {
        cmd.args(t.driver_args());
    }
    if let Some(dir) = &config.relink_dir {
        cmd.arg("--relink-dir").arg(dir);
    }
    if let Some((ctl, mode)) = ctl {
        pass.push((ctl, CTL_FD));
        cmd.args(["--ctl-fd", &CTL_FD.to_string()]);
        if mode == StartMode::Adopt {
            cmd.arg("--adopt");
        }
    }
    let sources = sys::pass_fds(&mut cmd, &pass, sys::ChildOptions::default())?;
    Ok((cmd, sources))
}

/// Opens `image` (with `O_DIRECT` when possible; an NBD URI is connected), spawns a
/// driver for it and connects.
pub fn spawn_driver(image: &Path, mut config: DriverConfig) -> Result<(Client, Child), BlockError> {
    let image = Image::open_named(image)?;
    if let Some(t) = image.nbd() {
        config.nbd = Some(t.clone());
    }
    spawn_driver_with_fds(image.file().as_fd(), config)
}

/// Like [`spawn_driver`] for an image that is already open.
pub fn spawn_driver_with_fds(
    image: BorrowedFd<'_>,
    config: DriverConfig,
) -> Result<(Client, Child), BlockError> {
    let setup = RingSetup::new(config.geometry)?;
    let fds = DriverFds {
        ring: setup.ring.fd(),
        sq_eventfd: setup.sq_eventfd.as_fd(),
        cq_eventfd: setup.cq_eventfd.as_fd(),
        image,
    };
    let client_pid = config.exit_with_client.then(std::process::id);
    let (mut cmd, guard) = driver_command(fds, &config, client_pid)?;
    let mut child = cmd.spawn()?;
    drop(guard);
    let pidfd = match sys::pidfd_open(child.id() as i32) {
        Ok(p) => p,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.into());
        }
    };
    let RingSetup {
        ring,
        sq_eventfd,
        cq_eventfd,
    } = setup;
    match Client::connect(ring, sq_eventfd, cq_eventfd, Some(pidfd), config.client) {
        Ok(client) => Ok((client, child)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(mode: SpinMode) -> Vec<String> {
        let fd = sys::eventfd().unwrap();
        let fds = DriverFds {
            ring: fd.as_fd(),
            sq_eventfd: fd.as_fd(),
            cq_eventfd: fd.as_fd(),
            image: fd.as_fd(),
        };
        let config = DriverConfig {
            binary: Some("blockdev".into()),
            driver_spin: Duration::from_micros(30),
            driver_spin_mode: mode,
            ..DriverConfig::default()
        };
        let (cmd, _guard) = driver_command(fds, &config, None).unwrap();
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_spin_mode_is_passed_only_when_fixed() {
        let fixed = args(SpinMode::Fixed);
        let adaptive = args(SpinMode::Adaptive);
        for a in [&fixed, &adaptive] {
            assert!(a.windows(2).any(|w| w == ["--spin-us", "30"]), "{a:?}");
        }
        assert!(
            fixed.windows(2).any(|w| w == ["--spin", "fixed"]),
            "{fixed:?}"
        );
        assert!(!adaptive.iter().any(|a| a == "--spin"), "{adaptive:?}");
    }
}
