//! The filesystem server's end of the supervisor's control link (`molt-control`): how a
//! server process starts, and the cooperative update's phases as the server runs them.
//!
//! Start-up, by how the supervisor started the process:
//! - mount: the image is mounted over the ring → [`Reply::FsReady`]; the supervisor makes
//!   the FUSE mount → [`Command::Mounted`]; serving → [`Reply::Serving`].
//! - adopt (a live update's successor): its FUSE session exists → [`Reply::Spawned`];
//!   [`Command::State`] is checked and imported without touching the ring or the image →
//!   [`Reply::Imported`]; [`Command::Commit`] → serving, [`Reply::Serving`]; anything else
//!   ends the process untouched.
//! - recover (the predecessor died): the redo log is replayed, the kernel resends what the
//!   dead one had read, and it serves → [`Reply::Serving`].
//!
//! While serving it answers [`Command::Status`], [`Command::ConversionSpace`],
//! [`Command::Convert`] and [`Command::Prepare`]: it converges to the required states while
//! serving (or answers [`ControlError::Deadline`] and serves on), stops its workers between
//! requests, makes the image consistent and answers [`Reply::Ready`] with its state. It
//! then holds: [`Command::Resume`] serves again, [`Command::Exit`] ends the process without
//! touching the mount. When the kernel ends the connection (unmount) it makes the image
//! clean and exits.
//!
//! A serving server outlives its supervisor. When the control link ends it serves on; if
//! it held for an update it serves again by itself (the update is abandoned), unless a
//! successor has used the ring since (the supervisor committed one and died before its
//! `Exit`): then it ends untouched, as told to exit. Started with a relink directory, it
//! takes the next trusted connection on its relink socket ([`Relink`]) as its control
//! link. A successor that loses its supervisor before the commit ends untouched: its
//! predecessor serves on.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use fsd_core::fs::Fs;
use molt_control::{
    Command, ControlError, Link, LinkError, LinkLoss, Relink, Reply, RequiredState, ServingPhase,
    Status,
};

use crate::background::{background, follow_mount_options, Conversion, Flusher};
use crate::fuse::MoltFuse;
use crate::persist::Transport;
use crate::persist::{self, FsdState, StateError, StateVersion, STATE_CAP};
use crate::serve::{ServerArgs, ServerFds};
use molt_fuse::transport::uring::UringQueues;
use molt_fuse::{Negotiated, Notifier, StopReason, Stopper};

/// Entries per io_uring queue (one queue per CPU): requests in flight per CPU.
const URING_QUEUE_DEPTH: usize = 16;

/// Why a server whose connection is served over io_uring cannot be taken over, by a live
/// successor or after its death: on this kernel a process's queue entries, and the
/// requests in them, go with its ring (docs/live-update.md, "FUSE over io_uring").
const URING_NO_TAKEOVER: &str = "the connection is served over FUSE io_uring, whose queue \
    entries and the requests in them cannot be taken over from another process on this \
    kernel";

/// The FUSE session of this server.
type FuseSession = molt_fuse::Session<MoltFuse>;

/// How long a server that held when its supervisor went away waits before it looks for a
/// successor's use of the ring: a successor told to commit just before the supervisor died
/// reads the image within this time unless it is starved of CPU. (Nothing closes that
/// race entirely short of the supervisor surviving.)
const SUCCESSOR_SETTLE: Duration = Duration::from_millis(200);

/// The ring's descriptors, kept so that the server can connect again after a rolled-back
/// update (a successor may have moved the ring's positions).
struct ServerRing {
    ring: OwnedFd,
    sq_eventfd: OwnedFd,
    cq_eventfd: OwnedFd,
    /// Read only: where the ring's submission queue is.
    view: blockdev::ring::RingRegion,
}

impl ServerRing {
    /// Entries ever submitted to the ring, by this process or another.
    fn sq_tail(&self) -> u32 {
        self.view
            .sq_tail()
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// A ring client on duplicates of the descriptors.
    fn connect(&self) -> anyhow::Result<Arc<crate::host::RingStore>> {
        let region = blockdev::ring::RingRegion::open(self.ring.try_clone()?)?;
        // No pidfd: the driver may be replaced by a live update; liveness is the heartbeat's.
        let client = blockdev::Client::connect(
            region,
            self.sq_eventfd.try_clone()?,
            self.cq_eventfd.try_clone()?,
            None,
            Default::default(),
        )?;
        Ok(Arc::new(crate::host::RingStore(Arc::new(client))))
    }
}

/// The filesystem server process: starts as `args` say, then serves until unmounted (or
/// until told to exit after a prepare).
pub fn run_server(args: &ServerArgs, fds: ServerFds) -> anyhow::Result<()> {
    let mut link = Link::new(fds.ctl, STATE_CAP);
    // Dropped (its socket removed) when this returns; `end_untouched` removes it by hand.
    let relink = match args.relink_dir.as_deref().map(bind_relink).transpose() {
        Ok(r) => r,
        Err(e) => return Err(fail(&mut link, e)),
    };
    let view = match blockdev::ring::RingRegion::open(fds.ring.try_clone()?) {
        Ok(v) => v,
        Err(e) => return Err(fail(&mut link, e.into())),
    };
    let ring = ServerRing {
        ring: fds.ring,
        sq_eventfd: fds.sq_eventfd,
        cq_eventfd: fds.cq_eventfd,
        view,
    };
    let started = start(
        args,
        &mut link,
        &ring,
        &fds.redo,
        &fds.session,
        relink.as_ref(),
    );
    let (fs, molt, negotiated) = match started {
        Ok(v) => v,
        Err(e) => return Err(fail(&mut link, e)),
    };
    let fuse = fds.fuse;
    molt.set_notifier(Notifier::new(fuse.try_clone()?));
    molt.set_session_record(fds.session);
    molt.set_transport(args.transport);
    let policy = crate::fuse::init_policy(args.transport == Transport::Uring);
    let session = Arc::new(match negotiated {
        Some(n) => FuseSession::adopted(molt.clone(), policy, n),
        None => FuseSession::new(molt.clone(), policy),
    });
    if args.recover.is_some() {
        // Requests the dead predecessor had read go back to the queue, marked. Before this
        // process reads any: a resend also takes back requests being served, which would
        // then run twice.
        if let Err(e) = Notifier::new(fuse.try_clone()?).resend() {
            let e = anyhow::anyhow!("resending the dead server's requests: {e}");
            return Err(fail(&mut link, e));
        }
    }
    let commands = inbox(&link, relink.as_ref().map(Relink::loss))?;
    let mut server = ControlledServer {
        args: args.clone(),
        link,
        commands,
        restart: args
            .relink_dir
            .as_deref()
            .and_then(|d| crate::restart::SupervisorRestart::new(d, &args.mountpoint)),
        relink,
        session,
        fuse,
        uring: Arc::default(),
        ring,
        fs,
        molt,
        conversion: Arc::new(Conversion::default()),
        retry: None,
    };
    server.serve_until_unmounted()
}

/// The relink socket in `dir`: a connection from root or this process's user may replace
/// a lost control link.
fn bind_relink(dir: &std::path::Path) -> anyhow::Result<Relink> {
    use std::os::fd::AsFd;
    Relink::bind(dir, "fsd", molt_sys::socket::effective_uid(), |s| {
        Ok(molt_sys::peer_credentials(s.as_fd())?.uid)
    })
    .map_err(|e| anyhow::anyhow!("listening for a new supervisor in {}: {e}", dir.display()))
}

/// Ends the process without touching anything shared (no unmount, no image write), and
/// without its relink socket.
fn end_untouched(relink: Option<&Relink>) -> ! {
    if let Some(r) = relink {
        r.remove();
    }
    std::process::exit(0)
}

/// Reports a start-up failure to the supervisor and returns it.
fn fail(link: &mut Link, e: anyhow::Error) -> anyhow::Error {
    let _ = link.send(&Reply::Error(ControlError::Failed(format!("{e:#}"))));
    e
}

/// The filesystem, its FUSE side, and the connection's parameters when it was negotiated
/// before this process (adoption, recovery), by start mode.
fn start(
    args: &ServerArgs,
    link: &mut Link,
    ring: &ServerRing,
    redo: &File,
    record: &File,
    relink: Option<&Relink>,
) -> anyhow::Result<(Arc<Fs>, Arc<MoltFuse>, Option<Negotiated>)> {
    if args.adopt {
        if args.read_only {
            // The update manager refuses this before a successor starts.
            anyhow::bail!("a read-only mount is not live-updated");
        }
        return adopt(link, ring, redo, relink);
    }
    if let Some(recovery) = args.recover {
        // The predecessor died: the supervisor settled the ring; the kernel holds the
        // requests it had read until the resend. Without a connection record the dead
        // server never answered INIT, which the kernel then sends again.
        let negotiated = match crate::host::read_session_record(record) {
            Some(bytes) => {
                let (flags, c) = persist::decode_connection_record(&bytes)
                    .map_err(|e| anyhow::anyhow!("the connection record: {e}"))?;
                if c.transport == Transport::Uring {
                    anyhow::bail!("cannot recover: {URING_NO_TAKEOVER}");
                }
                Some(c.negotiated(flags))
            }
            None => None,
        };
        // A read-only server never accepted a change: nothing to replay, nothing written.
        let (fs, completed) = if args.read_only {
            (Fs::mount_read_only(ring.connect()?)?, Default::default())
        } else {
            Fs::recover(ring.connect()?, crate::host::open_redo_log(redo)?)?
        };
        let fs = Arc::new(fs);
        let molt = Arc::new(MoltFuse::recovered(fs.clone(), completed, recovery));
        return Ok((fs, molt, negotiated));
    }
    let fs = if args.read_only {
        Fs::mount_read_only(ring.connect()?)?
    } else {
        Fs::mount(ring.connect()?)?
    };
    fs.attach_redo_log(crate::host::open_redo_log(redo)?);
    let fs = Arc::new(fs);
    link.send(&Reply::FsReady)?;
    match link.recv::<Command>()? {
        Command::Mounted => {}
        other => anyhow::bail!("expected Mounted, got {other:?}"),
    }
    let molt = Arc::new(MoltFuse::new(fs.clone()));
    Ok((fs, molt, None))
}

/// A live update's successor: imports the predecessor's state (writing nothing), then
/// takes over at the commit. An abort (or a lost supervisor) ends the process untouched:
/// the predecessor serves on.
fn adopt(
    link: &mut Link,
    ring: &ServerRing,
    redo: &File,
    relink: Option<&Relink>,
) -> anyhow::Result<(Arc<Fs>, Arc<MoltFuse>, Option<Negotiated>)> {
    link.send(&Reply::Spawned)?;
    let blob = match link.recv::<Command>()? {
        Command::State(b) => b,
        Command::Abort => end_untouched(relink),
        other => anyhow::bail!("expected the state, got {other:?}"),
    };
    let (state, negotiated) = match import(&blob) {
        Ok(s) => s,
        Err(refusal) => {
            let _ = link.send(&Reply::Error(refusal.clone()));
            return Err(refusal.into());
        }
    };
    link.send(&Reply::Imported)?;
    match link.recv::<Command>() {
        Ok(Command::Commit) => {}
        _ => end_untouched(relink),
    }
    let fs = Arc::new(Fs::adopt(ring.connect()?, &state.withheld)?);
    fs.attach_redo_log(crate::host::open_redo_log(redo)?);
    let molt = Arc::new(MoltFuse::import(fs.clone(), &state));
    Ok((fs, molt, Some(negotiated)))
}

/// Decodes and checks a predecessor's state for this build, with the parameters of the
/// connection it negotiated.
fn import(blob: &[u8]) -> Result<(FsdState, Negotiated), ControlError> {
    let state = persist::import_accepting(blob, StateVersion::ACCEPTED).map_err(|e| match e {
        StateError::UnsupportedSchema { schema, .. } => ControlError::UnsupportedSchema(schema),
        e => ControlError::StateRefused(e.to_string()),
    })?;
    let Some(connection) = state.connection else {
        return Err(ControlError::StateRefused(
            "the connection was negotiated by a build whose FUSE binding did not hand over \
             its parameters; unmount and mount once to move to this version"
                .into(),
        ));
    };
    if connection.transport == Transport::Uring {
        return Err(ControlError::StateRefused(URING_NO_TAKEOVER.into()));
    }
    let negotiated = connection.negotiated(state.init_flags);
    Ok((state, negotiated))
}

/// Serves the connection until `stopper` asks or the connection ends: over io_uring when
/// the server was started so and the kernel agreed at INIT (the queues are registered on
/// the first call, after INIT was answered on `/dev/fuse`), else over `/dev/fuse`.
fn serve_connection(
    session: &Arc<FuseSession>,
    fuse: &File,
    threads: usize,
    stopper: &Arc<Stopper>,
    molt: &MoltFuse,
    uring: &std::sync::OnceLock<UringQueues>,
) -> std::io::Result<StopReason> {
    use molt_fuse::transport::{dev, uring as ring};
    if molt.transport() == Transport::Uring && uring.get().is_none() {
        let queues = ring::answer_init(session, fuse, Duration::from_secs(30))
            .map_err(|e| format!("answering INIT: {e}"))
            .and_then(|n| {
                if !n.has(molt_fuse::abi::init::OVER_IO_URING) {
                    return Err("the kernel did not offer FUSE over io_uring at INIT".into());
                }
                UringQueues::register(session, fuse, URING_QUEUE_DEPTH).map_err(|e| e.to_string())
            });
        match queues {
            Ok(q) => {
                molt_sys::errln!(
                    "fsd serve: serving over io_uring: {} queues of {} entries",
                    q.queues(),
                    q.depth()
                );
                let _ = uring.set(q);
            }
            Err(why) => {
                molt_sys::errln!("fsd serve: serving /dev/fuse instead of io_uring: {why}");
                molt.set_transport(Transport::Dev);
            }
        }
    }
    match uring.get() {
        Some(q) => q.serve(session, fuse, stopper),
        None => dev::serve(session, fuse, threads, stopper),
    }
}

/// Commands arrive on their own thread so that the server also notices an unmount. The
/// channel disconnects when the link ends; `loss` hears of it first.
fn inbox(
    link: &Link,
    loss: Option<LinkLoss>,
) -> std::io::Result<Receiver<Result<Command, LinkError>>> {
    let mut reader = link.try_clone()?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || loop {
        let m = reader.recv::<Command>();
        let end = matches!(m, Err(LinkError::Closed | LinkError::Io(_)));
        if end {
            if let Some(l) = &loss {
                l.link_lost();
            }
        }
        if tx.send(m).is_err() || end {
            return;
        }
    });
    Ok(rx)
}

/// A serving server and its control link.
struct ControlledServer {
    args: ServerArgs,
    /// The supervisor's link. A reply that cannot be sent is dropped: the inbox notices a
    /// lost supervisor.
    link: Link,
    commands: Receiver<Result<Command, LinkError>>,
    /// Where a new supervisor connects once `link` ended.
    relink: Option<Relink>,
    /// Starts a new supervisor while the link is gone (with a relink directory only).
    restart: Option<crate::restart::SupervisorRestart>,
    session: Arc<FuseSession>,
    /// The connection's `/dev/fuse` descriptor.
    fuse: File,
    /// The io_uring queues, registered once after INIT and kept for the process's life
    /// (serving stops and resumes on them); empty over `/dev/fuse`.
    uring: Arc<std::sync::OnceLock<UringQueues>>,
    ring: ServerRing,
    fs: Arc<Fs>,
    molt: Arc<MoltFuse>,
    conversion: Arc<Conversion>,
    /// A prepare whose required state was lost during the drain: retried (serving again
    /// meanwhile) until its deadline; the supervisor keeps waiting for `Ready`.
    retry: Option<(Instant, Vec<RequiredState>)>,
}

/// The workers and the background thread of one serving period (from start, or a resume,
/// to a drain or the unmount).
struct Period {
    stopper: Arc<Stopper>,
    workers: thread::JoinHandle<std::io::Result<StopReason>>,
    flusher: Option<Flusher>,
    /// Drained and holding after a `Ready`.
    prepared: bool,
    /// The ring's submission tail when `Ready` was sent: nothing but a committed successor
    /// moves it while this server holds.
    held_at: Option<u32>,
}

/// What a command leaves the serving period to do.
enum Next {
    Serve,
    /// End the period: a resume, a retried or failed preparation.
    EndPeriod,
}

impl ControlledServer {
    fn serve_until_unmounted(&mut self) -> anyhow::Result<()> {
        loop {
            let announce = self.retry.is_none();
            let mut period = self.start_period()?;
            if announce {
                self.tell(&Reply::Serving);
            }
            self.answer_commands(&mut period)?;
            period.stopper.stop()?;
            if let Some(f) = period.flusher.take() {
                f.finish();
            }
            let reason = period
                .workers
                .join()
                .map_err(|_| anyhow::anyhow!("serve loop panicked"))??;
            if reason == StopReason::Disconnected && !period.prepared {
                // Unmounted: make the image clean.
                self.fs.unmount()?;
                let holds = self.fs.lock_holds();
                molt_sys::errln!(
                    "fsd serve: unmounted; longest filesystem lock hold {} us (taken at {}), {} holds of 10 ms or more",
                    holds.longest_us, holds.longest_site, holds.over_10ms
                );
                return Ok(());
            }
        }
    }

    fn start_period(&self) -> anyhow::Result<Period> {
        let stopper = Stopper::new()?;
        let workers = {
            let (session, stopper) = (self.session.clone(), stopper.clone());
            let (fuse, threads) = (self.fuse.try_clone()?, self.args.threads);
            let (molt, uring) = (self.molt.clone(), self.uring.clone());
            thread::spawn(move || {
                serve_connection(&session, &fuse, threads, &stopper, &molt, &uring)
            })
        };
        // Commits times left in memory by overwrites within about a second, and runs an
        // on-disk format conversion in progress, one short batch at a time. Dropping the
        // sender stops it at once (a drain must not wait for its sleep).
        let (fs, conversion) = (self.fs.clone(), self.conversion.clone());
        let (molt, mnt) = (self.molt.clone(), self.args.mountpoint.clone());
        let (stop, stopped) = mpsc::channel::<()>();
        let handle = thread::spawn(move || {
            // Follows a remount that changes the atime option.
            let follow = || follow_mount_options(&molt, &mnt);
            follow();
            background(&fs, &conversion, &stopped, &follow)
        });
        Ok(Period {
            stopper,
            workers,
            flusher: Some(Flusher { stop, handle }),
            prepared: false,
            held_at: None,
        })
    }

    /// Answers commands until the period ends (or the workers stop: an unmount).
    fn answer_commands(&mut self, period: &mut Period) -> anyhow::Result<()> {
        loop {
            if period.workers.is_finished() && !period.prepared {
                return Ok(());
            }
            let command = match self.retry.take() {
                Some((deadline, required)) => Command::Prepare {
                    deadline_ms: deadline
                        .saturating_duration_since(Instant::now())
                        .as_millis() as u64,
                    required,
                },
                None => match self.commands.recv_timeout(Duration::from_millis(20)) {
                    Ok(Ok(c)) => c,
                    Ok(Err(LinkError::Malformed(m))) => {
                        self.refuse(ControlError::Failed(m));
                        continue;
                    }
                    Ok(Err(_)) | Err(RecvTimeoutError::Timeout) => continue,
                    // The supervisor is gone: keep serving, and take a new one's link.
                    Err(RecvTimeoutError::Disconnected) => {
                        if period.prepared {
                            self.serve_again_unsupervised(period)?;
                            return Ok(());
                        }
                        if self.take_new_link() {
                            if let Some(r) = &mut self.restart {
                                r.linked();
                            }
                        } else {
                            if let Some(r) = &mut self.restart {
                                r.orphaned();
                            }
                            thread::sleep(Duration::from_millis(20));
                        }
                        continue;
                    }
                },
            };
            if let Next::EndPeriod = self.answer(command, period)? {
                return Ok(());
            }
        }
    }

    /// Held for an update when the supervisor went away: the update is abandoned and the
    /// server serves again (the caller ends the period) — unless a successor has used the
    /// ring since `Ready` (it was committed): then this process ends untouched, as `Exit`
    /// would have ended it.
    fn serve_again_unsupervised(&mut self, period: &Period) -> anyhow::Result<()> {
        thread::sleep(SUCCESSOR_SETTLE);
        if period.held_at.is_some_and(|t| t != self.ring.sq_tail()) {
            molt_sys::errln!(
                "fsd serve: supervisor gone while held, and a successor serves: exiting"
            );
            end_untouched(self.relink.as_ref());
        }
        molt_sys::errln!("fsd serve: supervisor gone while held; serving again");
        // A driver successor may have been committed: connect from the ring's positions.
        self.fs.replace_store(self.ring.connect()?);
        Ok(())
    }

    /// Makes a connection a new supervisor made on the relink socket the control link.
    /// Returns whether there was one.
    fn take_new_link(&mut self) -> bool {
        let Some(relink) = &self.relink else {
            return false;
        };
        let Some(stream) = relink.try_next_link() else {
            return false;
        };
        let link = Link::new(stream, STATE_CAP);
        match inbox(&link, Some(relink.loss())) {
            Ok(commands) => {
                molt_sys::errln!("fsd serve: a new supervisor took over the control link");
                self.link = link;
                self.commands = commands;
                true
            }
            Err(_) => {
                // Unreadable: dropped, and the socket waits for another.
                relink.loss().link_lost();
                false
            }
        }
    }

    /// Sends a reply; one the supervisor is gone for is dropped.
    fn tell(&mut self, reply: &Reply) {
        let _ = self.link.send(reply);
    }

    fn answer(&mut self, command: Command, period: &mut Period) -> anyhow::Result<Next> {
        match (command, period.prepared) {
            (Command::Status, prepared) => {
                let status = self.status(prepared);
                self.tell(&Reply::Status(status));
            }
            (Command::ConversionSpace(to), _) => {
                let reply = match self.fs.conversion_space_needed(to) {
                    Ok(needed) => Reply::Space {
                        needed,
                        free: self.fs.statfs().free_blocks * formats::BLOCK_SIZE as u64,
                    },
                    Err(e) => Reply::Error(ControlError::Failed(e.to_string())),
                };
                self.tell(&reply);
            }
            (Command::Convert(to), false) => {
                let reply = match self.fs.start_conversion(to) {
                    Ok(()) => {
                        self.conversion.started(&self.fs);
                        Reply::Converting
                    }
                    Err(e) => Reply::Error(ControlError::Failed(e.to_string())),
                };
                self.tell(&reply);
            }
            (
                Command::Prepare {
                    deadline_ms,
                    required,
                },
                false,
            ) => {
                let deadline = Instant::now() + Duration::from_millis(deadline_ms);
                return self.prepare(period, deadline, required);
            }
            (Command::Resume, true) => {
                // A successor may have used the ring: reconnect from its current positions.
                self.fs.replace_store(self.ring.connect()?);
                return Ok(Next::EndPeriod);
            }
            (Command::Exit, true) => end_untouched(self.relink.as_ref()),
            (other, _) => self.refuse(ControlError::Unexpected(format!("{other:?}"))),
        }
        Ok(Next::Serve)
    }

    fn refuse(&mut self, e: ControlError) {
        self.tell(&Reply::Error(e));
    }

    /// Notification and preparation: converge while serving, drain, re-check, export.
    fn prepare(
        &mut self,
        period: &mut Period,
        deadline: Instant,
        required: Vec<RequiredState>,
    ) -> anyhow::Result<Next> {
        if let Err(why) = self.converge(&required, deadline) {
            self.refuse(ControlError::Deadline(why));
            return Ok(Next::Serve);
        }
        molt_sys::errln!("fsd serve: prepare: state reached, draining");
        period.stopper.stop()?;
        while !period.workers.is_finished() {
            thread::sleep(Duration::from_micros(200));
        }
        if let Some(f) = period.flusher.take() {
            f.finish();
        }
        period.prepared = true;
        molt_sys::errln!("fsd serve: prepare: drained");
        // Re-check: a request served during the drain may have changed it (a file opened
        // and not yet read). Serve again and retry.
        if self.reached(&required).is_err() && Instant::now() < deadline {
            self.retry = Some((deadline, required));
            period.prepared = false;
            return Ok(Next::EndPeriod);
        }
        let exported = self
            .reached(&required)
            .map_err(anyhow::Error::msg)
            .and_then(|()| self.fs.quiesce().map_err(anyhow::Error::from))
            .and_then(|withheld| {
                let mut st = self.molt.export();
                st.withheld = withheld;
                Ok(persist::export(&st, StateVersion::CURRENT)?)
            });
        match exported {
            Ok(blob) => {
                period.held_at = Some(self.ring.sq_tail());
                self.tell(&Reply::Ready(blob));
                Ok(Next::Serve)
            }
            Err(e) => {
                // Serves again by itself; a resume is then answered as unexpected.
                self.refuse(ControlError::Failed(format!("{e:#}")));
                Ok(Next::EndPeriod)
            }
        }
    }

    /// Waits, serving, until every required state holds or the deadline passes.
    fn converge(&self, required: &[RequiredState], deadline: Instant) -> Result<(), String> {
        loop {
            match self.reached(required) {
                Ok(()) => return Ok(()),
                Err(why) if Instant::now() >= deadline => return Err(why),
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Whether the required states hold now. The server drains every request before it
    /// exports, so the in-flight states hold once drained.
    fn reached(&self, required: &[RequiredState]) -> Result<(), String> {
        for r in required {
            match r {
                RequiredState::Quiescent
                | RequiredState::NoReadsInFlight
                | RequiredState::NoWritesInFlight => {}
                RequiredState::NoOpenFiles => {
                    let n = self.molt.open_handles().len();
                    if n > 0 {
                        return Err(format!("{n} files or directories are open"));
                    }
                }
                RequiredState::EveryOpenFileTouched => {
                    let n = self.molt.export().untouched_files();
                    if n > 0 {
                        return Err(format!(
                            "{n} open files have not been read or written since they were opened"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn status(&self, prepared: bool) -> Status {
        let st = self.molt.export();
        let counters = [
            ("lookups", st.lookups.len() as u64),
            ("handles", st.handles.len() as u64),
            ("requests", st.requests),
        ];
        Status {
            phase: if prepared {
                ServingPhase::Held
            } else {
                ServingPhase::Serving
            },
            pid: std::process::id(),
            version: st.version,
            state_schema: StateVersion::CURRENT.0,
            counters: counters.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            format: Some(self.fs.format_version()),
            conversion: self.conversion.progress(&self.fs),
            last_conversion: self.conversion.finished(),
            fuse: Some(molt_control::FuseInfo {
                transport: self.molt.transport().name().into(),
                protocol: self.session.negotiated().map(|n| format!("7.{}", n.minor)),
            }),
        }
    }
}
