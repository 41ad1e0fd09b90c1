//! On-disk format conversions inside live updates (`docs/live-update.md`, format change):
//! a populated image moves v1 → v2 → v3 while a workload runs, conversions survive the
//! stack being killed at random points, and a conversion the image has no room for is
//! refused before anything changes.
//!
//! Every file's content and metadata is compared before and after through a manifest:
//! type, mode, owner, size, link count, mtime, ctime, symlink target, user xattrs and a
//! content crc. Allocation (`st_blocks`) is left out: the v3 block map takes more extent
//! blocks for the same extents.
//!
//! `MOLT_CONVERT_KILLS` raises the number of kills of the crash test (default 30), and
//! `MOLT_CONVERT_KILLS_PER_ROUND` lets several land in one conversion (default 1).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use molt_tests::harness::{alive, bin, kill9, poll_until, Keyring, TestImage, TestRng};

use super::live::{apply, mount_live, pack, status, text, Load, COMMITTED, EXPIRES, REFUSED};

/// The version string of the fsd binary under test.
fn fsd_version() -> String {
    let o = std::process::Command::new(bin("fsd"))
        .arg("component-info")
        .output()
        .expect("fsd component-info");
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).expect("component-info JSON");
    info["version"].as_str().expect("a version").to_string()
}

/// A package whose fsd (this build) converts the image from format `from` to `to`.
fn conversion_package(keys: &Keyring, work: &Path, sequence: u64, from: u32, to: u32) -> PathBuf {
    let v = fsd_version();
    let manifest = format!(
        "[package]\n\
         name = \"format-v{from}-to-v{to}\"\n\
         sequence = {sequence}\n\
         expires_unix = {EXPIRES}\n\
         nature = \"data-on-disk\"\n\
         description = \"converts the image to format v{to} online\"\n\
         deadline_ms = 10000\n\n\
         [format]\n\
         from = {from}\n\
         to = {to}\n\n\
         [[component]]\n\
         name = \"fsd\"\n\
         applies_to = [{v:?}]\n\
         new_version = {v:?}\n\
         binary = \"bin/fsd\"\n\
         state_schema_reads = [1, 2]\n\
         state_schema_writes = 2\n\
         required_state = [\"quiescent\"]\n\n\
         [[file]]\n\
         path = \"bin/fsd\"\n"
    );
    pack(
        keys,
        &work.join(format!("v{from}-v{to}-{sequence}")),
        &manifest,
        &[("bin/fsd", &bin("fsd"))],
    )
}

/// The format version recorded in an unmounted image's superblock.
fn image_version(image: &Path) -> u32 {
    let mut b = vec![0u8; formats::BLOCK_SIZE];
    File::open(image)
        .and_then(|f| f.read_exact_at(&mut b, 0))
        .expect("read the superblock");
    formats::superblock::Superblock::decode(&b)
        .expect("superblock")
        .format_version
        .0
}

/// Fills `dir` with `files` files across nested directories: small files of varied
/// sizes, hard links, short and long symlinks, user xattrs, sparse files, large files
/// (16 MiB), and files whose block map has many extents (written every other block).
fn populate(dir: &Path, files: usize, seed: u64) {
    let mut rng = TestRng::new(seed);
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut made: Vec<PathBuf> = Vec::new();
    for i in 0..files {
        let sub = dir.join(format!("d{}/e{}", i % 23, i % 7));
        if i < 23 * 7 {
            std::fs::create_dir_all(&sub).expect("mkdir -p");
        }
        let path = sub.join(format!("f{i}"));
        match i % 100 {
            0 => {
                // Sparse: data far apart.
                let f = File::create(&path).expect("create");
                f.write_all_at(&rng.bytes(5000), 0).expect("write");
                f.write_all_at(&rng.bytes(3000), 9 << 20).expect("write");
            }
            5 if i % 2500 == 5 => {
                // Large: 16 MiB of data.
                let mut f = File::create(&path).expect("create");
                for _ in 0..16 {
                    f.write_all(&rng.bytes(1 << 20)).expect("write");
                }
            }
            1 if i % 1000 == 1 => {
                // Many extents: every other block.
                let f = File::create(&path).expect("create");
                for b in 0..200u64 {
                    f.write_all_at(&rng.bytes(4096), b * 8192).expect("write");
                }
            }
            2 if !made.is_empty() => {
                let target = made[rng.below(made.len() as u64) as usize].clone();
                std::fs::hard_link(&target, &path).expect("link");
            }
            3 => {
                let reps = if rng.below(2) == 0 { 1 } else { 120 };
                let target = format!("t{}{}", rng.next_u64(), "y".repeat(reps));
                std::os::unix::fs::symlink(target, &path).expect("symlink");
                continue;
            }
            _ => {
                let len = match rng.below(10) {
                    0 => 40_000 + rng.below(100_000) as usize,
                    1 => 0,
                    _ => rng.below(6000) as usize,
                };
                std::fs::write(&path, rng.bytes(len)).expect("write");
            }
        }
        if i % 37 == 0 {
            set_xattr(&path, "user.note", format!("note {i}").as_bytes());
        }
        made.push(path);
    }
    File::open(dir).and_then(|d| d.sync_all()).expect("fsync");
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let r = rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty());
    assert!(
        r.is_ok(),
        "setxattr {path:?}: {}",
        std::io::Error::from(r.unwrap_err())
    );
}

/// User xattrs of `path` except Molt's virtual ones, sorted.
fn user_xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(path, &mut names[..]);
    assert!(
        n.is_ok(),
        "listxattr {path:?}: {}",
        std::io::Error::from(n.unwrap_err())
    );
    let n = n.unwrap();
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let s = String::from_utf8_lossy(name).into_owned();
        if !s.starts_with("user.") || s.starts_with("user.molt.") {
            continue;
        }
        let c = CString::new(name).expect("name");
        let mut v = vec![0u8; 4096];
        let len = rustix::fs::lgetxattr(path, c.as_c_str(), &mut v[..]);
        assert!(len.is_ok(), "getxattr {path:?} {s}");
        v.truncate(len.unwrap());
        out.push((s, v));
    }
    out.sort();
    out
}

/// One line per name under `dir`: what a conversion must not change.
fn manifest(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, p: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = std::fs::read_dir(p)
            .unwrap_or_else(|e| panic!("readdir {p:?}: {e}"))
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for path in entries {
            let m = std::fs::symlink_metadata(&path).expect("lstat");
            let common = format!(
                "mode={:o} uid={} gid={} nlink={} mtime={}.{} ctime={}.{} xattrs={:?}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.nlink(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                user_xattrs(&path)
            );
            let what = if m.file_type().is_symlink() {
                format!("symlink {:?}", std::fs::read_link(&path).expect("readlink"))
            } else if m.is_dir() {
                walk(root, &path, out);
                "dir".to_string()
            } else {
                let data = std::fs::read(&path).expect("read");
                format!("file size={} crc={:08x}", m.size(), crc32fast::hash(&data))
            };
            let key = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            out.insert(key, format!("{what} {common}"));
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn assert_same(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>, ctx: &str) {
    for (k, v) in before {
        match after.get(k) {
            Some(w) if w == v => {}
            Some(w) => panic!("{ctx}: {k} changed:\n  before {v}\n  after  {w}"),
            None => panic!("{ctx}: {k} is gone"),
        }
    }
    if let Some(k) = after.keys().find(|k| !before.contains_key(*k)) {
        panic!("{ctx}: {k} appeared");
    }
}

/// The conversion a mount runs, from `updater status`: (format, conversion in progress).
fn conversion_state(mnt: &Path) -> (u64, bool) {
    let st = status(mnt);
    (
        st["format_version"].as_u64().unwrap_or(0),
        !st["conversion"].is_null(),
    )
}

/// A populated v1 image converted to v2 and then v3 by two live updates while the stress
/// workload runs: zero workload errors, every file identical, fsck clean, format v3.
#[test]
fn online_conversion_v1_to_v3_under_load() {
    let keys = Keyring::new("convert-online-keys");
    let img = TestImage::with_mkfs_args("convert-online", "1G", &["--format-version", "1"]);
    let m = mount_live(&img, &keys, None);
    let tree = m.path().join("tree");
    let t = Instant::now();
    populate(&tree, 10_000, 0x5eed);
    let before = manifest(&tree);
    println!("populated {} names in {:?}", before.len(), t.elapsed());
    assert!(before.len() >= 10_000);
    let load_dir = m.path().join("load");
    std::fs::create_dir(&load_dir).expect("mkdir load");
    let load = Load::start(&load_dir, 3, "read=40,write=40,meta=20");
    for (sequence, (from, to)) in [(1, (1, 2)), (2, (2, 3))] {
        let pkg = conversion_package(&keys, img.dir.path(), sequence, from, to);
        let a = apply(m.path(), &pkg, &[]);
        assert_eq!(a.code, COMMITTED, "v{from} -> v{to}:\n{}", a.out);
        assert!(
            a.phase_ms("Conversion").is_some(),
            "no conversion phase:\n{}",
            a.out
        );
        println!(
            "v{from} -> v{to}: {} ms in all, conversion {:?} ms",
            a.took(),
            a.phase_ms("Conversion")
        );
        assert_eq!(conversion_state(m.path()), (u64::from(to), false));
    }
    load.finish();
    assert_same(&before, &manifest(&tree), "after v1 -> v2 -> v3");
    let crtime = xattr_text(&tree.join("d0/e0/f0"), "user.molt.crtime");
    assert!(crtime.contains('.'), "crtime {crtime:?}");
    m.unmount();
    img.assert_clean();
    assert_eq!(image_version(&img.image), 3);
    let m = img.mount();
    assert_same(
        &before,
        &manifest(&m.path().join("tree")),
        "after a remount",
    );
    m.unmount();
}

fn xattr_text(path: &Path, name: &str) -> String {
    let mut v = vec![0u8; 256];
    let len = rustix::fs::lgetxattr(path, name, &mut v[..]);
    assert!(
        len.is_ok(),
        "getxattr {name}: {}",
        std::io::Error::from(len.unwrap_err())
    );
    v.truncate(len.unwrap());
    String::from_utf8(v).expect("utf-8")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    Supervisor,
    Server,
    Driver,
}

/// Kills components of the stack at random points of online conversions (v1 → v2 and
/// v2 → v3, from copies of one populated image) until `MOLT_CONVERT_KILLS` kills landed
/// while a conversion ran. After each kill the stack recovers (server, driver) or is
/// mounted again (supervisor), the conversion finishes by itself, the tree matches its
/// manifest, and after the unmount fsck is clean and the image has the new version.
#[test]
fn kills_during_online_conversions_lose_nothing() {
    let want: u32 = std::env::var("MOLT_CONVERT_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let seed = molt_tests::harness::seed_from_env("MOLT_CRASH_SEED");
    println!("seed {seed} (MOLT_CRASH_SEED replays it), {want} kills");
    let mut rng = TestRng::new(seed);
    let keys = Keyring::new("convert-kill-keys");
    let img = TestImage::with_mkfs_args("convert-kill", "256M", &["--format-version", "1"]);
    let pristine = {
        let m = img.mount();
        populate(&m.path().join("tree"), 6000, seed);
        m.unmount();
        img.dir.path().join("pristine-v1.img")
    };
    std::fs::copy(&img.image, &pristine).expect("copy");
    let before = {
        let m = img.mount();
        let b = manifest(&m.path().join("tree"));
        m.unmount();
        b
    };
    let mut kills = 0;
    // Component kills the supervisor has recovered from this round.
    let mut recovered_here;
    let mut round = 0u64;
    let started = Instant::now();
    // Both conversions are covered. By default a round takes one kill, so every kill is
    // followed by the whole check (conversion finished, manifest, unmount, fsck);
    // MOLT_CONVERT_KILLS_PER_ROUND lets several kills land in one conversion.
    let per_round: u32 = std::env::var("MOLT_CONVERT_KILLS_PER_ROUND")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    while kills < want || round < 2 {
        round += 1;
        let round_start = kills;
        let (from, to) = if round % 2 == 1 { (1, 2) } else { (2, 3) };
        std::fs::copy(&pristine, &img.image).expect("restore the image");
        if from == 2 {
            let o = molt_tests::harness::fsd(&[
                "convert",
                img.image.to_str().expect("utf-8"),
                "--to",
                "2",
            ]);
            assert!(o.status.success(), "fsd convert: {}", text(&o));
        }
        let m = mount_live(&img, &keys, None);
        recovered_here = 0;
        let pkg = conversion_package(&keys, img.dir.path(), round, from, to);
        let a = apply(m.path(), &pkg, &["--no-wait"]);
        assert!(
            a.code == COMMITTED || a.outcome() == "Started",
            "round {round}: apply:\n{}",
            a.out
        );
        let ctx = |k: u32| format!("seed {seed} round {round} (v{from} -> v{to}) kill {k}");
        loop {
            std::thread::sleep(Duration::from_millis(rng.below(40)));
            let (format, converting) = conversion_state(m.path());
            if !converting && format == u64::from(to) {
                break;
            }
            if kills - round_start >= per_round {
                continue;
            }
            let Some((sup, server, driver)) = m.stack_pids() else {
                continue;
            };
            let victim = match rng.below(5) {
                0 => Victim::Supervisor,
                1 | 2 => Victim::Server,
                _ => Victim::Driver,
            };
            // A supervisor gives up after 5 component crashes within a minute (a crash
            // loop); a supervisor that adopts the stack keeps that count.
            if victim != Victim::Supervisor && recovered_here == 4 {
                continue;
            }
            let pid = match victim {
                Victim::Supervisor => sup,
                Victim::Server => server,
                Victim::Driver => driver,
            };
            kill9(pid);
            kills += 1;
            let what = format!("{}: {victim:?}", ctx(kills));
            // Every victim is replaced: a component by the supervisor, the supervisor by
            // a new one that adopts the running components.
            assert!(
                poll_until(Duration::from_secs(20), || {
                    !alive(pid)
                        && m.stack_pids()
                            .is_some_and(|(s, f, d)| alive(s) && ![s, f, d].contains(&pid))
                }),
                "{what}: no replacement: {:?}",
                m.stack_pids()
            );
            if victim != Victim::Supervisor {
                recovered_here += 1;
            }
        }
        assert_same(&before, &manifest(&m.path().join("tree")), &ctx(kills));
        m.unmount();
        img.assert_clean();
        assert_eq!(image_version(&img.image), to, "{}", ctx(kills));
        println!(
            "round {round}: v{from} -> v{to} done, {kills} kills so far, {:?}",
            started.elapsed()
        );
    }
}

/// A conversion that needs more free space than the image has is refused before any
/// component is told, with the figures.
#[test]
fn conversion_without_room_is_refused() {
    let keys = Keyring::new("convert-room-keys");
    let img = TestImage::with_mkfs_args("convert-room", "64M", &["--format-version", "2"]);
    let m = mount_live(&img, &keys, None);
    // A map of 3,000 extents: v3's narrower extent blocks need more of them.
    let f = File::create(m.path().join("fragmented")).expect("create");
    for b in 0..3000u64 {
        f.write_all_at(&[b as u8; 4096], b * 8192).expect("write");
    }
    f.sync_all().expect("fsync");
    drop(f);
    // Leave almost nothing free: preallocate in ever smaller pieces until nothing fits.
    let filler = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(m.path().join("filler"))
        .expect("filler");
    let mut end = 0i64;
    for piece in [1i64 << 20, 64 << 10, 4 << 10] {
        loop {
            let r = molt_sys::fallocate(
                std::os::fd::AsFd::as_fd(&filler),
                0,
                end as u64,
                piece as u64,
            );
            if let Err(e) = r {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "fallocate: {e}");
                break;
            }
            end += piece;
        }
    }
    filler.sync_all().expect("fsync");
    drop(filler);
    let st = nix_statvfs(m.path());
    println!(
        "free after filling: {} KiB",
        st.f_bavail * st.f_frsize / 1024
    );
    let pid_before = m.stack_pids().expect("stack").1;
    let pkg = conversion_package(&keys, img.dir.path(), 1, 2, 3);
    let a = apply(m.path(), &pkg, &[]);
    assert_eq!(a.code, REFUSED, "{}", a.out);
    assert_eq!(
        a.failed_checks(),
        ["conversion space"],
        "only the space check fails:\n{}",
        a.out
    );
    assert!(
        !a.reached("Notification"),
        "a component was notified:\n{}",
        a.out
    );
    assert_eq!(m.stack_pids().expect("stack").1, pid_before);
    assert_eq!(conversion_state(m.path()), (2, false));
    std::fs::remove_file(m.path().join("filler")).expect("remove the filler");
    let mut w = File::create(m.path().join("still-writable")).expect("create");
    w.write_all(b"ok").expect("write");
    drop(w);
    m.unmount();
    img.assert_clean();
    assert_eq!(image_version(&img.image), 2);
}

fn nix_statvfs(p: &Path) -> rustix::fs::StatVfs {
    let st = rustix::fs::statvfs(p);
    assert!(st.is_ok());
    st.unwrap()
}

/// The ACLs of a tree as `getfacl` prints them, paths relative to `dir`.
fn acl_listing(dir: &Path) -> String {
    let out = std::process::Command::new("getfacl")
        .args(["-R", "-n", "-p", "."])
        .current_dir(dir)
        .output()
        .expect("getfacl");
    assert!(out.status.success(), "getfacl: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether uid/gid 65534 (no other groups) can read `path`.
fn nobody_can_read(path: &Path) -> bool {
    std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "cat",
        ])
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("setpriv")
        .success()
}

/// POSIX ACLs are metadata like any other: an online conversion (a live update of the
/// server), a kill -9 of the server with its recovery in place, and a remount keep every
/// entry, and the kernel keeps enforcing them.
#[test]
fn acls_survive_a_conversion_a_crash_and_a_remount() {
    let keys = Keyring::new("convert-acl-keys");
    let img = TestImage::with_mkfs_args("convert-acl", "256M", &["--format-version", "1"]);
    let m = mount_live(&img, &keys, None);
    let tree = m.path().join("tree");
    std::fs::create_dir(&tree).expect("mkdir tree");
    let setfacl = |args: &[&str], path: &Path| {
        let out = std::process::Command::new("setfacl")
            .args(args)
            .arg(path)
            .output()
            .expect("setfacl");
        assert!(out.status.success(), "setfacl {args:?}: {}", text(&out));
    };
    let granted = tree.join("granted");
    let denied = tree.join("denied");
    for f in [&granted, &denied] {
        std::fs::write(f, b"secret").expect("write");
    }
    std::fs::set_permissions(
        &granted,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    setfacl(&["-m", "u:65534:r"], &granted);
    setfacl(&["-m", "u:65534:-,o::r"], &denied);
    let inherit = tree.join("inherit");
    std::fs::create_dir(&inherit).expect("mkdir");
    setfacl(&["-d", "-m", "u:65534:rwx,g::r-x,o::-"], &inherit);
    std::fs::write(inherit.join("child"), b"x").expect("write child");
    std::fs::create_dir(inherit.join("sub")).expect("mkdir sub");
    let before = acl_listing(&tree);
    assert!(
        before.contains("user:65534:r--") && before.contains("default:user:65534:rwx"),
        "the ACLs were not set:\n{before}"
    );
    let check = |dir: &Path, ctx: &str| {
        assert_eq!(acl_listing(dir), before, "{ctx}: ACLs changed");
        assert!(
            nobody_can_read(&dir.join("granted")),
            "{ctx}: named user lost read"
        );
        assert!(
            !nobody_can_read(&dir.join("denied")),
            "{ctx}: named user denial lost"
        );
    };
    check(&tree, "before");
    for (sequence, (from, to)) in [(1, (1, 2)), (2, (2, 3))] {
        let pkg = conversion_package(&keys, img.dir.path(), sequence, from, to);
        let a = apply(m.path(), &pkg, &[]);
        assert_eq!(a.code, COMMITTED, "v{from} -> v{to}:\n{}", a.out);
        assert_eq!(conversion_state(m.path()), (u64::from(to), false));
        check(
            &tree,
            &format!("after the online conversion v{from} -> v{to}"),
        );
    }
    let (sup, server, _) = m.stack_pids().expect("stack pids");
    kill9(server);
    assert!(
        poll_until(Duration::from_secs(30), || m
            .stack_pids()
            .is_some_and(|(s, f, _)| s == sup && f != server)),
        "the killed server was not replaced"
    );
    check(&tree, "after kill -9 of the server");
    m.unmount();
    img.assert_clean();
    let m = img.mount();
    check(&m.path().join("tree"), "after a remount");
    m.unmount();
    img.assert_clean();
}

/// The events of a `--json` conversation: one JSON object per line, the last a `Done`.
fn json_events(out: &std::process::Output) -> Vec<serde_json::Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON event ({e}): {l:?}"))
        })
        .collect();
    assert!(
        events.last().is_some_and(|e| e.get("Done").is_some()),
        "the last event is not Done:\n{stdout}"
    );
    events
}

/// `updater check --json` and `updater apply --json` stream the protocol's events, so
/// scripts read checks, phases and outcomes without parsing prose; the exit codes are
/// those of the text mode.
#[test]
fn check_and_apply_stream_json_events() {
    let keys = Keyring::new("convert-json-keys");
    let img = TestImage::with_mkfs_args("convert-json", "64M", &["--format-version", "1"]);
    let m = mount_live(&img, &keys, None);
    let mnt = m.path().to_str().expect("utf-8").to_string();
    let pkg = conversion_package(&keys, img.dir.path(), 1, 1, 2);
    let pkg = pkg.to_str().expect("utf-8").to_string();
    let check = molt_tests::harness::updater(&["check", &pkg, "--mount", &mnt, "--json"]);
    assert_eq!(check.status.code(), Some(0), "check: {}", text(&check));
    let events = json_events(&check);
    assert!(
        events.iter().any(|e| e["Check"]["passed"] == true),
        "no passed check among {events:?}"
    );
    assert_eq!(events.last().unwrap()["Done"]["outcome"], "Passed");
    let a = molt_tests::harness::updater(&["apply", &pkg, "--mount", &mnt, "--json"]);
    assert_eq!(a.status.code(), Some(COMMITTED), "apply: {}", text(&a));
    let events = json_events(&a);
    let finished: Vec<&str> = events
        .iter()
        .filter(|e| e["Phase"]["state"] == "Finished")
        .filter_map(|e| e["Phase"]["phase"].as_str())
        .collect();
    for phase in ["Conversion", "Replacement"] {
        assert!(
            finished.iter().any(|p| p.eq_ignore_ascii_case(phase)),
            "phase {phase} did not finish: {finished:?}"
        );
    }
    assert_eq!(events.last().unwrap()["Done"]["outcome"], "Committed");
    // Applied once: the same sequence is refused, with exit code and event to match.
    let again = molt_tests::harness::updater(&["apply", &pkg, "--mount", &mnt, "--json"]);
    assert_eq!(
        again.status.code(),
        Some(REFUSED),
        "again: {}",
        text(&again)
    );
    assert_eq!(
        json_events(&again).last().unwrap()["Done"]["outcome"],
        "Refused"
    );
    m.unmount();
    img.assert_clean();
}
