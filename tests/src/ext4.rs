//! Kernel ext4 on a loop device, the reference a test compares Molt with in the same test,
//! and running one step of a test as another user.
//!
//! [`Ext4`] is a guard like [`crate::harness::Mount`]: dropping it unmounts the filesystem,
//! detaches the loop device and removes the image, even when the test panics.
//!
//! [`Cred`] runs an external command with other credentials through `setpriv` (util-linux).
//! The test process itself never changes its ids: it is multi-threaded, and ids are
//! per-thread at the system-call level.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::harness::{run, TempDir};

/// The deadline of each command the guard runs (mkfs, losetup, mount, umount).
const DEADLINE: Duration = Duration::from_secs(60);

/// Parses a size like `TestImage` takes ("256M", "1G", "4096").
fn parse_size(size: &str) -> u64 {
    let s = size.trim();
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let n: u64 = digits
        .parse()
        .unwrap_or_else(|_| panic!("size {size:?}: not a number"));
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => panic!("size {size:?}: unknown unit {unit:?}"),
    };
    n * mult
}

/// Runs a root command of the guard and panics with its output if it fails.
fn must(cmd: &mut Command, what: &str) -> Output {
    let out = run(cmd, DEADLINE);
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A mounted kernel ext4 filesystem on a loop device over a sparse image file. Made with
/// 4 KiB blocks (so its maximum file size is 16 TiB, like Molt's) and mounted with `-o acl`.
pub struct Ext4 {
    mnt: PathBuf,
    image: PathBuf,
    device: Option<String>,
    mounted: bool,
    options: String,
    // Dropped after `Drop::drop` has unmounted and detached: removes the image.
    dir: TempDir,
}

impl Ext4 {
    /// A fresh ext4 of `size` (e.g. "256M"), mounted with `-o acl`.
    pub fn new(tag: &str, size: &str) -> Ext4 {
        Ext4::with_options(tag, size, &[], "acl")
    }

    /// A fresh ext4 made with extra `mkfs.ext4` arguments and mounted with `options`.
    pub fn with_options(tag: &str, size: &str, mkfs_args: &[&str], options: &str) -> Ext4 {
        let dir = TempDir::new(tag);
        let image = dir.path().join("ext4.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("ext4 mountpoint");
        let f = std::fs::File::create(&image).expect("ext4 image");
        f.set_len(parse_size(size)).expect("sizing the ext4 image");
        drop(f);
        // Built up step by step so that a failure part-way is undone by `Drop`.
        let mut e = Ext4 {
            mnt,
            image,
            device: None,
            mounted: false,
            options: options.to_string(),
            dir,
        };
        must(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096"])
                .args(mkfs_args)
                .arg(&e.image),
            "mkfs.ext4",
        );
        let out = must(
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&e.image),
            "losetup --find --show",
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            dev.starts_with("/dev/"),
            "losetup printed {dev:?}, not a device"
        );
        e.device = Some(dev);
        e.mount();
        e
    }

    fn mount(&mut self) {
        let dev = self.device.clone().expect("loop device");
        must(
            Command::new("mount")
                .args(["-t", "ext4", "-o", &self.options, &dev])
                .arg(&self.mnt),
            "mounting ext4",
        );
        self.mounted = true;
    }

    /// The mountpoint (the root directory of the filesystem).
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// The loop device.
    pub fn device(&self) -> &str {
        self.device.as_deref().expect("loop device")
    }

    /// The temporary directory holding the image and the mountpoint.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Unmounts and mounts the filesystem again: what it shows afterwards is on the image,
    /// not only in the page cache.
    pub fn remount(&mut self) {
        must(Command::new("umount").arg(&self.mnt), "umount ext4");
        self.mounted = false;
        self.mount();
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let quiet = |args: &[&str], path: &Path| {
            std::panic::catch_unwind(|| {
                run(Command::new(args[0]).args(&args[1..]).arg(path), DEADLINE)
            })
            .map(|o| o.status.success())
            .unwrap_or(false)
        };
        if self.mounted && !quiet(&["umount"], &self.mnt) {
            // Busy (a process of a failed test still inside): detach it; the loop device is
            // freed when the last user goes (losetup -d below marks it autoclear).
            quiet(&["umount", "-l"], &self.mnt);
        }
        self.mounted = false;
        if let Some(dev) = self.device.take() {
            quiet(&["losetup", "-d"], Path::new(&dev));
        }
    }
}

/// The credentials one step of a test runs with: real and effective uid and gid, and the
/// supplementary groups. Any id other than root runs without capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cred {
    pub uid: u32,
    pub gid: u32,
    pub groups: &'static [u32],
}

impl Cred {
    /// Root with every capability the test process has.
    pub const ROOT: Cred = Cred {
        uid: 0,
        gid: 0,
        groups: &[],
    };

    pub const fn new(uid: u32, gid: u32, groups: &'static [u32]) -> Cred {
        Cred { uid, gid, groups }
    }

    /// Whether these credentials are in group `gid` (as primary or supplementary group).
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// A command that runs `program` with these credentials: through `setpriv` unless they
    /// are root's, with a clean environment (C locale, so error messages are the C
    /// library's English text) and `/` as working directory.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = if *self == Cred::ROOT {
            Command::new(program)
        } else {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={}", self.uid))
                .arg(format!("--regid={}", self.gid));
            if self.groups.is_empty() {
                c.arg("--clear-groups");
            } else {
                let list: Vec<String> = self.groups.iter().map(|g| g.to_string()).collect();
                c.arg(format!("--groups={}", list.join(",")));
            }
            c.arg("--").arg(program);
            c
        };
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LC_ALL", "C")
            .env("HOME", "/")
            .current_dir("/");
        cmd
    }

    /// Runs `program args` with these credentials under `deadline`.
    pub fn run<S: AsRef<std::ffi::OsStr>>(
        &self,
        program: &str,
        args: &[S],
        deadline: Duration,
    ) -> Output {
        run(self.command(program).args(args), deadline)
    }
}

impl std::fmt::Display for Cred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Cred::ROOT {
            return write!(f, "root");
        }
        write!(f, "uid {} gid {}", self.uid, self.gid)?;
        if !self.groups.is_empty() {
            write!(f, " groups {:?}", self.groups)?;
        }
        write!(f, " (no capabilities)")
    }
}

/// The errno whose C-library message appears in `text` (a tool's stderr), the longest
/// match if several do; `None` if none does.
pub fn errno_in(text: &str) -> Option<i32> {
    (1..134)
        .filter_map(|e| {
            let msg = errno_message(e);
            (!msg.is_empty() && !msg.starts_with("Unknown error") && text.contains(&msg))
                .then_some((msg.len(), e))
        })
        .max()
        .map(|(_, e)| e)
}

/// The C library's message for `errno` ("File too large"), as tools print it.
pub fn errno_message(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The symbolic name of `errno` for messages ("EFBIG"), or its number.
pub fn errno_name(errno: i32) -> String {
    const NAMES: &[(i32, &str)] = &[
        (libc::EPERM, "EPERM"),
        (libc::ENOENT, "ENOENT"),
        (libc::EIO, "EIO"),
        (libc::E2BIG, "E2BIG"),
        (libc::EBADF, "EBADF"),
        (libc::EACCES, "EACCES"),
        (libc::EEXIST, "EEXIST"),
        (libc::EXDEV, "EXDEV"),
        (libc::ENOTDIR, "ENOTDIR"),
        (libc::EISDIR, "EISDIR"),
        (libc::EINVAL, "EINVAL"),
        (libc::EFBIG, "EFBIG"),
        (libc::ENOSPC, "ENOSPC"),
        (libc::EROFS, "EROFS"),
        (libc::ERANGE, "ERANGE"),
        (libc::ENAMETOOLONG, "ENAMETOOLONG"),
        (libc::ENOSYS, "ENOSYS"),
        (libc::ENODATA, "ENODATA"),
        (libc::EOPNOTSUPP, "EOPNOTSUPP"),
        (libc::EOVERFLOW, "EOVERFLOW"),
        (libc::ENOTCONN, "ENOTCONN"),
        (libc::EDQUOT, "EDQUOT"),
    ];
    NAMES
        .iter()
        .find(|(e, _)| *e == errno)
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|| format!("errno {errno}"))
}
