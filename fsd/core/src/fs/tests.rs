//! Filesystem core tests on an in-memory store.

use std::collections::HashMap;
use std::sync::Arc;

use formats::block::Ino;
use formats::inode::S_IFREG;
use formats::superblock::ROOT_INO;

use super::*;
use crate::mkfs::{mkfs, MkfsOptions};
use crate::store::{BlockStore, MemStore};

pub(crate) fn fresh(blocks: u64) -> Arc<MemStore> {
    let s = Arc::new(MemStore::new(blocks));
    mkfs(s.as_ref(), "mem", &MkfsOptions::default()).unwrap();
    s
}

fn remount(fs: Fs, s: &Arc<MemStore>) -> Fs {
    fs.unmount().unwrap();
    Fs::mount(s.clone() as Arc<dyn BlockStore>).unwrap()
}

fn mk(fs: &Fs, parent: Ino, name: &str) -> Ino {
    fs.mknod(parent, name.as_bytes(), S_IFREG | 0o644, 0, 0, 0)
        .unwrap()
        .ino
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn files_survive_remount() {
    let s = fresh(16384);
    let fs = Fs::mount(s.clone() as Arc<dyn BlockStore>).unwrap();
    let d = fs.mkdir(ROOT_INO, b"dir", 0o755, 1, 2).unwrap().ino;
    let f = mk(&fs, d, "file");
    let data = pattern(1, 3 * 4096 + 17);
    assert_eq!(fs.write(f, 100, &data).unwrap(), data.len());
    fs.symlink(d, b"short", b"file", 0, 0).unwrap();
    let long = vec![b'x'; 1000];
    fs.symlink(d, b"long", &long, 0, 0).unwrap();
    fs.link(f, ROOT_INO, b"hard").unwrap();
    fs.setxattr(f, b"user.k", b"v", XattrFlags::default())
        .unwrap();
    let fs = remount(fs, &s);
    let d2 = fs.lookup(ROOT_INO, b"dir").unwrap();
    assert_eq!(d2.nlink, 2);
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 3);
    let a = fs.lookup(d, b"file").unwrap();
    assert_eq!(a.size, 100 + data.len() as u64);
    assert_eq!(a.nlink, 2);
    let back = fs.read(f, 0, 1 << 20).unwrap();
    assert_eq!(&back[..100], &[0u8; 100][..]);
    assert_eq!(&back[100..], &data[..]);
    let sl = fs.lookup(d, b"short").unwrap().ino;
    assert_eq!(fs.readlink(sl).unwrap(), b"file");
    let ll = fs.lookup(d, b"long").unwrap().ino;
    assert_eq!(fs.readlink(ll).unwrap(), long);
    assert_eq!(fs.getxattr(f, b"user.k").unwrap(), b"v");
    assert!(matches!(fs.getxattr(f, b"user.none"), Err(FsError::NoAttr)));
    fs.unmount().unwrap();
}

#[test]
fn big_directory_lookup_list_and_delete() {
    let s = fresh(65536);
    let fs = Fs::mount(s.clone() as Arc<dyn BlockStore>).unwrap();
    let d = fs.mkdir(ROOT_INO, b"big", 0o755, 0, 0).unwrap().ino;
    let n = 5000;
    for i in 0..n {
        mk(&fs, d, &format!("entry-with-a-longish-name-{i}"));
    }
    let fs = remount(fs, &s);
    for i in (0..n).step_by(7) {
        fs.lookup(d, format!("entry-with-a-longish-name-{i}").as_bytes())
            .unwrap();
    }
    let list = fs.readdir(d).unwrap();
    assert_eq!(list.len(), n);
    let names: std::collections::HashSet<_> = list.iter().map(|e| e.name.clone()).collect();
    assert_eq!(names.len(), n);
    let before = fs.statfs().free_blocks;
    for i in 0..n {
        let ino = fs
            .unlink(d, format!("entry-with-a-longish-name-{i}").as_bytes())
            .unwrap();
        fs.release(ino).unwrap();
    }
    assert!(fs.readdir(d).unwrap().is_empty());
    fs.rmdir(ROOT_INO, b"big").unwrap();
    assert!(fs.statfs().free_blocks >= before);
    fs.unmount().unwrap();
}

#[test]
fn rename_rules() {
    let s = fresh(8192);
    let fs = Fs::mount(s.clone() as Arc<dyn BlockStore>).unwrap();
    let a = fs.mkdir(ROOT_INO, b"a", 0o755, 0, 0).unwrap().ino;
    let b = fs.mkdir(ROOT_INO, b"b", 0o755, 0, 0).unwrap().ino;
    let sub = fs.mkdir(a, b"sub", 0o755, 0, 0).unwrap().ino;
    let f = mk(&fs, a, "f");
    let g = mk(&fs, b, "g");
    // A directory cannot move under itself.
    assert!(matches!(
        fs.rename(ROOT_INO, b"a", sub, b"x", false, false),
        Err(FsError::Invalid(_))
    ));
    // Moving a directory updates both parents' link counts and its own parent.
    fs.rename(a, b"sub", b, b"sub2", false, false).unwrap();
    assert_eq!(fs.getattr(a).unwrap().nlink, 2);
    assert_eq!(fs.getattr(b).unwrap().nlink, 3);
    assert_eq!(fs.parent_of(sub).unwrap(), b);
    // NOREPLACE refuses an existing target; plain rename replaces it.
    assert!(matches!(
        fs.rename(a, b"f", b, b"g", true, false),
        Err(FsError::Exists)
    ));
    assert_eq!(fs.rename(a, b"f", b, b"g", false, false).unwrap(), Some(g));
    assert_eq!(fs.lookup(b, b"g").unwrap().ino, f);
    fs.release(g).unwrap();
    // Exchange swaps a file and a directory across parents.
    let h = mk(&fs, a, "h");
    fs.rename(a, b"h", b, b"sub2", false, true).unwrap();
    assert_eq!(fs.lookup(b, b"sub2").unwrap().ino, h);
    assert_eq!(fs.lookup(a, b"h").unwrap().ino, sub);
    assert_eq!(fs.parent_of(sub).unwrap(), a);
    assert_eq!(fs.getattr(a).unwrap().nlink, 3);
    assert_eq!(fs.getattr(b).unwrap().nlink, 2);
    // Replacing a non-empty directory fails.
    mk(&fs, sub, "inside");
    let e = fs.mkdir(ROOT_INO, b"e", 0o755, 0, 0).unwrap().ino;
    assert!(matches!(
        fs.rename(ROOT_INO, b"e", a, b"h", false, false),
        Err(FsError::NotEmpty)
    ));
    let _ = e;
    let fs = remount(fs, &s);
    assert_eq!(fs.lookup(a, b"h").unwrap().ino, sub);
    fs.unmount().unwrap();
}

#[test]
fn sparse_files_truncate_fallocate_punch() {
    let s = fresh(8192);
    let fs = Fs::mount(s.clone() as Arc<dyn BlockStore>).unwrap();
    let f = mk(&fs, ROOT_INO, "sparse");
    fs.write(f, 10 << 20, b"end").unwrap();
    let a = fs.getattr(f).unwrap();
    assert_eq!(a.size, (10 << 20) + 3);
    assert_eq!(a.blocks, 8);
    assert_eq!(fs.read(f, 4096, 10).unwrap(), vec![0u8; 10]);
    fs.setattr(
        f,
        SetAttr {
            size: Some(5),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(fs.getattr(f).unwrap().blocks, 0);
    fs.write(f, 0, b"hello world").unwrap();
    fs.setattr(
        f,
        SetAttr {
            size: Some(5),
            ..Default::default()
        },
    )
    .unwrap();
    fs.setattr(
        f,
        SetAttr {
            size: Some(100),
            ..Default::default()
        },
    )
    .unwrap();
    let r = fs.read(f, 0, 100).unwrap();
    assert_eq!(&r[..5], b"hello");
    assert!(
        r[5..].iter().all(|&x| x == 0),
        "bytes past a truncation read as zeros"
    );
    fs.fallocate(f, 0, 0, 1 << 20).unwrap();
    assert_eq!(fs.getattr(f).unwrap().size, 1 << 20);
    assert_eq!(&fs.read(f, 0, 5).unwrap(), b"hello");
    assert!(fs.read(f, 4096, 8192).unwrap().iter().all(|&x| x == 0));
    fs.write(f, 8192, b"abc").unwrap();
    assert_eq!(&fs.read(f, 8190, 6).unwrap(), &[0, 0, b'a', b'b', b'c', 0]);
    fs.fallocate(
        f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        1,
        8193,
    )
    .unwrap();
    assert_eq!(&fs.read(f, 0, 2).unwrap(), &[b'h', 0]);
    assert_eq!(&fs.read(f, 8192, 4).unwrap(), &[0, 0, b'c', 0]);
    let fs = remount(fs, &s);
    assert_eq!(&fs.read(f, 8192, 4).unwrap(), &[0, 0, b'c', 0]);
    fs.unmount().unwrap();
}

#[test]
fn many_extents_spill_into_extent_blocks() {
    let s = fresh(16384);
    let fs = Fs::mount(s.clone() as Arc<dyn BlockStore>).unwrap();
    let f = mk(&fs, ROOT_INO, "frag");
    let other = mk(&fs, ROOT_INO, "other");
    // Interleave two files so neither gets contiguous blocks.
    for i in 0..800u64 {
        fs.write(f, i * 8192, &pattern(i, 4096)).unwrap();
        fs.write(other, i * 4096, &pattern(i + 10000, 4096))
            .unwrap();
    }
    let fs = remount(fs, &s);
    for i in (0..800u64).step_by(37) {
        assert_eq!(fs.read(f, i * 8192, 4096).unwrap(), pattern(i, 4096));
    }
    fs.setattr(
        f,
        SetAttr {
            size: Some(0),
            ..Default::default()
        },
    )
    .unwrap();
    let fs = remount(fs, &s);
    assert_eq!(fs.getattr(f).unwrap().blocks, 0);
    fs.unmount().unwrap();
}

#[test]
fn fill_and_delete_cycles_leak_nothing() {
    let s = fresh(4096);
    let fs = Fs::mount(s.clone() as Arc<dyn BlockStore>).unwrap();
    let start = fs.statfs();
    let chunk = vec![7u8; 256 * 1024];
    for cycle in 0..20 {
        let mut files = Vec::new();
        'fill: for i in 0.. {
            let name = format!("f{i}");
            let ino = match fs.mknod(ROOT_INO, name.as_bytes(), S_IFREG | 0o644, 0, 0, 0) {
                Ok(a) => a.ino,
                Err(FsError::NoSpace) => break 'fill,
                Err(e) => panic!("cycle {cycle}: {e}"),
            };
            files.push(name);
            let mut off = 0;
            loop {
                match fs.write(ino, off, &chunk) {
                    Ok(n) => off += n as u64,
                    Err(FsError::NoSpace) => break 'fill,
                    Err(e) => panic!("cycle {cycle}: {e}"),
                }
                if off >= 1 << 20 {
                    break;
                }
            }
        }
        assert!(
            files.len() > 5,
            "cycle {cycle} filled only {} files",
            files.len()
        );
        for name in &files {
            let ino = fs.unlink(ROOT_INO, name.as_bytes()).unwrap();
            fs.release(ino).unwrap();
        }
        fs.sync().unwrap();
    }
    let fs = remount(fs, &s);
    let end = fs.statfs();
    assert_eq!(end.free_files, start.free_files);
    // The root directory may have grown buckets; nothing else may stay allocated.
    assert!(
        start.free_blocks - end.free_blocks <= 64,
        "{} -> {}",
        start.free_blocks,
        end.free_blocks
    );
    fs.unmount().unwrap();
}

#[test]
fn orphans_are_freed_at_mount() {
    let s = fresh(4096);
    let fs = Fs::mount(s.clone() as Arc<dyn BlockStore>).unwrap();
    let before = fs.statfs();
    let f = mk(&fs, ROOT_INO, "open-then-unlinked");
    fs.write(f, 0, &[1u8; 65536]).unwrap();
    fs.unlink(ROOT_INO, b"open-then-unlinked").unwrap();
    // Still readable while "open".
    assert_eq!(fs.read(f, 0, 4).unwrap(), vec![1u8; 4]);
    let fs = remount(fs, &s);
    let after = fs.statfs();
    assert_eq!(after.free_files, before.free_files);
    assert_eq!(after.free_blocks, before.free_blocks);
    fs.unmount().unwrap();
}

/// Random operations against a model; after each step, and after remounts, the
/// filesystem and the model agree.
#[test]
fn random_operations_match_a_model() {
    let s = fresh(32768);
    let mut fs = Fs::mount(s.clone() as Arc<dyn BlockStore>).unwrap();
    let mut model: HashMap<String, Vec<u8>> = HashMap::new();
    let mut inos: HashMap<String, Ino> = HashMap::new();
    let mut rng = 12345u64;
    let mut next = |k: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % k
    };
    for step in 0..3000 {
        let name = format!("n{}", next(40));
        match next(6) {
            0 => {
                let r = fs.mknod(ROOT_INO, name.as_bytes(), S_IFREG | 0o600, 0, 0, 0);
                if let std::collections::hash_map::Entry::Vacant(e) = model.entry(name.clone()) {
                    inos.insert(name, r.unwrap().ino);
                    e.insert(Vec::new());
                } else {
                    assert!(matches!(r, Err(FsError::Exists)));
                }
            }
            1 | 2 => {
                if let Some(content) = model.get_mut(&name) {
                    let off = next(200_000) as usize;
                    let len = next(70_000) as usize + 1;
                    let data = pattern(step, len);
                    fs.write(inos[&name], off as u64, &data).unwrap();
                    if content.len() < off + len {
                        content.resize(off + len, 0);
                    }
                    content[off..off + len].copy_from_slice(&data);
                }
            }
            3 => {
                if let Some(content) = model.get_mut(&name) {
                    let size = next(300_000) as usize;
                    fs.setattr(
                        inos[&name],
                        SetAttr {
                            size: Some(size as u64),
                            ..Default::default()
                        },
                    )
                    .unwrap();
                    content.resize(size, 0);
                }
            }
            4 => {
                let to = format!("n{}", next(40));
                if model.contains_key(&name) {
                    let replaced = fs
                        .rename(
                            ROOT_INO,
                            name.as_bytes(),
                            ROOT_INO,
                            to.as_bytes(),
                            false,
                            false,
                        )
                        .unwrap();
                    if let Some(r) = replaced {
                        fs.release(r).unwrap();
                    }
                    if to != name {
                        let c = model.remove(&name).unwrap();
                        let i = inos.remove(&name).unwrap();
                        model.insert(to.clone(), c);
                        inos.insert(to, i);
                    }
                }
            }
            _ => {
                if model.remove(&name).is_some() {
                    let ino = fs.unlink(ROOT_INO, name.as_bytes()).unwrap();
                    inos.remove(&name);
                    fs.release(ino).unwrap();
                } else {
                    assert!(matches!(
                        fs.unlink(ROOT_INO, name.as_bytes()),
                        Err(FsError::NotFound)
                    ));
                }
            }
        }
        if step % 500 == 499 {
            fs = remount(fs, &s);
        }
    }
    let listed: std::collections::HashSet<String> = fs
        .readdir(ROOT_INO)
        .unwrap()
        .into_iter()
        .map(|e| String::from_utf8(e.name).unwrap())
        .collect();
    assert_eq!(listed, model.keys().cloned().collect());
    for (name, content) in &model {
        let a = fs.lookup(ROOT_INO, name.as_bytes()).unwrap();
        assert_eq!(a.size, content.len() as u64, "{name}");
        assert_eq!(
            &fs.read(a.ino, 0, content.len() as u32 + 10).unwrap(),
            content,
            "{name}"
        );
    }
    fs.unmount().unwrap();
}

/// Every operation a caller can make fail with bad input (sizes past the largest file,
/// names and values too long, a directory where a file is needed, a full image) fails
/// without changing anything, and leaves the filesystem writable for everyone else.
#[test]
fn refused_operations_latch_nothing() {
    use super::file::MAX_FILE_SIZE;
    let s = fresh(4096);
    let fs = Fs::mount(s.clone() as Arc<dyn BlockStore>).unwrap();
    let f = mk(&fs, ROOT_INO, "f");
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).unwrap().ino;
    let long = vec![b'n'; 256];
    let refusals: Vec<(&str, FsResult<()>)> = vec![
        (
            "write at the largest size",
            fs.write(f, MAX_FILE_SIZE, b"x").map(|_| ()),
        ),
        (
            "write past it",
            fs.write(f, 17 << 40, &[1; 4096]).map(|_| ()),
        ),
        (
            "cached write crossing it",
            fs.write_with(
                f,
                MAX_FILE_SIZE - 10,
                &[1; 4096],
                WriteMode {
                    stamp_times: false,
                    whole: true,
                },
            )
            .map(|_| ()),
        ),
        (
            "truncate past it",
            fs.setattr(
                f,
                SetAttr {
                    size: Some(MAX_FILE_SIZE + 1),
                    ..Default::default()
                },
            )
            .map(|_| ()),
        ),
        ("fallocate past it", fs.fallocate(f, 0, MAX_FILE_SIZE, 4096)),
        (
            "fallocate bigger than the image",
            fs.fallocate(f, 0, 0, 1 << 30),
        ),
        (
            "write bigger than the image",
            fs.write(f, 0, &vec![7; 32 << 20]).map(|_| ()),
        ),
        (
            "name too long",
            fs.mknod(ROOT_INO, &long, S_IFREG | 0o644, 0, 0, 0)
                .map(|_| ()),
        ),
        (
            "mkdir of a taken name",
            fs.mkdir(ROOT_INO, b"f", 0o755, 0, 0).map(|_| ()),
        ),
        (
            "xattr name too long",
            fs.setxattr(f, &long, b"v", XattrFlags::default()),
        ),
        (
            "xattr value too big",
            fs.setxattr(f, b"user.v", &vec![0; 70000], XattrFlags::default()),
        ),
        ("write to a directory", fs.write(d, 0, b"x").map(|_| ())),
        (
            "truncate of a directory",
            fs.setattr(
                d,
                SetAttr {
                    size: Some(0),
                    ..Default::default()
                },
            )
            .map(|_| ()),
        ),
        (
            "symlink target too long",
            fs.symlink(ROOT_INO, b"l", &vec![b't'; 5000], 0, 0)
                .map(|_| ()),
        ),
        (
            "rename into itself",
            fs.rename(ROOT_INO, b"d", d, b"x", false, false).map(|_| ()),
        ),
        (
            "unlink of nothing",
            fs.unlink(ROOT_INO, b"none").map(|_| ()),
        ),
    ];
    for (what, r) in refusals {
        assert!(r.is_err(), "{what} must be refused");
        assert!(!matches!(r, Err(FsError::ReadOnly(_))), "{what}: {r:?}");
        fs.lock()
            .check_writable()
            .unwrap_or_else(|e| panic!("{what} latched the filesystem: {e}"));
    }
    // A write that crosses the largest size is cut short there, like write(2) on ext4.
    assert_eq!(fs.write(f, MAX_FILE_SIZE - 10, &[1; 4096]).unwrap(), 10);
    fs.setattr(
        f,
        SetAttr {
            size: Some(0),
            ..Default::default()
        },
    )
    .unwrap();
    let g = mk(&fs, ROOT_INO, "g");
    fs.write(g, 0, &pattern(3, 100_000)).unwrap();
    fs.sync().unwrap();
    let fs = remount(fs, &s);
    let g = fs.lookup(ROOT_INO, b"g").unwrap();
    assert_eq!(fs.read(g.ino, 0, 100_000).unwrap(), pattern(3, 100_000));
    assert_eq!(fs.getattr(f).unwrap().size, 0);
}

/// A write-back of cached pages leaves mtime and ctime to the kernel, which sent them.
#[test]
fn a_cached_write_leaves_the_times_alone() {
    let s = fresh(4096);
    let fs = Fs::mount(s as Arc<dyn BlockStore>).unwrap();
    let f = mk(&fs, ROOT_INO, "f");
    let t = formats::inode::Timespec { sec: 1000, nsec: 5 };
    fs.setattr(
        f,
        SetAttr {
            mtime: Some(TimeSet::At(t)),
            ..Default::default()
        },
    )
    .unwrap();
    let cached = WriteMode {
        stamp_times: false,
        whole: true,
    };
    fs.write_with(f, 0, b"later", cached).unwrap();
    let a = fs.getattr(f).unwrap();
    assert_eq!((a.mtime, a.size), (t, 5));
    fs.write(f, 0, b"now").unwrap();
    assert!(fs.getattr(f).unwrap().mtime.sec > 1000);
}

/// relatime: an access updates atime when it is not newer than mtime or ctime, or a day
/// old; strictatime always; noatime never.
#[test]
fn access_times_follow_the_policy() {
    use formats::inode::Timespec;
    let s = fresh(4096);
    let fs = Fs::mount(s as Arc<dyn BlockStore>).unwrap();
    let f = mk(&fs, ROOT_INO, "f");
    fs.write(f, 0, b"data").unwrap();
    let set_atime = |sec: i64| {
        fs.setattr(
            f,
            SetAttr {
                atime: Some(TimeSet::At(Timespec { sec, nsec: 0 })),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let atime = || fs.getattr(f).unwrap().atime.sec;
    let now = crate::mkfs::now().sec;
    set_atime(now - 3600);
    fs.read_with(f, 0, 4, Atime::Never).unwrap();
    assert_eq!(atime(), now - 3600, "noatime");
    fs.read_with(f, 0, 4, Atime::Relative).unwrap();
    assert!(atime() >= now, "relatime: atime older than ctime");
    let after = fs.getattr(f).unwrap().atime;
    fs.read_with(f, 0, 4, Atime::Relative).unwrap();
    assert_eq!(
        fs.getattr(f).unwrap().atime,
        after,
        "relatime: no second update"
    );
    fs.read_with(f, 0, 4, Atime::Always).unwrap();
    assert_ne!(fs.getattr(f).unwrap().atime, after, "strictatime");
}

/// Block-aligned overwrites run outside the lock: many threads overwrite the blocks of one
/// file while others truncate, refill and delete other files (freeing blocks, forcing
/// checkpoints and reallocation). Every block of the file must end up holding one of the
/// contents written to that very block, never another file's, and fsck must be clean.
#[test]
fn unlocked_overwrites_never_land_in_reallocated_blocks() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const BLOCKS: u64 = 64;
    let bs = formats::BLOCK_SIZE;
    let s = fresh(8192);
    let fs = Arc::new(Fs::mount(s.clone() as Arc<dyn BlockStore>).unwrap());
    let target = mk(&fs, ROOT_INO, "target");
    let content = tagged_block;
    for b in 0..BLOCKS {
        fs.write(target, b * bs as u64, &content(b, 0)).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for w in 1..=4u64 {
        let (fs, stop) = (fs.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut r = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let b = (r * 7 + w * 13) % BLOCKS;
                let n = 1 + (r % 3).min(BLOCKS - b - 1);
                let mut data = Vec::new();
                for k in 0..n {
                    data.extend(content(b + k, w * 1_000_000 + r));
                }
                fs.write(target, b * bs as u64, &data).unwrap();
                r += 1;
            }
            r
        }));
    }
    {
        let (fs, stop) = (fs.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut r = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("churn-{}", r % 5);
                let ino = mk_or_lookup(&fs, &name);
                fs.write(ino, 0, &vec![0xEE; 16 * bs]).unwrap();
                // Its blocks are its own: no overwrite of the target lands in them.
                let back = fs.read(ino, 0, (16 * bs) as u32).unwrap();
                assert!(
                    back.iter().all(|&x| x == 0xEE),
                    "a churn file holds other data"
                );
                fs.setattr(
                    ino,
                    SetAttr {
                        size: Some(0),
                        ..Default::default()
                    },
                )
                .unwrap();
                if r.is_multiple_of(2) {
                    fs.unlink(ROOT_INO, name.as_bytes()).unwrap();
                    fs.release(ino).unwrap();
                }
                if r.is_multiple_of(7) {
                    fs.sync().unwrap();
                }
                r += 1;
            }
            r
        }));
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let rounds: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        rounds.iter().all(|r| *r > 0),
        "every thread ran: {rounds:?}"
    );
    let data = fs.read(target, 0, (BLOCKS as usize * bs) as u32).unwrap();
    for b in 0..BLOCKS {
        let block = &data[b as usize * bs..(b as usize + 1) * bs];
        assert_eq!(
            u64::from_le_bytes(block[..8].try_into().unwrap()),
            b,
            "block {b} holds another block's or file's data"
        );
    }
    unmount_clean(fs, &s);
}

/// Content of file block `b` for a write tagged `tag`: its first 8 bytes name the block,
/// so a check can tell whose block it is.
fn tagged_block(b: u64, tag: u64) -> Vec<u8> {
    let mut v = pattern(b * 1_000_003 + tag, formats::BLOCK_SIZE);
    v[..8].copy_from_slice(&b.to_le_bytes());
    v
}

fn mk_or_lookup(fs: &Fs, name: &str) -> Ino {
    match fs.lookup(ROOT_INO, name.as_bytes()) {
        Ok(a) => a.ino,
        Err(_) => mk(fs, ROOT_INO, name),
    }
}

/// A commit that finds the journal full checkpoints before it writes its own transaction.
/// The blocks that very transaction frees are not freed on disk yet: the checkpoint must
/// keep them withheld, or the next allocation could hand out blocks a crash gives back to
/// their old file.
#[test]
fn a_checkpoint_inside_a_commit_keeps_that_commits_frees_withheld() {
    let s = fresh(8192);
    let fs = Fs::mount(s.clone() as Arc<dyn BlockStore>).unwrap();
    let f = mk(&fs, ROOT_INO, "victim");
    fs.write(f, 0, &vec![0xAB; 8 * formats::BLOCK_SIZE])
        .unwrap();
    fs.sync().unwrap();
    let extents: Vec<(u64, u64)> = fs
        .lock()
        .node(f)
        .unwrap()
        .extents
        .iter()
        .map(|e| (e.physical, e.len as u64))
        .collect();
    assert!(!extents.is_empty());
    fs.unlink(ROOT_INO, b"victim").unwrap();
    fs.release(f).unwrap();
    let withheld = |g: &Inner, b: u64| {
        g.bbitmap
            .withheld()
            .iter()
            .any(|&(s, l)| b >= s && b < s + l)
    };
    let mut g = fs.lock();
    // What `commit_inner` does when the transaction does not fit the journal's room.
    g.prepare_tx().unwrap();
    g.checkpoint_pinned().unwrap();
    for &(start, len) in &extents {
        for b in start..start + len {
            assert!(
                withheld(&g, b),
                "block {b} allocatable before its freeing is journaled"
            );
        }
    }
    // Journaled and checkpointed: now they may be reused.
    g.commit().unwrap();
    g.checkpoint().unwrap();
    for &(start, len) in &extents {
        for b in start..start + len {
            assert!(
                !withheld(&g, b),
                "block {b} still withheld after a checkpoint"
            );
        }
    }
}

/// Background checkpoints write pinned blocks in place while operations go on: whatever
/// the interleaving, the filesystem keeps every file's content and checks clean.
#[test]
fn background_checkpoints_run_beside_operations() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let s = fresh(16384);
    let fs = Arc::new(Fs::mount(s.clone() as Arc<dyn BlockStore>).unwrap());
    fs.checkpoint_in_background_from_now();
    let stop = Arc::new(AtomicBool::new(false));
    let checkpointer = {
        let (fs, stop) = (fs.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut rounds, mut retired) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                fs.lock().checkpoint_due = true;
                if fs.checkpoint_in_background(&|| false).unwrap() {
                    retired += 1;
                }
                rounds += 1;
            }
            (rounds, retired)
        })
    };
    let mut workers = Vec::new();
    for w in 0..3u64 {
        let fs = fs.clone();
        workers.push(std::thread::spawn(move || {
            let mut files: HashMap<String, Vec<u8>> = HashMap::new();
            for r in 0..300u64 {
                let name = format!("w{w}-{}", r % 40);
                match fs.lookup(ROOT_INO, name.as_bytes()) {
                    Ok(a) if r % 3 == 0 => {
                        fs.unlink(ROOT_INO, name.as_bytes()).unwrap();
                        fs.release(a.ino).unwrap();
                        files.remove(&name);
                    }
                    Ok(a) => {
                        let data = pattern(w * 10_000 + r, 1 + (r as usize * 977) % 20_000);
                        fs.setattr(
                            a.ino,
                            SetAttr {
                                size: Some(0),
                                ..Default::default()
                            },
                        )
                        .unwrap();
                        fs.write(a.ino, 0, &data).unwrap();
                        files.insert(name, data);
                    }
                    Err(_) => {
                        let ino = mk(&fs, ROOT_INO, &name);
                        let data = pattern(w * 10_000 + r, 1 + (r as usize * 613) % 12_000);
                        fs.write(ino, 0, &data).unwrap();
                        files.insert(name, data);
                    }
                }
                if r % 25 == 0 {
                    fs.sync().unwrap();
                }
            }
            files
        }));
    }
    let files: Vec<HashMap<String, Vec<u8>>> =
        workers.into_iter().map(|t| t.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    let (rounds, retired) = checkpointer.join().unwrap();
    assert!(
        rounds > 0 && retired > 0,
        "{rounds} rounds, {retired} retired the journal"
    );
    let fs = Arc::try_unwrap(fs).ok().expect("threads done");
    let fs = remount(fs, &s);
    for (name, data) in files.iter().flatten() {
        let a = fs.lookup(ROOT_INO, name.as_bytes()).unwrap();
        assert_eq!(
            &fs.read(a.ino, 0, data.len() as u32 + 1).unwrap(),
            data,
            "{name}"
        );
    }
    fs.unmount().unwrap();
    let report = crate::fsck::check(s.as_ref(), &crate::fsck::FsckOptions::default()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

/// Writes whose data goes to the device outside the lock: threads write disjoint byte
/// ranges that share blocks (each block's read-modify-write races the others'), into
/// holes and over written blocks, while another thread extends the file and a third
/// reads. Every byte must end up as the last write to it left it: a lost update shows as
/// a range holding an older value or zeros.
#[test]
fn partial_writes_sharing_blocks_lose_no_bytes() {
    const BLOCKS: u64 = 6;
    const SLICE: usize = 1024;
    let bs = formats::BLOCK_SIZE as u64;
    let s = fresh(16384);
    // Device I/O that takes a moment, as a real one does, widens every race.
    let slow = Arc::new(SlowStore(s.clone()));
    let fs = Arc::new(Fs::mount(slow as Arc<dyn BlockStore>).unwrap());
    let f = mk(&fs, ROOT_INO, "shared");
    let tail = mk(&fs, ROOT_INO, "tail");
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let fs = fs.clone();
            std::thread::spawn(move || {
                let mut last: HashMap<u64, Vec<u8>> = HashMap::new();
                for r in 0..600u64 {
                    let blk = ((r * 2_654_435_761 + t * 40_503) >> 7) % BLOCKS;
                    let data = pattern(t * 1_000_000 + r, SLICE);
                    fs.write(f, blk * bs + t * SLICE as u64, &data).unwrap();
                    last.insert(blk, data);
                }
                last
            })
        })
        .collect();
    let appender = {
        let fs = fs.clone();
        std::thread::spawn(move || {
            let mut expect = Vec::new();
            for r in 0..200u64 {
                let data = pattern(7_000_000 + r, 700 + (r as usize * 37) % 3000);
                fs.write(tail, expect.len() as u64, &data).unwrap();
                expect.extend_from_slice(&data);
            }
            expect
        })
    };
    let reader = {
        let fs = fs.clone();
        std::thread::spawn(move || {
            for _ in 0..300 {
                fs.read(f, 0, (BLOCKS * bs) as u32).unwrap();
            }
        })
    };
    let last: Vec<HashMap<u64, Vec<u8>>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let expect_tail = appender.join().unwrap();
    reader.join().unwrap();
    let check = |fs: &Fs, when: &str| {
        let all = fs.read(f, 0, (BLOCKS * bs) as u32).unwrap();
        for (t, blocks) in last.iter().enumerate() {
            for blk in 0..BLOCKS {
                let at = (blk * bs) as usize + t * SLICE;
                let got = all.get(at..at + SLICE).unwrap_or(&[]);
                match blocks.get(&blk) {
                    Some(want) => assert_eq!(got, &want[..], "{when}: thread {t}, block {blk}"),
                    None => assert!(
                        got.iter().all(|&b| b == 0),
                        "{when}: thread {t}, block {blk} never written"
                    ),
                }
            }
        }
        let got = fs.read(tail, 0, expect_tail.len() as u32 + 1).unwrap();
        assert!(got == expect_tail, "{when}: the appended file differs");
    };
    check(&fs, "mounted");
    let fs = Arc::try_unwrap(fs).ok().expect("threads done");
    let fs = remount(fs, &s);
    check(&fs, "remounted");
    fs.unmount().unwrap();
    let report = crate::fsck::check(s.as_ref(), &crate::fsck::FsckOptions::default()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

/// A `MemStore` whose reads and writes take 20 µs.
struct SlowStore(Arc<MemStore>);

impl BlockStore for SlowStore {
    fn num_blocks(&self) -> u64 {
        self.0.num_blocks()
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::thread::sleep(std::time::Duration::from_micros(20));
        self.0.read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> std::io::Result<()> {
        std::thread::sleep(std::time::Duration::from_micros(20));
        self.0.write(addr, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn discard(&self, addr: u64, nblocks: u64) -> std::io::Result<()> {
        self.0.discard(addr, nblocks)
    }
}

/// A filesystem on `s` mounted as the server mounts it: with a redo log, so that each
/// operation's frees count as free space as soon as it is done.
fn mount_as_served(s: &Arc<MemStore>) -> Fs {
    let fs = Fs::mount(s.clone() as Arc<dyn BlockStore>).unwrap();
    let region = vec![0u8; redo::REDO_LOG_SIZE as usize];
    fs.attach_redo_log(redo::RedoLog::new(Box::new(region)).unwrap());
    fs
}

/// Writes `f` from its start until a write is refused for want of space, large writes
/// first and then single blocks: what is left is less than a one-block write needs.
fn fill_file(fs: &Fs, f: Ino) {
    let mut off = 0u64;
    for chunk in [64 * formats::BLOCK_SIZE, formats::BLOCK_SIZE] {
        let data = vec![0x5Au8; chunk];
        loop {
            match fs.write(f, off, &data) {
                Ok(n) => off += n as u64,
                Err(FsError::NoSpace) => break,
                Err(e) => panic!("filling: {e}"),
            }
        }
    }
}

/// The kernel forgets an unlinked file (and the filesystem frees it) on its own time,
/// so the FORGET may come just after the next request: a create or a write refused for
/// want of space while a file unlinked just before still waits to be freed waits for it,
/// and succeeds once it is.
#[test]
fn an_operation_refused_for_space_waits_for_an_unlinked_file_to_be_freed() {
    use std::time::Duration;
    let s = fresh(4096);
    let fs = Arc::new(mount_as_served(&s));
    let small = mk(&fs, ROOT_INO, "small");
    // Freed by another thread a while after the operation began, as a FORGET served by
    // another worker would be.
    let free_later = |name: &'static str, ino: Ino| {
        let fs = fs.clone();
        fs.unlink(ROOT_INO, name.as_bytes()).unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            fs.release(ino).unwrap();
        })
    };

    let big = mk(&fs, ROOT_INO, "big");
    fill_file(&fs, big);
    assert!(matches!(
        fs.mknod(ROOT_INO, b"refused", S_IFREG | 0o644, 0, 0, 0),
        Err(FsError::NoSpace)
    ));
    let releaser = free_later("big", big);
    let created = fs.mknod(ROOT_INO, b"after-the-unlink", S_IFREG | 0o644, 0, 0, 0);
    releaser.join().unwrap();
    assert!(created.is_ok(), "create after the unlink: {created:?}");

    let big = mk(&fs, ROOT_INO, "big-again");
    fill_file(&fs, big);
    assert!(matches!(
        fs.write(small, 0, &[1u8; 8192]),
        Err(FsError::NoSpace)
    ));
    let releaser = free_later("big-again", big);
    let written = fs.write(small, 0, &[1u8; 8192]);
    releaser.join().unwrap();
    assert_eq!(written.ok(), Some(8192), "write after the unlink");
    assert_eq!(fs.read(small, 0, 8192).unwrap(), vec![1u8; 8192]);

    unmount_clean(fs, &s);
}

/// A file unlinked but still open (never released) does not hold a refusal back for
/// long: the operation is refused once `RELEASE_WAIT` has passed, and the filesystem
/// takes changes as before.
#[test]
fn a_refusal_waits_no_longer_than_release_wait_for_a_file_held_open() {
    use super::ops::RELEASE_WAIT;
    use std::time::Instant;
    let s = fresh(4096);
    let fs = mount_as_served(&s);
    let big = mk(&fs, ROOT_INO, "held-open");
    fill_file(&fs, big);
    fs.unlink(ROOT_INO, b"held-open").unwrap();
    let t = Instant::now();
    let r = fs.mknod(ROOT_INO, b"refused", S_IFREG | 0o644, 0, 0, 0);
    assert!(matches!(r, Err(FsError::NoSpace)), "{r:?}");
    assert!(
        t.elapsed() >= RELEASE_WAIT,
        "refused after {:?}",
        t.elapsed()
    );
    // Still open: readable, and freed by its release as before.
    assert_eq!(fs.read(big, 0, 4).unwrap(), vec![0x5A; 4]);
    fs.release(big).unwrap();
    mk(&fs, ROOT_INO, "after-the-release");
    fs.unmount().unwrap();
    let report = crate::fsck::check(s.as_ref(), &crate::fsck::FsckOptions::default()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

/// A `MemStore` whose next write (or flush, with `flushes`), once armed, waits until it
/// is let through.
#[derive(Default)]
struct GateStore {
    mem: Option<Arc<MemStore>>,
    flushes: bool,
    /// (armed, a write waits at the gate, let through)
    state: std::sync::Mutex<(bool, bool, bool)>,
    changed: std::sync::Condvar,
}

impl GateStore {
    fn wait_until(&self, what: impl Fn(&(bool, bool, bool)) -> bool) {
        let mut s = self.state.lock().unwrap();
        while !what(&s) {
            s = self.changed.wait(s).unwrap();
        }
    }
    fn set(&self, f: impl FnOnce(&mut (bool, bool, bool))) {
        f(&mut self.state.lock().unwrap());
        self.changed.notify_all();
    }
    /// Holds the I/O at the gate if armed (once).
    fn gate(&self) {
        let stop = std::mem::take(&mut self.state.lock().unwrap().0);
        if stop {
            self.set(|s| s.1 = true);
            self.wait_until(|s| s.2);
        }
    }
}

impl BlockStore for GateStore {
    fn num_blocks(&self) -> u64 {
        self.mem.as_ref().unwrap().num_blocks()
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.mem.as_ref().unwrap().read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> std::io::Result<()> {
        if !self.flushes {
            self.gate();
        }
        self.mem.as_ref().unwrap().write(addr, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        if self.flushes {
            self.gate();
        }
        self.mem.as_ref().unwrap().flush()
    }
    fn discard(&self, addr: u64, nblocks: u64) -> std::io::Result<()> {
        self.mem.as_ref().unwrap().discard(addr, nblocks)
    }
}

/// A write that fills holes puts its data on the device with the filesystem lock free; a
/// release of its file that comes meanwhile (the last name gone) frees the inode only
/// once the write is done, so the write finishes on its own inode and the filesystem
/// stays writable and consistent.
#[test]
fn a_release_during_an_allocating_write_waits_for_it() {
    let s = fresh(4096);
    let gate = Arc::new(GateStore {
        mem: Some(s.clone()),
        ..Default::default()
    });
    let fs = Arc::new(Fs::mount(gate.clone() as Arc<dyn BlockStore>).unwrap());
    let f = mk(&fs, ROOT_INO, "f");
    fs.sync().unwrap();
    gate.set(|s| s.0 = true);
    let writer = {
        let fs = fs.clone();
        std::thread::spawn(move || fs.write(f, 0, &[3u8; 8192]))
    };
    gate.wait_until(|s| s.1);
    fs.unlink(ROOT_INO, b"f").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let releaser = {
        let fs = fs.clone();
        std::thread::spawn(move || {
            let r = fs.release(f);
            tx.send(()).unwrap();
            r
        })
    };
    assert!(
        rx.recv_timeout(std::time::Duration::from_millis(100))
            .is_err(),
        "the release freed the inode while its write was in flight"
    );
    gate.set(|s| s.2 = true);
    assert_eq!(writer.join().unwrap().unwrap(), 8192);
    releaser.join().unwrap().unwrap();
    mk(&fs, ROOT_INO, "after");
    unmount_clean(fs, &s);
}

/// An fsync flushes with the filesystem lock free: other operations (and their commits)
/// go on while the device flushes, and a sync whose commit came after a flush began gets
/// a flush of its own.
#[test]
fn operations_go_on_while_a_sync_flushes() {
    let s = fresh(4096);
    let gate = Arc::new(GateStore {
        mem: Some(s.clone()),
        flushes: true,
        ..Default::default()
    });
    let fs = Arc::new(Fs::mount(gate.clone() as Arc<dyn BlockStore>).unwrap());
    let f = mk(&fs, ROOT_INO, "f");
    fs.write(f, 0, &[1u8; 100]).unwrap();
    gate.set(|s| s.0 = true);
    let syncer = {
        let fs = fs.clone();
        std::thread::spawn(move || fs.fsync(f))
    };
    gate.wait_until(|s| s.1);
    // The flush waits at the gate; operations run meanwhile.
    let (tx, rx) = std::sync::mpsc::channel();
    let other = {
        let fs = fs.clone();
        std::thread::spawn(move || {
            let g = mk(&fs, ROOT_INO, "g");
            fs.write(g, 0, &[2u8; 5000]).unwrap();
            fs.lock().commit().unwrap();
            tx.send(g).unwrap();
            fs.fsync(g)
        })
    };
    let g = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("operations waited for the flush");
    gate.set(|s| s.2 = true);
    syncer.join().unwrap().unwrap();
    other.join().unwrap().unwrap();
    // Both files' data and names are durable: a power cut now loses none of it.
    let fs = Arc::try_unwrap(fs).ok().expect("threads done");
    drop(fs);
    let cut = Arc::new(MemStore::from_image(s.crash_image(&mut |_| 0)));
    let fs = Fs::mount(cut.clone() as Arc<dyn BlockStore>).unwrap();
    assert_eq!(fs.read(f, 0, 100).unwrap(), vec![1u8; 100]);
    assert_eq!(fs.lookup(ROOT_INO, b"g").unwrap().ino, g);
    assert_eq!(fs.read(g, 0, 5000).unwrap(), vec![2u8; 5000]);
    fs.unmount().unwrap();
}

/// Unmounts a filesystem shared with threads that are done, and checks the image.
fn unmount_clean(fs: Arc<Fs>, s: &Arc<MemStore>) {
    let fs = Arc::try_unwrap(fs).ok().expect("threads done");
    fs.unmount().unwrap();
    super::crash_tests::assert_clean(s.as_ref(), "after unmount");
}

/// A server killed after a commit wrote its journal transaction but before the redo log
/// moved on leaves both: its successor must not replay the log's older images over the
/// journal's newer ones. Here the commit also carries blocks no record holds (mapped by a
/// write whose data waits at the gate, the lock free), so a replay of the log's bitmap
/// over the journal's would leave that file mapping blocks marked free.
#[test]
fn a_server_killed_between_a_commit_and_its_redo_reset_recovers_clean() {
    let s = fresh(4096);
    let gate = Arc::new(GateStore {
        mem: Some(s.clone()),
        ..Default::default()
    });
    let fs = Arc::new(Fs::mount(gate.clone() as Arc<dyn BlockStore>).unwrap());
    fs.attach_redo_log(redo::RedoLog::new(Box::new(vec![0u8; 4 << 20])).unwrap());
    let f = mk(&fs, ROOT_INO, "f");
    // Enough inodes between them that `a` and `f` live in different inode table blocks.
    for i in 0..(formats::BLOCK_SIZE / formats::inode::INODE_SIZE) {
        mk(&fs, ROOT_INO, &format!("filler{i}"));
    }
    let a = mk(&fs, ROOT_INO, "a");
    fs.sync().unwrap();
    // Acknowledged, in the log only: the bitmap with `a`'s blocks, `a`'s inode.
    fs.write(a, 0, &[1u8; 8192]).unwrap();
    gate.set(|s| s.0 = true);
    let writer = {
        let fs = fs.clone();
        std::thread::spawn(move || fs.write(f, 0, &[3u8; 40960]))
    };
    gate.wait_until(|s| s.1);
    // The log as it is until the commit moves it on, the image just after the commit.
    let region = fs.lock().redo.as_ref().expect("attached").region_copy();
    fs.sync().unwrap();
    let image = s.image();
    gate.set(|s| s.2 = true);
    assert_eq!(writer.join().unwrap().unwrap(), 40960);
    unmount_clean(fs, &s);

    let after = Arc::new(MemStore::from_image(image));
    let (fs, _) = Fs::recover(
        after.clone() as Arc<dyn BlockStore>,
        redo::RedoLog::new(Box::new(region)).unwrap(),
    )
    .unwrap();
    super::crash_tests::assert_clean(after.as_ref(), "recovered");
    assert_eq!(fs.read(a, 0, 9000).unwrap(), vec![1u8; 8192]);
    // The write in flight at the kill never returned: none of its data is there.
    assert!(fs.read(f, 0, 50000).unwrap().iter().all(|&b| b == 0));
    fs.unmount().unwrap();
    super::crash_tests::assert_clean(after.as_ref(), "after unmount");
}
