//! The permission rules the Linux kernel applies, checked on Molt and on kernel ext4 (a loop
//! device with 4 KiB blocks, mounted with `-o acl`) in the same test, as root and as
//! unprivileged users: set-id bits cleared by modifications and by chown, S_ISGID dropped
//! by chmod, inheritance in set-group-ID directories, refused operations that must leave
//! the filesystem writable, and POSIX ACLs.
//!
//! Every case states its expected outcome (mode in octal, owner, errno, `getfacl` text) and
//! asserts it on both filesystems: a case fails if Molt differs, and the ext4 run proves the
//! expectation is the kernel's. A test reports every mismatch it finds, each naming the
//! filesystem, the step and the expected and actual values.
//!
//! Steps that run as another user are external commands under `setpriv` (the test process
//! never changes its own ids); the results are read back as root from the test process.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use molt_tests::ext4::{errno_in, errno_message, errno_name, Cred, Ext4};
use molt_tests::harness::{Mount, TempDir, TestImage, TestRng};

/// The deadline of one step (one external command).
const STEP: Duration = Duration::from_secs(60);
/// Both filesystems are this size; the refused operations address 17 TiB regardless.
const SIZE: &str = "256M";
const PYTHON: &str = "/usr/bin/python3";

/// nobody/nogroup.
const NOBODY: Cred = Cred::new(65534, 65534, &[]);
/// daemon/daemon.
const DAEMON: Cred = Cred::new(1, 1, &[]);
/// bin/bin.
const BIN: Cred = Cred::new(2, 2, &[]);

// ---- the two filesystems --------------------------------------------------------------

/// One of the two filesystems a test runs on.
enum Fs {
    Ext4(Ext4),
    // `mount` first: fields drop in order, and the image's directory can only be removed
    // once it is unmounted.
    Molt {
        mount: Option<Mount>,
        img: TestImage,
    },
}

impl Fs {
    fn name(&self) -> &'static str {
        match self {
            Fs::Ext4(_) => "ext4",
            Fs::Molt { .. } => "molt",
        }
    }

    fn root(&self) -> &Path {
        match self {
            Fs::Ext4(e) => e.path(),
            Fs::Molt { mount, .. } => mount.as_ref().expect("molt is mounted").path(),
        }
    }

    /// Unmounts and mounts again (Molt: checking the image in between); `Err` names what
    /// went wrong on the way, after the filesystem is mounted again if it can be.
    fn remount(&mut self) -> Result<(), String> {
        match self {
            Fs::Ext4(e) => {
                e.remount();
                Ok(())
            }
            Fs::Molt { img, mount } => {
                mount.take().expect("molt is mounted").unmount();
                let fsck = img.fsck();
                *mount = Some(img.mount());
                if fsck.status.code() == Some(0) {
                    Ok(())
                } else {
                    Err(format!(
                        "fsck after unmount is not clean ({}):\n{}{}",
                        fsck.status,
                        String::from_utf8_lossy(&fsck.stdout),
                        String::from_utf8_lossy(&fsck.stderr)
                    ))
                }
            }
        }
    }
}

/// Makes `p` mode 0755 and checks that every ancestor lets other users search it.
fn open_to_others(p: &Path) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod 0755");
    for a in p.ancestors() {
        let mode = std::fs::metadata(a).expect("stat").mode();
        assert!(
            mode & 0o001 != 0,
            "{} (mode 0{:o}) cannot be searched by other users, so the unprivileged steps \
             cannot reach the test filesystems; point MOLT_TEST_TMP at a directory under /tmp",
            a.display(),
            mode & 0o7777
        );
    }
}

/// A fresh ext4 and a fresh mounted Molt image, in that order.
fn filesystems(tag: &str) -> Vec<Fs> {
    let e = Ext4::new(&format!("{tag}-ext4"), SIZE);
    open_to_others(e.dir());
    let img = TestImage::new(&format!("{tag}-molt"), SIZE);
    open_to_others(img.dir.path());
    let mount = Some(img.mount());
    let fss = vec![Fs::Ext4(e), Fs::Molt { img, mount }];
    for fs in &fss {
        open_to_others(fs.root());
    }
    fss
}

// ---- reporting ----------------------------------------------------------------------------

/// The mismatches a test found; `finish` fails the test with all of them.
#[derive(Default)]
struct Report(Vec<String>);

impl Report {
    fn fail(&mut self, fs: &Fs, msg: impl AsRef<str>) {
        let line = format!("{}: {}", fs.name(), msg.as_ref());
        eprintln!("MISMATCH {line}");
        self.0.push(line);
    }

    /// Checks the permission bits (07777) of `path`.
    fn mode(&mut self, fs: &Fs, path: &Path, want: u32, what: &str) {
        match std::fs::symlink_metadata(path) {
            Ok(md) if md.mode() & 0o7777 == want => {}
            Ok(md) => self.fail(
                fs,
                format!(
                    "{what}: mode {}, expected {}",
                    oct(md.mode() & 0o7777),
                    oct(want)
                ),
            ),
            Err(e) => self.fail(fs, format!("{what}: stat {}: {e}", rel(fs, path))),
        }
    }

    /// Checks owner and group of `path`.
    fn owner(&mut self, fs: &Fs, path: &Path, uid: u32, gid: u32, what: &str) {
        match std::fs::symlink_metadata(path) {
            Ok(md) if (md.uid(), md.gid()) == (uid, gid) => {}
            Ok(md) => self.fail(
                fs,
                format!(
                    "{what}: owner {}:{}, expected {uid}:{gid}",
                    md.uid(),
                    md.gid()
                ),
            ),
            Err(e) => self.fail(fs, format!("{what}: stat {}: {e}", rel(fs, path))),
        }
    }

    /// Checks that a command succeeded (exit 0, nothing on stderr).
    fn ok(&mut self, fs: &Fs, out: &Output, what: &str) -> bool {
        if out.status.success() && out.stderr.is_empty() {
            return true;
        }
        self.fail(
            fs,
            format!("{what}: failed ({}): {}", out.status, stderr(out).trim()),
        );
        false
    }

    /// Checks that a command was refused with one of `want` (read from its stderr: the
    /// tools print the C library's message for the errno).
    fn refused(&mut self, fs: &Fs, out: &Output, want: &[i32], what: &str) {
        let err = stderr(out);
        if want.iter().any(|e| err.contains(&errno_message(*e))) {
            return;
        }
        let names: Vec<String> = want.iter().map(|e| errno_name(*e)).collect();
        let got = match errno_in(&err) {
            Some(e) => errno_name(e),
            None if err.trim().is_empty() => "success".to_string(),
            None => "an unrecognised error".to_string(),
        };
        self.fail(
            fs,
            format!(
                "{what}: expected {}, got {got} (exit {}; stderr {:?})",
                names.join(" or "),
                out.status,
                err.trim()
            ),
        );
    }

    fn finish(self, test: &str) {
        assert!(
            self.0.is_empty(),
            "{test}: {} mismatch(es) with the kernel's rules:\n  {}",
            self.0.len(),
            self.0.join("\n  ")
        );
    }
}

fn oct(mode: u32) -> String {
    format!("0{mode:o}")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `path` relative to the filesystem's root, for messages.
fn rel(fs: &Fs, path: &Path) -> String {
    path.strip_prefix(fs.root())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

// ---- setting up files as root ---------------------------------------------------------

/// A regular file with `data`, owned by `uid:gid`, with permission bits `mode` (set by root,
/// which keeps every bit).
fn make_file(fs: &Fs, p: &Path, data: &[u8], uid: u32, gid: u32, mode: u32) {
    let ctx = |e: std::io::Error| format!("{}: setting up {}: {e}", fs.name(), rel(fs, p));
    std::fs::write(p, data).unwrap_or_else(|e| panic!("{}", ctx(e)));
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("{}", ctx(e)));
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("{}", ctx(e)));
    let got = std::fs::metadata(p).expect("stat").mode() & 0o7777;
    assert_eq!(
        got,
        mode,
        "{}: setting up {}: root's chmod to {} gave {}",
        fs.name(),
        rel(fs, p),
        oct(mode),
        oct(got)
    );
}

/// A directory owned by `uid:gid` with permission bits `mode`.
fn make_dir(fs: &Fs, p: &Path, uid: u32, gid: u32, mode: u32) {
    let ctx = |e: std::io::Error| format!("{}: setting up {}: {e}", fs.name(), rel(fs, p));
    std::fs::create_dir(p).unwrap_or_else(|e| panic!("{}", ctx(e)));
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("{}", ctx(e)));
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("{}", ctx(e)));
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    TestRng::new(seed).bytes(len)
}

// ---- 1. set-id bits cleared by a modification -------------------------------------------

/// The group of the files in the set-id modification cases.
const FILE_GID: u32 = 65534;
/// Not in `FILE_GID`.
const OUTSIDER: Cred = BIN;
/// In `FILE_GID` as primary group.
const PRIMARY: Cred = NOBODY;
/// In `FILE_GID` as a supplementary group.
const SUPPLEMENTARY: Cred = Cred::new(1, 1, &[FILE_GID]);

/// A modification, as `xfs_io` arguments before the file name.
type Op = (&'static str, &'static [&'static str]);

const WRITES: &[Op] = &[
    (
        "buffered write + fsync",
        &["-c", "pwrite 0 4k", "-c", "fsync"],
    ),
    ("O_DIRECT write", &["-d", "-c", "pwrite 0 4k"]),
    ("writev", &["-c", "pwrite -V 2 0 4k"]),
];
const TRUNCATES: &[Op] = &[
    ("truncate (shrink to 4k)", &["-c", "truncate 4k"]),
    ("truncate (grow to 1m)", &["-c", "truncate 1m"]),
];
const FALLOCATES: &[Op] = &[
    ("fallocate (allocate 0..1m)", &["-c", "falloc 0 1m"]),
    ("fallocate punch hole", &["-c", "fpunch 0 4k"]),
    ("fallocate zero range", &["-c", "fzero 0 4k"]),
];
const KEEP_SIZE_FALLOCATES: &[Op] = &[(
    "fallocate KEEP_SIZE (allocate past EOF)",
    &["-c", "falloc -k 64k 1m"],
)];

/// A file of mode `mode` (owner root, group `FILE_GID`) modified by `who`, and the mode it
/// must have afterwards.
struct SetidCase {
    mode: u32,
    who: Cred,
    want: u32,
    why: &'static str,
}

/// setattr_should_drop_suidgid: without CAP_FSETID, S_ISUID is always cleared; S_ISGID is
/// cleared if group-exec is set, or if the writer is not in the file's group.
const UNPRIVILEGED_CASES: &[SetidCase] = &[
    SetidCase {
        mode: 0o6777,
        who: OUTSIDER,
        want: 0o0777,
        why: "S_ISUID always cleared; S_ISGID cleared because group-exec is set",
    },
    SetidCase {
        mode: 0o6777,
        who: PRIMARY,
        want: 0o0777,
        why: "S_ISGID cleared because group-exec is set, although the writer is in the group",
    },
    SetidCase {
        mode: 0o6777,
        who: SUPPLEMENTARY,
        want: 0o0777,
        why: "S_ISGID cleared because group-exec is set, although the writer is in the group",
    },
    SetidCase {
        mode: 0o2767,
        who: OUTSIDER,
        want: 0o0767,
        why: "no group-exec, but the writer is not in the file's group: S_ISGID cleared",
    },
    SetidCase {
        mode: 0o2767,
        who: PRIMARY,
        want: 0o2767,
        why: "no group-exec and the writer's primary group is the file's: S_ISGID kept",
    },
    SetidCase {
        mode: 0o2767,
        who: SUPPLEMENTARY,
        want: 0o2767,
        why: "no group-exec and the writer has the file's group as supplementary: S_ISGID kept",
    },
    SetidCase {
        mode: 0o6767,
        who: OUTSIDER,
        want: 0o0767,
        why: "S_ISUID always cleared; S_ISGID cleared: writer not in the file's group",
    },
    SetidCase {
        mode: 0o6767,
        who: PRIMARY,
        want: 0o2767,
        why: "S_ISUID always cleared; S_ISGID kept: no group-exec, writer in the group",
    },
];

/// Root has CAP_FSETID: it keeps both bits.
const ROOT_CASES: &[SetidCase] = &[
    SetidCase {
        mode: 0o6777,
        who: Cred::ROOT,
        want: 0o6777,
        why: "the writer has CAP_FSETID: both bits kept",
    },
    SetidCase {
        mode: 0o2767,
        who: Cred::ROOT,
        want: 0o2767,
        why: "the writer has CAP_FSETID: S_ISGID kept",
    },
    SetidCase {
        mode: 0o6767,
        who: Cred::ROOT,
        want: 0o6767,
        why: "the writer has CAP_FSETID: both bits kept",
    },
];

/// Applies every op in `ops` to a fresh 64 KiB file for every case, on both filesystems, and
/// checks the mode afterwards.
fn setid_after_modification(tag: &str, ops: &[Op], cases: &[SetidCase]) {
    let fss = filesystems(tag);
    let mut r = Report::default();
    let data = pattern(11, 64 * 1024);
    for fs in &fss {
        let dir = fs.root().join("setid");
        make_dir(fs, &dir, 0, 0, 0o755);
        for (i, (op, args)) in ops.iter().enumerate() {
            for (j, c) in cases.iter().enumerate() {
                let f = dir.join(format!("f{i}-{j}"));
                make_file(fs, &f, &data, 0, FILE_GID, c.mode);
                let what = format!(
                    "{op} (xfs_io {}) by {} of a {} file owned by 0:{FILE_GID}",
                    args.join(" "),
                    c.who,
                    oct(c.mode)
                );
                let mut a: Vec<&str> = args.to_vec();
                a.push(s(&f));
                let out = c.who.run("xfs_io", &a, STEP);
                if r.ok(fs, &out, &what) {
                    r.mode(fs, &f, c.want, &format!("{what} [{}]", c.why));
                }
            }
        }
    }
    r.finish(tag);
}

#[test]
fn non_owner_writes_clear_setid_bits_by_the_kernels_rules() {
    setid_after_modification("perm-setid-write", WRITES, UNPRIVILEGED_CASES);
}

#[test]
fn non_owner_truncates_clear_setid_bits_by_the_kernels_rules() {
    setid_after_modification("perm-setid-trunc", TRUNCATES, UNPRIVILEGED_CASES);
}

#[test]
fn non_owner_fallocate_punch_and_zero_range_clear_setid_bits_by_the_kernels_rules() {
    setid_after_modification("perm-setid-falloc", FALLOCATES, UNPRIVILEGED_CASES);
}

/// A separate test: for FALLOC_FL_KEEP_SIZE alone, the FUSE kernel module does not itself
/// call file_modified, so the server has to clear the bits (ext4 does).
#[test]
fn non_owner_keep_size_fallocate_clears_setid_bits_by_the_kernels_rules() {
    setid_after_modification(
        "perm-setid-keepsize",
        KEEP_SIZE_FALLOCATES,
        UNPRIVILEGED_CASES,
    );
}

#[test]
fn root_modifications_keep_setid_bits() {
    let all: Vec<Op> = [WRITES, TRUNCATES, FALLOCATES, KEEP_SIZE_FALLOCATES].concat();
    setid_after_modification("perm-setid-root", &all, ROOT_CASES);
}

// ---- 2. chown and chgrp by root ---------------------------------------------------------

#[test]
fn chown_by_root_clears_setuid_and_group_exec_setgid_but_not_on_directories() {
    struct Case {
        dir: bool,
        mode: u32,
        uid: Option<u32>,
        gid: Option<u32>,
        want: u32,
        why: &'static str,
    }
    let c = |dir, mode, uid, gid, want, why| Case {
        dir,
        mode,
        uid,
        gid,
        want,
        why,
    };
    let cases = [
        c(
            false,
            0o6755,
            Some(1),
            None,
            0o0755,
            "chown clears S_ISUID, and S_ISGID with group-exec",
        ),
        c(
            false,
            0o6755,
            None,
            Some(2),
            0o0755,
            "chgrp clears S_ISUID, and S_ISGID with group-exec",
        ),
        c(
            false,
            0o6755,
            Some(1),
            Some(2),
            0o0755,
            "chown clears S_ISUID, and S_ISGID with group-exec",
        ),
        c(
            false,
            0o6755,
            Some(0),
            Some(0),
            0o0755,
            "a chown to the same ids clears them too",
        ),
        c(false, 0o4755, Some(1), None, 0o0755, "chown clears S_ISUID"),
        c(
            false,
            0o2755,
            None,
            Some(2),
            0o0755,
            "chgrp clears S_ISGID with group-exec",
        ),
        c(
            false,
            0o2745,
            Some(1),
            None,
            0o2745,
            "S_ISGID without group-exec is kept (root has CAP_FSETID)",
        ),
        c(
            false,
            0o2745,
            None,
            Some(2),
            0o2745,
            "S_ISGID without group-exec is kept (root has CAP_FSETID)",
        ),
        c(
            false,
            0o6745,
            Some(1),
            Some(2),
            0o2745,
            "S_ISUID cleared, S_ISGID without group-exec kept",
        ),
        c(
            true,
            0o6755,
            Some(1),
            Some(2),
            0o6755,
            "a directory keeps its bits",
        ),
        c(
            true,
            0o2755,
            None,
            Some(2),
            0o2755,
            "a directory keeps its bits",
        ),
    ];
    let fss = filesystems("perm-chown");
    let mut r = Report::default();
    for fs in &fss {
        let dir = fs.root().join("chown");
        make_dir(fs, &dir, 0, 0, 0o755);
        for (i, c) in cases.iter().enumerate() {
            let p = dir.join(format!("c{i}"));
            if c.dir {
                make_dir(fs, &p, 0, 0, c.mode);
            } else {
                make_file(fs, &p, b"x", 0, 0, c.mode);
            }
            let what = format!(
                "chown({:?}, {:?}) by root of a {} {}",
                c.uid,
                c.gid,
                oct(c.mode),
                if c.dir { "directory" } else { "file" }
            );
            if let Err(e) = std::os::unix::fs::chown(&p, c.uid, c.gid) {
                r.fail(fs, format!("{what}: {e}"));
                continue;
            }
            r.owner(fs, &p, c.uid.unwrap_or(0), c.gid.unwrap_or(0), &what);
            r.mode(fs, &p, c.want, &format!("{what} [{}]", c.why));
        }
    }
    r.finish("chown");
}

// ---- 3. chmod g+s by an owner outside the group --------------------------------------------

#[test]
fn chmod_setgid_by_an_owner_outside_the_group_is_silently_dropped() {
    struct Case {
        gid: u32,
        who: Cred,
        args: &'static [&'static str],
        want: u32,
        why: &'static str,
    }
    let in_2 = Cred::new(1, 1, &[2]);
    let cases = [
        Case {
            gid: 2,
            who: DAEMON,
            args: &["02755"],
            want: 0o0755,
            why: "owner not in the file's group: S_ISGID dropped",
        },
        Case {
            gid: 2,
            who: DAEMON,
            args: &["g+s"],
            want: 0o0755,
            why: "owner not in the file's group: S_ISGID dropped",
        },
        Case {
            gid: 1,
            who: DAEMON,
            args: &["02755"],
            want: 0o2755,
            why: "owner's primary group is the file's: kept",
        },
        Case {
            gid: 1,
            who: DAEMON,
            args: &["g+s"],
            want: 0o2755,
            why: "owner's primary group is the file's: kept",
        },
        Case {
            gid: 2,
            who: in_2,
            args: &["02755"],
            want: 0o2755,
            why: "owner has the file's group as supplementary: kept",
        },
        Case {
            gid: 2,
            who: Cred::ROOT,
            args: &["02755"],
            want: 0o2755,
            why: "root (CAP_FSETID) is exempt: kept",
        },
    ];
    let fss = filesystems("perm-chmod");
    let mut r = Report::default();
    for fs in &fss {
        let dir = fs.root().join("chmod");
        make_dir(fs, &dir, 0, 0, 0o755);
        for (i, c) in cases.iter().enumerate() {
            let p = dir.join(format!("c{i}"));
            make_file(fs, &p, b"x", 1, c.gid, 0o755);
            let what = format!(
                "chmod {} by {} of a 0755 file owned by 1:{}",
                c.args[0], c.who, c.gid
            );
            let out = c.who.run("chmod", &[c.args[0], s(&p)], STEP);
            if r.ok(fs, &out, &what) {
                r.mode(fs, &p, c.want, &format!("{what} [{}]", c.why));
            }
        }
    }
    r.finish("chmod");
}

// ---- 4. creation in a set-group-ID directory ------------------------------------------------

/// Creates, with umask 0, under `argv[1]` with prefix `argv[2]`: a directory (0777), a file
/// asking for 02775, a file asking for 02765, a FIFO asking for 02775, and inside the new
/// directory a directory (0755) and a file (02775). The modes go straight to
/// mkdir/open/mknod.
const CREATE_IN_SGID_DIR: &str = r#"
import os, sys
os.umask(0)
d, p = sys.argv[1], sys.argv[2]
os.mkdir(f"{d}/{p}-dir", 0o777)
os.close(os.open(f"{d}/{p}-file", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o2775))
os.close(os.open(f"{d}/{p}-nogx", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o2765))
os.mkfifo(f"{d}/{p}-fifo", 0o2775)
os.mkdir(f"{d}/{p}-dir/nested", 0o755)
os.close(os.open(f"{d}/{p}-dir/file", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o2775))
"#;

#[test]
fn new_entries_in_a_setgid_directory_take_its_group_and_setgid_follows_membership() {
    const G: u32 = 2;
    // (creator, in G)
    let creators = [
        (NOBODY, false),
        (Cred::new(1, 1, &[G]), true),
        (BIN, true),
        (Cred::ROOT, true), // not in G, but CAP_FSETID keeps S_ISGID
    ];
    let fss = filesystems("perm-sgid-dir");
    let mut r = Report::default();
    for fs in &fss {
        let d = fs.root().join("sgid");
        make_dir(fs, &d, 0, G, 0o2777);
        r.mode(fs, &d, 0o2777, "the set-group-ID directory");
        for (who, keeps) in creators {
            let p = format!("u{}", who.uid);
            let out = who.run(PYTHON, &["-c", CREATE_IN_SGID_DIR, s(&d), &p], STEP);
            let what = format!("creation by {who} in a 02777 directory of group {G}");
            if !r.ok(fs, &out, &what) {
                continue;
            }
            let file_mode = |asked: u32| if keeps { asked } else { asked & !0o2000 };
            let checks: [(String, u32, &str); 6] = [
                (format!("{p}-dir"), 0o2777, "mkdir 0777: a directory always inherits S_ISGID"),
                (
                    format!("{p}-file"),
                    file_mode(0o2775),
                    "open(O_CREAT, 02775): S_ISGID with group-exec kept only by a member of the group",
                ),
                (format!("{p}-nogx"), 0o2765, "open(O_CREAT, 02765): S_ISGID without group-exec is kept"),
                (
                    format!("{p}-fifo"),
                    file_mode(0o2775),
                    "mkfifo 02775: S_ISGID with group-exec kept only by a member of the group",
                ),
                (format!("{p}-dir/nested"), 0o2755, "mkdir 0755 in the inherited directory: S_ISGID again"),
                (
                    format!("{p}-dir/file"),
                    file_mode(0o2775),
                    "open(O_CREAT, 02775) in the inherited directory",
                ),
            ];
            for (name, want, why) in checks {
                let path = d.join(&name);
                let w = format!("{what}: {name}");
                r.owner(
                    fs,
                    &path,
                    who.uid,
                    G,
                    &format!("{w} [takes the directory's group]"),
                );
                r.mode(fs, &path, want, &format!("{w} [{why}]"));
            }
        }
    }
    r.finish("setgid directory");
}

// ---- 5. refused operations latch nothing --------------------------------------------------

/// 17 TiB: past the 16 TiB maximum file size of Molt and of ext4 with 4 KiB blocks.
const PAST_MAX: &str = "17t";

/// Runs `refuse` as an unprivileged user (nobody, in a directory `u` it owns) on both
/// filesystems, with a second user's buffered (unsynced) data written just before; then
/// root must still create, write, fsync and read back 1 MiB, and after a remount both the
/// second user's data and root's file must read back, and `after_remount` checks that the
/// refused operation left nothing behind.
fn refused_operation_latches_nothing(
    tag: &str,
    refuse: impl Fn(&Fs, &Path, &mut Report),
    after_remount: impl Fn(&Fs, &Path, &mut Report),
) {
    let src_dir = TempDir::new(&format!("{tag}-src"));
    open_to_others(src_dir.path());
    let src = src_dir.path().join("second-user-data");
    let second = pattern(21, 1 << 20);
    std::fs::write(&src, &second).expect("source data");
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let root_data = pattern(22, 1 << 20);

    let mut fss = filesystems(tag);
    let mut r = Report::default();
    for fs in fss.iter_mut() {
        let u = fs.root().join("u");
        make_dir(fs, &u, NOBODY.uid, NOBODY.gid, 0o700);
        let w = fs.root().join("w");
        make_dir(fs, &w, DAEMON.uid, DAEMON.gid, 0o700);
        let data = w.join("data");
        let out = DAEMON.run(
            "xfs_io",
            &[
                "-f",
                "-c",
                &format!("pwrite -q -i {} -b 65536 0 1m", s(&src)),
                s(&data),
            ],
            STEP,
        );
        r.ok(
            fs,
            &out,
            "the second user's buffered 1 MiB write (before the refused operation)",
        );

        refuse(fs, &u, &mut r);

        // Root can still write, sync and read.
        let rf = fs.root().join("root-after");
        let step = (|| -> std::io::Result<Vec<u8>> {
            use std::io::Write;
            let mut f = std::fs::File::create(&rf)?;
            f.write_all(&root_data)?;
            f.sync_all()?;
            drop(f);
            std::fs::read(&rf)
        })();
        match step {
            Ok(got) if got == root_data => {}
            Ok(got) => r.fail(
                fs,
                format!(
                    "after the refused operation: root's 1 MiB file reads back different ({} bytes)",
                    got.len()
                ),
            ),
            Err(e) => r.fail(
                fs,
                format!("after the refused operation: root cannot create, write, fsync and read a file: {e}"),
            ),
        }

        if let Err(e) = fs.remount() {
            r.fail(fs, format!("remount after the refused operation: {e}"));
        }
        let data = fs.root().join("w/data");
        match std::fs::read(&data) {
            Ok(got) if got == second => {}
            Ok(got) => r.fail(
                fs,
                format!(
                    "after a remount: the second user's buffered data written before the refused \
                     operation differs ({} bytes, expected {})",
                    got.len(),
                    second.len()
                ),
            ),
            Err(e) => r.fail(
                fs,
                format!("after a remount: the second user's buffered data written before the refused operation: {e}"),
            ),
        }
        match std::fs::read(fs.root().join("root-after")) {
            Ok(got) if got == root_data => {}
            Ok(_) => r.fail(fs, "after a remount: root's fsynced file differs"),
            Err(e) => r.fail(fs, format!("after a remount: root's fsynced file: {e}")),
        }
        let u = fs.root().join("u");
        after_remount(fs, &u, &mut r);
    }
    r.finish(tag);
}

/// Checks that `p` has no blocks allocated. (Its size may differ: with FUSE's writeback cache
/// the kernel accepts a write past the server's maximum into the page cache and shows that
/// size until the inode is dropped, while the server refuses it at writeback, so fsync fails.
/// After a remount the size must be 0.)
fn no_blocks(r: &mut Report, fs: &Fs, p: &Path, what: &str) {
    match std::fs::metadata(p) {
        Ok(md) if md.blocks() == 0 => {}
        Ok(md) => r.fail(
            fs,
            format!(
                "{what}: {} has {} blocks, expected none allocated",
                rel(fs, p),
                md.blocks()
            ),
        ),
        Err(e) => r.fail(fs, format!("{what}: {}: {e}", rel(fs, p))),
    }
}

/// Checks that `p` is an empty file taking no blocks.
fn empty_file(r: &mut Report, fs: &Fs, p: &Path, what: &str) {
    match std::fs::metadata(p) {
        Ok(md) if md.len() == 0 && md.blocks() == 0 => {}
        Ok(md) => r.fail(
            fs,
            format!(
                "{what}: {} has size {} and {} blocks, expected an empty file (nothing allocated)",
                rel(fs, p),
                md.len(),
                md.blocks()
            ),
        ),
        Err(e) => r.fail(fs, format!("{what}: {}: {e}", rel(fs, p))),
    }
}

#[test]
fn a_write_past_16_tib_is_refused_with_efbig_and_latches_nothing() {
    refused_operation_latches_nothing(
        "perm-refuse-write",
        |fs, u, r| {
            let f = u.join("big");
            let out = NOBODY.run(
                "xfs_io",
                &[
                    "-f",
                    "-c",
                    &format!("pwrite {PAST_MAX} 4k"),
                    "-c",
                    "fsync",
                    s(&f),
                ],
                STEP,
            );
            r.refused(
                fs,
                &out,
                &[libc::EFBIG],
                "pwrite at 17 TiB + fsync (at the write or at the fsync)",
            );
            no_blocks(r, fs, &f, "right after the refused operation");
        },
        |fs, u, r| {
            empty_file(
                r,
                fs,
                &u.join("big"),
                "after a remount, the file of the refused write",
            )
        },
    );
}

#[test]
fn a_truncate_past_16_tib_is_refused_with_efbig_and_latches_nothing() {
    refused_operation_latches_nothing(
        "perm-refuse-trunc",
        |fs, u, r| {
            let f = u.join("t");
            let out = NOBODY.run(
                "xfs_io",
                &["-f", "-c", &format!("truncate {PAST_MAX}"), s(&f)],
                STEP,
            );
            r.refused(fs, &out, &[libc::EFBIG], "ftruncate to 17 TiB");
            empty_file(r, fs, &f, "right after the refused truncate");
        },
        |fs, u, r| {
            empty_file(
                r,
                fs,
                &u.join("t"),
                "after a remount, the file of the refused truncate",
            )
        },
    );
}

#[test]
fn a_fallocate_past_16_tib_is_refused_with_efbig_and_latches_nothing() {
    refused_operation_latches_nothing(
        "perm-refuse-falloc",
        |fs, u, r| {
            let f = u.join("fa");
            for (cmd, what) in [
                (format!("falloc {PAST_MAX} 4k"), "fallocate at 17 TiB"),
                (
                    format!("falloc -k {PAST_MAX} 4k"),
                    "fallocate KEEP_SIZE at 17 TiB",
                ),
            ] {
                let out = NOBODY.run("xfs_io", &["-f", "-c", &cmd, s(&f)], STEP);
                r.refused(fs, &out, &[libc::EFBIG], what);
                empty_file(r, fs, &f, &format!("right after the refused {what}"));
            }
        },
        |fs, u, r| {
            empty_file(
                r,
                fs,
                &u.join("fa"),
                "after a remount, the file of the refused fallocates",
            )
        },
    );
}

#[test]
fn a_copy_range_past_16_tib_is_refused_with_efbig_and_latches_nothing() {
    refused_operation_latches_nothing(
        "perm-refuse-copy",
        |fs, u, r| {
            let src = u.join("src");
            let dst = u.join("dst");
            let out = NOBODY.run(
                "xfs_io",
                &["-f", "-c", "pwrite -q 0 4k", "-c", "fsync", s(&src)],
                STEP,
            );
            r.ok(fs, &out, "writing the copy source");
            // xfs_io exits 0 when copy_range fails: the errno is read from its stderr.
            let out = NOBODY.run(
                "xfs_io",
                &[
                    "-f",
                    "-c",
                    &format!("copy_range -s 0 -d {PAST_MAX} -l 4k {}", s(&src)),
                    "-c",
                    "fsync",
                    s(&dst),
                ],
                STEP,
            );
            r.refused(
                fs,
                &out,
                &[libc::EFBIG],
                "copy_file_range to destination offset 17 TiB (+ fsync)",
            );
            no_blocks(r, fs, &dst, "right after the refused operation");
        },
        |fs, u, r| {
            empty_file(
                r,
                fs,
                &u.join("dst"),
                "after a remount, the destination of the refused copy",
            );
            match std::fs::metadata(u.join("src")) {
                Ok(md) if md.len() == 4096 => {}
                Ok(md) => r.fail(
                    fs,
                    format!(
                        "after a remount: the copy source has size {}, expected 4096",
                        md.len()
                    ),
                ),
                Err(e) => r.fail(fs, format!("after a remount: the copy source: {e}")),
            }
        },
    );
}

/// Checks as root that `p` has no extended attribute `name`.
fn no_xattr(r: &mut Report, fs: &Fs, p: &Path, name: &str, what: &str) {
    let out = Cred::ROOT.run("getfattr", &["--absolute-names", "-n", name, s(p)], STEP);
    if out.status.success() || !stderr(&out).contains("No such attribute") {
        r.fail(
            fs,
            format!(
                "{what}: getfattr -n {name}: expected no such attribute, got exit {} ({})",
                out.status,
                stderr(&out).trim()
            ),
        );
    }
}

#[test]
fn an_oversized_xattr_value_is_refused_and_latches_nothing() {
    refused_operation_latches_nothing(
        "perm-refuse-xattr-value",
        |fs, u, r| {
            let f = u.join("x");
            let out = NOBODY.run("xfs_io", &["-f", "-c", "pwrite -q 0 4k", s(&f)], STEP);
            r.ok(fs, &out, "creating the xattr target");
            // 65 KiB: past XATTR_SIZE_MAX (64 KiB), refused by the kernel before any
            // filesystem sees it.
            let v65 = "a".repeat(65 * 1024);
            let out = NOBODY.run("setfattr", &["-n", "user.big", "-v", &v65, s(&f)], STEP);
            r.refused(
                fs,
                &out,
                &[libc::E2BIG],
                "setxattr user.big with a 65 KiB value",
            );
            no_xattr(r, fs, &f, "user.big", "after the refused 65 KiB setxattr");
            // Exactly 64 KiB: accepted by the VFS, past what either filesystem stores
            // (ext4 without ea_inode: one block; Molt: 65535 bytes).
            let v64 = "a".repeat(64 * 1024);
            let out = NOBODY.run("setfattr", &["-n", "user.big2", "-v", &v64, s(&f)], STEP);
            r.refused(
                fs,
                &out,
                &[libc::ENOSPC, libc::E2BIG],
                "setxattr user.big2 with a 64 KiB value",
            );
            no_xattr(r, fs, &f, "user.big2", "after the refused 64 KiB setxattr");
        },
        |fs, u, r| {
            let f = u.join("x");
            no_xattr(r, fs, &f, "user.big", "after a remount");
            no_xattr(r, fs, &f, "user.big2", "after a remount");
        },
    );
}

#[test]
fn a_256_byte_xattr_name_is_refused_with_erange_and_latches_nothing() {
    refused_operation_latches_nothing(
        "perm-refuse-xattr-name",
        |fs, u, r| {
            let f = u.join("x");
            let out = NOBODY.run("xfs_io", &["-f", "-c", "pwrite -q 0 4k", s(&f)], STEP);
            r.ok(fs, &out, "creating the xattr target");
            let name = format!("user.{}", "x".repeat(251));
            assert_eq!(name.len(), 256);
            let out = NOBODY.run("setfattr", &["-n", &name, "-v", "1", s(&f)], STEP);
            r.refused(fs, &out, &[libc::ERANGE], "setxattr with a 256-byte name");
        },
        |fs, u, r| {
            // Molt shows its own user.molt.* attributes; no other name may be there.
            let out = Cred::ROOT.run(
                "getfattr",
                &["--absolute-names", "-d", "-m", "-", s(&u.join("x"))],
                STEP,
            );
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let stray: Vec<&str> = text
                .lines()
                .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("user.molt."))
                .collect();
            if !out.status.success() || !stray.is_empty() {
                r.fail(
                    fs,
                    format!(
                        "after a remount: getfattr -d -m - shows {stray:?} ({}), expected no \
                         attribute from the refused setxattr",
                        stderr(&out).trim()
                    ),
                );
            }
        },
    );
}

#[test]
fn a_256_byte_name_is_refused_with_enametoolong_and_latches_nothing() {
    refused_operation_latches_nothing(
        "perm-refuse-name",
        |fs, u, r| {
            let short = u.join("short");
            let out = NOBODY.run("xfs_io", &["-f", "-c", "pwrite -q 0 4k", s(&short)], STEP);
            r.ok(fs, &out, "creating a file to rename and link");
            let long = u.join("n".repeat(256));
            let (sh, lg) = (s(&short), s(&long));
            let steps: [(&str, Vec<&str>, &str); 6] = [
                (
                    "xfs_io",
                    vec!["-f", "-c", "pwrite -q 0 4k", lg],
                    "open(O_CREAT) of a 256-byte name",
                ),
                ("mkdir", vec![lg], "mkdir of a 256-byte name"),
                (
                    "ln",
                    vec!["-s", "target", lg],
                    "symlink named with 256 bytes",
                ),
                ("ln", vec![sh, lg], "link to a 256-byte name"),
                ("mv", vec!["-T", sh, lg], "rename to a 256-byte name"),
                ("stat", vec![lg], "lookup (stat) of a 256-byte name"),
            ];
            for (prog, args, what) in steps {
                let out = NOBODY.run(prog, &args, STEP);
                r.refused(fs, &out, &[libc::ENAMETOOLONG], what);
            }
        },
        |fs, u, r| {
            match std::fs::read_dir(u) {
                Ok(rd) => {
                    let names: Vec<String> = rd
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect();
                    if names != ["short"] {
                        r.fail(fs, format!("after a remount: the directory holds {names:?}, expected [\"short\"]"));
                    }
                }
                Err(e) => r.fail(
                    fs,
                    format!("after a remount: listing the user's directory: {e}"),
                ),
            }
            match std::fs::metadata(u.join("short")) {
                Ok(md) if md.len() == 4096 => {}
                Ok(md) => r.fail(
                    fs,
                    format!(
                        "after a remount: short has size {}, expected 4096",
                        md.len()
                    ),
                ),
                Err(e) => r.fail(fs, format!("after a remount: short: {e}")),
            }
        },
    );
}

#[test]
fn a_5000_byte_symlink_target_is_refused_with_enametoolong_and_latches_nothing() {
    refused_operation_latches_nothing(
        "perm-refuse-symlink",
        |fs, u, r| {
            let target = "t".repeat(5000);
            let out = NOBODY.run("ln", &["-s", &target, s(&u.join("sl"))], STEP);
            r.refused(
                fs,
                &out,
                &[libc::ENAMETOOLONG],
                "symlink with a 5000-byte target",
            );
        },
        |fs, u, r| {
            if let Ok(md) = std::fs::symlink_metadata(u.join("sl")) {
                r.fail(
                    fs,
                    format!(
                        "after a remount: the refused symlink exists ({} bytes)",
                        md.len()
                    ),
                );
            }
        },
    );
}

// ---- 6. POSIX ACLs -------------------------------------------------------------------------

/// `getfacl -n --absolute-names` of `paths` (with `-R` if `recursive`) as root, with the
/// filesystem's root stripped from the `# file:` lines and the entries of each file in a
/// block, blocks sorted by path (readdir order differs between filesystems).
fn getfacl(r: &mut Report, fs: &Fs, paths: &[&Path], recursive: bool) -> String {
    let mut args: Vec<&str> = vec!["-n", "--absolute-names"];
    if recursive {
        args.push("-R");
    }
    args.extend(paths.iter().map(|p| s(p)));
    let out = Cred::ROOT.run("getfacl", &args, STEP);
    if !out.status.success() {
        r.fail(
            fs,
            format!(
                "getfacl {}: {} ({})",
                args.join(" "),
                out.status,
                stderr(&out).trim()
            ),
        );
    }
    let prefix = format!("{}/", s(fs.root()));
    let text = String::from_utf8_lossy(&out.stdout).replace(&prefix, "");
    normalize_acl_text(&text)
}

/// `getfacl` text as blocks sorted by their `# file:` line, each ending in a blank line.
fn normalize_acl_text(text: &str) -> String {
    let mut blocks: Vec<String> = text
        .split("\n\n")
        .map(|b| b.trim())
        .filter(|b| !b.is_empty())
        .map(|b| format!("{b}\n\n"))
        .collect();
    blocks.sort();
    blocks.concat()
}

/// Turns an expected listing written one entry per line (leading whitespace ignored) into
/// normalized `getfacl` text.
fn acl(expected: &str) -> String {
    let lines: Vec<&str> = expected.lines().map(|l| l.trim()).collect();
    normalize_acl_text(&lines.join("\n"))
}

fn expect_acl(r: &mut Report, fs: &Fs, paths: &[&Path], recursive: bool, want: &str, what: &str) {
    let got = getfacl(r, fs, paths, recursive);
    let want = acl(want);
    if got != want {
        r.fail(fs, format!("{what}: getfacl shows\n{got}expected\n{want}"));
    }
}

/// Opens `argv[1]` for reading (`r`) or writing (`w`) and prints 0 or the errno.
const ACCESS_PROBE: &str = r#"
import os, sys
flags = {"r": os.O_RDONLY, "w": os.O_WRONLY}[sys.argv[2]]
try:
    os.close(os.open(sys.argv[1], flags))
    print(0)
except OSError as e:
    print(e.errno)
"#;

/// Checks that `who` opening `p` for `how` ("r" or "w") gives `want` (0 or an errno).
fn expect_access(r: &mut Report, fs: &Fs, who: Cred, p: &Path, how: &str, want: i32, what: &str) {
    let out = who.run(PYTHON, &["-c", ACCESS_PROBE, s(p), how], STEP);
    let got: Option<i32> = String::from_utf8_lossy(&out.stdout).trim().parse().ok();
    let name = |e: i32| {
        if e == 0 {
            "success".to_string()
        } else {
            errno_name(e)
        }
    };
    match got {
        Some(g) if g == want => {}
        Some(g) => r.fail(
            fs,
            format!(
                "{what}: open({}, {}) by {who}: {}, expected {}",
                rel(fs, p),
                if how == "r" { "O_RDONLY" } else { "O_WRONLY" },
                name(g),
                name(want)
            ),
        ),
        None => r.fail(
            fs,
            format!(
                "{what}: the access probe failed ({}): {}",
                out.status,
                stderr(&out).trim()
            ),
        ),
    }
}

/// The first field of `ls -ld` (type, permissions and the `+` of an ACL).
fn expect_ls(r: &mut Report, fs: &Fs, p: &Path, want: &str, what: &str) {
    let out = Cred::ROOT.run("ls", &["-ld", s(p)], STEP);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let got = text.split_whitespace().next().unwrap_or("");
    if got != want {
        r.fail(
            fs,
            format!("{what}: ls -ld shows {got:?}, expected {want:?}"),
        );
    }
}

fn setfacl(r: &mut Report, fs: &Fs, who: Cred, args: &[&str], p: &Path) -> bool {
    let mut a = args.to_vec();
    a.push(s(p));
    let out = who.run("setfacl", &a, STEP);
    r.ok(
        fs,
        &out,
        &format!("setfacl {} {} by {who}", args.join(" "), rel(fs, p)),
    )
}

fn acl_dir(fs: &Fs) -> PathBuf {
    let d = fs.root().join("acl");
    make_dir(fs, &d, 0, 0, 0o755);
    d
}

#[test]
fn a_named_user_acl_entry_grants_access_and_shows_as_the_group_class() {
    let fss = filesystems("perm-acl-user");
    let mut r = Report::default();
    for fs in &fss {
        let f = acl_dir(fs).join("f");
        make_file(fs, &f, b"data", 1, 1, 0o600);
        expect_access(
            &mut r,
            fs,
            NOBODY,
            &f,
            "r",
            libc::EACCES,
            "before any ACL, 0600 file of 1:1",
        );
        if !setfacl(&mut r, fs, Cred::ROOT, &["-m", "u:65534:rw"], &f) {
            continue;
        }
        r.mode(
            fs,
            &f,
            0o660,
            "after setfacl -m u:65534:rw on a 0600 file [group class = mask rw-]",
        );
        expect_ls(&mut r, fs, &f, "-rw-rw----+", "after setfacl -m u:65534:rw");
        expect_acl(
            &mut r,
            fs,
            &[&f],
            false,
            "# file: acl/f
             # owner: 1
             # group: 1
             user::rw-
             user:65534:rw-
             group::---
             mask::rw-
             other::---",
            "after setfacl -m u:65534:rw",
        );
        expect_access(&mut r, fs, NOBODY, &f, "r", 0, "the named user reads");
        expect_access(&mut r, fs, NOBODY, &f, "w", 0, "the named user writes");
        expect_access(
            &mut r,
            fs,
            BIN,
            &f,
            "r",
            libc::EACCES,
            "a user not named (not in the group) reads",
        );
        expect_access(&mut r, fs, DAEMON, &f, "r", 0, "the owner reads");
    }
    r.finish("named user ACL");
}

#[test]
fn a_named_group_entry_denies_its_members_although_other_grants_and_setfacl_b_restores() {
    let fss = filesystems("perm-acl-group");
    let member = Cred::new(65534, 65534, &[2]);
    let mut r = Report::default();
    for fs in &fss {
        let f = acl_dir(fs).join("g");
        make_file(fs, &f, b"data", 1, 1, 0o644);
        expect_access(
            &mut r,
            fs,
            member,
            &f,
            "r",
            0,
            "before any ACL, other grants read",
        );
        if !setfacl(&mut r, fs, Cred::ROOT, &["-m", "g:2:---"], &f) {
            continue;
        }
        r.mode(fs, &f, 0o644, "after setfacl -m g:2:--- [mask r--]");
        expect_acl(
            &mut r,
            fs,
            &[&f],
            false,
            "# file: acl/g
             # owner: 1
             # group: 1
             user::rw-
             group::r--
             group:2:---
             mask::r--
             other::r--",
            "after setfacl -m g:2:---",
        );
        expect_access(
            &mut r,
            fs,
            member,
            &f,
            "r",
            libc::EACCES,
            "a member of the named group with no permissions (other grants read)",
        );
        expect_access(
            &mut r,
            fs,
            NOBODY,
            &f,
            "r",
            0,
            "a user in no named group: other grants read",
        );
        if !setfacl(&mut r, fs, Cred::ROOT, &["-b"], &f) {
            continue;
        }
        r.mode(fs, &f, 0o644, "after setfacl -b");
        expect_ls(
            &mut r,
            fs,
            &f,
            "-rw-r--r--",
            "after setfacl -b (no ACL left)",
        );
        expect_acl(
            &mut r,
            fs,
            &[&f],
            false,
            "# file: acl/g
             # owner: 1
             # group: 1
             user::rw-
             group::r--
             other::r--",
            "after setfacl -b",
        );
        expect_access(
            &mut r,
            fs,
            member,
            &f,
            "r",
            0,
            "after setfacl -b, other grants read again",
        );
    }
    r.finish("named group ACL");
}

#[test]
fn the_acl_mask_limits_named_entries_and_chmod_rewrites_the_mask() {
    let fss = filesystems("perm-acl-mask");
    let mut r = Report::default();
    for fs in &fss {
        let f = acl_dir(fs).join("m");
        make_file(fs, &f, b"data", 1, 1, 0o600);
        if !setfacl(&mut r, fs, Cred::ROOT, &["-m", "u:65534:rw"], &f)
            || !setfacl(&mut r, fs, Cred::ROOT, &["-m", "m::r"], &f)
        {
            continue;
        }
        r.mode(
            fs,
            &f,
            0o640,
            "after setfacl -m m::r [group class = mask r--]",
        );
        expect_acl(
            &mut r,
            fs,
            &[&f],
            false,
            "# file: acl/m
             # owner: 1
             # group: 1
             user::rw-
             user:65534:rw-\t#effective:r--
             group::---
             mask::r--
             other::---",
            "after setfacl -m u:65534:rw then m::r",
        );
        expect_access(
            &mut r,
            fs,
            NOBODY,
            &f,
            "w",
            libc::EACCES,
            "the named user writes through mask r--",
        );
        expect_access(
            &mut r,
            fs,
            NOBODY,
            &f,
            "r",
            0,
            "the named user reads through mask r--",
        );

        let chmod = |r: &mut Report, mode: u32| match std::fs::set_permissions(
            &f,
            std::fs::Permissions::from_mode(mode),
        ) {
            Ok(()) => true,
            Err(e) => {
                r.fail(fs, format!("chmod {} of the ACL'd file: {e}", oct(mode)));
                false
            }
        };
        if chmod(&mut r, 0o660) {
            r.mode(fs, &f, 0o660, "after chmod 0660");
            expect_acl(
                &mut r,
                fs,
                &[&f],
                false,
                "# file: acl/m
                 # owner: 1
                 # group: 1
                 user::rw-
                 user:65534:rw-
                 group::---
                 mask::rw-
                 other::---",
                "after chmod 0660 [the mask becomes the group bits rw-]",
            );
            expect_access(
                &mut r,
                fs,
                NOBODY,
                &f,
                "w",
                0,
                "the named user writes after chmod 0660",
            );
        }
        if chmod(&mut r, 0o600) {
            expect_acl(
                &mut r,
                fs,
                &[&f],
                false,
                "# file: acl/m
                 # owner: 1
                 # group: 1
                 user::rw-
                 user:65534:rw-\t#effective:---
                 group::---
                 mask::---
                 other::---",
                "after chmod 0600 [the mask becomes the group bits ---]",
            );
            expect_access(
                &mut r,
                fs,
                NOBODY,
                &f,
                "r",
                libc::EACCES,
                "the named user reads after chmod 0600",
            );
        }
    }
    r.finish("ACL mask");
}

/// With umask 077, creates `argv[1]/new` asking for 0666 and `argv[1]/sub` asking for 0777,
/// then `argv[1]/sub/deeper` asking for 0666.
const CREATE_WITH_UMASK_077: &str = r#"
import os, sys
os.umask(0o077)
d = sys.argv[1]
os.close(os.open(f"{d}/new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
os.mkdir(f"{d}/sub", 0o777)
os.close(os.open(f"{d}/sub/deeper", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
"#;

const DEFAULT_ACL: &str = "default:user::rwx
     default:user:65534:rwx
     default:group::r-x
     default:mask::rwx
     default:other::r-x";

#[test]
fn a_default_acl_is_inherited_and_overrides_the_umask() {
    let fss = filesystems("perm-acl-default");
    let mut r = Report::default();
    for fs in &fss {
        let base = acl_dir(fs);
        let d = base.join("d");
        make_dir(fs, &d, 0, 0, 0o755);
        let e = base.join("e");
        make_dir(fs, &e, 0, 0, 0o755);
        if !setfacl(&mut r, fs, Cred::ROOT, &["-d", "-m", "u:65534:rwx"], &d) {
            continue;
        }
        expect_acl(
            &mut r,
            fs,
            &[&d],
            false,
            &format!(
                "# file: acl/d
                 # owner: 0
                 # group: 0
                 user::rwx
                 group::r-x
                 other::r-x
                 {DEFAULT_ACL}"
            ),
            "after setfacl -d -m u:65534:rwx",
        );
        for dir in [&d, &e] {
            let out = Cred::ROOT.run(PYTHON, &["-c", CREATE_WITH_UMASK_077, s(dir)], STEP);
            r.ok(
                fs,
                &out,
                &format!("creating with umask 077 in {}", rel(fs, dir)),
            );
        }
        // With the default ACL the umask is ignored: the ACL masked by the requested mode.
        r.mode(
            fs,
            &d.join("new"),
            0o664,
            "file asking for 0666 under a default ACL, umask 077",
        );
        r.mode(
            fs,
            &d.join("sub"),
            0o775,
            "directory asking for 0777 under a default ACL, umask 077",
        );
        r.mode(
            fs,
            &d.join("sub/deeper"),
            0o664,
            "file asking for 0666 in the inheriting subdirectory",
        );
        let file_acl = |name: &str| {
            format!(
                "# file: acl/d/{name}
                 # owner: 0
                 # group: 0
                 user::rw-
                 user:65534:rwx\t#effective:rw-
                 group::r-x\t#effective:r--
                 mask::rw-
                 other::r--"
            )
        };
        expect_acl(
            &mut r,
            fs,
            &[&d.join("new")],
            false,
            &file_acl("new"),
            "the access ACL of a file created under a default ACL",
        );
        expect_acl(
            &mut r,
            fs,
            &[&d.join("sub/deeper")],
            false,
            &file_acl("sub/deeper"),
            "the access ACL of a file created in the subdirectory",
        );
        expect_acl(
            &mut r,
            fs,
            &[&d.join("sub")],
            false,
            &format!(
                "# file: acl/d/sub
                 # owner: 0
                 # group: 0
                 user::rwx
                 user:65534:rwx
                 group::r-x
                 mask::rwx
                 other::r-x
                 {DEFAULT_ACL}"
            ),
            "a subdirectory inherits the default ACL (as access and default ACL)",
        );
        expect_access(
            &mut r,
            fs,
            NOBODY,
            &d.join("new"),
            "w",
            0,
            "the named user of the inherited ACL writes",
        );
        expect_access(
            &mut r,
            fs,
            BIN,
            &d.join("new"),
            "w",
            libc::EACCES,
            "another user writes the inherited file",
        );
        // Without a default ACL the umask applies.
        r.mode(
            fs,
            &e.join("new"),
            0o600,
            "file asking for 0666 without a default ACL, umask 077",
        );
        r.mode(
            fs,
            &e.join("sub"),
            0o700,
            "directory asking for 0777 without a default ACL, umask 077",
        );
        expect_ls(
            &mut r,
            fs,
            &e.join("new"),
            "-rw-------",
            "a file created without a default ACL has no ACL",
        );
    }
    r.finish("default ACL");
}

#[test]
fn cp_a_of_a_tree_preserves_its_acls() {
    let fss = filesystems("perm-acl-cp");
    let mut r = Report::default();
    let want = format!(
        "# file: T
         # owner: 0
         # group: 0
         user::rwx
         group::r-x
         other::r-x
         {DEFAULT_ACL}

         # file: T/new
         # owner: 0
         # group: 0
         user::rw-
         user:65534:rwx\t#effective:rw-
         group::r-x\t#effective:r--
         mask::rw-
         other::r--

         # file: T/own
         # owner: 1
         # group: 2
         user::rw-
         user:2:r--
         user:65534:rwx
         group::r-x
         group:1:rw-
         mask::rwx
         other::---

         # file: T/sub
         # owner: 0
         # group: 0
         user::rwx
         user:65534:rwx
         group::r-x
         mask::rwx
         other::r-x
         {DEFAULT_ACL}

         # file: T/sub/deeper
         # owner: 0
         # group: 0
         user::rw-
         user:65534:rwx\t#effective:rw-
         group::r-x\t#effective:r--
         mask::rw-
         other::r--"
    );
    for fs in &fss {
        let base = acl_dir(fs);
        let t = base.join("t");
        make_dir(fs, &t, 0, 0, 0o755);
        if !setfacl(&mut r, fs, Cred::ROOT, &["-d", "-m", "u:65534:rwx"], &t) {
            continue;
        }
        let out = Cred::ROOT.run(PYTHON, &["-c", CREATE_WITH_UMASK_077, s(&t)], STEP);
        r.ok(fs, &out, "creating the tree");
        let own = t.join("own");
        // Created under the default ACL asking for 0640, then given more entries.
        let out = Cred::ROOT.run(
            PYTHON,
            &[
                "-c",
                "import os,sys; os.close(os.open(sys.argv[1], os.O_CREAT|os.O_WRONLY, 0o640)); os.chown(sys.argv[1], 1, 2)",
                s(&own),
            ],
            STEP,
        );
        r.ok(fs, &out, "creating t/own");
        setfacl(&mut r, fs, Cred::ROOT, &["-m", "u:2:r,g:1:rw"], &own);
        let original = getfacl(&mut r, fs, &[&t], true).replace("acl/t", "T");
        if original != acl(&want) {
            r.fail(
                fs,
                format!(
                    "the tree before copying: getfacl -R shows\n{original}expected\n{}",
                    acl(&want)
                ),
            );
        }
        let out = Cred::ROOT.run("cp", &["-a", s(&t), s(&base.join("t2"))], STEP);
        if !r.ok(fs, &out, "cp -a acl/t acl/t2") {
            continue;
        }
        let copy = getfacl(&mut r, fs, &[&base.join("t2")], true).replace("acl/t2", "T");
        if copy != original {
            r.fail(
                fs,
                format!(
                    "cp -a: getfacl -R of the copy shows\n{copy}the original shows\n{original}"
                ),
            );
        }
    }
    r.finish("cp -a");
}

#[test]
fn setting_an_access_acl_as_an_owner_outside_the_group_clears_setgid() {
    let fss = filesystems("perm-acl-sgid");
    let mut r = Report::default();
    // (file group, who sets the ACL, expected mode, why)
    let cases = [
        (
            2,
            DAEMON,
            0o0775,
            "the owner is not in the file's group: S_ISGID cleared",
        ),
        (
            1,
            DAEMON,
            0o2775,
            "the owner's primary group is the file's: S_ISGID kept",
        ),
        (
            2,
            Cred::new(1, 1, &[2]),
            0o2775,
            "the owner has the file's group as supplementary: kept",
        ),
        (2, Cred::ROOT, 0o2775, "root (CAP_FSETID): kept"),
    ];
    for fs in &fss {
        let base = acl_dir(fs);
        for (i, (gid, who, want, why)) in cases.into_iter().enumerate() {
            let f = base.join(format!("s{i}"));
            make_file(fs, &f, b"#!/bin/sh\n", 1, gid, 0o2775);
            if !setfacl(&mut r, fs, who, &["-m", "u:65534:r"], &f) {
                continue;
            }
            let what = format!("setfacl -m u:65534:r by {who} on a 02775 file owned by 1:{gid}");
            r.mode(fs, &f, want, &format!("{what} [{why}]"));
            // getfacl shows set-id bits as a flags line.
            let flags = if want & 0o2000 != 0 {
                "# flags: -s-\n"
            } else {
                ""
            };
            expect_acl(
                &mut r,
                fs,
                &[&f],
                false,
                &format!(
                    "# file: acl/s{i}
                     # owner: 1
                     # group: {gid}
                     {flags}user::rwx
                     user:65534:r--
                     group::rwx
                     mask::rwx
                     other::r-x"
                ),
                &what,
            );
        }
    }
    r.finish("ACL and S_ISGID");
}
