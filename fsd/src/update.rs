//! The update manager: replaces a running component with a new version following the
//! cooperative model's phases. Until the commit, the old component keeps its state and
//! resumes on any failure (deadline, crash or refusal of the new one, failed state
//! check); the workload sees only a pause.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::component::LinkError;
use crate::persist::FsdStateV1;
use crate::supervisor::Stack;

/// The phases of a live update, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Initialization,
    Notification,
    Preparation,
    StateChecking,
    StateTransfer,
    Replacement,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseState {
    Started,
    Finished,
    Failed,
}

/// How an update ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    Refused,
    /// The deadline passed or an abort was asked before the required state was reached.
    Aborted,
    /// A later failure; the old version resumed.
    RolledBack,
    Failed,
}

/// One step reported while an update runs.
#[derive(Debug, Clone)]
pub struct PhaseEvent {
    pub phase: Phase,
    pub state: PhaseState,
    pub elapsed: Duration,
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct UpdateRecord {
    pub package: String,
    pub sequence: u64,
    pub nature: String,
    pub started_unix: i64,
    pub phases: Vec<(Phase, Duration, PhaseState)>,
    pub outcome: Outcome,
    pub message: String,
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
struct Phases<'a> {
    report: &'a mut dyn FnMut(PhaseEvent),
    record: Vec<(Phase, Duration, PhaseState)>,
    current: Option<(Phase, Instant)>,
}

impl Phases<'_> {
    fn start(&mut self, phase: Phase, detail: &str) {
        self.current = Some((phase, Instant::now()));
        (self.report)(PhaseEvent { phase, state: PhaseState::Started, elapsed: Duration::ZERO, detail: detail.into() });
    }

    fn end(&mut self, ok: bool, detail: &str) {
        if let Some((phase, t)) = self.current.take() {
            let state = if ok { PhaseState::Finished } else { PhaseState::Failed };
            let elapsed = t.elapsed();
            self.record.push((phase, elapsed, state));
            (self.report)(PhaseEvent { phase, state, elapsed, detail: detail.into() });
        }
    }
}

/// Replaces the filesystem server. Returns the outcome and a message.
pub fn update_fsd(
    stack: &mut Stack,
    u: &FsdUpdate,
    abort: &AtomicBool,
    report: &mut dyn FnMut(PhaseEvent),
) -> (Outcome, String, Vec<(Phase, Duration, PhaseState)>) {
    let mut p = Phases { report, record: Vec::new(), current: None };
    let (outcome, msg) = run_fsd_update(stack, u, abort, &mut p);
    (outcome, msg, p.record)
}

fn run_fsd_update(stack: &mut Stack, u: &FsdUpdate, abort: &AtomicBool, p: &mut Phases<'_>) -> (Outcome, String) {
    // Notification: the successor starts next to the running server (its FUSE session is
    // set up while the old one still answers), then the old one is told what state to reach.
    p.start(Phase::Notification, &format!("starting {}", u.binary.display()));
    let mut new = match stack.spawn_server(&u.binary, true) {
        Ok(c) => c,
        Err(e) => {
            p.end(false, &e.to_string());
            return (Outcome::Failed, format!("could not start the new version: {e}"));
        }
    };
    if let Err(e) = new.expect("spawned", Instant::now() + STEP_TIMEOUT, abort) {
        new.kill();
        p.end(false, &e.to_string());
        return (outcome_of(&e, Outcome::Failed), format!("the new version did not start: {e}"));
    }
    let states = if u.required_states.is_empty() { "quiescent".to_string() } else { u.required_states.join(",") };
    if let Err(e) = stack.server.send(&format!("prepare {} {}", u.deadline.as_millis(), states)) {
        new.kill();
        p.end(false, &e.to_string());
        return (Outcome::Failed, format!("could not notify the running version: {e}"));
    }
    p.end(true, &format!("required state: {states}, deadline {:?}", u.deadline));

    // Preparation: the old server converges, drains and exports its state.
    p.start(Phase::Preparation, "converging and draining");
    let blob = match stack.server.expect_blob("ready", Instant::now() + u.deadline + STEP_TIMEOUT, abort) {
        Ok(b) => b,
        Err(e) => {
            new.send("abort").ok();
            new.reap(Duration::from_secs(5));
            p.end(false, &e.to_string());
            if matches!(e, LinkError::Deadline | LinkError::Aborted) {
                // The old server may have finished draining late and be holding.
                resume_old(stack);
            }
            return (outcome_of(&e, Outcome::Aborted), format!("the running version did not reach the required state: {e}"));
        }
    };
    p.end(true, &format!("state of {} bytes", blob.len()));

    // State checking.
    p.start(Phase::StateChecking, "checking the exported state");
    let checked = FsdStateV1::decode(&blob);
    if let Err(e) = checked {
        p.end(false, &e.to_string());
        return rollback(stack, new, format!("state check failed: {e}"));
    }
    p.end(true, "invariants hold");

    // State transfer: the new version imports the state (it writes nothing yet).
    p.start(Phase::StateTransfer, "transferring the state");
    let transferred =
        new.send_blob("state", &blob).map_err(LinkError::from).and_then(|()| new.expect("imported", Instant::now() + STEP_TIMEOUT, abort));
    if let Err(e) = transferred {
        p.end(false, &e.to_string());
        return rollback(stack, new, format!("the new version could not import the state: {e}"));
    }
    p.end(true, "imported");

    // Replacement: commit, the new version reads the queued requests, the old one exits.
    p.start(Phase::Replacement, "committing");
    let committed = new.send("commit").map_err(LinkError::from).and_then(|()| new.expect("serving", Instant::now() + STEP_TIMEOUT, abort));
    if let Err(e) = committed {
        p.end(false, &e.to_string());
        return rollback(stack, new, format!("the new version failed to start serving: {e}"));
    }
    let _ = stack.server.send("exit");
    let mut old = std::mem::replace(&mut stack.server, new);
    old.reap(Duration::from_secs(5));
    p.end(true, &format!("now serving: {} (pid {})", stack.server.version, stack.server.pid()));
    (Outcome::Committed, format!("fsd {} -> {}", old.version, stack.server.version))
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
            Ok(crate::control::Msg::Line(l)) if l == "serving" || l.starts_with("error: unexpected command") => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

/// Before commit: the new version goes away, the old one serves again.
fn rollback(stack: &mut Stack, mut new: crate::component::Component, why: String) -> (Outcome, String) {
    let _ = new.send("abort");
    new.reap(Duration::from_millis(500));
    if resume_old(stack) {
        (Outcome::RolledBack, format!("{why}; the old version resumed"))
    } else {
        (Outcome::Failed, format!("{why}; the old version did not resume"))
    }
}

/// Placeholder until the control protocol lands.
pub fn start_control_socket(_stack: &Arc<Mutex<Stack>>, _mnt: &Path) -> std::io::Result<()> {
    Ok(())
}
