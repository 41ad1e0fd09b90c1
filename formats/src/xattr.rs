//! Extended attributes: one block per inode (kind MMXA, owner = inode).
//!
//! ```text
//! 0 2 count
//! 2 2 used     bytes of entries
//! 4 .. entries name_len u8 | value_len u16 | name | value   (packed, sorted by name)
//! ```
//! Names are full names with their namespace prefix (`user.`, `trusted.`, `security.`).

use crate::block::{self, BlockAddr, BlockKind, Ino, PAYLOAD_SIZE};
use crate::bytes::*;
use crate::error::{FormatError, Result};

pub const XATTR_OFF_COUNT: usize = 0;
pub const XATTR_OFF_USED: usize = XATTR_OFF_COUNT + 2;
pub const XATTR_OFF_ENTRIES: usize = XATTR_OFF_USED + 2;
pub const XATTR_CAPACITY: usize = PAYLOAD_SIZE - XATTR_OFF_ENTRIES;
pub const XATTR_ENTRY_HEADER: usize = 3;
pub const XATTR_NAME_MAX: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XattrSet {
    /// Sorted by name, names unique.
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl XattrSet {
    pub fn used(&self) -> usize {
        self.entries
            .iter()
            .map(|(n, v)| XATTR_ENTRY_HEADER + n.len() + v.len())
            .sum()
    }

    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.entries
            .binary_search_by(|(n, _)| n.as_slice().cmp(name))
            .ok()
            .map(|i| self.entries[i].1.as_slice())
    }

    /// Inserts or replaces; refuses when the block would overflow (the caller says ENOSPC).
    pub fn set(&mut self, name: &[u8], value: &[u8]) -> Result<()> {
        check_name(name).map_err(|d| FormatError::corrupted("xattr", d))?;
        let old = self
            .get(name)
            .map(|v| XATTR_ENTRY_HEADER + name.len() + v.len())
            .unwrap_or(0);
        if self.used() - old + XATTR_ENTRY_HEADER + name.len() + value.len() > XATTR_CAPACITY {
            return Err(FormatError::Full {
                what: "xattr block",
            });
        }
        match self
            .entries
            .binary_search_by(|(n, _)| n.as_slice().cmp(name))
        {
            Ok(i) => self.entries[i].1 = value.to_vec(),
            Err(i) => self.entries.insert(i, (name.to_vec(), value.to_vec())),
        }
        Ok(())
    }

    pub fn remove(&mut self, name: &[u8]) -> bool {
        match self
            .entries
            .binary_search_by(|(n, _)| n.as_slice().cmp(name))
        {
            Ok(i) => {
                self.entries.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    /// Encodes the block. Refuses what `decode` rejects (bad names, values too long for
    /// their length field, unsorted or repeated names) instead of truncating anything.
    pub fn encode(&self, owner: Ino, addr: BlockAddr) -> Result<Box<block::Block>> {
        const WHAT: &str = "xattr block";
        for (i, (n, v)) in self.entries.iter().enumerate() {
            check_name(n).map_err(|d| FormatError::corrupted(WHAT, d))?;
            if v.len() > u16::MAX as usize {
                return Err(FormatError::corrupted(
                    WHAT,
                    format!("value of {} bytes exceeds {}", v.len(), u16::MAX),
                ));
            }
            if i > 0 && self.entries[i - 1].0 >= *n {
                return Err(FormatError::corrupted(WHAT, "names unsorted or repeated"));
            }
        }
        if self.used() > XATTR_CAPACITY {
            return Err(FormatError::Full {
                what: "xattr block",
            });
        }
        let mut b = block::zeroed();
        put_u16(&mut b[..], XATTR_OFF_COUNT, self.entries.len() as u16);
        put_u16(&mut b[..], XATTR_OFF_USED, self.used() as u16);
        let mut off = XATTR_OFF_ENTRIES;
        for (n, v) in &self.entries {
            b[off] = n.len() as u8;
            put_u16(&mut b[..], off + 1, v.len() as u16);
            off += XATTR_ENTRY_HEADER;
            b[off..off + n.len()].copy_from_slice(n);
            off += n.len();
            b[off..off + v.len()].copy_from_slice(v);
            off += v.len();
        }
        block::seal(&mut b[..], BlockKind::XattrBlock, owner, addr);
        Ok(b)
    }

    pub fn decode(b: &[u8], owner: Ino, addr: BlockAddr) -> Result<XattrSet> {
        const WHAT: &str = "xattr block";
        block::verify(b, BlockKind::XattrBlock, Some(owner), addr)?;
        let count = get_u16(b, XATTR_OFF_COUNT) as usize;
        let used = get_u16(b, XATTR_OFF_USED) as usize;
        if used > XATTR_CAPACITY {
            return Err(FormatError::corrupted(WHAT, "used exceeds capacity"));
        }
        let area = &b[XATTR_OFF_ENTRIES..XATTR_OFF_ENTRIES + used];
        let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(count);
        let mut off = 0;
        while off < used {
            if off + XATTR_ENTRY_HEADER > used {
                return Err(FormatError::corrupted(
                    WHAT,
                    "entry header crosses the used area",
                ));
            }
            let nl = area[off] as usize;
            let vl = get_u16(area, off + 1) as usize;
            off += XATTR_ENTRY_HEADER;
            if nl == 0 || off + nl + vl > used {
                return Err(FormatError::corrupted(WHAT, "entry crosses the used area"));
            }
            let name = area[off..off + nl].to_vec();
            let value = area[off + nl..off + nl + vl].to_vec();
            if name.contains(&0) {
                return Err(FormatError::corrupted(WHAT, "NUL in name"));
            }
            if let Some((prev, _)) = entries.last() {
                if *prev >= name {
                    return Err(FormatError::corrupted(WHAT, "names unsorted or repeated"));
                }
            }
            entries.push((name, value));
            off += nl + vl;
        }
        if entries.len() != count {
            return Err(FormatError::corrupted(WHAT, "count does not match entries"));
        }
        if b[XATTR_OFF_ENTRIES + used..PAYLOAD_SIZE]
            .iter()
            .any(|&x| x != 0)
        {
            return Err(FormatError::corrupted(
                WHAT,
                "bytes past the entries are not zero",
            ));
        }
        Ok(XattrSet { entries })
    }
}

/// Checks a name is storable: 1..=255 bytes, no NUL.
fn check_name(name: &[u8]) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() > XATTR_NAME_MAX {
        return Err("name longer than 255 bytes");
    }
    if name.contains(&0) {
        return Err("NUL in name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_capacity() {
        let mut s = XattrSet::default();
        s.set(b"user.b", b"2").unwrap();
        s.set(b"user.a", b"1").unwrap();
        s.set(b"user.a", b"one").unwrap();
        assert_eq!(s.get(b"user.a"), Some(&b"one"[..]));
        let b = s.encode(Ino(3), BlockAddr(9)).unwrap();
        assert_eq!(XattrSet::decode(&b[..], Ino(3), BlockAddr(9)).unwrap(), s);
        assert!(s.set(b"user.big", &vec![0u8; XATTR_CAPACITY]).is_err());
        assert!(s.remove(b"user.b"));
    }

    #[test]
    fn encode_refuses_instead_of_truncating() {
        let set = |entries: Vec<(&[u8], Vec<u8>)>| XattrSet {
            entries: entries.into_iter().map(|(n, v)| (n.to_vec(), v)).collect(),
        };
        let ok = set(vec![(b"user.a", vec![1]), (b"user.b", vec![2])]);
        ok.encode(Ino(3), BlockAddr(9)).unwrap();
        let long_name = vec![b'n'; XATTR_NAME_MAX + 1];
        for bad in [
            set(vec![(&long_name, vec![])]),
            set(vec![(b"", vec![])]),
            set(vec![(b"user.\0x", vec![])]),
            set(vec![(b"user.v", vec![0; u16::MAX as usize + 1])]),
            set(vec![(b"user.b", vec![]), (b"user.a", vec![])]),
            set(vec![(b"user.a", vec![]), (b"user.a", vec![])]),
        ] {
            assert!(bad.encode(Ino(3), BlockAddr(9)).is_err());
        }
        // The longest name is accepted and survives whole.
        let name = vec![b'n'; XATTR_NAME_MAX];
        let s = set(vec![(&name, b"v".to_vec())]);
        let b = s.encode(Ino(3), BlockAddr(9)).unwrap();
        assert_eq!(XattrSet::decode(&b[..], Ino(3), BlockAddr(9)).unwrap(), s);
    }
}
