//! In-memory copies of the allocation bitmaps. Changes mark the bitmap block dirty; the
//! filesystem stages dirty bitmap blocks into the transaction at commit.

use std::collections::BTreeSet;

use formats::bitmap;
use formats::block::PAYLOAD_SIZE;
use formats::superblock::BITS_PER_BITMAP_BLOCK;

pub struct Bitmap {
    /// Concatenated payloads of every bitmap block.
    bits: Vec<u8>,
    /// Items covered (bits at or past this are padding and always set).
    items: u64,
    free: u64,
    cursor: u64,
    dirty: BTreeSet<u64>,
    /// Free on disk but not yet allocatable: freed by a transaction not known durable.
    /// In the order they were withheld; a release takes a prefix.
    withheld: Vec<(u64, u64)>,
    /// One bit per item, set while it is withheld (the allocator's per-item test).
    withheld_bits: Vec<u64>,
    /// Items in `withheld`.
    withheld_items: u64,
    /// How many of the last `withheld` ranges were freed by changes not yet written to
    /// the journal: no checkpoint may release them, since a crash could still undo their
    /// freeing.
    unjournaled: usize,
    /// How many of the first `withheld` ranges a checkpoint has made reusable (their
    /// freeing is durable and written in place); `release` lets them go.
    releasable: usize,
}

impl Bitmap {
    pub fn new(bits: Vec<u8>, items: u64) -> Bitmap {
        assert!(bits.len() as u64 * 8 >= items && bits.len().is_multiple_of(PAYLOAD_SIZE));
        let mut free = 0;
        for i in 0..items {
            if !bitmap::get_bit(&bits, i as usize) {
                free += 1;
            }
        }
        Bitmap {
            bits,
            items,
            free,
            cursor: 0,
            dirty: BTreeSet::new(),
            withheld: Vec::new(),
            withheld_bits: vec![0; items.div_ceil(64) as usize],
            withheld_items: 0,
            unjournaled: 0,
            releasable: 0,
        }
    }

    pub fn free(&self) -> u64 {
        self.free
    }

    pub(crate) fn is_set(&self, i: u64) -> bool {
        i >= self.items || bitmap::get_bit(&self.bits, i as usize)
    }

    pub fn set(&mut self, i: u64, v: bool) {
        assert!(i < self.items, "bitmap index {i} past {}", self.items);
        let was = bitmap::get_bit(&self.bits, i as usize);
        assert_ne!(was, v, "bitmap bit {i} already {v}");
        debug_assert!(!(v && self.is_withheld(i)), "withheld item {i} allocated");
        bitmap::set_bit(&mut self.bits, i as usize, v);
        if v {
            self.free -= 1;
        } else {
            self.free += 1;
        }
        self.dirty.insert(i / BITS_PER_BITMAP_BLOCK);
    }

    fn is_withheld(&self, i: u64) -> bool {
        self.withheld_bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn mark_withheld(&mut self, start: u64, len: u64, on: bool) {
        for i in start..start + len {
            debug_assert_eq!(self.is_withheld(i), !on, "item {i} withheld twice");
            let word = &mut self.withheld_bits[(i / 64) as usize];
            if on {
                *word |= 1 << (i % 64);
            } else {
                *word &= !(1 << (i % 64));
            }
        }
        if on {
            self.withheld_items += len;
        } else {
            self.withheld_items -= len;
        }
    }

    /// Whether item `i` may be allocated: free and not withheld.
    fn is_allocatable(&self, i: u64) -> bool {
        !bitmap::get_bit(&self.bits, i as usize) && !self.is_withheld(i)
    }

    /// Items `64 * w ..` that cannot be allocated (set or withheld), one bit each; items
    /// past the end count as set.
    fn unavailable_word(&self, w: usize) -> u64 {
        let from = w * 8;
        let mut bytes = [0xFFu8; 8];
        let have = self.bits.len().saturating_sub(from).min(8);
        bytes[..have].copy_from_slice(&self.bits[from..from + have]);
        let mut word = u64::from_le_bytes(bytes) | self.withheld_bits[w];
        let past = (self.items as i64 - (w as i64 * 64)).clamp(0, 64) as u32;
        if past < 64 {
            word |= u64::MAX << past;
        }
        word
    }

    /// Finds a run of up to `want` free items at or after `goal` (wrapping), preferring the
    /// first free item found. Returns (start, len) without marking it.
    pub(crate) fn find_run(&mut self, goal: u64, want: u64) -> Option<(u64, u64)> {
        if self.free <= self.withheld_items || want == 0 {
            return None;
        }
        let goal = if goal >= self.items {
            self.cursor
        } else {
            goal
        };
        let start = self
            .find_free_from(goal)
            .or_else(|| self.find_free_from(0))?;
        let mut len = 1;
        while len < want && start + len < self.items && self.is_allocatable(start + len) {
            len += 1;
        }
        self.cursor = start + len;
        Some((start, len))
    }

    /// The first allocatable item at or after `from`, a 64-item word at a time.
    fn find_free_from(&self, from: u64) -> Option<u64> {
        if from >= self.items {
            return None;
        }
        let words = self.withheld_bits.len();
        let mut w = (from / 64) as usize;
        let mut mask = u64::MAX << (from % 64);
        while w < words {
            let open = !self.unavailable_word(w) & mask;
            if open != 0 {
                return Some(w as u64 * 64 + open.trailing_zeros() as u64);
            }
            mask = u64::MAX;
            w += 1;
        }
        None
    }

    /// Clears the bits of a freed range but keeps it from being allocated until `release`.
    pub(crate) fn free_withheld(&mut self, start: u64, len: u64) {
        for i in start..start + len {
            self.set(i, false);
        }
        self.mark_withheld(start, len, true);
        self.withheld.push((start, len));
        self.unjournaled += 1;
    }

    pub(crate) fn dirty_count(&self) -> usize {
        self.dirty.len()
    }

    pub(crate) fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Free items that may be allocated now.
    pub(crate) fn allocatable(&self) -> u64 {
        self.free - self.withheld_items
    }

    pub(crate) fn has_withheld(&self) -> bool {
        !self.withheld.is_empty()
    }

    /// Ranges freed but not yet allocatable.
    pub fn withheld(&self) -> &[(u64, u64)] {
        &self.withheld
    }

    /// Keeps an already-free range from being allocated until `release` (adopting a
    /// predecessor's withheld blocks, whose freeing is in its journal).
    /// Refuses a range that is not free or overlaps one withheld already.
    pub(crate) fn withhold(&mut self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len).filter(|&e| e <= self.items) else {
            return false;
        };
        if !(start..end).all(|i| self.is_allocatable(i)) {
            return false;
        }
        let at = self.withheld.len() - self.unjournaled;
        self.mark_withheld(start, len, true);
        self.withheld.insert(at, (start, len));
        true
    }

    /// Records that every range freed so far is named by a transaction in the journal.
    pub(crate) fn journaled(&mut self) {
        self.unjournaled = 0;
    }

    /// Records a checkpoint: the journal is durable and written in place, so the ranges
    /// whose freeing is in it may be reused once `release` runs (ranges freed by changes
    /// not yet journaled stay withheld, and so do ranges journaled after this call).
    pub(crate) fn checkpointed(&mut self) {
        self.releasable = self.withheld.len() - self.unjournaled;
    }

    /// Makes the ranges the last checkpoint made reusable allocatable.
    pub fn release(&mut self) {
        let ranges: Vec<(u64, u64)> = self.withheld.drain(..self.releasable).collect();
        for (start, len) in ranges {
            self.mark_withheld(start, len, false);
        }
        self.releasable = 0;
    }

    /// Whether a checkpoint made ranges reusable that are not released yet.
    pub(crate) fn has_releasable(&self) -> bool {
        self.releasable > 0
    }

    /// Payload of bitmap block `index`.
    pub(crate) fn block_payload(&self, index: u64) -> &[u8] {
        let off = index as usize * PAYLOAD_SIZE;
        &self.bits[off..off + PAYLOAD_SIZE]
    }

    pub(crate) fn take_dirty(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.dirty).into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random allocations, frees, commits, checkpoints and releases against a model of
    /// every item's state: the allocator never hands out an item in use or withheld,
    /// finds one whenever one is allocatable, and counts what it may allocate exactly.
    #[test]
    fn the_allocator_agrees_with_a_model_of_every_item() {
        #[derive(Clone, Copy, PartialEq, Debug)]
        enum Item {
            Free,
            Used,
            /// Withheld, freed by a change not yet journaled (false) or journaled (true).
            Withheld(bool),
            /// Withheld, made reusable by a checkpoint.
            Releasable,
        }
        // Items not a multiple of 64 nor of a payload's bits: padding and word edges.
        let items = (PAYLOAD_SIZE * 8 + 77) as u64;
        let mut bits = vec![0u8; PAYLOAD_SIZE * 2];
        for i in items..(bits.len() as u64 * 8) {
            bitmap::set_bit(&mut bits, i as usize, true);
        }
        let mut b = Bitmap::new(bits, items);
        let mut model = vec![Item::Free; items as usize];
        let mut used: Vec<u64> = Vec::new();
        let mut rng = crate::fs::crash_tests::Rng(0x9E37_79B9_7F4A_7C15u64);
        let mut rand = |k: u64| rng.below(k);
        for step in 0..20_000 {
            match rand(10) {
                0..=4 => {
                    let goal = rand(items + 10);
                    let want = 1 + rand(40);
                    match b.find_run(goal, want) {
                        Some((start, len)) => {
                            assert!(len >= 1 && len <= want, "step {step}");
                            for i in start..start + len {
                                assert_eq!(model[i as usize], Item::Free, "step {step}: item {i}");
                                b.set(i, true);
                                model[i as usize] = Item::Used;
                                used.push(i);
                            }
                        }
                        None => assert!(
                            !model.contains(&Item::Free),
                            "step {step}: nothing found with items free"
                        ),
                    }
                }
                5..=6 if !used.is_empty() => {
                    let i = used.swap_remove(rand(used.len() as u64) as usize);
                    b.free_withheld(i, 1);
                    model[i as usize] = Item::Withheld(false);
                }
                7 => {
                    b.journaled();
                    for m in model.iter_mut() {
                        if *m == Item::Withheld(false) {
                            *m = Item::Withheld(true);
                        }
                    }
                }
                8 => {
                    b.checkpointed();
                    for m in model.iter_mut() {
                        if *m == Item::Withheld(true) {
                            *m = Item::Releasable;
                        }
                    }
                }
                _ => {
                    b.release();
                    for m in model.iter_mut() {
                        if *m == Item::Releasable {
                            *m = Item::Free;
                        }
                    }
                }
            }
            let free = model.iter().filter(|m| **m == Item::Free).count() as u64;
            assert_eq!(b.allocatable(), free, "step {step}");
            assert_eq!(b.free(), items - used.len() as u64, "step {step}");
        }
    }

    #[test]
    fn a_withheld_range_that_is_not_free_or_is_withheld_twice_is_refused() {
        let items = 1000;
        let mut b = Bitmap::new(vec![0u8; PAYLOAD_SIZE], items);
        assert!(b.withhold(10, 5));
        assert!(!b.withhold(12, 1), "overlap");
        b.set(100, true);
        assert!(!b.withhold(99, 3), "in use");
        assert!(!b.withhold(995, 10), "past the end");
        assert!(!b.withhold(u64::MAX, 2), "overflow");
        assert_eq!(b.allocatable(), items - 5 - 1);
    }
}
