//! The self-describing block that every write carries.
//!
//! ```text
//! offset  size  field
//!      0     4  magic        0x4D_53_42_4B ("KBSM" on disk, little endian)
//!      4     4  file id      data file number
//!      8     8  offset       byte offset of the block in its file
//!     16     8  sequence     global write sequence (1, 2, ...); 0 is never written
//!     24     4  length       block length in bytes
//!     28     4  crc32        CRC-32 (IEEE) of bytes 0..28 and 32..length
//!     32   ...  payload      pseudo-random bytes derived from (file, offset, sequence)
//! ```
//!
//! All integers are little endian. A block that was never written reads as all zeros.

use super::rng::Rng;
use formats::bytes::{get_u32 as u32_at, get_u64 as u64_at};

pub const MAGIC: u32 = 0x4D53_424B;
pub const MAGIC_AT: usize = 0;
pub const FILE_AT: usize = MAGIC_AT + 4;
pub const OFFSET_AT: usize = FILE_AT + 4;
pub const SEQ_AT: usize = OFFSET_AT + 8;
pub const LEN_AT: usize = SEQ_AT + 8;
pub const CRC_AT: usize = LEN_AT + 4;
pub const HEADER_LEN: usize = CRC_AT + 4;

/// Identity of one block version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub file: u32,
    pub offset: u64,
    pub seq: u64,
}

/// What a read buffer holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// All zeros: a block that was never written.
    Zero,
    /// A well-formed block with a matching checksum.
    Valid(Header),
    /// Anything else, with the first reason found.
    Corrupt(String),
}

impl Content {
    /// Short description for error messages.
    pub fn describe(&self) -> String {
        match self {
            Content::Zero => "zeros".into(),
            Content::Valid(h) => format!(
                "a valid block of file {} offset {} seq {}",
                h.file, h.offset, h.seq
            ),
            Content::Corrupt(why) => format!("a corrupt block ({why})"),
        }
    }
}

fn crc(buf: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[..CRC_AT]);
    h.update(&buf[HEADER_LEN..]);
    h.finalize()
}

/// Fills `buf` (length a multiple of 8, at least [`HEADER_LEN`]) with version `seq` of
/// the block at `offset` in `file`.
pub fn fill(buf: &mut [u8], file: u32, offset: u64, seq: u64) {
    debug_assert!(buf.len() >= HEADER_LEN && buf.len().is_multiple_of(8));
    buf[MAGIC_AT..FILE_AT].copy_from_slice(&MAGIC.to_le_bytes());
    buf[FILE_AT..OFFSET_AT].copy_from_slice(&file.to_le_bytes());
    buf[OFFSET_AT..SEQ_AT].copy_from_slice(&offset.to_le_bytes());
    buf[SEQ_AT..LEN_AT].copy_from_slice(&seq.to_le_bytes());
    let len = buf.len() as u32;
    buf[LEN_AT..CRC_AT].copy_from_slice(&len.to_le_bytes());
    let mut rng = Rng::new(u64::from(file) ^ offset.rotate_left(20) ^ seq.rotate_left(40));
    for chunk in buf[HEADER_LEN..].chunks_exact_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let c = crc(buf);
    buf[CRC_AT..HEADER_LEN].copy_from_slice(&c.to_le_bytes());
}

/// Classifies the content of a block buffer.
pub fn decode(buf: &[u8]) -> Content {
    if buf.iter().all(|&b| b == 0) {
        return Content::Zero;
    }
    if buf.len() < HEADER_LEN {
        return Content::Corrupt(format!("{} bytes is shorter than a header", buf.len()));
    }
    let magic = u32_at(buf, MAGIC_AT);
    if magic != MAGIC {
        return Content::Corrupt(format!("bad magic {magic:#010x}"));
    }
    let len = u32_at(buf, LEN_AT);
    if len as usize != buf.len() {
        return Content::Corrupt(format!("length field {len}, block is {}", buf.len()));
    }
    let stored = u32_at(buf, CRC_AT);
    let computed = crc(buf);
    if stored != computed {
        return Content::Corrupt(format!(
            "crc {stored:#010x} stored, {computed:#010x} computed"
        ));
    }
    Content::Valid(Header {
        file: u32_at(buf, FILE_AT),
        offset: u64_at(buf, OFFSET_AT),
        seq: u64_at(buf, SEQ_AT),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_matches_the_table() {
        assert_eq!(
            (FILE_AT, OFFSET_AT, SEQ_AT, LEN_AT, CRC_AT),
            (4, 8, 16, 24, 28)
        );
        assert_eq!(HEADER_LEN, 32);
    }

    #[test]
    fn round_trip_and_every_flipped_bit_is_caught() {
        let mut buf = vec![0u8; 128];
        assert_eq!(decode(&buf), Content::Zero);
        fill(&mut buf, 7, 4096, 42);
        let want = Header {
            file: 7,
            offset: 4096,
            seq: 42,
        };
        assert_eq!(decode(&buf), Content::Valid(want));
        for bit in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(decode(&b), Content::Corrupt(_)), "bit {bit}");
        }
    }

    #[test]
    fn versions_differ_in_payload() {
        let (mut a, mut b) = (vec![0u8; 64], vec![0u8; 64]);
        fill(&mut a, 1, 0, 1);
        fill(&mut b, 1, 0, 2);
        assert_ne!(a[HEADER_LEN..], b[HEADER_LEN..]);
    }
}
