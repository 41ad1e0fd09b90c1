//! POSIX conformance with pjdfstest (the Rust edition, installed by `scripts/setup.sh`).
//!
//! Baseline: on kernel ext4 (a loop-mounted image) with the same configuration every test
//! passes except the ones skipped for lack of a remount or a second filesystem. A test that
//! fails on Molt must be listed in `EXCEPTIONS` with its reason, mirrored in
//! `docs/pjdfstest.md`; the list is kept as short as the causes allow.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use molt_tests::harness::{run, TestImage, Watchdog};

/// Tests that may fail on Molt but pass on ext4, with the reason. Each may also pass: whether
/// it fails can depend on whether the kernel's attribute cache expired mid-test.
const EXCEPTIONS: &[(&str, &str)] = &[];

/// Why a test may be skipped, as pjdfstest words it. Any other skip is a lost test.
const ALLOWED_SKIPS: &[(&str, &str)] = &[
    (
        "allow_remount",
        "the EROFS tests need to remount the filesystem read-only",
    ),
    (
        "secondary file-system",
        "the EXDEV tests need a second filesystem",
    ),
    (
        "LINK_MAX",
        "glibc's pathconf answers 127 (unknown) for any FUSE filesystem",
    ),
];

/// pjdfstest takes about ten seconds on a debug build; the deadline is far beyond that but
/// inside the mount's own watchdog, so an overrun fails here with a clear message.
const DEADLINE: Duration = Duration::from_secs(200);

fn config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("pjdfstest.toml")
}

/// The pjdfstest binary: `$PJDFSTEST`, else `PATH`, else cargo's install directory.
fn pjdfstest_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PJDFSTEST") {
        return PathBuf::from(p);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(c) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(c).join("bin"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("pjdfstest"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("pjdfstest is not installed; run scripts/setup.sh as root"))
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Outcome {
    Passed,
    Failed,
    Skipped,
}

/// One test's result and the indented lines pjdfstest printed under it.
#[derive(Debug)]
struct TestResult {
    outcome: Outcome,
    detail: String,
}

/// The counts of pjdfstest's closing "Summary:" line.
#[derive(Debug, Default, PartialEq, Eq)]
struct Summary {
    failed: usize,
    skipped: usize,
    passed: usize,
    total: usize,
}

/// Parses pjdfstest's report: one `name   ok|FAILED|skipped` line per test, followed by
/// tab-indented detail, then `Summary: N failed, N skipped, N passed, ..., N total`.
fn parse_report(out: &str) -> (BTreeMap<String, TestResult>, Option<Summary>) {
    let mut results: BTreeMap<String, TestResult> = BTreeMap::new();
    let mut last: Option<String> = None;
    let mut summary = None;
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("Summary:") {
            let mut s = Summary::default();
            for part in rest.split(',') {
                let mut w = part.split_whitespace();
                let (Some(n), Some(what)) = (w.next(), w.next()) else {
                    continue;
                };
                let Ok(n) = n.parse::<usize>() else { continue };
                match what {
                    "failed" => s.failed = n,
                    "skipped" => s.skipped = n,
                    "passed" => s.passed = n,
                    "total" => s.total = n,
                    _ => {}
                }
            }
            summary = Some(s);
            last = None;
            continue;
        }
        if line.starts_with(char::is_whitespace) {
            if let Some(r) = last.as_ref().and_then(|n| results.get_mut(n)) {
                r.detail.push_str(line.trim());
                r.detail.push('\n');
            }
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(name), Some(status), None) = (words.next(), words.next(), words.next()) else {
            last = None;
            continue;
        };
        let outcome = match status {
            "ok" => Outcome::Passed,
            "FAILED" => Outcome::Failed,
            "skipped" => Outcome::Skipped,
            _ => {
                last = None;
                continue;
            }
        };
        if !name.contains("::") {
            last = None;
            continue;
        }
        results.insert(
            name.to_string(),
            TestResult {
                outcome,
                detail: String::new(),
            },
        );
        last = Some(name.to_string());
    }
    (results, summary)
}

fn names(results: &BTreeMap<String, TestResult>, o: Outcome) -> Vec<&str> {
    results
        .iter()
        .filter(|(_, r)| r.outcome == o)
        .map(|(n, _)| n.as_str())
        .collect()
}

#[test]
fn pjdfstest_matches_ext4() {
    let bin = pjdfstest_bin();
    let img = TestImage::new("pjdfstest", "512M");
    let m = img.mount();
    // A second watchdog, shorter than the mount's: a request the stack never answers
    // aborts the connection, so pjdfstest fails instead of hanging.
    let watchdog = Watchdog::start(m.path(), DEADLINE + Duration::from_secs(20));
    let dir = m.path().join("pjdfstest");
    std::fs::create_dir(&dir).expect("pjdfstest directory");
    let out = run(
        Command::new(&bin)
            .arg("-c")
            .arg(config())
            .arg("-p")
            .arg(&dir)
            .current_dir(&dir)
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "0"),
        DEADLINE,
    );
    watchdog.stop();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (results, summary) = parse_report(&stdout);
    let summary = summary.unwrap_or_else(|| {
        panic!(
            "pjdfstest printed no summary ({}):\n{stdout}\n{stderr}",
            out.status
        )
    });

    let failed = names(&results, Outcome::Failed);
    let skipped = names(&results, Outcome::Skipped);
    let passed = names(&results, Outcome::Passed);
    println!(
        "pjdfstest on Molt: {} passed, {} failed, {} skipped of {} (ext4: 0 failed)",
        summary.passed, summary.failed, summary.skipped, summary.total
    );
    for name in &failed {
        println!("failed: {name}\n{}", results[*name].detail);
    }
    for name in &skipped {
        println!("skipped: {name}: {}", results[*name].detail.trim());
    }

    // The report and its summary agree, so no result was lost to parsing.
    assert_eq!(
        (failed.len(), skipped.len(), passed.len(), results.len()),
        (
            summary.failed,
            summary.skipped,
            summary.passed,
            summary.total
        ),
        "parsed results disagree with pjdfstest's summary:\n{stdout}"
    );
    // A broken configuration or a crash must not pass as an empty run.
    assert!(
        summary.passed >= 300,
        "only {} tests passed:\n{stdout}\n{stderr}",
        summary.passed
    );
    assert_eq!(
        out.status.success(),
        failed.is_empty(),
        "pjdfstest's exit status ({}) disagrees with its report:\n{stderr}",
        out.status
    );

    let unexpected: Vec<&str> = failed
        .iter()
        .copied()
        .filter(|n| !EXCEPTIONS.iter().any(|(e, _)| e == n))
        .collect();
    assert!(
        unexpected.is_empty(),
        "tests that pass on ext4 fail on Molt: {unexpected:?}\n{stdout}"
    );
    let lost: Vec<&str> = skipped
        .iter()
        .copied()
        .filter(|n| {
            !ALLOWED_SKIPS
                .iter()
                .any(|(why, _)| results[*n].detail.contains(why))
        })
        .collect();
    assert!(
        lost.is_empty(),
        "tests skipped for an unexpected reason: {lost:?}\n{stdout}"
    );
    for (name, _) in EXCEPTIONS {
        if results.get(*name).map(|r| r.outcome) == Some(Outcome::Passed) {
            println!("note: exception {name} passed this time");
        }
    }

    std::fs::remove_dir_all(&dir).expect("cleaning up after pjdfstest");
    m.unmount();
    img.assert_clean();
}

#[test]
fn pjdfstest_report_parses() {
    let report = "\
chmod::foo::regular                                                  ok
rename::bar                                                      FAILED
\tassertion `left == right` failed
  left: 1
link::exdev_target                                               skipped
\tNo secondary file-system has been configured.
Error: not a result line

Summary: 1 failed, 1 skipped, 1 passed, 0 expected failures, 3 total
";
    let (r, s) = parse_report(report);
    assert_eq!(
        s,
        Some(Summary {
            failed: 1,
            skipped: 1,
            passed: 1,
            total: 3
        })
    );
    assert_eq!(r.len(), 3);
    assert_eq!(r["rename::bar"].outcome, Outcome::Failed);
    assert!(r["rename::bar"].detail.contains("left: 1"));
    assert!(r["link::exdev_target"]
        .detail
        .contains("secondary file-system"));
    assert_eq!(r["chmod::foo::regular"].outcome, Outcome::Passed);
}
