//! Device flushes that syncs run with the filesystem lock free. Flushes are numbered as
//! they start and run one at a time; flush `n` covers every write completed before it
//! started. A sync takes a ticket (the number of flushes started) once its commit is
//! written; any flush numbered past the ticket covers that commit, so a sync that finds
//! one completed returns without its own. The lock is taken with no other held.
//!
//! Small enough to check every interleaving: `RUSTFLAGS="--cfg loom" cargo test -p
//! fsd-core --release --lib fs::flushes::` runs the model below under `loom`
//! (scripts/test.sh does; it fails if the ticket test or the numbering is moved).

#[cfg(loom)]
use loom::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex,
};
#[cfg(not(loom))]
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex,
};

#[derive(Default)]
pub(crate) struct Flushes {
    started: AtomicU64,
    /// The number of the last flush that completed.
    done: Mutex<u64>,
}

impl Flushes {
    /// Taken once the writes a sync must make durable have completed.
    pub(crate) fn ticket(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    /// Returns once a flush that started after `ticket` was taken has completed,
    /// running `flush` (the device's) if none has.
    pub(crate) fn flush_after(
        &self,
        ticket: u64,
        flush: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        if *done > ticket {
            return Ok(());
        }
        let n = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        flush()?;
        *done = n;
        Ok(())
    }
}

#[cfg(all(test, loom))]
mod tests {
    use super::*;
    use loom::sync::Arc;

    /// A device: writes complete into `written`; a flush makes what had completed when
    /// it was called durable.
    #[derive(Default)]
    struct Device {
        /// (written, durable)
        state: Mutex<(Vec<usize>, Vec<usize>)>,
    }

    /// Two syncs at once, each after its own write: whether one shares the other's flush
    /// or runs its own, in every interleaving the model checker finds, each returns only
    /// once its write is durable. (Two are enough to meet every case: a flush already
    /// running when a ticket is taken, one started after, one completed before.)
    #[test]
    fn every_sync_returns_after_a_flush_that_covers_its_write() {
        loom::model(|| {
            let flushes = Arc::new(Flushes::default());
            let device = Arc::new(Device::default());
            let syncs: Vec<_> = (0..2)
                .map(|id| {
                    let (flushes, device) = (flushes.clone(), device.clone());
                    loom::thread::spawn(move || {
                        device.state.lock().unwrap().0.push(id);
                        let ticket = flushes.ticket();
                        flushes
                            .flush_after(ticket, || {
                                let mut s = device.state.lock().unwrap();
                                s.1 = s.0.clone();
                                Ok(())
                            })
                            .unwrap();
                        assert!(
                            device.state.lock().unwrap().1.contains(&id),
                            "sync {id} returned before its write was flushed"
                        );
                    })
                })
                .collect();
            for s in syncs {
                s.join().unwrap();
            }
        });
    }
}
