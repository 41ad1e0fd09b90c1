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

struct Rng(u64);
impl Rng {
    fn below(&mut self, k: u64) -> u64 {
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
            _ => {
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
        }
    }
}

fn assert_clean(store: &dyn BlockStore, when: &str) {
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
            workload(&fs, &mut rng, ops, &mut ledger, &mut serial);
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
        workload(&fs, &mut rng, 30, &mut ledger, &mut serial);
        fs.unmount().unwrap();
        assert_clean(after.as_ref(), &format!("run {run} after recovery"));
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
