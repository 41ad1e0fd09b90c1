//! The state file: the ledger saved at the end of a run and loaded by the next one.
//!
//! ```text
//! offset  size  field
//!      0     8  magic       "MOLTSTRS"
//!      8     4  version     1
//!     12     8  length      payload bytes, checked against a cap before reading
//!     20   len  payload     v1 below
//! 20+len     4  crc32       CRC-32 (IEEE) of the payload
//!
//! payload v1:
//!      0     4  block size
//!      4     4  file count
//!      8     8  file size
//!     16     8  next sequence
//!     24  8*n   current sequence of each block, file by file (0 never written,
//!               u64::MAX unknown)
//! ```
//!
//! Little endian throughout. Written to a temporary name, fsynced and renamed.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::error::StateError;

pub const STATE_MAGIC: [u8; 8] = *b"MOLTSTRS";
pub const STATE_VERSION: u32 = 1;
const MAGIC_AT: usize = 0;
const VERSION_AT: usize = MAGIC_AT + 8;
const LENGTH_AT: usize = VERSION_AT + 4;
const PAYLOAD_AT: usize = LENGTH_AT + 8;
const V1_FIXED: usize = 24;
/// 2^28 blocks (the configuration limit) of 8 bytes, plus the fixed part.
const MAX_PAYLOAD: u64 = (V1_FIXED as u64) + (8 << 28);

/// Version 1 of the saved state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateV1 {
    pub block_size: u32,
    pub files: u32,
    pub file_size: u64,
    pub next_seq: u64,
    pub seqs: Vec<u64>,
}

pub fn encode(state: &StateV1) -> Vec<u8> {
    let mut payload = Vec::with_capacity(V1_FIXED + 8 * state.seqs.len());
    payload.extend_from_slice(&state.block_size.to_le_bytes());
    payload.extend_from_slice(&state.files.to_le_bytes());
    payload.extend_from_slice(&state.file_size.to_le_bytes());
    payload.extend_from_slice(&state.next_seq.to_le_bytes());
    for s in &state.seqs {
        payload.extend_from_slice(&s.to_le_bytes());
    }
    let mut out = Vec::with_capacity(PAYLOAD_AT + payload.len() + 4);
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out
}

pub fn decode(path: &Path, bytes: &[u8]) -> Result<StateV1, StateError> {
    let corrupt = |reason: String| StateError::Corrupted {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < PAYLOAD_AT {
        return Err(corrupt(format!(
            "{} bytes is shorter than the header",
            bytes.len()
        )));
    }
    if bytes[MAGIC_AT..VERSION_AT] != STATE_MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    let version = u32::from_le_bytes(bytes[VERSION_AT..LENGTH_AT].try_into().expect("4"));
    if version != STATE_VERSION {
        return Err(StateError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    let len = u64::from_le_bytes(bytes[LENGTH_AT..PAYLOAD_AT].try_into().expect("8"));
    if len > MAX_PAYLOAD || len < V1_FIXED as u64 || !(len - V1_FIXED as u64).is_multiple_of(8) {
        return Err(corrupt(format!("payload length {len} is impossible")));
    }
    let len = len as usize;
    if bytes.len() != PAYLOAD_AT + len + 4 {
        return Err(corrupt(format!(
            "file is {} bytes, header says {}",
            bytes.len(),
            PAYLOAD_AT + len + 4
        )));
    }
    let payload = &bytes[PAYLOAD_AT..PAYLOAD_AT + len];
    let stored = u32::from_le_bytes(bytes[PAYLOAD_AT + len..].try_into().expect("4"));
    if stored != crc32fast::hash(payload) {
        return Err(corrupt("payload checksum mismatch".into()));
    }
    let u64_at = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8"));
    let state = StateV1 {
        block_size: u32::from_le_bytes(payload[0..4].try_into().expect("4")),
        files: u32::from_le_bytes(payload[4..8].try_into().expect("4")),
        file_size: u64_at(8),
        next_seq: u64_at(16),
        seqs: (V1_FIXED..len).step_by(8).map(u64_at).collect(),
    };
    let expected = (state.file_size / u64::from(state.block_size.max(1))) * u64::from(state.files);
    if state.block_size == 0 || expected != state.seqs.len() as u64 {
        return Err(corrupt(format!(
            "{} block entries for {} files of {} bytes in {}-byte blocks",
            state.seqs.len(),
            state.files,
            state.file_size,
            state.block_size
        )));
    }
    Ok(state)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Loads the state at `path`; `Ok(None)` when there is no such file.
pub fn load(path: &Path) -> Result<Option<StateV1>, StateError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let size = file.metadata().map_err(io_err(path))?.len();
    if size > MAX_PAYLOAD + PAYLOAD_AT as u64 + 4 {
        return Err(StateError::Corrupted {
            path: path.to_path_buf(),
            reason: format!("{size} bytes is larger than any state"),
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.read_to_end(&mut bytes).map_err(io_err(path))?;
    decode(path, &bytes).map(Some)
}

/// Saves atomically: temporary file, fsync, rename, fsync of the directory.
pub fn save(path: &Path, state: &StateV1) -> Result<(), StateError> {
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&encode(state)).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io_err(parent))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StateV1 {
        StateV1 {
            block_size: 4096,
            files: 2,
            file_size: 8192,
            next_seq: 9,
            seqs: vec![0, 3, 8, u64::MAX],
        }
    }

    #[test]
    fn round_trip() {
        let p = Path::new("s");
        assert_eq!(decode(p, &encode(&sample())).unwrap(), sample());
    }

    #[test]
    fn damage_is_an_error_never_a_panic() {
        let p = Path::new("s");
        let good = encode(&sample());
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x10;
            assert!(decode(p, &b).is_err(), "byte {i}");
        }
        for n in 0..good.len() {
            assert!(decode(p, &good[..n]).is_err());
        }
        let mut v2 = good.clone();
        v2[VERSION_AT] = 2;
        assert!(matches!(
            decode(p, &v2),
            Err(StateError::UnsupportedVersion { version: 2, .. })
        ));
    }
}
