//! `fsd`: the Molt filesystem tool. A thin shell: parse arguments, call the library, map
//! the outcome to an exit code.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;
mod helper;

use fsd_core::fsck;
use fsd_server::serve;
use update_manager::{options, supervisor};

#[derive(Parser)]
#[command(name = "fsd", version, about = "Molt filesystem daemon and tools")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make an empty filesystem on IMAGE (a regular file, created sparse, or a block device).
    Mkfs {
        image: PathBuf,
        /// Image size, like 64M, 1G or 1T; a block device's own size must match if given.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Overwrite an existing Molt image.
        #[arg(long)]
        force: bool,
        /// On-disk format version: 1, 2 or 3 (default: the newest).
        #[arg(long, value_name = "N", value_parser = parse_version)]
        format_version: Option<formats::FormatVersion>,
        /// Print one JSON object describing the filesystem made instead of the sentence.
        #[arg(long)]
        json: bool,
    },
    /// Convert the unmounted IMAGE to a newer on-disk format, or finish a conversion an
    /// interrupted run left half-done.
    Convert {
        image: PathBuf,
        /// Format version to convert to: 2 or 3.
        #[arg(long, value_name = "N", value_parser = parse_version)]
        to: formats::FormatVersion,
    },
    /// Check IMAGE. Exit codes: 0 clean, 1 errors repaired, 4 errors left, 8 operational error.
    Fsck {
        image: PathBuf,
        /// Replay the journal and fix what is safe to fix.
        #[arg(long)]
        repair: bool,
        /// Print one JSON object instead of the human report.
        #[arg(long)]
        json: bool,
    },
    /// Mount IMAGE on MOUNTPOINT: starts the supervisor, the block driver and the
    /// filesystem server, and returns once the mount is usable.
    Mount {
        image: PathBuf,
        mountpoint: PathBuf,
        /// Stay attached: run the supervisor in this process, logging to the terminal.
        /// Under a service manager (`NOTIFY_SOCKET` set) it reports READY=1 once the mount
        /// answers; SIGTERM unmounts and leaves a clean image.
        #[arg(long)]
        foreground: bool,
        /// FUSE worker threads over /dev/fuse (default 4; also `-o threads=N`).
        #[arg(long)]
        threads: Option<usize>,
        /// How the kernel's FUSE requests reach the server: dev (/dev/fuse, the default:
        /// every live update and crash recovery work over it), uring (FUSE over io_uring,
        /// one queue per CPU; fsd is then not replaced live and a server crash ends the
        /// mount), or auto (uring when the kernel has it, switching it on as root).
        /// Also `-o transport=…`.
        #[arg(long)]
        transport: Option<fsd_server::serve::TransportChoice>,
        /// I/O engine of the block driver: uring (the default) or sync. Also `-o engine=…`.
        #[arg(long)]
        engine: Option<blockdev::engine::EngineKind>,
        /// Directory of trusted live-update signing keys (root-owned, `*.pub`; default
        /// /etc/molt/keyring). Also `-o keyring=DIR`.
        #[arg(long)]
        keyring: Option<PathBuf>,
        /// Let this user (besides root) use the control socket; repeatable. Also
        /// `-o allow_uid=N`.
        #[arg(long = "allow-uid")]
        allowed_uids: Vec<u32>,
        /// Mount options, comma-separated, repeatable: ro|rw, dev|nodev, suid|nosuid,
        /// exec|noexec, relatime|strictatime|noatime (default rw,nodev,nosuid,exec,
        /// relatime), threads=N, transport=…, engine=…, keyring=DIR, allow_uid=N; the
        /// options mount(8) acts on (defaults, nofail, _netdev, noauto, user, x-*, …) are
        /// ignored. A flag given both ways takes the command-line flag's value.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Internal: descriptor on which the supervisor reports readiness.
        #[arg(long, hide = true)]
        ready_fd: Option<i32>,
    },
    /// The mount(8) helper, as `mount.fuse.molt IMAGE MOUNTPOINT [-sfnv] [-o OPTIONS]`
    /// runs it (this binary installed or linked under that name does the same).
    #[command(name = "mount-helper")]
    MountHelper {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The umount(8) helper, as `umount.fuse.molt MOUNTPOINT [-nlfvr]` runs it: unmounts
    /// and waits until the image is clean, like `fsd unmount`.
    #[command(name = "umount-helper")]
    UmountHelper {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Unmount MOUNTPOINT and wait until the image is clean and every process has exited.
    Unmount { mountpoint: PathBuf },
    /// Print what this build is (name, version, state schemas, ring protocol, error codes)
    /// as one line of JSON: the update manager's probe.
    ComponentInfo,
    /// Print what this build's supervisor is (version, state schemas) as one line of JSON:
    /// the update manager's probe of a supervisor package.
    SupervisorInfo,
    /// Internal: take a mount over from the supervisor that exec'd this binary (a live
    /// update of the supervisor), from the state in the sealed memfd at --state-fd.
    #[command(hide = true)]
    SupervisorTakeover {
        #[arg(long)]
        state_fd: i32,
        /// Only check that this build reads the state (a saved supervisor state), then exit.
        #[arg(long)]
        check: bool,
    },
    /// Internal: the filesystem server process, started by the supervisor.
    #[command(hide = true)]
    Serve {
        mountpoint: PathBuf,
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// dev or uring.
        #[arg(long, default_value = "dev")]
        transport: fsd_server::serve::TransportChoice,
        /// Take over from a running predecessor (live update).
        #[arg(long)]
        adopt: bool,
        /// Take over from a predecessor that died (N counts this mount's recoveries).
        #[arg(long, value_name = "N", conflicts_with = "adopt")]
        recover: Option<u64>,
        /// The mount is read-only: open the image without writing to it.
        #[arg(long)]
        read_only: bool,
        /// Listen on DIR/fsd-<pid>.sock (mode 0600): once the supervisor is gone, the next
        /// connection there from root or this user becomes the control link. Removed when
        /// the server exits.
        #[arg(long, value_name = "DIR")]
        relink_dir: Option<PathBuf>,
    },
}

/// Adopts a descriptor this process was started with.
fn inherited_fd(fd: i32) -> anyhow::Result<std::os::fd::OwnedFd> {
    molt_sys::adopt_inherited_fd(fd)
        .map_err(|_| anyhow::anyhow!("descriptor {fd} was not passed to this process"))
}

fn parse_size(s: &str) -> Result<u64, String> {
    cli::parse_size(s).map_err(|e| e.to_string())
}

fn parse_version(s: &str) -> Result<formats::FormatVersion, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a version number"))?;
    cli::parse_version(n).map_err(|e| e.to_string())
}

/// `fsd convert`: a progress bar on stderr, rewritten in place.
fn convert(image: &std::path::Path, to: formats::FormatVersion) -> ExitCode {
    use std::io::Write;
    let name = image.display().to_string();
    let mut last = std::time::Instant::now();
    let mut show = |p: &fsd_core::fs::Progress| {
        if p.finished || last.elapsed().as_millis() >= 100 {
            last = std::time::Instant::now();
            let pct = p.done_inodes * 100 / p.total_inodes.max(1);
            let filled = (pct as usize * 30 / 100).min(30);
            molt_sys::err!(
                "\rconverting {name} to format v{}: [{}{}] inode {} of {} ({pct}%)",
                to.0,
                "#".repeat(filled),
                "-".repeat(30 - filled),
                p.done_inodes,
                p.total_inodes
            );
            let _ = std::io::stderr().flush();
        }
    };
    let r = cli::convert_image(image, to, &mut show);
    molt_sys::errln!();
    match r {
        Ok(out) if out.from == out.to => {
            molt_sys::outln!("{name} already has format v{}", out.to.0);
            ExitCode::SUCCESS
        }
        Ok(out) => {
            molt_sys::outln!(
                "converted {name} from format v{} to v{}{}: {} KiB of metadata rewritten",
                out.from.0,
                out.to.0,
                if out.resumed { " (resumed)" } else { "" },
                out.bytes_moved / 1024
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            molt_sys::errln!("fsd convert: {:#}", anyhow::Error::from(e));
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    // Multi-call: installed (or linked) as the mount(8) and umount(8) helpers.
    let mut argv = std::env::args_os();
    let called = argv.next().and_then(|a| {
        Path::new(&a)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    });
    let rest = || -> Vec<String> { argv.map(|a| a.to_string_lossy().into_owned()).collect() };
    match called.as_deref() {
        Some(helper::MOUNT_HELPER) => return helper::mount_main(helper::MOUNT_HELPER, &rest()),
        Some(helper::UMOUNT_HELPER) => return helper::umount_main(helper::UMOUNT_HELPER, &rest()),
        _ => {}
    }
    match Args::parse().command {
        Command::Mkfs {
            image,
            size,
            force,
            format_version,
            json,
        } => match cli::mkfs_image(
            &image,
            size,
            force,
            format_version.unwrap_or(formats::FormatVersion::CURRENT),
        ) {
            Ok(out) if json => {
                molt_sys::outln!("{}", out.to_json(&image.display().to_string()));
                ExitCode::SUCCESS
            }
            Ok(out) => {
                let g = out.superblock.geometry;
                molt_sys::outln!(
                    "made a Molt filesystem (format v{}) on {}: {} bytes, {} blocks, {} inodes",
                    out.superblock.format_version.0,
                    image.display(),
                    out.bytes,
                    g.total_blocks,
                    g.inode_count
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                molt_sys::errln!("fsd mkfs: {:#}", anyhow::Error::from(e));
                ExitCode::from(1)
            }
        },
        Command::Convert { image, to } => convert(&image, to),
        Command::Fsck {
            image,
            repair,
            json,
        } => {
            let name = image.display().to_string();
            let code = match cli::fsck_image(&image, repair) {
                Ok(report) => {
                    if json {
                        molt_sys::outln!("{}", report.to_json(&name));
                    } else {
                        molt_sys::out!("{}", report.render(&name));
                    }
                    report.exit_code()
                }
                Err(e) => {
                    if json {
                        molt_sys::outln!("{}", fsck::error_json(&name, &e));
                    } else {
                        molt_sys::errln!("fsd fsck: {name}: {e}");
                    }
                    fsck::EXIT_OPERATIONAL
                }
            };
            ExitCode::from(code as u8)
        }
        Command::Mount {
            image,
            mountpoint,
            foreground,
            threads,
            transport,
            engine,
            keyring,
            allowed_uids,
            options,
            ready_fd,
        } => {
            let given = helper::Given {
                threads,
                transport,
                engine,
                keyring,
                allowed_uids,
            };
            let opts = match options::parse(&options.join(","), false) {
                Ok(parsed) => helper::mount_options(image, mountpoint, parsed, given),
                Err(e) => {
                    molt_sys::errln!("fsd mount: {e}");
                    return ExitCode::from(1);
                }
            };
            let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("fsd"));
            let r = if foreground {
                match ready_fd.map(inherited_fd).transpose() {
                    Ok(ready) => supervisor::supervise(&opts, &exe, ready),
                    Err(e) => Err(supervisor::MountError::Failed(e.to_string())),
                }
            } else {
                supervisor::mount_daemon(&opts, &exe)
            };
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    molt_sys::errln!("fsd mount: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::MountHelper { args } => helper::mount_main(helper::MOUNT_HELPER, &args),
        Command::UmountHelper { args } => helper::umount_main(helper::UMOUNT_HELPER, &args),
        Command::ComponentInfo => {
            match serde_json::to_string(&fsd_server::component_info()) {
                Ok(line) => molt_sys::outln!("{line}"),
                Err(e) => {
                    molt_sys::errln!("fsd: {e}");
                    return ExitCode::from(1);
                }
            }
            ExitCode::SUCCESS
        }
        Command::SupervisorInfo => {
            match serde_json::to_string(&update_manager::identity::supervisor_info()) {
                Ok(line) => molt_sys::outln!("{line}"),
                Err(e) => {
                    molt_sys::errln!("fsd: {e}");
                    return ExitCode::from(1);
                }
            }
            ExitCode::SUCCESS
        }
        Command::SupervisorTakeover { state_fd, check } => {
            let fd = match inherited_fd(state_fd) {
                Ok(fd) => fd,
                Err(e) => {
                    molt_sys::errln!("fsd supervisor-takeover: {e}");
                    return ExitCode::from(1);
                }
            };
            let r = if check {
                update_manager::succession::check_state_fd(fd)
                    .map_err(supervisor::MountError::Failed)
            } else {
                supervisor::supervise_takeover(fd)
            };
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    molt_sys::errln!("fsd supervisor-takeover: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Unmount { mountpoint } => match supervisor::unmount(&mountpoint) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                molt_sys::errln!("fsd unmount: {e}");
                ExitCode::from(1)
            }
        },
        Command::Serve {
            mountpoint,
            threads,
            transport,
            adopt,
            recover,
            read_only,
            relink_dir,
        } => {
            let transport = match transport {
                serve::TransportChoice::Uring => fsd_server::persist::Transport::Uring,
                _ => fsd_server::persist::Transport::Dev,
            };
            let args = serve::ServerArgs {
                mountpoint,
                threads,
                transport,
                adopt,
                recover,
                read_only,
                relink_dir,
            };
            let fds = (|| -> anyhow::Result<serve::ServerFds> {
                use fsd_server::serve::*;
                Ok(serve::ServerFds {
                    ring: inherited_fd(SERVE_RING_FD)?,
                    sq_eventfd: inherited_fd(SERVE_SQ_FD)?,
                    cq_eventfd: inherited_fd(SERVE_CQ_FD)?,
                    fuse: std::fs::File::from(inherited_fd(SERVE_FUSE_FD)?),
                    ctl: std::os::unix::net::UnixStream::from(inherited_fd(SERVE_CTL_FD)?),
                    redo: std::fs::File::from(inherited_fd(SERVE_REDO_FD)?),
                    session: std::fs::File::from(inherited_fd(SERVE_SESSION_FD)?),
                })
            })();
            match fds.and_then(|fds| fsd_server::run_server(&args, fds)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    molt_sys::errln!("fsd serve: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
