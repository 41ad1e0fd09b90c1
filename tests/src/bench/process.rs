//! Child processes with deadlines. Every command the benchmark runs (fio, tar, mkfs,
//! mount tools, the metadata worker) goes through [`run`]: it runs in its own process
//! group, is killed with that group when it overruns its deadline or the benchmark is
//! interrupted, and a peer's abort hook (which fails every waiting FUSE request) is
//! called if the kill alone does not end it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::BenchError;

/// The flag SIGINT/SIGTERM set (the binary registers it); every wait loop checks it.
pub fn stop_flag() -> Arc<AtomicBool> {
    static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    STOP.get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone()
}

pub fn stopped() -> bool {
    stop_flag().load(Ordering::Relaxed)
}

/// How long a killed process may take to go away before the abort hook runs, and again
/// after it.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// What a finished command produced.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    /// `Ok(self)` if the command exited 0, else a `Failed` error quoting its output.
    pub fn success(self, what: &str) -> Result<Finished, BenchError> {
        if self.status.success() {
            Ok(self)
        } else {
            Err(BenchError::Failed {
                what: what.to_string(),
                detail: format!("{}: {}{}", self.status, self.stdout, self.stderr),
            })
        }
    }
}

/// Runs `cmd` to completion within `deadline`. On overrun or interruption the process
/// group is killed; if it is still there after a grace period (a process stuck in a FUSE
/// request the server never answers), `abort` is called and the wait goes on for one more
/// grace period.
pub fn run(
    cmd: &mut Command,
    deadline: Duration,
    abort: &dyn Fn(),
) -> Result<Finished, BenchError> {
    use std::os::unix::process::CommandExt;
    let what = describe(cmd);
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| BenchError::Failed {
            what: what.clone(),
            detail: format!("cannot start: {e}"),
        })?;
    let pgid = child.id() as i32;
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("piped stdout")));
    let err = reader(Box::new(child.stderr.take().expect("piped stderr")));

    let stop = stop_flag();
    let mut killed: Option<(Instant, bool)> = None;
    let mut reason = "";
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => {}
            Err(e) => {
                return Err(BenchError::Failed {
                    what,
                    detail: format!("wait: {e}"),
                })
            }
        }
        match killed {
            None => {
                let overran = start.elapsed() > deadline;
                if overran || stop.load(Ordering::Relaxed) {
                    reason = if overran { "deadline" } else { "interrupted" };
                    kill_group(pgid);
                    killed = Some((Instant::now(), false));
                }
            }
            Some((at, false)) if at.elapsed() > KILL_GRACE => {
                abort();
                kill_group(pgid);
                killed = Some((Instant::now(), true));
            }
            Some((at, true)) if at.elapsed() > KILL_GRACE => {
                // Leave it; its output threads are detached with it.
                return Err(BenchError::Stuck { what });
            }
            Some(_) => {}
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    // Children of the group (fio forks its jobs) must not outlive it.
    kill_group(pgid);
    match reason {
        "deadline" => Err(BenchError::Deadline {
            what,
            deadline,
            output: tail(&format!("{stdout}{stderr}")),
        }),
        "interrupted" => Err(BenchError::Interrupted),
        _ => Ok(Finished {
            status,
            stdout,
            stderr,
            elapsed,
        }),
    }
}

/// `run` with no abort hook, requiring exit status 0.
pub fn run_ok(cmd: &mut Command, deadline: Duration) -> Result<Finished, BenchError> {
    let what = describe(cmd);
    run(cmd, deadline, &|| {})?.success(&what)
}

fn kill_group(pgid: i32) {
    // The process group of a child this module spawned with `process_group(0)`, so the
    // group id is that child's pid.
    let _ = molt_sys::kill_group(pgid, libc::SIGKILL);
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn tail(s: &str) -> String {
    let n = s.len();
    let mut from = n.saturating_sub(2000);
    while !s.is_char_boundary(from) {
        from += 1;
    }
    s[from..].to_string()
}

/// The first file named `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A directory removed with its content on drop.
pub struct WorkDir(PathBuf);

impl WorkDir {
    pub fn new(base: &Path, tag: &str) -> Result<WorkDir, BenchError> {
        let p = base.join(format!("molt-bench-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).map_err(|e| BenchError::io(&p, e))?;
        Ok(WorkDir(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `sync(1)` (under a deadline: writeback to a stuck FUSE server must not hang the
/// benchmark), then drops the page, dentry and inode caches so that every job starts cold.
/// Without root the caches stay.
pub fn drop_caches(abort: &dyn Fn()) -> Result<(), BenchError> {
    run(&mut Command::new("sync"), Duration::from_secs(120), abort)?.success("sync")?;
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    Ok(())
}
