//! Framing for every versioned blob that outlives a process (state handed to a new
//! version, package manifests, saved tool state):
//!
//! ```text
//! 0  4 magic
//! 4  4 version
//! 8  8 length     payload bytes; checked against the caller's cap before it is used
//! 16 .. payload
//! end-4 4 crc     CRC-32 of every byte before it
//! ```

use crate::error::{FormatError, Result};

pub const FRAME_HEADER: usize = 16;
pub const FRAME_TRAILER: usize = 4;

pub fn encode(magic: u32, version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER + payload.len() + FRAME_TRAILER);
    out.extend_from_slice(&magic.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A checked frame: its version and payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub version: u32,
    pub payload: &'a [u8],
}

/// Checks, in this order: that `bytes` holds at least a header and a trailer; the magic
/// (`BadMagic`); `length` against `cap` (`TooLarge`), before the length is used for
/// anything; that `bytes` is exactly header + `length` + trailer (`Truncated`); the CRC
/// (`Checksum`). Only when all pass is the payload exposed. The size arithmetic is
/// checked, so no `length` (whatever the cap) can overflow it.
pub fn decode<'a>(what: &'static str, bytes: &'a [u8], magic: u32, cap: u64) -> Result<Frame<'a>> {
    if bytes.len() < FRAME_HEADER + FRAME_TRAILER {
        return Err(FormatError::Truncated {
            what,
            len: bytes.len(),
            need: FRAME_HEADER + FRAME_TRAILER,
        });
    }
    let found = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if found != magic {
        return Err(FormatError::BadMagic {
            what,
            found: found as u64,
        });
    }
    let version = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    if len > cap {
        return Err(FormatError::TooLarge { what, len, cap });
    }
    // A length that does not fit the address space cannot be present in `bytes`.
    let need = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(FRAME_HEADER + FRAME_TRAILER));
    let need = match need {
        Some(n) if n == bytes.len() => n,
        _ => {
            return Err(FormatError::Truncated {
                what,
                len: bytes.len(),
                need: need.unwrap_or(usize::MAX),
            })
        }
    };
    let body = &bytes[..need - FRAME_TRAILER];
    let stored = u32::from_le_bytes(bytes[need - FRAME_TRAILER..].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(FormatError::Checksum {
            what,
            stored,
            computed,
        });
    }
    Ok(Frame {
        version,
        payload: &body[FRAME_HEADER..],
    })
}

/// Encodes a serde value with bincode 2 (standard config) inside a frame.
pub fn encode_serde<T: serde::Serialize>(magic: u32, version: u32, value: &T) -> Vec<u8> {
    let payload = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .expect("serializing to memory");
    encode(magic, version, &payload)
}

/// Decodes a bincode payload from a checked frame, refusing trailing bytes.
pub fn decode_serde<T: serde::de::DeserializeOwned>(
    what: &'static str,
    payload: &[u8],
) -> Result<T> {
    let cfg = bincode::config::standard().with_limit::<{ 64 << 20 }>();
    let (v, used) = bincode::serde::decode_from_slice(payload, cfg)
        .map_err(|e| FormatError::corrupted(what, e.to_string()))?;
    if used != payload.len() {
        return Err(FormatError::corrupted(
            what,
            "trailing bytes after the payload",
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(payload in proptest::collection::vec(any::<u8>(), 0..512), version: u32) {
            let f = encode(0xABCD, version, &payload);
            let d = decode("t", &f, 0xABCD, 1 << 20).unwrap();
            prop_assert_eq!(d.version, version);
            prop_assert_eq!(d.payload, &payload[..]);
        }

        #[test]
        fn any_single_flip_is_an_error(payload in proptest::collection::vec(any::<u8>(), 0..64), pos: usize, bit in 0u8..8) {
            let mut f = encode(0xABCD, 1, &payload);
            let i = pos % f.len();
            f[i] ^= 1 << bit;
            prop_assert!(decode("t", &f, 0xABCD, 1 << 20).is_err());
        }
    }

    #[test]
    fn no_length_overflows_whatever_the_cap() {
        let f = encode(1, 1, b"x");
        let huge = [
            u64::MAX,
            u64::MAX - 19,
            usize::MAX as u64 - 19,
            usize::MAX as u64 - 20,
            1 << 63,
        ];
        for len in huge {
            let mut c = f.clone();
            c[8..16].copy_from_slice(&len.to_le_bytes());
            assert!(
                matches!(
                    decode("t", &c, 1, u64::MAX),
                    Err(FormatError::Truncated { .. })
                ),
                "length {len}"
            );
        }
    }

    #[test]
    fn checks_run_in_the_documented_order() {
        let f = encode(1, 1, b"payload");
        // Magic before the cap, the cap before the size, the size before the CRC.
        let mut c = f.clone();
        c[0] ^= 1;
        c[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode("t", &c, 1, 100),
            Err(FormatError::BadMagic { .. })
        ));
        let mut c = f.clone();
        c.push(0);
        assert!(matches!(
            decode("t", &c, 1, 3),
            Err(FormatError::TooLarge { .. })
        ));
        let last = c.len() - 2;
        c[last] ^= 1;
        assert!(matches!(
            decode("t", &c, 1, 100),
            Err(FormatError::Truncated { .. })
        ));
    }

    #[test]
    fn cap_is_checked_before_length() {
        let mut f = encode(1, 1, b"x");
        f[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode("t", &f, 1, 100),
            Err(FormatError::TooLarge { .. })
        ));
    }
}
