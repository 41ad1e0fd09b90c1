//! `blockdev`: the Molt block driver process. Thin: parses arguments and calls the library.
//!
//! Exit codes: 0 stopped cleanly (stop signal, client exit, `exit` or `abort` on the
//! control socket, a successor found serving after the supervisor went away), 1
//! operational error (including a refused state import, or a supervisor lost before a
//! successor's commit), 3 the client broke the ring protocol.

#![forbid(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use blockdev::engine::{Engine, EngineKind};
use blockdev::handover::driver::{adopt_controlled, serve_controlled, DriverExit};
use blockdev::image::Image;
use blockdev::nbd::{ExportInfo, NbdConnection, NbdTarget, NbdUri};
use blockdev::persist::{StateVersion, StopReason, COMPONENT_VERSION};
use blockdev::ring::{ProtocolVersion, RingRegion, StatusTable};
use blockdev::server::{Server, ServerConfig};
use blockdev::spin::SpinMode;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

fn long_version() -> String {
    format!(
        "{COMPONENT_VERSION} (state schema {}, ring protocol {}, status codes {})",
        StateVersion::CURRENT.0,
        ProtocolVersion::CURRENT.0,
        StatusTable::CURRENT.0
    )
}

#[derive(Parser)]
#[command(
    name = "blockdev",
    about = "Molt userspace block driver",
    version = COMPONENT_VERSION
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print what this build is (name, version, state schemas, ring protocol, error codes)
    /// as one line of JSON: the update manager's probe.
    ComponentInfo,
    /// Serve one client over a ring, with every resource passed as an inherited fd.
    Serve {
        #[arg(long)]
        ring_fd: i32,
        #[arg(long)]
        sq_eventfd: i32,
        #[arg(long)]
        cq_eventfd: i32,
        #[arg(long)]
        image_fd: i32,
        #[arg(long, default_value = "uring")]
        engine: EngineKind,
        /// Longest spin before sleeping, in microseconds.
        #[arg(long, default_value_t = 50)]
        spin_us: u64,
        /// `fixed`: always spin `--spin-us`; `adaptive`: spin up to it, as long as recent
        /// idle periods say pays (RING.md, "Doorbells").
        #[arg(long, default_value = "adaptive")]
        spin: SpinMode,
        /// Stop cleanly when this process exits.
        #[arg(long)]
        client_pid: Option<i32>,
        /// Control socket of the supervisor (live update line protocol, RING.md).
        #[arg(long)]
        ctl_fd: Option<i32>,
        /// Take over a ring another driver serves: import its state from the control
        /// socket and touch the ring only after `commit`. If the ring's driver died with
        /// work taken, take the ring over at once instead (crash recovery).
        #[arg(long, requires = "ctl_fd")]
        adopt: bool,
        /// Listen on DIR/blockdev-<pid>.sock (mode 0600): once the control socket's peer
        /// is gone, the next connection there from root or this user becomes the control
        /// socket. Removed when the driver exits.
        #[arg(long, value_name = "DIR", requires = "ctl_fd")]
        relink_dir: Option<PathBuf>,
        /// The image fd is a connection to this NBD export, past its handshake (what
        /// `--nbd-size` and `--nbd-flags` say it negotiated): serve it with the NBD
        /// engine, reconnecting to this URI when the connection is lost.
        #[arg(long, requires_all = ["nbd_size", "nbd_flags"])]
        nbd: Option<String>,
        /// Export size in bytes, from the handshake.
        #[arg(long, requires = "nbd")]
        nbd_size: Option<u64>,
        /// Transmission flags, from the handshake.
        #[arg(long, requires = "nbd")]
        nbd_flags: Option<u16>,
    },
}

/// Adopts an inherited descriptor.
fn adopt(fd: i32, what: &str) -> Result<OwnedFd> {
    if fd < 3 {
        bail!("{what}: fd {fd} is a standard stream");
    }
    // Each number is adopted once: `main` checks that the arguments are distinct.
    molt_sys::adopt_inherited_fd(fd).map_err(|e| anyhow!("{what}: fd {fd} is not open ({e})"))
}

/// How long the NBD engine waits for a lost connection: `MOLT_NBD_RECONNECT_MS`, else
/// the engine's default.
fn reconnect_bound() -> Result<Duration> {
    match std::env::var("MOLT_NBD_RECONNECT_MS") {
        Ok(v) => Ok(Duration::from_millis(v.parse().map_err(|_| {
            anyhow!("MOLT_NBD_RECONNECT_MS={v:?} is not a number of milliseconds")
        })?)),
        Err(_) => Ok(blockdev::engine::DEFAULT_RECONNECT_BOUND),
    }
}

fn main() -> Result<()> {
    // `--version` shows the component version; `blockdev --version` with the long form
    // (`--help` lists it) adds the schema and protocol versions.
    let long: &'static str = Box::leak(long_version().into_boxed_str());
    let cli = Cli::from_arg_matches(&Cli::command().long_version(long).get_matches())?;
    if let Some(Cmd::ComponentInfo) = cli.cmd {
        molt_sys::outln!(
            "{}",
            serde_json::to_string(&blockdev::persist::component_info())?
        );
        return Ok(());
    }
    let Some(Cmd::Serve {
        ring_fd,
        sq_eventfd,
        cq_eventfd,
        image_fd,
        engine,
        spin_us,
        spin,
        client_pid,
        ctl_fd,
        adopt: adopting,
        relink_dir,
        nbd,
        nbd_size,
        nbd_flags,
    }) = cli.cmd
    else {
        bail!("nothing to do: use `blockdev serve …` or `blockdev component-info`");
    };
    let mut nums = vec![ring_fd, sq_eventfd, cq_eventfd, image_fd];
    nums.extend(ctl_fd);
    nums.sort_unstable();
    if nums.windows(2).any(|w| w[0] == w[1]) {
        bail!("the fds must be distinct");
    }
    let ctl = ctl_fd
        .map(|fd| adopt(fd, "control socket").map(UnixStream::from))
        .transpose()?;
    let relink = relink_dir
        .map(|dir| {
            molt_control::Relink::bind(&dir, "blockdev", molt_sys::socket::effective_uid(), |s| {
                Ok(molt_sys::peer_credentials(s.as_fd())?.uid)
            })
            .with_context(|| format!("listening for a new supervisor in {}", dir.display()))
        })
        .transpose()?;
    // `process::exit` skips destructors: the socket's name is removed by hand.
    let relink_path = relink.as_ref().map(|r| r.path().to_path_buf());
    let ring = RingRegion::open(adopt(ring_fd, "ring")?).context("opening the ring")?;
    let image_fd = adopt(image_fd, "image")?;
    let sq = adopt(sq_eventfd, "submission eventfd")?;
    let cq = adopt(cq_eventfd, "completion eventfd")?;
    let depth = ring.geometry().queue_depth;
    let engine = match (nbd, nbd_size, nbd_flags) {
        (Some(uri), Some(size), Some(flags)) => {
            let uri = NbdUri::parse(&uri)?;
            let target = NbdTarget {
                uri,
                info: ExportInfo { size, flags },
            };
            let conn = NbdConnection::from_fd(image_fd, target);
            Engine::nbd(conn, depth, reconnect_bound()?).context("building the NBD engine")?
        }
        _ => {
            let image = Image::from_fd(image_fd).context("opening the image")?;
            Engine::new(engine, image, depth).context("building the engine")?
        }
    };
    let config = ServerConfig {
        spin: Duration::from_micros(spin_us),
        spin_mode: spin,
        client_pid,
        ..ServerConfig::default()
    };
    let server = if adopting {
        Server::adopt(ring, engine, sq, cq, config).context("preparing to adopt the ring")?
    } else {
        Server::new(ring, engine, sq, cq, config).context("attaching to the ring")?
    };
    let stop = server.stop_handle().flag();
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop)?;
    let Some(ctl) = ctl else {
        let mut server = server;
        let state = server.run().context("serving")?;
        molt_sys::errln!("blockdev: stopped: {state:?}");
        if let StopReason::ProtocolViolation(_) = state.reason {
            std::process::exit(3);
        }
        return Ok(());
    };
    let exit = if adopting {
        adopt_controlled(server, ctl, relink)
    } else {
        serve_controlled(server, ctl, relink)
    };
    if let Some(p) = &relink_path {
        let _ = std::fs::remove_file(p);
    }
    let exit = exit.context("serving")?;
    match &exit {
        DriverExit::Stopped(s) | DriverExit::Violation(s) => {
            molt_sys::errln!("blockdev: stopped: {s:?}")
        }
        DriverExit::ImportFailed(e) => molt_sys::errln!("blockdev: state import refused: {e}"),
        DriverExit::SupervisorGone => {
            molt_sys::errln!("blockdev: supervisor gone during a handover; leaving the ring alone")
        }
        DriverExit::HandedOver | DriverExit::Aborted => {}
    }
    std::process::exit(exit.code());
}
