//! `blockdev-bench`: block layer throughput, three paths side by side on one raw image:
//! the ring + driver process, the in-process io_uring engine, and fio's io_uring engine.
//! Prints a markdown table of medians over several repetitions.

#![forbid(unsafe_code)]

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blockdev::buffer::AlignedBuf;
use blockdev::engine::{Engine, EngineKind, IoBuf, IoOp, IoRequest};
use blockdev::image::Image;
use blockdev::nbd::{NbdConnection, NbdUri};
use blockdev::ring::RingGeometry;
use blockdev::{spawn_driver, DriverConfig, Lba, BLOCK_SIZE};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "blockdev-bench",
    about = "Block layer benchmark: ring vs in-process io_uring vs fio"
)]
struct Args {
    /// Raw image to test on; created and fully written first if missing or of another size.
    #[arg(long, default_value = "blockdev-bench.img")]
    image: PathBuf,
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Repetitions; the table shows medians.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 4)]
    runtime: u64,
    /// Queue depth of the 1 MiB sequential tests.
    #[arg(long, default_value_t = 8)]
    seq_qd: usize,
    /// Skip the fio column.
    #[arg(long)]
    no_fio: bool,
    /// Driver's longest spin before sleeping, in microseconds.
    #[arg(long, default_value_t = 50)]
    driver_spin_us: u64,
    /// Driver's spin policy: `adaptive` or `fixed`.
    #[arg(long, default_value = "adaptive")]
    driver_spin: blockdev::spin::SpinMode,
    /// Client's bounded spin before sleeping, in microseconds.
    #[arg(long, default_value_t = 0)]
    client_spin_us: u64,
    /// Driver engine for the ring path.
    #[arg(long, default_value = "uring")]
    engine: EngineKind,
    /// Measure an NBD export instead (it should serve `--image`, which is prepared
    /// first): the ring path's driver and the in-process engine use the NBD engine, the
    /// fio column fio's own nbd engine. The server must take three clients at once.
    #[arg(long)]
    nbd: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

#[derive(Clone, Copy)]
struct Test {
    name: &'static str,
    kind: Kind,
    blocks: usize,
    qd: usize,
}

impl Test {
    fn is_write(&self) -> bool {
        matches!(self.kind, Kind::RandWrite | Kind::SeqWrite)
    }
    fn bandwidth(&self) -> bool {
        matches!(self.kind, Kind::SeqRead | Kind::SeqWrite)
    }
}

/// Offsets: uniform random blocks, or sequential wrapping at the end.
struct Offsets {
    kind: Kind,
    state: u64,
    next: u64,
    max: u64,
    step: u64,
}

impl Offsets {
    fn new(t: &Test, num_blocks: u64, seed: u64) -> Offsets {
        let step = t.blocks as u64;
        Offsets {
            kind: t.kind,
            state: seed | 1,
            next: 0,
            max: num_blocks / step,
            step,
        }
    }
    fn next(&mut self) -> Lba {
        let i = match self.kind {
            Kind::RandRead | Kind::RandWrite => {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                self.state % self.max
            }
            _ => {
                let i = self.next;
                self.next = (self.next + 1) % self.max;
                i
            }
        };
        Lba(i * self.step)
    }
}

fn prepare_image(path: &Path, bytes: u64) -> Result<()> {
    if std::fs::metadata(path)
        .map(|m| m.len() == bytes)
        .unwrap_or(false)
    {
        return Ok(());
    }
    molt_sys::errln!("writing {} MiB image {} ...", bytes >> 20, path.display());
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let mut buf = AlignedBuf::zeroed(256);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for b in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes());
    }
    let mut w = &f;
    for _ in 0..bytes / buf.len() as u64 {
        w.write_all(&buf)?;
    }
    f.sync_all()?;
    Ok(())
}

fn ring_run(client: &blockdev::Client, t: &Test, runtime: Duration, seed: u64) -> Result<f64> {
    let mut offs = Offsets::new(t, client.num_blocks(), seed);
    let per_batch = if t.qd == 1 { 1 } else { t.qd * 8 };
    let mut bufs: Vec<Vec<u8>> = (0..per_batch)
        .map(|_| vec![0x5Au8; t.blocks * BLOCK_SIZE])
        .collect();
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < runtime {
        if t.qd == 1 {
            let lba = offs.next();
            if t.is_write() {
                client.write(lba, &bufs[0])?;
            } else {
                client.read(lba, &mut bufs[0])?;
            }
        } else {
            let mut b = client.batch();
            b.depth(t.qd);
            for buf in bufs.iter_mut() {
                let lba = offs.next();
                if t.is_write() {
                    b.write(lba, buf);
                } else {
                    b.read(lba, buf);
                }
            }
            b.run_all()?;
        }
        ops += per_batch as u64;
    }
    Ok(ops as f64 / start.elapsed().as_secs_f64())
}

fn engine_run(engine: &mut Engine, t: &Test, runtime: Duration, seed: u64) -> Result<f64> {
    let mut offs = Offsets::new(t, engine.num_blocks(), seed);
    let mut free: Vec<AlignedBuf> = (0..t.qd).map(|_| AlignedBuf::zeroed(t.blocks)).collect();
    let mut out = Vec::new();
    let start = Instant::now();
    let mut ops = 0u64;
    let mut deadline_passed = false;
    loop {
        if !deadline_passed {
            while let Some(buf) = free.pop() {
                let lba = offs.next();
                let buf = IoBuf::Owned(buf);
                let op = if t.is_write() {
                    IoOp::Write { lba, buf }
                } else {
                    IoOp::Read { lba, buf }
                };
                if engine.push(IoRequest { user_data: 0, op }).is_err() {
                    bail!("engine full");
                }
            }
            engine.submit()?;
        }
        engine.wait(None, Duration::from_secs(1))?;
        engine.reap(&mut out);
        for c in out.drain(..) {
            if let Err(e) = c.result {
                bail!("I/O failed: {e}");
            }
            ops += 1;
            free.extend(c.buf);
        }
        deadline_passed = start.elapsed() >= runtime;
        if deadline_passed && engine.in_flight() == 0 {
            break;
        }
    }
    Ok(ops as f64 / start.elapsed().as_secs_f64())
}

fn fio_run(path: &Path, nbd: Option<&str>, t: &Test, runtime: u64) -> Result<f64> {
    let rw = match t.kind {
        Kind::RandRead => "randread",
        Kind::RandWrite => "randwrite",
        Kind::SeqRead => "read",
        Kind::SeqWrite => "write",
    };
    let mut cmd = Command::new("fio");
    cmd.args(["--name=bench", "--time_based", "--norandommap"]);
    match nbd {
        Some(uri) => cmd.args(["--ioengine=nbd", &format!("--uri={uri}")]),
        None => cmd
            .args(["--ioengine=io_uring", "--direct=1"])
            .arg(format!("--filename={}", path.display())),
    };
    let out = cmd
        .args(["--randrepeat=0", "--output-format=json", "--numjobs=1"])
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", t.blocks * BLOCK_SIZE))
        .arg(format!("--iodepth={}", t.qd))
        .arg(format!("--runtime={runtime}"))
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notices before the JSON document.
    let json: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap_or(0)..])?;
    let dir = if t.is_write() { "write" } else { "read" };
    json["jobs"][0][dir]["iops"]
        .as_f64()
        .context("no iops in fio output")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    let bytes = a.size_mib << 20;
    prepare_image(&a.image, bytes)?;
    let runtime = Duration::from_secs(a.runtime);
    let tests = [
        Test {
            name: "4 KiB random read, QD1",
            kind: Kind::RandRead,
            blocks: 1,
            qd: 1,
        },
        Test {
            name: "4 KiB random read, QD32",
            kind: Kind::RandRead,
            blocks: 1,
            qd: 32,
        },
        Test {
            name: "4 KiB random write, QD1",
            kind: Kind::RandWrite,
            blocks: 1,
            qd: 1,
        },
        Test {
            name: "4 KiB random write, QD32",
            kind: Kind::RandWrite,
            blocks: 1,
            qd: 32,
        },
        Test {
            name: "1 MiB sequential read",
            kind: Kind::SeqRead,
            blocks: 256,
            qd: a.seq_qd,
        },
        Test {
            name: "1 MiB sequential write",
            kind: Kind::SeqWrite,
            blocks: 256,
            qd: a.seq_qd,
        },
    ];
    // results[test][path] = samples (ops/s)
    let mut results = vec![vec![Vec::new(); 3]; tests.len()];
    for rep in 0..a.reps {
        let geometry = RingGeometry {
            queue_depth: 32,
            slot_size: 1 << 20,
        };
        let target = a.nbd.as_ref().map_or(a.image.clone(), PathBuf::from);
        let (client, mut child) = spawn_driver(
            &target,
            DriverConfig {
                engine: a.engine,
                geometry,
                driver_spin: Duration::from_micros(a.driver_spin_us),
                driver_spin_mode: a.driver_spin,
                client: blockdev::ClientConfig {
                    spin: Duration::from_micros(a.client_spin_us),
                    ..blockdev::ClientConfig::default()
                },
                ..DriverConfig::default()
            },
        )?;
        let mut engine = match &a.nbd {
            Some(uri) => {
                let conn = NbdConnection::connect(&NbdUri::parse(uri)?)?;
                Engine::nbd(conn, 32, blockdev::engine::DEFAULT_RECONNECT_BOUND)?
            }
            None => Engine::new(EngineKind::Uring, Image::open(&a.image)?, 32)?,
        };
        for (i, t) in tests.iter().enumerate() {
            let seed = 0x1234_5678 + (rep * 100 + i) as u64;
            let r = ring_run(&client, t, runtime, seed)?;
            let e = engine_run(&mut engine, t, runtime, seed)?;
            let f = if a.no_fio {
                f64::NAN
            } else {
                fio_run(&a.image, a.nbd.as_deref(), t, a.runtime)?
            };
            molt_sys::errln!(
                "rep {rep} {:<26} ring {r:>9.0}  engine {e:>9.0}  fio {f:>9.0} ops/s",
                t.name
            );
            results[i][0].push(r);
            results[i][1].push(e);
            results[i][2].push(f);
        }
        let counters = client.counters();
        molt_sys::errln!("rep {rep} driver counters: {counters:?}");
        drop(client);
        child.kill()?;
        child.wait()?;
    }
    let (engine_col, fio_col) = if a.nbd.is_some() {
        ("in-process NBD engine", "fio nbd")
    } else {
        ("in-process io_uring", "fio io_uring")
    };
    println!("| test | ring + driver process | {engine_col} | {fio_col} | ring / fio |");
    println!("|---|---:|---:|---:|---:|");
    for (i, t) in tests.iter().enumerate() {
        let [r, e, f] = [0, 1, 2].map(|p| median(&mut results[i][p]));
        let fmt = |v: f64| {
            if v.is_nan() {
                "–".to_string()
            } else if t.bandwidth() {
                format!(
                    "{:.0} MiB/s",
                    v * (t.blocks * BLOCK_SIZE) as f64 / (1 << 20) as f64
                )
            } else {
                format!("{:.1}k IOPS", v / 1000.0)
            }
        };
        let ratio = if f.is_nan() {
            "–".into()
        } else {
            format!("{:.2}", r / f)
        };
        let name = if t.bandwidth() {
            format!("{}, QD{}", t.name, t.qd)
        } else {
            t.name.to_string()
        };
        println!(
            "| {name} | {} | {} | {} | {ratio} |",
            fmt(r),
            fmt(e),
            fmt(f)
        );
    }
    Ok(())
}
