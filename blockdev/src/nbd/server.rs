//! NBD servers for tests and benchmarks: `qemu-nbd` or `nbdkit` started as a child on a
//! private unix socket (or a loopback port), killed and reaped when the guard is dropped.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{NbdAddress, NbdUri};

/// What the server exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Export {
    /// `qemu-nbd` over an image file in the given format (`raw`, `qcow2`).
    Qemu { image: PathBuf, format: String },
    /// `nbdkit` over a file.
    KitFile { image: PathBuf },
    /// `nbdkit`'s memory plugin, of this many bytes.
    KitMemory { size: u64 },
}

/// Where it listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    Unix,
    /// Loopback TCP on a free port.
    Tcp,
}

/// The export name every server here serves (qemu-nbd checks it; nbdkit ignores it).
pub const EXPORT_NAME: &str = "molt";

/// A running server; dropping it kills it.
#[derive(Debug)]
pub struct NbdServer {
    export: Export,
    uri: NbdUri,
    dir: PathBuf,
    child: Option<Child>,
}

impl NbdServer {
    pub fn start(export: Export, listen: Listen) -> io::Result<NbdServer> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "molt-nbd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let address = match listen {
            Listen::Unix => NbdAddress::Unix {
                socket: dir.join("nbd.sock").to_string_lossy().into_owned(),
            },
            Listen::Tcp => {
                // A port the kernel just handed out, released for the server to bind.
                let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
                NbdAddress::Tcp {
                    host: "127.0.0.1".into(),
                    port,
                }
            }
        };
        let mut s = NbdServer {
            export,
            uri: NbdUri {
                address,
                export: EXPORT_NAME.into(),
            },
            dir,
            child: None,
        };
        s.spawn()?;
        Ok(s)
    }

    /// The URI clients connect to.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) -> io::Result<()> {
        let mut cmd = match &self.export {
            Export::Qemu { image, format } => {
                let mut c = Command::new("qemu-nbd");
                c.args([
                    "-f",
                    format,
                    "-x",
                    EXPORT_NAME,
                    "--persistent",
                    "--shared=4",
                ])
                .args(["--cache=writeback", "--discard=unmap"]);
                match &self.uri.address {
                    NbdAddress::Unix { socket } => c.args(["-k", socket]),
                    NbdAddress::Tcp { host, port } => c.args(["-b", host, "-p", &port.to_string()]),
                };
                c.arg(image);
                c
            }
            Export::KitFile { .. } | Export::KitMemory { .. } => {
                let mut c = Command::new("nbdkit");
                c.args(["--foreground", "--exit-with-parent"]);
                match &self.uri.address {
                    NbdAddress::Unix { socket } => c.args(["--unix", socket]),
                    NbdAddress::Tcp { host, port } => c.args(["-i", host, "-p", &port.to_string()]),
                };
                match &self.export {
                    Export::KitFile { image } => c.arg("file").arg(image),
                    Export::KitMemory { size } => c.arg("memory").arg(size.to_string()),
                    Export::Qemu { .. } => unreachable!("matched above"),
                };
                c
            }
        };
        if let NbdAddress::Unix { socket } = &self.uri.address {
            let _ = std::fs::remove_file(socket);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        let mut child = cmd.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if super::NbdConnection::connect(&self.uri).is_ok() {
                break;
            }
            if let Some(status) = child.try_wait()? {
                return Err(io::Error::other(format!(
                    "the NBD server exited at start ({status})"
                )));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::other("the NBD server did not start within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        Ok(())
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same socket or port, over the same export (a
    /// memory export starts empty).
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn()
    }

    /// The private directory the unix socket lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
