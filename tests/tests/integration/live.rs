//! Live updates on real mounts, under load (`docs/live-update.md`). Every test mounts with
//! a fresh keyring, packs the packages it needs with its own key, applies them with
//! `updater apply` while a workload runs, and ends with zero workload errors, the expected
//! version serving, and an image that checks clean after the unmount.
//!
//! The neighbouring versions (feature builds of fsd and blockdev) come from
//! `scripts/build-examples.sh --bins-only`, which builds them once in their own target
//! directory; run it before the suite to keep the first test that needs them fast.
//!
//! Fault tests stand a small script in for the new fsd: one that dies while importing the
//! state, and a relay (Perl, always on Debian) that runs the real fsd behind its control
//! link and corrupts the state blob on its way to the supervisor or to the new version.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use molt_tests::harness::{bin, run, updater, Keyring, Mount, TempDir, TestImage};
use molt_tests::stress::{self, describe, Mix, StressConfig, StressReport};

/// Far enough in the future for every package the tests make.
pub(super) const EXPIRES: u64 = 1_893_456_000;

/// `updater` exit codes.
pub(super) const COMMITTED: i32 = 0;
pub(super) const REFUSED: i32 = 2;
const ABORTED: i32 = 3;
pub(super) const ROLLED_BACK: i32 = 4;

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(super) fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub(super) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The cargo profile and target directory this test binary was built with.
pub(super) fn build_profile() -> (String, PathBuf) {
    let dir = bin("fsd").parent().expect("bin dir").to_path_buf();
    let name = dir.file_name().expect("profile dir").to_string_lossy();
    let profile = if name == "debug" {
        "dev".to_string()
    } else {
        name.to_string()
    };
    (profile, dir.parent().expect("target dir").to_path_buf())
}

/// Runs `scripts/build-examples.sh` with this build's profile and default binaries,
/// then `extra` (options and the positional arguments).
pub(super) fn build_examples(extra: &[&Path]) -> Output {
    let (profile, target) = build_profile();
    let default_bins = bin("fsd").parent().expect("bin dir").to_path_buf();
    run(
        Command::new(repo_root().join("scripts/build-examples.sh"))
            .args(["--profile", &profile, "--default-bins"])
            .arg(&default_bins)
            .args(extra)
            .env("CARGO_TARGET_DIR", target),
        Duration::from_secs(450),
    )
}

/// The variant binaries, copied into `out/bin/` (built on first use).
pub(super) fn variants(out: &Path) -> PathBuf {
    let o = build_examples(&[Path::new("--bins-only"), out]);
    assert!(
        o.status.success(),
        "building the variants failed:\n{}",
        text(&o)
    );
    out.join("bin")
}

/// A package directory: a manifest and its payload files, packed into `<dir>.lup`.
pub(super) fn pack(keys: &Keyring, dir: &Path, manifest: &str, files: &[(&str, &Path)]) -> PathBuf {
    std::fs::create_dir_all(dir.join("bin")).expect("package dir");
    std::fs::write(dir.join("manifest.toml"), manifest).expect("manifest");
    for (name, src) in files {
        let dst = dir.join(name);
        let _ = std::fs::remove_file(&dst);
        if std::fs::hard_link(src, &dst).is_err() {
            std::fs::copy(src, &dst).expect("payload file");
        }
    }
    let out = dir.with_extension("lup");
    keys.pack(&dir.join("manifest.toml"), &out);
    out
}

/// An example package from `examples/updates/NAME`, with its payload.
pub(super) fn pack_example(
    keys: &Keyring,
    work: &Path,
    name: &str,
    files: &[(&str, &Path)],
) -> PathBuf {
    let manifest = std::fs::read_to_string(
        repo_root()
            .join("examples/updates")
            .join(name)
            .join("manifest.toml"),
    )
    .unwrap_or_else(|e| panic!("example {name}: {e}"));
    pack(keys, &work.join(name), &manifest, files)
}

/// A manifest replacing fsd only.
pub(super) fn fsd_manifest(
    name: &str,
    sequence: u64,
    from: &str,
    to: &str,
    required: &[&str],
) -> String {
    let required: Vec<String> = required.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "[package]\n\
         name = {name:?}\n\
         sequence = {sequence}\n\
         expires_unix = {EXPIRES}\n\
         nature = \"one-component\"\n\
         deadline_ms = 10000\n\n\
         [[component]]\n\
         name = \"fsd\"\n\
         applies_to = [{from:?}]\n\
         new_version = {to:?}\n\
         binary = \"bin/fsd\"\n\
         state_schema_reads = [1, 2]\n\
         state_schema_writes = 2\n\
         required_state = [{}]\n\n\
         [[file]]\n\
         path = \"bin/fsd\"\n",
        required.join(", ")
    )
}

/// Mounts `img` trusting `keys`, optionally with another block driver build.
pub(super) fn mount_live(img: &TestImage, keys: &Keyring, driver: Option<&Path>) -> Mount {
    let keyring = keys.keyring.to_str().expect("utf-8").to_string();
    match driver {
        Some(d) => img.mount_with(&["--keyring", &keyring], &[("MOLT_BLOCKDEV_BIN", d)]),
        None => img.mount_with(&["--keyring", &keyring], &[]),
    }
}

/// One `updater apply`.
pub(super) struct Applied {
    pub(super) code: i32,
    /// The protocol's events as `updater apply --json` streamed them, one JSON object
    /// each; what the assertions read.
    pub(super) events: Vec<serde_json::Value>,
    /// Everything updater printed, for failure messages.
    pub(super) out: String,
    pub(super) started_ms: u64,
    pub(super) ended_ms: u64,
}

impl Applied {
    pub(super) fn took(&self) -> u64 {
        self.ended_ms - self.started_ms
    }

    /// The `Phase` events, as (phase, state, elapsed ms, detail).
    fn phases(&self) -> impl Iterator<Item = (&str, &str, u64, &str)> {
        self.events.iter().filter_map(|e| {
            let p = e.get("Phase")?;
            Some((
                p["phase"].as_str()?,
                p["state"].as_str()?,
                p["elapsed_ms"].as_u64()?,
                p["detail"].as_str().unwrap_or_default(),
            ))
        })
    }

    /// Duration of a phase (`"Preparation"`, `"StateTransfer"`…) that finished.
    pub(super) fn phase_ms(&self, phase: &str) -> Option<u64> {
        self.phases()
            .find(|(p, s, ..)| *p == phase && *s == "Finished")
            .map(|(_, _, ms, _)| ms)
    }

    /// Whether the update reached `phase` at all.
    pub(super) fn reached(&self, phase: &str) -> bool {
        self.phases().any(|(p, ..)| p == phase)
    }

    /// The phase that failed and its detail.
    pub(super) fn failed(&self) -> Option<(String, String)> {
        self.phases()
            .find(|(_, s, ..)| *s == "Failed")
            .map(|(p, _, _, d)| (p.to_string(), d.to_string()))
    }

    /// The outcome (`"Committed"`, `"RolledBack"`, `"Refused"`…).
    pub(super) fn outcome(&self) -> String {
        self.events
            .iter()
            .find_map(|e| e.get("Done")?["outcome"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// The names of the checks that did not pass.
    pub(super) fn failed_checks(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| e.get("Check"))
            .filter(|c| c["passed"] == false)
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect()
    }
}

pub(super) fn apply(mnt: &Path, pkg: &Path, extra: &[&str]) -> Applied {
    let started_ms = now_ms();
    let o = updater(
        &[
            &[
                "apply",
                pkg.to_str().expect("utf-8"),
                "--mount",
                mnt.to_str().expect("utf-8"),
                "--json",
            ],
            extra,
        ]
        .concat(),
    );
    let events = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("updater apply --json printed {l:?}: {e}"))
        })
        .collect();
    Applied {
        code: o.status.code().unwrap_or(-1),
        events,
        out: text(&o),
        started_ms,
        ended_ms: now_ms(),
    }
}

pub(super) fn status(mnt: &Path) -> serde_json::Value {
    let o = updater(&["status", "--mount", mnt.to_str().expect("utf-8"), "--json"]);
    assert!(o.status.success(), "updater status failed:\n{}", text(&o));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("status is not JSON ({e}):\n{}", text(&o)))
}

/// (version, pid) of a component in a status report.
pub(super) fn component(st: &serde_json::Value, name: &str) -> (String, u64) {
    let c = st["components"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("status names no {name}: {st}"));
    (
        c["version"].as_str().unwrap_or_default().to_string(),
        c["pid"].as_u64().unwrap_or(0),
    )
}

/// The outcome and message of the last update in the history, in lower case.
pub(super) fn last_outcome(st: &serde_json::Value) -> (String, String) {
    let h = st["history"]
        .as_array()
        .and_then(|h| h.last())
        .unwrap_or_else(|| panic!("no history: {st}"));
    (
        h["outcome"].to_string().to_lowercase(),
        h["message"].as_str().unwrap_or_default().to_string(),
    )
}

/// The stress workload of these tests: data and metadata on several threads, half the
/// data files held open for the whole run, every read verified. Runs until stopped.
pub(super) struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<StressReport>>,
}

impl Drop for Load {
    /// A failed test stops the workload so that the mount can be undone.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Load {
    pub(super) fn start(dir: &Path, threads: u32, mix: &str) -> Load {
        Load::start_holding(dir, threads, mix, Some(4))
    }

    /// `hold_open`: data files held open for the whole run (`None`: all of them); the
    /// others are opened and closed around every I/O.
    fn start_holding(dir: &Path, threads: u32, mix: &str, hold_open: Option<u32>) -> Load {
        let mut cfg = StressConfig::new(dir);
        cfg.threads = threads;
        cfg.mix = Mix::parse(mix).expect("mix");
        cfg.files = 8;
        cfg.file_size = 4 << 20;
        cfg.hold_open = hold_open;
        cfg.time = Some(Duration::from_secs(3600));
        cfg.op_timeout = Duration::from_secs(20);
        cfg.seed = molt_tests::harness::seed_from_env("MOLT_LIVE_SEED");
        println!("stress seed {} (MOLT_LIVE_SEED replays it)", cfg.seed);
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || stress::run(cfg, s).expect("stress run"));
        // Let the workload get going (blocks never written read as zeros, so there is no
        // prepare pass).
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) && !dir.join("meta").exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        Load {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the workload and asserts it saw no error.
    pub(super) fn finish(mut self) -> StressReport {
        self.stop.store(true, Ordering::SeqCst);
        let r = self
            .thread
            .take()
            .expect("stress thread")
            .join()
            .expect("stress thread");
        let errors: Vec<String> = r.errors.iter().map(describe).collect();
        assert!(
            r.errors_total == 0 && r.stuck_threads == 0,
            "the workload saw {} errors ({} stuck threads):\n{}",
            r.errors_total,
            r.stuck_threads,
            errors.join("\n")
        );
        println!(
            "workload: {} verified reads, {} read / {} written bytes, longest stall {:.1} ms",
            r.verify.blocks_verified,
            r.bytes_read,
            r.bytes_written,
            r.longest_stall.duration.as_secs_f64() * 1e3
        );
        r
    }
}

/// Longest window without any completed operation overlapping `[from_ms, to_ms]`
/// (unix ms), from the workload's 10 ms completion timeline.
pub(super) fn stall_within(r: &StressReport, from_ms: u64, to_ms: u64) -> u64 {
    let bucket = u64::from(r.timeline.bucket_ms.max(1));
    let (mut best, mut run_start) = (0u64, None::<u64>);
    for (i, &n) in r.timeline.counts.iter().enumerate() {
        let t = r.started_unix_ms + i as u64 * bucket;
        if n == 0 {
            run_start.get_or_insert(t);
        } else if let Some(s) = run_start.take() {
            if t >= from_ms && s <= to_ms {
                best = best.max(t - s);
            }
        }
    }
    best
}

/// A file and a directory held open by the test across every update: it writes through
/// the file before, and reads back and writes through the same descriptors after.
pub(super) struct Held {
    file: File,
    dir: File,
    pattern: Vec<u8>,
}

impl Held {
    pub(super) fn open(mnt: &Path) -> Held {
        let path = mnt.join("held-open");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("held file");
        let pattern: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 + 3) as u8).collect();
        file.write_all(&pattern).expect("write held file");
        file.sync_all().expect("fsync held file");
        let dir = File::open(mnt).expect("held dir");
        Held { file, dir, pattern }
    }

    /// Reads back what was written, writes more, and lists the held directory.
    pub(super) fn check(&mut self) {
        let mut back = vec![0u8; self.pattern.len()];
        self.file
            .read_exact_at(&mut back, 0)
            .expect("read through the held descriptor");
        assert!(
            back == self.pattern,
            "the held file's content changed across the updates"
        );
        self.file.seek(SeekFrom::End(0)).expect("seek");
        self.file
            .write_all(b"still open after the update")
            .expect("write through the held descriptor");
        self.file
            .sync_all()
            .expect("fsync through the held descriptor");
        let st = self.dir.metadata().expect("fstat the held directory");
        assert!(st.is_dir());
    }
}

/// A copy of `src` that differs in its bytes (trailing padding an ELF loader ignores), so
/// the supervisor installs and runs it as a distinct binary.
pub(super) fn distinct_copy(src: &Path, dst: &Path, tag: &str) {
    std::fs::copy(src, dst).expect("copy binary");
    let mut f = OpenOptions::new()
        .append(true)
        .open(dst)
        .expect("open copy");
    f.write_all(format!("\nmolt-test-build {tag}\n").as_bytes())
        .expect("pad copy");
}

/// Twenty consecutive fsd updates while the stress workload runs: every one commits, the
/// workload sees no error, held files keep working, and the image checks clean.
#[test]
fn twenty_live_updates_under_load() {
    let img = TestImage::new("live20", "512M");
    let keys = Keyring::new("live20-keys");
    let work = TempDir::new("live20-work");
    let m = mount_live(&img, &keys, None);
    let mut held = Held::open(m.path());
    // Two builds to alternate between: the default fsd and a byte-distinct copy of it.
    let a = bin("fsd");
    let b = work.path().join("fsd-b");
    distinct_copy(&a, &b, "b");
    let load = Load::start(m.path(), 3, "read=40,write=40,meta=20");

    let first_pid = component(&status(m.path()), "fsd").1;
    let mut applied = Vec::new();
    for i in 1..=20u64 {
        let src = if i % 2 == 1 { &b } else { &a };
        let pkg = pack(
            &keys,
            &work.path().join(format!("u{i:02}")),
            &fsd_manifest(&format!("fsd-ab-{i}"), i, "0.1.0", "0.1.0", &["quiescent"]),
            &[("bin/fsd", src)],
        );
        let r = apply(m.path(), &pkg, &[]);
        assert_eq!(r.code, COMMITTED, "update {i} did not commit:\n{}", r.out);
        let _ = std::fs::remove_file(&pkg);
        applied.push(r);
        std::thread::sleep(Duration::from_millis(300));
    }
    let st = status(m.path());
    let (_, pid) = component(&st, "fsd");
    assert_ne!(pid, first_pid, "the fsd process was never replaced");
    assert_eq!(
        st["history"].as_array().map(Vec::len),
        Some(20),
        "history: {st}"
    );
    held.check();
    let report = load.finish();

    println!("update  apply ms  preparation ms  transfer ms  replacement ms  stall ms");
    for (i, r) in applied.iter().enumerate() {
        println!(
            "{:>6}  {:>8}  {:>14}  {:>11}  {:>14}  {:>8}",
            i + 1,
            r.took(),
            r.phase_ms("Preparation")
                .map_or("?".into(), |v| v.to_string()),
            r.phase_ms("StateTransfer")
                .map_or("?".into(), |v| v.to_string()),
            r.phase_ms("Replacement")
                .map_or("?".into(), |v| v.to_string()),
            stall_within(&report, r.started_ms, r.ended_ms)
        );
    }
    drop(held);
    m.unmount();
    img.assert_clean();
}

// ---- Faults: each ends with the old version serving and nothing lost. ----

/// Mounts, starts the workload and holds a file open; `fault` applies what it likes and
/// returns the expected exit code and the phase that must fail. Afterwards the fsd process
/// and version are the old ones, the workload saw no error, and the image checks clean.
fn fault_case(
    tag: &str,
    fault: impl FnOnce(&Path, &Keyring, &Path) -> Applied,
    want: i32,
    failed_phase: &str,
) {
    let img = TestImage::new(tag, "256M");
    let keys = Keyring::new(&format!("{tag}-keys"));
    let work = TempDir::new(&format!("{tag}-work"));
    let m = mount_live(&img, &keys, None);
    let mut held = Held::open(m.path());
    let load = Load::start(m.path(), 2, "read=40,write=40,meta=20");
    let before = component(&status(m.path()), "fsd");

    let r = fault(m.path(), &keys, work.path());
    println!("{}", r.out);
    assert_eq!(r.code, want, "expected exit code {want}:\n{}", r.out);
    assert_eq!(
        r.failed().map(|(phase, _)| phase).as_deref(),
        Some(failed_phase),
        "the {failed_phase} phase must fail:\n{}",
        r.out
    );

    let st = status(m.path());
    assert_eq!(
        component(&st, "fsd"),
        before,
        "the old fsd must still be serving: {st}"
    );
    held.check();
    load.finish();
    drop(held);
    m.unmount();
    img.assert_clean();
}

/// Stands in for a new fsd that dies while importing the state: it answers the probe as
/// the real one does, says `Spawned` (a frame: length 1, variant 0), reads the first byte
/// of the state's frame, and exits 1.
const CRASH_IN_IMPORT: &str = "#!/bin/sh\n\
# A new fsd that dies while importing the state (live-update fault test).\n\
if [ \"$1\" = component-info ]; then exec @REAL@ component-info; fi\n\
printf '\\001\\000\\000\\000\\000' >&7\n\
head -c 1 <&7 >/dev/null\n\
exit 1\n";

#[test]
fn fault_new_version_crashes_during_import() {
    fault_case(
        "live-crash",
        |mnt, keys, work| {
            let script = work.join("crash-in-import");
            let real = bin("fsd");
            let text = CRASH_IN_IMPORT.replace("@REAL@", real.to_str().expect("utf-8"));
            std::fs::write(&script, text).expect("script");
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            let pkg = pack(
                keys,
                &work.join("crash"),
                &fsd_manifest("crash-in-import", 1, "0.1.0", "0.1.0", &[]),
                &[("bin/fsd", &script)],
            );
            apply(mnt, &pkg, &[])
        },
        ROLLED_BACK,
        "StateTransfer",
    );
}

/// A new fsd that runs the real one behind its control link (fd 7) and relays the link
/// both ways, frame by frame (`[u32 length][message]`; a `State` command is variant 4 and
/// a `Ready` reply variant 2, each a varint length and the blob), changing a state blob
/// as MODE says:
/// - `pass`: nothing;
/// - `state-flip`: flips a bit in the middle of the state sent to it (its frame CRC no
///   longer matches);
/// - `ready-flip`: the same on the state it exports when it is replaced;
/// - `ready-zero-lookup`: re-frames the exported state with the first inode's kernel
///   lookup count set to 0 (a valid frame whose invariants do not hold).
const RELAY: &str = r#"#!/usr/bin/perl
# Live-update fault test: a new fsd that relays its control link to the real one.
use strict;
use warnings;
use Socket;
use POSIX ();
use IO::Handle;
use Compress::Zlib ();

my $real = '@REAL@';
my $mode = '@MODE@';
if (@ARGV && $ARGV[0] eq 'component-info') { exec($real, @ARGV) or die "exec: $!"; }

sub die_with_parent { syscall(157, 1, 9) if $^O eq 'linux'; }    # PR_SET_PDEATHSIG, SIGKILL (x86_64)

sub varint {
    my ($s, $o) = @_;
    my $b = ord(substr($s, $o, 1));
    return ($b, 1) if $b < 251;
    return (unpack('v', substr($s, $o + 1, 2)), 3) if $b == 251;
    return (unpack('V', substr($s, $o + 1, 4)), 5) if $b == 252;
    return (unpack('Q<', substr($s, $o + 1, 8)), 9) if $b == 253;
    die "relay: unexpected varint tag $b";
}

sub mutate {
    my ($blob) = @_;
    if ($mode =~ /-flip$/) {
        my $i = int(length($blob) / 2);
        substr($blob, $i, 1) = chr(ord(substr($blob, $i, 1)) ^ 1);
        return $blob;
    }
    if ($mode eq 'ready-zero-lookup') {
        my ($magic, $ver, $len) = unpack('a4 V Q<', substr($blob, 0, 16));
        my $p = substr($blob, 16, $len);
        my ($o, $v, $l) = (0);
        ($v, $l) = varint($p, $o); $o += $l + $v;    # version string
        ($v, $l) = varint($p, $o); $o += $l;         # init flags
        ($v, $l) = varint($p, $o); $o += $l;         # number of lookups
        die "relay: no lookups to corrupt" if $v == 0;
        ($v, $l) = varint($p, $o); $o += $l;         # first inode
        ($v, $l) = varint($p, $o);                   # its lookup count
        substr($p, $o, $l) = "\0";
        my $frame = $magic . pack('V Q<', $ver, length $p) . $p;
        return $frame . pack('V', Compress::Zlib::crc32($frame));
    }
    return $blob;
}

sub varint_encode {
    my ($v) = @_;
    return chr($v) if $v < 251;
    return chr(251) . pack('v', $v) if $v < 65536;
    return chr(252) . pack('V', $v) if $v < 4294967296;
    return chr(253) . pack('Q<', $v);
}

sub read_exactly {
    my ($from, $n) = @_;
    my $buf = '';
    while (length($buf) < $n) {
        my $r = read($from, $buf, $n - length($buf), length($buf));
        POSIX::_exit(0) unless $r;
    }
    return $buf;
}

# Relays frames; the blob of a message with variant $variant (-1: none) is mutated.
sub relay {
    my ($from, $to, $variant) = @_;
    die_with_parent();
    $to->autoflush(1);
    while (1) {
        my $len = unpack('V', read_exactly($from, 4));
        my $body = read_exactly($from, $len);
        if ($variant >= 0 && ord(substr($body, 0, 1)) == $variant) {
            my ($n, $l) = varint($body, 1);
            my $blob = mutate(substr($body, 1 + $l, $n));
            $body = chr($variant) . varint_encode(length $blob) . $blob;
        }
        print $to pack('V', length $body) . $body or POSIX::_exit(0);
    }
}

socketpair(my $mine, my $theirs, AF_UNIX, SOCK_STREAM, 0) or die "socketpair: $!";
my $pid = fork() // die "fork: $!";
if ($pid == 0) {
    close $mine;
    die_with_parent();
    POSIX::dup2(fileno($theirs), 7) // die "dup2: $!";
    exec($real, @ARGV) or die "exec $real: $!";
}
close $theirs;
open(my $sup, '+<&=', 7) or die "fd 7: $!";
my $up = fork() // die "fork: $!";
relay($mine, $sup, $mode =~ /^ready-/ ? 2 : -1) if $up == 0;
my $down = fork() // die "fork: $!";
relay($sup, $mine, $mode =~ /^state-/ ? 4 : -1) if $down == 0;
waitpid($pid, 0);
my $status = $?;
kill 'KILL', $up, $down;
waitpid($up, 0);
waitpid($down, 0);
exit($status & 127 ? 1 : $status >> 8);
"#;

fn relay_script(work: &Path, mode: &str) -> PathBuf {
    let path = work.join(format!("relay-{mode}"));
    let real = bin("fsd");
    std::fs::write(
        &path,
        RELAY
            .replace("@REAL@", real.to_str().expect("utf-8"))
            .replace("@MODE@", mode),
    )
    .expect("relay");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// The state the new version receives is corrupted on the way: its import refuses it.
/// Then the state the running version exports is corrupted: the supervisor's state check
/// refuses it (the running version is first replaced by a relayed fsd, the only way to
/// reach that blob from outside). Both times the old version resumes.
#[test]
fn fault_corrupted_state_blob() {
    fault_case(
        "live-corrupt",
        |mnt, keys, work| {
            let to_new = relay_script(work, "state-flip");
            let pkg = pack(
                keys,
                &work.join("p1"),
                &fsd_manifest("corrupt-to-new", 1, "0.1.0", "0.1.0", &[]),
                &[("bin/fsd", &to_new)],
            );
            let r = apply(mnt, &pkg, &[]);
            assert_eq!(
                r.code, ROLLED_BACK,
                "a corrupted state must be refused by the new version:\n{}",
                r.out
            );
            assert_eq!(r.outcome(), "RolledBack", "{}", r.out);
            r
        },
        ROLLED_BACK,
        "StateTransfer",
    );

    // Supervisor side: the running fsd's exported state is corrupted.
    let img = TestImage::new("live-corrupt2", "256M");
    let keys = Keyring::new("live-corrupt2-keys");
    let work = TempDir::new("live-corrupt2-work");
    let m = mount_live(&img, &keys, None);
    let mut held = Held::open(m.path());
    let load = Load::start(m.path(), 2, "read=40,write=40,meta=20");
    let relay = relay_script(work.path(), "ready-flip");
    let p1 = pack(
        &keys,
        &work.path().join("p1"),
        &fsd_manifest("relayed", 1, "0.1.0", "0.1.0", &[]),
        &[("bin/fsd", &relay)],
    );
    let r = apply(m.path(), &p1, &[]);
    assert_eq!(
        r.code, COMMITTED,
        "the relayed fsd must take over:\n{}",
        r.out
    );
    let before = component(&status(m.path()), "fsd");
    let p2 = pack(
        &keys,
        &work.path().join("p2"),
        &fsd_manifest("real", 2, "0.1.0", "0.1.0", &[]),
        &[("bin/fsd", &bin("fsd"))],
    );
    let r = apply(m.path(), &p2, &[]);
    println!("{}", r.out);
    assert_eq!(
        r.code, ROLLED_BACK,
        "a corrupted exported state must fail the state check:\n{}",
        r.out
    );
    assert_eq!(
        r.failed().map(|(phase, _)| phase).as_deref(),
        Some("StateChecking"),
        "{}",
        r.out
    );
    assert_eq!(
        component(&status(m.path()), "fsd"),
        before,
        "the relayed fsd must still serve"
    );
    held.check();
    load.finish();
    drop(held);
    m.unmount();
    img.assert_clean();
}

/// The running version exports a well-framed state whose invariants do not hold (an
/// inode with lookup count 0): the supervisor's state check refuses it and the running
/// version resumes.
#[test]
fn fault_state_check_fails() {
    let img = TestImage::new("live-check", "256M");
    let keys = Keyring::new("live-check-keys");
    let work = TempDir::new("live-check-work");
    let m = mount_live(&img, &keys, None);
    let mut held = Held::open(m.path());
    let load = Load::start(m.path(), 2, "read=40,write=40,meta=20");
    let relay = relay_script(work.path(), "ready-zero-lookup");
    let p1 = pack(
        &keys,
        &work.path().join("p1"),
        &fsd_manifest("relayed", 1, "0.1.0", "0.1.0", &[]),
        &[("bin/fsd", &relay)],
    );
    let r = apply(m.path(), &p1, &[]);
    assert_eq!(
        r.code, COMMITTED,
        "the relayed fsd must take over:\n{}",
        r.out
    );
    let before = component(&status(m.path()), "fsd");
    let p2 = pack(
        &keys,
        &work.path().join("p2"),
        &fsd_manifest("real", 2, "0.1.0", "0.1.0", &[]),
        &[("bin/fsd", &bin("fsd"))],
    );
    let r = apply(m.path(), &p2, &[]);
    println!("{}", r.out);
    assert_eq!(
        r.code, ROLLED_BACK,
        "a state with a broken invariant must fail the state check:\n{}",
        r.out
    );
    let (phase, detail) = r.failed().expect("a phase failed");
    assert_eq!(phase, "StateChecking", "{}", r.out);
    assert!(detail.contains("lookup count 0"), "{}", r.out);
    assert_eq!(
        component(&status(m.path()), "fsd"),
        before,
        "the relayed fsd must still serve"
    );
    held.check();
    load.finish();
    drop(held);
    m.unmount();
    img.assert_clean();
}

/// `no-open-files` cannot be reached while the test holds a file open: with a 1 ms
/// deadline the update is aborted and the running version keeps serving.
#[test]
fn fault_deadline_passes() {
    fault_case(
        "live-deadline",
        |mnt, keys, work| {
            let pkg = pack(
                keys,
                &work.join("p"),
                &fsd_manifest(
                    "needs-no-open-files",
                    1,
                    "0.1.0",
                    "0.1.0",
                    &["no-open-files"],
                ),
                &[("bin/fsd", &bin("fsd"))],
            );
            apply(mnt, &pkg, &["--deadline", "1ms"])
        },
        ABORTED,
        "Preparation",
    );
}

/// A package with one byte changed is refused before anything is notified: no component
/// is replaced and no binary is installed.
#[test]
fn fault_tampered_package() {
    fault_case(
        "live-tamper",
        |mnt, keys, work| {
            let pkg = pack(
                keys,
                &work.join("p"),
                &fsd_manifest("tampered", 1, "0.1.0", "0.1.0", &[]),
                &[("bin/fsd", &bin("fsd"))],
            );
            let mut bytes = std::fs::read(&pkg).expect("package");
            let i = bytes.len() - 1000;
            bytes[i] ^= 0x40;
            std::fs::write(&pkg, &bytes).expect("tampered package");
            let r = apply(mnt, &pkg, &[]);
            let installed = update_manager::runtime::dir_for(mnt).join("bin");
            assert!(
                std::fs::read_dir(&installed)
                    .map(|d| d.count() == 0)
                    .unwrap_or(true),
                "a refused package must install nothing ({})",
                installed.display()
            );
            r
        },
        REFUSED,
        "Initialization",
    );
}

/// A user other than root cannot use the control socket.
#[test]
fn fault_non_root_refused() {
    let img = TestImage::new("live-nobody", "64M");
    let keys = Keyring::new("live-nobody-keys");
    let m = mount_live(&img, &keys, None);
    let before = status(m.path());
    let o = run(
        Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(bin("updater"))
            .args(["status", "--mount", m.path().to_str().expect("utf-8")]),
        Duration::from_secs(60),
    );
    let out = text(&o);
    println!("{out}");
    assert!(
        matches!(o.status.code(), Some(2) | Some(5)),
        "nobody must be refused:\n{out}"
    );
    assert!(
        !out.contains("version"),
        "nobody must learn nothing about the stack:\n{out}"
    );
    assert!(
        out.contains("may not control") || out.contains("cannot reach") || out.contains("denied"),
        "the refusal must say why:\n{out}"
    );
    let after = status(m.path());
    assert_eq!(component(&after, "fsd"), component(&before, "fsd"));
    m.unmount();
    img.assert_clean();
}

// ---- The update natures, with the example packages. ----

/// A nature under load: mounts (with `driver` as the running block driver if given),
/// applies `pkg`, and expects it to commit to the `want` versions of fsd and blockdev.
fn nature_under_load(
    tag: &str,
    driver: Option<&Path>,
    pkg: impl FnOnce(&Keyring, &Path) -> PathBuf,
    want: (&str, &str),
) {
    let img = TestImage::new(tag, "256M");
    let keys = Keyring::new(&format!("{tag}-keys"));
    let work = TempDir::new(&format!("{tag}-work"));
    let pkg = pkg(&keys, work.path());
    let m = mount_live(&img, &keys, driver);
    let mut held = Held::open(m.path());
    let load = Load::start(m.path(), 3, "read=45,write=45,meta=10");
    println!("before: {}", status(m.path())["components"]);
    let r = apply(m.path(), &pkg, &[]);
    println!("{}", r.out);
    assert_eq!(r.code, COMMITTED, "the update did not commit:\n{}", r.out);
    let st = status(m.path());
    println!("after: {}", st["components"]);
    assert_eq!(component(&st, "fsd").0, want.0, "{st}");
    assert_eq!(component(&st, "blockdev").0, want.1, "{st}");
    held.check();
    let report = load.finish();
    println!(
        "apply took {} ms, stall {} ms",
        r.took(),
        stall_within(&report, r.started_ms, r.ended_ms)
    );
    drop(held);
    m.unmount();
    img.assert_clean();
}

#[test]
fn nature_one_component_blockdev_counters() {
    let w = TempDir::new("live-n1-bins");
    let bins = variants(w.path());
    let legacy = bins.join("blockdev-counters32");
    let new = bins.join("blockdev");
    nature_under_load(
        "live-n1",
        Some(&legacy),
        |keys, work| pack_example(keys, work, "01-one-component", &[("bin/blockdev", &new)]),
        ("0.1.0", "0.2.0"),
    );
}

#[test]
fn nature_interaction_ring48() {
    let w = TempDir::new("live-n2-bins");
    let bins = variants(w.path());
    nature_under_load(
        "live-n2",
        None,
        |keys, work| {
            pack_example(
                keys,
                work,
                "02-interaction",
                &[
                    ("bin/fsd", &bins.join("fsd-ring48")),
                    ("bin/blockdev", &bins.join("blockdev-ring48")),
                ],
            )
        },
        ("0.1.0+ring48", "0.2.0+ring48"),
    );
}

#[test]
fn nature_global_data_errcodes() {
    let w = TempDir::new("live-n3-bins");
    let bins = variants(w.path());
    nature_under_load(
        "live-n3",
        None,
        |keys, work| {
            pack_example(
                keys,
                work,
                "03-global-data",
                &[
                    ("bin/fsd", &bins.join("fsd-err2")),
                    ("bin/blockdev", &bins.join("blockdev-err2")),
                ],
            )
        },
        ("0.1.0+err2", "0.2.0+errcodes2"),
    );
}

/// The usage counter of a file (`user.molt.usage`).
fn usage(path: &Path) -> u64 {
    let mut buf = [0u8; 32];
    let r = rustix::fs::getxattr(path, c"user.molt.usage", &mut buf[..]);
    assert!(
        r.is_ok(),
        "getxattr {}: {}",
        path.display(),
        std::io::Error::from(r.unwrap_err())
    );
    let n = r.unwrap();
    String::from_utf8_lossy(&buf[..n])
        .trim()
        .parse()
        .expect("usage is a number")
}

/// Global algorithm: under load (every data file held open and used), the update waits
/// for every open file to be touched, commits, and from then on an open alone no longer
/// counts as a use. The workload holds its files open: with files opened and closed
/// around every I/O, one of them is usually between its open and its first I/O when the
/// server re-checks the state after draining, and the update is aborted.
#[test]
fn nature_global_algorithm_usage_on_touch() {
    let w = TempDir::new("live-n4-bins");
    let bins = variants(w.path());
    let img = TestImage::new("live-n4", "256M");
    let keys = Keyring::new("live-n4-keys");
    let work = TempDir::new("live-n4-work");
    let pkg = pack_example(
        &keys,
        work.path(),
        "04-global-algorithm",
        &[("bin/fsd", &bins.join("fsd-touch"))],
    );
    let m = mount_live(&img, &keys, None);
    let probe = m.path().join("usage-probe");
    std::fs::write(&probe, b"x").expect("probe");
    let base = usage(&probe);
    drop(File::open(&probe).expect("open"));
    assert_eq!(usage(&probe), base + 1, "0.1.0 counts an open");
    // An untouched open file holds the update back until it is read.
    let mut untouched = File::open(&probe).expect("open");
    let load = Load::start_holding(m.path(), 3, "read=50,write=50", None);
    let reader = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(3000));
        let mut b = [0u8; 1];
        untouched.read_exact(&mut b).expect("touch");
        untouched
    });
    let r = apply(m.path(), &pkg, &[]);
    println!("{}", r.out);
    assert_eq!(r.code, COMMITTED, "the update did not commit:\n{}", r.out);
    let waited = r.phase_ms("Preparation").unwrap_or(0);
    assert!(
        waited >= 500,
        "the preparation must wait for the open file to be touched ({waited} ms)"
    );
    drop(reader.join().expect("reader"));
    assert_eq!(component(&status(m.path()), "fsd").0, "0.1.0+touch");
    let n = usage(&probe);
    let f = File::open(&probe).expect("open");
    assert_eq!(usage(&probe), n, "0.1.0+touch does not count an open");
    let mut b = [0u8; 1];
    (&f).read_exact(&mut b).expect("read");
    assert_eq!(usage(&probe), n + 1, "0.1.0+touch counts the first read");
    drop(f);
    let report = load.finish();
    println!(
        "apply took {} ms, stall {} ms",
        r.took(),
        stall_within(&report, r.started_ms, r.ended_ms)
    );
    m.unmount();
    img.assert_clean();
}

/// A refused nature: the outcome says why, nothing is notified (same pids), and the
/// history records the refusal.
fn refused_nature(tag: &str, example: &str, failed_check: &str) {
    let img = TestImage::new(tag, "64M");
    let keys = Keyring::new(&format!("{tag}-keys"));
    let work = TempDir::new(&format!("{tag}-work"));
    let pkg = pack_example(&keys, work.path(), example, &[("bin/fsd", &bin("fsd"))]);
    let m = mount_live(&img, &keys, None);
    let load = Load::start(m.path(), 2, "read=40,write=40,meta=20");
    let before = status(m.path());
    let r = apply(m.path(), &pkg, &[]);
    println!("{}", r.out);
    assert_eq!(r.code, REFUSED, "{}", r.out);
    assert_eq!(r.outcome(), "Refused", "{}", r.out);
    assert!(
        r.failed_checks().iter().any(|c| c == failed_check),
        "the {failed_check} check must fail:\n{}",
        r.out
    );
    assert!(
        !r.reached("Notification"),
        "nothing may be notified:\n{}",
        r.out
    );
    let after = status(m.path());
    for c in ["fsd", "blockdev"] {
        assert_eq!(
            component(&after, c),
            component(&before, c),
            "{c} must not be touched"
        );
    }
    let installed = update_manager::runtime::dir_for(m.path()).join("bin");
    assert!(
        std::fs::read_dir(&installed)
            .map(|d| d.count() == 0)
            .unwrap_or(true),
        "nothing may be installed"
    );
    load.finish();
    let (outcome, message) = last_outcome(&after);
    assert!(
        outcome.contains("refused"),
        "history must record the refusal: {after}"
    );
    assert!(
        message.contains(failed_check),
        "history must name the failed check: {after}"
    );
    m.unmount();
    img.assert_clean();
}

#[test]
fn nature_hardware_refused() {
    refused_nature("live-n5", "05-hardware", "memory");
}

#[test]
fn nature_not_live_refused() {
    refused_nature("live-n6", "06-not-live", "live");
}

/// `scripts/build-examples.sh` packs every example, and each verifies under the key.
#[test]
fn examples_build_and_verify() {
    let keys = Keyring::new("live-ex-keys");
    let out = TempDir::new("live-ex");
    let o = build_examples(&[out.path(), &keys.key]);
    assert!(o.status.success(), "build-examples failed:\n{}", text(&o));
    let mut n = 0;
    for e in std::fs::read_dir(repo_root().join("examples/updates"))
        .expect("examples")
        .flatten()
    {
        if !e.path().is_dir() {
            continue;
        }
        n += 1;
        let pkg = out.path().join(e.file_name()).with_extension("lup");
        let o = updater(&[
            "inspect",
            pkg.to_str().expect("utf-8"),
            "--keyring",
            keys.keyring.to_str().expect("utf-8"),
        ]);
        println!("{}", text(&o));
        assert!(
            o.status.success(),
            "{} does not verify:\n{}",
            pkg.display(),
            text(&o)
        );
    }
    assert_eq!(n, 7, "seven example natures");
}

// ---- fio across live updates. ----

fn fio_job(dir: &Path, verify_only: bool) -> String {
    let mut s = format!(
        "[global]\ndirectory={}\nverify=crc32c\nrandrepeat=1\nend_fsync=1\n",
        dir.display()
    );
    s.push_str(if verify_only {
        "verify_only=1\nverify_state_load=1\n"
    } else {
        "do_verify=1\nverify_state_save=1\n"
    });
    for (name, rw, bs, engine, depth, direct, size) in [
        (
            "rand-direct-uring",
            "randwrite",
            "4k",
            "io_uring",
            16,
            1,
            96,
        ),
        ("seq-buffered-psync", "write", "64k", "psync", 1, 0, 256),
        (
            "rand-buffered-uring",
            "randwrite",
            "16k",
            "io_uring",
            8,
            0,
            64,
        ),
    ] {
        s.push_str(&format!(
            "\n[{name}]\nrw={rw}\nbs={bs}\nioengine={engine}\niodepth={depth}\ndirect={direct}\nsize={size}M\n"
        ));
    }
    s
}

fn fio(mnt: &Path, state: &Path, tag: &str, verify_only: bool) -> Output {
    let jobs = state.join(format!("{tag}.fio"));
    std::fs::write(&jobs, fio_job(mnt, verify_only)).expect("job file");
    run(
        Command::new("fio")
            .arg(format!("--aux-path={}", state.display()))
            .arg("--output-format=json")
            .arg(&jobs),
        Duration::from_secs(300),
    )
}

fn assert_fio_clean(o: &Output, tag: &str) {
    assert!(o.status.success(), "fio {tag} failed:\n{}", text(o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("fio {tag}: {e}\n{}", text(o)));
    for j in v["jobs"].as_array().expect("jobs") {
        assert_eq!(
            j["error"].as_i64(),
            Some(0),
            "fio {tag} job {}: {j}",
            j["jobname"]
        );
        println!(
            "fio {tag} {}: read {} KiB, written {} KiB",
            j["jobname"], j["read"]["io_kbytes"], j["write"]["io_kbytes"]
        );
    }
}

/// fio writes with `verify=crc32c` (and verifies what it wrote) while five fsd updates are
/// applied; then, after an unmount and a clean fsck, a verify-only pass reads everything
/// back through the daemon.
#[test]
fn fio_verify_across_five_live_updates() {
    let img = TestImage::new("live-fio", "1G");
    let keys = Keyring::new("live-fio-keys");
    let work = TempDir::new("live-fio-work");
    let state = TempDir::new("live-fio-state");
    let b = work.path().join("fsd-b");
    distinct_copy(&bin("fsd"), &b, "b");
    let pkgs: Vec<PathBuf> = (1..=5u64)
        .map(|i| {
            let src = if i % 2 == 1 { b.clone() } else { bin("fsd") };
            pack(
                &keys,
                &work.path().join(format!("u{i}")),
                &fsd_manifest(&format!("fio-{i}"), i, "0.1.0", "0.1.0", &[]),
                &[("bin/fsd", &src)],
            )
        })
        .collect();
    let m = mount_live(&img, &keys, None);
    let mnt = m.path().to_path_buf();
    let st = state.path().to_path_buf();
    let writer = std::thread::spawn(move || fio(&mnt, &st, "write", false));
    std::thread::sleep(Duration::from_secs(1));
    for (i, pkg) in pkgs.iter().enumerate() {
        let r = apply(m.path(), pkg, &[]);
        assert_eq!(
            r.code,
            COMMITTED,
            "update {} did not commit:\n{}",
            i + 1,
            r.out
        );
        println!("update {}: {} ms", i + 1, r.took());
        assert!(
            !writer.is_finished() || i + 1 == pkgs.len(),
            "fio finished before update {}: make the jobs larger",
            i + 1
        );
        std::thread::sleep(Duration::from_millis(700));
    }
    assert!(
        !writer.is_finished(),
        "fio finished before the fifth update: make the jobs larger"
    );
    let o = writer.join().expect("fio thread");
    assert_fio_clean(&o, "write");
    m.unmount();
    img.assert_clean();
    let m = mount_live(&img, &keys, None);
    let o = fio(m.path(), state.path(), "verify", true);
    assert_fio_clean(&o, "verify");
    m.unmount();
    img.assert_clean();
}
