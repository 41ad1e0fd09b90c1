//! `blockdev`: the Molt block driver process. Thin: parses arguments and calls the library.
//!
//! Exit codes: 0 stopped cleanly (stop signal or client exit), 1 operational error,
//! 3 the client broke the ring protocol.

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use blockdev::engine::{Engine, EngineKind};
use blockdev::image::Image;
use blockdev::persist::StopReason;
use blockdev::ring::RingRegion;
use blockdev::server::{Server, ServerConfig};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "blockdev", about = "Molt userspace block driver")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
        /// Bounded spin before sleeping, in microseconds.
        #[arg(long, default_value_t = 50)]
        spin_us: u64,
        /// Stop cleanly when this process exits.
        #[arg(long)]
        client_pid: Option<i32>,
    },
}

/// Adopts an inherited descriptor.
fn adopt(fd: i32, what: &str) -> Result<OwnedFd> {
    if fd < 3 {
        bail!("{what}: fd {fd} is a standard stream");
    }
    // SAFETY: F_GETFD only inspects the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        bail!("{what}: fd {fd} is not open");
    }
    // SAFETY: the fd is open (checked above), was passed to us for this purpose, and is
    // adopted exactly once (clap arguments are distinct uses checked in `main`).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn main() -> Result<()> {
    let Cmd::Serve {
        ring_fd,
        sq_eventfd,
        cq_eventfd,
        image_fd,
        engine,
        spin_us,
        client_pid,
    } = Cli::parse().cmd;
    let mut nums = [ring_fd, sq_eventfd, cq_eventfd, image_fd];
    nums.sort_unstable();
    if nums.windows(2).any(|w| w[0] == w[1]) {
        bail!("the four fds must be distinct");
    }
    let ring = RingRegion::open(adopt(ring_fd, "ring")?).context("opening the ring")?;
    let image = Image::from_fd(adopt(image_fd, "image")?).context("opening the image")?;
    let sq = adopt(sq_eventfd, "submission eventfd")?;
    let cq = adopt(cq_eventfd, "completion eventfd")?;
    let engine =
        Engine::new(engine, image, ring.geometry().queue_depth).context("building the engine")?;
    let config = ServerConfig {
        spin: Duration::from_micros(spin_us),
        client_pid,
        ..ServerConfig::default()
    };
    let mut server = Server::new(ring, engine, sq, cq, config).context("attaching to the ring")?;
    let stop = server.stop_handle().flag();
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop)?;
    let state = server.run().context("serving")?;
    eprintln!("blockdev: stopped: {state:?}");
    if let StopReason::ProtocolViolation(_) = state.reason {
        std::process::exit(3);
    }
    Ok(())
}
