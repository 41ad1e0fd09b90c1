//! Power-cut tests: a metadata-heavy workload on a store that forgets, reorders or tears
//! every write not covered by a completed flush. After each cut the image must mount,
//! check clean, and hold every file whose fsync completed.

use std::collections::HashMap;
use std::sync::Arc;

use formats::inode::S_IFREG;
use formats::superblock::ROOT_INO;

use super::tests::fresh;
use super::*;
use crate::fsck::{check, FsckOptions};
use crate::store::{BlockStore, MemStore};

pub(super) struct Rng(pub(super) u64);
impl Rng {
    pub(super) fn below(&mut self, k: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % k.max(1)
    }
}

fn content(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as usize * 31 + i * 7) as u8)
        .collect()
}

/// Runs `ops` random operations, recording in the ledger each file whose fsync returned.
fn workload(
    fs: &Fs,
    rng: &mut Rng,
    ops: u64,
    ledger: &mut HashMap<String, Vec<u8>>,
    serial: &mut u64,
    delete_ledger_files: bool,
) {
    let dirs = [
        ROOT_INO,
        fs.lookup(ROOT_INO, b"d").map(|a| a.ino).unwrap_or(ROOT_INO),
    ];
    for _ in 0..ops {
        *serial += 1;
        let dir = dirs[rng.below(2) as usize];
        match rng.below(7) {
            0 | 1 => {
                // Durable file: create, write, fsync, then it is in the ledger.
                let name = format!("ledger-{serial}");
                let data = content(*serial, rng.below(20000) as usize + 1);
                let a = fs
                    .mknod(ROOT_INO, name.as_bytes(), S_IFREG | 0o644, 0, 0, 0)
                    .unwrap();
                fs.write(a.ino, 0, &data).unwrap();
                fs.fsync(a.ino).unwrap();
                ledger.insert(name, data);
            }
            2 => {
                let name = format!("tmp-{}", rng.below(50));
                if let Ok(a) = fs.mknod(dir, name.as_bytes(), S_IFREG | 0o600, 0, 0, 0) {
                    fs.write(a.ino, rng.below(10000), &content(*serial, 5000))
                        .unwrap();
                }
            }
            3 => {
                let from = format!("tmp-{}", rng.below(50));
                let to = format!("tmp-{}", rng.below(50));
                if let Ok(Some(gone)) = fs.rename(
                    dir,
                    from.as_bytes(),
                    dirs[rng.below(2) as usize],
                    to.as_bytes(),
                    false,
                    false,
                ) {
                    fs.release(gone).unwrap();
                }
            }
            4 => {
                let name = format!("tmp-{}", rng.below(50));
                if let Ok(ino) = fs.unlink(dir, name.as_bytes()) {
                    if rng.below(2) == 0 {
                        fs.release(ino).unwrap();
                    }
                }
            }
            5 => {
                let name = format!("sub-{}", rng.below(10));
                if fs.mkdir(dir, name.as_bytes(), 0o755, 0, 0).is_err() {
                    let _ = fs.rmdir(dir, name.as_bytes());
                }
            }
            _ if delete_ledger_files => {
                if let Some(name) = ledger
                    .keys()
                    .nth(rng.below(ledger.len() as u64 + 1) as usize)
                    .cloned()
                {
                    // Forget the entry first: after a cut the file may or may not be gone.
                    ledger.remove(&name);
                    let ino = fs.unlink(ROOT_INO, name.as_bytes()).unwrap();
                    fs.release(ino).unwrap();
                }
            }
            _ => {}
        }
    }
}

pub(super) fn assert_clean(store: &dyn BlockStore, when: &str) {
    let report = check(store, &FsckOptions::default()).expect("fsck runs");
    assert!(
        report.is_clean(),
        "{when}: fsck found {:#?}",
        report.problems
    );
}

#[test]
fn power_cuts_lose_nothing_fsynced() {
    let runs: u64 = std::env::var("MOLT_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    for run in 0..runs {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((run + 1) * 0x1234_5678));
        let store = fresh(8192);
        let mut ledger = HashMap::new();
        let mut serial = 0;
        {
            let fs = Fs::mount(store.clone() as Arc<dyn BlockStore>).unwrap();
            fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).unwrap();
            let ops = 50 + rng.below(250);
            workload(&fs, &mut rng, ops, &mut ledger, &mut serial, true);
            // The power goes out here: the Fs is dropped without unmounting.
        }
        let image = store.crash_image(&mut |k| rng.below(k));
        let after = Arc::new(MemStore::from_image(image));
        assert_clean(after.as_ref(), &format!("run {run} before mount"));
        let fs = Fs::mount(after.clone() as Arc<dyn BlockStore>)
            .unwrap_or_else(|e| panic!("run {run}: mount after cut: {e}"));
        for (name, data) in &ledger {
            let a = fs
                .lookup(ROOT_INO, name.as_bytes())
                .unwrap_or_else(|e| panic!("run {run}: {name} lost: {e}"));
            assert_eq!(
                &fs.read(a.ino, 0, data.len() as u32 + 1).unwrap(),
                data,
                "run {run}: {name} content"
            );
        }
        // The mounted image keeps working after recovery.
        workload(&fs, &mut rng, 30, &mut ledger, &mut serial, true);
        fs.unmount().unwrap();
        assert_clean(after.as_ref(), &format!("run {run} after recovery"));
    }
}

/// The same with checkpoints running in the background, outside the lock, beside the
/// workload: the power goes out at a random I/O, whichever thread issues it (often in the
/// middle of a checkpoint's flushes, in-place writes or journal reset), and nothing
/// fsynced before the cut may be lost.
#[test]
fn power_cuts_during_background_checkpoints_lose_nothing_fsynced() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let runs: u64 = std::env::var("MOLT_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    for run in 0..runs {
        let mut rng = Rng(0x51AB_0C1E_D00D_F00D ^ ((run + 1) * 0x9876_5431));
        let cut_at = 20 + rng.below(1500);
        let store = Arc::new(LedgerCutStore::new(fresh(8192), cut_at, &mut rng));
        let fs = Arc::new(Fs::mount(store.clone() as Arc<dyn BlockStore>).unwrap());
        fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let checkpointer = super::concurrency_tests::checkpointer(&fs, &stop);
        let (mut ledger, mut serial) = (HashMap::new(), 0);
        while store.cut.lock().unwrap().is_none() {
            workload(&fs, &mut rng, 1, &mut ledger, &mut serial, false);
            // Published only after the fsyncs returned: a subset of what is durable.
            *store.published.lock().unwrap() = ledger.clone();
        }
        stop.store(true, Ordering::Relaxed);
        checkpointer.join().unwrap();
        drop(fs);
        let (image, durable) = store.cut.lock().unwrap().take().expect("cut taken");
        let after = Arc::new(MemStore::from_image(image));
        let when = format!("run {run}, cut at I/O {}", store.cut_at);
        assert_clean(after.as_ref(), &format!("{when}, before mount"));
        let fs = Fs::mount(after.clone() as Arc<dyn BlockStore>)
            .unwrap_or_else(|e| panic!("{when}: mount after cut: {e}"));
        for (name, data) in &durable {
            let a = fs
                .lookup(ROOT_INO, name.as_bytes())
                .unwrap_or_else(|e| panic!("{when}: {name} lost: {e}"));
            assert_eq!(
                &fs.read(a.ino, 0, data.len() as u32 + 1).unwrap(),
                data,
                "{when}: {name} content"
            );
        }
        fs.unmount().unwrap();
        assert_clean(after.as_ref(), &format!("{when}, after recovery"));
    }
}

/// A `MemStore` that takes the image a power cut would leave at its `cut_at`-th I/O,
/// with the ledger of fsynced files published at that moment.
pub(super) struct LedgerCutStore {
    mem: Arc<MemStore>,
    ios: std::sync::atomic::AtomicU64,
    cut_at: u64,
    rng: std::sync::Mutex<Rng>,
    published: std::sync::Mutex<HashMap<String, Vec<u8>>>,
    /// Takes what a process kill leaves (every write made so far) instead of a power cut.
    kill: bool,
    #[allow(clippy::type_complexity)]
    cut: std::sync::Mutex<Option<(Vec<u8>, HashMap<String, Vec<u8>>)>>,
}

impl LedgerCutStore {
    pub(super) fn new(mem: Arc<MemStore>, cut_at: u64, rng: &mut Rng) -> LedgerCutStore {
        LedgerCutStore {
            mem,
            ios: 0.into(),
            cut_at,
            rng: std::sync::Mutex::new(Rng(rng.below(u64::MAX) | 1)),
            published: Default::default(),
            kill: false,
            cut: Default::default(),
        }
    }

    /// A store whose cut is a process kill: the image holds every write made before it
    /// and the `cut_at`-th I/O itself (one the server had handed to the driver when it
    /// died, which the driver completes).
    pub(super) fn killing(mem: Arc<MemStore>, cut_at: u64, rng: &mut Rng) -> LedgerCutStore {
        LedgerCutStore {
            kill: true,
            ..LedgerCutStore::new(mem, cut_at, rng)
        }
    }

    pub(super) fn cut_at(&self) -> u64 {
        self.cut_at
    }

    /// Whether the cut has been taken.
    pub(super) fn is_cut(&self) -> bool {
        self.cut.lock().unwrap().is_some()
    }

    /// Adds a file whose fsync has returned to the ledger.
    pub(super) fn publish(&self, name: String, data: Vec<u8>) {
        self.published.lock().unwrap().insert(name, data);
    }

    /// The image the cut left and the files durable at that moment.
    pub(super) fn take_cut(&self) -> (Vec<u8>, HashMap<String, Vec<u8>>) {
        self.cut.lock().unwrap().take().expect("cut taken")
    }

    /// Counts an I/O and at the cut point takes the image: a power cut falls between the
    /// I/O before and this one (called before it), a kill just after this one (called
    /// after it). The image is taken with the cut's lock held, which a [`KilledRegion`]
    /// takes too: a redo log change made after the cut is never in the region's copy,
    /// one made before always is.
    fn tick(&self) {
        let n = self.ios.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if n == self.cut_at {
            let mut cut = self.cut.lock().unwrap();
            // The ledger first: an fsync that returns after it is not counted on.
            let durable = self.published.lock().unwrap().clone();
            let mut rng = self.rng.lock().unwrap();
            let image = if self.kill {
                self.mem.image()
            } else {
                self.mem.crash_image(&mut |k| rng.below(k))
            };
            *cut = Some((image, durable));
        }
    }

    /// Runs `io` with the tick where the kind of cut puts it.
    fn io(&self, io: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
        if self.kill {
            // As slow as a device, so that other threads' operations overlap this one
            // (writes whose data is on its way while another thread commits).
            std::thread::sleep(std::time::Duration::from_micros(20));
            let r = io();
            self.tick();
            r
        } else {
            self.tick();
            io()
        }
    }
}

/// The memory of a server's redo log, as a process kill at a [`LedgerCutStore`]'s cut
/// leaves it: a copy is taken before the first change after the cut (or when the
/// filesystem lets it go), so what a successor recovers from is the log as it was when
/// the image was taken.
pub(super) struct KilledRegion {
    live: Vec<u8>,
    store: Arc<LedgerCutStore>,
    left: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

impl KilledRegion {
    /// A region of `len` bytes, and where its contents at the cut will be.
    pub(super) fn new(
        store: Arc<LedgerCutStore>,
        len: usize,
    ) -> (KilledRegion, Arc<std::sync::Mutex<Option<Vec<u8>>>>) {
        let left = Arc::new(std::sync::Mutex::new(None));
        let region = KilledRegion {
            live: vec![0u8; len],
            store,
            left: left.clone(),
        };
        (region, left)
    }

    fn keep_if_cut(&self) {
        let cut = self.store.cut.lock().unwrap();
        let mut left = self.left.lock().unwrap();
        if cut.is_some() && left.is_none() {
            *left = Some(self.live.clone());
        }
    }
}

impl std::ops::Deref for KilledRegion {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.live
    }
}

impl std::ops::DerefMut for KilledRegion {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.keep_if_cut();
        &mut self.live
    }
}

impl Drop for KilledRegion {
    fn drop(&mut self) {
        self.keep_if_cut();
    }
}

impl BlockStore for LedgerCutStore {
    fn num_blocks(&self) -> u64 {
        self.mem.num_blocks()
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.mem.read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> std::io::Result<()> {
        self.io(|| self.mem.write(addr, buf))
    }
    fn flush(&self) -> std::io::Result<()> {
        self.io(|| self.mem.flush())
    }
    fn discard(&self, addr: u64, nblocks: u64) -> std::io::Result<()> {
        self.io(|| self.mem.discard(addr, nblocks))
    }
}

#[test]
fn a_failed_write_latches_the_filesystem_read_only() {
    let store = fresh(4096);
    let fs = Fs::mount(store.clone() as Arc<dyn BlockStore>).unwrap();
    let a = fs.mknod(ROOT_INO, b"f", S_IFREG | 0o644, 0, 0, 0).unwrap();
    store.fail_after_writes(0);
    assert!(matches!(fs.write(a.ino, 0, b"x"), Err(FsError::Io(_))));
    // Later changes are refused, never retried as if they might succeed.
    assert!(matches!(
        fs.mknod(ROOT_INO, b"g", S_IFREG, 0, 0, 0),
        Err(FsError::ReadOnly(_))
    ));
    assert!(matches!(fs.sync(), Err(FsError::ReadOnly(_))));
    assert!(fs.unmount().is_err());
}

// ---- format conversion under power cuts ----------------------------------------------

/// What a file looks like from outside, compared before and after a conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seen {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u32,
    mtime: (i64, u32),
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    symlink: Option<Vec<u8>>,
    /// (length, CRC-32) of a regular file's content.
    content: Option<(usize, u32)>,
}

/// Every path of the tree (hard links under each of their names) and what it holds.
pub(crate) fn manifest(fs: &Fs) -> std::collections::BTreeMap<String, Seen> {
    use formats::inode::{S_IFLNK, S_IFMT};
    let mut out = std::collections::BTreeMap::new();
    let mut queue = vec![(ROOT_INO, String::new())];
    while let Some((dir, path)) = queue.pop() {
        for e in fs.readdir(dir).unwrap() {
            let p = format!("{path}/{}", String::from_utf8_lossy(&e.name));
            let a = fs.getattr(e.ino).unwrap();
            let xattrs = fs
                .listxattr(e.ino)
                .unwrap()
                .into_iter()
                .map(|n| {
                    let v = fs.getxattr(e.ino, &n).unwrap();
                    (n, v)
                })
                .collect();
            let kind = a.mode & S_IFMT;
            let content = (kind == S_IFREG).then(|| {
                let data = fs.read(e.ino, 0, a.size as u32 + 1).unwrap();
                (data.len(), crc32fast::hash(&data))
            });
            let symlink = (kind == S_IFLNK).then(|| fs.readlink(e.ino).unwrap());
            if a.mode & S_IFMT == formats::inode::S_IFDIR {
                queue.push((e.ino, p.clone()));
            }
            out.insert(
                p,
                Seen {
                    mode: a.mode,
                    uid: a.uid,
                    gid: a.gid,
                    size: a.size,
                    nlink: a.nlink,
                    mtime: (a.mtime.sec, a.mtime.nsec),
                    xattrs,
                    symlink,
                    content,
                },
            );
        }
    }
    out
}

/// A v1 image holding nested directories, hard links, short and long symlinks, xattrs on
/// files and directories, sparse and preallocated files, special files, and files with
/// more extents than an inode holds inline (one of them with a chain that needs one more
/// extent block in v3), on an image of `blocks` blocks.
pub(crate) fn populated_v1(blocks: u64) -> Arc<MemStore> {
    use crate::mkfs::{mkfs, MkfsOptions};
    use formats::inode::{S_IFCHR, S_IFIFO};
    use formats::version::FormatVersion;
    let store = Arc::new(MemStore::new(blocks));
    let opts = MkfsOptions {
        version: FormatVersion::V1,
        ..MkfsOptions::default()
    };
    mkfs(store.as_ref(), "mem", &opts).unwrap();
    let fs = Fs::mount(store.clone() as Arc<dyn BlockStore>).unwrap();
    let bs = formats::BLOCK_SIZE as u64;
    let file = |dir, name: &str, mode| {
        fs.mknod(dir, name.as_bytes(), S_IFREG | mode, 0, 1000, 100)
            .unwrap()
            .ino
    };
    // Every other block written: one extent per written block.
    let fragmented = |ino, extents: u64| {
        for k in 0..extents {
            fs.write(ino, 2 * k * bs, &content(k, 100)).unwrap();
        }
    };
    let a = fs.mkdir(ROOT_INO, b"a", 0o755, 1000, 100).unwrap().ino;
    let b = fs.mkdir(a, b"b", 0o750, 1000, 100).unwrap().ino;
    let c = fs.mkdir(b, b"c", 0o700, 0, 0).unwrap().ino;
    let small = file(c, "small", 0o644);
    fs.write(small, 0, b"small file\n").unwrap();
    let hello = file(a, "hello", 0o640);
    fs.write(hello, 0, &content(7, 5000)).unwrap();
    fs.setxattr(
        hello,
        b"user.origin",
        b"conversion test",
        XattrFlags::default(),
    )
    .unwrap();
    fs.setxattr(
        hello,
        b"trusted.bin",
        &[0, 1, 2, 255],
        XattrFlags::default(),
    )
    .unwrap();
    fs.setxattr(b, b"user.dir", b"on a directory", XattrFlags::default())
        .unwrap();
    fs.link(hello, b, b"hello-link").unwrap();
    fs.link(hello, ROOT_INO, b"hello-top").unwrap();
    fs.symlink(a, b"short", b"hello", 1000, 100).unwrap();
    fs.symlink(b, b"long", &[b'x'; 600], 1000, 100).unwrap();
    let sparse = file(ROOT_INO, "sparse", 0o600);
    fs.write(sparse, 0, b"head").unwrap();
    fs.write(sparse, 300 * bs + 17, &content(9, 3000)).unwrap();
    let pre = file(ROOT_INO, "prealloc", 0o600);
    fs.write(pre, 0, &content(3, 4096)).unwrap();
    fs.fallocate(pre, 0, bs, 6 * bs).unwrap();
    for (name, extents) in [("frag14", 14), ("frag40", 40), ("frag1000", 1000)] {
        let f = file(c, name, 0o644);
        fragmented(f, extents);
    }
    let big = fs.lookup(c, b"frag1000").unwrap().ino;
    fs.link(big, ROOT_INO, b"frag1000-link").unwrap();
    fs.mknod(b, b"fifo", S_IFIFO | 0o644, 0, 1000, 100).unwrap();
    fs.mknod(b, b"chr", S_IFCHR | 0o600, (4 << 8) | 1, 0, 0)
        .unwrap();
    let many = fs.mkdir(ROOT_INO, b"many", 0o755, 0, 0).unwrap().ino;
    for i in 0..40 {
        let f = file(many, &format!("f{i}"), 0o600);
        fs.write(f, 0, format!("file {i}").as_bytes()).unwrap();
        if i % 4 == 0 {
            fs.link(f, many, format!("l{i}").as_bytes()).unwrap();
        }
    }
    // A removed file leaves a freed slot between live ones.
    let gone = file(many, "gone", 0o600);
    fs.unlink(many, b"gone").unwrap();
    fs.release(gone).unwrap();
    fs.unmount().unwrap();
    store
}

/// A crash image as the blocks that differ from the image the conversion started from.
type BlockDiff = Vec<(usize, Vec<u8>)>;

/// Forwards to a `MemStore` and, once armed, takes the image a power cut would leave
/// after each I/O whose number is in `cuts`, kept as the blocks that differ from `base`.
struct CutStore {
    mem: Arc<MemStore>,
    armed: std::sync::atomic::AtomicBool,
    ops: std::sync::atomic::AtomicU64,
    cuts: std::collections::BTreeSet<u64>,
    rng: std::sync::Mutex<Rng>,
    base: Vec<u8>,
    /// (I/O number, crash image).
    images: std::sync::Mutex<Vec<(u64, BlockDiff)>>,
}

impl CutStore {
    fn new(base: &[u8], cuts: std::collections::BTreeSet<u64>, seed: u64) -> CutStore {
        CutStore {
            mem: Arc::new(MemStore::from_image(base.to_vec())),
            armed: false.into(),
            ops: 0.into(),
            cuts,
            rng: std::sync::Mutex::new(Rng(seed)),
            base: base.to_vec(),
            images: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn arm(&self, on: bool) {
        self.armed.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// After an I/O: counts it and, at a cut point, takes the crash image.
    fn tick(&self) {
        use std::sync::atomic::Ordering;
        if !self.armed.load(Ordering::SeqCst) {
            return;
        }
        let n = self.ops.fetch_add(1, Ordering::SeqCst) + 1;
        if !self.cuts.contains(&n) {
            return;
        }
        let mut rng = self.rng.lock().unwrap();
        let img = self.mem.crash_image(&mut |k| rng.below(k));
        let bs = formats::BLOCK_SIZE;
        let diff = (0..img.len() / bs)
            .filter(|b| img[b * bs..(b + 1) * bs] != self.base[b * bs..(b + 1) * bs])
            .map(|b| (b, img[b * bs..(b + 1) * bs].to_vec()))
            .collect();
        self.images.lock().unwrap().push((n, diff));
    }
}

impl BlockStore for CutStore {
    fn num_blocks(&self) -> u64 {
        self.mem.num_blocks()
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.mem.read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> std::io::Result<()> {
        self.mem.write(addr, buf)?;
        self.tick();
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.mem.flush()?;
        self.tick();
        Ok(())
    }
    fn discard(&self, addr: u64, nblocks: u64) -> std::io::Result<()> {
        self.mem.discard(addr, nblocks)?;
        self.tick();
        Ok(())
    }
}

/// Converts `store`'s image v1 → v2 → v3 in batches of 2 inodes, the I/O counted (and
/// cut) from the first conversion call to the last step.
fn convert_v1_v2_v3(store: &Arc<CutStore>) {
    use formats::version::FormatVersion;
    let fs = Fs::mount(store.clone() as Arc<dyn BlockStore>).unwrap();
    store.arm(true);
    for to in [FormatVersion::V2, FormatVersion::V3] {
        fs.start_conversion(to).unwrap();
        while !fs.convert_step(2).unwrap().finished {}
    }
    store.arm(false);
    fs.unmount().unwrap();
}

/// Mounts an image a cut left, finishes whatever conversion it was in and converts it on
/// to v3; the image must check clean before and after and hold the tree it started with.
fn finish_after_cut(image: Vec<u8>, before: &std::collections::BTreeMap<String, Seen>, when: &str) {
    use formats::version::FormatVersion;
    let store = Arc::new(MemStore::from_image(image));
    assert_clean(store.as_ref(), &format!("{when}, before mount"));
    let fs = Fs::mount(store.clone() as Arc<dyn BlockStore>)
        .unwrap_or_else(|e| panic!("{when}: mount after cut: {e}"));
    if let Some(t) = fs.conversion_target() {
        while !fs.convert_step(5).unwrap().finished {}
        assert_eq!(fs.format_version(), t, "{when}");
    }
    if fs.format_version() < FormatVersion::V3 {
        fs.start_conversion(FormatVersion::V3).unwrap();
        while !fs.convert_step(5).unwrap().finished {}
    }
    assert_eq!(fs.format_version(), FormatVersion::V3, "{when}");
    fs.unmount().unwrap();
    // fsck also checks that every inode has the v3 layout now.
    assert_clean(store.as_ref(), &format!("{when}, converted"));
    let fs = Fs::mount(store.clone() as Arc<dyn BlockStore>).unwrap();
    let after = manifest(&fs);
    assert_eq!(&after, before, "{when}: the tree changed");
    fs.unmount().unwrap();
}

#[test]
fn power_cuts_during_a_conversion_lose_nothing() {
    let runs: u64 = std::env::var("MOLT_CONVERT_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let base = populated_v1(4096).image();
    let before = {
        let fs = Fs::mount(Arc::new(MemStore::from_image(base.clone()))).unwrap();
        manifest(&fs)
    };
    assert!(before.len() > 60, "{} paths", before.len());
    // How many I/Os the conversion makes.
    let counting = Arc::new(CutStore::new(&base, Default::default(), 1));
    convert_v1_v2_v3(&counting);
    let ios = counting.ops.load(std::sync::atomic::Ordering::SeqCst);
    assert!(ios > 60, "the conversion made only {ios} I/Os");
    for run in 0..runs {
        let mut rng = Rng(0xC0FF_EE00_D15C ^ ((run + 1) * 0x9E37_79B9));
        let mut cuts = std::collections::BTreeSet::new();
        while cuts.len() < 45.min(ios as usize) {
            cuts.insert(1 + rng.below(ios));
        }
        let store = Arc::new(CutStore::new(&base, cuts, rng.below(u64::MAX) | 1));
        convert_v1_v2_v3(&store);
        let images = std::mem::take(&mut *store.images.lock().unwrap());
        assert!(
            images.len() >= 30,
            "run {run}: only {} of the cut points were reached ({ios} I/Os)",
            images.len()
        );
        for (n, diff) in images {
            let mut image = base.clone();
            let bs = formats::BLOCK_SIZE;
            for (b, bytes) in diff {
                image[b * bs..(b + 1) * bs].copy_from_slice(&bytes);
            }
            finish_after_cut(
                image,
                &before,
                &format!("run {run}, cut after I/O {n} of {ios}"),
            );
        }
    }
}

/// A commit whose block maps need extent blocks the free space has only as blocks freed
/// by an earlier transaction: that space comes back through a checkpoint taken inside the
/// commit, which must not journal half of it (a bitmap naming the new data blocks of
/// files whose block maps are not in the journal yet). A power cut after any I/O of the
/// writes and their commit leaves an image that checks clean and holds every file's
/// acknowledged blocks or its older self.
#[test]
fn a_commit_short_of_extent_blocks_journals_nothing_half_made() {
    const FILES: u64 = 6;
    const ROOM: u64 = 10;
    let bs = formats::BLOCK_SIZE as u64;
    let base = fresh(4096).image();
    let store = Arc::new(CutStore::new(&base, (1..=10_000).collect(), 7));
    let fs = Fs::mount(store.clone() as Arc<dyn BlockStore>).unwrap();
    let inline = fs.lock().codec.inline_capacity() as u64;
    let block = |i: u64| vec![i as u8 + 1; bs as usize];
    // Files whose block maps exactly fill their inline records (one extent per block:
    // every other file block is a hole).
    let files: Vec<Ino> = (0..FILES)
        .map(|i| {
            let a = fs
                .mknod(
                    ROOT_INO,
                    format!("f{i}").as_bytes(),
                    S_IFREG | 0o644,
                    0,
                    0,
                    0,
                )
                .unwrap();
            for k in 0..inline {
                fs.write(a.ino, 2 * k * bs, &block(i)).unwrap();
            }
            a.ino
        })
        .collect();
    let freed = fs
        .mknod(ROOT_INO, b"freed", S_IFREG | 0o644, 0, 0, 0)
        .unwrap()
        .ino;
    fs.write(freed, 0, &vec![9; 32 * bs as usize]).unwrap();
    let filler = fs
        .mknod(ROOT_INO, b"filler", S_IFREG | 0o644, 0, 0, 0)
        .unwrap()
        .ino;
    fs.sync().unwrap();
    // Fill the image up to ROOM allocatable blocks.
    let mut end = 0;
    loop {
        fs.lock().checkpoint().unwrap();
        let free = fs.lock().bbitmap.allocatable();
        if free <= ROOM {
            break;
        }
        let n = (free - ROOM).div_ceil(2).min(256);
        fs.write(filler, end, &vec![7; (n * bs) as usize]).unwrap();
        end += n * bs;
        fs.sync().unwrap();
    }
    // 32 blocks freed by a journaled transaction: withheld until a checkpoint.
    fs.unlink(ROOT_INO, b"freed").unwrap();
    fs.release(freed).unwrap();
    fs.lock().commit().unwrap();
    {
        let g = fs.lock();
        assert_eq!(g.bbitmap.allocatable(), ROOM, "setup");
        assert!(g.bbitmap.has_withheld(), "setup");
        for &ino in &files {
            assert_eq!(g.nodes[&ino.0].extents.len() as u64, inline, "setup");
            assert!(g.nodes[&ino.0].chain.is_empty(), "setup");
        }
    }
    // Each write passes the up-front check (ROOM - k >= 1 + WRITE_RESERVE) and adds an
    // extent; the commit then needs one extent block per file, more than are left.
    store.arm(true);
    for (i, &ino) in files.iter().enumerate() {
        fs.write(ino, 2 * inline * bs, &block(i as u64 + 100))
            .unwrap();
    }
    fs.sync().unwrap();
    store.arm(false);
    assert!(
        !fs.lock().bbitmap.has_withheld(),
        "the commit did not need the withheld blocks: the case is not reached"
    );
    fs.unmount().unwrap();
    let images = std::mem::take(&mut *store.images.lock().unwrap());
    assert!(images.len() > 10, "{} I/Os", images.len());
    for (n, diff) in images {
        let mut image = base.clone();
        let bsz = formats::BLOCK_SIZE;
        for (b, bytes) in diff {
            image[b * bsz..(b + 1) * bsz].copy_from_slice(&bytes);
        }
        let when = format!("cut after I/O {n}");
        let cut = Arc::new(MemStore::from_image(image));
        assert_clean(cut.as_ref(), &when);
        let fs = Fs::mount(cut.clone() as Arc<dyn BlockStore>).unwrap();
        for (i, &ino) in files.iter().enumerate() {
            for k in 0..inline {
                let got = fs.read(ino, 2 * k * bs, bs as u32).unwrap();
                assert_eq!(got, block(i as u64), "{when}: f{i} block {k}");
            }
            let last = fs.read(ino, 2 * inline * bs, bs as u32).unwrap();
            assert!(
                last.is_empty() || last == block(i as u64 + 100),
                "{when}: f{i}'s new block is neither there nor absent"
            );
        }
        fs.unmount().unwrap();
        assert_clean(cut.as_ref(), &format!("{when}, after remount"));
    }
}
