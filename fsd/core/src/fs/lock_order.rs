//! The core's locks and their order, stated once and checked in debug builds:
//!
//! 1. an inode's data lock (`Fs::inode_io`, one of a fixed set of stripes chosen by
//!    inode number), held across a data write whose device I/O runs outside the
//!    filesystem lock: shared by whole-block overwrites, exclusive for writes that
//!    allocate or merge partial blocks and for size and allocation changes (truncate,
//!    fallocate), so a read-modify-write never races another write to its blocks;
//! 2. the filesystem lock (`Fs::lock`), around every operation's in-memory changes;
//! 3. the in-place writes lock (`Inner::in_place`), held while pinned blocks are written
//!    in place: by a checkpoint under the filesystem lock, or by a background checkpoint
//!    alone;
//! 4. the reuse guard (`Inner::reuse`), held shared by device I/O that runs outside the
//!    filesystem lock (taken before that lock is let go), and exclusively, under the
//!    filesystem lock, to release freed blocks for reuse.
//!
//! A thread waits for a lock only while it holds nothing later in the list, so no two
//! threads can wait for each other. Trying a lock (`try_write`) never waits and is not
//! ranked. The checks cost a thread-local counter per lock, in debug builds only.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rank {
    InodeData = 0,
    Filesystem = 1,
    InPlace = 2,
    Reuse = 3,
}

const RANKS: [Rank; 4] = [
    Rank::InodeData,
    Rank::Filesystem,
    Rank::InPlace,
    Rank::Reuse,
];

#[cfg(debug_assertions)]
thread_local! {
    /// How many locks of each rank this thread holds.
    static HELD: std::cell::Cell<[u8; 4]> = const { std::cell::Cell::new([0; 4]) };
}

/// Checks that this thread may wait for a lock of `rank`, and counts it as held until
/// the returned token drops.
#[track_caller]
pub(crate) fn waiting_for(rank: Rank) -> Held {
    #[cfg(debug_assertions)]
    HELD.with(|held| {
        let mut h = held.get();
        if let Some(later) = (rank as usize..RANKS.len()).find(|&r| h[r] > 0) {
            panic!(
                "lock order: waiting for the {rank:?} lock while holding the {:?} lock",
                RANKS[later]
            );
        }
        h[rank as usize] += 1;
        held.set(h);
    });
    Held(rank)
}

/// One lock of a rank, held by this thread.
pub(crate) struct Held(#[allow(dead_code)] Rank);

impl Drop for Held {
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        HELD.with(|held| {
            let mut h = held.get();
            h[self.0 as usize] -= 1;
            held.set(h);
        });
    }
}

/// The in-place writes lock, held.
pub(crate) struct InPlace<'a> {
    guard: MutexGuard<'a, u64>,
    _held: Held,
}

impl std::ops::Deref for InPlace<'_> {
    type Target = u64;
    fn deref(&self) -> &u64 {
        &self.guard
    }
}

impl std::ops::DerefMut for InPlace<'_> {
    fn deref_mut(&mut self) -> &mut u64 {
        &mut self.guard
    }
}

#[track_caller]
pub(crate) fn in_place(lock: &Mutex<u64>) -> InPlace<'_> {
    let held = waiting_for(Rank::InPlace);
    InPlace {
        guard: lock.lock().unwrap_or_else(|p| p.into_inner()),
        _held: held,
    }
}

/// An inode's data lock, held shared (whole-block overwrites) or exclusively.
pub(crate) struct InodeData<'a> {
    _guard: InodeDataGuard<'a>,
    _held: Held,
}

enum InodeDataGuard<'a> {
    Shared(#[allow(dead_code)] RwLockReadGuard<'a, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'a, ()>),
}

#[track_caller]
pub(crate) fn inode_shared(lock: &RwLock<()>) -> InodeData<'_> {
    let held = waiting_for(Rank::InodeData);
    InodeData {
        _guard: InodeDataGuard::Shared(lock.read().unwrap_or_else(|p| p.into_inner())),
        _held: held,
    }
}

#[track_caller]
pub(crate) fn inode_exclusive(lock: &RwLock<()>) -> InodeData<'_> {
    let held = waiting_for(Rank::InodeData);
    InodeData {
        _guard: InodeDataGuard::Exclusive(lock.write().unwrap_or_else(|p| p.into_inner())),
        _held: held,
    }
}

/// The reuse guard, held shared by I/O outside the filesystem lock.
pub(crate) struct ReuseShared<'a> {
    _guard: RwLockReadGuard<'a, ()>,
    _held: Held,
}

#[track_caller]
pub(crate) fn reuse_shared(lock: &RwLock<()>) -> ReuseShared<'_> {
    let held = waiting_for(Rank::Reuse);
    ReuseShared {
        _guard: lock.read().unwrap_or_else(|p| p.into_inner()),
        _held: held,
    }
}

/// The reuse guard, held exclusively: no I/O outside the filesystem lock is running.
pub(crate) struct ReuseExclusive<'a> {
    _guard: RwLockWriteGuard<'a, ()>,
    _held: Held,
}

#[track_caller]
pub(crate) fn reuse_exclusive(lock: &RwLock<()>) -> ReuseExclusive<'_> {
    let held = waiting_for(Rank::Reuse);
    ReuseExclusive {
        _guard: lock.write().unwrap_or_else(|p| p.into_inner()),
        _held: held,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_in_order_are_fine() {
        let (a, b) = (Mutex::new(0), RwLock::new(()));
        let fs = waiting_for(Rank::Filesystem);
        let ip = in_place(&a);
        drop(ip);
        let r = reuse_shared(&b);
        drop(fs);
        drop(r);
        let _fs = waiting_for(Rank::Filesystem);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "waiting for the Filesystem lock while holding the Reuse lock")]
    fn waiting_for_the_filesystem_lock_under_the_reuse_guard_is_caught() {
        let b = RwLock::new(());
        let _r = reuse_shared(&b);
        let _fs = waiting_for(Rank::Filesystem);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "waiting for the InPlace lock while holding the InPlace lock")]
    fn taking_the_in_place_lock_twice_is_caught() {
        let a = Mutex::new(0);
        let _x = in_place(&a);
        let _y = in_place(&a);
    }
}
