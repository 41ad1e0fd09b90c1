//! Names, streams and handles through a real mount, and what the kernel does with what the
//! server says: racing creates of one name (with and without O_EXCL, with O_TRUNC, and
//! against another user), rewinddir and directory streams under concurrent changes, file
//! handles (name_to_handle_at / open_by_handle_at) across remounts, live updates and server
//! crashes and after the inode is gone or its number reused, atime under the relatime,
//! noatime and strictatime mount options, device nodes and the dev option, the fallocate
//! modes the kernel's FUSE module refuses, and shared mappings of O_DIRECT files.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use molt_tests::harness::{kill9, poll_until, run, Keyring, TempDir, TestImage, TestRng};

use crate::live::{apply, component, mount_live, pack_example, status, variants, COMMITTED};

const BS: usize = 4096;

/// "ESTALE (Stale file handle)"-style text for an errno.
fn strerror(e: i32) -> String {
    format!("errno {e} ({})", io::Error::from_raw_os_error(e))
}

fn os_err(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    TestRng::new(seed).bytes(len)
}

/// Asserts `got == want` and names the first differing offset.
fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: differs from byte {i} (got {:#04x}, want {:#04x})",
            got[i], want[i]
        );
    }
}

/// `echo LEVEL > /proc/sys/vm/drop_caches` (1: page cache, 2: dentries and inodes, 3: both).
fn drop_caches(level: u32) {
    std::fs::write("/proc/sys/vm/drop_caches", format!("{level}\n"))
        .unwrap_or_else(|e| panic!("echo {level} > /proc/sys/vm/drop_caches: {e}"));
}

/// Sets a flag when dropped: a thread polling it stops even when the test panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

// ---- racing creates of one name ---------------------------------------------------------

/// Threads racing to open one name.
const RACERS: usize = 16;
/// Fresh names raced for.
const RACE_NAMES: usize = 50;

/// Runs `f(i)` on `n` threads released together by a barrier; the results in thread order.
fn race<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let barrier = Barrier::new(n);
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..n)
            .map(|i| {
                let (b, f) = (&barrier, &f);
                s.spawn(move || {
                    b.wait();
                    f(i)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("racing thread"))
            .collect()
    })
}

/// Counts of each errno in `results`, for failure messages.
fn errno_summary<T>(results: &[io::Result<T>]) -> String {
    let mut by: BTreeMap<i32, usize> = BTreeMap::new();
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        *by.entry(os_err(e)).or_default() += 1;
    }
    by.iter()
        .map(|(e, n)| format!("{n} x {}", strerror(*e)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sixteen threads open(O_CREAT|O_RDWR) one fresh name at the same moment, fifty times:
/// without O_EXCL every open succeeds (one creates, the others open what it created), and
/// every descriptor is the one inode the name names.
#[test]
fn racing_creates_without_o_excl_all_succeed_on_one_inode() {
    let img = TestImage::new("ns-create-race", "64M");
    let m = img.mount();
    let dir = m.path().join("race");
    std::fs::create_dir(&dir).expect("mkdir");
    for round in 0..RACE_NAMES {
        let p = dir.join(format!("n{round}"));
        let results = race(RACERS, |_| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(&p)?;
            let ino = f.metadata()?.ino();
            Ok::<_, io::Error>((ino, f))
        });
        assert!(
            results.iter().all(Result::is_ok),
            "round {round}: open(O_CREAT|O_RDWR) without O_EXCL racing on one name failed: {}",
            errno_summary(&results)
        );
        let named = std::fs::metadata(&p).expect("stat the raced name").ino();
        let inos: BTreeSet<u64> = results.iter().flatten().map(|(ino, _)| *ino).collect();
        assert_eq!(
            inos,
            BTreeSet::from([named]),
            "round {round}: the racers' descriptors (fstat st_ino) are not all the inode the \
             name names ({named})"
        );
    }
    m.unmount();
    img.assert_clean();
}

/// The same race with O_EXCL: exactly one open succeeds, every other one fails with
/// EEXIST, and the winner holds the inode the name names.
#[test]
fn racing_exclusive_creates_have_exactly_one_winner_and_the_rest_get_eexist() {
    let img = TestImage::new("ns-excl-race", "64M");
    let m = img.mount();
    let dir = m.path().join("race");
    std::fs::create_dir(&dir).expect("mkdir");
    for round in 0..RACE_NAMES {
        let p = dir.join(format!("x{round}"));
        let results = race(RACERS, |_| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&p)?;
            f.metadata().map(|md| md.ino())
        });
        let winners: Vec<u64> = results.iter().flatten().copied().collect();
        let others: Vec<i32> = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(os_err)
            .filter(|&e| e != libc::EEXIST)
            .collect();
        assert!(
            winners.len() == 1 && others.is_empty(),
            "round {round}: {} of {RACERS} racing open(O_CREAT|O_EXCL) succeeded (want exactly \
             1), the others failed with: {}",
            winners.len(),
            errno_summary(&results)
        );
        let named = std::fs::metadata(&p).expect("stat the raced name").ino();
        assert_eq!(
            winners[0], named,
            "round {round}: the winner's inode is not the one the name names"
        );
    }
    m.unmount();
    img.assert_clean();
}

/// Two threads race to open(O_CREAT) one fresh name: one writes 12 KiB, the other opens
/// with O_TRUNC. In every other round the truncating open starts only once the write has
/// returned: then it must find the file truncated (fstat size 0, nothing to read), and it
/// stays empty after both close (the writer's flush must not bring the data back). In the
/// other rounds both run freely: the file ends as either nothing or exactly the data.
#[test]
fn racing_create_with_o_trunc_truncates_what_the_winner_wrote() {
    let img = TestImage::new("ns-trunc-race", "64M");
    let m = img.mount();
    let dir = m.path().join("race");
    std::fs::create_dir(&dir).expect("mkdir");
    let (mut ordered, mut free) = (0, 0);
    for round in 0..200u64 {
        let p = dir.join(format!("t{round}"));
        let data = pattern(round, 3 * BS + 100);
        let written = AtomicBool::new(false);
        let wait_for_write = round % 2 == 0;
        let barrier = Barrier::new(2);
        let (writer, truncator) = std::thread::scope(|s| {
            let w = s.spawn(|| {
                barrier.wait();
                let mut f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&p)?;
                f.write_all(&data)?;
                written.store(true, Ordering::SeqCst);
                Ok::<_, io::Error>(f)
            });
            let t = s.spawn(|| {
                barrier.wait();
                if wait_for_write {
                    poll_until(Duration::from_secs(20), || written.load(Ordering::SeqCst));
                }
                let after_write = written.load(Ordering::SeqCst);
                let mut f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&p)?;
                let size = f.metadata()?.len();
                let mut seen = Vec::new();
                f.read_to_end(&mut seen)?;
                Ok::<_, io::Error>((f, after_write, size, seen.len()))
            });
            (w.join().expect("writer"), t.join().expect("truncator"))
        });
        let writer =
            writer.unwrap_or_else(|e| panic!("round {round}: the writer's open/write: {e}"));
        let (truncator, after_write, size, seen) = truncator
            .unwrap_or_else(|e| panic!("round {round}: open(O_CREAT|O_RDWR|O_TRUNC): {e}"));
        assert!(
            !wait_for_write || after_write,
            "round {round}: the write did not return within 20 s"
        );
        if after_write {
            ordered += 1;
            assert_eq!(
                (size, seen),
                (0, 0),
                "round {round}: open(O_CREAT|O_TRUNC) after the other racer wrote {} bytes: \
                 (fstat size, bytes read) right after the open",
                data.len()
            );
        } else {
            free += 1;
        }
        drop(writer);
        drop(truncator);
        let end = std::fs::read(&p).unwrap_or_else(|e| panic!("round {round}: read back: {e}"));
        if after_write {
            assert!(
                end.is_empty(),
                "round {round}: the truncated file holds {} bytes after both closed",
                end.len()
            );
        } else if !end.is_empty() {
            assert_bytes(
                &end,
                &data,
                &format!("round {round}: a truncate racing a write leaves nothing or the data"),
            );
        }
    }
    println!("{ordered} rounds truncated after the write, {free} ran freely");
    m.unmount();
    img.assert_clean();
}

/// A process of another user (`nobody`, 65534) that opens what it is sent, one path a line,
/// with open(O_CREAT|O_WRONLY, 0644), and answers `fd UID INO` (fstat of what it got) or
/// `err ERRNO`. It runs python3 under setpriv: the test process is multi-threaded and must
/// not change its own credentials.
const OTHER_USER_OPENER: &str = r#"
import os, sys
print("ready", os.getuid(), os.getgid(), flush=True)
while True:
    line = sys.stdin.readline()
    if not line:
        break
    p = line.rstrip("\n")
    try:
        fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    except OSError as e:
        print("err", e.errno, flush=True)
        continue
    st = os.fstat(fd)
    os.close(fd)
    print("fd", st.st_uid, st.st_ino, flush=True)
"#;

const NOBODY: u32 = 65534;

/// The other user's opener process; killed when dropped.
struct OtherUser {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl OtherUser {
    fn start() -> OtherUser {
        let mut child = Command::new("/usr/bin/setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                "/usr/bin/python3",
                "-c",
                OTHER_USER_OPENER,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning setpriv ... python3");
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in io::BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let e = stderr.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            e.lock().expect("stderr").push_str(&s);
        });
        let mut me = OtherUser {
            child,
            stdin,
            lines,
            stderr,
        };
        let hello = me.answer("start");
        assert_eq!(
            hello,
            format!("ready {NOBODY} {NOBODY}"),
            "the other user's process"
        );
        me
    }

    /// Sends a path to open (returns at once).
    fn send(&mut self, p: &Path) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin
            .write_all(p.as_os_str().as_bytes())
            .and_then(|_| stdin.write_all(b"\n"))
            .and_then(|_| stdin.flush())
            .expect("writing to the other user's process");
    }

    /// The next answer (deadline 30 s).
    fn answer(&mut self, what: &str) -> String {
        match self.lines.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(e) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                std::thread::sleep(Duration::from_millis(50));
                panic!(
                    "{what}: no answer from the other user's process ({e}); its stderr:\n{}",
                    self.stderr.lock().expect("stderr")
                );
            }
        }
    }

    /// Opens `p` as the other user: Ok((uid, ino)) of what it got, or Err(errno).
    fn open(&mut self, p: &Path, what: &str) -> Result<(u32, u64), i32> {
        self.send(p);
        parse_answer(&self.answer(what), what)
    }
}

fn parse_answer(l: &str, what: &str) -> Result<(u32, u64), i32> {
    let f: Vec<&str> = l.split_whitespace().collect();
    match f.as_slice() {
        ["fd", uid, ino] => Ok((uid.parse().expect("uid"), ino.parse().expect("ino"))),
        ["err", e] => Err(e.parse().expect("errno")),
        _ => panic!("{what}: unexpected answer {l:?} from the other user's process"),
    }
}

impl Drop for OtherUser {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let done = poll_until(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Another user racing root to create a name never gets a writable descriptor of root's
/// 0600 file: in every round it gets EACCES (root created the file, mode 0600, owner 0) or
/// a descriptor of a file it created itself (owner 65534, the file root's O_CREAT then
/// opened).
#[test]
fn racing_create_by_another_user_never_gets_roots_0600_file_writable() {
    let img = TestImage::new("ns-user-race", "64M");
    let m = img.mount();
    let dir = m.path().join("shared");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod 0777");
    let mut other = OtherUser::start();

    // Without a race, both outcomes happen as they must: the permission check is live.
    let roots = dir.join("root-alone");
    drop(
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&roots)
            .expect("root creates"),
    );
    assert_eq!(
        other.open(&roots, "the other user opens root's 0600 file"),
        Err(libc::EACCES),
        "the other user opening an existing 0600 file of root for writing"
    );
    let theirs = dir.join("other-alone");
    let (uid, _) = other
        .open(&theirs, "the other user creates")
        .unwrap_or_else(|e| {
            panic!(
                "the other user creating in a 0777 directory: {}",
                strerror(e)
            )
        });
    assert_eq!(uid, NOBODY, "owner of a file the other user created");

    let (mut root_won, mut other_won) = (0, 0);
    for round in 0..200u64 {
        let p = dir.join(format!("r{round}"));
        other.send(&p);
        // A different moment in every round: root's create starts a little later each time.
        for _ in 0..(round % 16) * 500 {
            std::hint::spin_loop();
        }
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&p)
            .unwrap_or_else(|e| panic!("round {round}: root's open(O_CREAT|O_WRONLY, 0600): {e}"));
        let md = f.metadata().expect("fstat");
        let what = format!("round {round}");
        match parse_answer(&other.answer(&what), &what) {
            Ok((uid, ino)) => {
                other_won += 1;
                assert_eq!(
                    uid,
                    NOBODY,
                    "round {round}: the other user got a writable descriptor of a file owned \
                     by uid {uid} (mode {:o}); root created {p:?} with mode 0600",
                    md.mode() & 0o7777
                );
                assert_eq!(
                    (ino, md.uid()),
                    (md.ino(), NOBODY),
                    "round {round}: the other user created the file, so root's O_CREAT must \
                     have opened that one (inode, owner)"
                );
            }
            Err(e) => {
                root_won += 1;
                assert_eq!(
                    e,
                    libc::EACCES,
                    "round {round}: the other user's open(O_CREAT|O_WRONLY) failed with {} \
                     (want EACCES or a file of its own)",
                    strerror(e)
                );
                assert_eq!(
                    (md.uid(), md.mode() & 0o7777),
                    (0, 0o600),
                    "round {round}: the other user was refused, so root created the file"
                );
            }
        }
    }
    println!("root created first in {root_won} rounds, the other user in {other_won}");
    drop(other);
    m.unmount();
    img.assert_clean();
}

// ---- directory streams ------------------------------------------------------------------

/// A directory stream (open / getdents / rewind / close).
struct DirStream {
    dir: rustix::fs::Dir,
    path: PathBuf,
}

impl DirStream {
    fn open(p: &Path) -> DirStream {
        use rustix::fs::{Mode, OFlags};
        let dir = rustix::fs::open(
            p,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .and_then(rustix::fs::Dir::new);
        assert!(
            dir.is_ok(),
            "opendir {p:?}: {}",
            io::Error::from(*dir.as_ref().unwrap_err())
        );
        DirStream {
            dir: dir.unwrap(),
            path: p.to_path_buf(),
        }
    }

    /// The next name, or None at the end of the stream.
    fn next_name(&mut self) -> Option<Vec<u8>> {
        match self.dir.read()? {
            Ok(e) => Some(e.file_name().to_bytes().to_vec()),
            Err(e) => {
                let err = e.raw_os_error();
                assert_eq!(err, 0, "readdir {:?}: {}", self.path, strerror(err));
                None
            }
        }
    }

    /// Every name from here to the end, without "." and "..".
    fn rest(&mut self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        while let Some(n) = self.next_name() {
            if n != b"." && n != b".." {
                let s = String::from_utf8(n).expect("utf-8 names");
                assert!(out.insert(s.clone()), "{s} listed twice by one pass");
            }
        }
        out
    }

    fn rewind(&mut self) {
        self.dir.rewind();
    }
}

/// rewinddir starts the listing over with the directory as it is now: names created after
/// the first pass appear, names removed since are gone.
#[test]
fn rewinddir_lists_names_created_and_hides_names_removed_since_opendir() {
    let img = TestImage::new("ns-rewinddir", "64M");
    let m = img.mount();
    let dir = m.path().join("d");
    std::fs::create_dir(&dir).expect("mkdir");
    let mut want: BTreeSet<String> = (0..20).map(|i| format!("a{i}")).collect();
    for n in &want {
        File::create(dir.join(n)).expect("create");
    }
    let mut s = DirStream::open(&dir);
    assert_eq!(s.rest(), want, "the first pass");
    for i in 0..10 {
        let n = format!("b{i}");
        File::create(dir.join(&n)).expect("create");
        want.insert(n);
    }
    for i in 0..5 {
        let n = format!("a{i}");
        std::fs::remove_file(dir.join(&n)).expect("unlink");
        want.remove(&n);
    }
    s.rewind();
    let again = s.rest();
    let missing: Vec<&String> = want.difference(&again).collect();
    let stale: Vec<&String> = again.difference(&want).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "after rewinddir: names created since the first pass missing {missing:?}, names \
         removed since still listed {stale:?}"
    );
    drop(s);
    m.unmount();
    img.assert_clean();
}

/// One forward pass over a directory of 2000 names (many readdir requests) while another
/// thread creates and removes other names in it: no name is returned twice, and every name
/// that existed for the whole listing is returned. The reader waits for the other thread to
/// make progress every 100 names, so changes land between its readdir requests.
#[test]
fn a_directory_stream_under_concurrent_changes_lists_no_name_twice_and_misses_no_stable_name() {
    const STABLE: usize = 2000;
    let img = TestImage::new("ns-readdir-churn", "128M");
    let m = img.mount();
    let dir = m.path().join("big");
    std::fs::create_dir(&dir).expect("mkdir");
    let stable: BTreeSet<String> = (0..STABLE).map(|i| format!("s{i:04}")).collect();
    for n in &stable {
        File::create(dir.join(n)).expect("create");
    }
    let stop = AtomicBool::new(false);
    let made = AtomicU64::new(0);
    let (listed, churn) = std::thread::scope(|sc| {
        let churn = sc.spawn(|| -> io::Result<u64> {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                File::create(dir.join(format!("c{i}")))?;
                if i >= 16 {
                    std::fs::remove_file(dir.join(format!("c{}", i - 16)))?;
                }
                i += 1;
                made.store(i, Ordering::SeqCst);
            }
            Ok(i)
        });
        let _stop = StopOnDrop(&stop);
        let mut s = DirStream::open(&dir);
        let mut listed: Vec<String> = Vec::new();
        let mut stalled = None;
        while let Some(n) = s.next_name() {
            listed.push(String::from_utf8(n).expect("utf-8 names"));
            if listed.len().is_multiple_of(100) {
                let target = made.load(Ordering::SeqCst) + 5;
                if !poll_until(Duration::from_secs(20), || {
                    made.load(Ordering::SeqCst) >= target || stop.load(Ordering::SeqCst)
                }) {
                    stalled = Some(listed.len());
                    break;
                }
            }
        }
        drop(s);
        stop.store(true, Ordering::SeqCst);
        let churn = churn.join().expect("churn thread");
        ((listed, stalled), churn)
    });
    let (listed, stalled) = listed;
    let changes = churn.unwrap_or_else(|e| panic!("the thread changing the directory: {e}"));
    assert_eq!(
        stalled, None,
        "the thread changing the directory made no progress for 20 s"
    );
    println!(
        "{} names listed while {changes} names were created (and all but 16 removed)",
        listed.len()
    );
    let mut seen = BTreeSet::new();
    let twice: BTreeSet<&String> = listed.iter().filter(|n| !seen.insert(*n)).collect();
    assert!(
        twice.is_empty(),
        "one readdir pass returned these names more than once: {twice:?}"
    );
    let got: BTreeSet<String> = listed.iter().cloned().collect();
    let missed: Vec<&String> = stable.difference(&got).collect();
    assert!(
        missed.is_empty(),
        "{} of {STABLE} names that existed for the whole listing were not returned, e.g. {:?}",
        missed.len(),
        &missed[..missed.len().min(10)]
    );
    m.unmount();
    img.assert_clean();
}

/// A directory stream read on after names in it were removed, and their inode numbers
/// reused by new files, hands the kernel no entry for a removed name: the listing was taken
/// at the stream's first read, but a readdirplus entry is a lookup the kernel caches (for
/// the entry timeout), so an entry for a removed name would make `stat` find it and
/// `open(O_CREAT)` open whatever file now has its inode number (or fail with ENOENT once
/// that inode is gone too) instead of creating the file.
#[test]
fn a_directory_stream_read_after_removals_gives_the_kernel_no_entry_for_a_removed_name() {
    const NAMES: usize = 2000;
    let img = TestImage::new("ns-readdir-removed", "64M");
    let m = img.mount();
    let dir = m.path().join("d");
    std::fs::create_dir(&dir).expect("mkdir");
    for i in 0..NAMES {
        std::fs::write(dir.join(format!("x{i}")), b"old").expect("create");
    }
    let mut s = DirStream::open(&dir);
    let first = s.next_name().expect("a first entry");
    // Everything goes, and new files take the freed inode numbers, before the stream
    // reads on: every entry past its first read names a removed file.
    for i in 0..NAMES {
        std::fs::remove_file(dir.join(format!("x{i}"))).expect("unlink");
    }
    for i in 0..NAMES {
        std::fs::write(dir.join(format!("y{i}")), b"new").expect("create");
    }
    let rest = s.rest();
    drop(s);
    println!(
        "the stream listed {} names after its first, {first:?}",
        rest.len()
    );
    let mut found = Vec::new();
    let mut opened_other = Vec::new();
    for i in 0..NAMES {
        let p = dir.join(format!("x{i}"));
        match std::fs::symlink_metadata(&p) {
            Err(e) if os_err(&e) == libc::ENOENT => {}
            Err(e) => panic!("stat {p:?}: {e}"),
            Ok(md) => found.push((i, md.ino())),
        }
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .unwrap_or_else(|e| panic!("open(O_CREAT) {p:?}: {e}"));
        let md = f.metadata().expect("fstat");
        if md.len() != 0 || md.nlink() != 1 {
            opened_other.push((i, md.len(), md.nlink()));
        }
    }
    assert!(
        found.is_empty(),
        "stat found {} removed names (name, inode), e.g. {:?}",
        found.len(),
        &found[..found.len().min(5)]
    );
    assert!(
        opened_other.is_empty(),
        "open(O_CREAT) of {} removed names opened an existing file (name, size, links), \
         e.g. {:?}",
        opened_other.len(),
        &opened_other[..opened_other.len().min(5)]
    );
    for i in 0..NAMES {
        let got = std::fs::read(dir.join(format!("y{i}"))).expect("read");
        assert_eq!(got, b"new", "y{i} after the opens of the removed names");
    }
    m.unmount();
    img.assert_clean();
}

// ---- file handles -----------------------------------------------------------------------

/// A `struct file_handle` with room for the largest handle (MAX_HANDLE_SZ bytes).
use molt_sys::FileHandle;

/// name_to_handle_at(AT_FDCWD, p, .., 0).
fn handle_of(p: &Path) -> FileHandle {
    let r = FileHandle::of(p);
    assert!(
        r.is_ok(),
        "name_to_handle_at {p:?}: {}",
        r.as_ref().unwrap_err()
    );
    r.unwrap().0
}

/// open_by_handle_at(mount, h, flags): the file, or the errno.
fn open_by_handle(mount: &File, h: &FileHandle, flags: i32) -> Result<File, i32> {
    h.open(mount.as_fd(), flags).map_err(|e| os_err(&e))
}

/// A regular file and a directory (holding a file) known by their handles.
struct Known {
    file: FileHandle,
    file_ino: u64,
    content: Vec<u8>,
    dir: FileHandle,
    dir_ino: u64,
    inner: Vec<u8>,
}

impl Known {
    fn create(mnt: &Path) -> Known {
        let content = pattern(41, 3 * BS + 17);
        let inner = pattern(42, 1000);
        let f = mnt.join("by-handle");
        let d = mnt.join("dir-by-handle");
        std::fs::write(&f, &content).expect("write");
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::write(d.join("inside"), &inner).expect("write");
        for p in [&f, &d.join("inside")] {
            File::open(p).and_then(|f| f.sync_all()).expect("fsync");
        }
        File::open(&d)
            .and_then(|f| f.sync_all())
            .expect("fsync dir");
        Known {
            file: handle_of(&f),
            file_ino: std::fs::metadata(&f).expect("stat").ino(),
            content,
            dir: handle_of(&d),
            dir_ino: std::fs::metadata(&d).expect("stat").ino(),
            inner,
        }
    }

    /// Opens both by handle and checks what they are: first with the inodes perhaps in the
    /// kernel's cache, then after the kernel dropped its unused dentries and inodes (so that
    /// the server must find them from the handle).
    fn check(&self, mnt: &Path, ctx: &str) {
        for forgotten in [false, true] {
            if forgotten {
                drop_caches(2);
            }
            let when = if forgotten {
                format!("{ctx}, after drop_caches")
            } else {
                ctx.to_string()
            };
            let root = File::open(mnt).expect("open the mount root");
            let f = open_by_handle(&root, &self.file, libc::O_RDONLY).unwrap_or_else(|e| {
                panic!(
                    "{when}: open_by_handle_at of a regular file ({:?}) failed: {}",
                    self.file,
                    strerror(e)
                )
            });
            assert_eq!(
                f.metadata().expect("fstat").ino(),
                self.file_ino,
                "{when}: the handle opened another inode"
            );
            let mut got = Vec::new();
            (&f).read_to_end(&mut got).expect("read by handle");
            assert_bytes(&got, &self.content, &format!("{when}: read by handle"));
            drop(f);
            let d = open_by_handle(&root, &self.dir, libc::O_RDONLY | libc::O_DIRECTORY)
                .unwrap_or_else(|e| {
                    panic!(
                        "{when}: open_by_handle_at of a directory ({:?}) failed: {}",
                        self.dir,
                        strerror(e)
                    )
                });
            let md = d.metadata().expect("fstat");
            assert!(
                md.is_dir() && md.ino() == self.dir_ino,
                "{when}: the directory handle opened inode {} (want directory {})",
                md.ino(),
                self.dir_ino
            );
            let inside = PathBuf::from(format!("/proc/self/fd/{}/inside", d.as_raw_fd()));
            let got = std::fs::read(&inside).unwrap_or_else(|e| {
                panic!("{when}: reading a file of the directory opened by handle: {e}")
            });
            assert_bytes(&got, &self.inner, &format!("{when}: the directory's file"));
        }
    }
}

/// A regular file and a directory open by their handles and are what they were.
#[test]
fn file_handles_open_the_file_and_directory_they_were_made_for() {
    let img = TestImage::new("ns-handles", "64M");
    let m = img.mount();
    let k = Known::create(m.path());
    k.check(m.path(), "same mount");
    m.unmount();
    img.assert_clean();
}

/// A handle made before an unmount opens the same file after the image is mounted again.
#[test]
fn file_handles_are_stable_across_unmount_and_mount() {
    let img = TestImage::new("ns-handles-remount", "64M");
    let m = img.mount();
    let k = Known::create(m.path());
    k.check(m.path(), "before the remount");
    m.unmount();
    img.assert_clean();
    let m = img.mount();
    k.check(m.path(), "after unmount and mount of the same image");
    m.unmount();
    img.assert_clean();
}

/// Handles made before a live update of the filesystem server (the 04-global-algorithm
/// example: fsd 0.1.0 to 0.1.0+touch) open the same files served by the new version.
#[test]
fn file_handles_survive_a_live_update_of_the_filesystem_server() {
    let bins_dir = TempDir::new("ns-handles-live-bins");
    let bins = variants(bins_dir.path());
    let img = TestImage::new("ns-handles-live", "64M");
    let keys = Keyring::new("ns-handles-live-keys");
    let work = TempDir::new("ns-handles-live-work");
    let pkg = pack_example(
        &keys,
        work.path(),
        "04-global-algorithm",
        &[("bin/fsd", &bins.join("fsd-touch"))],
    );
    let m = mount_live(&img, &keys, None);
    let k = Known::create(m.path());
    k.check(m.path(), "before the live update");
    let before = component(&status(m.path()), "fsd");
    let r = apply(m.path(), &pkg, &[]);
    assert_eq!(
        r.code, COMMITTED,
        "the live update did not commit:\n{}",
        r.out
    );
    let after = component(&status(m.path()), "fsd");
    assert!(
        after.0 == "0.1.0+touch" && after.1 != before.1,
        "fsd before the update {before:?}, after {after:?}"
    );
    k.check(m.path(), "after a live update of fsd");
    m.unmount();
    img.assert_clean();
}

/// Handles made before a kill -9 of the filesystem server open the same files once the
/// supervisor has replaced it in place.
#[test]
fn file_handles_survive_a_kill9_of_the_filesystem_server() {
    let img = TestImage::new("ns-handles-crash", "64M");
    let m = img.mount();
    let k = Known::create(m.path());
    k.check(m.path(), "before the crash");
    let (sup, server, _) = m.stack_pids().expect("fsd serve and blockdev serve");
    kill9(server);
    assert!(
        poll_until(Duration::from_secs(30), || {
            m.stack_pids()
                .is_some_and(|(s, f, _)| s == sup && f != server)
        }),
        "the killed filesystem server {server} was not replaced"
    );
    k.check(m.path(), "after kill -9 of fsd and its recovery");
    m.unmount();
    img.assert_clean();
}

/// Polls (dropping the kernel's dentries and inodes each time) until opening `h` fails with
/// ESTALE; panics with the last outcome if it does not within 10 s. A successful open
/// before that must be of `ino` (the kernel may still hold the unlinked inode).
fn assert_goes_stale(mnt: &Path, h: &FileHandle, ino: u64, ctx: &str) {
    let root = File::open(mnt).expect("open the mount root");
    let mut last = String::new();
    let stale = poll_until(Duration::from_secs(10), || {
        drop_caches(2);
        match open_by_handle(&root, h, libc::O_RDONLY) {
            Err(e) => {
                last = strerror(e);
                e == libc::ESTALE
            }
            Ok(f) => {
                let got = f.metadata().expect("fstat").ino();
                assert_eq!(got, ino, "{ctx}: the handle opened another inode");
                last = format!("it opened inode {got}");
                false
            }
        }
    });
    assert!(
        stale,
        "{ctx}: open_by_handle_at did not fail with ESTALE within 10 s; last: {last}"
    );
}

/// After its file is unlinked and the kernel forgot the inode, a handle gives ESTALE.
#[test]
fn file_handle_of_an_unlinked_file_gives_estale() {
    let img = TestImage::new("ns-handles-unlink", "64M");
    let m = img.mount();
    let p = m.path().join("doomed");
    std::fs::write(&p, b"soon gone").expect("write");
    let h = handle_of(&p);
    let ino = std::fs::metadata(&p).expect("stat").ino();
    let root = File::open(m.path()).expect("open the mount root");
    let f = open_by_handle(&root, &h, libc::O_RDONLY)
        .unwrap_or_else(|e| panic!("open_by_handle_at while the file exists: {}", strerror(e)));
    drop(f);
    std::fs::remove_file(&p).expect("unlink");
    assert_goes_stale(m.path(), &h, ino, "after unlink");
    drop(root);
    m.unmount();
    img.assert_clean();
}

/// After the inode number of an unlinked file is given to a new file, the old handle still
/// gives ESTALE and never opens the new file: with the new file's inode in the kernel's
/// cache (held open) and after the kernel forgot it.
#[test]
fn file_handle_stays_stale_after_its_inode_number_is_reused() {
    let img = TestImage::new("ns-handles-reuse", "64M");
    let m = img.mount();
    let dir = m.path().join("d");
    std::fs::create_dir(&dir).expect("mkdir");
    let p = dir.join("old");
    std::fs::write(&p, b"the old file").expect("write");
    let h = handle_of(&p);
    let ino = std::fs::metadata(&p).expect("stat").ino();
    std::fs::remove_file(&p).expect("unlink");
    assert_goes_stale(m.path(), &h, ino, "after unlink");

    // Create files until one gets the old inode number (bounded by the image's inodes).
    let mut reused = None;
    for i in 0..4000 {
        let q = dir.join(format!("new{i}"));
        let f = File::create(&q).unwrap_or_else(|e| panic!("creating {q:?}: {e}"));
        if f.metadata().expect("fstat").ino() == ino {
            reused = Some((q, f));
            break;
        }
    }
    let (q, held) = reused.unwrap_or_else(|| {
        panic!("none of 4000 new files got inode number {ino} again; cannot test reuse")
    });
    let mut held = Some(held);
    if let Some(f) = held.as_mut() {
        f.write_all(b"the new file").expect("write");
        f.sync_all().expect("fsync");
    }
    let root = File::open(m.path()).expect("open the mount root");
    for forgotten in [false, true] {
        let when = if forgotten {
            drop(held.take());
            drop_caches(2);
            "after the kernel forgot the new file"
        } else {
            "with the new file open"
        };
        match open_by_handle(&root, &h, libc::O_RDONLY) {
            Err(e) => assert_eq!(
                e,
                libc::ESTALE,
                "{when}: the old handle of reused inode number {ino} failed with {} (want \
                 ESTALE)",
                strerror(e)
            ),
            Ok(f) => {
                let mut got = Vec::new();
                let _ = (&f).read_to_end(&mut got);
                panic!(
                    "{when}: the old handle of inode number {ino} opened the new file {q:?} \
                     (it reads {:?}); want ESTALE",
                    String::from_utf8_lossy(&got)
                );
            }
        }
    }
    drop(held);
    drop(root);
    m.unmount();
    img.assert_clean();
}

// ---- atime and the mount options --------------------------------------------------------

/// (atime, mtime) in ns since the epoch, asked of the server (AT_STATX_FORCE_SYNC: not
/// from the kernel's attribute cache).
fn times(p: &Path) -> (i128, i128) {
    use rustix::fs::{AtFlags, StatxFlags, StatxTimestamp, CWD};
    let r = rustix::fs::statx(
        CWD,
        p,
        AtFlags::STATX_FORCE_SYNC,
        StatxFlags::ATIME | StatxFlags::MTIME,
    );
    assert!(
        r.is_ok(),
        "statx {p:?}: {}",
        io::Error::from(*r.as_ref().unwrap_err())
    );
    let stx = r.unwrap();
    let ns = |t: StatxTimestamp| i128::from(t.tv_sec) * 1_000_000_000 + i128::from(t.tv_nsec);
    (ns(stx.stx_atime), ns(stx.stx_mtime))
}

fn atime(p: &Path) -> i128 {
    times(p).0
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

const DAY_NS: i128 = 86_400 * 1_000_000_000;

/// One aligned block for O_DIRECT.
#[repr(C, align(4096))]
struct Block([u8; BS]);

/// Reads `p` (at most one block) through a fresh O_DIRECT open, so the read reaches the
/// server; checks it returns `want`.
fn read_through_server(p: &Path, want: &[u8]) {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(p)
        .unwrap_or_else(|e| panic!("open {p:?} O_DIRECT: {e}"));
    let mut b = Box::new(Block([0; BS]));
    let n = f
        .read_at(&mut b.0, 0)
        .unwrap_or_else(|e| panic!("O_DIRECT read of {p:?}: {e}"));
    assert_bytes(&b.0[..n], want, "O_DIRECT read");
}

/// A file whose atime (one hour ago, set with `touch -a`) is older than its mtime (now).
/// (A file just created and written may not be one: its atime is the server's clock at the
/// create, its mtime the kernel's coarser clock at the write, which can be behind.)
fn atime_file(mnt: &Path, name: &str) -> (PathBuf, Vec<u8>) {
    let p = mnt.join(name);
    let data = pattern(51, 1000);
    std::fs::write(&p, &data).expect("write");
    File::open(&p).and_then(|f| f.sync_all()).expect("fsync");
    touch(&p, "-a", (now_ns() / 1_000_000_000) as i64 - 3600);
    let (a, m) = times(&p);
    assert!(
        a < m,
        "after touch -a an hour back: atime {a} is not before mtime {m}"
    );
    (p, data)
}

/// Sets atime (`-a`) or mtime (`-m`) with `touch -d @SECONDS`.
fn touch(p: &Path, which: &str, secs: i64) {
    let o = run(
        Command::new("touch")
            .args([which, "-d", &format!("@{secs}")])
            .arg(p),
        Duration::from_secs(30),
    );
    assert!(
        o.status.success(),
        "touch {which} -d @{secs} {p:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// How long a read's atime update may take to show; also how long an atime is watched to
/// see that it does not move.
const ATIME_DEADLINE: Duration = Duration::from_secs(3);

/// Reads through the server and waits for the atime to move from `before`; the new atime,
/// or None if it did not move within the deadline.
fn read_and_await_atime_change(p: &Path, data: &[u8], before: i128) -> Option<i128> {
    read_through_server(p, data);
    let mut now = before;
    poll_until(ATIME_DEADLINE, || {
        now = atime(p);
        now != before
    })
    .then_some(now)
}

/// Default mount (relatime): a read of a file whose atime is not newer than its mtime
/// updates the atime.
#[test]
fn relatime_by_default_a_read_updates_an_atime_not_newer_than_mtime() {
    let img = TestImage::new("ns-relatime-1", "64M");
    let m = img.mount();
    let (p, data) = atime_file(m.path(), "f");
    let (before, mtime) = times(&p);
    let after = read_and_await_atime_change(&p, &data, before);
    let after = after.unwrap_or_else(|| {
        panic!(
            "default mount: a read of a file with atime {before} <= mtime {mtime} left the \
             atime unchanged for {ATIME_DEADLINE:?} (relatime updates it)"
        )
    });
    assert!(
        after > before && after >= mtime,
        "the read moved atime from {before} to {after} (mtime {mtime})"
    );
    m.unmount();
    img.assert_clean();
}

/// Default mount (relatime): once a read moved the atime past the mtime, a second read right
/// after leaves it alone.
#[test]
fn relatime_by_default_a_second_read_does_not_move_atime_again() {
    let img = TestImage::new("ns-relatime-2", "64M");
    let m = img.mount();
    let (p, data) = atime_file(m.path(), "f");
    let before = atime(&p);
    let first = read_and_await_atime_change(&p, &data, before).unwrap_or_else(|| {
        panic!("default mount: the first read did not update the atime within {ATIME_DEADLINE:?}")
    });
    let moved = read_and_await_atime_change(&p, &data, first);
    assert_eq!(
        moved, None,
        "default mount (relatime): a second read right after the first moved atime from \
         {first} (already past mtime, less than a day old)"
    );
    m.unmount();
    img.assert_clean();
}

/// Default mount (relatime): an atime set more than a day back (`touch -a -d`) is updated by
/// a read. (The touch also moves the ctime past the atime, which relatime counts too: an
/// atime newer than mtime and ctime cannot be made older than a day without moving the
/// clock.)
#[test]
fn relatime_by_default_a_read_updates_an_atime_older_than_a_day() {
    let img = TestImage::new("ns-relatime-3", "64M");
    let m = img.mount();
    let (p, data) = atime_file(m.path(), "f");
    let now = (now_ns() / 1_000_000_000) as i64;
    touch(&p, "-a", now - 2 * 86_400);
    let before = atime(&p);
    assert_eq!(
        before / 1_000_000_000,
        i128::from(now - 2 * 86_400),
        "atime after touch -a -d two days back"
    );
    let after = read_and_await_atime_change(&p, &data, before).unwrap_or_else(|| {
        panic!(
            "default mount: a read of a file whose atime is two days old left the atime \
             unchanged for {ATIME_DEADLINE:?} (relatime updates an atime older than a day)"
        )
    });
    assert!(
        after > now_ns() - DAY_NS,
        "the read moved atime from {before} to {after}, not to the present"
    );
    m.unmount();
    img.assert_clean();
}

/// `-o noatime`: no read ever moves the atime, not even of a file whose atime is older than
/// its mtime or more than a day old.
#[test]
fn noatime_mount_option_never_updates_atime() {
    let img = TestImage::new("ns-noatime", "64M");
    let m = img.mount_with(&["-o", "noatime"], &[]);
    let (p, data) = atime_file(m.path(), "f");
    let before = atime(&p);
    assert_eq!(
        read_and_await_atime_change(&p, &data, before),
        None,
        "-o noatime: a read of a file with atime <= mtime moved its atime"
    );
    let now = (now_ns() / 1_000_000_000) as i64;
    touch(&p, "-a", now - 2 * 86_400);
    let before = atime(&p);
    assert_eq!(
        read_and_await_atime_change(&p, &data, before),
        None,
        "-o noatime: a read of a file with a two-day-old atime moved its atime"
    );
    m.unmount();
    img.assert_clean();
}

/// `-o strictatime`: every read that reaches the server updates the atime: the first, and
/// each one right after (when the atime is already newer than mtime and ctime, which
/// relatime would leave alone).
#[test]
fn strictatime_mount_option_updates_atime_on_every_read() {
    let img = TestImage::new("ns-strictatime", "64M");
    let m = img.mount_with(&["-o", "strictatime"], &[]);
    let (p, data) = atime_file(m.path(), "f");
    let mut at = atime(&p);
    for i in 1..=3 {
        at = read_and_await_atime_change(&p, &data, at).unwrap_or_else(|| {
            panic!("-o strictatime: read {i} left the atime {at} unchanged for {ATIME_DEADLINE:?}")
        });
    }
    m.unmount();
    img.assert_clean();
}

/// A character device node like /dev/null (1, 3) in the mount's root.
fn null_device(mnt: &Path) -> PathBuf {
    let p = mnt.join("null");
    use rustix::fs::{FileType, Mode, CWD};
    let r = rustix::fs::mknodat(
        CWD,
        &p,
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    );
    assert!(
        r.is_ok(),
        "mknod {p:?} c 1 3: {}",
        io::Error::from(r.unwrap_err())
    );
    let md = std::fs::metadata(&p).expect("stat");
    assert_eq!(
        (md.mode() & libc::S_IFMT, md.rdev()),
        (libc::S_IFCHR, libc::makedev(1, 3)),
        "the device node's type and rdev"
    );
    p
}

/// `-o dev`: root opens a device node made with mknod, and it is the device (writes
/// vanish, reads see end of file).
#[test]
fn dev_mount_option_lets_root_open_and_write_a_device_node() {
    let img = TestImage::new("ns-dev", "64M");
    let m = img.mount_with(&["-o", "dev"], &[]);
    let p = null_device(m.path());
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap_or_else(|e| panic!("-o dev: opening the device node {p:?} (c 1 3): {e}"));
    f.write_all(b"into /dev/null")
        .expect("-o dev: writing to the device node");
    let mut got = Vec::new();
    f.read_to_end(&mut got)
        .expect("-o dev: reading the device node");
    assert!(
        got.is_empty(),
        "the node c 1 3 read {} bytes: it is not /dev/null",
        got.len()
    );
    drop(f);
    m.unmount();
    img.assert_clean();
}

/// Default mount (nodev): opening a device node fails with EACCES.
#[test]
fn device_nodes_cannot_be_opened_by_default() {
    let img = TestImage::new("ns-nodev", "64M");
    let m = img.mount();
    let p = null_device(m.path());
    let e = OpenOptions::new()
        .write(true)
        .open(&p)
        .map(|_| ())
        .expect_err("default mount: a device node opened");
    assert_eq!(
        os_err(&e),
        libc::EACCES,
        "default mount: opening a device node: {e}"
    );
    m.unmount();
    img.assert_clean();
}

// ---- fallocate modes --------------------------------------------------------------------

fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    molt_sys::fallocate(f.as_fd(), mode, off, len)
}

/// FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE and FALLOC_FL_UNSHARE_RANGE never reach
/// a FUSE server: the kernel's FUSE module (fs/fuse/file.c, fuse_file_fallocate) accepts
/// only KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE and answers any other mode EOPNOTSUPP itself,
/// before sending FUSE_FALLOCATE (checked on Linux 6.18 by tracing the server's reads of
/// /dev/fuse: `fallocate --collapse-range`, `--insert-range` and `xfs_io -c funshare` send
/// no FALLOCATE request; plain fallocate does). So on Molt, as on every FUSE filesystem,
/// these modes fail with EOPNOTSUPP and change nothing, whatever the server implements;
/// the ext4 behaviour (shifting the content by whole blocks) cannot be had through FUSE.
/// The modes the kernel forwards keep working afterwards (the refusal is not a sticky
/// "server has no fallocate" state).
#[test]
fn fallocate_collapse_insert_and_unshare_are_refused_by_the_kernel_with_eopnotsupp() {
    let img = TestImage::new("ns-fallocate", "64M");
    let m = img.mount();
    let p = m.path().join("f");
    let data = pattern(61, 4 * BS);
    std::fs::write(&p, &data).expect("write");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .expect("open");
    f.sync_all().expect("fsync");
    for (name, mode, off, len) in [
        (
            "FALLOC_FL_COLLAPSE_RANGE",
            libc::FALLOC_FL_COLLAPSE_RANGE,
            BS,
            BS,
        ),
        (
            "FALLOC_FL_INSERT_RANGE",
            libc::FALLOC_FL_INSERT_RANGE,
            BS,
            BS,
        ),
        (
            "FALLOC_FL_UNSHARE_RANGE",
            libc::FALLOC_FL_UNSHARE_RANGE,
            0,
            2 * BS,
        ),
    ] {
        let r = fallocate(&f, mode, off as u64, len as u64);
        assert_eq!(
            r.as_ref().map_err(os_err),
            Err(libc::EOPNOTSUPP),
            "fallocate({name}, {off}, {len}) on a FUSE file: the kernel refuses this mode \
             with EOPNOTSUPP before any request reaches the server; if this kernel now \
             forwards it, replace this check with the ext4 behaviour"
        );
        let mut all = vec![0u8; data.len()];
        f.read_exact_at(&mut all, 0).expect("read");
        assert_bytes(&all, &data, &format!("after the refused {name}"));
        assert_eq!(f.metadata().expect("fstat").len(), data.len() as u64);
    }
    // What the kernel forwards still reaches the server and works.
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        BS as u64,
        BS as u64,
    )
    .expect("PUNCH_HOLE|KEEP_SIZE after the refused modes");
    fallocate(&f, 0, 0, 8 * BS as u64).expect("fallocate mode 0 after the refused modes");
    let mut want = data.clone();
    want[BS..2 * BS].fill(0);
    want.resize(8 * BS, 0);
    drop(f);
    assert_bytes(
        &std::fs::read(&p).expect("read"),
        &want,
        "after punch and grow",
    );
    m.unmount();
    img.assert_clean();
}

// ---- shared mappings of O_DIRECT files --------------------------------------------------

/// A file opened with O_DIRECT maps MAP_SHARED read+write; what is written through the
/// mapping and msynced is in the file: through a fresh buffered open, an O_DIRECT read (the
/// server) and after a remount.
#[test]
fn mmap_shared_of_an_o_direct_file_writes_reach_the_file() {
    let img = TestImage::new("ns-mmap-direct", "64M");
    let m = img.mount();
    let p = m.path().join("direct-mapped");
    let len = 2 * BS;
    std::fs::write(&p, pattern(71, len)).expect("write");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .expect("open O_DIRECT");
    let map = molt_sys::SharedMapping::new(&f);
    assert!(
        map.is_ok(),
        "mmap(MAP_SHARED, PROT_READ|PROT_WRITE) of a file opened with O_DIRECT: {}",
        map.as_ref().unwrap_err()
    );
    let map = map.unwrap();
    assert_eq!(map.len(), len, "the mapping covers the file");
    let data = pattern(72, len);
    map.write_at(0, &data).expect("writing through the mapping");
    let r = map.sync();
    assert!(r.is_ok(), "msync: {}", r.unwrap_err());
    drop(map);
    drop(f);
    assert_bytes(
        &std::fs::read(&p).expect("read"),
        &data,
        "a fresh buffered read after writing through the mapping and msync",
    );
    let direct = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .expect("open O_DIRECT");
    let mut b = Box::new(Block([0; BS]));
    for (i, want) in data.chunks(BS).enumerate() {
        direct
            .read_exact_at(&mut b.0, (i * BS) as u64)
            .expect("O_DIRECT read");
        assert_bytes(&b.0, want, &format!("O_DIRECT read of block {i}"));
    }
    drop(direct);
    m.unmount();
    img.assert_clean();
    let m = img.mount();
    assert_bytes(
        &std::fs::read(m.path().join("direct-mapped")).expect("read"),
        &data,
        "after remount",
    );
    m.unmount();
    img.assert_clean();
}
