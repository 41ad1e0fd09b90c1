//! Completion timeline and stall detection.
//!
//! Every completed operation (successful or not) is a completion. The timeline counts
//! completions per 10 ms since the start of the run; the stall tracker keeps the longest
//! window with no completion at all, measured between completion timestamps (so it is
//! not limited to the 10 ms resolution). It includes the time before the first
//! completion; a worker that runs out of work closes its window as if it completed
//! something, and a worker left stuck extends the window to the end of the run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Width of one timeline bucket, nanoseconds.
pub const BUCKET_NS: u64 = 10_000_000;

/// Completions per bucket, kept per thread and summed in the report.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    counts: Vec<u32>,
}

impl Timeline {
    pub fn record(&mut self, t_ns: u64) {
        let i = (t_ns / BUCKET_NS) as usize;
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] = self.counts[i].saturating_add(1);
    }

    pub fn merge(&mut self, other: &Timeline) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
    }

    /// Counts up to `end_ns`, zero-filled.
    pub fn into_counts(mut self, end_ns: u64) -> Vec<u32> {
        let len = (end_ns.div_ceil(BUCKET_NS) as usize).max(self.counts.len());
        self.counts.resize(len, 0);
        self.counts
    }
}

/// Longest gap between consecutive completions over all threads.
#[derive(Debug, Default)]
pub struct StallTracker {
    last: AtomicU64,
    longest: AtomicU64,
    /// (gap, start of gap), both ns since the start of the run.
    best: Mutex<(u64, u64)>,
}

impl StallTracker {
    pub fn completion(&self, now_ns: u64) {
        let prev = self.last.fetch_max(now_ns, Ordering::AcqRel);
        if now_ns <= prev {
            return;
        }
        let gap = now_ns - prev;
        if gap <= self.longest.load(Ordering::Relaxed) {
            return;
        }
        let mut best = self.best.lock().unwrap_or_else(|e| e.into_inner());
        if gap > best.0 {
            *best = (gap, prev);
            self.longest.store(gap, Ordering::Relaxed);
        }
    }

    /// Closes the window at `end_ns` and returns (gap, start) of the longest stall.
    pub fn finish(&self, end_ns: u64) -> (u64, u64) {
        self.completion(end_ns);
        self.longest()
    }

    /// (gap, start) of the longest stall so far.
    pub fn longest(&self) -> (u64, u64) {
        *self.best.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_gap_wins_including_the_tail() {
        let s = StallTracker::default();
        for t in [5, 10, 50, 52, 51] {
            s.completion(t);
        }
        assert_eq!(*s.best.lock().unwrap(), (40, 10));
        assert_eq!(s.finish(200), (148, 52));
    }

    #[test]
    fn timeline_buckets_by_ten_ms() {
        let mut t = Timeline::default();
        t.record(1);
        t.record(BUCKET_NS * 3 + 5);
        let mut u = Timeline::default();
        u.record(2);
        u.merge(&t);
        assert_eq!(u.into_counts(BUCKET_NS * 5), vec![2, 0, 0, 1, 0]);
    }
}
