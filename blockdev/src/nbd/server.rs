//! NBD servers for tests and benchmarks: `qemu-nbd` or `nbdkit` started as a child on a
//! private unix socket (or a loopback port), killed and reaped when the guard is dropped.

use std::io::{self, BufRead, BufReader, Write};
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
    /// `nbdkit` with these arguments after the listening options (filters, a plugin and
    /// its arguments).
    Kit(Vec<String>),
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
///
/// The server runs as a child of a small launcher shell started with the guard, not of
/// the test process: a process with files open on a FUSE mount that forks and execs
/// closes those files in the child, and each close sends the mount a FLUSH, which waits
/// for the device — a server started that way while the device waits for it would never
/// finish starting.
#[derive(Debug)]
pub struct NbdServer {
    export: Export,
    uri: NbdUri,
    dir: PathBuf,
    launcher: Launcher,
    pid: Option<u32>,
}

/// `sh` reading one command a line: `start` runs the server in the background and prints
/// its pid; `stop` kills it (SIGKILL), reaps it and prints `stopped`.
#[derive(Debug)]
struct Launcher {
    child: Child,
    to: std::process::ChildStdin,
    from: BufReader<std::process::ChildStdout>,
}

const LAUNCHER: &str = r#"pid=
while read -r cmd; do
  case "$cmd" in
    start) "$@" </dev/null >/dev/null & pid=$!; echo "$pid" ;;
    stop) [ -n "$pid" ] && { kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; }; pid=; echo stopped ;;
  esac
done
[ -n "$pid" ] && { kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; }
"#;

impl Launcher {
    fn new(cmd: &[String]) -> io::Result<Launcher> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(LAUNCHER)
            .arg("sh")
            .args(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let to = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("no stdin"))?;
        let from = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout"))?;
        Ok(Launcher {
            child,
            to,
            from: BufReader::new(from),
        })
    }

    fn ask(&mut self, cmd: &str) -> io::Result<String> {
        writeln!(self.to, "{cmd}")?;
        self.to.flush()?;
        let mut line = String::new();
        if self.from.read_line(&mut line)? == 0 {
            return Err(io::Error::other("the launcher shell exited"));
        }
        Ok(line.trim().to_string())
    }
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
        let uri = NbdUri {
            address,
            export: EXPORT_NAME.into(),
        };
        let launcher = Launcher::new(&command(&export, &uri))?;
        let mut s = NbdServer {
            export,
            uri,
            dir,
            launcher,
            pid: None,
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
        self.pid
    }

    /// What the server exports.
    pub fn export(&self) -> &Export {
        &self.export
    }

    fn spawn(&mut self) -> io::Result<()> {
        if let NbdAddress::Unix { socket } = &self.uri.address {
            let _ = std::fs::remove_file(socket);
        }
        let pid: u32 = self
            .launcher
            .ask("start")?
            .parse()
            .map_err(|_| io::Error::other("the launcher did not report a pid"))?;
        self.pid = Some(pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let last = match super::NbdConnection::connect(&self.uri) {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if molt_sys::process_gone(pid) {
                self.kill();
                return Err(io::Error::other(format!(
                    "the NBD server exited at start ({last})"
                )));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(io::Error::other(format!(
                    "the NBD server did not start within 10 s (last attempt: {last})"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and waits until it is reaped.
    pub fn kill(&mut self) {
        if self.pid.take().is_some() {
            let _ = self.launcher.ask("stop");
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

/// The server's command line.
fn command(export: &Export, uri: &NbdUri) -> Vec<String> {
    let mut c: Vec<String> = Vec::new();
    let listen = |c: &mut Vec<String>, unix: &str, host: &str, port: &str| match &uri.address {
        NbdAddress::Unix { socket } => c.extend([unix.to_string(), socket.clone()]),
        NbdAddress::Tcp { host: h, port: p } => {
            c.extend([host.to_string(), h.clone(), port.to_string(), p.to_string()])
        }
    };
    match export {
        Export::Qemu { image, format } => {
            c.extend(
                ["qemu-nbd", "-f", format, "-x", EXPORT_NAME, "--persistent"].map(String::from),
            );
            c.extend(["--cache=writeback", "--discard=unmap"].map(String::from));
            listen(&mut c, "-k", "-b", "-p");
            c.push(image.to_string_lossy().into_owned());
        }
        Export::KitFile { image } => {
            c.extend(["nbdkit", "--foreground", "--exit-with-parent"].map(String::from));
            listen(&mut c, "--unix", "-i", "-p");
            c.extend(["file".to_string(), image.to_string_lossy().into_owned()]);
        }
        Export::KitMemory { size } => {
            c.extend(["nbdkit", "--foreground", "--exit-with-parent"].map(String::from));
            listen(&mut c, "--unix", "-i", "-p");
            c.extend(["memory".to_string(), size.to_string()]);
        }
        Export::Kit(args) => {
            c.extend(["nbdkit", "--foreground", "--exit-with-parent"].map(String::from));
            listen(&mut c, "--unix", "-i", "-p");
            c.extend(args.iter().cloned());
        }
    }
    c
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.kill();
        // The launcher runs nothing now: it can go.
        let _ = self.launcher.child.kill();
        let _ = self.launcher.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
