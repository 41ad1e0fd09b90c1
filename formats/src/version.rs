//! Format versions and feature flags. Callers ask capability questions of the version
//! instead of comparing numbers.

/// On-disk format version recorded in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FormatVersion(pub u32);

impl FormatVersion {
    pub const V1: FormatVersion = FormatVersion(1);
    /// The newest version this build writes.
    pub const CURRENT: FormatVersion = FormatVersion::V1;

    pub fn is_supported(self) -> bool {
        self.0 >= 1 && self.0 <= Self::CURRENT.0
    }

    /// Width in bits of a block address inside the block map.
    pub fn block_map_address_bits(self) -> u32 {
        32
    }

    /// Whether inodes carry a creation time (not in v1).
    pub fn has_crtime(self) -> bool {
        false
    }
}

/// Incompatible feature bits this build understands. v1 defines none.
pub const INCOMPAT_SUPPORTED: u32 = 0;
/// Read-only-compatible feature bits this build understands. v1 defines none.
pub const RO_COMPAT_SUPPORTED: u32 = 0;
