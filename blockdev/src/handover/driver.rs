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

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::{read_line, StateBlob};
use crate::persist::{
    Counters, DriverState, StateError, StateVersion, StopReason, COMPONENT_VERSION,
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
    /// Told to `exit` after `ready`: a successor serves (or will) the ring.
    HandedOver,
    /// Told to `abort` before commit: the ring was never touched.
    Aborted,
    /// The successor refused the state (`error: …` was sent); the ring was never touched.
    ImportFailed(String),
    /// The supervisor closed the control channel while this driver held after `ready`, or
    /// before commit. It cannot know whether a successor serves, so it leaves the ring
    /// alone.
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

fn phase_name(p: u8) -> &'static str {
    match p {
        PHASE_SERVING => "serving",
        PHASE_DRAINING => "draining",
        _ => "held",
    }
}

fn status_line(
    phase: &str,
    c: &Counters,
    latched: i32,
    positions: (u32, u32),
    epoch: u32,
) -> String {
    format!(
        "status phase={phase} pid={} version={COMPONENT_VERSION} schema={} ring={} errcodes={} \
         reads={} writes={} flushes={} discards={} bytes_read={} bytes_written={} errors={} \
         in_flight={} latched={latched} sq_head={} cq_tail={} epoch={epoch}",
        std::process::id(),
        StateVersion::CURRENT.0,
        ProtocolVersion::CURRENT.0,
        StatusTable::CURRENT.0,
        c.reads,
        c.writes,
        c.flushes,
        c.discards,
        c.bytes_read,
        c.bytes_written,
        c.errors,
        c.in_flight,
        positions.0,
        positions.1,
    )
}

fn send(w: &mut UnixStream, line: &str) {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    // A supervisor that went away notices by itself; the driver keeps its own course.
    let _ = w.write_all(&bytes);
}

/// Main thread → control thread.
enum Event {
    /// The loop drained for a prepare: the exported state, or why it could not be.
    Drained(Result<StateBlob, String>),
    /// Answer to `resume`.
    Resumed(Result<(), String>),
}

/// Control thread → main thread, while it holds.
enum Command {
    Resume,
    Exit,
    SupervisorGone,
}

/// Serves the ring and answers the control socket until the driver should exit. The
/// server may be attached already ([`Server::new`]) or not (it attaches when it starts).
pub fn serve_controlled(server: Server, ctl: UnixStream) -> Result<DriverExit, DriverError> {
    let reader = BufReader::new(ctl.try_clone()?);
    serve_with(server, reader, ctl)
}

/// A successor: waits for `state`, imports it, waits for `commit`, then attaches and
/// serves as [`serve_controlled`] does. Nothing is written to the ring before `commit`.
/// `server` must come from [`Server::adopt`].
///
/// Except when the ring's driver died while serving ([`Server::crashed_predecessor`],
/// checked once, now): then it takes the ring over at once and serves.
pub fn adopt_controlled(mut server: Server, ctl: UnixStream) -> Result<DriverExit, DriverError> {
    let mut reader = BufReader::new(ctl.try_clone()?);
    let mut writer = ctl;
    if let Some(dead) = server.crashed_predecessor() {
        server.take_over_crashed()?;
        eprintln!(
            "blockdev: driver {} died while {:?} with {} requests in flight; took the ring \
             over as driver epoch {}",
            dead.pid,
            dead.phase,
            dead.in_flight,
            server.epoch()
        );
        return serve_with(server, reader, writer);
    }
    let mut imported: Option<DriverState> = None;
    loop {
        let Some(line) = read_line(&mut reader)? else {
            return Ok(DriverExit::SupervisorGone);
        };
        let (cmd, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match cmd {
            "status" => {
                let phase = if imported.is_some() {
                    "imported"
                } else {
                    "adopting"
                };
                let (c, latched, pos) = match &imported {
                    Some(s) => (
                        s.counters,
                        s.latched.map_or(0, Status::code),
                        (s.sq_head, s.cq_tail),
                    ),
                    None => (Counters::default(), 0, (0, 0)),
                };
                send(
                    &mut writer,
                    &status_line(phase, &c, latched, pos, server.epoch()),
                );
            }
            "state" if imported.is_none() => {
                let result = StateBlob::from_hex(arg)
                    .and_then(|b| DriverState::import(b.as_bytes()))
                    .and_then(|s| server.import_state(&s).map(|()| s));
                match result {
                    Ok(s) => {
                        imported = Some(s);
                        send(&mut writer, "imported");
                    }
                    Err(e) => {
                        let msg = match e {
                            StateError::UnsupportedSchema(n) => {
                                format!("unsupported state schema {n}")
                            }
                            other => other.to_string(),
                        };
                        send(&mut writer, &format!("error: {msg}"));
                        return Ok(DriverExit::ImportFailed(msg));
                    }
                }
            }
            "commit" if imported.is_some() => {
                if let Err(e) = server.attach() {
                    send(&mut writer, &format!("error: {e}"));
                    return Ok(DriverExit::ImportFailed(e.to_string()));
                }
                send(&mut writer, "serving");
                return serve_with(server, reader, writer);
            }
            "abort" => return Ok(DriverExit::Aborted),
            _ => send(
                &mut writer,
                &format!("error: unexpected {cmd:?} while adopting"),
            ),
        }
    }
}

fn serve_with(
    mut server: Server,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
) -> Result<DriverExit, DriverError> {
    let (event_tx, event_rx) = mpsc::channel::<Event>();
    let (cmd_tx, cmd_rx) = mpsc::channel::<Command>();
    let phase = Arc::new(AtomicU8::new(PHASE_SERVING));
    let view = server.ring_view()?;
    let stop = server.stop_handle();
    let ctl_phase = phase.clone();
    thread::Builder::new()
        .name("blockdev-ctl".into())
        .spawn(move || control_thread(reader, writer, view, stop, ctl_phase, event_rx, cmd_tx))?;
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
                    Ok(Command::Resume) => {
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
                    Ok(Command::Exit) => return Ok(DriverExit::HandedOver),
                    Ok(Command::SupervisorGone) | Err(_) => return Ok(DriverExit::SupervisorGone),
                }
            }
        }
        state = server.run()?;
    }
}

fn control_thread(
    mut reader: BufReader<UnixStream>,
    mut writer: UnixStream,
    view: RingRegion,
    stop: StopHandle,
    phase: Arc<AtomicU8>,
    events: mpsc::Receiver<Event>,
    commands: mpsc::Sender<Command>,
) {
    let status = |phase: u8| {
        let pos = (
            view.sq_head().load(Ordering::Acquire),
            view.cq_tail().load(Ordering::Acquire),
        );
        status_line(
            phase_name(phase),
            &view.counters(),
            view.latched(),
            pos,
            view.driver_epoch().epoch,
        )
    };
    loop {
        let line = match read_line(&mut reader) {
            Ok(Some(l)) => l,
            Ok(None) | Err(_) => {
                if phase.load(Ordering::Acquire) == PHASE_HELD {
                    let _ = commands.send(Command::SupervisorGone);
                }
                // While serving, a lost supervisor changes nothing for the client.
                return;
            }
        };
        let (cmd, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let now = phase.load(Ordering::Acquire);
        match (cmd, now) {
            ("status", _) => send(&mut writer, &status(now)),
            ("prepare", PHASE_SERVING) => {
                let Ok(ms) = arg.trim().parse::<u64>() else {
                    send(
                        &mut writer,
                        "error: prepare needs a deadline in milliseconds",
                    );
                    continue;
                };
                phase.store(PHASE_DRAINING, Ordering::Release);
                stop.prepare();
                let drained = match events.recv_timeout(Duration::from_millis(ms)) {
                    Ok(e) => e,
                    Err(RecvTimeoutError::Timeout) => {
                        if stop.cancel_prepare() {
                            phase.store(PHASE_SERVING, Ordering::Release);
                            send(&mut writer, "error: deadline");
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
                        send(&mut writer, &format!("ready {}", blob.to_hex()));
                    }
                    Event::Drained(Err(e)) => {
                        // The loop resumes by itself.
                        phase.store(PHASE_SERVING, Ordering::Release);
                        send(&mut writer, &format!("error: state check failed: {e}"));
                    }
                    Event::Resumed(_) => unreachable!("resume answered while draining"),
                }
            }
            ("resume", PHASE_HELD) => {
                if commands.send(Command::Resume).is_err() {
                    return;
                }
                match events.recv() {
                    Ok(Event::Resumed(Ok(()))) => {
                        phase.store(PHASE_SERVING, Ordering::Release);
                        send(&mut writer, "serving");
                    }
                    Ok(Event::Resumed(Err(e))) => send(&mut writer, &format!("error: {e}")),
                    Ok(Event::Drained(_)) => unreachable!("drained while held"),
                    Err(_) => return,
                }
            }
            ("exit", PHASE_HELD) => {
                let _ = commands.send(Command::Exit);
                return;
            }
            _ => send(
                &mut writer,
                &format!("error: unexpected {cmd:?} while {}", phase_name(now)),
            ),
        }
    }
}
