//! Requirement checks ("hardware" nature): what a package needs of the machine against what
//! the machine has. [`MachineContext::probe`] gathers the figures; [`check_requirements`] is
//! pure, so tests feed it a made-up machine.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The kernel FUSE ABI assumed when the supervisor does not know it (what the machines this
/// project runs on speak).
pub(crate) const DEFAULT_FUSE_ABI: &str = "7.40";

/// What the machine must offer. Every field is optional; an absent field is not checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_disk_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size_min_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size_max_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_features: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_min: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuse_abi_min: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub io_uring_ops: Vec<String>,
}

impl Requirements {
    pub fn is_empty(&self) -> bool {
        *self == Requirements::default()
    }
}

const MIB: u64 = 1 << 20;

/// io_uring opcode names, indexed by opcode number (`IORING_OP_*` in lower case, without
/// the prefix), so a probe's supported opcode number indexes its name.
pub(crate) const IO_URING_OPS: &[&str] = &[
    "nop",
    "readv",
    "writev",
    "fsync",
    "read_fixed",
    "write_fixed",
    "poll_add",
    "poll_remove",
    "sync_file_range",
    "sendmsg",
    "recvmsg",
    "timeout",
    "timeout_remove",
    "accept",
    "async_cancel",
    "link_timeout",
    "connect",
    "fallocate",
    "openat",
    "close",
    "files_update",
    "statx",
    "read",
    "write",
    "fadvise",
    "madvise",
    "send",
    "recv",
    "openat2",
    "epoll_ctl",
    "splice",
    "provide_buffers",
    "remove_buffers",
    "tee",
    "shutdown",
    "renameat",
    "unlinkat",
    "mkdirat",
    "symlinkat",
    "linkat",
    "msg_ring",
    "fsetxattr",
    "setxattr",
    "fgetxattr",
    "getxattr",
    "socket",
    "uring_cmd",
    "send_zc",
    "sendmsg_zc",
    "read_multishot",
    "waitid",
    "futex_wait",
    "futex_wake",
    "futex_waitv",
    "fixed_fd_install",
    "ftruncate",
    "bind",
    "listen",
];

/// The outcome of one compatibility or requirement check, as the CLI prints it
/// (`PASS name: detail` / `FAIL name: detail`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckItem {
    pub name: String,
    pub passed: bool,
    /// Figures, both sides: "need 64 MiB, have 21000 MiB available".
    pub detail: String,
}

impl CheckItem {
    pub fn new(name: impl Into<String>, passed: bool, detail: impl Into<String>) -> Self {
        CheckItem {
            name: name.into(),
            passed,
            detail: detail.into(),
        }
    }
}

/// What the machine offers. `None` means "could not be found out"; a requirement on an
/// unknown figure fails (a refusal says so rather than guessing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineContext {
    /// `MemAvailable` from `/proc/meminfo`, bytes.
    pub mem_available: Option<u64>,
    /// Space available to unprivileged users on the filesystem holding the image, bytes.
    pub free_disk: Option<u64>,
    /// Image size, bytes.
    pub image_size: Option<u64>,
    /// CPU flags from `/proc/cpuinfo` (`flags`, or `Features` on arm), normalised by
    /// [`normalise_cpu_flag`].
    pub cpu_flags: Option<Vec<String>>,
    /// `/proc/sys/kernel/osrelease`, e.g. "6.1.0-18-amd64".
    pub kernel_release: Option<String>,
    /// The kernel's FUSE ABI "major.minor"; the supervisor fills it in from FUSE_INIT.
    pub fuse_abi: String,
    /// io_uring opcodes the kernel supports, by name; the supervisor fills it in from an
    /// io_uring probe.
    pub io_uring_ops: Option<Vec<String>>,
}

impl Default for MachineContext {
    fn default() -> Self {
        MachineContext {
            mem_available: None,
            free_disk: None,
            image_size: None,
            cpu_flags: None,
            kernel_release: None,
            fuse_abi: DEFAULT_FUSE_ABI.to_string(),
            io_uring_ops: None,
        }
    }
}

impl MachineContext {
    /// Reads what one process can learn on its own: memory, free disk and size for
    /// `image`, CPU flags, kernel release. Leaves `fuse_abi` at [`DEFAULT_FUSE_ABI`] and
    /// `io_uring_ops` unknown for the caller to fill in. Never fails: a figure that cannot be
    /// read stays `None`.
    pub fn probe(image: &Path) -> MachineContext {
        let dir = match image.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        MachineContext {
            mem_available: std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|t| parse_mem_available(&t)),
            free_disk: nix::sys::statvfs::statvfs(dir).ok().map(|s| {
                #[allow(clippy::unnecessary_cast)] // the field types vary by target
                let (avail, frag) = (s.blocks_available() as u64, s.fragment_size() as u64);
                avail.saturating_mul(frag)
            }),
            image_size: std::fs::metadata(image).ok().map(|m| m.len()),
            cpu_flags: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|t| parse_cpu_flags(&t)),
            kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| s.trim().to_string()),
            ..MachineContext::default()
        }
    }
}

/// `MemAvailable` in bytes from the text of `/proc/meminfo`.
pub(crate) fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// The first `flags` (x86) or `Features` (arm) line of `/proc/cpuinfo`.
pub(crate) fn parse_cpu_flags(cpuinfo: &str) -> Option<Vec<String>> {
    cpuinfo.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        matches!(key.trim(), "flags" | "Features")
            .then(|| value.split_whitespace().map(normalise_cpu_flag).collect())
    })
}

/// CPU flags compare in lower case with `.` read as `_` (so "sse4.2" names the cpuinfo
/// flag "sse4_2").
pub(crate) fn normalise_cpu_flag(flag: &str) -> String {
    flag.trim().to_ascii_lowercase().replace('.', "_")
}

/// The leading dotted numbers of a release ("6.1.0-18-amd64" → [6, 1, 0]; "7.31" →
/// [7, 31]); `None` when it does not start with one.
pub(crate) fn parse_release(s: &str) -> Option<Vec<u32>> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let head = s[..end].trim_end_matches('.');
    if head.is_empty() {
        return None;
    }
    head.split('.').map(|p| p.parse().ok()).collect()
}

/// `have >= need` for releases, the missing trailing parts counting as 0.
fn release_at_least(have: &[u32], need: &[u32]) -> bool {
    let n = have.len().max(need.len());
    let get = |v: &[u32], i: usize| v.get(i).copied().unwrap_or(0);
    for i in 0..n {
        let (h, r) = (get(have, i), get(need, i));
        if h != r {
            return h > r;
        }
    }
    true
}

fn mib(bytes: u64) -> u64 {
    bytes / MIB
}

/// One item per requirement the package states, in manifest order; requirements it does
/// not state are not checked. Every detail carries both figures.
pub fn check_requirements(req: &Requirements, ctx: &MachineContext) -> Vec<CheckItem> {
    let mut out = Vec::new();
    if let Some(need) = req.memory_mib {
        out.push(match ctx.mem_available {
            Some(have) => CheckItem::new(
                "memory",
                have >= need.saturating_mul(MIB),
                format!("need {need} MiB, have {} MiB available", mib(have)),
            ),
            None => CheckItem::new(
                "memory",
                false,
                format!("need {need} MiB, available memory unknown"),
            ),
        });
    }
    if let Some(need) = req.free_disk_mib {
        out.push(match ctx.free_disk {
            Some(have) => CheckItem::new(
                "free disk",
                have >= need.saturating_mul(MIB),
                format!(
                    "need {need} MiB free beside the image, have {} MiB",
                    mib(have)
                ),
            ),
            None => CheckItem::new(
                "free disk",
                false,
                format!("need {need} MiB free beside the image, free space unknown"),
            ),
        });
    }
    if req.image_size_min_mib.is_some() || req.image_size_max_mib.is_some() {
        let range = match (req.image_size_min_mib, req.image_size_max_mib) {
            (Some(lo), Some(hi)) => format!("{lo}..={hi} MiB"),
            (Some(lo), None) => format!("at least {lo} MiB"),
            (None, Some(hi)) => format!("at most {hi} MiB"),
            (None, None) => unreachable!(),
        };
        out.push(match ctx.image_size {
            Some(size) => {
                let lo_ok = req
                    .image_size_min_mib
                    .is_none_or(|lo| size >= lo.saturating_mul(MIB));
                let hi_ok = req
                    .image_size_max_mib
                    .is_none_or(|hi| size <= hi.saturating_mul(MIB));
                CheckItem::new(
                    "image size",
                    lo_ok && hi_ok,
                    format!("need {range}, image is {} MiB ({size} bytes)", mib(size)),
                )
            }
            None => CheckItem::new(
                "image size",
                false,
                format!("need {range}, image size unknown"),
            ),
        });
    }
    if !req.cpu_features.is_empty() {
        let wanted = req.cpu_features.join(" ");
        out.push(match &ctx.cpu_flags {
            Some(flags) => {
                let missing: Vec<&str> = req
                    .cpu_features
                    .iter()
                    .filter(|f| !flags.contains(&normalise_cpu_flag(f)))
                    .map(String::as_str)
                    .collect();
                if missing.is_empty() {
                    CheckItem::new("cpu features", true, format!("need {wanted}, all present"))
                } else {
                    CheckItem::new(
                        "cpu features",
                        false,
                        format!("need {wanted}, missing {}", missing.join(" ")),
                    )
                }
            }
            None => CheckItem::new(
                "cpu features",
                false,
                format!("need {wanted}, CPU flags unknown"),
            ),
        });
    }
    if let Some(need) = &req.kernel_min {
        out.push(release_item("kernel", need, ctx.kernel_release.as_deref()));
    }
    if let Some(need) = &req.fuse_abi_min {
        out.push(release_item("fuse abi", need, Some(&ctx.fuse_abi)));
    }
    if !req.io_uring_ops.is_empty() {
        let wanted = req.io_uring_ops.join(" ");
        out.push(match &ctx.io_uring_ops {
            Some(ops) => {
                let missing: Vec<&str> = req
                    .io_uring_ops
                    .iter()
                    .filter(|o| !ops.contains(o))
                    .map(String::as_str)
                    .collect();
                if missing.is_empty() {
                    CheckItem::new(
                        "io_uring ops",
                        true,
                        format!("need {wanted}, all supported"),
                    )
                } else {
                    CheckItem::new(
                        "io_uring ops",
                        false,
                        format!("need {wanted}, kernel lacks {}", missing.join(" ")),
                    )
                }
            }
            None => CheckItem::new(
                "io_uring ops",
                false,
                format!("need {wanted}, supported opcodes unknown"),
            ),
        });
    }
    out
}

fn release_item(name: &str, need: &str, have: Option<&str>) -> CheckItem {
    let parsed = (parse_release(need), have.and_then(parse_release));
    match (parsed, have) {
        ((Some(n), Some(h)), Some(have)) => CheckItem::new(
            name,
            release_at_least(&h, &n),
            format!("need {need} or later, have {have}"),
        ),
        (_, Some(have)) => CheckItem::new(
            name,
            false,
            format!("need {need} or later, cannot compare with {have:?}"),
        ),
        (_, None) => CheckItem::new(name, false, format!("need {need} or later, unknown")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> MachineContext {
        MachineContext {
            mem_available: Some(21000 * MIB),
            free_disk: Some(500 * MIB),
            image_size: Some(1024 * MIB),
            cpu_flags: Some(vec!["fpu".into(), "sse4_2".into(), "avx2".into()]),
            kernel_release: Some("6.1.0-18-amd64".into()),
            fuse_abi: "7.40".into(),
            io_uring_ops: Some(IO_URING_OPS[..24].iter().map(|s| s.to_string()).collect()),
        }
    }

    fn all() -> Requirements {
        Requirements {
            memory_mib: Some(64),
            free_disk_mib: Some(16),
            image_size_min_mib: Some(1),
            image_size_max_mib: Some(16 << 20),
            cpu_features: vec!["sse4.2".into(), "AVX2".into()],
            kernel_min: Some("5.10".into()),
            fuse_abi_min: Some("7.31".into()),
            io_uring_ops: vec!["read_fixed".into(), "write_fixed".into(), "fsync".into()],
        }
    }

    #[test]
    fn everything_passes_on_a_capable_machine() {
        let items = check_requirements(&all(), &machine());
        assert_eq!(items.len(), 7);
        assert!(items.iter().all(|i| i.passed), "{items:#?}");
        assert_eq!(items[0].detail, "need 64 MiB, have 21000 MiB available");
    }

    #[test]
    fn too_little_memory_fails_with_the_figures() {
        let mut m = machine();
        m.mem_available = Some(32 * MIB);
        let items = check_requirements(&all(), &m);
        let mem = &items[0];
        assert_eq!(mem.name, "memory");
        assert!(!mem.passed);
        assert_eq!(mem.detail, "need 64 MiB, have 32 MiB available");
        assert!(items[1..].iter().all(|i| i.passed));
    }

    #[test]
    fn each_shortfall_fails_its_own_item() {
        let mut m = machine();
        m.free_disk = Some(MIB);
        m.image_size = Some(MIB / 2);
        m.cpu_flags = Some(vec!["fpu".into()]);
        m.kernel_release = Some("5.4.0".into());
        m.fuse_abi = "7.27".into();
        m.io_uring_ops = Some(vec!["nop".into(), "fsync".into()]);
        let items = check_requirements(&all(), &m);
        let failed: Vec<&str> = items
            .iter()
            .filter(|i| !i.passed)
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(
            failed,
            [
                "free disk",
                "image size",
                "cpu features",
                "kernel",
                "fuse abi",
                "io_uring ops"
            ]
        );
        assert!(items[2].detail.contains("image is 0 MiB (524288 bytes)"));
        assert!(items[3].detail.contains("missing sse4.2 AVX2"));
        assert!(items[6].detail.contains("lacks read_fixed write_fixed"));
    }

    #[test]
    fn unknown_figures_fail_and_absent_requirements_are_not_checked() {
        let items = check_requirements(&all(), &MachineContext::default());
        // fuse_abi defaults to a known value; everything else is unknown.
        assert_eq!(items.iter().filter(|i| !i.passed).count(), 6);
        assert!(
            check_requirements(&Requirements::default(), &MachineContext::default()).is_empty()
        );
    }

    #[test]
    fn image_above_the_maximum_fails() {
        let req = Requirements {
            image_size_max_mib: Some(512),
            ..Requirements::default()
        };
        let items = check_requirements(&req, &machine());
        assert!(!items[0].passed);
        assert_eq!(
            items[0].detail,
            "need at most 512 MiB, image is 1024 MiB (1073741824 bytes)"
        );
    }

    #[test]
    fn releases() {
        assert_eq!(parse_release("6.1.0-18-amd64"), Some(vec![6, 1, 0]));
        assert_eq!(parse_release("7.31"), Some(vec![7, 31]));
        assert_eq!(parse_release("5."), Some(vec![5]));
        assert_eq!(parse_release("x5"), None);
        assert_eq!(parse_release("5..1"), None);
        assert!(release_at_least(&[5, 10], &[5, 10]));
        assert!(release_at_least(&[6, 1, 0], &[5, 10]));
        assert!(!release_at_least(&[5, 9, 200], &[5, 10]));
        assert!(release_at_least(&[7, 40], &[7, 31]));
        assert!(!release_at_least(&[7, 4], &[7, 31]));
    }

    #[test]
    fn proc_parsers() {
        let meminfo = "MemTotal: 24000000 kB\nMemFree: 1 kB\nMemAvailable:   21504000 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(21504000 * 1024));
        let cpuinfo =
            "processor\t: 0\nflags\t\t: fpu SSE4_2 avx2\n\nprocessor\t: 1\nflags\t: fpu\n";
        assert_eq!(parse_cpu_flags(cpuinfo).unwrap(), ["fpu", "sse4_2", "avx2"]);
        assert_eq!(IO_URING_OPS.get(4), Some(&"read_fixed"));
        assert_eq!(IO_URING_OPS.get(57), Some(&"listen"));
        assert_eq!(IO_URING_OPS.get(200), None);
    }

    #[test]
    fn probe_reads_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let m = MachineContext::probe(&img);
        assert_eq!(m.image_size, Some(4096));
        assert!(m.mem_available.unwrap() > 0);
        assert!(m.free_disk.is_some());
        assert!(m.kernel_release.is_some());
        assert_eq!(m.fuse_abi, DEFAULT_FUSE_ABI);
    }
}
