//! The systems the benchmark compares, and guards that set each one up on a fresh 1 GiB
//! image and always take it down again: unmount (aborting a FUSE connection that does not
//! answer), detach the loop device, stop the daemon.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{run, run_ok, which, WorkDir};
use super::BenchError;
use crate::harness;

/// Size of every image: Molt's, the ext4 images and the raw file.
pub const IMAGE_SIZE: &str = "1G";
const IMAGE_BYTES: u64 = 1 << 30;

const SETUP_DEADLINE: Duration = Duration::from_secs(120);
const UNMOUNT_DEADLINE: Duration = Duration::from_secs(60);

/// One column of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// A Molt mount (`fsd mount`, over `/dev/fuse`).
    Molt,
    /// A Molt mount over FUSE io_uring (`fsd mount --transport uring`).
    MoltUring,
    /// `fuse2fs` on an ext4 image: another userspace filesystem over FUSE.
    Fuse2fs,
    /// Kernel ext4 on a loop device in direct-I/O mode over an image file.
    Ext4Loop,
    /// fio straight on the raw image file with O_DIRECT: the block layer's ceiling.
    Raw,
}

impl Peer {
    pub const ALL: [Peer; 5] = [
        Peer::Molt,
        Peer::MoltUring,
        Peer::Fuse2fs,
        Peer::Ext4Loop,
        Peer::Raw,
    ];

    /// Whether this is one of Molt's own columns (the ratio columns compare those).
    pub fn is_molt(self) -> bool {
        matches!(self, Peer::Molt | Peer::MoltUring)
    }

    /// Column header.
    pub fn label(self) -> &'static str {
        match self {
            Peer::Molt => "Molt",
            Peer::MoltUring => "Molt (io_uring)",
            Peer::Fuse2fs => "fuse2fs",
            Peer::Ext4Loop => "ext4 on loop (dio)",
            Peer::Raw => "fio raw image",
        }
    }

    /// Name on the command line (`--peers`) and in the JSON report.
    pub fn key(self) -> &'static str {
        match self {
            Peer::Molt => "molt",
            Peer::MoltUring => "molt-uring",
            Peer::Fuse2fs => "fuse2fs",
            Peer::Ext4Loop => "ext4",
            Peer::Raw => "raw",
        }
    }

    pub fn from_key(s: &str) -> Option<Peer> {
        Peer::ALL.into_iter().find(|p| p.key() == s)
    }

    /// External tools the peer needs, for a clear message when one is missing.
    pub fn tools(self) -> &'static [&'static str] {
        match self {
            Peer::Molt | Peer::MoltUring => &[],
            Peer::Fuse2fs => &["fuse2fs", "mkfs.ext4", "umount"],
            Peer::Ext4Loop => &["losetup", "mkfs.ext4", "mount", "umount"],
            Peer::Raw => &[],
        }
    }

    /// Sets the peer up on a fresh image in `work`.
    pub fn start(self, work: &Path, fsd: &Path) -> Result<Instance, BenchError> {
        let dir = WorkDir::new(work, self.key())?;
        let image = dir.path().join("image");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| BenchError::io(&mnt, e))?;
        let mount = match self {
            Peer::Molt | Peer::MoltUring => {
                run_ok(
                    Command::new(fsd)
                        .arg("mkfs")
                        .arg(&image)
                        .args(["--size", IMAGE_SIZE]),
                    SETUP_DEADLINE,
                )?;
                let transport = if self == Peer::MoltUring {
                    "uring"
                } else {
                    "dev"
                };
                Mounted::Molt(MoltMount::mount(fsd, &image, &mnt, transport)?)
            }
            Peer::Fuse2fs => {
                mkfs_ext4(&image)?;
                Mounted::Fuse2fs(Fuse2fsMount::mount(&image, &mnt, dir.path())?)
            }
            Peer::Ext4Loop => {
                mkfs_ext4(&image)?;
                let lo = LoopDevice::attach(&image)?;
                let m = KernelMount::mount(&lo.dev, &mnt)?;
                Mounted::Kernel(m, lo)
            }
            // fio creates and lays out the file, as it does on the file systems; a sparse
            // file would make reads of holes look fast.
            Peer::Raw => Mounted::None,
        };
        Ok(Instance {
            peer: self,
            mount,
            image,
            mnt,
            _dir: dir,
        })
    }
}

fn mkfs_ext4(image: &Path) -> Result<(), BenchError> {
    let f = std::fs::File::create(image).map_err(|e| BenchError::io(image, e))?;
    f.set_len(IMAGE_BYTES)
        .map_err(|e| BenchError::io(image, e))?;
    drop(f);
    // Initialise inode tables and journal now, so no background thread writes during jobs.
    run_ok(
        Command::new(which("mkfs.ext4").unwrap_or_else(|| "mkfs.ext4".into()))
            .args(["-F", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(image),
        SETUP_DEADLINE,
    )?;
    Ok(())
}

/// A running peer. Fields drop in order: the mount first, then the directory holding
/// the image and mountpoint.
pub struct Instance {
    pub peer: Peer,
    mount: Mounted,
    pub image: PathBuf,
    pub mnt: PathBuf,
    _dir: WorkDir,
}

impl Instance {
    /// Where file jobs run (the mountpoint); `None` for the raw peer.
    pub fn target(&self) -> Option<&Path> {
        match self.mount {
            Mounted::None => None,
            _ => Some(&self.mnt),
        }
    }

    /// Fails every request waiting on a FUSE mount, so a process stuck in one returns.
    pub fn abort(&self) {
        match &self.mount {
            Mounted::Molt(_) | Mounted::Fuse2fs(_) => {
                eprintln!(
                    "molt-bench: aborting the FUSE connection of {}",
                    self.mnt.display()
                );
                harness::abort_connection(&self.mnt);
            }
            Mounted::Kernel(..) | Mounted::None => {}
        }
    }

    /// Unmounts now and reports failure (drop does the same silently).
    pub fn finish(mut self) -> Result<(), BenchError> {
        let m = std::mem::replace(&mut self.mount, Mounted::None);
        match m {
            Mounted::Molt(mut m) => m.unmount(),
            Mounted::Fuse2fs(mut m) => m.unmount(),
            Mounted::Kernel(mut m, lo) => {
                m.unmount()?;
                drop(lo);
                Ok(())
            }
            Mounted::None => Ok(()),
        }
    }
}

enum Mounted {
    Molt(MoltMount),
    Fuse2fs(Fuse2fsMount),
    Kernel(KernelMount, LoopDevice),
    None,
}

/// `fsd mount`; drop runs `fsd unmount`, falls back to aborting the connection and a lazy
/// detach, and kills whatever is left of the stack.
struct MoltMount {
    fsd: PathBuf,
    mnt: PathBuf,
    supervisor: Option<i32>,
}

impl MoltMount {
    fn mount(
        fsd: &Path,
        image: &Path,
        mnt: &Path,
        transport: &str,
    ) -> Result<MoltMount, BenchError> {
        run_ok(
            Command::new(fsd)
                .arg("mount")
                .arg(image)
                .arg(mnt)
                .args(["--transport", transport]),
            SETUP_DEADLINE,
        )?;
        let mnt = mnt.canonicalize().map_err(|e| BenchError::io(mnt, e))?;
        Ok(MoltMount {
            fsd: fsd.to_path_buf(),
            supervisor: harness::supervisor_pid(&mnt),
            mnt,
        })
    }

    fn unmount(&mut self) -> Result<(), BenchError> {
        let Some(sup) = self.supervisor.take() else {
            return Ok(());
        };
        let abort = || harness::abort_connection(&self.mnt);
        let r = run(
            Command::new(&self.fsd).arg("unmount").arg(&self.mnt),
            UNMOUNT_DEADLINE,
            &abort,
        )
        .and_then(|f| f.success("fsd unmount"));
        if r.is_err() && harness::is_mounted(&self.mnt) {
            harness::force_unmount(&self.mnt);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while harness::alive(sup) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for p in harness::children_of(sup).into_iter().chain([sup]) {
            if harness::alive(p) {
                // A process of the stack this guard mounted.
                let _ = molt_sys::kill(p, libc::SIGKILL);
            }
        }
        r.map(|_| ())
    }
}

impl Drop for MoltMount {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}

/// `fuse2fs IMAGE MNT -f` as our child; drop unmounts and reaps it.
struct Fuse2fsMount {
    child: Option<Child>,
    mnt: PathBuf,
}

impl Fuse2fsMount {
    fn mount(image: &Path, mnt: &Path, logdir: &Path) -> Result<Fuse2fsMount, BenchError> {
        use std::os::unix::process::CommandExt;
        let log = logdir.join("fuse2fs.log");
        let logf = std::fs::File::create(&log).map_err(|e| BenchError::io(&log, e))?;
        let errf = logf.try_clone().map_err(|e| BenchError::io(&log, e))?;
        let child = Command::new(which("fuse2fs").unwrap_or_else(|| "fuse2fs".into()))
            .arg(image)
            .arg(mnt)
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(errf)
            .process_group(0)
            .spawn()
            .map_err(|e| BenchError::Failed {
                what: "fuse2fs".into(),
                detail: format!("cannot start: {e}"),
            })?;
        let mnt = mnt.canonicalize().map_err(|e| BenchError::io(mnt, e))?;
        let mut m = Fuse2fsMount {
            child: Some(child),
            mnt,
        };
        let ok = harness::poll_until(Duration::from_secs(30), || {
            harness::is_mounted(&m.mnt)
                || m.child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_some())
        }) && harness::is_mounted(&m.mnt);
        if !ok {
            let _ = m.unmount();
            return Err(BenchError::Failed {
                what: "fuse2fs mount".into(),
                detail: std::fs::read_to_string(&log).unwrap_or_default(),
            });
        }
        Ok(m)
    }

    fn unmount(&mut self) -> Result<(), BenchError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let mut r = Ok(());
        if harness::is_mounted(&self.mnt) {
            let abort = || harness::abort_connection(&self.mnt);
            r = run(
                Command::new("umount").arg(&self.mnt),
                UNMOUNT_DEADLINE,
                &abort,
            )
            .and_then(|f| f.success("umount (fuse2fs)"))
            .map(|_| ());
            if r.is_err() && harness::is_mounted(&self.mnt) {
                harness::abort_connection(&self.mnt);
                let _ = run(
                    Command::new("umount").arg("-l").arg(&self.mnt),
                    UNMOUNT_DEADLINE,
                    &|| {},
                );
            }
        }
        // fuse2fs flushes the image on unmount; give it time, then make sure it is gone.
        let exited = harness::poll_until(Duration::from_secs(30), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
            if r.is_ok() {
                r = Err(BenchError::Failed {
                    what: "fuse2fs".into(),
                    detail: "did not exit after unmount".into(),
                });
            }
        }
        r
    }
}

impl Drop for Fuse2fsMount {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}

/// `losetup --direct-io=on -f --show IMAGE`; drop detaches the device.
struct LoopDevice {
    dev: PathBuf,
}

impl LoopDevice {
    fn attach(image: &Path) -> Result<LoopDevice, BenchError> {
        let out = run_ok(
            Command::new(which("losetup").unwrap_or_else(|| "losetup".into()))
                .args(["--direct-io=on", "-f", "--show"])
                .arg(image),
            SETUP_DEADLINE,
        )?;
        let dev = PathBuf::from(out.stdout.trim());
        let lo = LoopDevice { dev };
        // The kernel may refuse direct I/O silently (e.g. a misaligned backing file).
        let name = lo.dev.file_name().map(|n| n.to_string_lossy().into_owned());
        let dio = name
            .and_then(|n| std::fs::read_to_string(format!("/sys/block/{n}/loop/dio")).ok())
            .map(|s| s.trim() == "1")
            .unwrap_or(false);
        if !dio {
            return Err(BenchError::Failed {
                what: "losetup --direct-io=on".into(),
                detail: format!("{} is not in direct-I/O mode", lo.dev.display()),
            });
        }
        Ok(lo)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = run(
            Command::new(which("losetup").unwrap_or_else(|| "losetup".into()))
                .arg("-d")
                .arg(&self.dev),
            UNMOUNT_DEADLINE,
            &|| {},
        );
    }
}

/// A kernel mount; drop unmounts it (lazily if it is busy).
struct KernelMount {
    mnt: Option<PathBuf>,
}

impl KernelMount {
    fn mount(dev: &Path, mnt: &Path) -> Result<KernelMount, BenchError> {
        run_ok(Command::new("mount").arg(dev).arg(mnt), SETUP_DEADLINE)?;
        Ok(KernelMount {
            mnt: Some(mnt.to_path_buf()),
        })
    }

    fn unmount(&mut self) -> Result<(), BenchError> {
        let Some(mnt) = self.mnt.take() else {
            return Ok(());
        };
        let r = run_ok(Command::new("umount").arg(&mnt), UNMOUNT_DEADLINE).map(|_| ());
        if r.is_err() {
            let _ = run(
                Command::new("umount").arg("-l").arg(&mnt),
                UNMOUNT_DEADLINE,
                &|| {},
            );
        }
        r
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}
