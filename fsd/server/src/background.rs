//! The server's background work while it serves: commits changes left in memory, moves
//! an online format conversion forward one short step at a time, and follows remounts that
//! change the atime option.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use molt_control::{ConversionProgress, ConversionResult};

use crate::fuse::MoltFuse;
use crate::serve::atime_of_mount;

/// Inodes one background conversion step moves (one journal transaction, one lock hold).
const CONVERT_BATCH: u64 = 64;

/// Progress of the on-disk format conversion this server runs, for `status`.
#[derive(Default)]
pub(crate) struct Conversion {
    /// When this server started (or resumed) converting, and how far it was then.
    since: std::sync::Mutex<Option<(Instant, u64)>>,
    done: std::sync::atomic::AtomicU64,
    total: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
    /// Inodes moved to the new layout by this server.
    inodes: std::sync::atomic::AtomicU64,
    /// The longest conversion step, microseconds; all steps and their total time.
    longest_step_us: std::sync::atomic::AtomicU64,
    steps: std::sync::atomic::AtomicU64,
    steps_us: std::sync::atomic::AtomicU64,
    /// The last conversion this process finished.
    finished: std::sync::Mutex<Option<ConversionResult>>,
}

impl Conversion {
    /// The last conversion this process finished, for `status`.
    pub(crate) fn finished(&self) -> Option<ConversionResult> {
        self.finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn started(&self, fs: &fsd_core::fs::Fs) {
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        if since.is_none() && fs.conversion_target().is_some() {
            *since = Some((Instant::now(), self.done.load(Ordering::Relaxed)));
        }
    }

    /// Records the conversion as finished now.
    fn finish(&self, fs: &fsd_core::fs::Fs) -> ConversionResult {
        let since = *self.since.lock().unwrap_or_else(|p| p.into_inner());
        let steps = self.steps.load(Ordering::Relaxed).max(1);
        let done = ConversionResult {
            to: fs.format_version(),
            inodes: self.inodes.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            millis: since.map_or(0, |(t, _)| t.elapsed().as_millis() as u64),
            steps,
            longest_step_us: self.longest_step_us.load(Ordering::Relaxed),
            mean_step_us: self.steps_us.load(Ordering::Relaxed) / steps,
        };
        *self.finished.lock().unwrap_or_else(|p| p.into_inner()) = Some(done.clone());
        done
    }

    fn record(&self, p: &fsd_core::fs::Progress) {
        self.inodes.fetch_add(p.inodes_moved, Ordering::Relaxed);
        self.done.store(p.done_inodes, Ordering::Relaxed);
        self.total.store(p.total_inodes, Ordering::Relaxed);
        self.bytes.fetch_add(p.bytes_moved, Ordering::Relaxed);
    }

    /// The conversion in progress, for `status`.
    pub(crate) fn progress(&self, fs: &fsd_core::fs::Fs) -> Option<ConversionProgress> {
        let target = fs.conversion_target()?;
        let done = self.done.load(Ordering::Relaxed);
        let rate = match *self.since.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((t, from)) if t.elapsed().as_secs_f64() > 0.0 => {
                (done.saturating_sub(from) as f64 / t.elapsed().as_secs_f64()) as u64
            }
            _ => 0,
        };
        Some(ConversionProgress {
            to: target,
            done,
            total: self.total.load(Ordering::Relaxed),
            rate_per_s: rate,
            bytes: self.bytes.load(Ordering::Relaxed),
        })
    }
}

/// The server's background work while it serves: commits changes left in memory about a
/// second old, runs the checkpoints (outside the filesystem lock), and moves a format conversion in progress forward a batch at a time
/// (resuming one a predecessor, a crash or an earlier mount left unfinished).
/// `each_second` runs about once a second.
pub(crate) fn background(
    fs: &fsd_core::fs::Fs,
    conversion: &Conversion,
    stopped: &std::sync::mpsc::Receiver<()>,
    each_second: &dyn Fn(),
) {
    use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
    let mut pause = Duration::from_millis(100);
    let mut last_tick = Instant::now();
    fs.checkpoint_in_background_from_now();
    let stop = || matches!(stopped.try_recv(), Err(TryRecvError::Disconnected));
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(pause) {
        let _ = fs.commit_older_than(Duration::from_secs(1));
        // Writes the pinned journal blocks in place while operations go on.
        if let Err(e) = fs.checkpoint_in_background(&stop) {
            molt_sys::errln!("fsd serve: checkpoint failed: {e}");
        }
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            each_second();
        }
        pause = Duration::from_millis(100);
        // A read-only mount leaves a conversion in progress for a read-write one.
        if fs.conversion_target().is_none() || fs.is_read_only() {
            continue;
        }
        conversion.started(fs);
        let step = Instant::now();
        let result = fs.convert_step(CONVERT_BATCH);
        // A step holds the filesystem lock throughout (including a checkpoint its commit
        // may run): the longest one bounds the pause the conversion itself causes.
        let took = step.elapsed().as_micros() as u64;
        conversion
            .longest_step_us
            .fetch_max(took, Ordering::Relaxed);
        conversion.steps_us.fetch_add(took, Ordering::Relaxed);
        conversion.steps.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(p) => {
                conversion.record(&p);
                if p.finished {
                    let done = conversion.finish(fs);
                    molt_sys::errln!(
                        "fsd serve: conversion to format v{} finished: {} inodes and {} bytes of metadata rewritten by this server in {} ms; {} steps, longest {} us, mean {} us",
                        done.to.0, done.inodes, done.bytes, done.millis, done.steps, done.longest_step_us, done.mean_step_us,
                    );
                } else {
                    // Between batches the lock is free for I/O a moment.
                    pause = Duration::from_millis(1);
                }
            }
            Err(e) => molt_sys::errln!("fsd serve: conversion step failed: {e}"),
        }
    }
}

/// Applies the options of the mount at `mnt` that the server implements (atime).
pub(crate) fn follow_mount_options(molt: &MoltFuse, mnt: &Path) {
    if let Some(atime) = atime_of_mount(mnt) {
        molt.set_atime(atime);
    }
}

/// The thread that commits changes left in memory (times of overwritten files).
pub(crate) struct Flusher {
    pub(crate) stop: std::sync::mpsc::Sender<()>,
    pub(crate) handle: thread::JoinHandle<()>,
}

impl Flusher {
    pub(crate) fn finish(self) {
        drop(self.stop);
        let _ = self.handle.join();
    }
}
