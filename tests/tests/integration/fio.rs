//! Data integrity under real fio workloads: fio writes with `verify=crc32c` and saves its
//! verify state outside the mount; the image is unmounted and checked, then remounted, and
//! fio replays the same jobs with `verify_only=1`, so every verify read reaches the daemon
//! instead of the page cache.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use molt_tests::harness::{run, TempDir, TestImage};

/// One fio job; the write and verify passes use the same definitions.
struct Job {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    ioengine: &'static str,
    iodepth: u32,
    direct: bool,
    size_mib: u64,
}

/// Random and sequential writes, through io_uring and through plain syscalls, with and
/// without O_DIRECT. Sized to take a few seconds each on a debug build.
const JOBS: &[Job] = &[
    Job {
        name: "rand-direct-uring",
        rw: "randwrite",
        bs: "4k",
        ioengine: "io_uring",
        iodepth: 16,
        direct: true,
        size_mib: 16,
    },
    Job {
        name: "seq-buffered-uring",
        rw: "write",
        bs: "128k",
        ioengine: "io_uring",
        iodepth: 8,
        direct: false,
        size_mib: 128,
    },
    Job {
        name: "rand-buffered-psync",
        rw: "randwrite",
        bs: "16k",
        ioengine: "psync",
        iodepth: 1,
        direct: false,
        size_mib: 32,
    },
    Job {
        name: "seq-direct-psync",
        rw: "write",
        bs: "64k",
        ioengine: "psync",
        iodepth: 1,
        direct: true,
        size_mib: 32,
    },
];

/// Each fio pass gets this long; the mount's watchdog (240 s) covers one pass and its mount.
const PASS_DEADLINE: Duration = Duration::from_secs(180);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pass {
    Write,
    Verify,
}

/// The fio binary on `PATH`.
fn fio_bin() -> std::path::PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("fio"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("fio is not installed; run scripts/setup.sh as root"))
}

fn job_file(dir: &Path, pass: Pass) -> String {
    let mut s = format!(
        "[global]\n\
         directory={}\n\
         verify=crc32c\n\
         randrepeat=1\n\
         end_fsync=1\n",
        dir.display()
    );
    s.push_str(match pass {
        Pass::Write => "do_verify=0\nverify_state_save=1\n",
        // Loading the saved state fails the job if the write pass did not save it.
        Pass::Verify => "verify_only=1\nverify_state_load=1\n",
    });
    for j in JOBS {
        s.push_str(&format!(
            "\n[{}]\nrw={}\nbs={}\nioengine={}\niodepth={}\ndirect={}\nsize={}M\n",
            j.name,
            j.rw,
            j.bs,
            j.ioengine,
            j.iodepth,
            u8::from(j.direct),
            j.size_mib
        ));
    }
    s
}

/// Runs one pass and returns fio's JSON report, asserting fio succeeded and every job
/// reported no error.
fn fio_pass(mnt: &Path, state: &Path, pass: Pass) -> serde_json::Value {
    let tag = match pass {
        Pass::Write => "write",
        Pass::Verify => "verify",
    };
    let jobs = state.join(format!("{tag}.fio"));
    let report = state.join(format!("{tag}.json"));
    std::fs::write(&jobs, job_file(mnt, pass)).expect("job file");
    let out = run(
        Command::new(fio_bin())
            .arg(format!("--aux-path={}", state.display()))
            .arg("--output-format=json")
            .arg(format!("--output={}", report.display()))
            .arg(&jobs),
        PASS_DEADLINE,
    );
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio {tag} pass failed ({}):\n{stdout}\n{stderr}\n{text}",
        out.status
    );
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("fio {tag} report is not JSON ({e}):\n{text}\n{stderr}"));
    let reported = v["jobs"].as_array().expect("fio report lists jobs");
    assert_eq!(reported.len(), JOBS.len(), "fio {tag} report: {text}");
    for (j, r) in JOBS.iter().zip(reported) {
        assert_eq!(
            r["jobname"].as_str(),
            Some(j.name),
            "fio {tag} report: {text}"
        );
        assert_eq!(
            r["error"].as_i64(),
            Some(0),
            "fio {tag} job {}: {r}",
            j.name
        );
        let bytes = j.size_mib << 20;
        // The write pass wrote every block; the verify pass read and checked every block.
        let dir = if pass == Pass::Write { "write" } else { "read" };
        assert_eq!(
            r[dir]["io_bytes"].as_u64(),
            Some(bytes),
            "fio {tag} job {} moved the wrong amount: {r}",
            j.name
        );
        println!(
            "fio {tag} {}: {} MiB, {} KiB/s",
            j.name, j.size_mib, r[dir]["bw"]
        );
    }
    v
}

#[test]
fn fio_verify_survives_remount() {
    let img = TestImage::new("fio", "1G");
    let state = TempDir::new("fio-state");

    let m = img.mount();
    fio_pass(m.path(), state.path(), Pass::Write);
    m.unmount();
    img.assert_clean();

    let m = img.mount();
    fio_pass(m.path(), state.path(), Pass::Verify);
    m.unmount();
    img.assert_clean();
}
