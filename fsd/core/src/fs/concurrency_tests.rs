//! Concurrency tests of the filesystem core: several threads run mixed operations at once
//! (creates, writes at random offsets, reads, truncates, renames, unlinks, directories),
//! each in a namespace of its own and in one directory they all share, while checkpoints
//! run in the background. Each thread keeps a sequential model of what it did; since the
//! threads' names never meet, every interleaving must leave exactly the union of the
//! models, and every read a thread makes must match its model at that moment. With power
//! cuts taken at a random I/O of such a run, whichever thread issues it, the image must
//! check clean and hold every file whose fsync had returned; the same with the cut a
//! process kill (every write made so far stays), whose successor recovers from the image
//! and the redo log as the kill left them, and with a server killed between operations.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use formats::block::Ino;
use formats::inode::S_IFREG;
use formats::superblock::ROOT_INO;

use super::crash_tests::{assert_clean, KilledRegion, LedgerCutStore, Rng};
use super::tests::fresh;
use super::*;
use crate::store::{BlockStore, MemStore};

const THREADS: usize = 4;

/// Where a thread's names live: its own directory, or the shared one (names there carry
/// the thread's prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Place {
    Own,
    Shared,
}

/// One thread's sequential model: file contents by (place, name), and the
/// subdirectories of its own directory.
#[derive(Debug, Default)]
struct Model {
    files: BTreeMap<(Place, String), Vec<u8>>,
    subdirs: BTreeSet<String>,
}

struct Worker {
    id: usize,
    rng: Rng,
    own: Ino,
    shared: Ino,
    model: Model,
    next: u64,
}

fn bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    let seed = rng.below(u64::MAX);
    (0..len).map(|i| (seed as usize + i * 13) as u8).collect()
}

impl Worker {
    fn dir(&self, p: Place) -> Ino {
        match p {
            Place::Own => self.own,
            Place::Shared => self.shared,
        }
    }

    fn fresh_name(&mut self, p: Place) -> (Place, String) {
        self.next += 1;
        (p, format!("t{}-f{}", self.id, self.next))
    }

    fn place(&mut self) -> Place {
        if self.rng.below(2) == 0 {
            Place::Own
        } else {
            Place::Shared
        }
    }

    /// A file of the model, at random.
    fn pick(&mut self) -> Option<(Place, String)> {
        let n = self.model.files.len() as u64;
        if n == 0 {
            return None;
        }
        let i = self.rng.below(n) as usize;
        self.model.files.keys().nth(i).cloned()
    }

    fn ino(&self, fs: &Fs, key: &(Place, String)) -> Ino {
        fs.lookup(self.dir(key.0), key.1.as_bytes())
            .unwrap_or_else(|e| panic!("thread {}: {key:?} not found: {e}", self.id))
            .ino
    }

    /// A file created, written and fsynced, never touched again: durable from here on.
    fn durable_file(&mut self, fs: &Fs) -> (String, Vec<u8>) {
        self.next += 1;
        let name = format!("t{}-durable{}", self.id, self.next);
        let len = self.rng.below(12_000) as usize + 1;
        let data = bytes(&mut self.rng, len);
        let a = fs
            .mknod(self.own, name.as_bytes(), S_IFREG | 0o644, 0, 0, 0)
            .unwrap();
        fs.write(a.ino, 0, &data).unwrap();
        fs.fsync(a.ino).unwrap();
        (name, data)
    }

    /// One random operation, applied to the filesystem and to the model. Durable files
    /// (returned when one is made) are not in the model's mutable set.
    fn step(&mut self, fs: &Fs) -> Option<(String, Vec<u8>)> {
        match self.rng.below(10) {
            0 | 1 => {
                let p = self.place();
                let key = self.fresh_name(p);
                let len = self.rng.below(20_000) as usize + 1;
                let data = bytes(&mut self.rng, len);
                let a = fs
                    .mknod(self.dir(p), key.1.as_bytes(), S_IFREG | 0o644, 0, 0, 0)
                    .unwrap();
                fs.write(a.ino, 0, &data).unwrap();
                self.model.files.insert(key, data);
            }
            2 => {
                let key = self.pick()?;
                let ino = self.ino(fs, &key);
                let len = self.model.files[&key].len() as u64;
                let off = self.rng.below(len + 1);
                let n = self.rng.below(8192) as usize + 1;
                let data = bytes(&mut self.rng, n);
                fs.write(ino, off, &data).unwrap();
                let f = self.model.files.get_mut(&key).expect("picked");
                let end = off as usize + n;
                if f.len() < end {
                    f.resize(end, 0);
                }
                f[off as usize..end].copy_from_slice(&data);
            }
            3 => {
                let key = self.pick()?;
                let ino = self.ino(fs, &key);
                let want = &self.model.files[&key];
                let got = fs.read(ino, 0, want.len() as u32 + 4096).unwrap();
                assert!(
                    &got == want,
                    "thread {}: {key:?} reads {} bytes unlike its model's {}",
                    self.id,
                    got.len(),
                    want.len()
                );
            }
            4 => {
                let key = self.pick()?;
                let ino = self.ino(fs, &key);
                let len = self.model.files[&key].len() as u64;
                let size = self.rng.below(len + 4096);
                fs.setattr(
                    ino,
                    SetAttr {
                        size: Some(size),
                        ..SetAttr::default()
                    },
                )
                .unwrap();
                self.model
                    .files
                    .get_mut(&key)
                    .expect("picked")
                    .resize(size as usize, 0);
            }
            5 => {
                // Rename to a fresh name, or over another of this thread's files.
                let from = self.pick()?;
                let to = match self.pick().filter(|t| *t != from && self.rng.below(3) == 0) {
                    Some(t) => t,
                    None => {
                        let p = self.place();
                        self.fresh_name(p)
                    }
                };
                let replaced = fs
                    .rename(
                        self.dir(from.0),
                        from.1.as_bytes(),
                        self.dir(to.0),
                        to.1.as_bytes(),
                        false,
                        false,
                    )
                    .unwrap();
                if let Some(gone) = replaced {
                    fs.release(gone).unwrap();
                }
                let data = self.model.files.remove(&from).expect("picked");
                self.model.files.insert(to, data);
            }
            6 => {
                let key = self.pick()?;
                let ino = fs.unlink(self.dir(key.0), key.1.as_bytes()).unwrap();
                fs.release(ino).unwrap();
                self.model.files.remove(&key);
            }
            7 => {
                let name = format!("t{}-sub{}", self.id, self.rng.below(6));
                if self.model.subdirs.remove(&name) {
                    fs.rmdir(self.own, name.as_bytes()).unwrap();
                } else {
                    fs.mkdir(self.own, name.as_bytes(), 0o755, 0, 0).unwrap();
                    self.model.subdirs.insert(name);
                }
            }
            8 => {
                let key = self.pick()?;
                let ino = self.ino(fs, &key);
                fs.fsync(ino).unwrap();
            }
            _ => return Some(self.durable_file(fs)),
        }
        None
    }
}

/// The names in `dir` and, for regular files, their contents.
fn listing(fs: &Fs, dir: Ino) -> BTreeMap<String, Option<Vec<u8>>> {
    fs.readdir(dir)
        .unwrap()
        .into_iter()
        .filter(|e| e.name != b"." && e.name != b"..")
        .map(|e| {
            let a = fs.getattr(e.ino).unwrap();
            let content = (a.mode & formats::inode::S_IFMT == S_IFREG)
                .then(|| fs.read(e.ino, 0, a.size as u32 + 1).unwrap());
            (String::from_utf8_lossy(&e.name).into_owned(), content)
        })
        .collect()
}

/// Checks the filesystem against the union of the workers' models and the durable files.
fn matches_models(fs: &Fs, workers: &[Worker], durable: &HashMap<String, Vec<u8>>, when: &str) {
    let mut shared_want = BTreeMap::new();
    for w in workers {
        let mut own_want = BTreeMap::new();
        for ((p, name), data) in &w.model.files {
            let m = match p {
                Place::Own => &mut own_want,
                Place::Shared => &mut shared_want,
            };
            m.insert(name.clone(), Some(data.clone()));
        }
        for d in &w.model.subdirs {
            own_want.insert(d.clone(), None);
        }
        let prefix = format!("t{}-durable", w.id);
        for (name, data) in durable.iter().filter(|(n, _)| n.starts_with(&prefix)) {
            own_want.insert(name.clone(), Some(data.clone()));
        }
        let own = listing(fs, w.own);
        assert_eq!(
            own.keys().collect::<Vec<_>>(),
            own_want.keys().collect::<Vec<_>>(),
            "{when}: thread {}'s directory",
            w.id
        );
        for (name, want) in &own_want {
            assert!(
                &own[name] == want,
                "{when}: thread {} file {name}: content differs from the model",
                w.id
            );
        }
    }
    let shared = listing(fs, workers[0].shared);
    assert_eq!(
        shared.keys().collect::<Vec<_>>(),
        shared_want.keys().collect::<Vec<_>>(),
        "{when}: the shared directory"
    );
    for (name, want) in &shared_want {
        assert!(
            &shared[name] == want,
            "{when}: shared file {name}: content differs from the model"
        );
    }
}

/// Sets up the directories and the workers (one per thread, seeded from `seed`).
fn workers(fs: &Fs, seed: u64) -> Vec<Worker> {
    let shared = fs.mkdir(ROOT_INO, b"shared", 0o755, 0, 0).unwrap().ino;
    (0..THREADS)
        .map(|id| Worker {
            id,
            rng: Rng((seed ^ (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1),
            own: fs
                .mkdir(ROOT_INO, format!("t{id}").as_bytes(), 0o755, 0, 0)
                .unwrap()
                .ino,
            shared,
            model: Model::default(),
            next: 0,
        })
        .collect()
}

/// Runs checkpoints in the background until `stop`, as the server does.
pub(super) fn checkpointer(fs: &Arc<Fs>, stop: &Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    fs.checkpoint_in_background_from_now();
    let (fs, stop) = (fs.clone(), stop.clone());
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            fs.lock().checkpoint_due = true;
            fs.checkpoint_in_background(&|| stop.load(Ordering::Relaxed))
                .unwrap();
            std::thread::yield_now();
        }
    })
}

#[test]
fn concurrent_mixed_operations_match_a_sequential_model() {
    let runs: u64 = std::env::var("MOLT_CONCURRENCY_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    for run in 0..runs {
        let store = fresh(32_768);
        let fs = Arc::new(Fs::mount(store.clone() as Arc<dyn BlockStore>).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let background = checkpointer(&fs, &stop);
        let handles: Vec<_> = workers(&fs, 0xC0FF_EE00 + run)
            .into_iter()
            .map(|mut w| {
                let fs = fs.clone();
                std::thread::spawn(move || {
                    let mut durable = HashMap::new();
                    for _ in 0..400 {
                        if let Some((name, data)) = w.step(&fs) {
                            durable.insert(name, data);
                        }
                    }
                    (w, durable)
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut durable = HashMap::new();
        for h in handles {
            let (w, d) = h.join().expect("a worker panicked");
            all.push(w);
            durable.extend(d);
        }
        stop.store(true, Ordering::Relaxed);
        background.join().unwrap();
        matches_models(&fs, &all, &durable, &format!("run {run}, mounted"));
        let fs = Arc::into_inner(fs).expect("the only reference");
        fs.unmount().unwrap();
        assert_clean(store.as_ref(), &format!("run {run}, after unmount"));
        let fs = Fs::mount(store.clone() as Arc<dyn BlockStore>).unwrap();
        matches_models(&fs, &all, &durable, &format!("run {run}, remounted"));
        fs.unmount().unwrap();
    }
}

#[test]
fn power_cuts_during_a_concurrent_run_lose_nothing_fsynced() {
    cuts_during_concurrent_runs(false);
}

/// The same with the cut a process kill: the image holds every write made before it, and
/// in half the runs the successor recovers with the redo log as the kill left it (the
/// server's recovery), in the others without (a mount after the stack went down).
#[test]
fn kills_during_a_concurrent_run_lose_nothing_fsynced() {
    cuts_during_concurrent_runs(true);
}

fn cuts_during_concurrent_runs(kill: bool) {
    let runs: u64 = std::env::var("MOLT_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    for run in 0..runs {
        let mut rng = Rng(0xFEED_FACE_CAFE_BEEF ^ (run + 1).wrapping_mul(0x0123_4567));
        let (mem, cut_at) = (fresh(32_768), 200 + rng.below(4000));
        let store = Arc::new(if kill {
            LedgerCutStore::killing(mem, cut_at, &mut rng)
        } else {
            LedgerCutStore::new(mem, cut_at, &mut rng)
        });
        let fs = Arc::new(Fs::mount(store.clone() as Arc<dyn BlockStore>).unwrap());
        let mut left_by_kill = None;
        if run % 2 == 1 {
            // As in the server: every operation's changes are staged when it completes.
            let (region, left) = KilledRegion::new(store.clone(), 4 << 20);
            fs.attach_redo_log(redo::RedoLog::new(Box::new(region)).unwrap());
            left_by_kill = kill.then_some(left);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let background = checkpointer(&fs, &stop);
        let handles: Vec<_> = workers(&fs, rng.below(u64::MAX))
            .into_iter()
            .map(|mut w| {
                let (fs, store) = (fs.clone(), store.clone());
                std::thread::spawn(move || {
                    while !store.is_cut() {
                        if let Some((name, data)) = w.step(&fs) {
                            // Published only after the fsync returned.
                            store.publish(name, data);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("a worker panicked");
        }
        stop.store(true, Ordering::Relaxed);
        background.join().unwrap();
        drop(fs);
        let (image, durable) = store.take_cut();
        let how = if kill { "killed" } else { "cut" };
        let when = format!("run {run}, {how} at I/O {}", store.cut_at());
        let after = Arc::new(MemStore::from_image(image));
        let fs = match left_by_kill {
            Some(left) => {
                let region = left.lock().unwrap().take().expect("the region at the kill");
                let (fs, _) = Fs::recover(
                    after.clone() as Arc<dyn BlockStore>,
                    redo::RedoLog::new(Box::new(region)).unwrap(),
                )
                .unwrap_or_else(|e| panic!("{when}: recovery with the redo log: {e}"));
                assert_clean(after.as_ref(), &format!("{when}, recovered"));
                fs
            }
            None => {
                assert_clean(after.as_ref(), &format!("{when}, before mount"));
                Fs::mount(after.clone() as Arc<dyn BlockStore>)
                    .unwrap_or_else(|e| panic!("{when}: mount after the cut: {e}"))
            }
        };
        assert_durable(&fs, &durable, &when);
        fs.unmount().unwrap();
        assert_clean(after.as_ref(), &format!("{when}, after recovery"));
    }
}

/// A server killed at a random moment of a concurrent run (the filesystem lock free):
/// its successor recovers from the image and the redo log as they were, the image
/// checks clean and holds every file whose fsync had returned.
#[test]
fn a_server_killed_during_a_concurrent_run_recovers_clean() {
    let runs: u64 = std::env::var("MOLT_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    for run in 0..runs {
        let mut rng = Rng(0xABCD_EF01_2345_6789 ^ (run + 1).wrapping_mul(0x0765_4321));
        let mem = fresh(32_768);
        let fs = Arc::new(Fs::mount(mem.clone() as Arc<dyn BlockStore>).unwrap());
        fs.attach_redo_log(redo::RedoLog::new(Box::new(vec![0u8; 4 << 20])).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let background = checkpointer(&fs, &stop);
        let published = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let handles: Vec<_> = workers(&fs, rng.below(u64::MAX))
            .into_iter()
            .map(|mut w| {
                let (fs, stop, published) = (fs.clone(), stop.clone(), published.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Some((name, data)) = w.step(&fs) {
                            published.lock().unwrap().insert(name, data);
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(5 + rng.below(400)));
        let (image, region, durable) = {
            let g = fs.lock();
            let durable = published.lock().unwrap().clone();
            let region = g.redo.as_ref().expect("attached").region_copy();
            (mem.image(), region, durable)
        };
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().expect("a worker panicked");
        }
        background.join().unwrap();
        drop(fs);
        let when = format!("run {run}, killed");
        let after = Arc::new(MemStore::from_image(image));
        let (fs, _) = Fs::recover(
            after.clone() as Arc<dyn BlockStore>,
            redo::RedoLog::new(Box::new(region)).unwrap(),
        )
        .unwrap_or_else(|e| panic!("{when}: recovery: {e}"));
        assert_clean(after.as_ref(), &format!("{when}, recovered"));
        assert_durable(&fs, &durable, &when);
        fs.unmount().unwrap();
        assert_clean(after.as_ref(), &format!("{when}, after unmount"));
    }
}

/// Every file whose fsync returned (`t<id>-...` in directory `t<id>`) is there whole.
fn assert_durable(fs: &Fs, durable: &HashMap<String, Vec<u8>>, when: &str) {
    for (name, data) in durable {
        let id: usize = name[1..name.find('-').expect("t<id>-")]
            .parse()
            .expect("thread id");
        let dir = fs
            .lookup(ROOT_INO, format!("t{id}").as_bytes())
            .unwrap()
            .ino;
        let a = fs
            .lookup(dir, name.as_bytes())
            .unwrap_or_else(|e| panic!("{when}: {name} lost: {e}"));
        assert!(
            &fs.read(a.ino, 0, data.len() as u32 + 1).unwrap() == data,
            "{when}: {name} content"
        );
    }
}
