//! `fsd serve` outlives its supervisor: it serves on (and serves again if it held for an
//! update), and takes the next supervisor's connection on its relink socket as its control
//! link. The test is the supervisor: it runs the block driver in this process, starts the
//! server on the descriptors a supervisor passes, and makes the FUSE mount (root only).

#![forbid(unsafe_code)]

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process};
use std::thread;
use std::time::{Duration, Instant};

use blockdev::engine::{Engine, EngineKind};
use blockdev::image::Image;
use blockdev::persist::DriverState;
use blockdev::ring::{RingGeometry, RingRegion};
use blockdev::server::{DriverError, Server, ServerConfig, StopHandle};
use blockdev::spawn::RingSetup;
use fsd_server::persist::STATE_CAP;
use fsd_server::serve::{self, MountFlags};
use molt_control::{relink_socket_path, Command, Link, LinkError, Reply, ServingPhase};

const DEADLINE: Duration = Duration::from_secs(20);

/// What a supervisor holds: the block driver (a thread of this process), the descriptors
/// every server process gets, the mount. A failed test leaves no process or mount behind.
struct Stack {
    _dir: tempfile::TempDir,
    img: PathBuf,
    mnt: PathBuf,
    relink_dir: PathBuf,
    setup: RingSetup,
    fuse: std::fs::File,
    redo: std::fs::File,
    session: std::fs::File,
    stop: StopHandle,
    driver: Option<thread::JoinHandle<Result<DriverState, DriverError>>>,
    servers: Vec<Child>,
}

/// A server process and the supervisor's end of its control link.
struct Fsd {
    pid: u32,
    link: Link,
    socket: PathBuf,
}

impl Stack {
    /// A new image served by the driver, and nothing mounted yet; `None` unless root.
    fn new() -> Option<Stack> {
        if molt_sys::socket::effective_uid() != 0 || !Path::new("/dev/fuse").exists() {
            eprintln!("skipped: needs root and /dev/fuse");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let mnt = dir.path().join("mnt");
        let relink_dir = dir.path().join("relink");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::create_dir(&relink_dir).unwrap();
        let out = Process::new(env!("CARGO_BIN_EXE_fsd"))
            .arg("mkfs")
            .arg(&img)
            .args(["--size", "64M"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let geometry = RingGeometry::default();
        let setup = RingSetup::new(geometry).unwrap();
        let (ring_fd, sq, cq) = setup.try_clone_fds().unwrap();
        let engine = Engine::new(
            EngineKind::Sync,
            Image::open(&img).unwrap(),
            geometry.queue_depth,
        )
        .unwrap();
        let server = Server::new(
            RingRegion::open(ring_fd).unwrap(),
            engine,
            sq,
            cq,
            ServerConfig::default(),
        )
        .unwrap();
        let stop = server.stop_handle();
        let driver = thread::spawn(move || {
            let mut server = server;
            server.run()
        });
        Some(Stack {
            _dir: dir,
            img,
            mnt,
            relink_dir,
            setup,
            fuse: serve::open_fuse_device().unwrap(),
            redo: fsd_server::host::create_redo_log_file().unwrap(),
            session: fsd_server::host::create_session_file().unwrap(),
            stop,
            driver: Some(driver),
            servers: Vec::new(),
        })
    }

    /// `fsd serve MNT --relink-dir DIR [--adopt]` on fds 3..=9, as a supervisor starts it.
    fn start_server(&mut self, adopt: bool) -> Fsd {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let passed: [BorrowedFd<'_>; 7] = [
            self.setup.ring.fd(),
            self.setup.sq_eventfd.as_fd(),
            self.setup.cq_eventfd.as_fd(),
            self.fuse.as_fd(),
            theirs.as_fd(),
            self.redo.as_fd(),
            self.session.as_fd(),
        ];
        let fds: Vec<_> = passed
            .iter()
            .enumerate()
            .map(|(i, fd)| (*fd, serve::SERVE_RING_FD + i as i32))
            .collect();
        let mut cmd = Process::new(env!("CARGO_BIN_EXE_fsd"));
        cmd.arg("serve")
            .arg(&self.mnt)
            .arg("--relink-dir")
            .arg(&self.relink_dir);
        if adopt {
            cmd.arg("--adopt");
        }
        let guard = molt_sys::pass_fds(&mut cmd, &fds, molt_sys::ChildOptions::default()).unwrap();
        let child = cmd.spawn().unwrap();
        drop(guard);
        let pid = child.id();
        self.servers.push(child);
        Fsd {
            pid,
            link: Link::new(ours, STATE_CAP),
            socket: relink_socket_path(&self.relink_dir, "fsd", pid),
        }
    }

    /// The first server, and the mount on it.
    fn mount(&mut self) -> Fsd {
        let mut fsd = self.start_server(false);
        assert_eq!(recv(&mut fsd.link), Reply::FsReady);
        serve::mount_fuse(
            &self.fuse,
            &self.mnt,
            "molt-relink-test",
            MountFlags::default(),
        )
        .unwrap();
        fsd.link.send(&Command::Mounted).unwrap();
        assert_eq!(recv(&mut fsd.link), Reply::Serving);
        fsd
    }

    /// Waits for server `pid` to exit; its exit status.
    fn wait_exit(&mut self, pid: u32) -> std::process::ExitStatus {
        let child = self.servers.iter_mut().find(|c| c.id() == pid).unwrap();
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(start.elapsed() < DEADLINE, "server {pid} did not exit");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Unmounts: the serving server makes the image clean, exits 0 and removes its
    /// socket; then the image checks clean.
    fn unmount(mut self, serving: &Fsd) {
        serve::unmount(&self.mnt, false).unwrap();
        let exit = self.wait_exit(serving.pid);
        assert!(exit.success(), "{exit:?}");
        assert!(!serving.socket.exists(), "the socket outlived the server");
        self.stop.stop();
        self.driver.take().unwrap().join().unwrap().unwrap();
        let out = Process::new(env!("CARGO_BIN_EXE_fsd"))
            .arg("fsck")
            .arg(&self.img)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = serve::unmount(&self.mnt, true);
        self.stop.stop();
    }
}

fn prepare(link: &mut Link) -> Vec<u8> {
    link.send(&Command::Prepare {
        deadline_ms: 5000,
        required: Vec::new(),
    })
    .unwrap();
    match recv(link) {
        Reply::Ready(blob) => blob,
        other => panic!("prepare answered with {other:?}"),
    }
}

fn recv(link: &mut Link) -> Reply {
    link.set_read_timeout(Some(DEADLINE)).unwrap();
    link.recv::<Reply>().unwrap()
}

fn status(link: &mut Link) -> Result<molt_control::Status, LinkError> {
    link.send(&Command::Status)?;
    match link.recv::<Reply>()? {
        Reply::Status(s) => Ok(s),
        other => panic!("status answered with {other:?}"),
    }
}

/// Whether the server closed a connection to its relink socket at once.
fn refused(socket: &Path) -> bool {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    matches!(s.read(&mut [0u8; 1]), Ok(0))
}

/// A new supervisor's link: connects until the server answers `Status` on it (one made
/// before the server saw its old link end is closed).
fn relink(socket: &Path) -> (Link, molt_control::Status) {
    let start = Instant::now();
    loop {
        let mut link = Link::new(UnixStream::connect(socket).unwrap(), STATE_CAP);
        link.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        match status(&mut link) {
            Ok(s) => return (link, s),
            Err(e) => assert!(start.elapsed() < DEADLINE, "no new link: {e}"),
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A link whose peer is closed: what a supervisor that died leaves.
fn dead_link() -> Link {
    Link::new(UnixStream::pair().unwrap().0, STATE_CAP)
}

fn check_io(mnt: &Path, name: &str) {
    let path = mnt.join(name);
    let data: Vec<u8> = (0..70_000u32)
        .map(|i| (i * 7 + name.len() as u32) as u8)
        .collect();
    std::fs::write(&path, &data).unwrap();
    assert!(
        std::fs::read(&path).unwrap() == data,
        "{name} read back wrong"
    );
}

#[test]
fn a_server_outlives_its_supervisors_and_takes_each_new_one() {
    let Some(mut stack) = Stack::new() else {
        return;
    };
    let mut fsd = stack.mount();
    let mnt = stack.mnt.clone();
    check_io(&mnt, "first");
    let mode = std::fs::metadata(&fsd.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // While the link is alive a connection is closed, and the link still answers.
    assert!(refused(&fsd.socket));
    assert_eq!(status(&mut fsd.link).unwrap().phase, ServingPhase::Serving);

    for round in 0..3 {
        drop(std::mem::replace(&mut fsd.link, dead_link()));
        check_io(&mnt, &format!("unsupervised-{round}"));
        let (link, st) = relink(&fsd.socket);
        fsd.link = link;
        assert_eq!((st.phase, st.pid), (ServingPhase::Serving, fsd.pid));
        assert!(refused(&fsd.socket), "round {round}");
    }

    // Held for an update when the supervisor dies: it serves again by itself.
    prepare(&mut fsd.link);
    drop(std::mem::replace(&mut fsd.link, dead_link()));
    check_io(&mnt, "after-hold");
    assert_eq!(std::fs::read(mnt.join("first")).unwrap().len(), 70_000);
    let (link, st) = relink(&fsd.socket);
    fsd.link = link;
    assert_eq!(st.phase, ServingPhase::Serving);
    // The new link runs an update's steps like the first one.
    prepare(&mut fsd.link);
    fsd.link.send(&Command::Resume).unwrap();
    assert_eq!(recv(&mut fsd.link), Reply::Serving);
    check_io(&mnt, "resumed");
    stack.unmount(&fsd);
}

#[test]
fn a_dead_supervisors_half_done_update_leaves_the_old_server_serving() {
    let Some(mut stack) = Stack::new() else {
        return;
    };
    let mut old = stack.mount();
    let mnt = stack.mnt.clone();
    check_io(&mnt, "first");
    let mut new = stack.start_server(true);
    assert_eq!(recv(&mut new.link), Reply::Spawned);
    let blob = prepare(&mut old.link);
    new.link.send(&Command::State(blob)).unwrap();
    assert_eq!(recv(&mut new.link), Reply::Imported);
    // The supervisor dies before the commit: the successor ends untouched, the old server
    // serves again.
    drop(std::mem::replace(&mut new.link, dead_link()));
    drop(std::mem::replace(&mut old.link, dead_link()));
    assert!(stack.wait_exit(new.pid).success());
    assert!(!new.socket.exists());
    check_io(&mnt, "after");
    let (link, st) = relink(&old.socket);
    old.link = link;
    assert_eq!((st.phase, st.pid), (ServingPhase::Serving, old.pid));
    stack.unmount(&old);
}

#[test]
fn a_successor_committed_before_the_supervisor_died_serves_alone() {
    let Some(mut stack) = Stack::new() else {
        return;
    };
    let mut old = stack.mount();
    let mnt = stack.mnt.clone();
    check_io(&mnt, "first");
    let mut new = stack.start_server(true);
    assert_eq!(recv(&mut new.link), Reply::Spawned);
    let blob = prepare(&mut old.link);
    new.link.send(&Command::State(blob)).unwrap();
    assert_eq!(recv(&mut new.link), Reply::Imported);
    new.link.send(&Command::Commit).unwrap();
    assert_eq!(recv(&mut new.link), Reply::Serving);
    // The supervisor dies before it tells the old server to exit: that one sees that the
    // successor used the ring and ends as if told.
    drop(std::mem::replace(&mut old.link, dead_link()));
    drop(std::mem::replace(&mut new.link, dead_link()));
    assert!(stack.wait_exit(old.pid).success());
    assert!(!old.socket.exists());
    check_io(&mnt, "after");
    assert_eq!(std::fs::read(mnt.join("first")).unwrap().len(), 70_000);
    let (link, st) = relink(&new.socket);
    new.link = link;
    assert_eq!((st.phase, st.pid), (ServingPhase::Serving, new.pid));
    stack.unmount(&new);
}
