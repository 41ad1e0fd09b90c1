//! `updater`: build, inspect and apply Molt live update packages. A thin shell over the
//! `updater` library; exit codes are in `updater::exit` and `docs/live-update.md`.
#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use updater::control::{self, ControlClient};
use updater::exit;
use updater::keyring::{self, fingerprint, Keyring, TrustedKey};
use updater::package::{self, Limits, Package, PackageError};
use updater::protocol::{Event, Outcome, Phase, PhaseState, ProtocolError, Request, StatusReport};

const EXIT_CODES: &str = "\
Exit codes:
  0   committed, check passed, update started (--no-wait), or command done
  2   refused: a check failed, the package is bad or untrusted, or not live-updatable
  3   aborted: the deadline passed or `updater abort` stopped it (old version runs)
  4   rolled back after a failure (old version runs, with its state)
  5   other failure, or cannot reach the supervisor
  64  bad command line";

#[derive(Parser)]
#[command(
    name = "updater",
    version,
    about = "Build, inspect and apply Molt live update packages",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a signing key: KEY (hex seed, mode 0600) and KEY.pub (for the keyring).
    Keygen {
        #[arg(long, value_name = "KEY")]
        out: PathBuf,
    },
    /// Sign a manifest and the files it lists into a package. File paths are relative to
    /// the manifest; their sha256 and size are filled in.
    Pack {
        #[arg(long, value_name = "FILE")]
        manifest: PathBuf,
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        #[arg(long, value_name = "PKG")]
        out: PathBuf,
    },
    /// Show a package's manifest, files and signer, and whether it verifies.
    Inspect {
        package: PathBuf,
        /// Also check that the signer is in this keyring directory.
        #[arg(long, value_name = "DIR")]
        keyring: Option<PathBuf>,
    },
    /// Ask the mount's supervisor to run every check for PKG, changing nothing.
    Check {
        package: PathBuf,
        #[command(flatten)]
        target: Target,
        /// Print every event as one JSON object per line (the protocol's `Event`) instead
        /// of text; the exit code is the same.
        #[arg(long)]
        json: bool,
    },
    /// Apply PKG to the running mount.
    Apply {
        package: PathBuf,
        #[command(flatten)]
        target: Target,
        /// Deadline for reaching the required state (e.g. 500ms, 5s, 1m); overrides the
        /// manifest's.
        #[arg(long, value_parser = parse_duration)]
        deadline: Option<Duration>,
        /// Return once the checks pass; follow with `updater status`.
        #[arg(long)]
        no_wait: bool,
        /// Print every event (checks, phases, progress, the outcome) as one JSON object
        /// per line instead of text; the exit code is the same.
        #[arg(long)]
        json: bool,
    },
    /// Show the components, their versions and the update history.
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Abort the update in progress (before it commits).
    Abort {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct Target {
    /// The mountpoint whose supervisor to talk to.
    #[arg(long, value_name = "MNT")]
    mount: Option<PathBuf>,
    /// The control socket itself, instead of --mount.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?}: give a unit (ms, s or m)"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("{s:?}: not a number"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?}: too long"))
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    let code = match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            molt_sys::errln!("updater: {e:#}");
            exit::FAILURE
        }
    };
    std::process::exit(code);
}

fn run(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Keygen { out } => {
            let public = keyring::write_key_pair(&out, &keyring::generate())?;
            molt_sys::outln!(
                "wrote {} (secret, mode 0600) and {}",
                out.display(),
                public.display()
            );
            molt_sys::outln!(
                "install {} in the supervisor's keyring (a root-owned directory that only \
                 root can write, default {})",
                public.display(),
                keyring::DEFAULT_KEYRING
            );
            Ok(exit::OK)
        }
        Command::Pack { manifest, key, out } => pack(&manifest, &key, &out),
        Command::Inspect { package, keyring } => inspect(&package, keyring.as_deref()),
        Command::Check {
            package,
            target,
            json,
        } => {
            let package = read_package(&package)?;
            converse(&target, &Request::Check { package }, Mode::Outcome { json })
        }
        Command::Apply {
            package,
            target,
            deadline,
            no_wait,
            json,
        } => {
            let package = read_package(&package)?;
            let deadline_ms = deadline.map(|d| d.as_millis().min(u64::MAX as u128) as u64);
            let request = Request::Apply {
                package,
                deadline_ms,
                no_wait,
            };
            converse(&target, &request, Mode::Outcome { json })
        }
        Command::Status { target, json } => {
            converse(&target, &Request::Status, Mode::Status { json })
        }
        Command::Abort { target } => converse(&target, &Request::Abort, Mode::Abort),
    }
}

fn pack(manifest: &Path, key: &Path, out: &Path) -> anyhow::Result<i32> {
    let key = keyring::read_secret_key(key)?;
    let (m, bytes) = match package::pack_manifest_file(manifest, &key) {
        Ok(r) => r,
        Err(e @ PackageError::Io { .. }) => return Err(e.into()),
        Err(e) => {
            molt_sys::errln!("updater: {}: {e}", manifest.display());
            return Ok(exit::REFUSED);
        }
    };
    let now = now_unix();
    if m.package.expires_unix <= now {
        molt_sys::errln!(
            "updater: {}: expires_unix {} is not in the future (now {now})",
            manifest.display(),
            m.package.expires_unix
        );
        return Ok(exit::REFUSED);
    }
    // Written beside the target and renamed, so a reader never sees half a package.
    let tmp = {
        let mut s = out.as_os_str().to_owned();
        s.push(".tmp");
        PathBuf::from(s)
    };
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, out)
    };
    write().with_context(|| format!("writing {}", out.display()))?;
    molt_sys::outln!(
        "wrote {}: {} bytes, {} file(s), package {} sequence {}, signed by {}",
        out.display(),
        bytes.len(),
        m.files.len(),
        m.package.name,
        m.package.sequence,
        fingerprint(key.verifying_key().as_bytes())
    );
    Ok(exit::OK)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads a package file, refusing one over the package cap before reading it.
fn read_package(path: &Path) -> anyhow::Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("{}", path.display()))?
        .len();
    anyhow::ensure!(
        len <= package::DEFAULT_MAX_PACKAGE,
        "{}: {len} bytes, over the package cap of {}",
        path.display(),
        package::DEFAULT_MAX_PACKAGE
    );
    std::fs::read(path).with_context(|| format!("{}", path.display()))
}

fn inspect(path: &Path, keyring_dir: Option<&Path>) -> anyhow::Result<i32> {
    let bytes = read_package(path)?;
    let pkg = match Package::parse(&bytes, &Limits::default()) {
        Ok(p) => p,
        Err(e) => {
            molt_sys::outln!("{}: {e}", path.display());
            return Ok(exit::REFUSED);
        }
    };
    let signer = pkg.signer;
    molt_sys::outln!("signer     {} ({})", hex(&signer), fingerprint(&signer));
    if !pkg.self_signature_valid() {
        molt_sys::outln!("signature  INVALID (manifest not parsed)");
        return Ok(exit::REFUSED);
    }
    molt_sys::outln!("signature  valid for the signer's key");
    let own = pkg
        .signer_key()
        .expect("a valid signature implies a valid key");
    // Everything but trust, against the signer's own key.
    let own_ring = Keyring::from_keys([TrustedKey {
        name: "(package signer)".into(),
        key: own,
    }]);
    let intact = Package::verify(bytes.clone(), &own_ring);
    match &intact {
        Ok(v) => print_manifest(&v.manifest, Some(v)),
        Err(e) => {
            // Show what can be shown of a signed manifest that fails later checks.
            if let Ok(text) = std::str::from_utf8(pkg.manifest) {
                if let Ok(m) = updater::Manifest::parse(text) {
                    print_manifest(&m, None);
                }
            }
            molt_sys::outln!("verify     FAILED: {e}");
            return Ok(exit::REFUSED);
        }
    }
    let Some(dir) = keyring_dir else {
        molt_sys::outln!("trusted    not checked (no --keyring)");
        return Ok(exit::OK);
    };
    let ring = match Keyring::load(dir) {
        Ok(r) => r,
        Err(e) => {
            molt_sys::outln!("trusted    cannot load keyring: {e}");
            return Ok(exit::FAILURE);
        }
    };
    match Package::verify(bytes, &ring) {
        Ok(v) => {
            molt_sys::outln!(
                "trusted    yes: key {:?} in {}",
                v.signer.name,
                dir.display()
            );
            Ok(exit::OK)
        }
        Err(e) => {
            molt_sys::outln!("trusted    NO: {e}");
            Ok(exit::REFUSED)
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    formats::hex::encode(bytes)
}

fn print_manifest(m: &updater::Manifest, verified: Option<&updater::VerifiedPackage>) {
    let p = &m.package;
    molt_sys::outln!("package    {} (sequence {})", p.name, p.sequence);
    if !p.description.is_empty() {
        molt_sys::outln!("           {}", p.description);
    }
    let live = if p.live && p.nature != updater::Nature::NotLive {
        "live".to_string()
    } else {
        format!(
            "NOT live: {}",
            p.reason.as_deref().unwrap_or("no reason given")
        )
    };
    molt_sys::outln!("nature     {}, {live}", p.nature);
    let now = now_unix();
    let state = if now > p.expires_unix {
        "EXPIRED"
    } else {
        "not expired"
    };
    molt_sys::outln!("expires    {} (unix; {state})", p.expires_unix);
    molt_sys::outln!("deadline   {} ms", p.deadline_ms);
    for c in &m.components {
        let states: Vec<&str> = c.required_state.iter().map(|s| s.as_str()).collect();
        molt_sys::outln!(
            "component  {} {} -> {}: binary {}, state schema reads {:?} writes {}, requires [{}]{}",
            c.name,
            c.applies_to.join("|"),
            c.new_version,
            c.binary,
            c.state_schema_reads,
            c.state_schema_writes,
            states.join(", "),
            c.ring_protocol
                .map(|r| format!(", ring protocol {r}"))
                .unwrap_or_default()
        );
    }
    if let Some(f) = &m.format {
        molt_sys::outln!("format     {} -> {}", f.from, f.to);
    }
    if !m.requirements.is_empty() {
        let r = &m.requirements;
        let mut parts = Vec::new();
        if let Some(v) = r.memory_mib {
            parts.push(format!("memory {v} MiB"));
        }
        if let Some(v) = r.free_disk_mib {
            parts.push(format!("free disk {v} MiB"));
        }
        if let Some(v) = r.image_size_min_mib {
            parts.push(format!("image >= {v} MiB"));
        }
        if let Some(v) = r.image_size_max_mib {
            parts.push(format!("image <= {v} MiB"));
        }
        if !r.cpu_features.is_empty() {
            parts.push(format!("cpu {}", r.cpu_features.join(" ")));
        }
        if let Some(v) = &r.kernel_min {
            parts.push(format!("kernel >= {v}"));
        }
        if let Some(v) = &r.fuse_abi_min {
            parts.push(format!("FUSE ABI >= {v}"));
        }
        if !r.io_uring_ops.is_empty() {
            parts.push(format!("io_uring {}", r.io_uring_ops.join(" ")));
        }
        molt_sys::outln!("requires   {}", parts.join(", "));
    }
    for f in &m.files {
        let ok = if verified.is_some() { "ok" } else { "?" };
        molt_sys::outln!(
            "file       {}  {} bytes  sha256 {}  {ok}",
            f.path,
            f.size,
            f.sha256
        );
    }
}

enum Mode {
    /// `check` / `apply`: events until `Done`; `json` prints each as a JSON line.
    Outcome {
        json: bool,
    },
    /// `abort`: `Done { Aborted }` is success.
    Abort,
    Status {
        json: bool,
    },
}

fn converse(target: &Target, request: &Request, mode: Mode) -> anyhow::Result<i32> {
    let socket = match (&target.socket, &target.mount) {
        (Some(s), _) => s.clone(),
        (None, Some(m)) => match control::socket_path(m) {
            Ok(s) => s,
            Err(e) => {
                molt_sys::errln!("updater: {}: {e}", m.display());
                return Ok(exit::FAILURE);
            }
        },
        (None, None) => unreachable!("clap requires one"),
    };
    let mut client = match ControlClient::connect(&socket) {
        Ok(c) => c,
        Err(e) => {
            molt_sys::errln!(
                "updater: cannot reach the supervisor at {}: {e} (is the filesystem mounted, \
                 and are you root?)",
                socket.display()
            );
            return Ok(exit::FAILURE);
        }
    };
    client.send(request)?;
    if let Mode::Outcome { json: true } = mode {
        return stream_events(&mut client);
    }
    let mut progress = Progress::default();
    loop {
        let event = match client.next_event() {
            Ok(e) => e,
            Err(ProtocolError::Closed) => {
                progress.clear();
                molt_sys::errln!(
                    "updater: the supervisor closed the connection before the outcome"
                );
                return Ok(exit::FAILURE);
            }
            Err(e) => {
                progress.clear();
                return Err(e.into());
            }
        };
        match event {
            Event::Check(item) => progress.line(format!(
                "{} {}: {}",
                if item.passed { "PASS" } else { "FAIL" },
                item.name,
                item.detail
            )),
            Event::Phase {
                phase,
                state,
                elapsed_ms,
                detail,
            } => progress.line(phase_line(phase, state, elapsed_ms, &detail)),
            Event::Progress { what, done, total } => progress.update(&what, done, total),
            Event::Done { outcome, message } => {
                progress.clear();
                let sep = if message.is_empty() { "" } else { ": " };
                molt_sys::outln!("{outcome}{sep}{message}");
                return Ok(match (mode, outcome) {
                    (Mode::Abort, Outcome::Aborted) => exit::OK,
                    (_, o) => o.exit_code(),
                });
            }
            Event::Status(report) => {
                progress.clear();
                if let Mode::Status { json } = mode {
                    if json {
                        molt_sys::outln!(
                            "{}",
                            serde_json::to_string_pretty(&status_json(&report)?)?
                        );
                    } else {
                        print_status(&report);
                    }
                    return Ok(exit::OK);
                }
                print_status(&report);
            }
        }
    }
}

/// Prints the events of a conversation as JSON lines until its `Done`, whose outcome is the
/// exit code. A conversation the supervisor ends early prints nothing more and fails.
fn stream_events(client: &mut ControlClient) -> anyhow::Result<i32> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    loop {
        let event = match client.next_event() {
            Ok(e) => e,
            Err(ProtocolError::Closed) => {
                molt_sys::errln!(
                    "updater: the supervisor closed the connection before the outcome"
                );
                return Ok(exit::FAILURE);
            }
            Err(e) => return Err(e.into()),
        };
        writeln!(out, "{}", serde_json::to_string(&event)?)?;
        out.flush()?;
        if let Event::Done { outcome, .. } = event {
            return Ok(outcome.exit_code());
        }
    }
}

fn phase_line(phase: Phase, state: PhaseState, elapsed_ms: u64, detail: &str) -> String {
    let detail = if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    };
    match state {
        PhaseState::Started => format!("phase {phase} started{detail}"),
        PhaseState::Finished => format!("phase {phase} finished in {elapsed_ms} ms{detail}"),
        PhaseState::Failed => format!("phase {phase} FAILED after {elapsed_ms} ms{detail}"),
    }
}

/// `updater status --json`: the report, with each component's counters as one object
/// (name to value) and each update's start also as a UTC date.
fn status_json(r: &StatusReport) -> serde_json::Result<serde_json::Value> {
    let mut v = serde_json::to_value(r)?;
    if let Some(components) = v["components"].as_array_mut() {
        for (c, report) in components.iter_mut().zip(&r.components) {
            let counters: serde_json::Map<String, serde_json::Value> = report
                .counters
                .iter()
                .map(|(k, n)| (k.clone(), (*n).into()))
                .collect();
            c["counters"] = counters.into();
        }
    }
    if let Some(s) = &r.supervisor {
        v["supervisor"]["took_over_utc"] = formats::when::utc_date(s.took_over_unix).into();
    }
    if let Some(history) = v["history"].as_array_mut() {
        for (h, u) in history.iter_mut().zip(&r.history) {
            h["started_utc"] = formats::when::utc_date(u.started_unix).into();
        }
    }
    Ok(v)
}

fn print_status(r: &StatusReport) {
    molt_sys::outln!("format version {}", r.format_version);
    if let Some(s) = &r.supervisor {
        molt_sys::outln!(
            "supervisor version {:<8} pid {:<7} since {} ({})  log {}",
            s.version,
            s.pid,
            formats::when::date_and_age(s.took_over_unix, now_unix()),
            s.how,
            s.log
        );
    }
    if let Some(f) = &r.fuse {
        molt_sys::outln!(
            "fuse      transport {:<6} protocol {}",
            f.transport,
            f.protocol.as_deref().unwrap_or("(not negotiated yet)")
        );
    }
    for c in &r.components {
        let counters: Vec<String> = c.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        molt_sys::outln!(
            "{:<9} version {:<8} pid {:<7} state schema {}  {}",
            c.name,
            c.version,
            c.pid,
            c.state_schema,
            counters.join(" ")
        );
    }
    match &r.update_in_progress {
        Some(p) => molt_sys::outln!("update in progress: {p}"),
        None => molt_sys::outln!("no update in progress"),
    }
    if let Some(c) = &r.conversion {
        molt_sys::outln!(
            "conversion: {}/{} inodes ({:.0}/s)",
            c.done,
            c.total,
            c.rate_per_s
        );
    }
    if let Some(c) = &r.last_conversion {
        molt_sys::outln!(
            "last conversion: to format v{}, {} inodes and {} bytes rewritten in {} ms ({} steps, longest {} us, mean {} us)",
            c.to.0, c.inodes, c.bytes, c.millis, c.steps, c.longest_step_us, c.mean_step_us
        );
    }
    if !r.history.is_empty() {
        molt_sys::outln!("history:");
    }
    let now = now_unix();
    for u in &r.history {
        let sep = if u.message.is_empty() { "" } else { ": " };
        molt_sys::outln!(
            "  {} #{} ({}) started {}: {}{sep}{}",
            u.package,
            u.sequence,
            u.nature,
            formats::when::date_and_age(u.started_unix, now),
            u.outcome,
            u.message
        );
        for (phase, ms, state) in &u.phases {
            let s = match state {
                PhaseState::Started => "unfinished",
                PhaseState::Finished => "ok",
                PhaseState::Failed => "FAILED",
            };
            molt_sys::outln!("    {phase:<15} {ms:>6} ms  {s}");
        }
    }
}

/// A progress bar on a terminal; on anything else, a line per tenth of the way.
#[derive(Default)]
struct Progress {
    bar: Option<ProgressBar>,
    last_tenth: Option<(String, u64)>,
}

impl Progress {
    fn update(&mut self, what: &str, done: u64, total: u64) {
        if !std::io::stderr().is_terminal() {
            let tenth = (done.saturating_mul(10)).checked_div(total).unwrap_or(10);
            let key = (what.to_string(), tenth);
            if self.last_tenth.as_ref() != Some(&key) {
                molt_sys::outln!("progress {what}: {done}/{total}");
                self.last_tenth = Some(key);
            }
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({per_sec}, {eta})")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            b
        });
        bar.set_message(what.to_string());
        bar.set_length(total);
        bar.set_position(done);
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(b) => b.println(text),
            None => molt_sys::outln!("{text}"),
        }
    }

    fn clear(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("99999999999999999999m").is_err());
    }

    #[test]
    fn cli_shape() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        assert!(Cli::try_parse_from(["updater", "status"]).is_err());
        assert!(
            Cli::try_parse_from(["updater", "status", "--mount", "/m", "--socket", "/s"]).is_err()
        );
        assert!(Cli::try_parse_from([
            "updater",
            "apply",
            "p",
            "--mount",
            "/m",
            "--deadline",
            "5s",
            "--no-wait"
        ])
        .is_ok());
    }
}
