//! `molt-bench --quick` end to end: every peer mounts, every job runs, everything is
//! taken down again, and the table has every row and every peer. Tiny sizes, one run; no
//! timing is asserted (benchmarks are programs that print numbers, not timed tests).

use std::process::Command;
use std::time::Duration;

use molt_tests::bench::{missing_tools, Peer, Row};
use molt_tests::harness::{bin, run, TempDir};

#[test]
fn quick_benchmark_covers_every_row_and_peer() {
    let missing = missing_tools(&Peer::ALL);
    if !missing.is_empty() {
        eprintln!(
            "SKIPPED: molt-bench needs {} (scripts/setup.sh installs them)",
            missing.join(", ")
        );
        return;
    }
    let work = TempDir::new("bench");
    let json = work.path().join("bench.json");
    let out = run(
        Command::new(env!("CARGO_BIN_EXE_molt-bench"))
            .arg("--quick")
            .arg("--dir")
            .arg(work.path())
            .arg("--scratch")
            .arg(work.path())
            .arg("--json")
            .arg(&json)
            .env("MOLT_FSD_BIN", bin("fsd"))
            .env("MOLT_BLOCKDEV_BIN", bin("blockdev")),
        Duration::from_secs(400),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "molt-bench --quick failed ({}):\n{stdout}\n{stderr}",
        out.status
    );

    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('|')).collect();
    let header = lines.first().expect("a table");
    for p in Peer::ALL {
        assert!(header.contains(&format!(" {} |", p.label())), "{header}");
        if !p.is_molt() {
            for m in Peer::ALL.into_iter().filter(|m| m.is_molt()) {
                assert!(
                    header.contains(&format!(" {} / {} |", m.label(), p.label())),
                    "{header}"
                );
            }
        }
    }
    let columns = header.matches('|').count();
    for row in Row::ALL {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("| {} |", row.label())))
            .unwrap_or_else(|| panic!("no row {:?} in\n{stdout}", row.label()));
        assert_eq!(line.matches('|').count(), columns, "{line}");
        assert!(!line.contains("failed"), "{line}\n{stderr}");
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // Cells 3.. are the peers in Peer::ALL order, then the ratios.
        for (i, p) in Peer::ALL.into_iter().enumerate() {
            let cell = cells[3 + i];
            if row.applies_to(p) {
                assert!(
                    cell.trim_end_matches('k')
                        .parse::<f64>()
                        .is_ok_and(|x| x > 0.0),
                    "{} on {}: {cell:?}",
                    row.key(),
                    p.key()
                );
            } else {
                assert_eq!(cell, "—", "{} on {}", row.key(), p.key());
            }
        }
    }

    // The JSON report has one cell with one figure per applicable row and peer.
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON report"))
            .expect("JSON report parses");
    let cells = v["cells"].as_array().expect("cells");
    let expected = Row::ALL
        .iter()
        .flat_map(|r| Peer::ALL.map(|p| r.applies_to(p)))
        .filter(|&a| a)
        .count();
    assert_eq!(cells.len(), expected);
    for c in cells {
        assert_eq!(c["values"].as_array().map(Vec::len), Some(1), "{c}");
    }

    // Nothing is left mounted or attached below the work directory.
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mount table");
    let dir = work.path().to_string_lossy().into_owned();
    assert!(!mounts.contains(&dir), "left mounted:\n{mounts}");
    let loops = Command::new("losetup").arg("-a").output().expect("losetup");
    assert!(
        !String::from_utf8_lossy(&loops.stdout).contains(&dir),
        "loop device left attached"
    );
}
