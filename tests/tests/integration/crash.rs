//! Crash tests: a metadata-heavy workload runs on a real mount while one process of the
//! stack (the supervisor, the filesystem server or the block driver) is killed with
//! SIGKILL at a random moment.
//!
//! - The filesystem server or the block driver: the supervisor replaces it (crash
//!   recovery). The workload sees a pause and no error: every operation it saw succeed is
//!   there, whether fsynced or not, and it goes on without remounting.
//! - The supervisor: the stack goes down. Every syscall of the workload fails instead of
//!   hanging, no process is left, the mountpoint is detached, the image checks clean, and
//!   after a remount every write the workload saw acknowledged by fsync is there with
//!   exactly its contents.
//!
//! Environment:
//! - `MOLT_CRASH_KILLS`: kills in the campaign (default 50, about 40 s). Raise it for a
//!   stress run, which libtest runs without nextest's 8-minute deadline (about 0.7 s a
//!   kill):
//!   `MOLT_CRASH_KILLS=1000 cargo test --profile ci -p molt-tests --test integration -- crash:: --nocapture`
//! - `MOLT_CRASH_SEED`: replays a run; every run prints its seed, and every failure names
//!   the seed, the cycle and the process killed.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use molt_tests::harness::{
    abort_connection, alive, is_mounted, kill9, poll_until, seed_from_env, updater, Mount,
    TestImage, TestRng,
};

/// Worker threads running the workload.
const WORKERS: usize = 3;
/// Cycles a durable entry lives before its owner retires (unlinks) it.
const RETIRE_AFTER: u32 = 3;
/// Most names one retire step removes.
const RETIRE_BATCH: usize = 16;
/// Longest time from the kill until every workload syscall has returned.
const WORKLOAD_DEADLINE: Duration = Duration::from_secs(30);
/// Longest time from the kill until no process of the stack is left.
const STACK_DEADLINE: Duration = Duration::from_secs(20);

fn kills() -> u32 {
    match std::env::var("MOLT_CRASH_KILLS") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("MOLT_CRASH_KILLS={s:?} is not a number")),
        Err(_) => 50,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    Supervisor,
    Server,
    Driver,
}

/// What a durable name must be.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    /// A regular file holding `content(seed, len)`.
    File {
        seed: u64,
        len: usize,
    },
    Symlink(String),
    Dir,
}

#[derive(Clone, Debug)]
enum State {
    /// Acknowledged by fsync: must exist exactly so.
    Durable(Entry),
    /// Its removal was started and not acknowledged: absent, or exactly so.
    Retiring(Entry),
    /// Its removal was acknowledged by fsync of the directory: must be absent.
    Gone,
}

#[derive(Clone, Debug)]
struct Record {
    cycle: u32,
    owner: usize,
    state: State,
}

/// Every name under `keep/` whose state a crash must not change, keyed by its path
/// relative to `keep/`.
type Ledger = Arc<Mutex<BTreeMap<String, Record>>>;

/// Contents of a durable file: unique per seed, so a block of another file is noticed.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut v = TestRng::new(seed).bytes(len);
    let tag = seed.to_le_bytes();
    let n = tag.len().min(len);
    v[..n].copy_from_slice(&tag[..n]);
    v
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// One workload thread: churn in its own directory, and durable steps under `keep/`.
struct Worker {
    id: usize,
    cycle: u32,
    rng: TestRng,
    churn: PathBuf,
    keep: PathBuf,
    /// This cycle's durable directory, `keep/c{cycle}w{id}`, once created.
    durable_dir: Option<String>,
    /// Churn names that exist (files and symlinks), relative to `churn`.
    files: Vec<String>,
    /// Churn subdirectories that exist, relative to `churn`.
    dirs: Vec<String>,
    next: u64,
    ledger: Ledger,
}

impl Worker {
    fn fresh(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{}", self.next)
    }

    fn pick(&mut self, n: usize) -> usize {
        self.rng.below(n as u64) as usize
    }

    fn size(&mut self) -> usize {
        match self.rng.below(10) {
            0 => 64 * 1024 + self.rng.below(256 * 1024) as usize,
            1 => 0,
            _ => self.rng.below(16 * 1024) as usize,
        }
    }

    fn record(&self, key: String, entry: Entry) {
        self.ledger.lock().expect("ledger").insert(
            key,
            Record {
                cycle: self.cycle,
                owner: self.id,
                state: State::Durable(entry),
            },
        );
    }

    /// Runs steps until one fails; returns the failing step and its error.
    fn run(mut self, stop: &AtomicBool) -> (&'static str, io::Error) {
        if let Err(e) = std::fs::create_dir(&self.churn) {
            return ("mkdir churn", e);
        }
        loop {
            if stop.load(Ordering::Relaxed) {
                return ("stopped", io::Error::from_raw_os_error(libc::ECANCELED));
            }
            let (op, r) = match self.rng.below(100) {
                0..=17 => ("durable file", self.durable_file()),
                18..=21 => ("durable link", self.durable_link()),
                22..=24 => ("durable symlink", self.durable_symlink()),
                25..=29 => ("retire", self.retire()),
                _ => self.churn_step(),
            };
            if let Err(e) = r {
                return (op, e);
            }
        }
    }

    fn durable_parent(&mut self) -> io::Result<String> {
        if let Some(d) = &self.durable_dir {
            return Ok(d.clone());
        }
        let d = format!("c{}w{}", self.cycle, self.id);
        std::fs::create_dir(self.keep.join(&d))?;
        fsync_dir(&self.keep)?;
        self.record(d.clone(), Entry::Dir);
        self.durable_dir = Some(d.clone());
        Ok(d)
    }

    /// Writes a file with unique contents and makes it durable, either in place or by the
    /// write-to-temporary, fsync, rename, fsync-the-directory pattern.
    fn durable_file(&mut self) -> io::Result<()> {
        let dir = self.durable_parent()?;
        let key = format!("{dir}/{}", self.fresh("n"));
        let len = self.size();
        let seed = self.rng.next_u64();
        let data = content(seed, len);
        let dst = self.keep.join(&key);
        if self.rng.below(2) == 0 {
            let mut f = File::create(&dst)?;
            f.write_all(&data)?;
            if self.rng.below(2) == 0 {
                f.sync_data()?;
            } else {
                f.sync_all()?;
            }
        } else {
            let tmp_name = self.fresh("tmp");
            let tmp = self.churn.join(tmp_name);
            let f = File::create(&tmp)?;
            // Written out of order: the tail first, then the head.
            let mid = len / 2;
            f.write_all_at(&data[mid..], mid as u64)?;
            f.write_all_at(&data[..mid], 0)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &dst)?;
        }
        fsync_dir(&self.keep.join(&dir))?;
        self.record(key, Entry::File { seed, len });
        Ok(())
    }

    /// Hard-links one of this cycle's durable files to a new durable name.
    fn durable_link(&mut self) -> io::Result<()> {
        let Some(dir) = self.durable_dir.clone() else {
            return self.durable_file();
        };
        let prefix = format!("{dir}/");
        let candidates: Vec<(String, Entry)> = self
            .ledger
            .lock()
            .expect("ledger")
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, r)| match &r.state {
                State::Durable(e @ Entry::File { .. }) => Some((k.clone(), e.clone())),
                _ => None,
            })
            .collect();
        if candidates.is_empty() {
            return self.durable_file();
        }
        let (src, entry) = candidates[self.pick(candidates.len())].clone();
        let key = format!("{dir}/{}", self.fresh("l"));
        std::fs::hard_link(self.keep.join(&src), self.keep.join(&key))?;
        fsync_dir(&self.keep.join(&dir))?;
        self.record(key, entry);
        Ok(())
    }

    fn durable_symlink(&mut self) -> io::Result<()> {
        let dir = self.durable_parent()?;
        let key = format!("{dir}/{}", self.fresh("s"));
        // Short targets stay inline in the inode; long ones take a data block.
        let reps = if self.rng.below(3) == 0 { 200 } else { 1 };
        let target = format!("target-{}-{}", self.rng.next_u64(), "x".repeat(reps));
        std::os::unix::fs::symlink(&target, self.keep.join(&key))?;
        fsync_dir(&self.keep.join(&dir))?;
        self.record(key, Entry::Symlink(target));
        Ok(())
    }

    /// Removes up to `RETIRE_BATCH` of this worker's durable names from old enough cycles,
    /// then fsyncs their directories.
    fn retire(&mut self) -> io::Result<()> {
        let batch: Vec<(String, Entry)> = {
            let ledger = self.ledger.lock().expect("ledger");
            ledger
                .iter()
                .filter(|(k, r)| {
                    r.owner == self.id
                        && r.cycle + RETIRE_AFTER <= self.cycle
                        && matches!(r.state, State::Durable(_))
                        // A directory goes only once nothing under it is left.
                        && (!matches!(r.state, State::Durable(Entry::Dir))
                            || !ledger.keys().any(|o| o.starts_with(&format!("{k}/"))))
                })
                .take(RETIRE_BATCH)
                .filter_map(|(k, r)| match &r.state {
                    State::Durable(e) => Some((k.clone(), e.clone())),
                    _ => None,
                })
                .collect()
        };
        let set = |key: &str, s: State| {
            if let Some(r) = self.ledger.lock().expect("ledger").get_mut(key) {
                r.state = s;
            }
        };
        let mut parents = Vec::new();
        for (key, entry) in &batch {
            set(key, State::Retiring(entry.clone()));
            let path = self.keep.join(key);
            if *entry == Entry::Dir {
                std::fs::remove_dir(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
            let parent = path.parent().expect("under keep").to_path_buf();
            if !parents.contains(&parent) {
                parents.push(parent);
            }
        }
        for p in &parents {
            fsync_dir(p)?;
        }
        for (key, _) in &batch {
            set(key, State::Gone);
        }
        Ok(())
    }

    /// One unacknowledged metadata or data operation in the worker's own directory.
    fn churn_step(&mut self) -> (&'static str, io::Result<()>) {
        let c = self.churn.clone();
        let k = self.rng.below(100);
        if self.files.is_empty() || k < 20 {
            let parent = self.some_dir();
            let name = format!("{parent}{}", self.fresh("f"));
            let len = self.size();
            let data = self.rng.bytes(len);
            let r = std::fs::write(c.join(&name), &data);
            if r.is_ok() {
                self.files.push(name);
            }
            return ("create+write", r);
        }
        let fi = self.pick(self.files.len());
        let f = self.files[fi].clone();
        match k {
            20..=34 => {
                let len = self.rng.below(64 * 1024) as usize;
                let off = self.rng.below(256 * 1024);
                let data = self.rng.bytes(len);
                let r = OpenOptions::new()
                    .write(true)
                    .open(c.join(&f))
                    .and_then(|h| h.write_all_at(&data, off));
                // Dangling symlinks are in the list too.
                ("write", ignore(r))
            }
            35..=39 => {
                let r = OpenOptions::new()
                    .write(true)
                    .open(c.join(&f))
                    .and_then(|h| h.set_len(self.rng.below(200 * 1024)));
                ("truncate", ignore(r))
            }
            40..=52 => {
                // Rename, possibly over another file, possibly into a subdirectory.
                let to = if self.rng.below(3) == 0 && self.files.len() > 1 {
                    let i = self.pick(self.files.len());
                    self.files[i].clone()
                } else {
                    let parent = self.some_dir();
                    format!("{parent}{}", self.fresh("r"))
                };
                let r = std::fs::rename(c.join(&f), c.join(&to));
                if r.is_ok() && to != f {
                    self.files.retain(|x| *x != f && *x != to);
                    self.files.push(to);
                }
                ("rename", r)
            }
            53..=65 => {
                let r = std::fs::remove_file(c.join(&f));
                if r.is_ok() {
                    self.files.swap_remove(fi);
                }
                ("unlink", r)
            }
            66..=72 => {
                let name = self.fresh("d");
                let r = std::fs::create_dir(c.join(&name));
                if r.is_ok() {
                    self.dirs.push(name);
                }
                ("mkdir", r)
            }
            73..=77 => {
                let Some(di) = (!self.dirs.is_empty()).then(|| self.pick(self.dirs.len())) else {
                    return ("rmdir", Ok(()));
                };
                let d = self.dirs[di].clone();
                let prefix = format!("{d}/");
                // Unlinks its entries, then the directory itself.
                let r = std::fs::remove_dir_all(c.join(&d));
                if r.is_ok() {
                    self.files.retain(|x| !x.starts_with(&prefix));
                    self.dirs.swap_remove(di);
                }
                ("rmdir", r)
            }
            78..=85 => {
                let parent = self.some_dir();
                let name = format!("{parent}{}", self.fresh("h"));
                let r = std::fs::hard_link(c.join(&f), c.join(&name));
                if r.is_ok() {
                    self.files.push(name);
                }
                ("link", ignore(r))
            }
            86..=91 => {
                let parent = self.some_dir();
                let name = format!("{parent}{}", self.fresh("s"));
                let r = std::os::unix::fs::symlink(&f, c.join(&name));
                if r.is_ok() {
                    self.files.push(name);
                }
                ("symlink", r)
            }
            92..=95 => {
                let r = std::fs::read(c.join(&f)).map(|_| ());
                ("read", ignore(r))
            }
            _ => {
                let r = File::open(c.join(&f)).and_then(|h| h.sync_all());
                ("fsync", ignore(r))
            }
        }
    }

    /// "" or "dK/": where a new churn name goes.
    fn some_dir(&mut self) -> String {
        if self.dirs.is_empty() || self.rng.below(2) == 0 {
            String::new()
        } else {
            let i = self.pick(self.dirs.len());
            format!("{}/", self.dirs[i])
        }
    }
}

/// Treats the errors of a churn name that is a dangling or looping symlink as success:
/// the operation legitimately cannot apply.
fn ignore(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ELOOP)) => Ok(()),
        other => other,
    }
}

/// Checks every ledger entry against the mount and settles the uncertain ones.
fn verify_ledger(keep: &Path, ledger: &Ledger, ctx: &str) {
    let mut ledger = ledger.lock().expect("ledger");
    let mut settled = Vec::new();
    for (key, rec) in ledger.iter_mut() {
        let path = keep.join(key);
        let exists = std::fs::symlink_metadata(&path).is_ok();
        match rec.state.clone() {
            State::Durable(e) => check_entry(
                &path,
                &e,
                &format!("{ctx}: fsynced {key} (cycle {})", rec.cycle),
            ),
            State::Retiring(e) if exists => {
                check_entry(&path, &e, &format!("{ctx}: half-removed {key}"));
                rec.state = State::Durable(e);
            }
            State::Retiring(_) => settled.push(key.clone()),
            State::Gone => {
                assert!(
                    !exists,
                    "{ctx}: {key} was removed and its directory fsynced, yet it is back"
                );
                settled.push(key.clone());
            }
        }
    }
    for k in settled {
        ledger.remove(&k);
    }
}

fn check_entry(path: &Path, e: &Entry, what: &str) {
    let meta = std::fs::symlink_metadata(path).unwrap_or_else(|err| panic!("{what}: lost ({err})"));
    match e {
        Entry::File { seed, len } => {
            assert!(meta.is_file(), "{what}: not a regular file: {meta:?}");
            let got = std::fs::read(path).unwrap_or_else(|err| panic!("{what}: read: {err}"));
            assert_eq!(got.len(), *len, "{what}: wrong size");
            let want = content(*seed, *len);
            if got != want {
                panic!("{what}: {}", describe_difference(&got, &want));
            }
        }
        Entry::Symlink(t) => {
            assert!(meta.file_type().is_symlink(), "{what}: not a symlink");
            let got = std::fs::read_link(path).unwrap_or_else(|err| panic!("{what}: {err}"));
            assert_eq!(got, Path::new(t), "{what}: wrong target");
        }
        Entry::Dir => assert!(meta.is_dir(), "{what}: not a directory"),
    }
}

/// Which 4 KiB blocks of a file differ from what was written, and what they hold instead
/// (zeros, or data found at another block of the same file), so a failure says what
/// kind of loss it was.
fn describe_difference(got: &[u8], want: &[u8]) -> String {
    const BLOCK: usize = 4096;
    let mut bad = Vec::new();
    for (i, (g, w)) in got.chunks(BLOCK).zip(want.chunks(BLOCK)).enumerate() {
        if g != w {
            let what = if g.iter().all(|&b| b == 0) {
                "zeros".to_string()
            } else if let Some(j) = want.chunks(BLOCK).position(|c| c == g) {
                format!("block {j}'s data")
            } else {
                let at = g.iter().zip(w).position(|(a, b)| a != b).unwrap_or(0);
                format!("other data from byte {at} of the block")
            };
            bad.push(format!("{i}: {what}"));
        }
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    format!(
        "contents differ from byte {first}; {} of {} blocks differ [{}]",
        bad.len(),
        want.len().div_ceil(BLOCK),
        bad.join(", ")
    )
}

/// Removes everything under `keep/` that the ledger does not name (steps a crash cut
/// short before their fsync), so the image does not fill up over many cycles.
fn prune_keep(keep: &Path, ledger: &Ledger) {
    let ledger = ledger.lock().expect("ledger");
    for top in std::fs::read_dir(keep).expect("readdir keep").flatten() {
        let name = top.file_name().to_string_lossy().into_owned();
        let path = top.path();
        if !ledger.contains_key(&name) {
            if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(&path).expect("remove stray durable dir");
            } else {
                std::fs::remove_file(&path).expect("remove stray durable file");
            }
            continue;
        }
        if !path.is_dir() {
            continue;
        }
        for e in std::fs::read_dir(&path).expect("readdir").flatten() {
            let key = format!("{name}/{}", e.file_name().to_string_lossy());
            if !ledger.contains_key(&key) {
                std::fs::remove_file(e.path()).expect("remove stray durable file");
            }
        }
    }
}

/// Reads every file of a directory tree (nothing may fail), then removes the tree.
fn read_and_remove_tree(dir: &Path) {
    fn walk(p: &Path) {
        for e in std::fs::read_dir(p).unwrap_or_else(|e| panic!("readdir {p:?}: {e}")) {
            let e = e.expect("dir entry");
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                walk(&e.path());
            } else if ft.is_file() {
                std::fs::read(e.path()).unwrap_or_else(|err| panic!("read {:?}: {err}", e.path()));
            }
        }
    }
    if dir.exists() {
        walk(dir);
        std::fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("rm -r {dir:?}: {e}"));
    }
}

/// The stack's processes, found by name among the supervisor's children.
fn stack(m: &Mount) -> (i32, i32, i32) {
    m.stack_pids()
        .expect("fsd serve and blockdev serve are running")
}

/// Writes `data` to a new file at `path` and fsyncs it.
fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    std::fs::write(path, data)?;
    File::open(path)?.sync_all()
}

/// How long the workload keeps running after a recovered crash.
const AFTER_RECOVERY: Duration = Duration::from_millis(300);
/// A recovered cycle ends with an unmount, fsck and remount every this many cycles.
const REMOUNT_EVERY: u32 = 5;

/// Runs `kills` crash cycles on one image, killing one of `victims` each time.
fn campaign(tag: &str, victims: &[Victim], kills: u32) {
    let seed = seed_from_env("MOLT_CRASH_SEED");
    eprintln!("crash::{tag}: seed {seed} (replay with MOLT_CRASH_SEED={seed}), {kills} kills");
    let mut rng = TestRng::new(seed);
    let img = TestImage::new(tag, "128M");
    let keep_rel = Path::new("keep");
    let ledger: Ledger = Arc::new(Mutex::new(BTreeMap::new()));
    let mut m = img.mount();
    std::fs::create_dir(m.path().join(keep_rel)).expect("mkdir keep");
    fsync_dir(m.path()).expect("fsync root");
    let started = Instant::now();
    for cycle in 1..=kills {
        let mnt = m.path().to_path_buf();
        let keep = mnt.join(keep_rel);
        let (sup, server, driver) = stack(&m);
        let stop = Arc::new(AtomicBool::new(false));
        let killed = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        for id in 0..WORKERS {
            let w = Worker {
                id,
                cycle,
                rng: TestRng::new(seed ^ (u64::from(cycle) << 32) ^ id as u64),
                churn: mnt.join(format!("c{cycle}w{id}")),
                keep: keep.clone(),
                durable_dir: None,
                files: Vec::new(),
                dirs: Vec::new(),
                next: 0,
                ledger: ledger.clone(),
            };
            let (tx, stop, killed) = (tx.clone(), stop.clone(), killed.clone());
            std::thread::spawn(move || {
                let (op, e) = w.run(&stop);
                let _ = tx.send((id, op, e, killed.load(Ordering::SeqCst)));
            });
        }
        drop(tx);
        let victim = victims[rng.below(victims.len() as u64) as usize];
        let delay = Duration::from_millis(30 + rng.below(700));
        let ctx = format!("crash::{tag} seed {seed} cycle {cycle}: kill -9 {victim:?}");
        // Nothing may fail before the kill.
        if let Ok((id, op, e, _)) = rx.recv_timeout(delay) {
            stop.store(true, Ordering::SeqCst);
            panic!("{ctx}: worker {id} failed before the kill: {op}: {e}");
        }
        killed.store(true, Ordering::SeqCst);
        let pid = match victim {
            Victim::Supervisor => sup,
            Victim::Server => server,
            Victim::Driver => driver,
        };
        kill9(pid);
        let kill_at = Instant::now();
        // Every component is recovered, the supervisor included (a new one adopts the
        // running server and driver).
        m = recovered_cycle(m, &img, &ctx, pid, &rx, &stop, kill_at);
        let keep = m.path().join(keep_rel);
        verify_ledger(&keep, &ledger, &ctx);
        for id in 0..WORKERS {
            read_and_remove_tree(&m.path().join(format!("c{cycle}w{id}")));
        }
        prune_keep(&keep, &ledger);
        eprintln!(
            "{ctx}: recovered, no workload error; ledger {} entries; {:?} so far",
            ledger.lock().expect("ledger").len(),
            started.elapsed()
        );
        if cycle % REMOUNT_EVERY == 0 {
            m.unmount();
            img.assert_clean();
            m = img.mount();
        }
    }
    // A clean unmount after all that, and everything is still there.
    m.unmount();
    img.assert_clean();
    let m = img.mount();
    verify_ledger(
        &m.path().join(keep_rel),
        &ledger,
        &format!("crash::{tag} final"),
    );
    let st = std::fs::metadata(m.path().join(keep_rel)).expect("keep");
    assert!(st.nlink() >= 2);
    m.unmount();
    img.assert_clean();
}

/// After the supervisor, the filesystem server or the block driver was killed: the
/// workload keeps running without an error, the dead process is replaced, and nothing
/// acknowledged is lost.
fn recovered_cycle(
    m: Mount,
    img: &TestImage,
    ctx: &str,
    killed_pid: i32,
    rx: &mpsc::Receiver<(usize, &'static str, io::Error, bool)>,
    stop: &AtomicBool,
    kill_at: Instant,
) -> Mount {
    let _ = img;
    // The workload goes on through the recovery; no step may fail.
    if let Ok((id, op, e, _)) = rx.recv_timeout(AFTER_RECOVERY) {
        stop.store(true, Ordering::SeqCst);
        panic!("{ctx}: worker {id} failed across the recovery: {op}: {e}");
    }
    stop.store(true, Ordering::SeqCst);
    for _ in 0..WORKERS {
        let left = WORKLOAD_DEADLINE.saturating_sub(kill_at.elapsed());
        match rx.recv_timeout(left) {
            Ok((id, op, e, _)) => assert_eq!(
                e.raw_os_error(),
                Some(libc::ECANCELED),
                "{ctx}: worker {id} failed across the recovery: {op}: {e}"
            ),
            Err(_) => {
                abort_connection(m.path());
                panic!(
                    "{ctx}: workload syscalls still blocked {WORKLOAD_DEADLINE:?} after the kill"
                );
            }
        }
    }
    assert!(
        poll_until(STACK_DEADLINE, || !alive(killed_pid)),
        "{ctx}: the killed process {killed_pid} is still there"
    );
    // A whole stack again, without the killed process: a replaced component, or a new
    // supervisor that adopted the running ones.
    let replaced = poll_until(STACK_DEADLINE, || {
        m.stack_pids().is_some_and(|(sup, server, driver)| {
            alive(sup) && ![sup, server, driver].contains(&killed_pid)
        })
    });
    assert!(
        replaced,
        "{ctx}: no replacement for {killed_pid}: {:?}",
        m.stack_pids()
    );
    assert!(is_mounted(m.path()), "{ctx}: the mount is gone");
    m
}

/// SIGKILL of the supervisor, the filesystem server or the block driver at random
/// moments: each is recovered (a dead supervisor by a new one that adopts the running
/// components), the workload sees no error, the mount never goes away, no acknowledged
/// write is lost, and no process is left behind.
#[test]
fn kill9_of_any_component_loses_no_fsynced_write() {
    campaign(
        "kill-any",
        &[Victim::Supervisor, Victim::Server, Victim::Driver],
        kills(),
    );
}

/// Files and directories held open across a server crash keep working through the
/// same descriptors, and what was acknowledged (not fsynced) is there.
#[test]
fn open_files_survive_a_server_crash() {
    use std::io::{Read, Seek, SeekFrom};
    let img = TestImage::new("kill-server-open", "64M");
    let m = img.mount();
    let dir = m.path().join("d");
    std::fs::create_dir(&dir).expect("mkdir");
    for i in 0..50 {
        std::fs::write(dir.join(format!("e{i}")), format!("entry {i}")).expect("write");
    }
    let mut held = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path().join("held"))
        .expect("open");
    held.write_all(b"before the crash;").expect("write");
    let mut listing = std::fs::read_dir(&dir).expect("opendir");
    let first = listing.next().expect("an entry").expect("readdir");
    let (_, server, _) = stack(&m);
    kill9(server);
    // Acknowledged, never fsynced: still there.
    for i in 0..50 {
        assert_eq!(
            std::fs::read_to_string(dir.join(format!("e{i}"))).expect("read after the crash"),
            format!("entry {i}")
        );
    }
    held.write_all(b" after it.")
        .expect("write through the held descriptor");
    held.sync_all().expect("fsync through the held descriptor");
    held.seek(SeekFrom::Start(0)).expect("seek");
    let mut back = String::new();
    held.read_to_string(&mut back)
        .expect("read through the held descriptor");
    assert_eq!(back, "before the crash; after it.");
    // The directory stream opened before the crash goes on.
    let mut rest = 0;
    for e in listing {
        e.expect("readdir after the crash");
        rest += 1;
    }
    assert!(rest > 0, "{first:?} was the only entry listed");
    let (sup, new_server, _) = stack(&m);
    assert!(alive(sup) && new_server != server);
    // `updater status` lists the recovery with the updates.
    let st = updater(&[
        "status",
        "--mount",
        m.path().to_str().expect("utf-8"),
        "--json",
    ]);
    assert!(st.status.success());
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).expect("status JSON");
    let last = &st["history"][0];
    assert_eq!(last["nature"], "crash-recovery", "{st}");
    let msg = last["message"].as_str().unwrap_or_default();
    assert!(msg.contains(&format!("fsd (pid {server}) died")), "{msg}");
    // A directory entry keeps its stream open.
    drop((held, first));
    m.unmount();
    img.assert_clean();
}

/// A request the server completed and died before answering is resent by the kernel and
/// answered without running again: the mkdir does not fail with EEXIST, the unlink and the
/// rename not with ENOENT. (`MOLT_FAULT_DIE_AFTER` makes the server die at that point.)
#[test]
fn a_completed_request_resent_after_a_crash_runs_once() {
    for op in ["mkdir", "unlink", "rename"] {
        let name = format!("die-after-{op}");
        let img = TestImage::new(&format!("resend-{op}"), "64M");
        let m = img.mount_with(&[], &[("MOLT_FAULT_DIE_AFTER", Path::new(&name))]);
        let (sup, server, _) = stack(&m);
        let path = m.path().join(&name);
        if op != "mkdir" {
            std::fs::write(&path, b"x").expect("create");
        }
        match op {
            "mkdir" => std::fs::create_dir(&path).expect("mkdir across the crash"),
            "unlink" => std::fs::remove_file(&path).expect("unlink across the crash"),
            _ => std::fs::rename(&path, m.path().join("renamed")).expect("rename across the crash"),
        }
        assert!(!alive(server), "{op}: the server did not die at the fault");
        let (sup2, server2, _) = stack(&m);
        assert!(sup2 == sup && server2 != server, "{op}: not recovered");
        match op {
            "mkdir" => assert!(path.is_dir()),
            "unlink" => assert!(!path.exists()),
            _ => {
                assert!(!path.exists());
                assert_eq!(std::fs::read(m.path().join("renamed")).expect("read"), b"x");
            }
        }
        m.unmount();
        img.assert_clean();
    }
}

/// The block driver dies on an idle mount: a new one takes over and everything,
/// fsync included, works.
#[test]
fn kill9_of_the_block_driver_is_recovered() {
    let img = TestImage::new("kill-driver", "64M");
    let m = img.mount();
    write_synced(&m.path().join("f"), b"durable").expect("a durable file");
    let (sup, _, driver) = stack(&m);
    kill9(driver);
    write_synced(&m.path().join("g"), b"x").expect("write and fsync after the driver died");
    assert_eq!(std::fs::read(m.path().join("f")).expect("read"), b"durable");
    let (sup2, _, driver2) = stack(&m);
    assert_eq!(sup, sup2);
    assert_ne!(driver, driver2, "the dead driver was not replaced");
    m.unmount();
    img.assert_clean();
}

/// A server that keeps dying is not restarted forever: the stack goes down and the
/// image is still recoverable.
#[test]
fn a_crash_loop_takes_the_stack_down() {
    let img = TestImage::new("crash-loop", "64M");
    let m = img.mount();
    write_synced(&m.path().join("f"), b"durable").expect("a durable file");
    let (sup, _, _) = stack(&m);
    let mut replaced = 0;
    for _ in 0..10 {
        if !alive(sup) {
            break;
        }
        let (_, server, _) = stack(&m);
        kill9(server);
        // Wait for the replacement (or the end of the stack).
        poll_until(STACK_DEADLINE, || {
            !alive(sup) || m.stack_pids().is_some_and(|(_, f, _)| f != server)
        });
        if alive(sup) {
            replaced += 1;
            // Served by the replacement.
            assert_eq!(std::fs::read(m.path().join("f")).expect("read"), b"durable");
        }
    }
    assert_eq!(replaced, 5, "recoveries before the stack went down");
    assert!(
        poll_until(STACK_DEADLINE, || !alive(sup)),
        "the supervisor restarts a crashing server forever"
    );
    assert!(poll_until(Duration::from_secs(10), || !is_mounted(
        m.path()
    )));
    let mnt = m.path().to_path_buf();
    drop(m);
    img.assert_clean();
    let m = Mount::new(&img.image, &mnt);
    assert_eq!(std::fs::read(m.path().join("f")).expect("read"), b"durable");
    m.unmount();
}
