//! Who a supervisor is: its version (as packages name it), the state schemas it reads
//! and writes, and the identity `updater status` shows.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The supervisor state schema this build writes.
pub const STATE_VERSION: u32 = 1;
/// The schemas this build reads.
pub const STATE_VERSIONS_READ: &[u32] = &[1];

/// This supervisor build's version, as packages and `updater status` name it.
pub fn supervisor_version() -> String {
    let mut v = env!("CARGO_PKG_VERSION").to_string();
    if cfg!(feature = "supervisor-next") {
        v.push_str("+sup2");
    }
    if cfg!(feature = "takeover-fault") {
        v.push_str("+takeover-fault");
    }
    v
}

/// What `<fsd> supervisor-info` prints: the update manager's probe of a supervisor binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorInfo {
    pub version: String,
    pub state_schema: u32,
    pub state_schema_reads: Vec<u32>,
}

pub fn supervisor_info() -> SupervisorInfo {
    SupervisorInfo {
        version: supervisor_version(),
        state_schema: STATE_VERSION,
        state_schema_reads: STATE_VERSIONS_READ.to_vec(),
    }
}

/// Asks a supervisor binary what it is (`<binary> supervisor-info`).
pub fn probe_supervisor(binary: &Path) -> Result<SupervisorInfo, String> {
    let out = std::process::Command::new(binary)
        .arg("supervisor-info")
        .output()
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} is not a supervisor (supervisor-info exited with {})",
            binary.display(),
            out.status
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "{} is not a supervisor (supervisor-info: {e})",
            binary.display()
        )
    })
}

/// Which supervisor runs the mount, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorIdentity {
    pub version: String,
    pub binary: PathBuf,
    pub pid: u32,
    pub took_over_unix: u64,
    /// "mount", "live update", "rolled back", "adopted after a crash".
    pub how: String,
}

impl SupervisorIdentity {
    pub fn of_this_process(how: &str) -> SupervisorIdentity {
        SupervisorIdentity {
            version: supervisor_version(),
            binary: std::env::current_exe().unwrap_or_default(),
            pid: std::process::id(),
            took_over_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            how: how.to_string(),
        }
    }
}
