//! What applications expect of a POSIX filesystem, checked through a real mount with exact
//! results: sizes and holes, preallocation, appends from several processes, direct I/O,
//! shared mappings, attribute freshness, rename flags, extended attributes, space
//! accounting, huge directories, a full image, and fsync against a killed server.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use molt_tests::harness::{alive, comm, kill9, poll_until, Mount, TestImage, TestRng};

const BS: usize = 4096;

fn os_err(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Starts `dd` with `args`: another process writing through the mount. (The test binary
/// is multi-threaded and other tests' files are open in it, so children must exec.)
fn dd(args: &[String]) -> std::process::Child {
    std::process::Command::new("dd")
        .args(args)
        .arg("status=none")
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawning dd")
}

fn wait_ok(mut c: std::process::Child, what: &str) {
    let st = c.wait().expect("wait");
    assert!(st.success(), "{what}: {st}");
}

fn statvfs(p: &Path) -> rustix::fs::StatVfs {
    rustix::fs::statvfs(p).unwrap_or_else(|e| panic!("statvfs {p:?}: {}", io::Error::from(e)))
}

fn truncate_path(p: &Path, len: u64) {
    let r = molt_sys::truncate(p, len);
    assert!(
        r.is_ok(),
        "truncate {p:?} to {len}: {}",
        r.as_ref().unwrap_err()
    );
}

fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    molt_sys::fallocate(f.as_fd(), mode, off, len)
}

/// `len` bytes of a pattern that differs at every offset of every file (by `seed`).
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

fn remount(img: &TestImage, m: Mount) -> Mount {
    m.unmount();
    img.assert_clean();
    img.mount()
}

// ---- sizes, holes and preallocation ---------------------------------------------------

#[test]
fn truncate_and_ftruncate_grow_and_shrink_with_zeros_past_a_shrink() {
    let img = TestImage::new("truncate", "64M");
    let m = img.mount();
    let p = m.path().join("f");
    let data = pattern(1, 3 * BS + 1000);
    std::fs::write(&p, &data).unwrap();

    // ftruncate: shrink into the middle of a block, then grow again past the old end.
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.set_len(5000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 5000);
    f.set_len(40_000).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 40_000);
    let mut want = data[..5000].to_vec();
    want.resize(40_000, 0);
    assert_bytes(
        &std::fs::read(&p).unwrap(),
        &want,
        "after ftruncate shrink+grow",
    );
    drop(f);

    // truncate(2) by path: to a block boundary and back; then to zero.
    let q = m.path().join("g");
    std::fs::write(&q, pattern(2, 3 * BS)).unwrap();
    truncate_path(&q, BS as u64);
    truncate_path(&q, 3 * BS as u64);
    let mut want_g = pattern(2, BS);
    want_g.resize(3 * BS, 0);
    assert_bytes(
        &std::fs::read(&q).unwrap(),
        &want_g,
        "after truncate shrink+grow",
    );

    let r = m.path().join("h");
    std::fs::write(&r, pattern(3, 100_000)).unwrap();
    let f = OpenOptions::new().write(true).open(&r).unwrap();
    f.set_len(0).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 0);
    drop(f);
    let md = std::fs::metadata(&r).unwrap();
    assert_eq!((md.len(), md.blocks()), (0, 0), "truncated to zero");

    // The zeros are on the image, not only in the page cache.
    let m = remount(&img, m);
    assert_bytes(
        &std::fs::read(m.path().join("f")).unwrap(),
        &want,
        "after remount (f)",
    );
    assert_bytes(
        &std::fs::read(m.path().join("g")).unwrap(),
        &want_g,
        "after remount (g)",
    );
    assert_eq!(std::fs::metadata(m.path().join("h")).unwrap().len(), 0);
    m.unmount();
    img.assert_clean();
}

/// `st_blocks` straight after a change that frees or allocates blocks, before the
/// attribute cache times out.
#[test]
fn st_blocks_is_fresh_right_after_ftruncate_and_mkdir() {
    let img = TestImage::new("blocks-fresh", "64M");
    let m = img.mount();
    let p = m.path().join("f");
    std::fs::write(&p, pattern(4, 100_000)).unwrap();
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    assert_eq!(f.metadata().unwrap().blocks(), 25 * 8);
    f.set_len(BS as u64).unwrap();
    assert_eq!(
        f.metadata().unwrap().blocks(),
        8,
        "fstat right after ftruncate to 1 block"
    );
    f.set_len(0).unwrap();
    assert_eq!(
        std::fs::metadata(&p).unwrap().blocks(),
        0,
        "stat right after ftruncate to 0"
    );
    drop(f);
    // A new directory owns its header and first bucket block.
    let d = m.path().join("d");
    std::fs::create_dir(&d).unwrap();
    let right_away = std::fs::metadata(&d).unwrap().blocks();
    std::thread::sleep(Duration::from_millis(1100));
    let later = std::fs::metadata(&d).unwrap().blocks();
    assert!(later > 0);
    assert_eq!(
        right_away, later,
        "a new directory's st_blocks changes with no change to it"
    );
    m.unmount();
    img.assert_clean();
}

#[test]
fn fallocate_modes_and_st_blocks() {
    let img = TestImage::new("fallocate", "128M");
    let m = img.mount();
    let p = m.path().join("f");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    const MB: u64 = 1 << 20;

    // Mode 0: the size grows, the blocks are allocated and read as zeros.
    fallocate(&f, 0, 0, MB).unwrap();
    let md = std::fs::metadata(&p).unwrap();
    assert_eq!(md.len(), MB);
    assert!(
        md.blocks() >= MB / 512,
        "st_blocks {} after fallocate 1M",
        md.blocks()
    );
    assert!(
        md.blocks() <= MB / 512 + 64,
        "st_blocks {} after fallocate 1M",
        md.blocks()
    );
    assert!(std::fs::read(&p).unwrap().iter().all(|b| *b == 0));

    // KEEP_SIZE: blocks past the end, the size stays.
    fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, MB, MB).unwrap();
    let md = std::fs::metadata(&p).unwrap();
    assert_eq!(md.len(), MB, "KEEP_SIZE changed the size");
    assert!(
        md.blocks() >= 2 * MB / 512,
        "st_blocks {} after KEEP_SIZE",
        md.blocks()
    );

    // Data over the preallocated range, then a hole punched in the middle.
    let data = pattern(7, 2 * MB as usize);
    f.write_all_at(&data, 0).unwrap();
    f.sync_all().unwrap();
    let before = std::fs::metadata(&p).unwrap().blocks();
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        256 * 1024,
        512 * 1024,
    )
    .unwrap();
    // An unaligned punch zeroes partial blocks without freeing them.
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        100,
        5000,
    )
    .unwrap();
    let md = std::fs::metadata(&p).unwrap();
    assert_eq!(md.len(), 2 * MB, "PUNCH_HOLE changed the size");
    assert_eq!(
        before - md.blocks(),
        512 * 1024 / 512,
        "st_blocks {before} -> {} after punching 512K",
        md.blocks()
    );
    let mut want = data.clone();
    want[256 * 1024..768 * 1024].fill(0);
    want[100..5100].fill(0);
    assert_bytes(&std::fs::read(&p).unwrap(), &want, "after punching holes");

    // Unsupported modes are refused, not ignored.
    let e = fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096).unwrap_err();
    assert_eq!(
        os_err(&e),
        libc::EOPNOTSUPP,
        "PUNCH_HOLE without KEEP_SIZE: {e}"
    );
    drop(f);

    let m = remount(&img, m);
    assert_bytes(
        &std::fs::read(m.path().join("f")).unwrap(),
        &want,
        "after remount",
    );
    m.unmount();
    img.assert_clean();
}

#[test]
fn sparse_file_holes_read_zero_and_take_no_space() {
    let img = TestImage::new("sparse", "64M");
    let m = img.mount();
    let p = m.path().join("sparse");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    const G: u64 = 1 << 30;
    let tail = pattern(9, 5000);
    f.seek(SeekFrom::Start(G)).unwrap();
    f.write_all(&tail).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.sync_all().unwrap();
    // With the kernel's writeback cache, st_blocks is refreshed at close (flush).
    drop(f);
    let md = std::fs::metadata(&p).unwrap();
    assert_eq!(md.len(), G + 5000);
    // "head" and the tail: three data blocks (plus perhaps a block-map block).
    assert!(
        md.blocks() <= 4 * 8,
        "st_blocks {} for 3 data blocks",
        md.blocks()
    );
    assert!(
        md.blocks() >= 3 * 8,
        "st_blocks {} for 3 data blocks",
        md.blocks()
    );

    let mut f = File::open(&p).unwrap();
    let mut buf = vec![0xFFu8; 1 << 20];
    for off in [4096, 512 << 20, G - (1 << 20)] {
        f.read_exact_at(&mut buf, off).unwrap();
        assert!(
            buf.iter().all(|b| *b == 0),
            "hole at {off} does not read zeros"
        );
    }
    let mut got = vec![0u8; 5000];
    f.read_exact_at(&mut got, G).unwrap();
    assert_bytes(&got, &tail, "data past the hole");
    let mut head = [0u8; 8];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"head\0\0\0\0");
    // Reading at the end returns nothing.
    let mut end = Vec::new();
    f.seek(SeekFrom::Start(G + 5000)).unwrap();
    assert_eq!(f.read_to_end(&mut end).unwrap(), 0);
    drop(f);

    let m = remount(&img, m);
    let f = File::open(m.path().join("sparse")).unwrap();
    f.read_exact_at(&mut buf, 512 << 20).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    f.read_exact_at(&mut got, G).unwrap();
    assert_bytes(&got, &tail, "data past the hole after remount");
    drop(f);
    m.unmount();
    img.assert_clean();
}

// ---- concurrent writers ------------------------------------------------------------------

#[test]
fn o_append_from_two_processes_loses_and_overlaps_nothing() {
    const REC: usize = 64;
    const N: usize = 2000;
    let img = TestImage::new("append", "64M");
    let m = img.mount();
    let p = m.path().join("log");
    std::fs::write(&p, b"").unwrap();
    let records: Vec<Vec<u8>> = (0..2)
        .map(|w| {
            let mut v = Vec::with_capacity(REC * N);
            for i in 0..N {
                let mut r = format!("writer {w} record {i:06} ").into_bytes();
                r.resize(REC - 1, b'.');
                r.push(b'\n');
                v.extend_from_slice(&r);
            }
            v
        })
        .collect();
    // One write(2) of one record at a time, through O_APPEND, from two processes.
    let writers: Vec<_> = records
        .iter()
        .enumerate()
        .map(|(w, recs)| {
            let src = img.dir.path().join(format!("records-{w}"));
            std::fs::write(&src, recs).unwrap();
            dd(&[
                format!("if={}", src.display()),
                format!("of={}", p.display()),
                format!("bs={REC}"),
                "oflag=append".into(),
                "conv=notrunc".into(),
            ])
        })
        .collect();
    for w in writers {
        wait_ok(w, "an appending dd");
    }
    let got = std::fs::read(&p).unwrap();
    assert_eq!(got.len(), 2 * N * REC, "records lost or duplicated");
    let mut next = [0usize; 2];
    for (k, r) in got.chunks(REC).enumerate() {
        let w = usize::from(r.get(7) == Some(&b'1'));
        assert_eq!(
            r,
            &records[w][next[w] * REC..(next[w] + 1) * REC],
            "record {k} (at byte {}) is torn or out of order",
            k * REC
        );
        next[w] += 1;
    }
    assert_eq!(next, [N, N]);
    m.unmount();
    img.assert_clean();
}

#[test]
fn processes_writing_disjoint_regions_of_one_file() {
    // Regions end inside blocks, so neighbours share blocks at every boundary.
    const REGION: usize = 100_003;
    const WRITERS: usize = 4;
    let img = TestImage::new("disjoint", "64M");
    let m = img.mount();
    let p = m.path().join("shared");
    std::fs::write(&p, b"").unwrap();
    let data = pattern(11, REGION * WRITERS);
    // Odd write sizes, so that writes straddle blocks the neighbours write too.
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let src = img.dir.path().join(format!("region-{w}"));
            std::fs::write(&src, &data[w * REGION..(w + 1) * REGION]).unwrap();
            dd(&[
                format!("if={}", src.display()),
                format!("of={}", p.display()),
                format!("bs={}", 997 + 2 * w),
                format!("seek={}", w * REGION),
                "oflag=seek_bytes".into(),
                "conv=notrunc,fsync".into(),
            ])
        })
        .collect();
    for w in writers {
        wait_ok(w, "a writing dd");
    }
    assert_bytes(
        &std::fs::read(&p).unwrap(),
        &data,
        "after concurrent writers",
    );
    let m = remount(&img, m);
    assert_bytes(
        &std::fs::read(m.path().join("shared")).unwrap(),
        &data,
        "after remount",
    );
    m.unmount();
    img.assert_clean();
}

// ---- direct I/O and mappings ------------------------------------------------------------

/// A zeroed buffer aligned for O_DIRECT: `len` bytes at the first aligned offset of a
/// vector one alignment longer.
struct Aligned {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + BS];
        let off = raw.as_ptr().align_offset(BS);
        assert!(off < BS);
        Aligned { raw, off, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

#[test]
fn o_direct_aligned_reads_and_writes_read_back() {
    let img = TestImage::new("odirect", "64M");
    let m = img.mount();
    let p = m.path().join("direct");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .unwrap();
    let data = pattern(21, 256 * 1024);
    let mut wbuf = Aligned::new(data.len());
    wbuf.as_mut().copy_from_slice(&data);
    f.write_all_at(wbuf.as_mut(), 0).unwrap();
    // A second aligned write past a hole.
    f.write_all_at(&wbuf.as_mut()[..2 * BS], 1 << 20).unwrap();
    let mut rbuf = Aligned::new(data.len());
    f.read_exact_at(rbuf.as_mut(), 0).unwrap();
    assert_bytes(rbuf.as_mut(), &data, "O_DIRECT read of an O_DIRECT write");
    f.read_exact_at(&mut rbuf.as_mut()[..2 * BS], 1 << 20)
        .unwrap();
    assert_bytes(&rbuf.as_mut()[..2 * BS], &data[..2 * BS], "past the hole");
    assert_eq!(f.metadata().unwrap().len(), (1 << 20) + 2 * BS as u64);

    // Buffered and direct access see each other's writes.
    let buffered = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let mut got = vec![0u8; data.len()];
    buffered.read_exact_at(&mut got, 0).unwrap();
    assert_bytes(&got, &data, "buffered read of an O_DIRECT write");
    let other = pattern(22, 2 * BS);
    buffered.write_all_at(&other, 8 * BS as u64).unwrap();
    f.read_exact_at(&mut rbuf.as_mut()[..2 * BS], 8 * BS as u64)
        .unwrap();
    assert_bytes(
        &rbuf.as_mut()[..2 * BS],
        &other,
        "O_DIRECT read of a buffered write not yet flushed",
    );
    drop(buffered);
    drop(f);

    let m = remount(&img, m);
    let mut want = data.clone();
    want[8 * BS..10 * BS].copy_from_slice(&other);
    let all = std::fs::read(m.path().join("direct")).unwrap();
    assert_bytes(&all[..data.len()], &want, "after remount");
    m.unmount();
    img.assert_clean();
}

#[test]
fn mmap_shared_writes_reach_read_and_survive_a_remount() {
    let img = TestImage::new("mmap", "64M");
    let m = img.mount();
    let p = m.path().join("mapped");
    let len = 3 * BS + 100;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.set_len(len as u64).unwrap();
    let data = pattern(31, len);
    let map = molt_sys::SharedMapping::new(&f);
    assert!(map.is_ok(), "mmap: {}", map.as_ref().unwrap_err());
    let map = map.unwrap();
    assert_eq!(map.len(), len, "the mapping covers the file");
    map.write_at(0, &data).expect("writing through the mapping");
    let r = map.sync();
    assert!(r.is_ok(), "msync: {}", r.unwrap_err());
    drop(map);
    drop(f);
    assert_bytes(&std::fs::read(&p).unwrap(), &data, "read after msync");
    let m = remount(&img, m);
    assert_bytes(
        &std::fs::read(m.path().join("mapped")).unwrap(),
        &data,
        "after remount",
    );
    m.unmount();
    img.assert_clean();
}

// ---- attributes -------------------------------------------------------------------------

fn ctime_ns(p: &Path) -> i128 {
    let md = std::fs::symlink_metadata(p).unwrap();
    md.ctime() as i128 * 1_000_000_000 + md.ctime_nsec() as i128
}

/// Lets the clock move past the last timestamp (kernel timestamps may be coarse).
fn tick() {
    std::thread::sleep(Duration::from_millis(20));
}

#[test]
fn attributes_are_fresh_after_links_renames_chmod_and_other_writers() {
    let img = TestImage::new("attrs", "64M");
    let m = img.mount();
    let d = m.path();
    let f = d.join("f");
    std::fs::write(&f, b"x").unwrap();
    let held = File::open(&f).unwrap();
    assert_eq!(std::fs::metadata(&f).unwrap().nlink(), 1);

    let c0 = ctime_ns(&f);
    tick();
    std::fs::hard_link(&f, d.join("g")).unwrap();
    assert_eq!(
        std::fs::metadata(&f).unwrap().nlink(),
        2,
        "nlink after link"
    );
    assert_eq!(
        held.metadata().unwrap().nlink(),
        2,
        "fstat nlink after link"
    );
    let c1 = ctime_ns(&f);
    assert!(c1 > c0, "ctime did not change on link ({c0} -> {c1})");

    tick();
    std::fs::remove_file(d.join("g")).unwrap();
    assert_eq!(
        std::fs::metadata(&f).unwrap().nlink(),
        1,
        "nlink after unlink"
    );
    assert_eq!(
        held.metadata().unwrap().nlink(),
        1,
        "fstat nlink after unlink"
    );
    let c2 = ctime_ns(&f);
    assert!(c2 > c1, "ctime did not change on unlink of another name");

    tick();
    std::fs::rename(&f, d.join("f2")).unwrap();
    let c3 = ctime_ns(&d.join("f2"));
    assert!(c3 > c2, "ctime did not change on rename ({c2} -> {c3})");

    tick();
    std::fs::set_permissions(d.join("f2"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let md = std::fs::metadata(d.join("f2")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o640);
    let c4 = ctime_ns(&d.join("f2"));
    assert!(c4 > c3, "ctime did not change on chmod ({c3} -> {c4})");

    // Directory link counts follow mkdir/rmdir.
    let sub = d.join("sub");
    let n0 = std::fs::metadata(d).unwrap().nlink();
    std::fs::create_dir(&sub).unwrap();
    assert_eq!(
        std::fs::metadata(d).unwrap().nlink(),
        n0 + 1,
        "parent nlink after mkdir"
    );
    assert_eq!(std::fs::metadata(&sub).unwrap().nlink(), 2);
    std::fs::remove_dir(&sub).unwrap();
    assert_eq!(
        std::fs::metadata(d).unwrap().nlink(),
        n0,
        "parent nlink after rmdir"
    );

    // Another process writes; this one sees the new size and mtime at once, through a
    // path and through a descriptor it already held.
    let before = held.metadata().unwrap();
    assert_eq!(before.len(), 1);
    tick();
    let src = img.dir.path().join("payload");
    std::fs::write(&src, pattern(41, 12_345)).unwrap();
    wait_ok(
        dd(&[
            format!("if={}", src.display()),
            format!("of={}", d.join("f2").display()),
            "bs=12345".into(),
            "seek=100".into(),
            "oflag=seek_bytes".into(),
            "conv=notrunc".into(),
        ]),
        "the writing dd",
    );
    let after = std::fs::metadata(d.join("f2")).unwrap();
    assert_eq!(
        after.len(),
        12_445,
        "size right after another process wrote"
    );
    assert_eq!(
        held.metadata().unwrap().len(),
        12_445,
        "fstat size after another writer"
    );
    let mt = |md: &std::fs::Metadata| md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128;
    assert!(
        mt(&after) > mt(&before),
        "mtime did not move on another process's write"
    );
    drop(held);
    m.unmount();
    img.assert_clean();
}

// ---- rename flags -----------------------------------------------------------------------

fn renameat2(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    use rustix::fs::{RenameFlags, CWD};
    rustix::fs::renameat_with(CWD, from, CWD, to, RenameFlags::from_bits_retain(flags))?;
    Ok(())
}

#[test]
fn renameat2_noreplace_and_exchange() {
    let img = TestImage::new("rename2", "64M");
    let m = img.mount();
    let d = m.path();
    std::fs::write(d.join("a"), b"A").unwrap();
    std::fs::write(d.join("b"), b"B").unwrap();

    // NOREPLACE: refused over an existing name, both untouched; allowed onto a new one.
    let e = renameat2(&d.join("a"), &d.join("b"), libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(os_err(&e), libc::EEXIST, "{e}");
    assert_eq!(std::fs::read(d.join("a")).unwrap(), b"A");
    assert_eq!(std::fs::read(d.join("b")).unwrap(), b"B");
    renameat2(&d.join("a"), &d.join("c"), libc::RENAME_NOREPLACE).unwrap();
    assert!(!d.join("a").exists());
    assert_eq!(std::fs::read(d.join("c")).unwrap(), b"A");

    // EXCHANGE in one directory.
    renameat2(&d.join("b"), &d.join("c"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(std::fs::read(d.join("b")).unwrap(), b"A");
    assert_eq!(std::fs::read(d.join("c")).unwrap(), b"B");
    let e = renameat2(&d.join("b"), &d.join("missing"), libc::RENAME_EXCHANGE).unwrap_err();
    assert_eq!(os_err(&e), libc::ENOENT, "{e}");
    let e = renameat2(
        &d.join("b"),
        &d.join("c"),
        libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE,
    )
    .unwrap_err();
    assert_eq!(os_err(&e), libc::EINVAL, "{e}");

    // EXCHANGE of files across directories.
    let (d1, d2) = (d.join("d1"), d.join("d2"));
    std::fs::create_dir(&d1).unwrap();
    std::fs::create_dir(&d2).unwrap();
    std::fs::write(d1.join("x"), b"X").unwrap();
    std::fs::write(d2.join("y"), b"Y").unwrap();
    renameat2(&d1.join("x"), &d2.join("y"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(std::fs::read(d1.join("x")).unwrap(), b"Y");
    assert_eq!(std::fs::read(d2.join("y")).unwrap(), b"X");

    // EXCHANGE of a directory (with contents) and a file across directories.
    let sub = d1.join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("inner"), b"I").unwrap();
    assert_eq!(std::fs::metadata(&d1).unwrap().nlink(), 3);
    assert_eq!(std::fs::metadata(&d2).unwrap().nlink(), 2);
    renameat2(&sub, &d2.join("y"), libc::RENAME_EXCHANGE).unwrap();
    assert!(std::fs::metadata(d1.join("sub")).unwrap().is_file());
    assert_eq!(std::fs::read(d1.join("sub")).unwrap(), b"X");
    assert!(std::fs::metadata(d2.join("y")).unwrap().is_dir());
    assert_eq!(std::fs::read(d2.join("y/inner")).unwrap(), b"I");
    let check_tree = |d1: &Path, d2: &Path, when: &str| {
        assert_eq!(
            std::fs::metadata(d1).unwrap().nlink(),
            2,
            "{when}: d1 nlink"
        );
        assert_eq!(
            std::fs::metadata(d2).unwrap().nlink(),
            3,
            "{when}: d2 nlink"
        );
        assert_eq!(
            std::fs::metadata(d2.join("y/..")).unwrap().ino(),
            std::fs::metadata(d2).unwrap().ino(),
            "{when}: .. of the moved directory"
        );
        let names: Vec<String> = std::fs::read_dir(d2.join("y"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["inner"], "{when}");
    };
    check_tree(&d1, &d2, "after the exchange");
    // A directory cannot be exchanged into its own subtree.
    std::fs::write(d2.join("y/leaf"), b"L").unwrap();
    let e = renameat2(&d2.join("y"), &d2.join("y/leaf"), libc::RENAME_EXCHANGE).unwrap_err();
    assert_eq!(os_err(&e), libc::EINVAL, "{e}");
    std::fs::remove_file(d2.join("y/leaf")).unwrap();

    let m = remount(&img, m);
    let d = m.path();
    check_tree(&d.join("d1"), &d.join("d2"), "after remount");
    assert_eq!(std::fs::read(d.join("b")).unwrap(), b"A");
    m.unmount();
    img.assert_clean();
}

// ---- extended attributes ----------------------------------------------------------------

fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let flags = rustix::fs::XattrFlags::from_bits_retain(flags as u32);
    rustix::fs::setxattr(p, name, value, flags)?;
    Ok(())
}

/// getxattr with a buffer of `size` bytes (0 asks for the length).
fn getxattr(p: &Path, name: &str, size: usize) -> io::Result<Vec<u8>> {
    if size == 0 {
        return Ok(vec![0; rustix::fs::getxattr_query(p, name)?]);
    }
    let mut buf = vec![0u8; size];
    let n = rustix::fs::getxattr(p, name, &mut buf[..])?;
    buf.truncate(n);
    Ok(buf)
}

fn listxattr(p: &Path, size: usize) -> io::Result<Vec<u8>> {
    if size == 0 {
        return Ok(vec![0; rustix::fs::listxattr_query(p)?]);
    }
    let mut buf = vec![0u8; size];
    let n = rustix::fs::listxattr(p, &mut buf[..])?;
    buf.truncate(n);
    Ok(buf)
}

fn removexattr(p: &Path, name: &str) -> io::Result<()> {
    rustix::fs::removexattr(p, name)?;
    Ok(())
}

fn xattr_names(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = listxattr(p, 4096)
        .unwrap()
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn extended_attributes_set_get_list_remove_and_errors() {
    let img = TestImage::new("xattr", "64M");
    let m = img.mount();
    let f = m.path().join("f");
    std::fs::write(&f, b"data").unwrap();
    let dir = m.path().join("d");
    std::fs::create_dir(&dir).unwrap();

    for p in [&f, &dir] {
        // A fresh inode lists none (its creation time is statx's, not an attribute).
        assert!(xattr_names(p).is_empty(), "fresh inode has xattrs");
        let e = getxattr(p, "user.none", 64).unwrap_err();
        assert_eq!(os_err(&e), libc::ENODATA, "{e}");
        setxattr(p, "user.a", b"value-a", 0).unwrap();
        setxattr(p, "user.big", &pattern(51, 2000), 0).unwrap();
        assert_eq!(getxattr(p, "user.a", 0).unwrap().len(), 7, "size query");
        assert_eq!(getxattr(p, "user.a", 64).unwrap(), b"value-a");
        assert_eq!(getxattr(p, "user.big", 4096).unwrap(), pattern(51, 2000));
        let e = getxattr(p, "user.a", 3).unwrap_err();
        assert_eq!(os_err(&e), libc::ERANGE, "small getxattr buffer: {e}");
        assert_eq!(xattr_names(p), ["user.a", "user.big"]);
        let total = "user.a\0user.big\0".len();
        assert_eq!(listxattr(p, 0).unwrap().len(), total, "list size query");
        let e = listxattr(p, total - 1).unwrap_err();
        assert_eq!(os_err(&e), libc::ERANGE, "small listxattr buffer: {e}");

        let e = setxattr(p, "user.a", b"again", libc::XATTR_CREATE).unwrap_err();
        assert_eq!(
            os_err(&e),
            libc::EEXIST,
            "XATTR_CREATE over an existing one: {e}"
        );
        let e = setxattr(p, "user.new", b"v", libc::XATTR_REPLACE).unwrap_err();
        assert_eq!(
            os_err(&e),
            libc::ENODATA,
            "XATTR_REPLACE of a missing one: {e}"
        );
        setxattr(p, "user.a", b"replaced", libc::XATTR_REPLACE).unwrap();
        setxattr(p, "user.c", b"", libc::XATTR_CREATE).unwrap();
        assert_eq!(getxattr(p, "user.c", 16).unwrap(), b"");
        assert_eq!(getxattr(p, "user.a", 64).unwrap(), b"replaced");

        removexattr(p, "user.big").unwrap();
        let e = getxattr(p, "user.big", 4096).unwrap_err();
        assert_eq!(os_err(&e), libc::ENODATA, "{e}");
        let e = removexattr(p, "user.big").unwrap_err();
        assert_eq!(os_err(&e), libc::ENODATA, "removing a missing one: {e}");
        assert_eq!(xattr_names(p), ["user.a", "user.c"]);
    }
    // The file's data is untouched by its attributes.
    assert_eq!(std::fs::read(&f).unwrap(), b"data");

    let m = remount(&img, m);
    for p in [m.path().join("f"), m.path().join("d")] {
        assert_eq!(xattr_names(&p), ["user.a", "user.c"], "after remount");
        assert_eq!(getxattr(&p, "user.a", 64).unwrap(), b"replaced");
    }
    // Removing the last attribute leaves none listed.
    removexattr(&m.path().join("f"), "user.a").unwrap();
    removexattr(&m.path().join("f"), "user.c").unwrap();
    assert!(xattr_names(&m.path().join("f")).is_empty());
    m.unmount();
    img.assert_clean();
}

// ---- space accounting -------------------------------------------------------------------

#[test]
fn statfs_moves_when_a_big_file_is_written_and_deleted() {
    const BIG: usize = 32 << 20;
    let img = TestImage::new("statfs", "128M");
    let m = img.mount();
    let s0 = statvfs(m.path());
    assert_eq!(s0.f_bsize, BS as u64);
    assert!(s0.f_blocks >= (120 << 20) / BS as u64);
    assert!(s0.f_bfree <= s0.f_blocks && s0.f_bavail <= s0.f_bfree);
    let p = m.path().join("big");
    let mut f = File::create(&p).unwrap();
    let chunk = pattern(61, 1 << 20);
    for _ in 0..BIG / chunk.len() {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let s1 = statvfs(m.path());
    let used = s0.f_bfree - s1.f_bfree;
    let data_blocks = (BIG / BS) as u64;
    assert!(
        used >= data_blocks && used <= data_blocks + 64,
        "a {BIG}-byte file took {used} blocks"
    );
    assert_eq!(s0.f_ffree - s1.f_ffree, 1, "one inode for one file");
    let st_blocks = std::fs::metadata(&p).unwrap().blocks();
    assert!(st_blocks >= data_blocks * 8 && st_blocks <= (data_blocks + 16) * 8);

    std::fs::remove_file(&p).unwrap();
    // The inode is freed once the kernel forgets it, which it reports asynchronously.
    let back = poll_until(Duration::from_secs(10), || {
        let s = statvfs(m.path());
        s.f_bfree >= s0.f_bfree && s.f_ffree == s0.f_ffree
    });
    let s2 = statvfs(m.path());
    assert!(
        back,
        "free blocks {} -> {} -> {}, free inodes {} -> {} -> {}",
        s0.f_bfree, s1.f_bfree, s2.f_bfree, s0.f_ffree, s1.f_ffree, s2.f_ffree
    );
    assert_eq!(
        s2.f_bfree, s0.f_bfree,
        "blocks leaked by a write and delete"
    );
    m.unmount();
    img.assert_clean();
}

/// Creates `names` in `dir` with `mknod` from several threads.
fn mknod_all(dir: &Path, names: &[String], threads: usize) {
    std::thread::scope(|s| {
        for part in names.chunks(names.len().div_ceil(threads)) {
            s.spawn(move || {
                for n in part {
                    use rustix::fs::{FileType, Mode, CWD};
                    // A regular file needs no device number.
                    let r = rustix::fs::mknodat(
                        CWD,
                        dir.join(n),
                        FileType::RegularFile,
                        Mode::from_raw_mode(0o644),
                        0,
                    );
                    assert!(r.is_ok(), "mknod {n}: {}", io::Error::from(r.unwrap_err()));
                }
            });
        }
    });
}

#[test]
fn a_directory_of_100000_entries() {
    const N: usize = 100_000;
    // 16 KiB of image per inode: 100,000 files need a 2 GiB (sparse) image.
    let img = TestImage::new("bigdir", "2G");
    let m = img.mount();
    let dir = m.path().join("big");
    std::fs::create_dir(&dir).unwrap();
    let names: Vec<String> = (0..N)
        .map(|i| format!("entry-{i:06}-{}", i * 7919 % 1000))
        .collect();
    let inodes0 = statvfs(m.path()).f_ffree;
    let t = Instant::now();
    mknod_all(&dir, &names, 4);
    let created = t.elapsed();
    assert_eq!(inodes0 - statvfs(m.path()).f_ffree, N as u64);

    let t = Instant::now();
    let mut seen: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let listed = t.elapsed();
    assert_eq!(seen.len(), N, "readdir returned {} entries", seen.len());
    seen.sort();
    let mut want = names.clone();
    want.sort();
    if seen != want {
        let dup = seen.windows(2).find(|w| w[0] == w[1]).map(|w| w[0].clone());
        let missing = want
            .iter()
            .find(|n| seen.binary_search(n).is_err())
            .cloned();
        panic!("readdir is wrong: a duplicate {dup:?}, a missing entry {missing:?}");
    }
    for n in names.iter().step_by(97) {
        let md = std::fs::symlink_metadata(dir.join(n)).unwrap();
        assert!(md.is_file() && md.len() == 0, "{n}");
    }
    let e = std::fs::symlink_metadata(dir.join("entry-not-there")).unwrap_err();
    assert_eq!(os_err(&e), libc::ENOENT);
    assert_eq!(std::fs::metadata(&dir).unwrap().nlink(), 2);

    let t = Instant::now();
    std::thread::scope(|s| {
        for part in names.chunks(N / 4) {
            let dir = &dir;
            s.spawn(move || {
                for n in part {
                    std::fs::remove_file(dir.join(n)).unwrap_or_else(|e| panic!("unlink {n}: {e}"));
                }
            });
        }
    });
    let removed = t.elapsed();
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    std::fs::remove_dir(&dir).unwrap();
    assert!(
        poll_until(Duration::from_secs(30), || statvfs(m.path()).f_ffree
            == inodes0 + 1),
        "inodes not all freed: {} of {}",
        statvfs(m.path()).f_ffree,
        inodes0 + 1
    );
    eprintln!("bigdir: create {created:?}, readdir {listed:?}, unlink {removed:?}");
    m.unmount();
    img.assert_clean();
}

/// Fills `dir` with files of `chunk` (write, then fsync) until ENOSPC. Returns the bytes
/// of the files that were fsynced whole, and the file that met ENOSPC if it was created.
/// Any error other than ENOSPC fails the test.
fn fill(dir: &Path, chunk: &[u8]) -> (u64, Option<std::path::PathBuf>) {
    let mut total = 0u64;
    for i in 0.. {
        let p = dir.join(format!("fill-{i}"));
        let mut f = match File::create(&p) {
            Ok(f) => f,
            Err(e) if os_err(&e) == libc::ENOSPC => return (total, None),
            Err(e) => panic!("filling the image: creating {p:?}: {e}"),
        };
        match f.write_all(chunk).and_then(|_| f.sync_all()) {
            Ok(()) => total += chunk.len() as u64,
            Err(e) if os_err(&e) == libc::ENOSPC => return (total, Some(p)),
            Err(e) => panic!("filling the image: {p:?}: {e}"),
        }
    }
    unreachable!()
}

/// Checks the files `fill` left: the fsynced ones exactly; in the one that met ENOSPC,
/// every block is either what was written or zeros (never another file's data).
fn check_filled(dir: &Path, chunk: &[u8], failed: Option<&Path>, when: &str) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let got = std::fs::read(&p).unwrap();
        if Some(p.as_path()) == failed {
            assert!(
                got.len() <= chunk.len(),
                "{when}: {p:?} grew past what was written"
            );
            for (i, blk) in got.chunks(BS).enumerate() {
                let want = &chunk[i * BS..i * BS + blk.len()];
                assert!(
                    blk == want || blk.iter().all(|b| *b == 0),
                    "{when}: block {i} of {p:?} (cut short by ENOSPC) holds foreign data"
                );
            }
        } else {
            assert_bytes(&got, chunk, &format!("{when}: fsynced {p:?}"));
        }
    }
}

#[test]
fn enospc_fill_and_delete_twenty_times_leaks_nothing() {
    let img = TestImage::new("enospc", "64M");
    let m = img.mount();
    let dir = m.path().join("fill");
    std::fs::create_dir(&dir).unwrap();
    let chunk = pattern(71, 1 << 20);
    let s0 = statvfs(m.path());
    let free_bytes = s0.f_bfree * s0.f_bsize;
    for cycle in 0..20 {
        let (filled, failed) = fill(&dir, &chunk);
        assert!(
            filled + (4 << 20) >= free_bytes,
            "cycle {cycle}: ENOSPC after {filled} bytes of {free_bytes} free"
        );
        let full = statvfs(m.path());
        assert!(
            full.f_bfree < 256 + 64,
            "cycle {cycle}: {} blocks free when full",
            full.f_bfree
        );
        check_filled(&dir, &chunk, failed.as_deref(), &format!("cycle {cycle}"));
        for e in std::fs::read_dir(&dir).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        let back = poll_until(Duration::from_secs(10), || {
            let s = statvfs(m.path());
            s.f_bfree + 8 >= s0.f_bfree && s.f_ffree == s0.f_ffree
        });
        let s = statvfs(m.path());
        assert!(
            back,
            "cycle {cycle}: free blocks {} (start {}), free inodes {} (start {})",
            s.f_bfree, s0.f_bfree, s.f_ffree, s0.f_ffree
        );
        // The filesystem still takes ordinary changes.
        std::fs::write(dir.join("probe"), b"ok").unwrap();
        std::fs::remove_file(dir.join("probe")).unwrap();
    }
    m.unmount();
    img.assert_clean();
}

/// On a full image, a file closed, unlinked and at once replaced by a new one: the new
/// one finds the space the old one held, every time. The old file's space comes back
/// when the kernel forgets it, and the kernel sends that FORGET on its own time (queued
/// inside `unlink`, or once the close's RELEASE is answered), so the create may reach the
/// server first; it waits for the space instead of failing with ENOSPC.
#[test]
fn a_create_right_after_an_unlink_on_a_full_image_finds_the_space() {
    let img = TestImage::new("unlink-create", "64M");
    let m = img.mount();
    for round in 0..100 {
        let filler = File::create(m.path().join("filler")).expect("create the filler");
        let mut end = 0u64;
        for piece in [1u64 << 20, 64 << 10, BS as u64] {
            loop {
                match fallocate(&filler, 0, end, piece) {
                    Ok(()) => end += piece,
                    Err(e) if os_err(&e) == libc::ENOSPC => break,
                    Err(e) => panic!("round {round}: fallocate: {e}"),
                }
            }
        }
        drop(filler);
        std::fs::remove_file(m.path().join("filler")).expect("remove the filler");
        let p = m.path().join(format!("after-{round}"));
        let mut f = File::create(&p)
            .unwrap_or_else(|e| panic!("round {round}: create right after the unlink: {e}"));
        f.write_all(b"ok")
            .and_then(|()| f.sync_all())
            .unwrap_or_else(|e| panic!("round {round}: write right after the unlink: {e}"));
        drop(f);
        std::fs::remove_file(&p).expect("remove");
    }
    m.unmount();
    img.assert_clean();
}

// ---- fsync against a killed server ------------------------------------------------------

/// A server killed with SIGKILL is replaced: what was fsynced, and what was only
/// written, is there, through the same descriptors and after a remount.
#[test]
fn data_survives_kill9_of_the_server() {
    let img = TestImage::new("fsync-kill", "64M");
    let m = img.mount();
    let d = m.path().to_path_buf();
    let a = pattern(81, 300_000);
    let b = pattern(82, 70_000);
    let c = pattern(83, 5_000);
    {
        let mut f = File::create(d.join("a")).unwrap();
        f.write_all(&a).unwrap();
        f.sync_all().unwrap();
        let mut f = File::create(d.join("b")).unwrap();
        f.write_all(&b).unwrap();
        f.sync_data().unwrap();
        // A new file in a new directory: fsync the file and both directories.
        std::fs::create_dir(d.join("sub")).unwrap();
        let mut f = File::create(d.join("sub/c")).unwrap();
        f.write_all(&c).unwrap();
        f.sync_all().unwrap();
        File::open(d.join("sub")).unwrap().sync_all().unwrap();
        File::open(&d).unwrap().sync_all().unwrap();
        // An overwrite in place of fsynced data, fsynced again.
        let f = OpenOptions::new().write(true).open(d.join("a")).unwrap();
        f.write_all_at(b"OVERWRITTEN", 4090).unwrap();
        f.sync_data().unwrap();
        // An append inside the last, already allocated block: only the size changes.
        let mut f = OpenOptions::new().append(true).open(d.join("b")).unwrap();
        f.write_all(b"APPENDED").unwrap();
        f.sync_data().unwrap();
    }
    // Left unsynced and open while the server dies: the replacement keeps it.
    let unsynced = pattern(84, 100_000);
    let mut open = File::create(d.join("unsynced")).unwrap();
    open.write_all(&unsynced).unwrap();

    let (sup, children) = m.pids();
    let server = children
        .iter()
        .copied()
        .find(|p| comm(*p).as_deref() == Some("fsd"))
        .expect("fsd serve");
    kill9(server);
    // The supervisor replaces the server; the descriptor held across the crash works.
    open.write_all(b"more")
        .expect("a write after the server died");
    open.sync_all().expect("an fsync after the server died");
    assert!(alive(sup), "the supervisor went down with its server");
    assert!(!alive(server), "the killed server is still there");
    let mut want_unsynced = unsynced.clone();
    want_unsynced.extend_from_slice(b"more");
    assert_bytes(
        &std::fs::read(d.join("unsynced")).unwrap(),
        &want_unsynced,
        "written before and after the crash",
    );
    drop(open);
    m.unmount();
    img.assert_clean();

    let m = img.mount();
    let mut want_a = a.clone();
    want_a[4090..4101].copy_from_slice(b"OVERWRITTEN");
    assert_bytes(
        &std::fs::read(m.path().join("a")).unwrap(),
        &want_a,
        "fsync'd a",
    );
    let mut want_b = b.clone();
    want_b.extend_from_slice(b"APPENDED");
    assert_bytes(
        &std::fs::read(m.path().join("b")).unwrap(),
        &want_b,
        "fdatasync'd b",
    );
    assert_bytes(
        &std::fs::read(m.path().join("sub/c")).unwrap(),
        &c,
        "fsync'd sub/c",
    );
    assert_bytes(
        &std::fs::read(m.path().join("unsynced")).unwrap(),
        &want_unsynced,
        "written around the crash",
    );
    m.unmount();
    img.assert_clean();
}

/// A write cut short by a full image keeps, and reports, what it wrote: the file's size
/// covers every block it was given, so no space is held past the end of a file.
#[test]
fn a_write_cut_short_by_enospc_keeps_what_it_wrote() {
    let img = TestImage::new("enospc-short", "64M");
    let m = img.mount();
    let dir = m.path().join("fill");
    std::fs::create_dir(&dir).unwrap();
    let chunk = pattern(72, 1 << 20);
    let (_, failed) = fill(&dir, &chunk);
    let failed = failed.expect("a file met ENOSPC");
    let m = remount(&img, m);
    let p = m.path().join("fill").join(failed.file_name().unwrap());
    let md = std::fs::metadata(&p).unwrap();
    let data_sectors = md.len().div_ceil(BS as u64) * 8;
    assert!(
        md.blocks() <= data_sectors + 8,
        "{p:?}: size {} but {} sectors allocated",
        md.len(),
        md.blocks()
    );
    check_filled(&m.path().join("fill"), &chunk, Some(&p), "after remount");
    m.unmount();
    img.assert_clean();
}
