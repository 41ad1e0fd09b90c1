//! Schema 1 of the fsd state: the payload is [`FsdStateV1`] in bincode (standard
//! configuration: little-endian varints, lengths before sequences, enum variants by
//! index). Frozen: these types and their encoding never change; add a schema instead.

use std::collections::BTreeMap;

use formats::block::Ino;
use serde::{Deserialize, Serialize};

use super::{FsdState, Handle, Schema, StateError, StateVersion};

impl StateVersion {
    /// Schema 1: 64-bit inode numbers on the wire, lists of pairs for the maps.
    pub const V1: StateVersion = StateVersion(1);
}

pub(super) const SCHEMA: Schema = Schema {
    version: StateVersion::V1,
    encode,
    decode,
};

/// Refuses a state schema 1 would not give back whole (one using a field added to
/// [`FsdState`] for a later schema) rather than dropping what it cannot hold.
fn encode(state: &FsdState) -> Result<Vec<u8>, StateError> {
    let v1 = FsdStateV1::from(state);
    match FsdState::try_from(v1.clone()) {
        Ok(back) if back == *state => Ok(v1.encode()),
        _ => Err(StateError::DoesNotFit {
            schema: StateVersion::V1.0,
            what: "the state holds more than schema 1 has fields for".into(),
        }),
    }
}

fn decode(payload: &[u8]) -> Result<FsdState, StateError> {
    FsdState::try_from(FsdStateV1::decode(payload)?)
}

/// An open file or directory as the kernel knows it (by handle number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum HandleV1 {
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
pub(crate) struct FsdStateV1 {
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

impl FsdStateV1 {
    /// The payload (without the frame).
    pub fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, bincode::config::standard())
            .expect("serializing to memory")
    }

    /// Decodes a payload whose frame was checked; trailing bytes are refused.
    pub fn decode(payload: &[u8]) -> Result<FsdStateV1, StateError> {
        Ok(formats::frame::decode_serde("fsd state", payload)?)
    }
}

/// Every runtime state fits schema 1: inode numbers widen to 64 bits, the maps become
/// lists sorted by key (as the first build wrote them).
impl From<&FsdState> for FsdStateV1 {
    fn from(s: &FsdState) -> Self {
        let pairs = |m: &BTreeMap<u64, u64>| m.iter().map(|(k, v)| (*k, *v)).collect();
        let handles = s
            .handles
            .iter()
            .map(|(id, h)| {
                let h = match h {
                    Handle::File {
                        ino,
                        flags,
                        touched,
                        reads,
                        writes,
                    } => HandleV1::File {
                        ino: u64::from(ino.0),
                        flags: *flags,
                        touched: *touched,
                        reads: *reads,
                        writes: *writes,
                    },
                    Handle::Dir { ino, entries } => HandleV1::Dir {
                        ino: u64::from(ino.0),
                        entries: entries
                            .iter()
                            .map(|(n, i, t)| (n.clone(), u64::from(i.0), *t))
                            .collect(),
                    },
                };
                (*id, h)
            })
            .collect();
        FsdStateV1 {
            version: s.version.clone(),
            init_flags: s.init_flags,
            lookups: pairs(&s.lookups),
            handles,
            next_handle: s.next_handle,
            usage: pairs(&s.usage),
            requests: s.requests,
            withheld: s.withheld.clone(),
        }
    }
}

/// Refuses an inode number beyond 32 bits (corruption: inode numbers are 32-bit) and a
/// key listed twice (a broken invariant: the maps have one entry per key). Fields added
/// to [`FsdState`] for later schemas take their defaults.
impl TryFrom<FsdStateV1> for FsdState {
    type Error = StateError;
    fn try_from(s: FsdStateV1) -> Result<Self, StateError> {
        let ino = |n: u64, what: &dyn Fn() -> String| {
            u32::try_from(n)
                .map(Ino)
                .map_err(|_| StateError::Corrupted(format!("{} names inode {n}", what())))
        };
        let map = |pairs: Vec<(u64, u64)>, what: &str| {
            let mut m = BTreeMap::new();
            for (k, v) in pairs {
                if m.insert(k, v).is_some() {
                    return Err(StateError::Inconsistent(format!(
                        "inode {k} is listed twice in the {what}"
                    )));
                }
            }
            Ok(m)
        };
        let mut handles = BTreeMap::new();
        for (id, h) in s.handles {
            let h = match h {
                HandleV1::File {
                    ino: i,
                    flags,
                    touched,
                    reads,
                    writes,
                } => Handle::File {
                    ino: ino(i, &|| format!("handle {id}"))?,
                    flags,
                    touched,
                    reads,
                    writes,
                },
                HandleV1::Dir { ino: i, entries } => Handle::Dir {
                    ino: ino(i, &|| format!("handle {id}"))?,
                    entries: entries
                        .into_iter()
                        .map(|(name, i, t)| {
                            let e = ino(i, &|| {
                                format!("entry {:?} of handle {id}", String::from_utf8_lossy(&name))
                            })?;
                            Ok((name, e, t))
                        })
                        .collect::<Result<_, StateError>>()?,
                },
            };
            if handles.insert(id, h).is_some() {
                return Err(StateError::Inconsistent(format!(
                    "handle {id} is listed twice"
                )));
            }
        }
        // The update is needless until `FsdState` grows a field schema 1 lacks.
        #[allow(clippy::needless_update)]
        Ok(FsdState {
            version: s.version,
            init_flags: s.init_flags,
            lookups: map(s.lookups, "lookups")?,
            handles,
            next_handle: s.next_handle,
            usage: map(s.usage, "usage counters")?,
            requests: s.requests,
            withheld: s.withheld,
            ..FsdState::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::sample;
    use super::super::{check, export, STATE_MAGIC};
    use super::*;

    /// A schema 1 blob as the first build that wrote schema 1 exported [`sample`], byte
    /// for byte: a live update from that build must still import it.
    const GOLDEN: &str = concat!(
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
    fn a_blob_of_the_first_schema_1_build_still_imports() {
        let golden = unhex(GOLDEN);
        assert_eq!(check(&golden).unwrap(), sample());
        assert_eq!(export(&sample(), StateVersion::V1).unwrap(), golden);
    }

    #[test]
    fn conversions_are_lossless() {
        let s = sample();
        let v1 = FsdStateV1::from(&s);
        assert_eq!(FsdStateV1::decode(&v1.encode()).unwrap(), v1);
        assert_eq!(FsdState::try_from(v1).unwrap(), s);
        let framed = formats::frame::encode(STATE_MAGIC, 1, &FsdStateV1::from(&s).encode());
        assert_eq!(framed, export(&s, StateVersion::V1).unwrap());
    }
}
