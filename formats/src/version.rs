//! Format versions and feature flags. Callers ask capability questions of the version
//! instead of comparing numbers.
//!
//! | version | inodes carry | block-map addresses | incompat bits set |
//! |---|---|---|---|
//! | 1 | no creation time | 32 bits | none |
//! | 2 | creation time | 32 bits | `CRTIME` |
//! | 3 | creation time | 48 bits | `CRTIME`, `MAP48` |
//!
//! A version is also an inode *layout*: every live inode says in its flags which version's
//! layout its fields use, so that a conversion can leave converted and unconverted inodes
//! side by side (see `inode`).

/// Largest image format v1 (and v2) can address: 32-bit block numbers in the block map.
pub const MAX_BLOCKS_V1: u64 = 1 << 32;
/// Largest v3 image: 48-bit block maps, bounded by the superblock's u32
/// `block_bitmap_blocks` (2^46 blocks need 2^46 / 32640 < 2^32 bitmap blocks).
pub const MAX_BLOCKS_V3: u64 = 1 << 46;

/// On-disk format version recorded in the superblock.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct FormatVersion(pub u32);

impl FormatVersion {
    pub const V1: FormatVersion = FormatVersion(1);
    pub const V2: FormatVersion = FormatVersion(2);
    pub const V3: FormatVersion = FormatVersion(3);
    /// The newest version this build writes.
    pub const CURRENT: FormatVersion = FormatVersion::V3;
    /// Every version this build reads and writes, oldest first.
    pub const ALL: [FormatVersion; 3] = [Self::V1, Self::V2, Self::V3];

    pub fn is_supported(self) -> bool {
        self.0 >= 1 && self.0 <= Self::CURRENT.0
    }

    /// Width in bits of a block address inside the block map (records, the inode's
    /// `xattr_block` and `extent_block`, an extent block's `next`).
    pub(crate) fn block_map_address_bits(self) -> u32 {
        if self.0 >= 3 {
            48
        } else {
            32
        }
    }

    /// Whether inodes carry a creation time (not in v1).
    pub fn has_crtime(self) -> bool {
        self.0 >= 2
    }

    /// The `incompat` bits an image of this version sets (besides `INCOMPAT_CONVERTING`).
    pub fn incompat_features(self) -> u32 {
        let mut bits = 0;
        if self.has_crtime() {
            bits |= INCOMPAT_CRTIME;
        }
        if self.block_map_address_bits() > 32 {
            bits |= INCOMPAT_MAP48;
        }
        bits
    }

    /// Largest image of this version, in blocks: what the block map can address, and in
    /// v3 what the superblock's u32 `block_bitmap_blocks` can cover.
    pub fn max_blocks(self) -> u64 {
        if self.block_map_address_bits() > 32 {
            MAX_BLOCKS_V3
        } else {
            MAX_BLOCKS_V1
        }
    }
}

/// Inodes may carry a creation time (inode flag `CRTIME`): format v2 and later.
pub const INCOMPAT_CRTIME: u32 = 1 << 0;
/// Inodes may hold 48-bit block maps (inode flag `MAP48`, 16-byte records): format v3.
pub const INCOMPAT_MAP48: u32 = 1 << 1;
/// A format conversion is in progress: inodes use the layouts of `format_version` and of
/// `conversion_target` side by side, and the journal may carry the superblock.
pub const INCOMPAT_CONVERTING: u32 = 1 << 2;

/// Incompatible feature bits this build understands.
pub const INCOMPAT_SUPPORTED: u32 = INCOMPAT_CRTIME | INCOMPAT_MAP48 | INCOMPAT_CONVERTING;
/// Read-only-compatible feature bits this build understands. None are defined.
pub const RO_COMPAT_SUPPORTED: u32 = 0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities() {
        use FormatVersion as V;
        assert_eq!(V::ALL.last(), Some(&V::CURRENT));
        assert!(V::ALL.iter().all(|v| v.is_supported()));
        assert!(!V(0).is_supported() && !V(4).is_supported());
        assert_eq!(
            V::ALL.map(|v| (v.has_crtime(), v.block_map_address_bits())),
            [(false, 32), (true, 32), (true, 48)]
        );
        assert_eq!(
            V::ALL.map(V::incompat_features),
            [0, INCOMPAT_CRTIME, INCOMPAT_CRTIME | INCOMPAT_MAP48]
        );
        assert!(V::V1.max_blocks() < V::V3.max_blocks());
        assert_eq!(V::V1.max_blocks(), V::V2.max_blocks());
    }
}
