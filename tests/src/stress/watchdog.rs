//! Per-operation watchdog: every outstanding operation occupies a slot with its start
//! time, and the run's monitor scans the slots for any older than the op timeout.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use super::config::OpKind;

const NO_FILE: u32 = u32::MAX;
const NO_OFFSET: u64 = u64::MAX;

#[derive(Debug, Default)]
struct Slot {
    /// Start, ns since the run start, plus one; 0 when idle.
    started: AtomicU64,
    op: AtomicU8,
    file: AtomicU32,
    offset: AtomicU64,
    reported: AtomicBool,
}

/// An operation found outstanding for too long.
#[derive(Clone, Copy, Debug)]
pub struct Overdue {
    pub op: OpKind,
    pub file: Option<u32>,
    pub offset: Option<u64>,
    pub started_ns: u64,
}

/// The slots of one worker thread.
#[derive(Debug)]
pub struct Watch {
    slots: Vec<Slot>,
}

impl Watch {
    pub fn new(slots: usize) -> Watch {
        Watch {
            slots: (0..slots).map(|_| Slot::default()).collect(),
        }
    }

    pub fn begin(
        &self,
        slot: usize,
        now_ns: u64,
        op: OpKind,
        file: Option<u32>,
        offset: Option<u64>,
    ) {
        let s = &self.slots[slot];
        s.op.store(op.index() as u8, Ordering::Relaxed);
        s.file.store(file.unwrap_or(NO_FILE), Ordering::Relaxed);
        s.offset
            .store(offset.unwrap_or(NO_OFFSET), Ordering::Relaxed);
        s.reported.store(false, Ordering::Relaxed);
        s.started.store(now_ns + 1, Ordering::Release);
    }

    pub fn end(&self, slot: usize) {
        self.slots[slot].started.store(0, Ordering::Release);
    }

    /// Operations outstanding longer than `timeout_ns` that were not reported before.
    pub fn overdue(&self, now_ns: u64, timeout_ns: u64) -> Vec<Overdue> {
        let mut out = Vec::new();
        for s in &self.slots {
            let started = s.started.load(Ordering::Acquire);
            if started == 0 || now_ns.saturating_sub(started - 1) <= timeout_ns {
                continue;
            }
            if s.reported.swap(true, Ordering::Relaxed) {
                continue;
            }
            let file = s.file.load(Ordering::Relaxed);
            let offset = s.offset.load(Ordering::Relaxed);
            out.push(Overdue {
                op: OpKind::ALL[s.op.load(Ordering::Relaxed) as usize % OpKind::ALL.len()],
                file: (file != NO_FILE).then_some(file),
                offset: (offset != NO_OFFSET).then_some(offset),
                started_ns: started - 1,
            });
        }
        out
    }
}
