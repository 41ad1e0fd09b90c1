//! Tests of the `molt-stress` engine and binary against a temporary directory.
//!
//! They prove the checker passes a clean run with sane counts, and that it fails when
//! it must: a corrupted block, a truncated file, a stalled or stuck operation, bad
//! arguments. No test depends on how fast the machine is.

#![forbid(unsafe_code)]

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use molt_tests::stress::{
    data_file_path, run, DelayHook, EngineKind, ErrorKind, Mix, OpKind, Pattern, Phase, StopReason,
    StressConfig, StressReport, SyncKind, SyncPolicy,
};

/// A fresh directory under the system temp dir, removed on drop (even on panic).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "molt-stress-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn small_config(dir: &Path) -> StressConfig {
    let mut c = StressConfig::new(dir);
    c.files = 3;
    c.file_size = 256 << 10;
    c.block_size = 4096;
    c
}

fn run_ok(cfg: StressConfig) -> StressReport {
    run(cfg, Arc::new(AtomicBool::new(false))).expect("run sets up")
}

fn count(r: &StressReport, k: OpKind) -> u64 {
    r.ops.get(&k).map_or(0, |s| s.count)
}

fn assert_clean(r: &StressReport) {
    assert!(
        r.errors.is_empty(),
        "unexpected errors:\n{}",
        r.render_text()
    );
    assert_eq!(r.errors_total, 0);
}

/// Completions in the timeline add up to the operations counted.
fn assert_timeline_matches(r: &StressReport) {
    let ops: u64 = r.ops.values().map(|s| s.count).sum();
    let timeline: u64 = r.timeline.counts.iter().map(|&c| u64::from(c)).sum();
    assert_eq!(ops, timeline);
    assert_eq!(r.timeline.bucket_ms, 10);
}

#[test]
fn mixed_data_and_metadata_run_is_clean_with_sane_counts() {
    let dir = TempDir::new("mixed");
    let mut c = small_config(dir.path());
    c.threads = 4;
    c.ops = Some(20_000);
    c.mix = Mix::parse("read=45,write=35,meta=20").unwrap();
    c.hold_open = Some(2);
    c.sync = Some(SyncPolicy {
        kind: SyncKind::Fdatasync,
        every: 64,
    });
    c.meta_files = 16;
    let r = run_ok(c);
    assert_clean(&r);
    assert_eq!(r.stop_reason, StopReason::Completed);
    assert_eq!(r.mix_ops(Phase::Main), 20_000, "every claimed op ran once");
    for k in OpKind::MIXABLE {
        assert!(count(&r, k) > 0, "no {k} ops:\n{}", r.render_text());
    }
    let (reads, writes) = (count(&r, OpKind::Read), count(&r, OpKind::Write));
    assert_eq!(r.bytes_read, reads * 4096);
    assert_eq!(r.bytes_written, writes * 4096);
    let v = r.verify;
    assert_eq!(v.blocks_verified + v.torn_reads + v.unverified, reads);
    assert_eq!(v.unverified, 0);
    assert!(count(&r, OpKind::Fsync) > 0);
    // File 2 is not held open: every I/O on it opens and closes it.
    assert!(count(&r, OpKind::Open) > 0);
    assert_eq!(count(&r, OpKind::Open), count(&r, OpKind::Close));
    assert_timeline_matches(&r);
    let lat = r.ops[&OpKind::Read].latency;
    assert!(lat.p50_us <= lat.p99_us && lat.p99_us <= lat.p999_us && lat.p999_us <= lat.max_us);
}

#[test]
fn io_uring_queue_depth_run_is_clean() {
    let dir = TempDir::new("uring");
    let mut c = small_config(dir.path());
    c.threads = 2;
    c.queue_depth = 8;
    c.engine = EngineKind::Uring;
    c.pattern = Pattern::Seq;
    c.prepare = true;
    c.ops = Some(5_000);
    c.hold_open = Some(1);
    let r = run_ok(c);
    assert_clean(&r);
    assert_eq!(r.phases.len(), 2);
    assert_eq!(
        r.mix_ops(Phase::Prepare),
        3 * 64,
        "prepare writes every block once"
    );
    assert_eq!(r.mix_ops(Phase::Main), 5_000);
    assert_timeline_matches(&r);
}

fn stress_bin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_molt-stress"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("molt-stress runs")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn verify_run_reports_exactly_the_corrupted_block() {
    let dir = TempDir::new("corrupt");
    let state = dir.path().join("state.bin");
    let json = dir.path().join("report.json");
    let layout = [
        "--files",
        "3",
        "--file-size",
        "256k",
        "--bs",
        "4k",
        "--quiet",
    ];
    let d = s(dir.path());
    let st = s(&state);

    let mut write = vec!["--dir", d, "--state", st, "--prepare", "--ops", "3000"];
    write.extend(["--threads", "2", "--mix", "read=30,write=70"]);
    write.extend(layout);
    let out = stress_bin(&write);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let mut verify = vec![
        "--dir",
        d,
        "--state",
        st,
        "--verify-existing",
        "--json",
        s(&json),
    ];
    verify.extend(["--threads", "2"]);
    verify.extend(layout);
    let out = stress_bin(&verify);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let clean: serde_json::Value = serde_json::from_slice(&fs::read(&json).unwrap()).unwrap();
    assert_eq!(clean["verify"]["blocks_verified"], 3 * 64);

    // Garbage in the middle of block 5 of file 1, behind the tool's back.
    let f = OpenOptions::new()
        .write(true)
        .open(data_file_path(dir.path(), 1))
        .unwrap();
    f.write_all_at(b"not what was written", 5 * 4096 + 100)
        .unwrap();
    drop(f);

    let out = stress_bin(&verify);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("RESULT: FAIL"), "{text}");
    let r: serde_json::Value = serde_json::from_slice(&fs::read(&json).unwrap()).unwrap();
    let errors = r["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(r["errors_total"], 1);
    let e = &errors[0];
    assert_eq!(e["kind"], "mismatch");
    assert_eq!(e["op"], "read");
    assert_eq!(e["file"], 1);
    assert_eq!(e["path"], "data/f000001");
    assert_eq!(e["offset"], 5 * 4096);
    assert!(e["time_ms"].as_f64().is_some() && e["unix_ms"].as_u64().is_some());
}

#[test]
fn truncated_file_is_reported_as_short_reads() {
    let dir = TempDir::new("trunc");
    let state = dir.path().join("state.bin");
    let mut c = small_config(dir.path());
    c.threads = 2;
    c.prepare = true;
    c.state = Some(state.clone());
    let r = run_ok(c.clone());
    assert_clean(&r);
    assert!(r.state_saved);

    // Cut file 2 to ten blocks and 100 bytes: block 10 reads short, the rest read 0.
    let f = OpenOptions::new()
        .write(true)
        .open(data_file_path(dir.path(), 2))
        .unwrap();
    f.set_len(10 * 4096 + 100).unwrap();
    drop(f);

    let mut v = c;
    v.prepare = false;
    v.verify_existing = true;
    let r = run_ok(v);
    assert!(!r.passed());
    assert_eq!(r.errors.len(), 64 - 10, "{}", r.render_text());
    assert!(r
        .errors
        .iter()
        .all(|e| e.kind == ErrorKind::ShortRead && e.file == Some(2)));
    let first = r.errors.iter().min_by_key(|e| e.offset).unwrap();
    assert_eq!(first.offset, Some(10 * 4096));
    assert!(first.detail.contains("100 of 4096"), "{}", first.detail);
    assert_eq!(r.verify.blocks_verified, 3 * 64 - 54);
}

#[test]
fn stall_detector_reports_an_injected_delay() {
    let dir = TempDir::new("stall");
    let delay = Duration::from_millis(300);
    let mut c = small_config(dir.path());
    c.ops = Some(300);
    c.delay_hook = Some(DelayHook(Arc::new(move |op| {
        (op.op.is_data() && op.index == 150).then_some(delay)
    })));
    let r = run_ok(c);
    assert_clean(&r);
    // One thread: nothing can complete while its only operation is delayed.
    let stall = r.longest_stall;
    assert!(stall.duration >= delay, "{stall:?}");
    assert!(stall.start + stall.duration <= r.duration);
    let max_us = r.ops.values().map(|s| s.latency.max_us).fold(0.0, f64::max);
    assert!(max_us >= delay.as_secs_f64() * 1e6);
    // The timeline shows the hole: a 300 ms gap covers at least 29 whole 10 ms buckets.
    let longest_zero_run = r
        .timeline
        .counts
        .split(|&c| c != 0)
        .map(<[u32]>::len)
        .max()
        .unwrap_or(0);
    assert!(longest_zero_run >= 29, "{longest_zero_run}");
}

#[test]
fn watchdog_reports_a_stuck_operation_and_the_run_returns() {
    let dir = TempDir::new("stuck");
    let release = Arc::new(AtomicBool::new(false));
    let hook_release = Arc::clone(&release);
    let mut c = small_config(dir.path());
    c.threads = 2;
    // Far above any real operation on a temp dir, so only the injected one trips it.
    c.op_timeout = Duration::from_secs(1);
    // No time or op limit: only the watchdog ends this run.
    c.delay_hook = Some(DelayHook(Arc::new(move |op| {
        if op.thread == 0 && op.op.is_data() && op.index == 50 {
            while !hook_release.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        None
    })));
    let r = run_ok(c);
    release.store(true, Ordering::Relaxed);
    assert_eq!(r.stop_reason, StopReason::Watchdog);
    assert_eq!(r.stuck_threads, 1);
    assert!(!r.state_saved);
    let timeouts: Vec<_> = r
        .errors
        .iter()
        .filter(|e| e.kind == ErrorKind::Timeout)
        .collect();
    let e = timeouts
        .iter()
        .find(|e| e.thread == 0)
        .unwrap_or_else(|| panic!("no timeout on thread 0:\n{}", r.render_text()));
    assert!(
        e.op.is_data() && e.file.is_some() && e.offset.is_some(),
        "{e:?}"
    );
    // The stall runs on to the end of the run while an operation is stuck.
    assert!(
        r.longest_stall.start + r.longest_stall.duration
            >= e.time.saturating_sub(Duration::from_millis(1))
    );
}

#[test]
fn usage_and_setup_errors_exit_2() {
    let dir = TempDir::new("usage");
    let d = s(dir.path());
    for args in [
        vec!["--dir", d, "--bs", "100", "--direct"],
        vec!["--dir", d, "--mix", "read=0"],
        vec!["--dir", d, "--verify-existing"],
        vec!["--dir", d, "--qd", "4", "--engine", "sync"],
        vec!["--dir", d, "--frobnicate"],
    ] {
        let out = stress_bin(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let missing = dir.path().join("not-there");
    let out = stress_bin(&["--dir", s(&missing), "--ops", "10"]);
    assert_eq!(out.status.code(), Some(2));
    // A state file written for another layout is refused, not misread.
    let state = dir.path().join("state.bin");
    let base = ["--dir", d, "--state", s(&state), "--ops", "10", "--quiet"];
    assert_eq!(
        stress_bin(&[&base[..], &["--files", "2"]].concat())
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        stress_bin(&[&base[..], &["--files", "3"]].concat())
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn sigterm_stops_the_run_cleanly_with_results() {
    let dir = TempDir::new("signal");
    let child = Command::new(env!("CARGO_BIN_EXE_molt-stress"))
        .args([
            "--dir",
            s(dir.path()),
            "--time",
            "10m",
            "--quiet",
            "--files",
            "2",
        ])
        .args([
            "--file-size",
            "256k",
            "--threads",
            "2",
            "--mix",
            "read=40,write=40,meta=20",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn molt-stress");
    // Wait until the workload runs: metadata creates have happened.
    let deadline = Instant::now() + Duration::from_secs(60);
    let meta = dir.path().join("meta/t0");
    let running = || fs::read_dir(&meta).is_ok_and(|mut d| d.next().is_some());
    while !running() {
        assert!(Instant::now() < deadline, "molt-stress never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = child.id() as libc::pid_t;
    // The pid of a child this test spawned and has not waited for, so the pid cannot have
    // been reused.
    let rc = molt_sys::kill(pid, libc::SIGTERM).map_or(-1, |()| 0);
    assert_eq!(rc, 0);
    let out = child.wait_with_output().expect("molt-stress exits");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("stopped: Stopped"), "{text}");
    assert!(text.contains("RESULT: PASS"), "{text}");
}
