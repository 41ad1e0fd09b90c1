//! Encoding of submission and completion entries, per protocol version.
//!
//! All entry layout knowledge lives here: v2 (48-bit block address) is its own
//! `encode`/`decode` arm and a capability on [`ProtocolVersion`]; the rest of the crate
//! speaks [`Request`] with a 64-bit [`Lba`]. Both arms are compiled in every build; which one
//! a build *speaks* is [`ProtocolVersion::CURRENT`] (feature `ring48`).

use super::{RingError, Status};
use crate::Lba;
use formats::bytes::{get_u32 as u32_at, get_u64 as u64_at};

/// Bytes per submission entry.
pub const SQE_SIZE: usize = 32;
/// Bytes per completion entry.
pub(crate) const CQE_SIZE: usize = 16;
/// Slot field value of requests that carry no data (flush, discard).
pub const NO_SLOT: u32 = u32::MAX;
/// Tag of the completion a successor posts (result 0) for each entry a driver that died
/// had taken and not completed, so that every entry taken still yields one completion.
/// Reserved: a client never gives a request this tag.
pub(crate) const ABANDONED_TAG: u64 = 0;

// v1 submission entry layout.
const SQE_OP: usize = 0; // u8
const SQE_FLAGS: usize = SQE_OP + 1; // u8, zero
const SQE_RESERVED0: usize = SQE_FLAGS + 1; // u16, zero
const SQE_SLOT: usize = SQE_RESERVED0 + 2; // u32
const SQE_TAG: usize = SQE_SLOT + 4; // u64
const SQE_LBA: usize = SQE_TAG + 8; // u32 in v1
const SQE_NBLOCKS: usize = SQE_LBA + 4; // u32
const SQE_RESERVED1: usize = SQE_NBLOCKS + 4; // u32, zero
const SQE_CRC: usize = SQE_RESERVED1 + 4; // u32: crc32 of bytes 0..28
const _: () = assert!(SQE_CRC + 4 == SQE_SIZE);

// v2 submission entry layout: as v1 up to the tag, then a 64-bit block address field whose
// top 16 bits must be zero (48-bit addresses), then the count; no second reserved word.
const SQE2_LBA: usize = SQE_TAG + 8; // u64, bits 48..64 zero
const SQE2_NBLOCKS: usize = SQE2_LBA + 8; // u32
const SQE2_CRC: usize = SQE2_NBLOCKS + 4; // u32: crc32 of bytes 0..28
const _: () = assert!(SQE2_CRC == SQE_CRC);

// Completion entry layout (unchanged across versions so far).
const CQE_TAG: usize = 0; // u64
const CQE_RESULT: usize = CQE_TAG + 8; // i32
const CQE_RESERVED: usize = CQE_RESULT + 4; // u32, zero
const _: () = assert!(CQE_RESERVED + 4 == CQE_SIZE);

/// A ring protocol version. Ask it about capabilities rather than comparing numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolVersion(pub u32);

impl ProtocolVersion {
    /// 32-bit block address.
    pub const V1: ProtocolVersion = ProtocolVersion(1);
    /// 48-bit block address.
    pub const V2: ProtocolVersion = ProtocolVersion(2);
    /// The version this build speaks (drivers and clients refuse any other).
    #[cfg(not(feature = "ring48"))]
    pub const CURRENT: ProtocolVersion = ProtocolVersion::V1;
    #[cfg(feature = "ring48")]
    pub const CURRENT: ProtocolVersion = ProtocolVersion::V2;

    /// Versions whose entries this code can encode and decode. The region layout is the
    /// same for all of them, so a supervisor can relabel a quiet ring between them.
    pub(crate) fn is_known(self) -> bool {
        self == ProtocolVersion::V1 || self == ProtocolVersion::V2
    }

    /// Whether this build speaks this version.
    pub fn is_supported(self) -> bool {
        self == ProtocolVersion::CURRENT
    }

    /// Width of the block address in a submission entry.
    pub(crate) fn lba_bits(self) -> u32 {
        if self == ProtocolVersion::V2 {
            48
        } else {
            32
        }
    }

    /// Largest block count a device can expose under this version.
    pub fn max_blocks(self) -> u64 {
        1u64 << self.lba_bits()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    Read = 1,
    Write = 2,
    Flush = 3,
    Discard = 4,
}

impl Op {
    fn from_code(code: u8) -> Option<Op> {
        match code {
            1 => Some(Op::Read),
            2 => Some(Op::Write),
            3 => Some(Op::Flush),
            4 => Some(Op::Discard),
            _ => None,
        }
    }
}

/// A submission entry, decoded. Field meaning is checked by the driver, not here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub tag: u64,
    pub lba: Lba,
    pub nblocks: u32,
    /// Data slot index, or [`NO_SLOT`].
    pub slot: u32,
}

/// A completion entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub tag: u64,
    /// 0 or a negative [`Status`] code; unknown codes are kept raw for the client to reject.
    pub result: i32,
}

/// Why a submission entry could not be decoded: the status to complete it with, and the
/// tag as read (best effort: a corrupted entry may carry a corrupted tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DecodeError {
    pub tag: u64,
    pub status: Status,
}

fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

pub(crate) fn encode_request(v: ProtocolVersion, r: &Request) -> Result<[u8; SQE_SIZE], RingError> {
    if !v.is_known() {
        return Err(RingError::UnsupportedVersion(v.0));
    }
    if r.lba.0 >= v.max_blocks() {
        return Err(RingError::LbaTooWide(r.lba.0, v.0));
    }
    let mut b = [0u8; SQE_SIZE];
    b[SQE_OP] = r.op as u8;
    b[SQE_SLOT..SQE_SLOT + 4].copy_from_slice(&r.slot.to_le_bytes());
    b[SQE_TAG..SQE_TAG + 8].copy_from_slice(&r.tag.to_le_bytes());
    if v == ProtocolVersion::V2 {
        b[SQE2_LBA..SQE2_LBA + 8].copy_from_slice(&r.lba.0.to_le_bytes());
        b[SQE2_NBLOCKS..SQE2_NBLOCKS + 4].copy_from_slice(&r.nblocks.to_le_bytes());
    } else {
        // Fits: checked against max_blocks above.
        let lba = r.lba.0 as u32;
        b[SQE_LBA..SQE_LBA + 4].copy_from_slice(&lba.to_le_bytes());
        b[SQE_NBLOCKS..SQE_NBLOCKS + 4].copy_from_slice(&r.nblocks.to_le_bytes());
    }
    let c = crc(&b[..SQE_CRC]);
    b[SQE_CRC..].copy_from_slice(&c.to_le_bytes());
    Ok(b)
}

/// Decodes an entry copied out of shared memory. Checks the crc first, then the op code
/// and the reserved fields.
pub(crate) fn decode_request(
    v: ProtocolVersion,
    b: &[u8; SQE_SIZE],
) -> Result<Request, DecodeError> {
    let tag = u64_at(b, SQE_TAG);
    let fail = |status| DecodeError { tag, status };
    if !v.is_known() {
        return Err(fail(Status::Unsupported));
    }
    if crc(&b[..SQE_CRC]) != u32_at(b, SQE_CRC) {
        return Err(fail(Status::Corrupt));
    }
    let op = Op::from_code(b[SQE_OP]).ok_or(fail(Status::Unsupported))?;
    if b[SQE_FLAGS] != 0 || b[SQE_RESERVED0..SQE_SLOT] != [0, 0] {
        return Err(fail(Status::Invalid));
    }
    let (lba, nblocks) = if v == ProtocolVersion::V2 {
        let lba = u64_at(b, SQE2_LBA);
        if lba >= v.max_blocks() {
            return Err(fail(Status::Invalid));
        }
        (lba, u32_at(b, SQE2_NBLOCKS))
    } else {
        if u32_at(b, SQE_RESERVED1) != 0 {
            return Err(fail(Status::Invalid));
        }
        (u32_at(b, SQE_LBA) as u64, u32_at(b, SQE_NBLOCKS))
    };
    Ok(Request {
        op,
        tag,
        lba: Lba(lba),
        nblocks,
        slot: u32_at(b, SQE_SLOT),
    })
}

pub(crate) fn encode_completion(c: &Completion) -> [u8; CQE_SIZE] {
    let mut b = [0u8; CQE_SIZE];
    b[CQE_TAG..CQE_TAG + 8].copy_from_slice(&c.tag.to_le_bytes());
    b[CQE_RESULT..CQE_RESULT + 4].copy_from_slice(&c.result.to_le_bytes());
    b
}

pub fn decode_completion(b: &[u8; CQE_SIZE]) -> Completion {
    Completion {
        tag: u64_at(b, CQE_TAG),
        result: u32_at(b, CQE_RESULT) as i32,
    }
}

/// Builds a raw v1 entry with arbitrary field values and a valid crc (tests craft bad
/// requests with it).
#[cfg(test)]
pub(crate) fn raw_v1_entry(op: u8, tag: u64, lba: u32, nblocks: u32, slot: u32) -> [u8; SQE_SIZE] {
    raw_entry(ProtocolVersion::V1, op, tag, lba as u64, nblocks, slot)
}

/// Builds a raw entry of version `v` (v2 layout for V2, else v1) with arbitrary field values
/// and a valid crc; the address is truncated to the field's width.
pub fn raw_entry(
    v: ProtocolVersion,
    op: u8,
    tag: u64,
    lba: u64,
    nblocks: u32,
    slot: u32,
) -> [u8; SQE_SIZE] {
    let mut b = [0u8; SQE_SIZE];
    b[SQE_OP] = op;
    b[SQE_SLOT..SQE_SLOT + 4].copy_from_slice(&slot.to_le_bytes());
    b[SQE_TAG..SQE_TAG + 8].copy_from_slice(&tag.to_le_bytes());
    if v == ProtocolVersion::V2 {
        b[SQE2_LBA..SQE2_LBA + 8].copy_from_slice(&lba.to_le_bytes());
        b[SQE2_NBLOCKS..SQE2_NBLOCKS + 4].copy_from_slice(&nblocks.to_le_bytes());
    } else {
        b[SQE_LBA..SQE_LBA + 4].copy_from_slice(&(lba as u32).to_le_bytes());
        b[SQE_NBLOCKS..SQE_NBLOCKS + 4].copy_from_slice(&nblocks.to_le_bytes());
    }
    let c = crc(&b[..SQE_CRC]);
    b[SQE_CRC..].copy_from_slice(&c.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Read),
            Just(Op::Write),
            Just(Op::Flush),
            Just(Op::Discard)
        ]
    }

    proptest! {
        #[test]
        fn request_round_trip(op in op_strategy(), tag: u64, lba: u32, nblocks: u32, slot: u32) {
            let r = Request { op, tag, lba: Lba(lba as u64), nblocks, slot };
            let b = encode_request(ProtocolVersion::V1, &r).unwrap();
            prop_assert_eq!(decode_request(ProtocolVersion::V1, &b), Ok(r));
        }

        #[test]
        fn one_flipped_bit_is_an_error(op in op_strategy(), tag: u64, lba: u32, nblocks: u32, slot: u32, bit in 0usize..SQE_SIZE * 8) {
            let r = Request { op, tag, lba: Lba(lba as u64), nblocks, slot };
            let mut b = encode_request(ProtocolVersion::V1, &r).unwrap();
            b[bit / 8] ^= 1 << (bit % 8);
            let e = decode_request(ProtocolVersion::V1, &b).unwrap_err();
            prop_assert_eq!(e.status, Status::Corrupt);
        }

        #[test]
        fn completion_round_trip(tag: u64, result: i32) {
            let c = Completion { tag, result };
            prop_assert_eq!(decode_completion(&encode_completion(&c)), c);
        }
    }

    fn versions() -> impl Strategy<Value = ProtocolVersion> {
        prop_oneof![Just(ProtocolVersion::V1), Just(ProtocolVersion::V2)]
    }

    proptest! {
        #[test]
        fn v2_round_trip(op in op_strategy(), tag: u64, lba in 0u64..(1 << 48), nblocks: u32, slot: u32) {
            let r = Request { op, tag, lba: Lba(lba), nblocks, slot };
            let b = encode_request(ProtocolVersion::V2, &r).unwrap();
            prop_assert_eq!(decode_request(ProtocolVersion::V2, &b), Ok(r));
        }

        #[test]
        fn one_flipped_bit_is_an_error_in_every_version(v in versions(), op in op_strategy(), tag: u64, lba in 0u64..(1 << 32), nblocks: u32, slot: u32, bit in 0usize..SQE_SIZE * 8) {
            let r = Request { op, tag, lba: Lba(lba), nblocks, slot };
            let mut b = encode_request(v, &r).unwrap();
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert_eq!(decode_request(v, &b).unwrap_err().status, Status::Corrupt);
        }
    }

    #[test]
    fn v2_limits_and_spec_bytes() {
        let wide = Request {
            op: Op::Write,
            tag: 0x0102030405060708,
            lba: Lba(0x0000_AABB_1122_3344),
            nblocks: 2,
            slot: 3,
        };
        let b = encode_request(ProtocolVersion::V2, &wide).unwrap();
        assert_eq!(
            b[..28],
            [
                2, 0, 0, 0, 3, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1, 0x44, 0x33, 0x22, 0x11, 0xBB, 0xAA,
                0, 0, 2, 0, 0, 0
            ]
        );
        assert!(matches!(
            encode_request(ProtocolVersion::V1, &wide),
            Err(RingError::LbaTooWide(..))
        ));
        let too_wide = Request {
            lba: Lba(1 << 48),
            ..wide
        };
        assert!(matches!(
            encode_request(ProtocolVersion::V2, &too_wide),
            Err(RingError::LbaTooWide(..))
        ));
        // Bits 48..64 of the address field must be zero.
        let b = raw_entry(ProtocolVersion::V2, 1, 7, 1 << 48, 1, 0);
        assert_eq!(
            decode_request(ProtocolVersion::V2, &b).unwrap_err().status,
            Status::Invalid
        );
        assert_eq!(ProtocolVersion::V2.max_blocks(), 1 << 48);
        // A v2 entry read as v1 is rejected, not misdirected, when its address is wide.
        let b = encode_request(ProtocolVersion::V2, &wide).unwrap();
        assert!(decode_request(ProtocolVersion::V1, &b).is_err());
        assert!(!ProtocolVersion(3).is_known());
    }

    #[test]
    fn v1_rejects_wide_lba() {
        let r = Request {
            op: Op::Read,
            tag: 1,
            lba: Lba(1 << 32),
            nblocks: 1,
            slot: 0,
        };
        assert!(matches!(
            encode_request(ProtocolVersion::V1, &r),
            Err(RingError::LbaTooWide(..))
        ));
    }

    #[test]
    fn unknown_op_and_reserved_fields() {
        let b = raw_v1_entry(9, 5, 0, 1, 0);
        assert_eq!(
            decode_request(ProtocolVersion::V1, &b),
            Err(DecodeError {
                tag: 5,
                status: Status::Unsupported
            })
        );
        let mut b = raw_v1_entry(1, 6, 0, 1, 0);
        b[SQE_FLAGS] = 1;
        let c = crc(&b[..SQE_CRC]);
        b[SQE_CRC..].copy_from_slice(&c.to_le_bytes());
        assert_eq!(
            decode_request(ProtocolVersion::V1, &b),
            Err(DecodeError {
                tag: 6,
                status: Status::Invalid
            })
        );
    }

    /// A fixed v1 entry, byte for byte as `RING.md` shows it.
    #[test]
    fn v1_bytes_match_spec() {
        let r = Request {
            op: Op::Write,
            tag: 0x0102030405060708,
            lba: Lba(0x11223344),
            nblocks: 2,
            slot: 3,
        };
        let b = encode_request(ProtocolVersion::V1, &r).unwrap();
        assert_eq!(
            b[..28],
            [
                2, 0, 0, 0, 3, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1, 0x44, 0x33, 0x22, 0x11, 2, 0, 0, 0,
                0, 0, 0, 0
            ]
        );
        assert_eq!(u32_at(&b, 28), crc32fast::hash(&b[..28]));
    }
}
