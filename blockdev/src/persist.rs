//! State the driver exports when it stops between requests, for a successor to import.
//!
//! The in-memory form is [`DriverState`]. The wire form is a `formats::frame` (magic
//! `"MBDS"`, version = state schema, length checked against [`STATE_CAP`] before anything
//! else, crc32) around the payload of a frozen struct: [`v1::DriverStateV1`] (schema 1,
//! 32-bit counters: the driver built with `legacy-counters-u32`) or [`v2::DriverStateV2`]
//! (schema 2, 64-bit counters: the default build). A changed field is a new schema; old
//! schemas are converted with `From`/`TryFrom` and never edited. `RING.md` ("Live update")
//! gives the byte layouts.

use crate::engine::EngineKind;
use crate::ring::{ProtocolVersion, RingGeometry, Status, StatusTable};

/// `"MBDS"`: Molt block driver state.
pub const STATE_MAGIC: u32 = u32::from_le_bytes(*b"MBDS");
/// Largest payload accepted, checked before the payload is looked at.
pub const STATE_CAP: u64 = 4096;

/// The schema of an exported driver state. Ask it about capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StateVersion(pub u32);

impl StateVersion {
    /// 32-bit I/O counters.
    pub const V1: StateVersion = StateVersion(1);
    /// 64-bit I/O counters.
    pub const V2: StateVersion = StateVersion(2);
    /// The schema this build exports.
    #[cfg(feature = "legacy-counters-u32")]
    pub const CURRENT: StateVersion = StateVersion::V1;
    #[cfg(not(feature = "legacy-counters-u32"))]
    pub const CURRENT: StateVersion = StateVersion::V2;

    /// Schemas this build imports: its own and older ones, never newer ones.
    #[cfg(feature = "legacy-counters-u32")]
    pub const ACCEPTED: &'static [StateVersion] = &[StateVersion::V1];
    #[cfg(not(feature = "legacy-counters-u32"))]
    pub const ACCEPTED: &'static [StateVersion] = &[StateVersion::V1, StateVersion::V2];

    pub fn is_importable(self) -> bool {
        StateVersion::ACCEPTED.contains(&self)
    }
}

/// The version of this driver build, as `blockdev component-info` shows it. Pre-release
/// `-counters32` marks the old driver (u32 counters, schema 1); build metadata names the
/// protocol variants (`+ring48`, `+errcodes2`).
/// What this build is, for the update manager's probe (`blockdev component-info`).
pub fn component_info() -> molt_control::ComponentInfo {
    molt_control::ComponentInfo {
        name: "blockdev".into(),
        version: COMPONENT_VERSION.into(),
        state_schema: StateVersion::CURRENT.0,
        state_schema_reads: StateVersion::ACCEPTED.iter().map(|v| v.0).collect(),
        ring: crate::ring::ProtocolVersion::CURRENT.0,
        errcodes: crate::ring::StatusTable::CURRENT.0,
    }
}

pub const COMPONENT_VERSION: &str = match (
    cfg!(feature = "legacy-counters-u32"),
    cfg!(feature = "ring48"),
    cfg!(feature = "errcodes-v2"),
) {
    (false, false, false) => "0.2.0",
    (false, true, false) => "0.2.0+ring48",
    (false, false, true) => "0.2.0+errcodes2",
    (false, true, true) => "0.2.0+ring48.errcodes2",
    (true, false, false) => "0.1.0-counters32",
    (true, true, false) => "0.1.0-counters32+ring48",
    (true, false, true) => "0.1.0-counters32+errcodes2",
    (true, true, true) => "0.1.0-counters32+ring48.errcodes2",
};

/// Why a state could not be exported or imported. Corruption, an unsupported schema and a
/// state that does not fit this driver are kept apart.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The frame is damaged (magic, length cap, size, crc).
    #[error("corrupt state blob: {0}")]
    Frame(#[from] formats::FormatError),
    #[error("unsupported state schema {0}")]
    UnsupportedSchema(u32),
    /// The frame is intact but a field holds an impossible value.
    #[error("corrupt state: {0}")]
    Corrupted(String),
    /// An invariant of a state taken between requests does not hold.
    #[error("inconsistent state: {0}")]
    Inconsistent(String),
    /// A value does not fit the narrower schema asked for.
    #[error("state does not fit schema {schema}: {what}")]
    DoesNotFit { schema: u32, what: String },
    /// The state is sound but not for this ring or image.
    #[error("state does not match this driver: {0}")]
    Mismatch(String),
}

pub use crate::ring::Counters;

/// Width of the driver's I/O counters in this build: u32 in the old driver
/// (`legacy-counters-u32`), where they wrap; u64 otherwise.
#[cfg(feature = "legacy-counters-u32")]
pub type Count = u32;
#[cfg(not(feature = "legacy-counters-u32"))]
pub type Count = u64;

/// The driver's own I/O counters, in this build's width.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct IoCounters {
    pub reads: Count,
    pub writes: Count,
    pub flushes: Count,
    pub discards: Count,
    pub bytes_read: Count,
    pub bytes_written: Count,
    pub errors: Count,
}

impl IoCounters {
    /// Adds `n` to a counter, wrapping at the counter's width.
    // The cast truncates in the u32 build (that is the wrap) and is a no-op otherwise.
    #[allow(clippy::unnecessary_cast)]
    pub(crate) fn bump(c: &mut Count, n: u64) {
        *c = c.wrapping_add(n as Count);
    }

    /// The header view, with `in_flight` added.
    // Widens in the u32 build; the same type otherwise.
    #[allow(clippy::useless_conversion)]
    pub fn view(&self, in_flight: u64) -> Counters {
        Counters {
            reads: u64::from(self.reads),
            writes: u64::from(self.writes),
            flushes: u64::from(self.flushes),
            discards: u64::from(self.discards),
            bytes_read: u64::from(self.bytes_read),
            bytes_written: u64::from(self.bytes_written),
            errors: u64::from(self.errors),
            in_flight,
        }
    }

    /// Takes counters over from a view; fails if one does not fit this build's width.
    pub(crate) fn from_view(c: &Counters) -> Result<IoCounters, StateError> {
        let fit = |v: u64, name: &str| {
            Count::try_from(v).map_err(|_| StateError::DoesNotFit {
                schema: StateVersion::CURRENT.0,
                what: format!("{name} = {v}"),
            })
        };
        Ok(IoCounters {
            reads: fit(c.reads, "reads")?,
            writes: fit(c.writes, "writes")?,
            flushes: fit(c.flushes, "flushes")?,
            discards: fit(c.discards, "discards")?,
            bytes_read: fit(c.bytes_read, "bytes_read")?,
            bytes_written: fit(c.bytes_written, "bytes_written")?,
            errors: fit(c.errors, "errors")?,
        })
    }
}

/// Why the serve loop returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A stop was requested (a stop signal, or `server::StopHandle::stop`).
    Requested,
    /// Stopped to prepare a live update (`server::StopHandle::prepare`); the
    /// driver holds and may resume.
    Prepare,
    /// The client process exited.
    ClientGone,
    /// The client broke the ring protocol; it is no longer served.
    ProtocolViolation(String),
}

/// The driver's state, in memory. Taken only when nothing is in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverState {
    pub counters: Counters,
    pub geometry: RingGeometry,
    pub num_blocks: u64,
    pub engine: EngineKind,
    /// The latched write/flush error, if any.
    pub latched: Option<Status>,
    /// Next submission index the driver will read.
    pub sq_head: u32,
    /// Next completion index the driver will write.
    pub cq_tail: u32,
    /// The ring protocol version the driver spoke.
    pub ring_version: ProtocolVersion,
    pub reason: StopReason,
}

impl DriverState {
    /// Invariants of a state taken between requests: nothing in flight, every entry taken
    /// from the submission queue has its completion posted (each taken entry yields exactly
    /// one completion, and both positions start at 0), a valid geometry, a device that fits
    /// the protocol's address width.
    pub fn check(&self) -> Result<(), StateError> {
        let bad = |m: String| Err(StateError::Inconsistent(m));
        if self.counters.in_flight != 0 {
            return bad(format!("{} requests in flight", self.counters.in_flight));
        }
        if self.sq_head != self.cq_tail {
            return bad(format!(
                "submission head {} differs from completion tail {}: a completion is missing",
                self.sq_head, self.cq_tail
            ));
        }
        if let Err(e) = self.geometry.validate() {
            return bad(e.to_string());
        }
        if !self.ring_version.is_known() {
            return bad(format!("unknown ring protocol v{}", self.ring_version.0));
        }
        if self.num_blocks > self.ring_version.max_blocks() {
            return bad(format!(
                "{} blocks do not fit protocol v{}",
                self.num_blocks, self.ring_version.0
            ));
        }
        if matches!(self.reason, StopReason::ProtocolViolation(_)) {
            return bad("the client broke the protocol".into());
        }
        Ok(())
    }

    /// Checks the state and encodes it in this build's schema.
    pub fn export(&self) -> Result<Vec<u8>, StateError> {
        self.export_as(StateVersion::CURRENT)
    }

    /// Checks the state and encodes it in schema `v` (an older one for a downgrade: fails
    /// if a counter does not fit).
    pub(crate) fn export_as(&self, v: StateVersion) -> Result<Vec<u8>, StateError> {
        self.check()?;
        let wide = v2::DriverStateV2::from(self);
        let payload = match v {
            StateVersion::V2 => wide.encode(),
            StateVersion::V1 => v1::DriverStateV1::try_from(&wide)?.encode(),
            other => return Err(StateError::UnsupportedSchema(other.0)),
        };
        Ok(formats::frame::encode(STATE_MAGIC, v.0, &payload))
    }

    /// Decodes, converts and checks a state blob in a schema this build imports.
    pub fn import(blob: &[u8]) -> Result<DriverState, StateError> {
        DriverState::import_accepting(blob, StateVersion::ACCEPTED)
    }

    /// As [`DriverState::import`], accepting the schemas in `accepted` only.
    pub fn import_accepting(
        blob: &[u8],
        accepted: &[StateVersion],
    ) -> Result<DriverState, StateError> {
        let frame = formats::frame::decode("driver state", blob, STATE_MAGIC, STATE_CAP)?;
        let v = StateVersion(frame.version);
        if !accepted.contains(&v) {
            return Err(StateError::UnsupportedSchema(v.0));
        }
        let wide = match v {
            StateVersion::V1 => v1::DriverStateV1::decode(frame.payload)?.into(),
            StateVersion::V2 => v2::DriverStateV2::decode(frame.payload)?,
            other => return Err(StateError::UnsupportedSchema(other.0)),
        };
        let state = DriverState::try_from(wide)?;
        state.check()?;
        Ok(state)
    }

    /// The schema of a blob, from its frame header (no checks).
    pub fn schema_of(blob: &[u8]) -> Option<StateVersion> {
        blob.get(4..8)
            .map(|b| StateVersion(u32::from_le_bytes(b.try_into().expect("4 bytes"))))
    }
}

fn engine_code(e: EngineKind) -> u32 {
    match e {
        EngineKind::Uring => 1,
        EngineKind::Sync => 2,
        EngineKind::Nbd => 3,
    }
}

fn engine_of(code: u32) -> Option<EngineKind> {
    match code {
        1 => Some(EngineKind::Uring),
        2 => Some(EngineKind::Sync),
        3 => Some(EngineKind::Nbd),
        _ => None,
    }
}

/// Little-endian field reader over a payload whose length was checked.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn u32(&mut self) -> u32 {
        let (h, t) = self.0.split_at(4);
        self.0 = t;
        u32::from_le_bytes(h.try_into().expect("4 bytes"))
    }
    fn u64(&mut self) -> u64 {
        let (h, t) = self.0.split_at(8);
        self.0 = t;
        u64::from_le_bytes(h.try_into().expect("8 bytes"))
    }
}

/// Fields common to both schemas (offsets 0..40 of the payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CommonV1 {
    pub ring_version: u32,
    /// Status code table `latched` is written in.
    pub status_table: u32,
    pub queue_depth: u32,
    pub slot_size: u32,
    pub num_blocks: u64,
    /// 1 io_uring, 2 syscalls.
    pub engine: u32,
    /// Wire code of the latched error, 0 if none.
    pub latched: i32,
    pub sq_head: u32,
    pub cq_tail: u32,
}

impl CommonV1 {
    const SIZE: usize = 40;

    fn encode(&self, out: &mut Vec<u8>) {
        for v in [
            self.ring_version,
            self.status_table,
            self.queue_depth,
            self.slot_size,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.num_blocks.to_le_bytes());
        for v in [self.engine, self.latched as u32, self.sq_head, self.cq_tail] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn decode(f: &mut Fields<'_>) -> CommonV1 {
        CommonV1 {
            ring_version: f.u32(),
            status_table: f.u32(),
            queue_depth: f.u32(),
            slot_size: f.u32(),
            num_blocks: f.u64(),
            engine: f.u32(),
            latched: f.u32() as i32,
            sq_head: f.u32(),
            cq_tail: f.u32(),
        }
    }
}

fn exact_len(schema: u32, payload: &[u8], size: usize) -> Result<(), StateError> {
    if payload.len() != size {
        return Err(StateError::Corrupted(format!(
            "schema {schema} payload is {} bytes, expected {size}",
            payload.len()
        )));
    }
    Ok(())
}

/// Schema 1. Frozen: do not change; add a schema instead.
pub mod v1 {
    use super::{exact_len, CommonV1, Fields, StateError};

    /// Payload: [`CommonV1`] (40 bytes), `in_flight` u32, then reads, writes, flushes,
    /// discards, bytes_read, bytes_written, errors as u32. 72 bytes.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) struct DriverStateV1 {
        pub common: CommonV1,
        pub in_flight: u32,
        pub counters: [u32; 7],
    }

    impl DriverStateV1 {
        pub const SIZE: usize = CommonV1::SIZE + 4 + 7 * 4;

        pub fn encode(&self) -> Vec<u8> {
            let mut out = Vec::with_capacity(Self::SIZE);
            self.common.encode(&mut out);
            out.extend_from_slice(&self.in_flight.to_le_bytes());
            for c in self.counters {
                out.extend_from_slice(&c.to_le_bytes());
            }
            out
        }

        pub fn decode(payload: &[u8]) -> Result<DriverStateV1, StateError> {
            exact_len(1, payload, Self::SIZE)?;
            let mut f = Fields(payload);
            let common = CommonV1::decode(&mut f);
            let in_flight = f.u32();
            let counters = std::array::from_fn(|_| f.u32());
            Ok(DriverStateV1 {
                common,
                in_flight,
                counters,
            })
        }
    }
}

/// Schema 2. Frozen: do not change; add a schema instead.
pub mod v2 {
    use super::{exact_len, CommonV1, Fields, StateError};

    /// Payload: [`CommonV1`] (40 bytes), `in_flight` u64, then the seven counters as u64.
    /// 104 bytes.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) struct DriverStateV2 {
        pub common: CommonV1,
        pub in_flight: u64,
        pub counters: [u64; 7],
    }

    impl DriverStateV2 {
        pub const SIZE: usize = CommonV1::SIZE + 8 + 7 * 8;

        pub fn encode(&self) -> Vec<u8> {
            let mut out = Vec::with_capacity(Self::SIZE);
            self.common.encode(&mut out);
            out.extend_from_slice(&self.in_flight.to_le_bytes());
            for c in self.counters {
                out.extend_from_slice(&c.to_le_bytes());
            }
            out
        }

        pub fn decode(payload: &[u8]) -> Result<DriverStateV2, StateError> {
            exact_len(2, payload, Self::SIZE)?;
            let mut f = Fields(payload);
            let common = CommonV1::decode(&mut f);
            let in_flight = f.u64();
            let counters = std::array::from_fn(|_| f.u64());
            Ok(DriverStateV2 {
                common,
                in_flight,
                counters,
            })
        }
    }
}

/// Widening: every schema 1 state is a schema 2 state.
impl From<v1::DriverStateV1> for v2::DriverStateV2 {
    fn from(s: v1::DriverStateV1) -> Self {
        v2::DriverStateV2 {
            common: s.common,
            in_flight: s.in_flight as u64,
            counters: s.counters.map(u64::from),
        }
    }
}

/// Narrowing, for a downgrade: fails if a counter does not fit 32 bits.
impl TryFrom<&v2::DriverStateV2> for v1::DriverStateV1 {
    type Error = StateError;
    fn try_from(s: &v2::DriverStateV2) -> Result<Self, StateError> {
        const NAMES: [&str; 7] = [
            "reads",
            "writes",
            "flushes",
            "discards",
            "bytes_read",
            "bytes_written",
            "errors",
        ];
        let narrow = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| StateError::DoesNotFit {
                schema: 1,
                what: format!("{what} = {v}"),
            })
        };
        let mut counters = [0u32; 7];
        for (i, c) in counters.iter_mut().enumerate() {
            *c = narrow(s.counters[i], NAMES[i])?;
        }
        Ok(v1::DriverStateV1 {
            common: s.common,
            in_flight: narrow(s.in_flight, "in_flight")?,
            counters,
        })
    }
}

impl From<&DriverState> for v2::DriverStateV2 {
    fn from(s: &DriverState) -> Self {
        v2::DriverStateV2 {
            common: CommonV1 {
                ring_version: s.ring_version.0,
                status_table: StatusTable::CURRENT.0,
                queue_depth: s.geometry.queue_depth,
                slot_size: s.geometry.slot_size,
                num_blocks: s.num_blocks,
                engine: engine_code(s.engine),
                latched: s.latched.map_or(0, |st| StatusTable::CURRENT.code(st)),
                sq_head: s.sq_head,
                cq_tail: s.cq_tail,
            },
            in_flight: s.counters.in_flight,
            counters: s.counters.io(),
        }
    }
}

/// Validates every field; translates the latched code from the exporter's status table.
impl TryFrom<v2::DriverStateV2> for DriverState {
    type Error = StateError;
    fn try_from(s: v2::DriverStateV2) -> Result<Self, StateError> {
        let c = s.common;
        let corrupt = |m: String| StateError::Corrupted(m);
        let table = StatusTable(c.status_table);
        if !table.is_known() {
            return Err(corrupt(format!("unknown status table {}", c.status_table)));
        }
        let latched = match c.latched {
            0 => None,
            code => match table.status(code) {
                Some(Status::Ok) | None => {
                    return Err(corrupt(format!("latched code {code} is not an error")))
                }
                Some(st) => Some(st),
            },
        };
        let engine =
            engine_of(c.engine).ok_or_else(|| corrupt(format!("engine code {}", c.engine)))?;
        Ok(DriverState {
            counters: Counters::from_io(s.counters, s.in_flight),
            geometry: RingGeometry {
                queue_depth: c.queue_depth,
                slot_size: c.slot_size,
            },
            num_blocks: c.num_blocks,
            engine,
            latched,
            sq_head: c.sq_head,
            cq_tail: c.cq_tail,
            ring_version: ProtocolVersion(c.ring_version),
            reason: StopReason::Prepare,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: &[StateVersion] = &[StateVersion::V1, StateVersion::V2];

    fn sample() -> DriverState {
        DriverState {
            counters: Counters {
                reads: 10,
                writes: 20,
                flushes: 3,
                discards: 4,
                bytes_read: 10 * 4096,
                bytes_written: 20 * 4096,
                errors: 1,
                in_flight: 0,
            },
            geometry: RingGeometry::default(),
            num_blocks: 1 << 18,
            engine: EngineKind::Uring,
            latched: Some(Status::Io),
            sq_head: 7,
            cq_tail: 7,
            ring_version: ProtocolVersion::CURRENT,
            reason: StopReason::Prepare,
        }
    }

    #[test]
    fn payload_sizes_match_spec() {
        assert_eq!(v1::DriverStateV1::SIZE, 72);
        assert_eq!(v2::DriverStateV2::SIZE, 104);
        assert_eq!(STATE_MAGIC.to_le_bytes(), *b"MBDS");
    }

    #[test]
    fn round_trip_in_both_schemas() {
        let s = sample();
        for v in [StateVersion::V1, StateVersion::V2] {
            let blob = s.export_as(v).unwrap();
            assert_eq!(DriverState::schema_of(&blob), Some(v));
            let back = DriverState::import_accepting(&blob, &[StateVersion::V1, StateVersion::V2])
                .unwrap();
            assert_eq!(back, s, "schema {v:?}");
        }
    }

    /// The "one component" update: the old driver's schema 1 (u32 counters) widens.
    #[test]
    fn schema_1_widens_to_schema_2() {
        let old = v1::DriverStateV1 {
            common: v2::DriverStateV2::from(&sample()).common,
            in_flight: 0,
            counters: [u32::MAX, 5, 6, 7, u32::MAX - 1, 9, 0],
        };
        let blob = formats::frame::encode(STATE_MAGIC, 1, &old.encode());
        let s =
            DriverState::import_accepting(&blob, &[StateVersion::V1, StateVersion::V2]).unwrap();
        assert_eq!(s.counters.reads, u32::MAX as u64);
        assert_eq!(s.counters.bytes_read, (u32::MAX - 1) as u64);
        let wide = v2::DriverStateV2::from(old);
        assert_eq!(wide.counters[0], u32::MAX as u64);
        // And narrowing back refuses what does not fit.
        let mut big = wide;
        big.counters[4] = 1 << 32;
        assert!(matches!(
            v1::DriverStateV1::try_from(&big),
            Err(StateError::DoesNotFit { schema: 1, .. })
        ));
        assert_eq!(v1::DriverStateV1::try_from(&wide).unwrap(), old);
    }

    /// The old driver (schema 1 only) refuses a newer schema; the new one reads both.
    #[test]
    fn older_build_refuses_newer_schema() {
        let blob = sample().export_as(StateVersion::V2).unwrap();
        let e = DriverState::import_accepting(&blob, &[StateVersion::V1]).unwrap_err();
        assert!(matches!(e, StateError::UnsupportedSchema(2)));
        assert_eq!(e.to_string(), "unsupported state schema 2");
        let unknown = formats::frame::encode(STATE_MAGIC, 9, &[0; 8]);
        assert!(matches!(
            DriverState::import(&unknown),
            Err(StateError::UnsupportedSchema(9))
        ));
    }

    #[cfg(feature = "legacy-counters-u32")]
    #[test]
    fn legacy_build_imports_only_schema_1() {
        assert_eq!(StateVersion::CURRENT, StateVersion::V1);
        let blob = sample().export_as(StateVersion::V2).unwrap();
        assert!(matches!(
            DriverState::import(&blob),
            Err(StateError::UnsupportedSchema(2))
        ));
        let blob = sample().export().unwrap();
        assert_eq!(DriverState::schema_of(&blob), Some(StateVersion::V1));
        DriverState::import(&blob).unwrap();
        // Its counters are u32 and wrap.
        let mut c: Count = Count::MAX;
        IoCounters::bump(&mut c, 2);
        assert_eq!(c, 1);
    }

    #[cfg(not(feature = "legacy-counters-u32"))]
    #[test]
    fn default_build_imports_schemas_1_and_2() {
        assert_eq!(StateVersion::CURRENT, StateVersion::V2);
        for v in [StateVersion::V1, StateVersion::V2] {
            DriverState::import(&sample().export_as(v).unwrap()).unwrap();
        }
        let mut c: Count = u32::MAX as Count;
        IoCounters::bump(&mut c, 1);
        assert_eq!(c, 1 << 32);
    }

    #[test]
    fn checks_refuse_inconsistent_states() {
        let mut s = sample();
        s.counters.in_flight = 1;
        assert!(matches!(s.export(), Err(StateError::Inconsistent(_))));
        let mut s = sample();
        s.cq_tail = 6;
        assert!(matches!(s.export(), Err(StateError::Inconsistent(_))));
        // A blob with in_flight != 0 is refused on import too.
        let mut wide = v2::DriverStateV2::from(&sample());
        wide.in_flight = 2;
        let blob = formats::frame::encode(STATE_MAGIC, 2, &wide.encode());
        assert!(matches!(
            DriverState::import_accepting(&blob, ALL),
            Err(StateError::Inconsistent(_))
        ));
        // Unknown engine or a latched "ok" are corruption.
        let mut wide = v2::DriverStateV2::from(&sample());
        wide.common.engine = 7;
        let blob = formats::frame::encode(STATE_MAGIC, 2, &wide.encode());
        assert!(matches!(
            DriverState::import_accepting(&blob, ALL),
            Err(StateError::Corrupted(_))
        ));
    }

    /// The latched code travels in the exporter's table and is translated on import.
    #[test]
    fn latched_code_is_translated_between_status_tables() {
        for table in [StatusTable::V1, StatusTable::V2] {
            let mut wide = v2::DriverStateV2::from(&sample());
            wide.common.status_table = table.0;
            wide.common.latched = table.code(Status::NoSpace);
            let blob = formats::frame::encode(STATE_MAGIC, 2, &wide.encode());
            let s = DriverState::import_accepting(&blob, &[StateVersion::V2]).unwrap();
            assert_eq!(s.latched, Some(Status::NoSpace));
        }
    }

    #[test]
    fn cap_is_checked_before_the_payload() {
        let mut blob = sample().export().unwrap();
        blob[8..16].copy_from_slice(&(STATE_CAP + 1).to_le_bytes());
        assert!(matches!(
            DriverState::import(&blob),
            Err(StateError::Frame(formats::FormatError::TooLarge { .. }))
        ));
    }

    proptest! {
        #[test]
        fn one_flipped_bit_is_an_error(bit in 0usize..(20 + 104) * 8) {
            let mut blob = sample().export_as(StateVersion::V2).unwrap();
            blob[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(DriverState::import_accepting(&blob, &[StateVersion::V1, StateVersion::V2]).is_err());
        }
    }
}
