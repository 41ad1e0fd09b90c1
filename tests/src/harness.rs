//! Test harness for real mounts: builds images, mounts them with the `fsd` binary, and
//! guarantees that every mount is undone and no process is left behind, even when the test
//! panics. A watchdog aborts the FUSE connection of a mount whose test overruns its
//! deadline, so a request the server never answers fails the test instead of hanging it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use blockdev::nbd::server::{Export, Listen, NbdServer};

/// A built workspace binary (`fsd`, `blockdev`, `molt-stress`, `updater`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is not built; run `cargo build --workspace` (or the README's test command) first",
        p.display()
    );
    p
}

/// Runs a command with a deadline; kills it if it overruns.
pub fn run(cmd: &mut Command, deadline: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let s = child.wait().expect("wait");
            panic!("{cmd:?} overran its {deadline:?} deadline ({s})");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: o.join().unwrap_or_default(),
        stderr: e.join().unwrap_or_default(),
    }
}

pub fn fsd(args: &[&str]) -> Output {
    run(
        Command::new(bin("fsd"))
            .args(args)
            .env("MOLT_BLOCKDEV_BIN", bin("blockdev")),
        Duration::from_secs(120),
    )
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let base = std::env::var_os("MOLT_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let p = base.join(format!(
            "molt-{tag}-{}-{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh image of `size` (e.g. "256M") in its own temp directory, with a mountpoint.
/// With `MOLT_TEST_IMAGE=nbd` (or made by [`TestImage::over_nbd`]) the image file is
/// served by an NBD server of its own, and the image is mounted and checked by its NBD URI.
pub struct TestImage {
    /// The NBD server in front of the image, if any; first, so that it is killed before
    /// the directory is removed.
    pub nbd: Option<Box<NbdServer>>,
    pub dir: TempDir,
    /// The image file (behind the NBD server, if there is one).
    pub image: PathBuf,
    pub mnt: PathBuf,
}

/// How the suite serves each test's image: `MOLT_TEST_IMAGE` (`file`, the default, or
/// `nbd`: through qemu-nbd on a private unix socket), so that one suite runs over both.
pub fn image_backing() -> String {
    std::env::var("MOLT_TEST_IMAGE").unwrap_or_else(|_| "file".into())
}

/// The servers and transports [`TestImage::over_nbd`] can put in front of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdBacking {
    /// qemu-nbd over a raw file.
    QemuRaw(Listen),
    /// qemu-nbd over a qcow2 image.
    QemuQcow2(Listen),
    /// nbdkit's file plugin.
    KitFile(Listen),
}

/// Bytes in a size like `64M` or `1G` (binary multiples).
fn size_bytes(size: &str) -> u64 {
    let (num, mult) = match size.as_bytes().last() {
        Some(b'K') => (&size[..size.len() - 1], 1u64 << 10),
        Some(b'M') => (&size[..size.len() - 1], 1 << 20),
        Some(b'G') => (&size[..size.len() - 1], 1 << 30),
        _ => (size, 1),
    };
    num.parse::<u64>()
        .unwrap_or_else(|_| panic!("size {size:?}"))
        * mult
}

impl TestImage {
    pub fn new(tag: &str, size: &str) -> TestImage {
        TestImage::with_mkfs_args(tag, size, &[])
    }

    /// An image file of `size` behind an NBD server of its own, made by `fsd mkfs` over
    /// the export's URI (which takes the export's size: no `--size`).
    pub fn over_nbd(tag: &str, size: &str, backing: NbdBacking, extra: &[&str]) -> TestImage {
        let dir = TempDir::new(tag);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mountpoint");
        let bytes = size_bytes(size);
        let (image, export, listen) = match backing {
            NbdBacking::QemuQcow2(listen) => {
                let image = dir.path().join("molt.qcow2");
                let out = run(
                    Command::new("qemu-img")
                        .args(["create", "-q", "-f", "qcow2"])
                        .arg(&image)
                        .arg(bytes.to_string()),
                    Duration::from_secs(30),
                );
                assert!(out.status.success(), "qemu-img create: {out:?}");
                let export = Export::Qemu {
                    image: image.clone(),
                    format: "qcow2".into(),
                };
                (image, export, listen)
            }
            NbdBacking::QemuRaw(listen) | NbdBacking::KitFile(listen) => {
                let image = dir.path().join("molt.img");
                std::fs::File::create(&image)
                    .and_then(|f| f.set_len(bytes))
                    .expect("image file");
                let export = if matches!(backing, NbdBacking::KitFile(_)) {
                    Export::KitFile {
                        image: image.clone(),
                    }
                } else {
                    Export::Qemu {
                        image: image.clone(),
                        format: "raw".into(),
                    }
                };
                (image, export, listen)
            }
        };
        let server = NbdServer::start(export, listen).expect("starting the NBD server");
        let uri = server.uri().to_string();
        let mut args = vec!["mkfs", uri.as_str()];
        args.extend_from_slice(extra);
        let out = fsd(&args);
        assert!(
            out.status.success(),
            "mkfs over NBD failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TestImage {
            nbd: Some(Box::new(server)),
            dir,
            image,
            mnt,
        }
    }

    /// What the image is called for `fsd mount` and `fsd fsck`: its NBD URI when it is
    /// served, else its path.
    pub fn name(&self) -> PathBuf {
        match &self.nbd {
            Some(s) => PathBuf::from(s.uri().to_string()),
            None => self.image.clone(),
        }
    }

    /// An image made with extra `fsd mkfs` arguments (e.g. `--format-version 1`).
    pub fn with_mkfs_args(tag: &str, size: &str, extra: &[&str]) -> TestImage {
        let dir = TempDir::new(tag);
        let image = dir.path().join("molt.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mountpoint");
        let mut args = vec!["mkfs", image.to_str().expect("utf-8"), "--size", size];
        args.extend_from_slice(extra);
        let out = fsd(&args);
        assert!(
            out.status.success(),
            "mkfs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let nbd = (image_backing() == "nbd").then(|| {
            let export = Export::Qemu {
                image: image.clone(),
                format: "raw".into(),
            };
            Box::new(NbdServer::start(export, Listen::Unix).expect("starting qemu-nbd"))
        });
        TestImage {
            nbd,
            dir,
            image,
            mnt,
        }
    }

    /// Mounts the image; the guard unmounts it.
    pub fn mount(&self) -> Mount {
        Mount::new(&self.name(), &self.mnt)
    }

    pub fn fsck(&self) -> Output {
        fsd(&["fsck", self.name().to_str().expect("utf-8")])
    }

    /// Asserts the image checks clean.
    pub fn assert_clean(&self) {
        let out = self.fsck();
        assert_eq!(
            out.status.code(),
            Some(0),
            "fsck not clean:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A mounted Molt filesystem. Dropping it unmounts, aborting the connection if the stack
/// does not answer, and kills any process of the stack still alive.
pub struct Mount {
    pub mnt: PathBuf,
    supervisor: Option<i32>,
    watchdog: Option<Watchdog>,
}

/// The FUSE transport the suite mounts with: `MOLT_TEST_TRANSPORT` (`dev`, the default,
/// or `uring`), so that one suite runs over both.
pub fn transport() -> String {
    std::env::var("MOLT_TEST_TRANSPORT").unwrap_or_else(|_| "dev".into())
}

impl Mount {
    pub fn new(image: &Path, mnt: &Path) -> Mount {
        let transport = transport();
        let out = fsd(&[
            "mount",
            image.to_str().expect("utf-8"),
            mnt.to_str().expect("utf-8"),
            "--transport",
            &transport,
        ]);
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mnt = mnt.canonicalize().expect("mountpoint");
        let supervisor = supervisor_pid(&mnt);
        Mount {
            watchdog: Some(Watchdog::start(&mnt, Duration::from_secs(240))),
            mnt,
            supervisor,
        }
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// The pids of the stack: (supervisor, its children). The supervisor is the one the
    /// runtime directory names now (one that adopted the mount after a crash replaces the
    /// one that mounted it).
    pub fn pids(&self) -> (i32, Vec<i32>) {
        let sup = self.current_supervisor().expect("supervisor pid");
        (sup, children_of(sup))
    }

    fn current_supervisor(&self) -> Option<i32> {
        supervisor_pid(&self.mnt).or(self.supervisor)
    }

    /// (supervisor, filesystem server, block driver) pids: the components are found by
    /// name among the supervisor's children (a component installed by an update runs as
    /// `NAME-HASH`), or, for components a supervisor adopted (not its children), as
    /// `updater status` lists them; `None` while one is missing (being replaced).
    pub fn stack_pids(&self) -> Option<(i32, i32, i32)> {
        let sup = self.current_supervisor()?;
        let children = children_of(sup);
        let find = |name: &str| {
            children
                .iter()
                .copied()
                .find(|c| comm(*c).is_some_and(|n| n == name || n.starts_with(&format!("{name}-"))))
        };
        match (find("fsd"), find("blockdev")) {
            (Some(f), Some(b)) => Some((sup, f, b)),
            _ => {
                let (f, b) = listed_components(&self.mnt)?;
                Some((sup, f, b))
            }
        }
    }

    /// Unmounts with `fsd unmount` and checks it succeeded.
    pub fn unmount(mut self) {
        self.disarm();
        let out = fsd(&["unmount", self.mnt.to_str().expect("utf-8")]);
        assert!(
            out.status.success(),
            "unmount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.supervisor = None;
    }

    fn disarm(&mut self) {
        if let Some(w) = self.watchdog.take() {
            w.stop();
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.disarm();
        // Who runs the stack now, before the unmount removes the runtime directory.
        let supervisor = self.current_supervisor();
        let components: Vec<i32> = self
            .stack_pids()
            .map(|(_, f, b)| vec![f, b])
            .unwrap_or_default();
        if is_mounted(&self.mnt) {
            let ok = std::panic::catch_unwind(|| {
                fsd(&["unmount", self.mnt.to_str().unwrap_or_default()])
            })
            .map(|o| o.status.success())
            .unwrap_or(false);
            if !ok {
                force_unmount(&self.mnt);
            }
        }
        if let Some(pid) = supervisor {
            let deadline = Instant::now() + Duration::from_secs(20);
            while [pid].iter().chain(&components).any(|p| alive(*p)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            for p in children_of(pid).into_iter().chain(components).chain([pid]) {
                // A pid of the stack we started.
                if alive(p) {
                    let _ = molt_sys::kill(p, libc::SIGKILL);
                }
            }
        }
        // A passing test leaves no log behind; a failing one keeps it for its reader.
        if !std::thread::panicking() {
            let log = update_manager::runtime::log_path(&self.mnt);
            let _ = std::fs::remove_file(update_manager::runtime::rotated_log_path(&log));
            let _ = std::fs::remove_file(log);
        }
    }
}

/// The (filesystem server, block driver) pids `updater status` lists for the mount at
/// `mnt`, when both run.
pub fn listed_components(mnt: &Path) -> Option<(i32, i32)> {
    let out = updater(&["status", "--mount", mnt.to_str()?, "--json"]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let pid = |name: &str| {
        v["components"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == name)?["pid"]
            .as_i64()
            .map(|p| p as i32)
            .filter(|p| alive(*p))
    };
    Some((pid("fsd")?, pid("blockdev")?))
}

pub fn supervisor_pid(mnt: &Path) -> Option<i32> {
    update_manager::runtime::supervisor_pid(mnt)
}

pub fn alive(pid: i32) -> bool {
    // A zombie has exited; only count processes that are not.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Direct children of `pid`.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
                let after = stat.rsplit(')').next().unwrap_or("");
                let ppid = after
                    .split_whitespace()
                    .nth(1)
                    .and_then(|x| x.parse::<i32>().ok());
                if ppid == Some(pid) {
                    out.push(p);
                }
            }
        }
    }
    out
}

pub fn is_mounted(mnt: &Path) -> bool {
    update_manager::supervisor::is_mountpoint(mnt)
}

/// The FUSE connection number of a mount (the minor of its device).
fn connection_id(mnt: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mnt).ok()?.dev();
    // Minor number of a Linux dev_t.
    Some((dev & 0xff) | ((dev >> 12) & 0xfff00))
}

/// Aborts the FUSE connection of a mount through the FUSE control filesystem, so every
/// waiting request fails with ENOTCONN.
pub fn abort_connection(mnt: &Path) {
    let ctl = Path::new("/sys/fs/fuse/connections");
    if std::fs::read_dir(ctl)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
    {
        let _ = Command::new("mount")
            .args(["-t", "fusectl", "none", "/sys/fs/fuse/connections"])
            .output();
    }
    if let Some(id) = connection_id(mnt) {
        let _ = std::fs::write(ctl.join(id.to_string()).join("abort"), "1");
    }
}

/// Last resort: abort the connection and detach the mount.
pub fn force_unmount(mnt: &Path) {
    abort_connection(mnt);
    let _ = fsd_server::serve::unmount(mnt, true);
}

/// Aborts a mount's connection if the test has not finished by the deadline.
pub struct Watchdog {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn start(mnt: &Path, deadline: Duration) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let mnt = mnt.to_path_buf();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            while !d.load(Ordering::Relaxed) {
                if start.elapsed() > deadline {
                    eprintln!(
                        "watchdog: {} overran {deadline:?}; aborting its FUSE connection",
                        mnt.display()
                    );
                    abort_connection(&mnt);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Watchdog {
            done,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends SIGKILL to `pid` (a process of a stack the test started).
pub fn kill9(pid: i32) {
    let _ = molt_sys::kill(pid, libc::SIGKILL);
}

/// The command name of a process (`/proc/PID/comm`), if it is still there.
pub fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// A seed for a randomised test: `$var` if set (to replay a run), else fresh from the
/// clock. Tests print it so that a failure can be replayed.
pub fn seed_from_env(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={s:?} is not an unsigned integer")),
        Err(_) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ u64::from(std::process::id())
        }
    }
}

/// A small deterministic generator (SplitMix64) for reproducible randomised tests.
#[derive(Clone, Debug)]
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> TestRng {
        TestRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// `len` bytes determined by the generator's state.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// Runs `updater` with `args` (deadline two minutes).
pub fn updater(args: &[&str]) -> Output {
    run(
        Command::new(bin("updater")).args(args),
        Duration::from_secs(120),
    )
}

/// A signing key and a keyring that trusts it, for live-update tests: a root-owned
/// directory (mode 0755) holding the public half of a fresh key made by `updater keygen`.
/// The secret key lives next to the keyring, outside it.
pub struct Keyring {
    pub dir: TempDir,
    /// The keyring directory to pass to `fsd mount --keyring`.
    pub keyring: PathBuf,
    /// The secret key for `updater pack --key`.
    pub key: PathBuf,
}

impl Keyring {
    pub fn new(tag: &str) -> Keyring {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new(tag);
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()))
        };
        mode(dir.path(), 0o755);
        let keyring = dir.path().join("keyring");
        std::fs::create_dir(&keyring).expect("keyring dir");
        mode(&keyring, 0o755);
        let key = dir.path().join("signing.key");
        let out = updater(&["keygen", "--out", key.to_str().expect("utf-8")]);
        assert!(
            out.status.success(),
            "updater keygen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let public = keyring.join("test.pub");
        std::fs::copy(dir.path().join("signing.key.pub"), &public).expect("installing the key");
        mode(&public, 0o644);
        Keyring { dir, keyring, key }
    }

    /// Packs `manifest` (binaries relative to it) into `out`, signed with this key;
    /// panics if `updater pack` fails.
    pub fn pack(&self, manifest: &Path, out: &Path) {
        let o = updater(&[
            "pack",
            "--manifest",
            manifest.to_str().expect("utf-8"),
            "--key",
            self.key.to_str().expect("utf-8"),
            "--out",
            out.to_str().expect("utf-8"),
        ]);
        assert!(
            o.status.success(),
            "updater pack {} failed: {}{}",
            manifest.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl TestImage {
    /// Mounts the image with extra `fsd mount` arguments (e.g. `--keyring DIR`) and extra
    /// environment (e.g. `MOLT_BLOCKDEV_BIN` naming another driver build); the guard
    /// unmounts it.
    pub fn mount_with(&self, args: &[&str], env: &[(&str, &Path)]) -> Mount {
        Mount::new_with(&self.name(), &self.mnt, args, env)
    }
}

impl Mount {
    /// Like [`Mount::new`], with extra `fsd mount` arguments and environment.
    pub fn new_with(image: &Path, mnt: &Path, args: &[&str], env: &[(&str, &Path)]) -> Mount {
        let mut cmd = Command::new(bin("fsd"));
        cmd.args([
            "mount",
            image.to_str().expect("utf-8"),
            mnt.to_str().expect("utf-8"),
        ])
        .args(args);
        if !args.contains(&"--transport") {
            cmd.args(["--transport", &transport()]);
        }
        cmd.env("MOLT_BLOCKDEV_BIN", bin("blockdev"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = run(&mut cmd, Duration::from_secs(120));
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mnt = mnt.canonicalize().expect("mountpoint");
        let supervisor = supervisor_pid(&mnt);
        Mount {
            watchdog: Some(Watchdog::start(&mnt, Duration::from_secs(420))),
            mnt,
            supervisor,
        }
    }
}

impl Mount {
    /// A guard for a mount made by other tooling (mount(8) with the helper, a service
    /// manager running `fsd mount --foreground`): dropping it unmounts as for [`Mount::new`].
    pub fn attach(mnt: &Path) -> Mount {
        let mnt = mnt.canonicalize().expect("mountpoint");
        assert!(is_mounted(&mnt), "{} is not mounted", mnt.display());
        let supervisor = supervisor_pid(&mnt);
        Mount {
            watchdog: Some(Watchdog::start(&mnt, Duration::from_secs(240))),
            mnt,
            supervisor,
        }
    }

    /// Forgets the mount: it is gone (unmounted by the test some other way). The
    /// supervisor is still waited for, and killed if it outlives its deadline.
    pub fn forget(mut self) {
        self.disarm();
    }
}

/// Where mount(8) looks for the `mount.fuse.molt` helper (util-linux searches /sbin,
/// /sbin/fs.d and /sbin/fs; none can be pointed elsewhere).
pub const MOUNT_HELPER_PATH: &str = "/sbin/mount.fuse.molt";

/// The mount helper installed for a test: `/sbin/mount.fuse.molt` as a symbolic link to
/// the `fsd` under test, removed on drop. The tests that need it take turns: the guard
/// holds an exclusive lock on the build directory (no file is left behind) while it
/// lives. A helper that is not a link to this build is never replaced.
pub struct MountHelper {
    _lock: std::fs::File,
    link: PathBuf,
}

impl MountHelper {
    pub fn install() -> MountHelper {
        let fsd = bin("fsd");
        let dir = fsd.parent().expect("build dir").to_path_buf();
        let lock = std::fs::File::open(&dir).expect("opening the build directory");
        assert!(
            poll_until(Duration::from_secs(300), || {
                molt_sys::try_lock_exclusive(std::os::fd::AsFd::as_fd(&lock)).unwrap_or(false)
            }),
            "another test held the mount helper for 5 minutes"
        );
        let link = PathBuf::from(MOUNT_HELPER_PATH);
        match std::fs::read_link(&link) {
            Ok(target) if target == fsd => {}
            Ok(_) | Err(_) if link.symlink_metadata().is_ok() => panic!(
                "{} exists and is not a link to the fsd under test; not replacing it",
                link.display()
            ),
            _ => std::os::unix::fs::symlink(&fsd, &link)
                .unwrap_or_else(|e| panic!("linking {}: {e}", link.display())),
        }
        MountHelper { _lock: lock, link }
    }
}

impl Drop for MountHelper {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.link);
    }
}

/// A child process killed (SIGKILL) and reaped on drop unless it has exited; a
/// supervisor in the foreground, say. If `mountpoint` is still mounted then (its
/// supervisor was killed), the mount is aborted and detached.
pub struct ChildGuard {
    pub child: std::process::Child,
    pub mountpoint: Option<PathBuf>,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(mnt) = &self.mountpoint {
            if is_mounted(mnt) {
                force_unmount(mnt);
            }
        }
    }
}
