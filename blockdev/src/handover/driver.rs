//! The driver's end of the control channel.
//!
//! A controlled driver runs its serve loop on the calling thread and answers the control
//! socket from a second thread. `prepare` asks the loop to drain (a cancellable stop); the
//! control thread waits for the drained state until the deadline and, if it has not come,
//! cancels the prepare: the loop then serves on. Cancel and drain race through one
//! compare-and-swap in [`crate::server::StopHandle`], so exactly one of `ready` and
//! `error: deadline` is ever sent.
//!
//! A driver started with `--adopt` on a ring whose driver died while serving takes the
//! ring over at once (no `state`, no `commit`: there is no predecessor to drain) and
//! serves as [`serve_controlled`] does; `status` then says `phase=serving`.
//!
//! A serving driver outlives its supervisor: when the control link ends it serves on, and
//! if it held for an update it serves again by itself (the update is abandoned) — unless
//! another driver attached to the ring meanwhile (the supervisor committed a successor and
//! died before its `exit`): then it ends as told to exit. With a [`Relink`] socket the next
//! trusted connection on it becomes the control link. A successor that loses its
//! supervisor before `commit` ends without touching the ring (its predecessor serves on).

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use molt_control::{Command, ControlError, Link, LinkError, Relink, Reply, ServingPhase};

use super::StateBlob;
use crate::persist::{
    Counters, DriverState, StateError, StateVersion, StopReason, COMPONENT_VERSION, STATE_CAP,
};
use crate::ring::{ProtocolVersion, RingRegion, Status, StatusTable};
use crate::server::{DriverError, Server, StopHandle};

/// How a controlled driver ended.
#[derive(Debug)]
pub enum DriverExit {
    /// A stop was requested (signal) or the client exited.
    Stopped(DriverState),
    /// The client broke the ring protocol.
    Violation(DriverState),
    /// Told to `exit` after `ready`, or, holding when the supervisor went away, found that
    /// a successor had attached: a successor serves (or will) the ring.
    HandedOver,
    /// Told to `abort` before commit: the ring was never touched.
    Aborted,
    /// The successor refused the state (`error: …` was sent); the ring was never touched.
    ImportFailed(String),
    /// The supervisor closed the control channel before commit (a successor: its
    /// predecessor serves on), or while this driver held and could not serve again, with
    /// no relink socket to hear from another. It leaves the ring alone.
    SupervisorGone,
}

impl DriverExit {
    /// The process exit status: 0 clean, 1 refused import or lost supervisor, 3 protocol
    /// violation by the client.
    pub fn code(&self) -> i32 {
        match self {
            DriverExit::Stopped(_) | DriverExit::HandedOver | DriverExit::Aborted => 0,
            DriverExit::ImportFailed(_) | DriverExit::SupervisorGone => 1,
            DriverExit::Violation(_) => 3,
        }
    }
}

// What the control thread reports in `status`.
const PHASE_SERVING: u8 = 0;
const PHASE_DRAINING: u8 = 1;
const PHASE_HELD: u8 = 2;

fn serving_phase(p: u8) -> ServingPhase {
    match p {
        PHASE_SERVING => ServingPhase::Serving,
        PHASE_DRAINING => ServingPhase::Draining,
        _ => ServingPhase::Held,
    }
}

/// The `status` reply: the driver's identity and its counters, by name.
// The casts widen the counters of the variant built with 32-bit ones.
#[allow(clippy::unnecessary_cast)]
fn status_reply(
    phase: ServingPhase,
    c: &Counters,
    latched: i32,
    positions: (u32, u32),
    epoch: u32,
) -> Reply {
    let counters = [
        ("reads", c.reads as u64),
        ("writes", c.writes as u64),
        ("flushes", c.flushes as u64),
        ("discards", c.discards as u64),
        ("bytes_read", c.bytes_read as u64),
        ("bytes_written", c.bytes_written as u64),
        ("errors", c.errors as u64),
        ("in_flight", c.in_flight as u64),
        ("latched", latched as u64),
        ("sq_head", positions.0 as u64),
        ("cq_tail", positions.1 as u64),
        ("epoch", epoch as u64),
        ("ring", ProtocolVersion::CURRENT.0 as u64),
        ("errcodes", StatusTable::CURRENT.0 as u64),
    ];
    Reply::Status(molt_control::Status {
        phase,
        pid: std::process::id(),
        version: COMPONENT_VERSION.to_string(),
        state_schema: StateVersion::CURRENT.0,
        counters: counters.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        format: None,
        conversion: None,
        last_conversion: None,
        fuse: None,
    })
}

/// Sends one reply. A supervisor that went away notices by itself; the driver keeps its
/// own course.
fn send(w: &mut Link, reply: Reply) {
    let _ = w.send(&reply);
}

fn refuse(w: &mut Link, e: ControlError) {
    send(w, Reply::Error(e));
}

/// The next command; `None` when the supervisor is gone. A frame that is well formed but
/// not a command is answered with an error and skipped.
fn next_command(r: &mut Link, w: &mut Link) -> Option<Command> {
    loop {
        match r.recv::<Command>() {
            Ok(c) => return Some(c),
            Err(LinkError::Malformed(m)) => refuse(w, ControlError::Failed(m)),
            Err(_) => return None,
        }
    }
}

/// Main thread → control thread.
enum Event {
    /// The loop drained for a prepare: the exported state, or why it could not be.
    Drained(Result<StateBlob, String>),
    /// Answer to `resume`.
    Resumed(Result<(), String>),
}

/// Control thread → main thread, while it holds.
enum Hold {
    Resume,
    Exit,
    /// The control link ended: serve again unless a successor attached. Answered with
    /// [`Event::Resumed`] when it serves (or could not), not at all when it ends.
    SupervisorGone,
}

/// How long a driver that held when its supervisor went away waits before it looks for a
/// successor in the ring header: a successor told to commit just before the supervisor
/// died attaches within this time unless it is starved of CPU. (Nothing closes that race
/// entirely short of the supervisor surviving.)
const SUCCESSOR_SETTLE: Duration = Duration::from_millis(200);

/// Serves the ring and answers the control socket until the driver should exit. The
/// server may be attached already ([`Server::new`]) or not (it attaches when it starts).
/// With `relink`, a new supervisor can connect there once the control link ends.
pub fn serve_controlled(
    server: Server,
    ctl: UnixStream,
    relink: Option<Relink>,
) -> Result<DriverExit, DriverError> {
    let writer = Link::new(ctl, STATE_CAP);
    let reader = writer.try_clone()?;
    serve_with(server, reader, writer, relink)
}

/// A successor: waits for `state`, imports it, waits for `commit`, then attaches and
/// serves as [`serve_controlled`] does. Nothing is written to the ring before `commit`.
/// `server` must come from [`Server::adopt`].
///
/// Except when the ring's driver died while serving ([`Server::crashed_predecessor`],
/// checked once, now): then it takes the ring over at once and serves.
///
/// `relink` is used only once this driver serves: before `commit` a lost supervisor ends
/// it ([`DriverExit::SupervisorGone`]).
pub fn adopt_controlled(
    mut server: Server,
    ctl: UnixStream,
    relink: Option<Relink>,
) -> Result<DriverExit, DriverError> {
    let mut writer = Link::new(ctl, STATE_CAP);
    let mut reader = writer.try_clone()?;
    if let Some(dead) = server.crashed_predecessor() {
        server.take_over_crashed()?;
        molt_sys::errln!(
            "blockdev: driver {} died while {:?} with {} requests in flight; took the ring \
             over as driver epoch {}",
            dead.pid,
            dead.phase,
            dead.in_flight,
            server.epoch()
        );
        return serve_with(server, reader, writer, relink);
    }
    let mut imported: Option<DriverState> = None;
    loop {
        let Some(cmd) = next_command(&mut reader, &mut writer) else {
            return Ok(DriverExit::SupervisorGone);
        };
        match cmd {
            Command::Status => {
                let (phase, c, latched, pos) = match &imported {
                    Some(s) => (
                        ServingPhase::Imported,
                        s.counters,
                        s.latched.map_or(0, Status::code),
                        (s.sq_head, s.cq_tail),
                    ),
                    None => (ServingPhase::Adopting, Counters::default(), 0, (0, 0)),
                };
                send(
                    &mut writer,
                    status_reply(phase, &c, latched, pos, server.epoch()),
                );
            }
            Command::State(bytes) if imported.is_none() => {
                let result =
                    DriverState::import(&bytes).and_then(|s| server.import_state(&s).map(|()| s));
                match result {
                    Ok(s) => {
                        imported = Some(s);
                        send(&mut writer, Reply::Imported);
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        refuse(
                            &mut writer,
                            match e {
                                StateError::UnsupportedSchema(n) => {
                                    ControlError::UnsupportedSchema(n)
                                }
                                other => ControlError::StateRefused(other.to_string()),
                            },
                        );
                        return Ok(DriverExit::ImportFailed(msg));
                    }
                }
            }
            Command::Commit if imported.is_some() => {
                if let Err(e) = server.attach() {
                    refuse(&mut writer, ControlError::Failed(e.to_string()));
                    return Ok(DriverExit::ImportFailed(e.to_string()));
                }
                send(&mut writer, Reply::Serving);
                return serve_with(server, reader, writer, relink);
            }
            Command::Abort => return Ok(DriverExit::Aborted),
            other => refuse(
                &mut writer,
                ControlError::Unexpected(format!("{other:?} while adopting")),
            ),
        }
    }
}

fn serve_with(
    mut server: Server,
    reader: Link,
    writer: Link,
    relink: Option<Relink>,
) -> Result<DriverExit, DriverError> {
    let (event_tx, event_rx) = mpsc::channel::<Event>();
    let (cmd_tx, cmd_rx) = mpsc::channel::<Hold>();
    let phase = Arc::new(AtomicU8::new(PHASE_SERVING));
    let view = server.ring_view()?;
    let stop = server.stop_handle();
    let ctl_phase = phase.clone();
    thread::Builder::new()
        .name("blockdev-ctl".into())
        .spawn(move || {
            control_thread(
                reader, writer, relink, view, stop, ctl_phase, event_rx, cmd_tx,
            )
        })?;
    let mut state = server.run()?;
    loop {
        match state.reason {
            StopReason::Prepare => {}
            StopReason::ProtocolViolation(_) => return Ok(DriverExit::Violation(state)),
            StopReason::Requested | StopReason::ClientGone => {
                return Ok(DriverExit::Stopped(state))
            }
        }
        let blob = server
            .export_state()
            .map(StateBlob::from_bytes)
            .map_err(|e| e.to_string());
        let exported = blob.is_ok();
        if !exported {
            server.clear_prepare();
        }
        let _ = event_tx.send(Event::Drained(blob));
        if exported {
            // Hold until told; the ring is not touched meanwhile.
            loop {
                match cmd_rx.recv() {
                    Ok(Hold::Resume) => {}
                    Ok(Hold::Exit) => return Ok(DriverExit::HandedOver),
                    Ok(Hold::SupervisorGone) => {
                        // The update is abandoned, unless it went as far as a successor's
                        // commit: two drivers must never serve one ring.
                        thread::sleep(SUCCESSOR_SETTLE);
                        if server.superseded() {
                            molt_sys::errln!(
                                "blockdev: supervisor gone while held, and driver {} serves \
                                 the ring: leaving it alone",
                                server.ring_driver_pid()
                            );
                            return Ok(DriverExit::HandedOver);
                        }
                        molt_sys::errln!("blockdev: supervisor gone while held; serving again");
                    }
                    // Nobody is left to tell this driver anything (the control thread ended
                    // after a lost supervisor and a failed resume).
                    Err(_) => return Ok(DriverExit::SupervisorGone),
                }
                let ok = server.check_can_resume().map_err(|e| e.to_string());
                let resumed = ok.is_ok();
                if resumed {
                    server.clear_prepare();
                }
                let _ = event_tx.send(Event::Resumed(ok));
                if resumed {
                    break;
                }
            }
        }
        state = server.run()?;
    }
}

// One argument per channel and handle the thread owns.
#[allow(clippy::too_many_arguments)]
fn control_thread(
    mut reader: Link,
    mut writer: Link,
    relink: Option<Relink>,
    view: RingRegion,
    stop: StopHandle,
    phase: Arc<AtomicU8>,
    events: mpsc::Receiver<Event>,
    commands: mpsc::Sender<Hold>,
) {
    let status = |phase: u8| {
        let pos = (
            view.sq_head().load(Ordering::Acquire),
            view.cq_tail().load(Ordering::Acquire),
        );
        status_reply(
            serving_phase(phase),
            &view.counters(),
            view.latched(),
            pos,
            view.driver_epoch().epoch,
        )
    };
    loop {
        let Some(cmd) = next_command(&mut reader, &mut writer) else {
            // The supervisor is gone. While serving that changes nothing for the client.
            if let Some(r) = &relink {
                r.loss().link_lost();
            }
            if phase.load(Ordering::Acquire) == PHASE_HELD {
                if commands.send(Hold::SupervisorGone).is_err() {
                    return;
                }
                match events.recv() {
                    Ok(Event::Resumed(Ok(()))) => phase.store(PHASE_SERVING, Ordering::Release),
                    // Still held: a new supervisor may fix the ring's label and resume.
                    Ok(Event::Resumed(Err(e))) => {
                        molt_sys::errln!(
                            "blockdev: supervisor gone while held; cannot serve again: {e}"
                        )
                    }
                    Ok(Event::Drained(_)) => unreachable!("drained while held"),
                    // The main loop ended the driver: a successor serves the ring.
                    Err(_) => return,
                }
            }
            // The next trusted connection on the relink socket is the new control link.
            let Some(stream) = relink.as_ref().and_then(Relink::next_link) else {
                return;
            };
            writer = Link::new(stream, STATE_CAP);
            // If the clone fails the old reader reports the end again: wait for another.
            if let Ok(r) = writer.try_clone() {
                reader = r;
            }
            continue;
        };
        let now = phase.load(Ordering::Acquire);
        match (cmd, now) {
            (Command::Status, _) => send(&mut writer, status(now)),
            // The driver holds every required state once drained: nothing is in flight.
            (Command::Prepare { deadline_ms, .. }, PHASE_SERVING) => {
                phase.store(PHASE_DRAINING, Ordering::Release);
                stop.prepare();
                let drained = match events.recv_timeout(Duration::from_millis(deadline_ms)) {
                    Ok(e) => e,
                    Err(RecvTimeoutError::Timeout) => {
                        if stop.cancel_prepare() {
                            phase.store(PHASE_SERVING, Ordering::Release);
                            refuse(
                                &mut writer,
                                ControlError::Deadline("the ring did not drain".into()),
                            );
                            continue;
                        }
                        // Drained just now: its state is on the way.
                        match events.recv() {
                            Ok(e) => e,
                            Err(_) => return,
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                match drained {
                    Event::Drained(Ok(blob)) => {
                        phase.store(PHASE_HELD, Ordering::Release);
                        send(&mut writer, Reply::Ready(blob.into_bytes()));
                    }
                    Event::Drained(Err(e)) => {
                        // The loop resumes by itself.
                        phase.store(PHASE_SERVING, Ordering::Release);
                        refuse(&mut writer, ControlError::StateRefused(e));
                    }
                    Event::Resumed(_) => unreachable!("resume answered while draining"),
                }
            }
            (Command::Resume, PHASE_HELD) => {
                if commands.send(Hold::Resume).is_err() {
                    return;
                }
                match events.recv() {
                    Ok(Event::Resumed(Ok(()))) => {
                        phase.store(PHASE_SERVING, Ordering::Release);
                        send(&mut writer, Reply::Serving);
                    }
                    Ok(Event::Resumed(Err(e))) => refuse(&mut writer, ControlError::Failed(e)),
                    Ok(Event::Drained(_)) => unreachable!("drained while held"),
                    Err(_) => return,
                }
            }
            (Command::Exit, PHASE_HELD) => {
                let _ = commands.send(Hold::Exit);
                return;
            }
            (other, _) => refuse(
                &mut writer,
                ControlError::Unexpected(format!("{other:?} while {:?}", serving_phase(now))),
            ),
        }
    }
}
