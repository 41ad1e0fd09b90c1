//! The filesystem server's state handed to its successor in a live update.
//!
//! The in-memory form is [`FsdState`], which belongs to no schema: the FUSE layer builds
//! it when it stops and rebuilds itself from it, the update manager checks it. The wire
//! form is a `formats::frame` (magic `"MFSD"`, version = state schema, payload length
//! checked against [`STATE_CAP`] before anything else, crc32) around the payload of one
//! frozen per-schema type. Each schema is a file of this module holding that type, its
//! encoding and its conversions from and to [`FsdState`]: [`v1`] (schema 1, bincode of
//! [`v1::FsdStateV1`]). A changed field is a new schema; an old schema's file is never
//! edited.
//!
//! Adding schema 2 takes one file, `v2.rs`, with the frozen `FsdStateV2`, its
//! `StateVersion::V2`, its conversions from and to [`FsdState`] and its `SCHEMA` entry;
//! then `mod v2;` and `v2::SCHEMA` in the `SCHEMAS` list below, and
//! [`StateVersion::CURRENT`] moved to it once this build should write it. [`FsdState`]
//! grows by the fields schema 2 adds; `v1.rs` is not edited: importing schema 1 leaves
//! them at their defaults, and exporting it refuses ([`StateError::DoesNotFit`]) a state
//! that schema 1 would not give back whole, rather than dropping what it cannot hold.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use formats::block::Ino;
use formats::dir::{is_stored_dtype, validate_name, DT_DIR};

pub mod v1;
pub mod v2;

/// Frame magic of an fsd state blob: "MFSD".
pub const STATE_MAGIC: u32 = u32::from_le_bytes(*b"MFSD");
/// Largest state payload accepted, checked before the payload is looked at.
pub const STATE_CAP: u64 = 256 << 20;

/// The schema of an exported fsd state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StateVersion(pub u32);

impl StateVersion {
    /// The schema this build exports.
    pub const CURRENT: StateVersion = StateVersion::V2;
    /// The schemas this build imports (a package's `state_schema_reads`): every schema it
    /// has a file for, its own and older ones, oldest first; never a newer one.
    pub const ACCEPTED: &'static [StateVersion] = &ACCEPTED;

    pub fn is_importable(self) -> bool {
        StateVersion::ACCEPTED.contains(&self)
    }
}

impl fmt::Display for StateVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A schema's codec: its payload from and to the runtime state. One per schema file.
struct Schema {
    version: StateVersion,
    /// Converts the state to this schema and encodes it; fails with
    /// [`StateError::DoesNotFit`] if the schema cannot hold it.
    encode: fn(&FsdState) -> Result<Vec<u8>, StateError>,
    /// Decodes a payload of this schema and converts it to the runtime state (the
    /// invariants are checked after, on the runtime state).
    decode: fn(&[u8]) -> Result<FsdState, StateError>,
}

/// Every schema this build reads and writes, oldest first.
const SCHEMAS: &[Schema] = &[v1::SCHEMA, v2::SCHEMA];

const ACCEPTED: [StateVersion; SCHEMAS.len()] = {
    let mut out = [StateVersion(0); SCHEMAS.len()];
    let mut i = 0;
    while i < SCHEMAS.len() {
        out[i] = SCHEMAS[i].version;
        i += 1;
    }
    out
};

fn schema(v: StateVersion) -> Option<&'static Schema> {
    SCHEMAS.iter().find(|s| s.version == v)
}

/// Why a state could not be exported, imported or checked. A damaged frame, a schema
/// this build does not read, a payload with impossible values and a broken invariant are
/// kept apart.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The frame is damaged (magic, length cap, size, crc) or its payload does not decode.
    #[error("corrupt state blob: {0}")]
    Frame(#[from] formats::FormatError),
    #[error("unsupported state schema {schema} (this version reads {supported:?})")]
    UnsupportedSchema { schema: u32, supported: Vec<u32> },
    /// The payload decodes but a field holds a value the runtime state cannot.
    #[error("corrupt state: {0}")]
    Corrupted(String),
    /// An invariant of a state taken between requests does not hold ([`check`]).
    #[error("inconsistent state: {0}")]
    Inconsistent(String),
    /// The state holds something the schema asked for cannot.
    #[error("state does not fit schema {schema}: {what}")]
    DoesNotFit { schema: u32, what: String },
}

fn unsupported(v: StateVersion, supported: &[StateVersion]) -> StateError {
    StateError::UnsupportedSchema {
        schema: v.0,
        supported: supported.iter().map(|s| s.0).collect(),
    }
}

/// The version of this fsd build, as packages name it. Feature-built variants differ.
pub fn component_version() -> String {
    let mut v = env!("CARGO_PKG_VERSION").to_string();
    if cfg!(feature = "usage-on-touch") {
        v.push_str("+touch");
    }
    if cfg!(feature = "ring48") {
        v.push_str("+ring48");
    }
    if cfg!(feature = "errcodes-v2") {
        v.push_str("+err2");
    }
    v
}

/// An entry of a directory listing: name, inode, `DT_*` type.
pub(crate) type ListingEntry = (Vec<u8>, Ino, u8);

/// An open file or directory as the kernel knows it (by handle number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handle {
    File {
        ino: Ino,
        flags: u32,
        /// Has done at least one read or write since it was opened.
        touched: bool,
        reads: u64,
        writes: u64,
    },
    /// A directory with the listing taken by its last read from offset 0 (readdir
    /// offsets index it). Empty until that first read.
    Dir {
        ino: Ino,
        entries: Vec<ListingEntry>,
    },
}

impl Handle {
    /// The inode the handle is open on.
    pub fn ino(&self) -> Ino {
        match self {
            Handle::File { ino, .. } | Handle::Dir { ino, .. } => *ino,
        }
    }
}

/// How requests reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// `/dev/fuse` read and write.
    #[default]
    Dev,
    /// FUSE over io_uring.
    Uring,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Dev => "dev",
            Transport::Uring => "uring",
        }
    }
}

/// The FUSE connection's parameters beyond its INIT flags, as its INIT fixed them: a
/// successor serves the connection exactly as negotiated (schema 2 on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    pub minor: u32,
    pub max_write: u32,
    pub max_readahead: u32,
    pub max_pages: u16,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub time_gran: u32,
    pub transport: Transport,
}

impl Connection {
    /// The parameters of a connection negotiated as `n` and served over `transport`.
    pub fn new(n: &molt_fuse::Negotiated, transport: Transport) -> Connection {
        Connection {
            minor: n.minor,
            max_write: n.max_write,
            max_readahead: n.max_readahead,
            max_pages: n.max_pages,
            max_background: n.max_background,
            congestion_threshold: n.congestion_threshold,
            time_gran: n.time_gran,
            transport,
        }
    }

    /// The negotiated parameters with INIT flags `flags`, for adopting the connection.
    pub fn negotiated(&self, flags: u64) -> molt_fuse::Negotiated {
        molt_fuse::Negotiated {
            minor: self.minor,
            flags,
            max_write: self.max_write,
            max_readahead: self.max_readahead,
            max_pages: self.max_pages,
            max_background: self.max_background,
            congestion_threshold: self.congestion_threshold,
            time_gran: self.time_gran,
        }
    }
}

/// The server's kernel-facing state, in memory, whatever schema carries it. Taken only
/// when no request is being served.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FsdState {
    /// Version of the component that exported it.
    pub version: String,
    /// FUSE INIT flags of the connection; frozen for its lifetime.
    pub init_flags: u64,
    /// The rest of what the connection's INIT fixed (schema 2 on; a schema 1 state comes
    /// from a build whose FUSE binding kept it to itself).
    pub connection: Option<Connection>,
    /// Kernel lookup count of every inode the kernel holds, by inode number (the node id
    /// the kernel knows it by).
    pub lookups: BTreeMap<u64, u64>,
    /// Open files and directories, by handle number.
    pub handles: BTreeMap<u64, Handle>,
    /// The handle number the next open gets.
    pub next_handle: u64,
    /// Per-file usage counters (`user.molt.usage`), by inode number.
    pub usage: BTreeMap<u64, u64>,
    /// Requests served since the mount, across versions.
    pub requests: u64,
    /// Block ranges (start, length) freed by journal transactions not yet checkpointed:
    /// not reusable yet.
    pub withheld: Vec<(u64, u64)>,
}

impl FsdState {
    /// The invariants of a state taken between requests ([`check`] lists them).
    pub fn check(&self) -> Result<(), StateError> {
        let bad = |m: String| Err(StateError::Inconsistent(m));
        let real = |ino: u64| ino != 0 && ino <= u64::from(u32::MAX);
        for (ino, n) in &self.lookups {
            if !real(*ino) {
                return bad(format!("inode {ino} has a lookup count"));
            }
            if *n == 0 {
                return bad(format!("inode {ino} has lookup count 0"));
            }
        }
        for (ino, n) in &self.usage {
            if !real(*ino) {
                return bad(format!("inode {ino} has a usage counter"));
            }
            if *n == 0 {
                return bad(format!("inode {ino} has usage counter 0"));
            }
        }
        for (id, h) in &self.handles {
            if *id == 0 || *id >= self.next_handle {
                return bad(format!(
                    "handle {id} is not below the next handle number {}",
                    self.next_handle
                ));
            }
            match h {
                Handle::File {
                    touched,
                    reads,
                    writes,
                    ..
                } => {
                    if *touched != (*reads > 0 || *writes > 0) {
                        return bad(format!(
                            "file handle {id} is {}touched after {reads} reads and {writes} writes",
                            if *touched { "" } else { "not " }
                        ));
                    }
                }
                Handle::Dir { ino, entries } => {
                    if let Err(why) = check_listing(*ino, entries) {
                        return bad(format!("the listing of directory handle {id}: {why}"));
                    }
                }
            }
        }
        let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(self.withheld.len());
        for &(start, len) in &self.withheld {
            match start.checked_add(len) {
                None => return bad(format!("withheld blocks {start}+{len} end beyond 2^64")),
                Some(_) if len == 0 => {}
                Some(end) => ranges.push((start, end)),
            }
        }
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                return bad(format!(
                    "withheld blocks {}..{} and {}..{} overlap",
                    w[0].0, w[0].1, w[1].0, w[1].1
                ));
            }
        }
        Ok(())
    }

    /// How many open files have done no read or write since they were opened.
    pub(crate) fn untouched_files(&self) -> usize {
        self.handles
            .values()
            .filter(|h| matches!(h, Handle::File { touched: false, .. }))
            .count()
    }
}

/// A directory listing as the FUSE layer takes it: empty (opened, not read yet), or "."
/// (the directory itself), ".." (its parent), then the directory's entries, each once,
/// as the image stores them: a storable name, an inode number, a stored `DT_*` type.
fn check_listing(dir: Ino, entries: &[ListingEntry]) -> Result<(), String> {
    let shown = |(name, ino, dtype): &ListingEntry| {
        format!(
            "{:?} (inode {}, type {dtype})",
            String::from_utf8_lossy(name),
            ino.0
        )
    };
    let Some((dot, rest)) = entries.split_first() else {
        return Ok(());
    };
    if *dot != (b".".to_vec(), dir, DT_DIR) {
        return Err(format!(
            "it begins with {}, not the directory itself",
            shown(dot)
        ));
    }
    match rest.first() {
        Some((name, ino, dtype)) if name == b".." && ino.0 != 0 && *dtype == DT_DIR => {}
        Some(other) => return Err(format!("{} where its parent belongs", shown(other))),
        None => return Err("its parent is missing".into()),
    }
    let mut names = HashSet::with_capacity(entries.len());
    for (name, ino, dtype) in &rest[1..] {
        let shown = String::from_utf8_lossy(name);
        validate_name(name).map_err(|why| format!("entry {shown:?}: {why}"))?;
        if ino.0 == 0 || !is_stored_dtype(*dtype) {
            return Err(format!(
                "entry {shown:?} has inode {} and type {dtype}",
                ino.0
            ));
        }
        if !names.insert(name.as_slice()) {
            return Err(format!("entry {shown:?} is listed twice"));
        }
    }
    Ok(())
}

/// Encodes `state` in schema `v` (an older one for a downgrade). Fails if this build does
/// not know `v` or if `v` cannot hold something the state has; nothing is dropped. The
/// invariants are not checked here: the state checking phase of an update does that
/// ([`check`]), so a broken one is reported as such.
pub fn export(state: &FsdState, v: StateVersion) -> Result<Vec<u8>, StateError> {
    let schema = schema(v).ok_or_else(|| unsupported(v, StateVersion::ACCEPTED))?;
    let payload = (schema.encode)(state)?;
    Ok(formats::frame::encode(STATE_MAGIC, v.0, &payload))
}

/// Decodes a state blob of a schema in `accepted`, converts it to the runtime state and
/// checks its invariants. The frame is checked first (magic, then the length against
/// [`STATE_CAP`] before the length is used, then the size and the crc); a schema not in
/// `accepted`, or one this build has no file for, is refused before its payload is read.
pub fn import_accepting(bytes: &[u8], accepted: &[StateVersion]) -> Result<FsdState, StateError> {
    let frame = formats::frame::decode("fsd state", bytes, STATE_MAGIC, STATE_CAP)?;
    let v = StateVersion(frame.version);
    let schema = match schema(v) {
        Some(s) if accepted.contains(&v) => s,
        _ => return Err(unsupported(v, accepted)),
    };
    let state = (schema.decode)(frame.payload)?;
    state.check()?;
    Ok(state)
}

/// The state checking phase of a live update: decodes a blob of any schema this build
/// reads ([`StateVersion::ACCEPTED`]) and checks that it is a state taken between
/// requests:
///
/// - every inode with a lookup count is a real inode number (neither 0 nor beyond 32
///   bits), held at least once (count above 0), and listed once;
/// - every handle number is listed once, is not 0, and is below `next_handle` (numbers
///   are given out from 1 upwards, so a successor never gives out one in use);
/// - every inode with a usage counter is a real inode number, listed once, and has been
///   used (counters only count up, from 1);
/// - a file handle is marked touched exactly when it has done a read or a write (the
///   `every-open-file-touched` required state relies on the mark);
/// - a directory handle's listing is empty (opened, not read yet) or is ".", the
///   directory itself, "..", a directory, then entries as the image stores them (a
///   storable name, each once; a non-zero inode number; a stored `DT_*` type);
/// - the withheld block ranges do not run past 2^64 and do not overlap (a block is freed
///   once, then withheld until the journal is checkpointed).
///
/// A handle or listing entry naming an inode beyond 32 bits is refused while converting
/// from the schema, as corrupt ([`StateError::Corrupted`]); so are duplicates, which
/// [`FsdState`] cannot hold, as [`StateError::Inconsistent`] like every other broken
/// invariant.
///
/// A handle need not name an inode with a lookup count: a server recovered after a crash
/// restarts its lookup counts at zero while the kernel still holds files and directories
/// opened before the crash, whose handles it rebuilds on demand.
pub fn check(bytes: &[u8]) -> Result<FsdState, StateError> {
    import_accepting(bytes, StateVersion::ACCEPTED)
}

/// Frame magic of a connection record: "MFSC".
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"MFSC");
/// Largest connection record accepted.
pub const RECORD_CAP: u64 = 1024;

/// The connection record a server leaves for a successor that recovers after its death
/// (a live successor gets the same in the state): the INIT flags and the parameters.
pub fn encode_connection_record(flags: u64, c: &Connection) -> Vec<u8> {
    formats::frame::encode(RECORD_MAGIC, 1, &v2::encode_record(flags, c))
}

/// Decodes a connection record (checked frame, record version 1).
pub fn decode_connection_record(bytes: &[u8]) -> Result<(u64, Connection), StateError> {
    let frame = formats::frame::decode("connection record", bytes, RECORD_MAGIC, RECORD_CAP)?;
    if frame.version != 1 {
        return Err(StateError::Corrupted(format!(
            "connection record version {}",
            frame.version
        )));
    }
    v2::decode_record(frame.payload)
}

/// The schema of a state blob, from its frame header: `None` if it is too short for one
/// or not an fsd state. Nothing else is checked.
pub fn schema_of(bytes: &[u8]) -> Option<StateVersion> {
    let word = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let (magic, version) = (word(0)?, word(4)?);
    (magic == STATE_MAGIC).then_some(StateVersion(version))
}

#[cfg(test)]
mod tests {
    use super::*;
    use formats::dir::{DT_DIR, DT_REG};
    use formats::superblock::ROOT_INO;
    use formats::FormatError;

    /// A state a server stopped between requests can hold: a file read and written, a
    /// directory listed, and the root opened and not listed yet.
    pub(super) fn sample() -> FsdState {
        FsdState {
            version: "0.1.0".into(),
            init_flags: 0x0123_4567_89ab,
            connection: None,
            lookups: BTreeMap::from([(5, 2), (7, 1), (300, 70000)]),
            handles: BTreeMap::from([
                (
                    1,
                    Handle::File {
                        ino: Ino(5),
                        flags: 0x8002,
                        touched: true,
                        reads: 3,
                        writes: 1 << 40,
                    },
                ),
                (
                    2,
                    Handle::Dir {
                        ino: Ino(7),
                        entries: vec![
                            (b".".to_vec(), Ino(7), DT_DIR),
                            (b"..".to_vec(), Ino(1), DT_DIR),
                            (b"a".to_vec(), Ino(9), DT_REG),
                            (b"sub".to_vec(), Ino(300), DT_DIR),
                        ],
                    },
                ),
                (
                    4,
                    Handle::Dir {
                        ino: ROOT_INO,
                        entries: vec![],
                    },
                ),
            ]),
            next_handle: 5,
            usage: BTreeMap::from([(5, 1), (9, 12)]),
            requests: 99999,
            withheld: vec![(100, 4), (1 << 33, 2)],
        }
    }

    fn blob(s: &FsdState) -> Vec<u8> {
        export(s, StateVersion::CURRENT).expect("export")
    }

    /// The error the state checking phase gives for `s`, which must be refused.
    fn refusal(s: &FsdState) -> StateError {
        check(&blob(s)).expect_err("the state must be refused")
    }

    fn inconsistent(s: &FsdState, says: &str) {
        match refusal(s) {
            StateError::Inconsistent(m) => assert!(m.contains(says), "{m:?} lacks {says:?}"),
            e => panic!("expected an inconsistent state ({says}), got {e}"),
        }
    }

    fn reframed(payload: &[u8]) -> Vec<u8> {
        formats::frame::encode(STATE_MAGIC, 1, payload)
    }

    #[test]
    fn every_schema_round_trips() {
        let s = sample();
        s.check().unwrap();
        for &v in StateVersion::ACCEPTED {
            let b = export(&s, v).unwrap();
            assert_eq!(schema_of(&b), Some(v));
            assert_eq!(import_accepting(&b, &[v]).unwrap(), s, "schema {v}");
            assert_eq!(check(&b).unwrap(), s, "schema {v}");
        }
    }

    #[test]
    fn the_version_list_is_every_schema_oldest_first() {
        assert!(StateVersion::CURRENT.is_importable());
        assert!(StateVersion::ACCEPTED.contains(&StateVersion::V1));
        assert!(StateVersion::ACCEPTED.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(StateVersion::ACCEPTED.len(), SCHEMAS.len());
        assert_eq!(STATE_MAGIC.to_le_bytes(), *b"MFSD");
    }

    #[test]
    fn a_schema_this_build_does_not_read_is_refused() {
        let payload = v1::FsdStateV1::from(&sample()).encode();
        let newer = formats::frame::encode(STATE_MAGIC, 3, &payload);
        let e = check(&newer).unwrap_err();
        assert!(
            matches!(e, StateError::UnsupportedSchema { schema: 3, .. }),
            "{e}"
        );
        assert!(
            e.to_string().starts_with("unsupported state schema 3"),
            "{e}"
        );
        assert_eq!(schema_of(&newer), Some(StateVersion(3)));
        // A known schema left out of the accepted list is refused all the same.
        let b = blob(&sample());
        assert!(matches!(
            import_accepting(&b, &[]),
            Err(StateError::UnsupportedSchema { schema: 2, .. })
        ));
        // And this build writes no schema it does not know.
        assert!(matches!(
            export(&sample(), StateVersion(9)),
            Err(StateError::UnsupportedSchema { schema: 9, .. })
        ));
    }

    #[test]
    fn a_blob_over_the_cap_is_refused_before_decoding() {
        // The length field claims more than the cap over a payload that is not there:
        // the cap is checked before the length is used (it would be `Truncated` else).
        let mut b = blob(&sample());
        b[8..16].copy_from_slice(&(STATE_CAP + 1).to_le_bytes());
        assert!(matches!(
            check(&b),
            Err(StateError::Frame(FormatError::TooLarge { len, cap, .. }))
                if len == STATE_CAP + 1 && cap == STATE_CAP
        ));
        let mut b = formats::frame::encode(STATE_MAGIC, 1, &[]);
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            check(&b),
            Err(StateError::Frame(FormatError::TooLarge { .. }))
        ));
    }

    #[test]
    fn a_corrupted_blob_is_refused() {
        let good = blob(&sample());
        // A flipped payload bit or a damaged crc: the crc no longer matches.
        for at in [20, good.len() / 2, good.len() - 1] {
            let mut b = good.clone();
            b[at] ^= 0x10;
            assert!(
                matches!(
                    check(&b),
                    Err(StateError::Frame(FormatError::Checksum { .. }))
                ),
                "byte {at}"
            );
        }
        // Whatever byte is damaged, the blob is refused.
        for at in 0..good.len() {
            let mut b = good.clone();
            b[at] ^= 0x40;
            assert!(check(&b).is_err(), "byte {at}");
        }
        // A sound frame around a payload with trailing bytes, or a truncated one.
        let mut payload = v1::FsdStateV1::from(&sample()).encode();
        payload.push(0);
        assert!(matches!(
            check(&reframed(&payload)),
            Err(StateError::Frame(FormatError::Corrupted { .. }))
        ));
        payload.truncate(payload.len() - 3);
        assert!(matches!(
            check(&reframed(&payload)),
            Err(StateError::Frame(_))
        ));
        assert!(check(&good[..good.len() - 1]).is_err());
    }

    #[test]
    fn schema_of_reads_the_header_only() {
        let b = blob(&sample());
        assert_eq!(schema_of(&b), Some(StateVersion::CURRENT));
        assert_eq!(schema_of(&b[..8]), Some(StateVersion::CURRENT));
        assert_eq!(schema_of(&b[..7]), None);
        let mut other = b.clone();
        other[0] ^= 1;
        assert_eq!(schema_of(&other), None);
    }

    #[test]
    fn check_refuses_bad_lookup_counts() {
        let mut s = sample();
        s.lookups.insert(8, 0);
        inconsistent(&s, "inode 8 has lookup count 0");
        let mut s = sample();
        s.lookups.insert(0, 1);
        inconsistent(&s, "inode 0");
    }

    #[test]
    fn check_refuses_handle_numbers_not_given_out() {
        let mut s = sample();
        s.next_handle = 4;
        inconsistent(&s, "handle 4 is not below the next handle number 4");
        let mut s = sample();
        let h = s.handles.remove(&1).unwrap();
        s.handles.insert(0, h);
        inconsistent(&s, "handle 0");
    }

    #[test]
    fn check_refuses_what_is_listed_twice() {
        let twice = |edit: &dyn Fn(&mut v1::FsdStateV1), says: &str| {
            let mut w = v1::FsdStateV1::from(&sample());
            edit(&mut w);
            match check(&reframed(&w.encode())) {
                Err(StateError::Inconsistent(m)) => assert!(m.contains(says), "{m}"),
                other => panic!("expected {says:?}, got {other:?}"),
            }
        };
        twice(
            &|w| w.lookups.push((5, 1)),
            "inode 5 is listed twice in the lookups",
        );
        twice(
            &|w| w.usage.insert(0, (9, 1)),
            "inode 9 is listed twice in the usage counters",
        );
        twice(
            &|w| {
                let h = w.handles[0].clone();
                w.handles.push(h)
            },
            "handle 1 is listed twice",
        );
    }

    #[test]
    fn check_refuses_inode_numbers_beyond_32_bits() {
        let wide = |edit: &dyn Fn(&mut v1::FsdStateV1), says: &str| {
            let mut w = v1::FsdStateV1::from(&sample());
            edit(&mut w);
            match check(&reframed(&w.encode())) {
                Err(StateError::Corrupted(m)) => assert!(m.contains(says), "{m}"),
                other => panic!("expected {says:?}, got {other:?}"),
            }
        };
        wide(
            &|w| {
                if let v1::HandleV1::File { ino, .. } = &mut w.handles[0].1 {
                    *ino = 1 << 32;
                }
            },
            "handle 1 names inode 4294967296",
        );
        wide(
            &|w| {
                if let v1::HandleV1::Dir { entries, .. } = &mut w.handles[1].1 {
                    entries[2].1 = u64::MAX;
                }
            },
            "entry \"a\" of handle 2",
        );
    }

    #[test]
    fn check_refuses_inode_numbers_that_are_not_real() {
        let mut s = sample();
        s.lookups.insert(1 << 32, 1);
        inconsistent(&s, "inode 4294967296 has a lookup count");
        let mut s = sample();
        s.usage.insert(0, 1);
        inconsistent(&s, "inode 0 has a usage counter");
        let mut s = sample();
        s.usage.insert(u64::MAX, 1);
        inconsistent(&s, "has a usage counter");
    }

    #[test]
    fn check_refuses_a_usage_counter_of_0() {
        let mut s = sample();
        s.usage.insert(9, 0);
        inconsistent(&s, "inode 9 has usage counter 0");
    }

    #[test]
    fn check_refuses_a_touched_mark_that_disagrees_with_the_counters() {
        let file = |touched, reads, writes| Handle::File {
            ino: Ino(5),
            flags: 0,
            touched,
            reads,
            writes,
        };
        let mut s = sample();
        s.handles.insert(3, file(true, 0, 0));
        inconsistent(&s, "file handle 3 is touched after 0 reads and 0 writes");
        s.handles.insert(3, file(false, 0, 2));
        inconsistent(
            &s,
            "file handle 3 is not touched after 0 reads and 2 writes",
        );
        s.handles.insert(3, file(false, 0, 0));
        check(&blob(&s)).unwrap();
    }

    #[test]
    fn check_refuses_a_malformed_directory_listing() {
        let with = |edit: &dyn Fn(&mut Vec<ListingEntry>), says: &str| {
            let mut s = sample();
            if let Some(Handle::Dir { entries, .. }) = s.handles.get_mut(&2) {
                edit(entries);
            }
            inconsistent(&s, "the listing of directory handle 2");
            inconsistent(&s, says);
        };
        with(
            &|e| e[0].1 = Ino(9),
            "it begins with \".\" (inode 9, type 4), not the directory itself",
        );
        with(&|e| e[0].2 = DT_REG, "not the directory itself");
        with(&|e| e.swap(0, 1), "not the directory itself");
        with(&|e| e.truncate(1), "its parent is missing");
        with(
            &|e| e[1].2 = DT_REG,
            "\"..\" (inode 1, type 8) where its parent belongs",
        );
        with(&|e| e[1].1 = Ino(0), "where its parent belongs");
        with(
            &|e| e[2].0 = b"x/y".to_vec(),
            "entry \"x/y\": name contains '/'",
        );
        with(&|e| e[2].0 = Vec::new(), "entry \"\": empty name");
        with(&|e| e[2].0 = b"..".to_vec(), "entry \"..\"");
        with(&|e| e[2].0 = vec![b'n'; 256], "longer than 255 bytes");
        with(&|e| e[2].1 = Ino(0), "entry \"a\" has inode 0 and type 8");
        with(&|e| e[2].2 = 0, "entry \"a\" has inode 9 and type 0");
        with(&|e| e[3].0 = b"a".to_vec(), "entry \"a\" is listed twice");
        // A directory opened and not read yet has no listing at all.
        let mut s = sample();
        if let Some(Handle::Dir { entries, .. }) = s.handles.get_mut(&2) {
            entries.clear();
        }
        check(&blob(&s)).unwrap();
    }

    #[test]
    fn check_refuses_withheld_ranges_that_overflow_or_overlap() {
        let mut s = sample();
        s.withheld.push((u64::MAX - 1, 2));
        inconsistent(&s, "withheld blocks 18446744073709551614+2 end beyond 2^64");
        let mut s = sample();
        s.withheld.push((102, 1));
        inconsistent(&s, "withheld blocks 100..104 and 102..103 overlap");
        let mut s = sample();
        s.withheld.insert(0, (98, 3));
        inconsistent(&s, "withheld blocks 98..101 and 100..104 overlap");
        // Adjacent ranges and empty ones are fine.
        let mut s = sample();
        s.withheld.extend([(104, 1), (96, 4), (101, 0)]);
        check(&blob(&s)).unwrap();
    }

    #[test]
    fn untouched_files_counts_open_files_without_io() {
        let mut s = sample();
        assert_eq!(s.untouched_files(), 0);
        s.handles.insert(
            3,
            Handle::File {
                ino: Ino(7),
                flags: 0,
                touched: false,
                reads: 0,
                writes: 0,
            },
        );
        assert_eq!(s.untouched_files(), 1);
    }
}
