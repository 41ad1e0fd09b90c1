//! The update manager: replaces a running component with a new version following the
//! cooperative model's phases. Until the commit, the old component keeps its state and
//! resumes on any failure (deadline, crash or refusal of the new one, failed state
//! check); the workload sees only a pause.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use blockdev::handover::HandoverError;
use blockdev::ring::{ProtocolVersion, StatusTable};
use blockdev::spawn::StartMode;
use std::time::{Duration, Instant};

use crate::component::{reap_child, Component, LinkError};
use crate::supervisor::{spawn_driver, DriverProc, Stack};
use fsd_server::persist;

pub use updater::protocol::{Outcome, Phase, PhaseState, UpdateRecord};

/// One step reported while an update runs.
#[derive(Debug, Clone)]
pub struct PhaseEvent {
    pub phase: Phase,
    pub state: PhaseState,
    pub elapsed: Duration,
    pub detail: String,
}

/// What to replace the filesystem server with.
#[derive(Debug, Clone)]
pub struct FsdUpdate {
    pub binary: PathBuf,
    /// Time allowed to reach the required state.
    pub deadline: Duration,
    pub required_states: Vec<String>,
}

/// Time a component may take for a step that does not depend on the workload.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs phases and reports each one.
pub(crate) struct Phases<'a> {
    report: &'a mut dyn FnMut(PhaseEvent),
    record: Vec<(Phase, Duration, PhaseState)>,
    current: Option<(Phase, Instant)>,
}

impl<'a> Phases<'a> {
    pub(crate) fn new(report: &'a mut dyn FnMut(PhaseEvent)) -> Phases<'a> {
        Phases {
            report,
            record: Vec::new(),
            current: None,
        }
    }

    pub(crate) fn into_record(self) -> Vec<(Phase, Duration, PhaseState)> {
        self.record
    }

    pub(crate) fn start(&mut self, phase: Phase, detail: &str) {
        self.current = Some((phase, Instant::now()));
        (self.report)(PhaseEvent {
            phase,
            state: PhaseState::Started,
            elapsed: Duration::ZERO,
            detail: detail.into(),
        });
    }

    pub(crate) fn end(&mut self, ok: bool, detail: &str) {
        if let Some((phase, t)) = self.current.take() {
            let state = if ok {
                PhaseState::Finished
            } else {
                PhaseState::Failed
            };
            let elapsed = t.elapsed();
            self.record.push((phase, elapsed, state));
            (self.report)(PhaseEvent {
                phase,
                state,
                elapsed,
                detail: detail.into(),
            });
        }
    }
}

/// Replaces the filesystem server. Returns the outcome and a message.
pub(crate) fn update_fsd(
    stack: &mut Stack,
    u: &FsdUpdate,
    abort: &AtomicBool,
    p: &mut Phases<'_>,
) -> (Outcome, String) {
    run_fsd_update(stack, u, abort, p)
}

fn run_fsd_update(
    stack: &mut Stack,
    u: &FsdUpdate,
    abort: &AtomicBool,
    p: &mut Phases<'_>,
) -> (Outcome, String) {
    // Notification: the successor starts next to the running server (its FUSE session is
    // set up while the old one still answers), then the old one is told what state to reach.
    p.start(
        Phase::Notification,
        &format!("starting {}", u.binary.display()),
    );
    stack.server.drain_inbox();
    let mut new = match stack.spawn_server(&u.binary, true) {
        Ok(c) => c,
        Err(e) => {
            p.end(false, &e.to_string());
            return (
                Outcome::Failed,
                format!("could not start the new version: {e}"),
            );
        }
    };
    if let Err(e) = new.expect("spawned", Instant::now() + STEP_TIMEOUT, abort) {
        new.kill();
        p.end(false, &e.to_string());
        return (
            outcome_of(&e, Outcome::Failed),
            format!("the new version did not start: {e}"),
        );
    }
    let states = if u.required_states.is_empty() {
        "quiescent".to_string()
    } else {
        u.required_states.join(",")
    };
    if let Err(e) = stack
        .server
        .send(&format!("prepare {} {}", u.deadline.as_millis(), states))
    {
        new.kill();
        p.end(false, &e.to_string());
        return (
            Outcome::Failed,
            format!("could not notify the running version: {e}"),
        );
    }
    p.end(
        true,
        &format!("required state: {states}, deadline {:?}", u.deadline),
    );

    // Preparation: the old server converges, drains and exports its state.
    p.start(Phase::Preparation, "converging and draining");
    let blob =
        match stack
            .server
            .expect_blob("ready", Instant::now() + u.deadline + STEP_TIMEOUT, abort)
        {
            Ok(b) => b,
            Err(e) => {
                new.send("abort").ok();
                new.reap(Duration::from_secs(5));
                p.end(false, &e.to_string());
                if matches!(e, LinkError::Deadline | LinkError::Aborted) {
                    // The old server may have finished draining late and be holding.
                    resume_old(stack);
                }
                return (
                    outcome_of(&e, Outcome::Aborted),
                    format!("the running version did not reach the required state: {e}"),
                );
            }
        };
    p.end(true, &format!("state of {} bytes", blob.len()));

    // State checking.
    p.start(Phase::StateChecking, "checking the exported state");
    let checked = persist::check(&blob);
    if let Err(e) = checked {
        p.end(false, &e.to_string());
        return rollback(stack, new, format!("state check failed: {e}"));
    }
    p.end(true, "invariants hold");

    // State transfer: the new version imports the state (it writes nothing yet).
    p.start(Phase::StateTransfer, "transferring the state");
    let transferred = new
        .send_blob("state", &blob)
        .map_err(LinkError::from)
        .and_then(|()| new.expect("imported", Instant::now() + STEP_TIMEOUT, abort));
    if let Err(e) = transferred {
        p.end(false, &e.to_string());
        return rollback(
            stack,
            new,
            format!("the new version could not import the state: {e}"),
        );
    }
    p.end(true, "imported");

    // Replacement: commit, the new version reads the queued requests, the old one exits.
    p.start(Phase::Replacement, "committing");
    let committed = new
        .send("commit")
        .map_err(LinkError::from)
        .and_then(|()| new.expect("serving", Instant::now() + STEP_TIMEOUT, abort));
    if let Err(e) = committed {
        p.end(false, &e.to_string());
        return rollback(
            stack,
            new,
            format!("the new version failed to start serving: {e}"),
        );
    }
    let _ = stack.server.send("exit");
    let mut old = std::mem::replace(&mut stack.server, new);
    old.reap(Duration::from_secs(5));
    p.end(
        true,
        &format!(
            "now serving: {} (pid {})",
            stack.server.version,
            stack.server.pid()
        ),
    );
    (
        Outcome::Committed,
        format!("fsd {} -> {}", old.version, stack.server.version),
    )
}

fn outcome_of(e: &LinkError, default: Outcome) -> Outcome {
    match e {
        LinkError::Deadline | LinkError::Aborted => Outcome::Aborted,
        _ => default,
    }
}

/// Makes sure the old server serves: "resume" is answered with "serving" by a server
/// that was holding, or with an error by one that never stopped.
fn resume_old(stack: &mut Stack) -> bool {
    let never = AtomicBool::new(false);
    if stack.server.send("resume").is_err() {
        return false;
    }
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        match stack.server.recv(deadline, &never) {
            Ok(fsd_server::Msg::Line(l))
                if l == "serving" || l.starts_with("error: unexpected command") =>
            {
                return true
            }
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

/// Before commit: the new version goes away, the old one serves again.
fn rollback(
    stack: &mut Stack,
    mut new: crate::component::Component,
    why: String,
) -> (Outcome, String) {
    let _ = new.send("abort");
    new.reap(Duration::from_millis(500));
    if resume_old(stack) {
        (
            Outcome::RolledBack,
            format!("{why}; the old version resumed"),
        )
    } else {
        (
            Outcome::Failed,
            format!("{why}; the old version did not resume"),
        )
    }
}

/// Starts a successor driver (it writes nothing to the ring before its commit).
fn spawn_successor_driver(stack: &Stack, binary: &Path) -> Result<DriverProc, String> {
    spawn_driver(
        &stack.ring,
        &stack.image,
        stack.opts.engine,
        binary,
        StartMode::Adopt,
    )
    .map_err(|e| e.to_string())
}

/// Replaces the block driver: the old one stops taking ring entries and reaps every
/// in-flight completion ("no I/O in progress"); requests wait in the ring meanwhile.
pub(crate) fn update_driver(
    stack: &mut Stack,
    binary: &Path,
    deadline: Duration,
    abort: &AtomicBool,
    p: &mut Phases<'_>,
) -> (Outcome, String) {
    p.start(
        Phase::Notification,
        &format!("starting {}", binary.display()),
    );
    let mut new = match spawn_successor_driver(stack, binary) {
        Ok(d) => d,
        Err(e) => {
            p.end(false, &e);
            return (
                Outcome::Failed,
                format!("could not start the new driver: {e}"),
            );
        }
    };
    p.end(
        true,
        &format!(
            "new driver {} (pid {}), deadline {deadline:?}",
            new.info.version,
            new.child.id()
        ),
    );
    if abort.load(Ordering::SeqCst) {
        let _ = new.ctl.abort();
        new.kill();
        return (Outcome::Aborted, "aborted".into());
    }

    p.start(Phase::Preparation, "draining the ring");
    let blob = match stack.driver.ctl.prepare(deadline) {
        Ok(b) => b,
        Err(e) => {
            let _ = new.ctl.abort();
            new.kill();
            p.end(false, &e.to_string());
            let outcome = if matches!(e, HandoverError::Deadline) {
                Outcome::Aborted
            } else {
                Outcome::Failed
            };
            return (outcome, format!("the running driver did not drain: {e}"));
        }
    };
    p.end(true, &format!("state of {} bytes", blob.as_bytes().len()));

    p.start(Phase::StateChecking, "checking the driver state");
    if let Err(e) = blob.check() {
        p.end(false, &e.to_string());
        return rollback_driver(stack, new, format!("state check failed: {e}"));
    }
    p.end(true, "invariants hold");

    p.start(Phase::StateTransfer, "transferring the driver state");
    if let Err(e) = new
        .ctl
        .send_state(&blob)
        .and_then(|()| new.ctl.wait_imported())
    {
        p.end(false, &e.to_string());
        return rollback_driver(
            stack,
            new,
            format!("the new driver could not import the state: {e}"),
        );
    }
    p.end(true, "imported");

    p.start(Phase::Replacement, "committing");
    if let Err(e) = new.ctl.commit() {
        p.end(false, &e.to_string());
        return rollback_driver(stack, new, format!("the new driver failed to commit: {e}"));
    }
    let _ = stack.driver.ctl.exit();
    let mut old = std::mem::replace(&mut stack.driver, new);
    reap_child(&mut old.child, Duration::from_secs(5));
    p.end(
        true,
        &format!(
            "now serving: {} (pid {})",
            stack.driver.info.version,
            stack.driver.child.id()
        ),
    );
    (
        Outcome::Committed,
        format!(
            "blockdev {} -> {}",
            old.info.version, stack.driver.info.version
        ),
    )
}

fn rollback_driver(stack: &mut Stack, mut new: DriverProc, why: String) -> (Outcome, String) {
    let _ = new.ctl.abort();
    reap_child(&mut new.child, Duration::from_millis(500));
    match stack.driver.ctl.resume() {
        Ok(()) => (
            Outcome::RolledBack,
            format!("{why}; the old driver resumed"),
        ),
        Err(e) => (
            Outcome::Failed,
            format!("{why}; the old driver did not resume: {e}"),
        ),
    }
}

/// Replaces both components in one update (a change to what they share: the ring
/// protocol or the error codes). Both drain, the ring is relabelled while quiet, the new
/// driver commits first, then the new server. Until the server commits, everything
/// rolls back: neither successor has written anything.
pub(crate) fn update_both(
    stack: &mut Stack,
    fsd: &FsdUpdate,
    driver_binary: &Path,
    _interaction: bool,
    abort: &AtomicBool,
    p: &mut Phases<'_>,
) -> (Outcome, String) {
    p.start(Phase::Notification, "starting both new components");
    stack.server.drain_inbox();
    let mut new_driver = match spawn_successor_driver(stack, driver_binary) {
        Ok(d) => d,
        Err(e) => {
            p.end(false, &e);
            return (
                Outcome::Failed,
                format!("could not start the new driver: {e}"),
            );
        }
    };
    let mut new_fsd = match stack.spawn_server(&fsd.binary, true) {
        Ok(c) => c,
        Err(e) => {
            let _ = new_driver.ctl.abort();
            new_driver.kill();
            p.end(false, &e.to_string());
            return (
                Outcome::Failed,
                format!("could not start the new server: {e}"),
            );
        }
    };
    let abandon = |new_fsd: &mut Component, new_driver: &mut DriverProc| {
        let _ = new_fsd.send("abort");
        new_fsd.reap(Duration::from_millis(500));
        let _ = new_driver.ctl.abort();
        reap_child(&mut new_driver.child, Duration::from_millis(500));
    };
    if let Err(e) = new_fsd.expect("spawned", Instant::now() + STEP_TIMEOUT, abort) {
        abandon(&mut new_fsd, &mut new_driver);
        p.end(false, &e.to_string());
        return (
            outcome_of(&e, Outcome::Failed),
            format!("the new server did not start: {e}"),
        );
    }
    let states = if fsd.required_states.is_empty() {
        "quiescent".to_string()
    } else {
        fsd.required_states.join(",")
    };
    p.end(
        true,
        &format!("required state: {states}, deadline {:?}", fsd.deadline),
    );

    // Preparation: the server first (it stops issuing ring requests), then the driver.
    p.start(Phase::Preparation, "draining the server, then the ring");
    let fsd_blob = stack
        .server
        .send(&format!("prepare {} {}", fsd.deadline.as_millis(), states))
        .map_err(LinkError::from)
        .and_then(|()| {
            stack
                .server
                .expect_blob("ready", Instant::now() + fsd.deadline + STEP_TIMEOUT, abort)
        });
    let fsd_blob = match fsd_blob {
        Ok(b) => b,
        Err(e) => {
            abandon(&mut new_fsd, &mut new_driver);
            p.end(false, &e.to_string());
            if matches!(e, LinkError::Deadline | LinkError::Aborted) {
                resume_old(stack);
            }
            return (
                outcome_of(&e, Outcome::Aborted),
                format!("the running server did not reach the required state: {e}"),
            );
        }
    };
    let driver_blob = match stack.driver.ctl.prepare(fsd.deadline) {
        Ok(b) => b,
        Err(e) => {
            abandon(&mut new_fsd, &mut new_driver);
            resume_old(stack);
            p.end(false, &e.to_string());
            return (
                Outcome::Aborted,
                format!("the running driver did not drain: {e}"),
            );
        }
    };
    p.end(
        true,
        &format!(
            "states of {} and {} bytes",
            fsd_blob.len(),
            driver_blob.as_bytes().len()
        ),
    );

    p.start(Phase::StateChecking, "checking both states");
    let checked = persist::check(&fsd_blob)
        .map(|_| ())
        .map_err(|e| e.to_string())
        .and_then(|()| driver_blob.check().map(|_| ()).map_err(|e| e.to_string()));
    if let Err(e) = checked {
        abandon(&mut new_fsd, &mut new_driver);
        let _ = stack.driver.ctl.resume();
        resume_old(stack);
        p.end(false, &e);
        return (
            Outcome::RolledBack,
            format!("state check failed: {e}; the old versions resumed"),
        );
    }
    p.end(true, "invariants hold");

    // State transfer: relabel the quiet ring for what the new versions speak, then import.
    p.start(
        Phase::StateTransfer,
        "relabelling the ring and transferring both states",
    );
    let old_label = (stack.ring.ring.version(), stack.ring.ring.status_table());
    let relabel = |stack: &mut Stack, v: u32, t: u32| -> Result<(), String> {
        stack
            .ring
            .ring
            .set_protocol_version(ProtocolVersion(v))
            .map_err(|e| e.to_string())?;
        stack
            .ring
            .ring
            .set_status_table(StatusTable(t))
            .map_err(|e| e.to_string())
    };
    let transferred = relabel(stack, new_driver.info.ring, new_driver.info.errcodes)
        .and_then(|()| {
            new_driver
                .ctl
                .send_state(&driver_blob)
                .and_then(|()| new_driver.ctl.wait_imported())
                .map_err(|e| e.to_string())
        })
        .and_then(|()| {
            new_fsd
                .send_blob("state", &fsd_blob)
                .map_err(LinkError::from)
                .and_then(|()| new_fsd.expect("imported", Instant::now() + STEP_TIMEOUT, abort))
                .map_err(|e| e.to_string())
        });
    if let Err(e) = transferred {
        abandon(&mut new_fsd, &mut new_driver);
        let _ = relabel(stack, old_label.0 .0, old_label.1 .0);
        let _ = stack.driver.ctl.resume();
        resume_old(stack);
        p.end(false, &e);
        return (
            Outcome::RolledBack,
            format!("state transfer failed: {e}; the old versions resumed"),
        );
    }
    p.end(true, "both imported");

    // Replacement: the driver commits and serves the ring, then the server commits (it
    // connects and reads the image only now), then the old ones exit.
    p.start(Phase::Replacement, "committing the driver, then the server");
    let committed = new_driver
        .ctl
        .commit()
        .map_err(|e| e.to_string())
        .and_then(|()| {
            new_fsd
                .send("commit")
                .map_err(LinkError::from)
                .and_then(|()| new_fsd.expect("serving", Instant::now() + STEP_TIMEOUT, abort))
                .map_err(|e| e.to_string())
        });
    if let Err(e) = committed {
        // The new driver may already serve: stop it cleanly before the old one resumes.
        let _ = new_fsd.send("abort");
        new_fsd.kill();
        let _ = new_driver.ctl.prepare(Duration::from_secs(5));
        let _ = new_driver.ctl.exit();
        reap_child(&mut new_driver.child, Duration::from_secs(2));
        let _ = relabel(stack, old_label.0 .0, old_label.1 .0);
        let _ = stack.driver.ctl.resume();
        resume_old(stack);
        p.end(false, &e);
        return (
            Outcome::RolledBack,
            format!("the new versions failed to start: {e}; the old versions resumed"),
        );
    }
    let _ = stack.server.send("exit");
    let _ = stack.driver.ctl.exit();
    let mut old_fsd = std::mem::replace(&mut stack.server, new_fsd);
    let mut old_driver = std::mem::replace(&mut stack.driver, new_driver);
    old_fsd.reap(Duration::from_secs(5));
    reap_child(&mut old_driver.child, Duration::from_secs(5));
    p.end(
        true,
        &format!(
            "now serving: fsd {} and blockdev {}",
            stack.server.version, stack.driver.info.version
        ),
    );
    (
        Outcome::Committed,
        format!(
            "fsd {} -> {}, blockdev {} -> {}",
            old_fsd.version,
            stack.server.version,
            old_driver.info.version,
            stack.driver.info.version
        ),
    )
}

/// Sends one command to the filesystem server and returns its one-line answer.
pub(crate) fn server_request(stack: &mut Stack, line: &str, within: Duration) -> Option<String> {
    let never = AtomicBool::new(false);
    stack.server.drain_inbox();
    stack.server.send(line).ok()?;
    // A reply that starts with "status " must reach this caller, not be skipped.
    stack.server.want_status = true;
    let reply = stack.server.recv(Instant::now() + within, &never);
    stack.server.want_status = false;
    match reply {
        Ok(fsd_server::Msg::Line(l)) => Some(l),
        _ => None,
    }
}

/// The numeric `key=value` fields of a control line.
pub(crate) fn numeric_fields(line: &str) -> Vec<(String, u64)> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| v.parse::<u64>().ok().map(|n| (k.to_string(), n)))
        .collect()
}

/// The value of field `key` among `fields`.
pub(crate) fn field(fields: &[(String, u64)], key: &str) -> Option<u64> {
    fields.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
}

/// Counters of the filesystem server, asked over its control link.
pub(crate) fn server_status(stack: &mut Stack) -> Vec<(String, u64)> {
    match server_request(stack, "status", Duration::from_secs(2)) {
        Some(l) if l.starts_with("status ") => numeric_fields(&l),
        _ => Vec::new(),
    }
}

/// Counters of the block driver.
pub(crate) fn driver_status(stack: &mut Stack) -> Vec<(String, u64)> {
    match stack.driver.ctl.status() {
        Ok(st) => {
            st.0.iter()
                .filter_map(|(k, v)| v.parse::<u64>().ok().map(|n| (k.clone(), n)))
                .collect()
        }
        Err(_) => Vec::new(),
    }
}
