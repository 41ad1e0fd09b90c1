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
    withheld: Vec<(u64, u64)>,
    /// How many of the last `withheld` ranges were freed by changes not yet written to
    /// the journal: no checkpoint may release them, since a crash could still undo their
    /// freeing.
    unjournaled: usize,
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
            unjournaled: 0,
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
        bitmap::set_bit(&mut self.bits, i as usize, v);
        if v {
            self.free -= 1;
        } else {
            self.free += 1;
        }
        self.dirty.insert(i / BITS_PER_BITMAP_BLOCK);
    }

    /// Finds a run of up to `want` free items at or after `goal` (wrapping), preferring the
    /// first free item found. Returns (start, len) without marking it.
    pub(crate) fn find_run(&mut self, goal: u64, want: u64) -> Option<(u64, u64)> {
        if self.free <= self.withheld_count() || want == 0 {
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
        while len < want
            && start + len < self.items
            && !bitmap::get_bit(&self.bits, (start + len) as usize)
            && self.withheld_end(start + len).is_none()
        {
            len += 1;
        }
        self.cursor = start + len;
        Some((start, len))
    }

    fn find_free_from(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.items {
            let byte = self.bits[(i / 8) as usize];
            if byte == 0xFF && i.is_multiple_of(8) {
                i += 8;
                continue;
            }
            if !bitmap::get_bit(&self.bits, i as usize) {
                match self.withheld_end(i) {
                    Some(end) => {
                        i = end;
                        continue;
                    }
                    None => return Some(i),
                }
            }
            i += 1;
        }
        None
    }

    fn withheld_count(&self) -> u64 {
        self.withheld.iter().map(|(_, l)| l).sum()
    }

    /// End of the withheld range containing `i`, if any.
    fn withheld_end(&self, i: u64) -> Option<u64> {
        self.withheld
            .iter()
            .find(|(s, l)| i >= *s && i < s + l)
            .map(|(s, l)| s + l)
    }

    /// Clears the bits of a freed range but keeps it from being allocated until `release`.
    pub(crate) fn free_withheld(&mut self, start: u64, len: u64) {
        for i in start..start + len {
            self.set(i, false);
        }
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
        self.free - self.withheld_count()
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
    pub(crate) fn withhold(&mut self, start: u64, len: u64) {
        let at = self.withheld.len() - self.unjournaled;
        self.withheld.insert(at, (start, len));
    }

    /// Records that every range freed so far is named by a transaction in the journal.
    pub(crate) fn journaled(&mut self) {
        self.unjournaled = 0;
    }

    /// Makes the withheld ranges whose freeing is in the journal allocatable: the caller
    /// has made that journal durable and written it in place (a checkpoint). Ranges freed
    /// by changes not yet journaled stay withheld.
    pub fn release(&mut self) {
        let journaled = self.withheld.len() - self.unjournaled;
        self.withheld.drain(..journaled);
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
