//! The shared-memory ring region.
//!
//! The region is a memfd sealed against shrinking and growing, so a peer cannot truncate
//! it under our mapping (which would turn every access into SIGBUS). Both processes touch
//! the header only through atomics, and entries and data slots only through raw-pointer
//! copies: no Rust reference to peer-writable bytes is ever created, and each entry is
//! copied out once before it is decoded and validated.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};

use super::codec::{CQE_SIZE, SQE_SIZE};
use super::layout::*;
use super::Counters;
use super::{ProtocolVersion, RingError, StatusTable};
use crate::BLOCK_SIZE;

/// What the driver is doing, as published in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum DriverPhase {
    /// No driver has attached yet.
    NotStarted = 0,
    /// Taking requests.
    Serving = 1,
    /// Stopped between requests (entries wait in the ring); a driver may resume.
    Quiesced = 2,
    /// The driver stopped serving this client because it broke the protocol.
    Rejected = 3,
}

impl DriverPhase {
    pub fn from_code(c: u32) -> Option<DriverPhase> {
        match c {
            0 => Some(DriverPhase::NotStarted),
            1 => Some(DriverPhase::Serving),
            2 => Some(DriverPhase::Quiesced),
            3 => Some(DriverPhase::Rejected),
            _ => None,
        }
    }
}

/// Which driver attachment the ring is in (header bytes 96..104).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverEpoch {
    /// Incremented (wrapping) by every driver that attaches: fresh, live-update successor
    /// or crash successor. 0 until the first attach (and in rings of older drivers).
    pub epoch: u32,
    /// The `sq_head` this driver started from: entries below it were taken by earlier
    /// drivers, entries from it on are this driver's to take.
    pub sq_head: u32,
}

impl DriverEpoch {
    fn to_word(self) -> u64 {
        self.epoch as u64 | (self.sq_head as u64) << 32
    }

    fn from_word(w: u64) -> DriverEpoch {
        DriverEpoch {
            epoch: w as u32,
            sq_head: (w >> 32) as u32,
        }
    }
}

/// A mapped ring region.
#[derive(Debug)]
pub struct RingRegion {
    map: Arc<MmapRaw>,
    fd: OwnedFd,
    geometry: RingGeometry,
    version: ProtocolVersion,
}

const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

impl RingRegion {
    /// Creates a new region (client side / supervisor): a sealed memfd with an
    /// initialised header and empty queues, speaking this build's protocol version and
    /// status code table.
    pub fn create(geometry: RingGeometry) -> Result<RingRegion, RingError> {
        RingRegion::create_versioned(geometry, ProtocolVersion::CURRENT, StatusTable::CURRENT)
    }

    /// Creates a region labelled with a given protocol version and status code table (a
    /// supervisor that starts components of another build than its own).
    pub fn create_versioned(
        geometry: RingGeometry,
        version: ProtocolVersion,
        table: StatusTable,
    ) -> Result<RingRegion, RingError> {
        if !version.is_known() {
            return Err(RingError::UnsupportedVersion(version.0));
        }
        if !table.is_known() {
            return Err(RingError::StatusTableMismatch {
                ring: table.0,
                uses: StatusTable::CURRENT.0,
            });
        }
        geometry.validate()?;
        let total = geometry.total_size();
        let name = std::ffi::CString::new("molt-ring").expect("no NUL");
        // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `raw` was just returned by memfd_create and is owned by nobody else.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        File::from(fd.try_clone()?).set_len(total)?;
        // SAFETY: F_ADD_SEALS takes an int argument; the fd is a memfd we own.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let region = RingRegion::map(fd, geometry, version)?;
        region.u64_at(OFF_MAGIC).store(MAGIC, Ordering::Relaxed);
        region
            .u32_at(OFF_VERSION)
            .store(version.0, Ordering::Relaxed);
        region
            .u32_at(OFF_STATUS_TABLE)
            .store(table.0, Ordering::Relaxed);
        region
            .u32_at(OFF_QUEUE_DEPTH)
            .store(geometry.queue_depth, Ordering::Relaxed);
        region
            .u32_at(OFF_SLOT_SIZE)
            .store(geometry.slot_size, Ordering::Relaxed);
        region.u32_at(OFF_SQE_SIZE).store(
            ((CQE_SIZE as u32) << 16) | SQE_SIZE as u32,
            Ordering::Relaxed,
        );
        region
            .u32_at(OFF_SQ_OFFSET)
            .store(geometry.sq_offset() as u32, Ordering::Relaxed);
        region
            .u32_at(OFF_CQ_OFFSET)
            .store(geometry.cq_offset() as u32, Ordering::Relaxed);
        region
            .u64_at(OFF_DATA_OFFSET)
            .store(geometry.data_offset(), Ordering::Relaxed);
        region
            .u64_at(OFF_TOTAL_SIZE)
            .store(total, Ordering::Release);
        Ok(region)
    }

    /// Maps an existing region received as an fd (driver side) and validates its header.
    /// The geometry is read once here; later changes to the header are ignored. Any known
    /// protocol version is accepted here (the layout is the same); a driver or client then
    /// checks that it speaks it with [`RingRegion::check_speaks`].
    pub fn open(fd: OwnedFd) -> Result<RingRegion, RingError> {
        // SAFETY: F_GET_SEALS only reads the seals of the file.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0
            || seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)
                != (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)
        {
            return Err(RingError::Corrupted(
                "ring fd is not a memfd sealed against resizing".into(),
            ));
        }
        let size = File::from(fd.try_clone()?).metadata()?.len();
        if size < HEADER_SIZE as u64 {
            return Err(RingError::Corrupted(format!(
                "ring of {size} bytes has no header"
            )));
        }
        let probe = RingRegion::map_len(fd, HEADER_SIZE as u64)?;
        let magic = probe.u64_at(OFF_MAGIC).load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(RingError::BadMagic(magic));
        }
        let version = ProtocolVersion(probe.u32_at(OFF_VERSION).load(Ordering::Relaxed));
        if !version.is_known() {
            return Err(RingError::UnsupportedVersion(version.0));
        }
        let geometry = RingGeometry {
            queue_depth: probe.u32_at(OFF_QUEUE_DEPTH).load(Ordering::Relaxed),
            slot_size: probe.u32_at(OFF_SLOT_SIZE).load(Ordering::Relaxed),
        };
        geometry.validate()?;
        let sizes = probe.u32_at(OFF_SQE_SIZE).load(Ordering::Relaxed);
        let consistent = sizes == ((CQE_SIZE as u32) << 16) | SQE_SIZE as u32
            && probe.u32_at(OFF_SQ_OFFSET).load(Ordering::Relaxed) as u64 == geometry.sq_offset()
            && probe.u32_at(OFF_CQ_OFFSET).load(Ordering::Relaxed) as u64 == geometry.cq_offset()
            && probe.u64_at(OFF_DATA_OFFSET).load(Ordering::Relaxed) == geometry.data_offset()
            && probe.u64_at(OFF_TOTAL_SIZE).load(Ordering::Relaxed) == geometry.total_size();
        if !consistent {
            return Err(RingError::Corrupted(
                "header offsets do not match its geometry".into(),
            ));
        }
        if size < geometry.total_size() {
            return Err(RingError::Corrupted(format!(
                "ring of {size} bytes is smaller than its geometry needs ({})",
                geometry.total_size()
            )));
        }
        RingRegion::map(probe.fd, geometry, version)
    }

    fn map_len(fd: OwnedFd, len: u64) -> Result<RingRegion, RingError> {
        let map = MmapOptions::new()
            .len(len as usize)
            .map_raw(&File::from(fd.try_clone()?))?;
        Ok(RingRegion {
            map: Arc::new(map),
            fd,
            geometry: RingGeometry {
                queue_depth: 1,
                slot_size: BLOCK_SIZE as u32,
            },
            version: ProtocolVersion::CURRENT,
        })
    }

    fn map(
        fd: OwnedFd,
        geometry: RingGeometry,
        version: ProtocolVersion,
    ) -> Result<RingRegion, RingError> {
        let mut r = RingRegion::map_len(fd, geometry.total_size())?;
        r.geometry = geometry;
        r.version = version;
        Ok(r)
    }

    pub fn geometry(&self) -> RingGeometry {
        self.geometry
    }

    /// The protocol version read when this mapping was made (entries are encoded with it).
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// Takes the header's current protocol version as this mapping's (a successor adopting
    /// a ring the supervisor relabelled while it was quiet).
    pub(crate) fn reload_version(&mut self) {
        self.version = self.header_version();
    }

    /// The protocol version the header says now.
    pub(crate) fn header_version(&self) -> ProtocolVersion {
        ProtocolVersion(self.u32_at(OFF_VERSION).load(Ordering::Acquire))
    }

    /// The status code table the header records (0, from builds before the field: v1).
    pub fn status_table(&self) -> StatusTable {
        match self.u32_at(OFF_STATUS_TABLE).load(Ordering::Acquire) {
            0 => StatusTable::V1,
            t => StatusTable(t),
        }
    }

    /// Checks that this build speaks the ring's protocol version and status code table, as
    /// the header says now. Drivers check before they attach and before they resume,
    /// clients before they connect.
    pub(crate) fn check_speaks(&self) -> Result<(), RingError> {
        let v = self.header_version();
        for seen in [v, self.version] {
            if !seen.is_supported() {
                return Err(RingError::ProtocolMismatch {
                    ring: seen.0,
                    speaks: ProtocolVersion::CURRENT.0,
                });
            }
        }
        let t = self.status_table();
        if t != StatusTable::CURRENT {
            return Err(RingError::StatusTableMismatch {
                ring: t.0,
                uses: StatusTable::CURRENT.0,
            });
        }
        Ok(())
    }

    /// Whether the ring is quiet: no driver serving, no entry waiting in either queue,
    /// nothing in flight. Only then may the supervisor relabel it.
    pub(crate) fn check_quiet(&self) -> Result<(), RingError> {
        if self.driver_phase() == Some(DriverPhase::Serving) {
            return Err(RingError::NotQuiet("a driver is serving it".into()));
        }
        let (sh, st) = (
            self.sq_head().load(Ordering::Acquire),
            self.sq_tail().load(Ordering::Acquire),
        );
        if sh != st {
            return Err(RingError::NotQuiet(format!(
                "{} submissions wait",
                st.wrapping_sub(sh)
            )));
        }
        let (ch, ct) = (
            self.cq_head().load(Ordering::Acquire),
            self.cq_tail().load(Ordering::Acquire),
        );
        if ch != ct {
            return Err(RingError::NotQuiet(format!(
                "{} completions are unclaimed",
                ct.wrapping_sub(ch)
            )));
        }
        let in_flight = self.counters().in_flight;
        if in_flight != 0 {
            return Err(RingError::NotQuiet(format!(
                "{in_flight} requests in flight"
            )));
        }
        Ok(())
    }

    /// Client side, for a client that died: drops every completion posted so far (nobody
    /// will claim them).
    pub fn discard_completions(&self) {
        self.cq_head()
            .store(self.cq_tail().load(Ordering::Acquire), Ordering::Release);
    }

    /// Whether everything a client that died had submitted is done and discarded: the
    /// driver took every entry (sq_head = sq_tail), posted a completion for each
    /// (cq_tail = sq_head: each taken entry gets exactly one and both positions only grow)
    /// and those were discarded (cq_head = cq_tail). Then no slot is in use and a new
    /// client may connect. (The published `in_flight` counter lags: the driver writes it
    /// after a batch of completions, not when it takes an entry.)
    pub fn abandoned_work_settled(&self) -> bool {
        let sq_head = self.sq_head().load(Ordering::Acquire);
        let cq_tail = self.cq_tail().load(Ordering::Acquire);
        sq_head == self.sq_tail().load(Ordering::Acquire)
            && cq_tail == sq_head
            && self.cq_head().load(Ordering::Acquire) == cq_tail
    }

    /// Relabels a quiet ring with another protocol version, for an update that replaces
    /// the driver and every client together (the region layout is the same for every known
    /// version; only entries change). Refused unless [`RingRegion::check_quiet`] passes.
    /// Other mappings keep the version they read; their owners must be replaced.
    pub fn set_protocol_version(&mut self, v: ProtocolVersion) -> Result<(), RingError> {
        if !v.is_known() {
            return Err(RingError::UnsupportedVersion(v.0));
        }
        self.check_quiet()?;
        self.u32_at(OFF_VERSION).store(v.0, Ordering::Release);
        self.version = v;
        Ok(())
    }

    /// Relabels a quiet ring with another status code table (an update of the driver and
    /// every client together). A latched error code in the header is translated.
    pub fn set_status_table(&mut self, t: StatusTable) -> Result<(), RingError> {
        if !t.is_known() {
            return Err(RingError::StatusTableMismatch {
                ring: t.0,
                uses: StatusTable::CURRENT.0,
            });
        }
        self.check_quiet()?;
        let old = self.status_table();
        let latched = self.latched();
        if latched != 0 {
            let s = old.status(latched).unwrap_or(super::Status::Io);
            self.publish_latched(t.code(s));
        }
        self.u32_at(OFF_STATUS_TABLE).store(t.0, Ordering::Release);
        Ok(())
    }

    /// The memfd, to pass to the other process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(off & 3 == 0 && off + 4 <= HEADER_SIZE);
        // SAFETY: the header page is mapped for the lifetime of `self` (the mapping is
        // at least HEADER_SIZE long), `off` is in the header and 4-aligned (checked above;
        // the mapping is page-aligned), and the peer accesses header words only atomically.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU32) }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(off & 7 == 0 && off + 8 <= HEADER_SIZE);
        // SAFETY: as in `u32_at`, with 8-byte alignment.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU64) }
    }

    pub fn sq_head(&self) -> &AtomicU32 {
        self.u32_at(OFF_SQ_HEAD)
    }
    pub fn sq_tail(&self) -> &AtomicU32 {
        self.u32_at(OFF_SQ_TAIL)
    }
    pub fn cq_head(&self) -> &AtomicU32 {
        self.u32_at(OFF_CQ_HEAD)
    }
    pub fn cq_tail(&self) -> &AtomicU32 {
        self.u32_at(OFF_CQ_TAIL)
    }
    /// Set by the driver before it sleeps; a client that sees it set after publishing
    /// entries clears it and signals the submission eventfd.
    pub(crate) fn sq_need_wakeup(&self) -> &AtomicU32 {
        self.u32_at(OFF_SQ_NEED_WAKEUP)
    }
    /// Set by a client before it sleeps; the driver clears it and signals the completion
    /// eventfd after publishing completions.
    pub(crate) fn cq_need_wakeup(&self) -> &AtomicU32 {
        self.u32_at(OFF_CQ_NEED_WAKEUP)
    }
    pub fn heartbeat(&self) -> &AtomicU64 {
        self.u64_at(OFF_HEARTBEAT)
    }

    /// The epoch and starting position of the driver that attached last, read as one word.
    pub fn driver_epoch(&self) -> DriverEpoch {
        DriverEpoch::from_word(self.u64_at(OFF_DRIVER_EPOCH).load(Ordering::Acquire))
    }

    /// Publishes a new driver epoch (driver side, at attach): one release store, after the
    /// device, counters and queue positions the driver starts from.
    pub fn publish_epoch(&self, e: DriverEpoch) {
        self.u64_at(OFF_DRIVER_EPOCH)
            .store(e.to_word(), Ordering::Release);
    }

    pub fn driver_phase(&self) -> Option<DriverPhase> {
        DriverPhase::from_code(self.u32_at(OFF_DRIVER_PHASE).load(Ordering::Acquire))
    }
    pub fn set_driver_phase(&self, p: DriverPhase) {
        self.u32_at(OFF_DRIVER_PHASE)
            .store(p as u32, Ordering::Release);
    }
    pub fn driver_pid(&self) -> u32 {
        self.u32_at(OFF_DRIVER_PID).load(Ordering::Relaxed)
    }
    pub fn num_blocks(&self) -> u64 {
        self.u64_at(OFF_NUM_BLOCKS).load(Ordering::Acquire)
    }
    pub fn block_size(&self) -> u32 {
        self.u32_at(OFF_BLOCK_SIZE).load(Ordering::Acquire)
    }
    pub fn latched(&self) -> i32 {
        self.u32_at(OFF_LATCHED).load(Ordering::Acquire) as i32
    }

    /// Publishes the device geometry (driver side), before the phase becomes `Serving`.
    pub fn publish_device(&self, num_blocks: u64, pid: u32) {
        self.u64_at(OFF_NUM_BLOCKS)
            .store(num_blocks, Ordering::Relaxed);
        self.u32_at(OFF_BLOCK_SIZE)
            .store(BLOCK_SIZE as u32, Ordering::Relaxed);
        self.u32_at(OFF_DRIVER_PID).store(pid, Ordering::Relaxed);
    }

    pub(crate) fn publish_latched(&self, code: i32) {
        self.u32_at(OFF_LATCHED)
            .store(code as u32, Ordering::Release);
    }

    pub fn publish_counters(&self, c: &Counters) {
        for (i, v) in c.to_array().into_iter().enumerate() {
            self.u64_at(OFF_COUNTERS + 8 * i)
                .store(v, Ordering::Relaxed);
        }
    }

    pub fn counters(&self) -> Counters {
        let mut a = [0u64; COUNTER_COUNT];
        for (i, v) in a.iter_mut().enumerate() {
            *v = self.u64_at(OFF_COUNTERS + 8 * i).load(Ordering::Relaxed);
        }
        Counters::from_array(a)
    }

    fn sqe_ptr(&self, index: u32) -> *mut u8 {
        let i = (index & (self.geometry.queue_depth - 1)) as u64;
        let off = self.geometry.sq_offset() + i * SQE_SIZE as u64;
        // In bounds: the SQ area holds queue_depth entries inside the mapping.
        self.map.as_mut_ptr().wrapping_add(off as usize)
    }

    fn cqe_ptr(&self, index: u32) -> *mut u8 {
        let i = (index & (self.geometry.queue_depth - 1)) as u64;
        let off = self.geometry.cq_offset() + i * CQE_SIZE as u64;
        self.map.as_mut_ptr().wrapping_add(off as usize)
    }

    /// Copies submission entry `index` (a free-running counter) out of shared memory.
    pub(crate) fn read_sqe(&self, index: u32) -> [u8; SQE_SIZE] {
        // SAFETY: `sqe_ptr` masks the index into the SQ area, which lies inside the mapping
        // and is valid for SQE_SIZE bytes; a volatile copy of plain bytes is sound even if
        // the peer writes concurrently (a torn entry fails its crc).
        unsafe { std::ptr::read_volatile(self.sqe_ptr(index) as *const [u8; SQE_SIZE]) }
    }

    pub fn write_sqe(&self, index: u32, bytes: &[u8; SQE_SIZE]) {
        // SAFETY: as in `read_sqe`; the slot is owned by the producer until the tail moves.
        unsafe { std::ptr::write_volatile(self.sqe_ptr(index) as *mut [u8; SQE_SIZE], *bytes) }
    }

    pub fn read_cqe(&self, index: u32) -> [u8; CQE_SIZE] {
        // SAFETY: `cqe_ptr` masks the index into the CQ area inside the mapping.
        unsafe { std::ptr::read_volatile(self.cqe_ptr(index) as *const [u8; CQE_SIZE]) }
    }

    pub(crate) fn write_cqe(&self, index: u32, bytes: &[u8; CQE_SIZE]) {
        // SAFETY: as in `read_cqe`.
        unsafe { std::ptr::write_volatile(self.cqe_ptr(index) as *mut [u8; CQE_SIZE], *bytes) }
    }

    /// Address of data slot `slot`. Panics if `slot >= queue_depth`.
    pub(crate) fn slot_ptr(&self, slot: u32) -> *mut u8 {
        assert!(slot < self.geometry.queue_depth, "slot {slot} out of range");
        let off = self.geometry.data_offset() + slot as u64 * self.geometry.slot_size as u64;
        self.map.as_mut_ptr().wrapping_add(off as usize)
    }

    /// `(address, length)` of every data slot, for engine buffer registration.
    /// The mapping itself, for an engine that must keep the data slots mapped for as long
    /// as they are registered with it.
    pub(crate) fn mapping(&self) -> Arc<MmapRaw> {
        Arc::clone(&self.map)
    }

    pub(crate) fn slot_regions(&self) -> Vec<(usize, usize)> {
        (0..self.geometry.queue_depth)
            .map(|s| (self.slot_ptr(s) as usize, self.geometry.slot_size as usize))
            .collect()
    }

    /// Copies `src` into data slot `slot` at byte `offset`.
    pub fn copy_to_slot(&self, slot: u32, offset: usize, src: &[u8]) {
        assert!(offset + src.len() <= self.geometry.slot_size as usize);
        // SAFETY: the destination lies inside slot `slot` (bounds checked above and in
        // `slot_ptr`), which is inside the mapping; `src` is a distinct local buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.slot_ptr(slot).add(offset), src.len())
        }
    }

    /// Copies data slot `slot` from byte `offset` into `dst`.
    pub fn copy_from_slot(&self, slot: u32, offset: usize, dst: &mut [u8]) {
        assert!(offset + dst.len() <= self.geometry.slot_size as usize);
        // SAFETY: as in `copy_to_slot`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.slot_ptr(slot).add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        }
    }

    /// A duplicate of the region's fd (e.g. to keep while a driver is replaced).
    pub(crate) fn try_clone_fd(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Maps the same memfd again: a second view of the same shared memory.
    pub fn try_clone(&self) -> Result<RingRegion, RingError> {
        RingRegion::map(self.fd.try_clone()?, self.geometry, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// The epoch word lies where `RING.md` says: epoch at 96, its sq_head at 100, LE.
    #[test]
    fn epoch_word_bytes() {
        let ring = RingRegion::create(RingGeometry {
            queue_depth: 4,
            slot_size: 4096,
        })
        .unwrap();
        assert_eq!(ring.driver_epoch(), DriverEpoch::default());
        let e = DriverEpoch {
            epoch: 0x0102_0304,
            sq_head: 0xA0B0_C0D0,
        };
        ring.publish_epoch(e);
        assert_eq!(ring.driver_epoch(), e);
        let mut b = [0u8; 8];
        File::from(ring.try_clone_fd().unwrap())
            .read_exact_at(&mut b, OFF_DRIVER_EPOCH as u64)
            .unwrap();
        assert_eq!(b, [4, 3, 2, 1, 0xD0, 0xC0, 0xB0, 0xA0]);
    }
}
