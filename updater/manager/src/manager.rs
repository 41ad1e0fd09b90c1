//! The update manager's front door: the control socket of a mount. It checks the peer's
//! credentials before reading a byte, verifies packages (signature and hashes before
//! anything else is parsed), runs the compatibility and requirement checks, applies one
//! update at a time, and answers status and abort requests.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use updater::manifest::{ComponentName, Manifest};
use updater::protocol::{
    self, ComponentStatus, ConversionStatus, Event, Outcome, Request, StatusReport, UpdateRecord,
};
use updater::{
    check_compatibility, check_requirements, CheckItem, Keyring, MachineContext, Package,
    VerifiedPackage,
};

use crate::stack::Stack;
use crate::update::{PhaseEvent, Phases, Replacement, Update};
use formats::version::FormatVersion;
use molt_control::{Command, Reply};

/// What the control socket shares with the running update.
pub struct Control {
    /// The mount this supervisor serves.
    pub mountpoint: PathBuf,
    /// Raised by `updater abort`; the running update checks it between and during phases.
    pub abort: AtomicBool,
    /// Name of the package being applied.
    pub in_progress: Mutex<Option<String>>,
    pub keyring_dir: PathBuf,
    /// Users besides root allowed on the socket.
    pub allowed_uids: Vec<u32>,
}

/// Binds `control.sock` (mode 0600) in the mount's runtime directory (mode 0700) and serves
/// it on a thread.
/// A `listener` handed over by a previous supervisor (a live update) is served as it is.
pub fn start(
    stack: &Arc<Mutex<Stack>>,
    control: Arc<Control>,
    listener: Option<UnixListener>,
) -> io::Result<PathBuf> {
    let mnt = stack.lock().unwrap_or_else(|p| p.into_inner()).mnt.clone();
    let path = crate::runtime::dir_for(&mnt).join(updater::control::SOCKET_NAME);
    let listener = match listener {
        Some(l) => l,
        None => {
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            listener
        }
    };
    stack
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .control_socket = Some(listener.as_fd().try_clone_to_owned()?);
    let stack = stack.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (stack, control) = (stack.clone(), control.clone());
            std::thread::spawn(move || {
                let _ = serve_connection(conn, &stack, &control);
            });
        }
    });
    Ok(path)
}

/// The uid of the process at the other end of a Unix socket.
fn peer_uid(conn: &UnixStream) -> io::Result<u32> {
    molt_sys::peer_credentials(conn.as_fd()).map(|c| c.uid)
}

fn serve_connection(
    mut conn: UnixStream,
    stack: &Arc<Mutex<Stack>>,
    control: &Arc<Control>,
) -> io::Result<()> {
    // Credentials first: a refused peer never gets a byte of ours parsed.
    let uid = peer_uid(&conn)?;
    if uid != 0 && !control.allowed_uids.contains(&uid) {
        let _ = send(
            &mut conn,
            &Event::Done {
                outcome: Outcome::Refused,
                message: format!("uid {uid} may not control this mount"),
            },
        );
        return Ok(());
    }
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let request: Request = match protocol::read_msg(&mut conn, &protocol::REQUESTS) {
        Ok(r) => r,
        Err(e) => {
            let _ = send(
                &mut conn,
                &Event::Done {
                    outcome: Outcome::Refused,
                    message: format!("bad request: {e}"),
                },
            );
            return Ok(());
        }
    };
    let client = conn.try_clone()?;
    let mut out = |ev: Event| {
        let _ = send(&mut conn, &ev);
    };
    match request {
        Request::Status => out(Event::Status(Box::new(status(stack, control)))),
        Request::Abort => {
            let running = control
                .in_progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            match running {
                Some(name) => {
                    control.abort.store(true, Ordering::SeqCst);
                    out(Event::Done {
                        outcome: Outcome::Aborted,
                        message: format!("abort requested for {name}"),
                    });
                }
                None => out(Event::Done {
                    outcome: Outcome::Refused,
                    message: "no update is in progress".into(),
                }),
            }
        }
        Request::Check { package } => {
            let (outcome, message) = match initialize(stack, control, package, &mut out) {
                Ok(_) => (
                    Outcome::Passed,
                    "every check passed; nothing was changed".to_string(),
                ),
                Err(r) => (Outcome::Refused, r.why),
            };
            out(Event::Done { outcome, message });
        }
        Request::Apply {
            package,
            deadline_ms,
            no_wait,
        } => {
            // A supervisor update hands this connection to the new supervisor.
            let client = client.try_clone()?;
            let (outcome, message) = apply(
                stack,
                control,
                package,
                Options {
                    deadline_ms,
                    no_wait,
                    client: client.as_fd(),
                },
                &mut out,
            );
            out(Event::Done { outcome, message });
        }
    }
    Ok(())
}

fn send(conn: &mut UnixStream, ev: &Event) -> Result<(), protocol::ProtocolError> {
    protocol::write_msg(conn, &protocol::EVENTS, ev)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The initialization phase: verify, then check compatibility and requirements. Every
/// check is reported; any failure refuses the package with nothing changed.
/// Why a package was refused, and what it claimed to be when its signature held.
struct Refusal {
    why: String,
    package: Option<(String, u64, String)>,
}

impl From<String> for Refusal {
    fn from(why: String) -> Refusal {
        Refusal { why, package: None }
    }
}

fn initialize(
    stack: &Arc<Mutex<Stack>>,
    control: &Control,
    package: Vec<u8>,
    out: &mut dyn FnMut(Event),
) -> Result<VerifiedPackage, Refusal> {
    let keyring = Keyring::load(&control.keyring_dir)
        .map_err(|e| format!("keyring {}: {e}", control.keyring_dir.display()))?;
    let verified =
        Package::verify(package, &keyring).map_err(|e| format!("package refused: {e}"))?;
    let identity = {
        let p = &verified.manifest.package;
        Some((p.name.clone(), p.sequence, p.nature.as_str().to_string()))
    };
    check_package(stack, &verified, out).map_err(|why| Refusal {
        why,
        package: identity,
    })?;
    Ok(verified)
}

fn check_package(
    stack: &Arc<Mutex<Stack>>,
    verified: &VerifiedPackage,
    out: &mut dyn FnMut(Event),
) -> Result<(), String> {
    out(Event::Check(CheckItem::new(
        "signature",
        true,
        format!(
            "signed by a trusted key; {} files match their hashes",
            verified.manifest.files.len()
        ),
    )));
    let m = &verified.manifest;
    if let Some(reason) = verified.not_live_reason() {
        out(Event::Check(CheckItem::new(
            "live",
            false,
            reason.to_string(),
        )));
        return Err(format!(
            "{} cannot be applied live: {reason}",
            m.package.name
        ));
    }
    let (running, image, fuse, read_only) = {
        let mut s = stack.lock().unwrap_or_else(|p| p.into_inner());
        let fuse = server_status(&mut s).and_then(|st| st.fuse);
        let mut running = running_system(&s);
        running.fsd_transport = fuse.as_ref().map(|f| f.transport.clone());
        (running, s.opts.image.clone(), fuse, s.opts.flags.read_only)
    };
    let mut ctx = MachineContext::probe(&image);
    // The protocol the connection negotiated; before INIT, the newest this build speaks.
    ctx.fuse_abi = fuse
        .and_then(|f| f.protocol)
        .unwrap_or_else(|| format!("7.{}", molt_fuse_minor()));
    ctx.io_uring_ops = Some(crate::sysinfo::io_uring_ops());
    let mut items = check_compatibility(m, &running);
    if read_only {
        // A read-only mount runs the versions it was mounted with until it is unmounted.
        items.push(CheckItem::new(
            "read-write mount",
            false,
            "the mount is read-only, and read-only mounts are not updated live; unmount it \
             and mount it again to run the new version"
                .to_string(),
        ));
    }
    items.extend(check_requirements(&m.requirements, &ctx));
    if let Some(change) = m.format {
        items.push(conversion_space_check(stack, change));
    }
    let mut failed = Vec::new();
    for item in items {
        if !item.passed {
            failed.push(format!("{}: {}", item.name, item.detail));
        }
        out(Event::Check(item));
    }
    if !failed.is_empty() {
        return Err(failed.join("; "));
    }
    Ok(())
}

/// Whether the image has the free space converting it to `change.to` needs: the running
/// server computes the need from the image (extent blocks the new layout adds, plus
/// headroom) and reports the free space.
/// How long the manager waits for the server's answer to a one-line request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn conversion_space_check(
    stack: &Arc<Mutex<Stack>>,
    change: updater::manifest::FormatChange,
) -> CheckItem {
    let name = "conversion space";
    let reply = {
        let mut s = stack.lock().unwrap_or_else(|p| p.into_inner());
        s.server.request(
            &Command::ConversionSpace(FormatVersion(change.to)),
            REQUEST_TIMEOUT,
        )
    };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    match reply {
        Ok(Reply::Space { needed, free }) => CheckItem::new(
            name,
            needed <= free,
            format!(
                "converting to format v{} needs {:.1} MiB free in the image, it has {:.1} MiB",
                change.to,
                mib(needed),
                mib(free)
            ),
        ),
        Ok(other) => CheckItem::new(name, false, format!("unexpected answer: {other:?}")),
        Err(e) => CheckItem::new(name, false, format!("the server did not answer: {e}")),
    }
}

fn running_system(s: &Stack) -> updater::RunningSystem {
    updater::RunningSystem {
        components: vec![
            updater::RunningComponent {
                name: ComponentName::Fsd,
                version: s.server.info.version.clone(),
                state_schema: s.server.info.state_schema,
                ring_protocol: Some(s.server.info.ring),
            },
            updater::RunningComponent {
                name: ComponentName::Blockdev,
                version: s.driver.info.version.clone(),
                state_schema: s.driver.info.state_schema,
                ring_protocol: Some(s.driver.info.ring),
            },
            updater::RunningComponent {
                name: ComponentName::Supervisor,
                version: s.supervisor.version.clone(),
                state_schema: crate::identity::STATE_VERSION,
                ring_protocol: None,
            },
        ],
        format_version: s.format_version,
        last_sequence: (s.last_sequence > 0).then_some(s.last_sequence),
        fsd_transport: None,
    }
}

/// The newest FUSE protocol minor version the filesystem server speaks.
fn molt_fuse_minor() -> u32 {
    fsd_server::serve::FUSE_MINOR_VERSION
}

/// Writes a component binary from a package into the runtime directory (mode 0700).
fn install_binary(mnt: &Path, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    let dir = crate::runtime::dir_for(mnt).join("bin");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let path = dir.join(format!(
        "{name}-{}",
        &updater::package::sha256_hex(bytes)[..16]
    ));
    if !path.exists() {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700))?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

struct InProgress<'a>(&'a Control);

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        *self.0.in_progress.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.0.abort.store(false, Ordering::SeqCst);
    }
}

/// How an `apply` request runs.
struct Options<'a> {
    deadline_ms: Option<u64>,
    no_wait: bool,
    /// The requester's connection.
    client: std::os::fd::BorrowedFd<'a>,
}

fn apply(
    stack: &Arc<Mutex<Stack>>,
    control: &Control,
    package: Vec<u8>,
    options: Options<'_>,
    out: &mut dyn FnMut(Event),
) -> (Outcome, String) {
    let Options {
        deadline_ms,
        no_wait,
        client,
    } = options;
    // One update at a time.
    {
        let mut running = control
            .in_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(name) = running.as_ref() {
            return (
                Outcome::Refused,
                format!("an update is already in progress: {name}"),
            );
        }
        *running = Some("(being verified)".into());
    }
    let _guard = InProgress(control);
    control.abort.store(false, Ordering::SeqCst);
    let started_unix = now_unix();
    let t0 = Instant::now();
    out(Event::Phase {
        phase: protocol::Phase::Initialization,
        state: protocol::PhaseState::Started,
        elapsed_ms: 0,
        detail: "verifying the package".into(),
    });
    let verified = match initialize(stack, control, package, out) {
        Ok(v) => v,
        Err(r) => {
            let elapsed_ms = t0.elapsed().as_millis() as u64;
            out(Event::Phase {
                phase: protocol::Phase::Initialization,
                state: protocol::PhaseState::Failed,
                elapsed_ms,
                detail: r.why.clone(),
            });
            let (package, sequence, nature) = r
                .package
                .unwrap_or_else(|| ("(unverified package)".into(), 0, String::new()));
            let mut s = stack.lock().unwrap_or_else(|p| p.into_inner());
            s.record(UpdateRecord {
                package,
                sequence,
                nature,
                started_unix,
                phases: vec![(
                    protocol::Phase::Initialization,
                    elapsed_ms,
                    protocol::PhaseState::Failed,
                )],
                outcome: Outcome::Refused,
                message: r.why.clone(),
            });
            return (Outcome::Refused, r.why);
        }
    };
    out(Event::Phase {
        phase: protocol::Phase::Initialization,
        state: protocol::PhaseState::Finished,
        elapsed_ms: t0.elapsed().as_millis() as u64,
        detail: "package verified; every check passed".into(),
    });
    let m: Manifest = verified.manifest.clone();
    *control
        .in_progress
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(m.package.name.clone());

    let mut s = stack.lock().unwrap_or_else(|p| p.into_inner());
    if m.component(ComponentName::Supervisor).is_some() {
        return apply_supervisor(&mut s, &verified, started_unix, t0, client, out);
    }
    let deadline = Duration::from_millis(deadline_ms.unwrap_or(m.package.deadline_ms));
    let package = m.package.name.clone();
    let mut report = |e: PhaseEvent| {
        // The service manager sees each phase as the unit's status line.
        crate::notify::status(&format!(
            "live update {package}: {} {}",
            e.phase.as_str(),
            match e.state {
                protocol::PhaseState::Started => "started",
                protocol::PhaseState::Finished => "finished",
                protocol::PhaseState::Failed => "failed",
            }
        ));
        out(Event::Phase {
            phase: e.phase,
            state: e.state,
            elapsed_ms: e.elapsed.as_millis() as u64,
            detail: e.detail,
        });
    };
    let mut phases = Phases::new(&mut report);
    let mnt = s.mnt.clone();
    let (outcome, message) = match replacements(&verified, &m, &mnt) {
        Ok(replacements) => {
            let required = m
                .components
                .iter()
                .flat_map(|c| c.required_state.iter().copied())
                .collect();
            let update = Update {
                replacements,
                deadline,
                required,
            };
            crate::update::run(&mut s, update, &control.abort, &mut phases)
        }
        Err(refusal) => refusal,
    };
    let record = phases.into_record();
    crate::notify::status(&format!(
        "serving {}; live update {}: {outcome:?}",
        mnt.display(),
        m.package.name
    ));
    if outcome == Outcome::Committed {
        s.last_sequence = m.package.sequence;
    }
    s.record(UpdateRecord {
        package: m.package.name.clone(),
        sequence: m.package.sequence,
        nature: m.package.nature.as_str().to_string(),
        started_unix,
        phases: record
            .iter()
            .map(|(p, d, st)| (*p, d.as_millis() as u64, *st))
            .collect(),
        outcome,
        message: message.clone(),
    });
    match (outcome, m.format) {
        (Outcome::Committed, Some(change)) => {
            drop(s);
            convert_after_update(stack, change, no_wait, out)
        }
        _ => (outcome, message),
    }
}

/// After an update that declares an on-disk format change committed: tells the new
/// server to convert, then (unless `no_wait`) reports progress until the conversion is
/// done. The stack is locked only for each progress query, so crash recovery and status
/// requests go on meanwhile; a server that dies mid-conversion is replaced and its
/// successor resumes the conversion from the image.
fn convert_after_update(
    stack: &Arc<Mutex<Stack>>,
    change: updater::manifest::FormatChange,
    no_wait: bool,
    out: &mut dyn FnMut(Event),
) -> (Outcome, String) {
    let t0 = Instant::now();
    let what = format!("converting format v{} to v{}", change.from, change.to);
    out(Event::Phase {
        phase: protocol::Phase::Conversion,
        state: protocol::PhaseState::Started,
        elapsed_ms: 0,
        detail: what.clone(),
    });
    let started = {
        let mut s = stack.lock().unwrap_or_else(|p| p.into_inner());
        s.server
            .request(&Command::Convert(FormatVersion(change.to)), REQUEST_TIMEOUT)
    };
    let end = |out: &mut dyn FnMut(Event), stack: &Arc<Mutex<Stack>>, ok: bool, detail: String| {
        let elapsed_ms = t0.elapsed().as_millis() as u64;
        let state = if ok {
            protocol::PhaseState::Finished
        } else {
            protocol::PhaseState::Failed
        };
        out(Event::Phase {
            phase: protocol::Phase::Conversion,
            state,
            elapsed_ms,
            detail: detail.clone(),
        });
        let mut s = stack.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = s.history.last_mut() {
            r.phases
                .push((protocol::Phase::Conversion, elapsed_ms, state));
            r.message = format!("{}; {detail}", r.message);
        }
        s.save();
    };
    match started {
        Ok(Reply::Converting) => {}
        other => {
            let why = match other {
                Ok(r) => format!("committed, but the conversion did not start: {r:?}"),
                Err(e) => format!("committed, but the conversion did not start: {e}"),
            };
            end(out, stack, false, why.clone());
            return (Outcome::Failed, why);
        }
    }
    if no_wait {
        let msg = format!("{what} in the background; `updater status` shows its progress");
        end(out, stack, true, msg.clone());
        return (Outcome::Started, msg);
    }
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let status = {
            let mut s = stack.lock().unwrap_or_else(|p| p.into_inner());
            server_status(&mut s)
        };
        let Some(status) = status else {
            // No answer: the server is being replaced after a crash; ask again.
            continue;
        };
        match (status.conversion, status.format) {
            (Some(c), _) => out(Event::Progress {
                what: what.clone(),
                done: c.done,
                total: c.total,
            }),
            (None, Some(f)) if f.0 == change.to => {
                let mut s = stack.lock().unwrap_or_else(|p| p.into_inner());
                s.format_version = change.to;
                drop(s);
                let msg = format!(
                    "the image has format v{} ({:.1} s)",
                    change.to,
                    t0.elapsed().as_secs_f64()
                );
                end(out, stack, true, msg.clone());
                return (Outcome::Committed, msg);
            }
            _ => {}
        }
    }
}

/// The components a package replaces, server first, each binary installed in the
/// runtime directory.
fn replacements(
    verified: &VerifiedPackage,
    m: &Manifest,
    mnt: &Path,
) -> Result<Vec<Replacement>, (Outcome, String)> {
    let mut out = Vec::new();
    for name in [ComponentName::Fsd, ComponentName::Blockdev] {
        if !m.components.iter().any(|c| c.name == name) {
            continue;
        }
        let label = name.as_str();
        let binary = match verified.binary(name).map(|b| install_binary(mnt, label, b)) {
            Some(Ok(path)) => path,
            Some(Err(e)) => {
                return Err((
                    Outcome::Failed,
                    format!("installing the {label} binary: {e}"),
                ))
            }
            None => {
                return Err((
                    Outcome::Refused,
                    format!("the package carries no {label} binary"),
                ))
            }
        };
        out.push(match name {
            ComponentName::Fsd => Replacement::of_server(binary),
            ComponentName::Blockdev => Replacement::of_driver(binary),
            ComponentName::Supervisor => unreachable!("not in the list above"),
        });
    }
    if out.is_empty() {
        return Err((Outcome::Refused, "the package names no component".into()));
    }
    Ok(out)
}

fn status(stack: &Arc<Mutex<Stack>>, control: &Control) -> StatusReport {
    let in_progress = control
        .in_progress
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    // During an update the stack is busy; answer with what is known without waiting.
    let deadline = Instant::now() + Duration::from_millis(200);
    let guard = loop {
        match stack.try_lock() {
            Ok(g) => break Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => break Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => break None,
        }
    };
    let Some(mut s) = guard else {
        return StatusReport {
            components: Vec::new(),
            format_version: 0,
            history: Vec::new(),
            update_in_progress: in_progress,
            conversion: None,
            last_conversion: None,
            supervisor: None,
            fuse: None,
        };
    };
    let server = server_status(&mut s);
    let driver = status_of(&mut s.driver);
    if let Some(f) = server.as_ref().and_then(|st| st.format) {
        s.format_version = f.0;
    }
    let conversion = server
        .as_ref()
        .and_then(|st| st.conversion.as_ref())
        .map(|c| ConversionStatus {
            done: c.done,
            total: c.total,
            rate_per_s: c.rate_per_s as f64,
        });
    let last_conversion = server.as_ref().and_then(|st| st.last_conversion.clone());
    let fuse = server.as_ref().and_then(|st| st.fuse.clone());
    let counters = |st: Option<molt_control::Status>| st.map(|st| st.counters).unwrap_or_default();
    StatusReport {
        components: vec![
            ComponentStatus {
                name: "fsd".into(),
                version: s.server.info.version.clone(),
                pid: s.server.pid(),
                state_schema: s.server.info.state_schema,
                counters: counters(server),
            },
            ComponentStatus {
                name: "blockdev".into(),
                version: s.driver.info.version.clone(),
                pid: s.driver.pid(),
                state_schema: s.driver.info.state_schema,
                counters: counters(driver),
            },
        ],
        format_version: s.format_version,
        history: s.history.clone(),
        update_in_progress: in_progress,
        conversion,
        last_conversion,
        supervisor: Some(supervisor_status(&s)),
        fuse,
    }
}

/// A component's status, asked over its control link; `None` if it does not answer.
fn status_of(c: &mut crate::component::ComponentProc) -> Option<molt_control::Status> {
    match c.request(&Command::Status, Duration::from_secs(2)) {
        Ok(Reply::Status(st)) => Some(st),
        _ => None,
    }
}

fn server_status(s: &mut Stack) -> Option<molt_control::Status> {
    status_of(&mut s.server)
}

fn supervisor_status(s: &Stack) -> updater::protocol::SupervisorStatus {
    updater::protocol::SupervisorStatus {
        pid: std::process::id(),
        version: s.supervisor.version.clone(),
        log: crate::runtime::log_path(&s.mnt).display().to_string(),
        took_over_unix: s.supervisor.took_over_unix,
        how: s.supervisor.how.clone(),
    }
}

/// A live update of the supervisor: checks the new binary, then hands the mount to it
/// (an exec in this process; see `crate::succession`). The new supervisor answers the
/// requester; this function returns only when the mount stays with this supervisor.
fn apply_supervisor(
    s: &mut Stack,
    verified: &VerifiedPackage,
    started_unix: u64,
    t0: Instant,
    client: std::os::fd::BorrowedFd<'_>,
    out: &mut dyn FnMut(Event),
) -> (Outcome, String) {
    let m = &verified.manifest;
    let ms = |t: Instant| t.elapsed().as_millis() as u64;
    let mut record = UpdateRecord {
        package: m.package.name.clone(),
        sequence: m.package.sequence,
        nature: m.package.nature.as_str().to_string(),
        started_unix,
        phases: vec![(
            protocol::Phase::Initialization,
            ms(t0),
            protocol::PhaseState::Finished,
        )],
        outcome: Outcome::Failed,
        message: String::new(),
    };
    let fail = |s: &mut Stack,
                out: &mut dyn FnMut(Event),
                record: &mut UpdateRecord,
                outcome,
                why: String| {
        out(Event::Phase {
            phase: protocol::Phase::StateTransfer,
            state: protocol::PhaseState::Failed,
            elapsed_ms: ms(t0),
            detail: why.clone(),
        });
        record.phases.push((
            protocol::Phase::StateTransfer,
            ms(t0),
            protocol::PhaseState::Failed,
        ));
        record.outcome = outcome;
        record.message = format!("{why}; supervisor {} stays in charge", s.supervisor.version);
        s.record(record.clone());
        (outcome, record.message.clone())
    };
    let Some(component) = m.component(ComponentName::Supervisor) else {
        return fail(
            s,
            out,
            &mut record,
            Outcome::Refused,
            "no supervisor component".into(),
        );
    };
    let binary = match verified
        .binary(ComponentName::Supervisor)
        .map(|b| install_binary(&s.mnt, "supervisor", b))
    {
        Some(Ok(path)) => path,
        Some(Err(e)) => {
            return fail(
                s,
                out,
                &mut record,
                Outcome::Failed,
                format!("installing the supervisor: {e}"),
            )
        }
        None => {
            return fail(
                s,
                out,
                &mut record,
                Outcome::Refused,
                "the package carries no supervisor binary".into(),
            )
        }
    };
    // What the binary says of itself must be what the package says it is.
    let info = match crate::identity::probe_supervisor(&binary) {
        Ok(info) => info,
        Err(why) => return fail(s, out, &mut record, Outcome::Refused, why),
    };
    if info.version != component.new_version
        || !info
            .state_schema_reads
            .contains(&crate::identity::STATE_VERSION)
    {
        let why = format!(
            "the supervisor binary is {} reading state schemas {:?}; the package says {} \
             and this supervisor hands over schema {}",
            info.version,
            info.state_schema_reads,
            component.new_version,
            crate::identity::STATE_VERSION
        );
        return fail(s, out, &mut record, Outcome::Refused, why);
    }
    let detail = format!(
        "handing the mount to supervisor {} (state schema {})",
        info.version,
        crate::identity::STATE_VERSION
    );
    out(Event::Phase {
        phase: protocol::Phase::StateTransfer,
        state: protocol::PhaseState::Started,
        elapsed_ms: ms(t0),
        detail,
    });
    record.phases.push((
        protocol::Phase::StateTransfer,
        ms(t0),
        protocol::PhaseState::Finished,
    ));
    crate::notify::status(&format!(
        "live update {}: handing over to supervisor {}",
        m.package.name, info.version
    ));
    let pending = crate::succession::PendingUpdate {
        record: record.clone(),
        new_version: info.version.clone(),
    };
    // Returns only if the mount stays here.
    let why = crate::succession::exec_update(s, &binary, client, pending);
    fail(s, out, &mut record, Outcome::RolledBack, why)
}
