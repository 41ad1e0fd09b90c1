//! A fault-injecting engine wrapper: fails the n-th write or flush with a chosen errno
//! instead of passing it on, or holds the n-th write's completion back for a while (a slow
//! disk). Used to test error latching and drain deadlines above the engine.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use super::{Engine, Errno, IoCompletion, IoOp, IoRequest, WaitOutcome};

/// Which requests to fail. Counts start at 1 and include every request of that kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct FaultPlan {
    pub fail_nth_write: Option<u64>,
    pub fail_nth_flush: Option<u64>,
    /// The errno reported; `EIO` if zero.
    pub errno: i32,
    /// Holds the completion of this write (it runs normally) for `delay`.
    pub delay_nth_write: Option<u64>,
    pub delay: Duration,
}

#[derive(Debug)]
pub struct FaultyEngine {
    inner: Engine,
    plan: FaultPlan,
    writes: u64,
    flushes: u64,
    injected: Vec<IoCompletion>,
    /// `user_data` of the delayed write while it is in the inner engine.
    delayed: Option<u64>,
    /// Its completion, and when to hand it out.
    held: Option<(IoCompletion, Instant)>,
}

impl FaultyEngine {
    pub fn new(inner: Engine, plan: FaultPlan) -> FaultyEngine {
        FaultyEngine {
            inner,
            plan,
            writes: 0,
            flushes: 0,
            injected: Vec::new(),
            delayed: None,
            held: None,
        }
    }

    pub fn inner(&self) -> &Engine {
        &self.inner
    }

    pub(crate) fn inner_mut(&mut self) -> &mut Engine {
        &mut self.inner
    }

    pub fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.injected.len() + usize::from(self.held.is_some())
    }

    pub fn push(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        if self.in_flight() >= self.inner.capacity() {
            return Err(req);
        }
        let fail = match req.op {
            IoOp::Write { .. } => {
                self.writes += 1;
                if self.plan.delay_nth_write == Some(self.writes) {
                    self.delayed = Some(req.user_data);
                }
                self.plan.fail_nth_write == Some(self.writes)
            }
            IoOp::Flush => {
                self.flushes += 1;
                self.plan.fail_nth_flush == Some(self.flushes)
            }
            _ => false,
        };
        if !fail {
            return self.inner.push(req);
        }
        let errno = if self.plan.errno == 0 {
            libc::EIO
        } else {
            self.plan.errno
        };
        self.injected.push(IoCompletion {
            user_data: req.user_data,
            result: Err(Errno(errno)),
            buf: req.op.take_owned(),
        });
        Ok(())
    }

    pub fn reap(&mut self, out: &mut Vec<IoCompletion>) {
        out.append(&mut self.injected);
        let from = out.len();
        self.inner.reap(out);
        if let Some(id) = self.delayed {
            if let Some(pos) = out[from..].iter().position(|c| c.user_data == id) {
                let c = out.remove(from + pos);
                self.delayed = None;
                self.held = Some((c, Instant::now() + self.plan.delay));
            }
        }
        if matches!(&self.held, Some((_, at)) if Instant::now() >= *at) {
            out.push(self.held.take().expect("checked").0);
        }
    }

    pub fn wait(
        &mut self,
        doorbell: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> io::Result<WaitOutcome> {
        if !self.injected.is_empty() {
            return Ok(WaitOutcome::default());
        }
        let timeout = match &self.held {
            Some((_, at)) => timeout.min(at.saturating_duration_since(Instant::now())),
            None => timeout,
        };
        self.inner.wait(doorbell, timeout)
    }
}

impl Engine {
    /// Wraps this engine so that it fails requests as `plan` says.
    pub fn with_faults(self, plan: FaultPlan) -> Engine {
        Engine::Faulty(Box::new(FaultyEngine::new(self, plan)))
    }
}
