//! A server whose supervisor died starts a new one, which adopts the running stack
//! (docs/live-update.md, "The supervisor"): `<supervisor-binary> mount IMAGE MOUNTPOINT`,
//! both read from the runtime directory the supervisor keeps them in. Not under a service
//! manager (`NOTIFY_SOCKET` set): its restart of the unit does it, and two adopters would
//! only race for the supervisor lock.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the link must have been gone before a supervisor is started: a supervisor
/// that is adopting the mount connects within it.
const GRACE: Duration = Duration::from_millis(100);
/// Between two starts while none has taken over.
const RETRY: Duration = Duration::from_secs(5);

/// The runtime directory's record of the supervisor binary (written by the supervisor).
const BINARY_FILE: &str = "supervisor-binary";
const IMAGE_FILE: &str = "image";

pub(crate) struct SupervisorRestart {
    dir: PathBuf,
    mountpoint: PathBuf,
    orphaned_since: Option<Instant>,
    last_start: Option<Instant>,
}

impl SupervisorRestart {
    /// `None` under a service manager.
    pub(crate) fn new(dir: &Path, mountpoint: &Path) -> Option<SupervisorRestart> {
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            return None;
        }
        Some(SupervisorRestart {
            dir: dir.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            orphaned_since: None,
            last_start: None,
        })
    }

    /// The control link is alive.
    pub(crate) fn linked(&mut self) {
        self.orphaned_since = None;
        self.last_start = None;
    }

    /// The control link is gone (called while it stays gone): starts a supervisor once
    /// the grace has passed, and again every [`RETRY`].
    pub(crate) fn orphaned(&mut self) {
        let now = Instant::now();
        let since = *self.orphaned_since.get_or_insert(now);
        if now.duration_since(since) < GRACE
            || self
                .last_start
                .is_some_and(|t| now.duration_since(t) < RETRY)
        {
            return;
        }
        self.last_start = Some(now);
        if let Err(e) = self.start() {
            molt_sys::errln!("fsd serve: starting a new supervisor: {e}");
        }
    }

    fn start(&self) -> std::io::Result<()> {
        let read = |name: &str| -> std::io::Result<PathBuf> {
            use std::os::unix::ffi::OsStringExt;
            let bytes = std::fs::read(self.dir.join(name))?;
            Ok(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
        };
        let binary = read(BINARY_FILE)?;
        let image = read(IMAGE_FILE)?;
        molt_sys::errln!(
            "fsd serve: the supervisor is gone; starting {} to adopt {}",
            binary.display(),
            self.mountpoint.display()
        );
        let mut child = Command::new(&binary)
            .arg("mount")
            .arg(&image)
            .arg(&self.mountpoint)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        // `fsd mount` returns once the new supervisor serves (or has failed): reap it.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(())
    }
}
