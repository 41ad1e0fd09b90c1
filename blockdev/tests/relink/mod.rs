//! A driver outlives its supervisor: it serves on (and serves again if it held for an
//! update), and takes the next supervisor's connection on its relink socket as its
//! control link.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use blockdev::engine::EngineKind;
use blockdev::image::{Image, ScratchImage};
use blockdev::spawn::{driver_command_with_control, DriverFds, RingSetup, StartMode};
use blockdev::{Client, Lba, BLOCK_SIZE};
use molt_control::{relink_socket_path, ServingPhase};

use super::handover::{connect, wait_exit, GEOMETRY};
use super::{config, pattern, wait_until, DEADLINE};
use crate::driver_control::DriverControl;

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("blockdev-relink-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Driver {
    child: Child,
    ctl: DriverControl,
    socket: PathBuf,
}

/// `blockdev serve --ctl-fd 7 --relink-dir DIR`, as a supervisor starts it.
fn start(setup: &RingSetup, image: &Image, mode: StartMode, dir: &Path) -> Driver {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let fds = DriverFds {
        ring: setup.ring.fd(),
        sq_eventfd: setup.sq_eventfd.as_fd(),
        cq_eventfd: setup.cq_eventfd.as_fd(),
        image: image.file().as_fd(),
    };
    let cfg = config(EngineKind::Uring);
    let (mut cmd, guard) =
        driver_command_with_control(fds, &cfg, Some(std::process::id()), theirs.as_fd(), mode)
            .unwrap();
    cmd.arg("--relink-dir").arg(dir);
    let child = cmd.spawn().unwrap();
    drop(guard);
    drop(theirs);
    let mut ctl = DriverControl::new(ours).unwrap();
    // Answered once the driver runs: its socket is bound by then.
    ctl.status().unwrap();
    let socket = relink_socket_path(dir, "blockdev", child.id());
    Driver { child, ctl, socket }
}

/// Whether the driver closed a connection to its relink socket at once.
fn refused(socket: &Path) -> bool {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    matches!(s.read(&mut [0u8; 1]), Ok(0))
}

/// A new supervisor's link: connects until the driver answers `Status` on it (one made
/// before the driver saw its old link end is closed).
fn relink(socket: &Path) -> DriverControl {
    let start = Instant::now();
    loop {
        let mut ctl = DriverControl::new(UnixStream::connect(socket).unwrap()).unwrap();
        ctl.set_reply_timeout(Duration::from_secs(2));
        match ctl.status() {
            Ok(_) => {
                ctl.set_reply_timeout(Duration::from_secs(10));
                return ctl;
            }
            Err(e) => assert!(start.elapsed() < DEADLINE, "no new link: {e}"),
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn check_io(client: &Client, lba: u64) {
    let data = pattern(lba, 2);
    client.write(Lba(lba), &data).unwrap();
    client.flush().unwrap();
    let mut back = vec![0u8; 2 * BLOCK_SIZE];
    client.read(Lba(lba), &mut back).unwrap();
    assert!(back == data, "block {lba} read back wrong");
}

#[test]
fn a_driver_outlives_its_supervisors_and_takes_each_new_one() {
    let img = ScratchImage::create(128).unwrap();
    let image = img.open().unwrap();
    let setup = RingSetup::new(GEOMETRY).unwrap();
    let dir = TempDir::new("outlives");
    let mut d = start(&setup, &image, StartMode::Fresh, &dir.0);
    let client = connect(&setup, None);
    check_io(&client, 0);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // While the link is alive a connection is closed, and the link still answers.
    assert!(refused(&d.socket));
    assert_eq!(d.ctl.status().unwrap().phase, ServingPhase::Serving);

    let mut ctl = d.ctl;
    for round in 0..3u64 {
        drop(ctl);
        check_io(&client, 10 + 2 * round);
        ctl = relink(&d.socket);
        let st = ctl.status().unwrap();
        assert_eq!((st.phase, st.pid), (ServingPhase::Serving, d.child.id()));
        assert!(refused(&d.socket), "round {round}");
    }

    // Held for an update when the supervisor dies: it serves again by itself, and a
    // request that waited in the ring meanwhile completes.
    ctl.prepare(Duration::from_secs(2)).unwrap();
    let ring = &setup.ring;
    let c2 = client.clone();
    let waiting = thread::spawn(move || c2.write(Lba(40), &pattern(40, 1)));
    wait_until("the entry to wait", || {
        ring.sq_tail().load(Ordering::Acquire) != ring.sq_head().load(Ordering::Acquire)
    });
    drop(ctl);
    waiting.join().unwrap().unwrap();
    check_io(&client, 50);
    let mut ctl = relink(&d.socket);
    assert_eq!(ctl.status().unwrap().phase, ServingPhase::Serving);
    assert_eq!(ring.driver_pid(), d.child.id());

    // The new link runs an update's steps like the first one.
    ctl.prepare(Duration::from_secs(2)).unwrap();
    ctl.resume().unwrap();
    check_io(&client, 60);
    ctl.prepare(Duration::from_secs(2)).unwrap();
    ctl.exit().unwrap();
    assert!(wait_exit(&mut d.child).success());
    assert!(!d.socket.exists(), "the socket outlived the driver");
}

#[test]
fn a_dead_supervisors_half_done_update_leaves_the_old_driver_serving() {
    let img = ScratchImage::create(128).unwrap();
    let image = img.open().unwrap();
    let setup = RingSetup::new(GEOMETRY).unwrap();
    let dir = TempDir::new("abandoned");
    let mut old = start(&setup, &image, StartMode::Fresh, &dir.0);
    let client = connect(&setup, None);
    check_io(&client, 0);
    let mut new = start(&setup, &image, StartMode::Adopt, &dir.0);
    let blob = old.ctl.prepare(Duration::from_secs(2)).unwrap();
    new.ctl.send_state(&blob).unwrap();
    new.ctl.wait_imported().unwrap();
    // The supervisor dies before the commit: the successor ends untouched (exit 1), the
    // old driver serves again.
    drop(new.ctl);
    drop(old.ctl);
    assert_eq!(wait_exit(&mut new.child).code(), Some(1));
    assert!(!new.socket.exists());
    check_io(&client, 10);
    assert_eq!(setup.ring.driver_pid(), old.child.id());
    let mut ctl = relink(&old.socket);
    assert_eq!(ctl.status().unwrap().phase, ServingPhase::Serving);
    ctl.prepare(Duration::from_secs(2)).unwrap();
    ctl.exit().unwrap();
    assert!(wait_exit(&mut old.child).success());
}

#[test]
fn a_successor_committed_before_the_supervisor_died_keeps_the_ring() {
    let img = ScratchImage::create(128).unwrap();
    let image = img.open().unwrap();
    let setup = RingSetup::new(GEOMETRY).unwrap();
    let dir = TempDir::new("committed");
    let mut old = start(&setup, &image, StartMode::Fresh, &dir.0);
    let client = connect(&setup, None);
    check_io(&client, 0);
    let mut new = start(&setup, &image, StartMode::Adopt, &dir.0);
    let blob = old.ctl.prepare(Duration::from_secs(2)).unwrap();
    new.ctl.send_state(&blob).unwrap();
    new.ctl.wait_imported().unwrap();
    new.ctl.commit().unwrap();
    // The supervisor dies before it tells the old driver to exit: that one sees the
    // successor in the ring header and ends as if told, leaving the ring alone.
    drop(old.ctl);
    drop(new.ctl);
    assert!(wait_exit(&mut old.child).success());
    assert!(!old.socket.exists());
    check_io(&client, 10);
    assert_eq!(setup.ring.driver_pid(), new.child.id());
    let mut ctl = relink(&new.socket);
    let st = ctl.status().unwrap();
    assert_eq!((st.phase, st.pid), (ServingPhase::Serving, new.child.id()));
    ctl.prepare(Duration::from_secs(2)).unwrap();
    ctl.exit().unwrap();
    assert!(wait_exit(&mut new.child).success());
}
