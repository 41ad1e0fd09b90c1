//! Taking over a component's control link: a supervisor that died is replaced by one
//! that connects to the component's *relink socket*.
//!
//! A component started with a relink directory listens on
//! [`relink_socket_path`]`(dir, component, its pid)` (mode 0600) for as long as it runs.
//! Invariants:
//! - while the component's control link is alive, every connection to the socket is
//!   closed at once, unread (so a supervisor that connects before the component noticed
//!   its predecessor's death sees its connection closed, and retries);
//! - once the component says the link ended ([`LinkLoss::link_lost`]), the next
//!   connection from root or from the component's own effective user becomes the new
//!   control link (same framing, same cap); others are closed. That link is then alive,
//!   and the cycle repeats any number of times.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread;

/// Where component `component` ("fsd" or "blockdev") with process id `pid` listens for a
/// new supervisor, in relink directory `dir`: `DIR/<component>-<pid>.sock`.
pub fn relink_socket_path(dir: &Path, component: &str, pid: u32) -> PathBuf {
    dir.join(format!("{component}-{pid}.sock"))
}

/// Whether a peer running as `peer_uid` may become the control link of a component whose
/// effective user is `own_euid`: root, or that same user.
pub fn may_relink(peer_uid: u32, own_euid: u32) -> bool {
    peer_uid == 0 || peer_uid == own_euid
}

/// The credentials check a component supplies: the uid of a connected peer
/// (`SO_PEERCRED`), which this crate cannot ask the kernel for itself.
pub type PeerUid = fn(&UnixStream) -> io::Result<u32>;

#[derive(Debug)]
struct Shared {
    /// The component's current control link is alive: connections are closed.
    alive: AtomicBool,
    /// The [`Relink`] was dropped: the acceptor ends at its next connection.
    closed: AtomicBool,
}

/// A component's relink socket and the thread that accepts on it.
#[derive(Debug)]
pub struct Relink {
    path: PathBuf,
    shared: Arc<Shared>,
    links: Receiver<UnixStream>,
}

/// Tells a [`Relink`] that the control link it stands behind ended. For the thread that
/// reads the link, so that the socket takes a new supervisor as soon as the end is seen.
#[derive(Debug, Clone)]
pub struct LinkLoss(Arc<Shared>);

impl LinkLoss {
    /// The current control link ended: the next trusted connection replaces it. Call
    /// once per link.
    pub fn link_lost(&self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }
}

impl Relink {
    /// Listens on `relink_socket_path(dir, component, own pid)`, mode 0600, replacing a
    /// socket left there by a dead process of the same pid. The control link the process
    /// was started with counts as alive. `own_euid` and `peer_uid` decide who may take
    /// over ([`may_relink`]).
    pub fn bind(
        dir: &Path,
        component: &str,
        own_euid: u32,
        peer_uid: PeerUid,
    ) -> io::Result<Relink> {
        let path = relink_socket_path(dir, component, std::process::id());
        // Only a socket: the name is this pid's, so one there is a dead process's.
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        // A connection made before this is checked like any other.
        if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let shared = Arc::new(Shared {
            alive: AtomicBool::new(true),
            closed: AtomicBool::new(false),
        });
        let (tx, links) = mpsc::channel();
        let s = shared.clone();
        let spawned = thread::Builder::new()
            .name(format!("{component}-relink"))
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    if s.closed.load(Ordering::SeqCst) {
                        return;
                    }
                    // Dropping `conn` closes it.
                    if s.alive.load(Ordering::SeqCst)
                        || !peer_uid(&conn).is_ok_and(|uid| may_relink(uid, own_euid))
                    {
                        continue;
                    }
                    s.alive.store(true, Ordering::SeqCst);
                    if tx.send(conn).is_err() {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(Relink {
            path,
            shared,
            links,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle for the thread that reads the control link.
    pub fn loss(&self) -> LinkLoss {
        LinkLoss(self.shared.clone())
    }

    /// Waits for the connection that replaces a lost link (after
    /// [`LinkLoss::link_lost`]). `None` only if the acceptor thread ended.
    pub fn next_link(&self) -> Option<UnixStream> {
        self.links.recv().ok()
    }

    /// The connection that replaced a lost link, if one came.
    pub fn try_next_link(&self) -> Option<UnixStream> {
        self.links.try_recv().ok()
    }

    /// Removes the socket's name (best effort): for a process about to `exit` without
    /// dropping this.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Relink {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        // Wakes the acceptor so that it sees `closed` and ends.
        let _ = UnixStream::connect(&self.path);
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Command, Link, LinkError, Reply};
    use std::io::Read;
    use std::sync::atomic::AtomicU32;
    use std::time::{Duration, Instant};

    fn temp_dir() -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "molt-relink-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn own_uid(_: &UnixStream) -> io::Result<u32> {
        Ok(1000)
    }

    fn stranger(_: &UnixStream) -> io::Result<u32> {
        Ok(4242)
    }

    /// Whether the component closed `s` without reading or writing.
    fn closed(mut s: UnixStream) -> bool {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        matches!(s.read(&mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn the_path_names_the_component_and_its_pid() {
        assert_eq!(
            relink_socket_path(Path::new("/run/molt/x"), "blockdev", 42),
            Path::new("/run/molt/x/blockdev-42.sock")
        );
        assert!(may_relink(0, 1000) && may_relink(1000, 1000));
        assert!(!may_relink(1001, 1000));
    }

    #[test]
    fn a_new_link_is_taken_only_after_the_old_one_is_lost() {
        let dir = temp_dir();
        let relink = Relink::bind(&dir, "fsd", 1000, own_uid).unwrap();
        let path = relink.path().to_path_buf();
        assert_eq!(path, relink_socket_path(&dir, "fsd", std::process::id()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Alive: closed, and nothing delivered.
        assert!(closed(UnixStream::connect(&path).unwrap()));
        assert!(relink.try_next_link().is_none());
        for round in 0..3 {
            relink.loss().link_lost();
            let mut ours = Link::new(UnixStream::connect(&path).unwrap(), 1024);
            let mut theirs = Link::new(relink.next_link().unwrap(), 1024);
            ours.send(&Command::Status).unwrap();
            assert_eq!(theirs.recv::<Command>().unwrap(), Command::Status);
            theirs.send(&Reply::Serving).unwrap();
            assert_eq!(ours.recv::<Reply>().unwrap(), Reply::Serving);
            // The new link is alive: the next connection is closed again.
            assert!(closed(UnixStream::connect(&path).unwrap()), "round {round}");
            drop(ours);
            assert!(matches!(theirs.recv::<Command>(), Err(LinkError::Closed)));
        }
        drop(relink);
        assert!(!path.exists());
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn a_stranger_is_refused_and_a_stale_socket_replaced() {
        let dir = temp_dir();
        let path = relink_socket_path(&dir, "blockdev", std::process::id());
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let relink = Relink::bind(&dir, "blockdev", 1000, stranger).unwrap();
        relink.loss().link_lost();
        assert!(closed(UnixStream::connect(&path).unwrap()));
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            assert!(relink.try_next_link().is_none());
        }
        relink.remove();
        assert!(!path.exists());
        drop(relink);
        std::fs::remove_dir(&dir).unwrap();
    }
}
