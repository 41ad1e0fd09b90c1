//! The update manager's side of the cooperative update: one named function per phase,
//! the same for every update, over the components it replaces. Each kind of component
//! (the filesystem server, the block driver) implements [`Replaceable`]: how its
//! successor starts and how its exported state is checked. An update of both is the same
//! code as an update of one.
//!
//! Until the commit, the running components keep their state and resume on any failure
//! (deadline, crash or refusal of a successor, failed state check); the workload sees
//! only a pause. Order: the server prepares first (it stops issuing ring requests), then
//! the driver drains; the driver commits first (it serves the ring), then the server.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use blockdev::handover::StateBlob;
use blockdev::ring::{ProtocolVersion, StatusTable};
use blockdev::spawn::StartMode;
use molt_control::{Command, ControlError, Reply, RequiredState};

use crate::component::{ComponentProc, ExchangeError};
use crate::stack::{start_driver, Stack};

use updater::protocol::{Outcome, Phase, PhaseState};

/// Time a component may take for a step that does not depend on the workload.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// One step reported while an update runs.
#[derive(Debug, Clone)]
pub(crate) struct PhaseEvent {
    pub phase: Phase,
    pub state: PhaseState,
    pub elapsed: Duration,
    pub detail: String,
}

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

    fn start(&mut self, phase: Phase, detail: &str) {
        self.current = Some((phase, Instant::now()));
        (self.report)(PhaseEvent {
            phase,
            state: PhaseState::Started,
            elapsed: Duration::ZERO,
            detail: detail.into(),
        });
    }

    fn end(&mut self, ok: bool, detail: &str) {
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

/// What the phases need to know of a kind of component.
pub(crate) trait Replaceable {
    /// "fsd" or "blockdev", as packages and `updater status` name it.
    fn name(&self) -> &'static str;
    /// How messages name the running one ("server", "driver").
    fn noun(&self) -> &'static str;
    fn running<'s>(&self, stack: &'s mut Stack) -> &'s mut ComponentProc;
    /// Starts a successor that takes nothing over before its commit.
    fn spawn_successor(&self, stack: &Stack, binary: &Path) -> Result<ComponentProc, String>;
    /// The state checking phase: the exported state decodes and its invariants hold.
    fn check_state(&self, blob: &[u8]) -> Result<(), String>;
}

/// The filesystem server (`fsd serve`).
pub(crate) struct FsServer;
/// The block driver (`blockdev serve`).
pub(crate) struct BlockDriver;

impl Replaceable for FsServer {
    fn name(&self) -> &'static str {
        "fsd"
    }

    fn noun(&self) -> &'static str {
        "server"
    }

    fn running<'s>(&self, stack: &'s mut Stack) -> &'s mut ComponentProc {
        &mut stack.server
    }

    fn spawn_successor(&self, stack: &Stack, binary: &Path) -> Result<ComponentProc, String> {
        stack.start_server(binary, true).map_err(|e| e.to_string())
    }

    fn check_state(&self, blob: &[u8]) -> Result<(), String> {
        fsd_server::persist::check(blob)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

impl Replaceable for BlockDriver {
    fn name(&self) -> &'static str {
        "blockdev"
    }

    fn noun(&self) -> &'static str {
        "driver"
    }

    fn running<'s>(&self, stack: &'s mut Stack) -> &'s mut ComponentProc {
        &mut stack.driver
    }

    fn spawn_successor(&self, stack: &Stack, binary: &Path) -> Result<ComponentProc, String> {
        start_driver(
            &stack.ring,
            &stack.image,
            stack.opts.engine,
            binary,
            StartMode::Adopt,
            &crate::runtime::dir_for(&stack.mnt),
        )
        .map_err(|e| e.to_string())
    }

    fn check_state(&self, blob: &[u8]) -> Result<(), String> {
        StateBlob::from_bytes(blob.to_vec())
            .check()
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// One component to replace, and how far its replacement got.
pub(crate) struct Replacement {
    kind: &'static dyn Replaceable,
    binary: PathBuf,
    successor: Option<ComponentProc>,
    /// The running one's exported state: it is prepared (holding) once this is set.
    state: Option<Vec<u8>>,
    committed: bool,
}

impl Replacement {
    pub(crate) fn of_server(binary: PathBuf) -> Replacement {
        Replacement::new(&FsServer, binary)
    }

    pub(crate) fn of_driver(binary: PathBuf) -> Replacement {
        Replacement::new(&BlockDriver, binary)
    }

    fn new(kind: &'static dyn Replaceable, binary: PathBuf) -> Replacement {
        Replacement {
            kind,
            binary,
            successor: None,
            state: None,
            committed: false,
        }
    }

    fn successor(&mut self) -> &mut ComponentProc {
        self.successor
            .as_mut()
            .expect("a successor runs from the notification on")
    }
}

/// An update: what to replace, by when the running versions must be prepared, and the
/// states they must reach first.
pub(crate) struct Update {
    /// Server before driver (the preparation order).
    pub(crate) replacements: Vec<Replacement>,
    pub(crate) deadline: Duration,
    pub(crate) required: Vec<RequiredState>,
}

/// Why an update stopped before its commit, and how it ends.
struct Stop {
    outcome: Outcome,
    why: String,
}

fn stop(outcome: Outcome, why: String) -> Stop {
    Stop { outcome, why }
}

/// An exchange failed: a deadline or an abort ends the update as aborted.
fn outcome_of(e: &ExchangeError, otherwise: Outcome) -> Outcome {
    match e {
        ExchangeError::Deadline
        | ExchangeError::Aborted
        | ExchangeError::Said(ControlError::Deadline(_)) => Outcome::Aborted,
        _ => otherwise,
    }
}

/// Runs the update's phases. Returns the outcome and a message.
pub(crate) fn run(
    stack: &mut Stack,
    mut u: Update,
    abort: &AtomicBool,
    p: &mut Phases<'_>,
) -> (Outcome, String) {
    let relabel = stack_ring_label(stack);
    let result = notification(stack, &mut u, abort, p)
        .and_then(|()| preparation(stack, &mut u, abort, p))
        .and_then(|()| state_checking(&u, p))
        .and_then(|()| state_transfer(stack, &mut u, abort, p))
        .and_then(|()| replacement(stack, &mut u, abort, p));
    match result {
        Ok(message) => (Outcome::Committed, message),
        Err(s) => {
            let resumed = roll_back(stack, &mut u, relabel);
            match (s.outcome, resumed) {
                (Outcome::RolledBack, true) => (
                    Outcome::RolledBack,
                    format!("{}; the old version resumed", s.why),
                ),
                (Outcome::RolledBack, false) => (
                    Outcome::Failed,
                    format!("{}; the old version did not resume", s.why),
                ),
                (outcome, _) => (outcome, s.why),
            }
        }
    }
}

/// Notification: each successor starts next to the running version (the server's FUSE
/// session is set up while the old one still answers) and says it is ready for a state.
fn notification(
    stack: &mut Stack,
    u: &mut Update,
    abort: &AtomicBool,
    p: &mut Phases<'_>,
) -> Result<(), Stop> {
    let names: Vec<String> = u
        .replacements
        .iter()
        .map(|r| r.binary.display().to_string())
        .collect();
    p.start(
        Phase::Notification,
        &format!("starting {}", names.join(", ")),
    );
    for r in &mut u.replacements {
        r.kind.running(stack).drain_inbox();
        let mut new = match r.kind.spawn_successor(stack, &r.binary) {
            Ok(c) => c,
            Err(e) => {
                p.end(false, &e);
                return Err(stop(
                    Outcome::Failed,
                    format!("could not start the new {}: {e}", r.kind.noun()),
                ));
            }
        };
        // The server's successor says when it has started. The driver's answers commands
        // once it has mapped the ring: its first answer is waited for, so that state
        // transfer relabels the ring only after the successor has read the label its
        // predecessor's state is taken under (a successor that mapped a relabelled ring
        // would refuse that state).
        let started = if r.kind.name() == "fsd" {
            new.expect(&Reply::Spawned, Instant::now() + STEP_TIMEOUT, abort)
        } else if abort.load(std::sync::atomic::Ordering::SeqCst) {
            Err(ExchangeError::Aborted)
        } else {
            match new.request(&Command::Status, STEP_TIMEOUT) {
                Ok(Reply::Status(_)) => Ok(()),
                Ok(other) => Err(ExchangeError::Unexpected(format!("{other:?}"))),
                Err(e) => Err(e),
            }
        };
        r.successor = Some(new);
        if let Err(e) = started {
            p.end(false, &e.to_string());
            return Err(stop(
                outcome_of(&e, Outcome::Failed),
                format!("the new {} did not start: {e}", r.kind.noun()),
            ));
        }
    }
    let states = required_states(&u.required);
    p.end(
        true,
        &format!("required state: {states}, deadline {:?}", u.deadline),
    );
    Ok(())
}

fn required_states(required: &[RequiredState]) -> String {
    if required.is_empty() {
        return RequiredState::Quiescent.to_string();
    }
    required
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Preparation: each running version converges to the required states, drains and
/// exports its state (the server first: it stops issuing ring requests).
fn preparation(
    stack: &mut Stack,
    u: &mut Update,
    abort: &AtomicBool,
    p: &mut Phases<'_>,
) -> Result<(), Stop> {
    p.start(Phase::Preparation, "converging and draining");
    let prepare = Command::Prepare {
        deadline_ms: u.deadline.as_millis() as u64,
        required: u.required.clone(),
    };
    let mut sizes = Vec::new();
    for r in &mut u.replacements {
        let running = r.kind.running(stack);
        let exported = running
            .send(&prepare)
            .and_then(|()| running.expect_ready(Instant::now() + u.deadline + STEP_TIMEOUT, abort));
        match exported {
            Ok(blob) => {
                sizes.push(blob.len().to_string());
                r.state = Some(blob);
            }
            Err(e) => {
                p.end(false, &e.to_string());
                if matches!(e, ExchangeError::Deadline | ExchangeError::Aborted) {
                    // It may finish draining late and hold: it is resumed like the others.
                    r.state = Some(Vec::new());
                }
                return Err(stop(
                    Outcome::Aborted,
                    format!(
                        "the running {} did not reach the required state: {e}",
                        r.kind.noun()
                    ),
                ));
            }
        }
    }
    p.end(true, &format!("state of {} bytes", sizes.join(" and ")));
    Ok(())
}

/// State checking: every exported state decodes and its invariants hold.
fn state_checking(u: &Update, p: &mut Phases<'_>) -> Result<(), Stop> {
    p.start(Phase::StateChecking, "checking the exported state");
    for r in &u.replacements {
        let blob = r.state.as_deref().unwrap_or_default();
        if let Err(e) = r.kind.check_state(blob) {
            p.end(false, &e);
            return Err(stop(
                Outcome::RolledBack,
                format!("state check failed: {e}"),
            ));
        }
    }
    p.end(true, "invariants hold");
    Ok(())
}

/// The ring's protocol version and error-code table, to restore on a rollback.
type RingLabel = (u32, u32);

fn stack_ring_label(stack: &Stack) -> RingLabel {
    (
        stack.ring.ring.version().0,
        stack.ring.ring.status_table().0,
    )
}

/// Relabels the ring (it must be quiet: both sides prepared). A label it already has is
/// left alone, so a driver-only update never needs a quiet ring.
fn set_ring_label(stack: &mut Stack, label: RingLabel) -> Result<(), String> {
    if stack_ring_label(stack) == label {
        return Ok(());
    }
    let (version, table) = label;
    stack
        .ring
        .ring
        .set_protocol_version(ProtocolVersion(version))
        .map_err(|e| e.to_string())?;
    stack
        .ring
        .ring
        .set_status_table(StatusTable(table))
        .map_err(|e| e.to_string())
}

/// State transfer: the quiet ring is relabelled for what a new driver speaks, then each
/// successor imports its predecessor's state (writing nothing yet).
fn state_transfer(
    stack: &mut Stack,
    u: &mut Update,
    abort: &AtomicBool,
    p: &mut Phases<'_>,
) -> Result<(), Stop> {
    p.start(Phase::StateTransfer, "transferring the state");
    for r in &mut u.replacements {
        if r.kind.name() == "blockdev" {
            let info = &r.successor().info;
            if let Err(e) = set_ring_label(stack, (info.ring, info.errcodes)) {
                p.end(false, &e);
                return Err(stop(
                    Outcome::RolledBack,
                    format!("relabelling the ring: {e}"),
                ));
            }
        }
    }
    for r in &mut u.replacements {
        let blob = r.state.clone().unwrap_or_default();
        let kind = r.kind;
        let new = r.successor();
        let imported = new
            .send(&Command::State(blob))
            .and_then(|()| new.expect(&Reply::Imported, Instant::now() + STEP_TIMEOUT, abort));
        if let Err(e) = imported {
            p.end(false, &e.to_string());
            return Err(stop(
                Outcome::RolledBack,
                format!("the new {} could not import the state: {e}", kind.noun()),
            ));
        }
    }
    p.end(true, "imported");
    Ok(())
}

/// Replacement: each successor commits (the driver first), then the running versions
/// exit and the successors are the stack's.
fn replacement(
    stack: &mut Stack,
    u: &mut Update,
    abort: &AtomicBool,
    p: &mut Phases<'_>,
) -> Result<String, Stop> {
    p.start(Phase::Replacement, "committing");
    for r in u.replacements.iter_mut().rev() {
        let kind = r.kind;
        let new = r.successor();
        let committed = new
            .send(&Command::Commit)
            .and_then(|()| new.expect(&Reply::Serving, Instant::now() + STEP_TIMEOUT, abort));
        if let Err(e) = committed {
            p.end(false, &e.to_string());
            return Err(stop(
                Outcome::RolledBack,
                format!("the new {} failed to start serving: {e}", kind.noun()),
            ));
        }
        r.committed = true;
    }
    let mut changes = Vec::new();
    let mut serving = Vec::new();
    for r in &mut u.replacements {
        let new = r.successor.take().expect("committed");
        let running = r.kind.running(stack);
        let _ = running.send(&Command::Exit);
        let mut old = std::mem::replace(running, new);
        old.reap(Duration::from_secs(5));
        let now = r.kind.running(stack);
        changes.push(format!(
            "{} {} -> {}",
            r.kind.name(),
            old.info.version,
            now.info.version
        ));
        serving.push(format!(
            "{} {} (pid {})",
            r.kind.name(),
            now.info.version,
            now.pid()
        ));
    }
    p.end(true, &format!("now serving: {}", serving.join(" and ")));
    Ok(changes.join(", "))
}

/// Before the commit: the successors go away, the ring gets its old label back, and the
/// running versions serve again. Returns whether every one of them does.
fn roll_back(stack: &mut Stack, u: &mut Update, label: RingLabel) -> bool {
    for r in u.replacements.iter_mut().rev() {
        let Some(mut new) = r.successor.take() else {
            continue;
        };
        if r.committed {
            // A committed driver serves the ring: stop it cleanly first.
            let never = AtomicBool::new(false);
            let prepare = Command::Prepare {
                deadline_ms: 5000,
                required: Vec::new(),
            };
            let _ = new
                .send(&prepare)
                .and_then(|()| new.expect_ready(Instant::now() + STEP_TIMEOUT, &never));
            let _ = new.send(&Command::Exit);
            new.reap(Duration::from_secs(2));
        } else {
            let _ = new.send(&Command::Abort);
            new.reap(Duration::from_millis(500));
        }
    }
    let _ = set_ring_label(stack, label);
    let mut all = true;
    for r in u.replacements.iter().rev() {
        if r.state.is_some() {
            all &= resume(r.kind.running(stack));
        }
    }
    all
}

/// Makes sure a running version serves: a holding one answers `Resume` with `Serving`;
/// one that never stopped answers that the command was unexpected.
fn resume(c: &mut ComponentProc) -> bool {
    let never = AtomicBool::new(false);
    if c.send(&Command::Resume).is_err() {
        return false;
    }
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        match c.recv(deadline, &never) {
            Ok(Reply::Serving) | Err(ExchangeError::Said(ControlError::Unexpected(_))) => {
                return true
            }
            Ok(_) | Err(ExchangeError::Said(_)) => continue,
            Err(_) => return false,
        }
    }
}
