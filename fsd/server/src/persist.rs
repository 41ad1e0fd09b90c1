//! The filesystem server's state handed to its successor in a live update. Frozen,
//! versioned structs (a changed field is a new version), framed with magic, version,
//! length and crc; the length is checked against a cap before decoding.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// Frame magic of an fsd state blob: "MFSD".
pub const STATE_MAGIC: u32 = u32::from_le_bytes(*b"MFSD");
/// Largest state blob accepted.
pub const STATE_CAP: u64 = 256 << 20;
/// The state schema this build writes; it reads every schema listed in `READS`.
pub const STATE_SCHEMA: u32 = 1;
pub const STATE_SCHEMA_READS: &[u32] = &[1];

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

/// An open file or directory as the kernel knows it (by handle number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandleV1 {
    File {
        ino: u64,
        flags: u32,
        /// Has done at least one read or write since it was opened.
        touched: bool,
        reads: u64,
        writes: u64,
    },
    /// A directory with the listing taken when it was opened (readdir offsets index it).
    Dir {
        ino: u64,
        entries: Vec<(Vec<u8>, u64, u8)>,
    },
}

/// Schema 1 of the fsd state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsdStateV1 {
    /// Version of the component that wrote it.
    pub version: String,
    /// FUSE INIT flags negotiated when the connection was made; frozen for its lifetime.
    pub init_flags: u64,
    /// Kernel lookup count of every inode the kernel holds.
    pub lookups: Vec<(u64, u64)>,
    pub handles: Vec<(u64, HandleV1)>,
    pub next_handle: u64,
    /// Per-file usage counters (`user.molt.usage`).
    pub usage: Vec<(u64, u64)>,
    /// Requests served since the mount, across versions.
    pub requests: u64,
    /// Blocks freed by journal transactions not yet checkpointed: not reusable yet.
    pub withheld: Vec<(u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state blob: {0}")]
    Format(#[from] formats::FormatError),
    #[error("state schema {0} is not supported by this version (reads {STATE_SCHEMA_READS:?})")]
    UnsupportedSchema(u32),
    #[error("state check failed: {0}")]
    Invalid(String),
}

impl FsdStateV1 {
    pub fn encode(&self) -> Vec<u8> {
        formats::frame::encode_serde(STATE_MAGIC, STATE_SCHEMA, self)
    }

    /// Decodes a blob of any schema this build reads and converts it to the current one.
    pub fn decode(bytes: &[u8]) -> Result<FsdStateV1, StateError> {
        let frame = formats::frame::decode("fsd state", bytes, STATE_MAGIC, STATE_CAP)?;
        if !STATE_SCHEMA_READS.contains(&frame.version) {
            return Err(StateError::UnsupportedSchema(frame.version));
        }
        let state: FsdStateV1 = formats::frame::decode_serde("fsd state", frame.payload)?;
        state.check()?;
        Ok(state)
    }

    /// Invariants of an exported state: lookup counts positive and unique, every handle
    /// names an inode the kernel holds, handle numbers below `next_handle`.
    pub fn check(&self) -> Result<(), StateError> {
        let mut held = HashMap::new();
        for (ino, n) in &self.lookups {
            if *n == 0 {
                return Err(StateError::Invalid(format!(
                    "inode {ino} has lookup count 0"
                )));
            }
            if *ino == 0 || held.insert(*ino, *n).is_some() {
                return Err(StateError::Invalid(format!(
                    "inode {ino} listed twice or invalid"
                )));
            }
        }
        let mut ids = HashSet::new();
        for (id, h) in &self.handles {
            if *id == 0 || *id >= self.next_handle || !ids.insert(*id) {
                return Err(StateError::Invalid(format!(
                    "handle {id} is invalid or repeated"
                )));
            }
            let ino = match h {
                HandleV1::File { ino, .. } | HandleV1::Dir { ino, .. } => *ino,
            };
            // The root is always held by the kernel, without a lookup.
            if ino != 1 && !held.contains_key(&ino) {
                return Err(StateError::Invalid(format!(
                    "handle {id} names inode {ino}, which the kernel does not hold"
                )));
            }
        }
        Ok(())
    }

    /// Whether every open file has done a read or write since it was opened.
    pub fn untouched_files(&self) -> usize {
        self.handles
            .iter()
            .filter(|(_, h)| matches!(h, HandleV1::File { touched: false, .. }))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FsdStateV1 {
        FsdStateV1 {
            version: component_version(),
            init_flags: 0x1234,
            lookups: vec![(5, 2), (7, 1)],
            handles: vec![
                (
                    1,
                    HandleV1::File {
                        ino: 5,
                        flags: 2,
                        touched: true,
                        reads: 3,
                        writes: 4,
                    },
                ),
                (
                    2,
                    HandleV1::Dir {
                        ino: 7,
                        entries: vec![(b"a".to_vec(), 9, 8)],
                    },
                ),
            ],
            next_handle: 3,
            usage: vec![(5, 1)],
            requests: 99,
            withheld: vec![(100, 4)],
        }
    }

    #[test]
    fn round_trip_and_checks() {
        let s = sample();
        assert_eq!(FsdStateV1::decode(&s.encode()).unwrap(), s);
        let mut bad = sample();
        bad.lookups.push((9, 0));
        assert!(bad.check().is_err());
        let mut bad = sample();
        bad.handles.push((
            3,
            HandleV1::File {
                ino: 8,
                flags: 0,
                touched: false,
                reads: 0,
                writes: 0,
            },
        ));
        assert!(bad.check().is_err(), "handle number not below next_handle");
        let mut bad = sample();
        bad.next_handle = 10;
        bad.handles.push((
            4,
            HandleV1::File {
                ino: 8,
                flags: 0,
                touched: false,
                reads: 0,
                writes: 0,
            },
        ));
        assert!(bad.check().is_err(), "inode 8 is not held by the kernel");
    }

    #[test]
    fn corrupt_or_newer_blobs_are_refused() {
        let blob = sample().encode();
        for i in (0..blob.len()).step_by(3) {
            let mut b = blob.clone();
            b[i] ^= 0x40;
            assert!(FsdStateV1::decode(&b).is_err());
        }
        let newer = formats::frame::encode_serde(STATE_MAGIC, STATE_SCHEMA + 1, &sample());
        assert!(matches!(
            FsdStateV1::decode(&newer),
            Err(StateError::UnsupportedSchema(_))
        ));
    }

    /// A schema 1 blob as this build writes it, byte for byte: a later build must still
    /// read what this one exports (the live update from it), so these bytes never change.
    const SCHEMA_1_GOLDEN: &str = concat!(
        "4d46534401000000630000000000000005302e312e30fdab896745230100000305020701fb2c01",
        "fc7011010003010005fb02800103fd000000000001000002010704012e0704022e2e0104016109",
        "0803737562fb2c01040401010005020501090cfc9f860100026404fd0000000002000000020cb6",
        "b50e",
    );

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn schema_1_wire_bytes_are_pinned() {
        let s = FsdStateV1 {
            version: "0.1.0".into(),
            init_flags: 0x0123_4567_89ab,
            lookups: vec![(5, 2), (7, 1), (300, 70000)],
            handles: vec![
                (
                    1,
                    HandleV1::File {
                        ino: 5,
                        flags: 0x8002,
                        touched: true,
                        reads: 3,
                        writes: 1 << 40,
                    },
                ),
                (
                    2,
                    HandleV1::Dir {
                        ino: 7,
                        entries: vec![
                            (b".".to_vec(), 7, 4),
                            (b"..".to_vec(), 1, 4),
                            (b"a".to_vec(), 9, 8),
                            (b"sub".to_vec(), 300, 4),
                        ],
                    },
                ),
                (
                    4,
                    HandleV1::Dir {
                        ino: 1,
                        entries: vec![],
                    },
                ),
            ],
            next_handle: 5,
            usage: vec![(5, 1), (9, 12)],
            requests: 99999,
            withheld: vec![(100, 4), (1 << 33, 2)],
        };
        let golden = unhex(SCHEMA_1_GOLDEN);
        assert_eq!(s.encode(), golden);
        assert_eq!(FsdStateV1::decode(&golden).unwrap(), s);
    }
}
