//! Byte offsets of the ring region (protocol v1). Offsets are chained so that a change
//! shows up in every later field; `RING.md` lists the same values and a test checks them.

use super::codec::{CQE_SIZE, SQE_SIZE};
use super::RingError;
use crate::BLOCK_SIZE;

/// "MOLTRING" little endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MOLTRING");
pub(crate) const PAGE: usize = 4096;
pub(crate) const CACHE_LINE: usize = 64;
pub const HEADER_SIZE: usize = PAGE;

// Line 0: geometry, written once by the creator.
pub const OFF_MAGIC: usize = 0; // u64
pub const OFF_VERSION: usize = OFF_MAGIC + 8; // u32
pub(crate) const OFF_QUEUE_DEPTH: usize = OFF_VERSION + 4; // u32
pub(crate) const OFF_SLOT_SIZE: usize = OFF_QUEUE_DEPTH + 4; // u32
pub(crate) const OFF_SQE_SIZE: usize = OFF_SLOT_SIZE + 4; // u16
pub(crate) const OFF_CQE_SIZE: usize = OFF_SQE_SIZE + 2; // u16
pub(crate) const OFF_SQ_OFFSET: usize = OFF_CQE_SIZE + 2; // u32
pub(crate) const OFF_CQ_OFFSET: usize = OFF_SQ_OFFSET + 4; // u32
pub(crate) const OFF_DATA_OFFSET: usize = OFF_CQ_OFFSET + 4; // u64
pub(crate) const OFF_TOTAL_SIZE: usize = OFF_DATA_OFFSET + 8; // u64
                                                              // Status code table version (0 in rings from builds before the field: table 1).
pub(crate) const OFF_STATUS_TABLE: usize = OFF_TOTAL_SIZE + 8; // u32
#[cfg(test)]
pub(crate) const GEOMETRY_END: usize = OFF_STATUS_TABLE + 4; // 52; 52..64 reserved (zero)

// Line 1: driver information, written by the driver.
pub(crate) const OFF_DRIVER_PHASE: usize = CACHE_LINE; // u32
pub(crate) const OFF_DRIVER_PID: usize = OFF_DRIVER_PHASE + 4; // u32
pub(crate) const OFF_NUM_BLOCKS: usize = OFF_DRIVER_PID + 4; // u64
pub const OFF_BLOCK_SIZE: usize = OFF_NUM_BLOCKS + 8; // u32
pub(crate) const OFF_LATCHED: usize = OFF_BLOCK_SIZE + 4; // i32
pub(crate) const OFF_HEARTBEAT: usize = OFF_LATCHED + 4; // u64
                                                         // Driver epoch (u32) and the sq_head that driver started from (u32), stored together as
                                                         // one u64 so that a reader never pairs one driver's epoch with another's position.
pub(crate) const OFF_DRIVER_EPOCH: usize = OFF_HEARTBEAT + 8; // u32
#[cfg(test)]
pub(crate) const OFF_EPOCH_SQ_HEAD: usize = OFF_DRIVER_EPOCH + 4; // u32
#[cfg(test)]
pub(crate) const DRIVER_END: usize = OFF_EPOCH_SQ_HEAD + 4; // 104; 104..128 reserved

// Queue indices and doorbell flags, one cache line each so producer and consumer do not
// share a line.
pub(crate) const OFF_SQ_HEAD: usize = 2 * CACHE_LINE; // u32, written by the driver
pub(crate) const OFF_SQ_TAIL: usize = OFF_SQ_HEAD + CACHE_LINE; // u32, written by the client
pub(crate) const OFF_CQ_HEAD: usize = OFF_SQ_TAIL + CACHE_LINE; // u32, written by the client
pub(crate) const OFF_CQ_TAIL: usize = OFF_CQ_HEAD + CACHE_LINE; // u32, written by the driver
pub(crate) const OFF_SQ_NEED_WAKEUP: usize = OFF_CQ_TAIL + CACHE_LINE; // u32, set by the driver
pub(crate) const OFF_CQ_NEED_WAKEUP: usize = OFF_SQ_NEED_WAKEUP + CACHE_LINE; // u32, set by the client

// Counters, written by the driver: 8 × u64.
pub(crate) const OFF_COUNTERS: usize = OFF_CQ_NEED_WAKEUP + CACHE_LINE; // 512
pub(crate) const COUNTER_COUNT: usize = 8;
#[cfg(test)]
pub(crate) const COUNTERS_END: usize = OFF_COUNTERS + COUNTER_COUNT * 8; // 576

/// Limits accepted by [`RingGeometry::validate`].
pub(crate) const MAX_QUEUE_DEPTH: u32 = 1024;
pub(crate) const MAX_SLOT_SIZE: u32 = 64 << 20;
pub(crate) const MAX_TOTAL_SIZE: u64 = 2 << 30;

/// Default slot size: 1 MiB.
pub(crate) const DEFAULT_SLOT_SIZE: u32 = 1 << 20;
pub(crate) const DEFAULT_QUEUE_DEPTH: u32 = 32;

/// The shape of a ring: how many requests can be in flight and how large a data slot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingGeometry {
    /// Entries in each queue, and number of data slots. A power of two.
    pub queue_depth: u32,
    /// Bytes per data slot: a multiple of the block size.
    pub slot_size: u32,
}

impl Default for RingGeometry {
    fn default() -> Self {
        RingGeometry {
            queue_depth: DEFAULT_QUEUE_DEPTH,
            slot_size: DEFAULT_SLOT_SIZE,
        }
    }
}

const fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

impl RingGeometry {
    pub fn validate(&self) -> Result<(), RingError> {
        let d = self.queue_depth;
        if d == 0 || d > MAX_QUEUE_DEPTH || !d.is_power_of_two() {
            return Err(RingError::Geometry(format!(
                "queue depth {d} must be a power of two in 1..={MAX_QUEUE_DEPTH}"
            )));
        }
        let s = self.slot_size;
        if s == 0 || s > MAX_SLOT_SIZE || s as usize & (BLOCK_SIZE - 1) != 0 {
            return Err(RingError::Geometry(format!(
                "slot size {s} must be a non-zero multiple of {BLOCK_SIZE} up to {MAX_SLOT_SIZE}"
            )));
        }
        if self.total_size() > MAX_TOTAL_SIZE {
            return Err(RingError::Geometry(format!(
                "ring of {} bytes is too large",
                self.total_size()
            )));
        }
        Ok(())
    }

    pub(crate) fn sq_offset(&self) -> u64 {
        HEADER_SIZE as u64
    }

    pub(crate) fn cq_offset(&self) -> u64 {
        self.sq_offset() + round_up(self.queue_depth as u64 * SQE_SIZE as u64, PAGE as u64)
    }

    pub(crate) fn data_offset(&self) -> u64 {
        self.cq_offset() + round_up(self.queue_depth as u64 * CQE_SIZE as u64, PAGE as u64)
    }

    pub(crate) fn total_size(&self) -> u64 {
        self.data_offset() + self.queue_depth as u64 * self.slot_size as u64
    }

    /// Largest block count one read or write request can carry.
    pub(crate) fn max_blocks_per_request(&self) -> u32 {
        self.slot_size / BLOCK_SIZE as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The offsets `RING.md` documents.
    #[test]
    fn offsets_match_spec() {
        assert_eq!(
            [
                OFF_VERSION,
                OFF_QUEUE_DEPTH,
                OFF_SLOT_SIZE,
                OFF_SQE_SIZE,
                OFF_CQE_SIZE
            ],
            [8, 12, 16, 20, 22]
        );
        assert_eq!(
            [
                OFF_SQ_OFFSET,
                OFF_CQ_OFFSET,
                OFF_DATA_OFFSET,
                OFF_TOTAL_SIZE
            ],
            [24, 28, 32, 40]
        );
        assert_eq!((OFF_STATUS_TABLE, GEOMETRY_END), (48, 52));
        assert_eq!(
            [
                OFF_DRIVER_PHASE,
                OFF_DRIVER_PID,
                OFF_NUM_BLOCKS,
                OFF_BLOCK_SIZE,
                OFF_LATCHED,
                OFF_HEARTBEAT,
                OFF_DRIVER_EPOCH,
                OFF_EPOCH_SQ_HEAD
            ],
            [64, 68, 72, 80, 84, 88, 96, 100]
        );
        assert_eq!(DRIVER_END, 104);
        const { assert!(OFF_DRIVER_EPOCH.is_multiple_of(8) && DRIVER_END <= OFF_SQ_HEAD) };
        assert_eq!(
            [
                OFF_SQ_HEAD,
                OFF_SQ_TAIL,
                OFF_CQ_HEAD,
                OFF_CQ_TAIL,
                OFF_SQ_NEED_WAKEUP,
                OFF_CQ_NEED_WAKEUP
            ],
            [128, 192, 256, 320, 384, 448]
        );
        assert_eq!((OFF_COUNTERS, COUNTERS_END), (512, 576));
        const { assert!(COUNTERS_END <= HEADER_SIZE) };
        assert_eq!(MAGIC.to_le_bytes(), *b"MOLTRING");
    }

    #[test]
    fn default_geometry() {
        let g = RingGeometry::default();
        g.validate().unwrap();
        assert_eq!(g.sq_offset(), 4096);
        assert_eq!(g.cq_offset(), 8192);
        assert_eq!(g.data_offset(), 12288);
        assert_eq!(g.total_size(), 12288 + 32 * (1 << 20));
        assert!(RingGeometry {
            queue_depth: 3,
            slot_size: 4096
        }
        .validate()
        .is_err());
        assert!(RingGeometry {
            queue_depth: 4,
            slot_size: 4097
        }
        .validate()
        .is_err());
    }
}
