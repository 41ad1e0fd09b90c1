//! The per-mount runtime directory: `/run/molt/<key>/` (mode 0700), where `key` is derived
//! from the canonical mountpoint. It holds the supervisor's pid, the image path and the
//! mountpoint (and, for live update, the control socket).

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// Root of every mount's runtime directory; `MOLT_RUN_DIR` overrides it (tests). The
/// updater computes the same paths (`updater::control`), so both sides share one rule.
pub fn run_root() -> PathBuf {
    updater::control::run_root()
}

pub fn dir_for(mountpoint: &Path) -> PathBuf {
    run_root().join(updater::control::mount_key(mountpoint))
}

/// Creates the directory (0700) and records the supervisor.
pub fn create(mountpoint: &Path, image: &Path, pid: u32) -> io::Result<PathBuf> {
    let root = run_root();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&root)?;
    let dir = dir_for(mountpoint);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    std::fs::write(dir.join("pid"), pid.to_string())?;
    std::fs::write(
        dir.join("mountpoint"),
        mountpoint.as_os_str().as_encoded_bytes(),
    )?;
    std::fs::write(dir.join("image"), image.as_os_str().as_encoded_bytes())?;
    Ok(dir)
}

/// Records `pid` as the mount's supervisor (one that adopted the mount).
pub fn record_supervisor(mountpoint: &Path, pid: u32) -> io::Result<()> {
    let dir = dir_for(mountpoint);
    let tmp = dir.join("pid.tmp");
    std::fs::write(&tmp, pid.to_string())?;
    std::fs::rename(&tmp, dir.join("pid"))
}

/// The supervisor pid recorded for a mountpoint, if any.
pub fn supervisor_pid(mountpoint: &Path) -> Option<i32> {
    std::fs::read_to_string(dir_for(mountpoint).join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub fn remove(mountpoint: &Path) {
    let _ = std::fs::remove_dir_all(dir_for(mountpoint));
}

/// The log a new mount rotated `log` away to.
pub fn rotated_log_path(log: &Path) -> PathBuf {
    let mut rotated = log.to_path_buf().into_os_string();
    rotated.push(".1");
    PathBuf::from(rotated)
}

/// Where the supervisor of the mount at `mnt` and its components log (the one before is
/// at [`rotated_log_path`]).
pub fn log_path(mnt: &Path) -> PathBuf {
    let name = format!(
        "{}.log",
        dir_for(mnt)
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
    );
    run_root().join(name)
}
