//! The superblock (block 0) and the image geometry it records.
//!
//! ```text
//! off  size field
//!   0     8 magic            "MOLT-FS\0"
//!   8     4 format_version
//!  12     4 block_size       always 4096
//!  16     4 compat           features an older reader may ignore
//!  20     4 ro_compat        features an older reader may only read
//!  24     4 incompat         features an older reader must refuse
//!  28     4 state            1 clean, 2 mounted, 3 errors found
//!  32     8 total_blocks
//!  40     4 inode_count      inode numbers run 1..inode_count
//!  44     4 root_ino         always 1
//!  48     8 journal_start
//!  56     4 journal_blocks
//!  60     4 inode_bitmap_blocks
//!  64     8 inode_bitmap_start
//!  72     8 block_bitmap_start
//!  80     4 block_bitmap_blocks
//!  84     4 inode_table_blocks
//!  88     8 inode_table_start
//!  96     8 data_start
//! 104     8 free_blocks      exact when state is clean
//! 112     4 free_inodes      exact when state is clean
//! 116     4 mount_count
//! 120    16 uuid
//! 136     8 created_sec
//! 144     8 last_mount_sec
//! 152     8 conversion_cursor  next inode a conversion converts; 0 when none runs
//! 160     4 conversion_target  format version a conversion converts to; 0 when none runs
//! 164  3916 zero
//! 4080   16 block tail (kind MSUP, owner 0, addr 0)
//! ```

use crate::block::{self, BlockAddr, BlockKind, Ino, BLOCK_SIZE, PAYLOAD_SIZE};
use crate::bytes::*;
use crate::error::{FormatError, Result};
use crate::inode::INODE_SIZE;
use crate::version::{FormatVersion, INCOMPAT_CONVERTING};

pub const SUPER_MAGIC: u64 = u64::from_le_bytes(*b"MOLT-FS\0");

pub const OFF_MAGIC: usize = 0;
pub const OFF_FORMAT_VERSION: usize = OFF_MAGIC + 8;
pub const OFF_BLOCK_SIZE: usize = OFF_FORMAT_VERSION + 4;
pub const OFF_COMPAT: usize = OFF_BLOCK_SIZE + 4;
pub const OFF_RO_COMPAT: usize = OFF_COMPAT + 4;
pub const OFF_INCOMPAT: usize = OFF_RO_COMPAT + 4;
pub const OFF_STATE: usize = OFF_INCOMPAT + 4;
pub const OFF_TOTAL_BLOCKS: usize = OFF_STATE + 4;
pub const OFF_INODE_COUNT: usize = OFF_TOTAL_BLOCKS + 8;
pub const OFF_ROOT_INO: usize = OFF_INODE_COUNT + 4;
pub const OFF_JOURNAL_START: usize = OFF_ROOT_INO + 4;
pub const OFF_JOURNAL_BLOCKS: usize = OFF_JOURNAL_START + 8;
pub const OFF_INODE_BITMAP_BLOCKS: usize = OFF_JOURNAL_BLOCKS + 4;
pub const OFF_INODE_BITMAP_START: usize = OFF_INODE_BITMAP_BLOCKS + 4;
pub const OFF_BLOCK_BITMAP_START: usize = OFF_INODE_BITMAP_START + 8;
pub const OFF_BLOCK_BITMAP_BLOCKS: usize = OFF_BLOCK_BITMAP_START + 8;
pub const OFF_INODE_TABLE_BLOCKS: usize = OFF_BLOCK_BITMAP_BLOCKS + 4;
pub const OFF_INODE_TABLE_START: usize = OFF_INODE_TABLE_BLOCKS + 4;
pub const OFF_DATA_START: usize = OFF_INODE_TABLE_START + 8;
pub const OFF_FREE_BLOCKS: usize = OFF_DATA_START + 8;
pub const OFF_FREE_INODES: usize = OFF_FREE_BLOCKS + 8;
pub const OFF_MOUNT_COUNT: usize = OFF_FREE_INODES + 4;
pub const OFF_UUID: usize = OFF_MOUNT_COUNT + 4;
pub const OFF_CREATED_SEC: usize = OFF_UUID + 16;
pub const OFF_LAST_MOUNT_SEC: usize = OFF_CREATED_SEC + 8;
pub const OFF_CONVERSION_CURSOR: usize = OFF_LAST_MOUNT_SEC + 8;
pub const OFF_CONVERSION_TARGET: usize = OFF_CONVERSION_CURSOR + 8;
pub const SUPER_FIELDS_END: usize = OFF_CONVERSION_TARGET + 4;

/// Bytes of image per inode that mkfs provisions.
pub const BYTES_PER_INODE: u64 = 16 * 1024;
/// Smallest image mkfs accepts: 1 MiB (256 blocks).
pub const MIN_BLOCKS: u64 = 256;
pub use crate::version::{MAX_BLOCKS_V1, MAX_BLOCKS_V3};
/// Items one bitmap block covers.
pub const BITS_PER_BITMAP_BLOCK: u64 = (PAYLOAD_SIZE * 8) as u64;
pub const INODES_PER_BLOCK: u64 = (BLOCK_SIZE / INODE_SIZE) as u64;
pub const ROOT_INO: Ino = Ino(1);
/// A directory outside the tree that holds unlinked inodes still in use; emptied at mount.
pub const ORPHAN_INO: Ino = Ino(2);
/// The first inode number handed to users' files.
pub const FIRST_FREE_INO: u32 = 3;

/// Filesystem state recorded in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsState {
    Clean = 1,
    Mounted = 2,
    Errors = 3,
}

impl FsState {
    fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(FsState::Clean),
            2 => Some(FsState::Mounted),
            3 => Some(FsState::Errors),
            _ => None,
        }
    }
}

/// Region geometry of an image, derived from its size by `Geometry::for_blocks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub total_blocks: u64,
    pub inode_count: u32,
    pub journal_start: u64,
    pub journal_blocks: u32,
    pub inode_bitmap_start: u64,
    pub inode_bitmap_blocks: u32,
    pub block_bitmap_start: u64,
    pub block_bitmap_blocks: u32,
    pub inode_table_start: u64,
    pub inode_table_blocks: u32,
    pub data_start: u64,
}

impl Geometry {
    /// Lays out an image of `total_blocks` blocks for formats v1 and v2; see
    /// `for_version`.
    pub fn for_blocks(total_blocks: u64) -> Result<Geometry> {
        Geometry::for_version(total_blocks, FormatVersion::V1)
    }

    /// Lays out an image of `total_blocks` blocks of format `version`. Refuses sizes the
    /// version cannot hold with `UnsupportedSize`: a size is a choice of the caller, not
    /// damage. The formulas are the same for every version; only the largest size differs.
    pub fn for_version(total_blocks: u64, version: FormatVersion) -> Result<Geometry> {
        const WHAT: &str = "geometry";
        let max_blocks = version.max_blocks();
        // Sizes in bytes for the messages, wide enough for any u64 block count.
        let bytes_of = |blocks: u64| blocks as u128 * BLOCK_SIZE as u128;
        if total_blocks < MIN_BLOCKS {
            return Err(FormatError::UnsupportedSize {
                what: WHAT,
                detail: format!(
                    "image of {} bytes is below the minimum of {} bytes",
                    bytes_of(total_blocks),
                    bytes_of(MIN_BLOCKS)
                ),
            });
        }
        if total_blocks > max_blocks {
            return Err(FormatError::UnsupportedSize {
                what: WHAT,
                detail: format!(
                    "image of {} bytes exceeds format v{}'s limit of {} bytes ({}-bit block addresses)",
                    bytes_of(total_blocks),
                    version.0,
                    bytes_of(max_blocks),
                    version.block_map_address_bits()
                ),
            });
        }
        let bytes = total_blocks * BLOCK_SIZE as u64;
        // Inode numbers are u32 and inode 0 is reserved; round up to whole table blocks.
        let inodes = (bytes / BYTES_PER_INODE).clamp(64, u32::MAX as u64 - INODES_PER_BLOCK);
        let inode_table_blocks = inodes.div_ceil(INODES_PER_BLOCK);
        let inode_count = (inode_table_blocks * INODES_PER_BLOCK - 1) as u32;
        let journal_blocks = (total_blocks / 128).clamp(64, 16384) as u32;
        let inode_bitmap_blocks = (inode_count as u64 + 1).div_ceil(BITS_PER_BITMAP_BLOCK) as u32;
        let block_bitmap_blocks = total_blocks.div_ceil(BITS_PER_BITMAP_BLOCK) as u32;
        let journal_start = 1;
        let inode_bitmap_start = journal_start + journal_blocks as u64;
        let block_bitmap_start = inode_bitmap_start + inode_bitmap_blocks as u64;
        let inode_table_start = block_bitmap_start + block_bitmap_blocks as u64;
        let data_start = inode_table_start + inode_table_blocks;
        if data_start + 16 > total_blocks {
            return Err(FormatError::UnsupportedSize {
                what: WHAT,
                detail: "image too small for its metadata".into(),
            });
        }
        Ok(Geometry {
            total_blocks,
            inode_count,
            journal_start,
            journal_blocks,
            inode_bitmap_start,
            inode_bitmap_blocks,
            block_bitmap_start,
            block_bitmap_blocks,
            inode_table_start,
            inode_table_blocks: inode_table_blocks as u32,
            data_start,
        })
    }

    /// Block holding inode `ino` and the byte offset of the inode in it.
    pub fn inode_location(&self, ino: Ino) -> (BlockAddr, usize) {
        let slot = ino.0 as u64;
        (
            BlockAddr(self.inode_table_start + slot / INODES_PER_BLOCK),
            (slot % INODES_PER_BLOCK) as usize * INODE_SIZE,
        )
    }

    pub fn is_valid_ino(&self, ino: Ino) -> bool {
        ino.0 >= 1 && ino.0 <= self.inode_count
    }

    pub fn is_data_block(&self, addr: u64) -> bool {
        addr >= self.data_start && addr < self.total_blocks
    }
}

/// The decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub format_version: FormatVersion,
    pub compat: u32,
    pub ro_compat: u32,
    pub incompat: u32,
    pub state: FsState,
    pub geometry: Geometry,
    pub free_blocks: u64,
    pub free_inodes: u32,
    pub mount_count: u32,
    pub uuid: [u8; 16],
    pub created_sec: i64,
    pub last_mount_sec: i64,
    /// Next inode number a conversion will convert (`1 ..= inode_count + 1`); 0 when no
    /// conversion runs.
    pub conversion_cursor: u64,
    /// The version a running conversion converts to; `None` when none runs. While set,
    /// `incompat` carries `INCOMPAT_CONVERTING` and the target's feature bits.
    pub conversion_target: Option<FormatVersion>,
}

impl Superblock {
    /// The newest inode layout the image may hold: the conversion target while a
    /// conversion runs, else the format version. Inodes are written in this layout.
    pub fn newest_layout(&self) -> FormatVersion {
        self.conversion_target.unwrap_or(self.format_version)
    }

    /// The `incompat` word an image of version `version`, converting to `target` if
    /// any, carries.
    pub fn incompat_for(version: FormatVersion, target: Option<FormatVersion>) -> u32 {
        match target {
            Some(t) => t.incompat_features() | version.incompat_features() | INCOMPAT_CONVERTING,
            None => version.incompat_features(),
        }
    }

    /// `incompat` bits this build does not understand. `decode` refuses an image with any.
    pub fn unknown_incompat(&self) -> u32 {
        self.incompat & !crate::version::INCOMPAT_SUPPORTED
    }

    /// `ro_compat` bits this build does not understand. A mounter must not mount the image
    /// read-write while this is non-zero; reading it is safe.
    pub fn unknown_ro_compat(&self) -> u32 {
        self.ro_compat & !crate::version::RO_COMPAT_SUPPORTED
    }

    pub fn encode(&self) -> Box<crate::block::Block> {
        let mut b = block::zeroed();
        let g = &self.geometry;
        put_u64(&mut b[..], OFF_MAGIC, SUPER_MAGIC);
        put_u32(&mut b[..], OFF_FORMAT_VERSION, self.format_version.0);
        put_u32(&mut b[..], OFF_BLOCK_SIZE, BLOCK_SIZE as u32);
        put_u32(&mut b[..], OFF_COMPAT, self.compat);
        put_u32(&mut b[..], OFF_RO_COMPAT, self.ro_compat);
        put_u32(&mut b[..], OFF_INCOMPAT, self.incompat);
        put_u32(&mut b[..], OFF_STATE, self.state as u32);
        put_u64(&mut b[..], OFF_TOTAL_BLOCKS, g.total_blocks);
        put_u32(&mut b[..], OFF_INODE_COUNT, g.inode_count);
        put_u32(&mut b[..], OFF_ROOT_INO, ROOT_INO.0);
        put_u64(&mut b[..], OFF_JOURNAL_START, g.journal_start);
        put_u32(&mut b[..], OFF_JOURNAL_BLOCKS, g.journal_blocks);
        put_u32(&mut b[..], OFF_INODE_BITMAP_BLOCKS, g.inode_bitmap_blocks);
        put_u64(&mut b[..], OFF_INODE_BITMAP_START, g.inode_bitmap_start);
        put_u64(&mut b[..], OFF_BLOCK_BITMAP_START, g.block_bitmap_start);
        put_u32(&mut b[..], OFF_BLOCK_BITMAP_BLOCKS, g.block_bitmap_blocks);
        put_u32(&mut b[..], OFF_INODE_TABLE_BLOCKS, g.inode_table_blocks);
        put_u64(&mut b[..], OFF_INODE_TABLE_START, g.inode_table_start);
        put_u64(&mut b[..], OFF_DATA_START, g.data_start);
        put_u64(&mut b[..], OFF_FREE_BLOCKS, self.free_blocks);
        put_u32(&mut b[..], OFF_FREE_INODES, self.free_inodes);
        put_u32(&mut b[..], OFF_MOUNT_COUNT, self.mount_count);
        b[OFF_UUID..OFF_UUID + 16].copy_from_slice(&self.uuid);
        put_i64(&mut b[..], OFF_CREATED_SEC, self.created_sec);
        put_i64(&mut b[..], OFF_LAST_MOUNT_SEC, self.last_mount_sec);
        put_u64(&mut b[..], OFF_CONVERSION_CURSOR, self.conversion_cursor);
        put_u32(
            &mut b[..],
            OFF_CONVERSION_TARGET,
            self.conversion_target.map_or(0, |t| t.0),
        );
        block::seal(&mut b[..], BlockKind::Superblock, Ino(0), BlockAddr(0));
        b
    }

    /// Decodes and validates block 0. A foreign file gives `BadMagic` before anything else
    /// is believed; the geometry must be exactly what `Geometry::for_blocks` derives.
    pub fn decode(b: &[u8]) -> Result<Superblock> {
        const WHAT: &str = "superblock";
        if b.len() != BLOCK_SIZE {
            return Err(FormatError::Truncated {
                what: WHAT,
                len: b.len(),
                need: BLOCK_SIZE,
            });
        }
        let magic = get_u64(b, OFF_MAGIC);
        if magic != SUPER_MAGIC {
            return Err(FormatError::BadMagic {
                what: WHAT,
                found: magic,
            });
        }
        block::verify(b, BlockKind::Superblock, Some(Ino(0)), BlockAddr(0))?;
        let version = FormatVersion(get_u32(b, OFF_FORMAT_VERSION));
        if !version.is_supported() {
            return Err(FormatError::UnsupportedVersion {
                what: WHAT,
                found: version.0,
                supported: FormatVersion::CURRENT.0,
            });
        }
        let incompat = get_u32(b, OFF_INCOMPAT);
        let unknown = incompat & !crate::version::INCOMPAT_SUPPORTED;
        if unknown != 0 {
            return Err(FormatError::UnsupportedFeatures {
                what: "superblock incompat",
                bits: unknown,
            });
        }
        if get_u32(b, OFF_BLOCK_SIZE) != BLOCK_SIZE as u32 {
            return Err(FormatError::corrupted(WHAT, "block size is not 4096"));
        }
        let state = FsState::from_u32(get_u32(b, OFF_STATE))
            .ok_or_else(|| FormatError::corrupted(WHAT, "unknown state"))?;
        let total_blocks = get_u64(b, OFF_TOTAL_BLOCKS);
        // A checksummed superblock whose size its version cannot lay out was not written
        // by a writer of that version: that is damage, not an unsupported size.
        let geometry = Geometry::for_version(total_blocks, version)
            .map_err(|e| FormatError::corrupted(WHAT, e.to_string()))?;
        let stored = Geometry {
            total_blocks,
            inode_count: get_u32(b, OFF_INODE_COUNT),
            journal_start: get_u64(b, OFF_JOURNAL_START),
            journal_blocks: get_u32(b, OFF_JOURNAL_BLOCKS),
            inode_bitmap_start: get_u64(b, OFF_INODE_BITMAP_START),
            inode_bitmap_blocks: get_u32(b, OFF_INODE_BITMAP_BLOCKS),
            block_bitmap_start: get_u64(b, OFF_BLOCK_BITMAP_START),
            block_bitmap_blocks: get_u32(b, OFF_BLOCK_BITMAP_BLOCKS),
            inode_table_start: get_u64(b, OFF_INODE_TABLE_START),
            inode_table_blocks: get_u32(b, OFF_INODE_TABLE_BLOCKS),
            data_start: get_u64(b, OFF_DATA_START),
        };
        if stored != geometry {
            return Err(FormatError::corrupted(
                WHAT,
                "recorded geometry does not match the image size",
            ));
        }
        if get_u32(b, OFF_ROOT_INO) != ROOT_INO.0 {
            return Err(FormatError::corrupted(WHAT, "root inode is not 1"));
        }
        if b[SUPER_FIELDS_END..block::TAIL_KIND]
            .iter()
            .any(|&x| x != 0)
        {
            return Err(FormatError::corrupted(WHAT, "reserved bytes are not zero"));
        }
        // The conversion state and the feature bits must tell the same story.
        let cursor = get_u64(b, OFF_CONVERSION_CURSOR);
        let target = match get_u32(b, OFF_CONVERSION_TARGET) {
            0 => None,
            t => Some(FormatVersion(t)),
        };
        if let Some(t) = target {
            if !t.is_supported() {
                return Err(FormatError::UnsupportedVersion {
                    what: "superblock conversion target",
                    found: t.0,
                    supported: FormatVersion::CURRENT.0,
                });
            }
            if t <= version {
                return Err(FormatError::corrupted(
                    WHAT,
                    format!(
                        "converts from v{} to v{}, not a newer version",
                        version.0, t.0
                    ),
                ));
            }
            if cursor == 0 || cursor > geometry.inode_count as u64 + 1 {
                return Err(FormatError::corrupted(
                    WHAT,
                    format!(
                        "conversion cursor {cursor} is outside 1..={}",
                        geometry.inode_count as u64 + 1
                    ),
                ));
            }
        } else if cursor != 0 {
            return Err(FormatError::corrupted(
                WHAT,
                "conversion cursor set with no conversion running",
            ));
        }
        let want = Superblock::incompat_for(version, target);
        if incompat != want {
            return Err(FormatError::corrupted(
                WHAT,
                format!(
                    "incompat features {incompat:#x} do not match format v{}{} ({want:#x})",
                    version.0,
                    target.map_or(String::new(), |t| format!(" converting to v{}", t.0))
                ),
            ));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[OFF_UUID..OFF_UUID + 16]);
        Ok(Superblock {
            format_version: version,
            compat: get_u32(b, OFF_COMPAT),
            ro_compat: get_u32(b, OFF_RO_COMPAT),
            incompat,
            state,
            geometry,
            free_blocks: get_u64(b, OFF_FREE_BLOCKS),
            free_inodes: get_u32(b, OFF_FREE_INODES),
            mount_count: get_u32(b, OFF_MOUNT_COUNT),
            uuid,
            created_sec: get_i64(b, OFF_CREATED_SEC),
            last_mount_sec: get_i64(b, OFF_LAST_MOUNT_SEC),
            conversion_cursor: cursor,
            conversion_target: target,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            format_version: FormatVersion::V1,
            compat: 0,
            ro_compat: 0,
            incompat: 0,
            state: FsState::Clean,
            geometry: Geometry::for_blocks(4096).unwrap(),
            free_blocks: 100,
            free_inodes: 50,
            mount_count: 3,
            uuid: [7; 16],
            created_sec: 1_700_000_000,
            last_mount_sec: 0,
            conversion_cursor: 0,
            conversion_target: None,
        }
    }

    #[test]
    fn round_trip() {
        let sb = sample();
        assert_eq!(Superblock::decode(&sb.encode()[..]).unwrap(), sb);
    }

    #[test]
    fn versions_and_conversions_round_trip() {
        use crate::version::*;
        for v in FormatVersion::ALL {
            let sb = Superblock {
                format_version: v,
                incompat: v.incompat_features(),
                ..sample()
            };
            assert_eq!(Superblock::decode(&sb.encode()[..]).unwrap(), sb);
            assert_eq!(sb.newest_layout(), v);
        }
        let converting = Superblock {
            format_version: FormatVersion::V1,
            incompat: INCOMPAT_CRTIME | INCOMPAT_MAP48 | INCOMPAT_CONVERTING,
            conversion_target: Some(FormatVersion::V3),
            conversion_cursor: 17,
            ..sample()
        };
        let b = converting.encode();
        assert_eq!(get_u32(&b[..], OFF_CONVERSION_TARGET), 3);
        assert_eq!(Superblock::decode(&b[..]).unwrap(), converting);
        assert_eq!(converting.newest_layout(), FormatVersion::V3);
        let inodes = converting.geometry.inode_count as u64;
        // Inconsistent states are corrupted; a target this build lacks is unsupported.
        for bad in [
            Superblock {
                incompat: INCOMPAT_CRTIME | INCOMPAT_MAP48,
                ..converting.clone()
            },
            Superblock {
                conversion_cursor: 0,
                ..converting.clone()
            },
            Superblock {
                conversion_cursor: inodes + 2,
                ..converting.clone()
            },
            Superblock {
                format_version: FormatVersion::V3,
                ..converting.clone()
            },
            Superblock {
                conversion_target: None,
                incompat: 0,
                ..converting.clone()
            },
            Superblock {
                incompat: INCOMPAT_CRTIME,
                ..sample()
            },
            Superblock {
                format_version: FormatVersion::V2,
                ..sample()
            },
        ] {
            assert!(
                matches!(
                    Superblock::decode(&bad.encode()[..]),
                    Err(FormatError::Corrupted { .. })
                ),
                "{bad:?}"
            );
        }
        let future = Superblock {
            conversion_target: Some(FormatVersion(4)),
            ..converting.clone()
        };
        assert!(matches!(
            Superblock::decode(&future.encode()[..]),
            Err(FormatError::UnsupportedVersion { found: 4, .. })
        ));
        let done = Superblock {
            conversion_cursor: inodes + 1,
            ..converting
        };
        assert!(Superblock::decode(&done.encode()[..]).is_ok());
    }

    #[test]
    fn v3_lays_out_images_past_16_tib() {
        let big = MAX_BLOCKS_V1 * 4;
        assert!(Geometry::for_blocks(big).is_err());
        let g = Geometry::for_version(big, FormatVersion::V3).unwrap();
        assert!(g.data_start < big && g.block_bitmap_blocks as u64 == big.div_ceil(32640));
        let last = Geometry::for_version(MAX_BLOCKS_V3, FormatVersion::V3).unwrap();
        assert!(last.block_bitmap_blocks < u32::MAX);
        assert!(matches!(
            Geometry::for_version(MAX_BLOCKS_V3 + 1, FormatVersion::V3),
            Err(FormatError::UnsupportedSize { .. })
        ));
        let sb = Superblock {
            format_version: FormatVersion::V3,
            incompat: FormatVersion::V3.incompat_features(),
            geometry: g,
            ..sample()
        };
        assert_eq!(Superblock::decode(&sb.encode()[..]).unwrap(), sb);
        // The same size recorded by a v2 superblock is damage.
        let v2 = Superblock {
            format_version: FormatVersion::V2,
            incompat: FormatVersion::V2.incompat_features(),
            ..sb
        };
        assert!(Superblock::decode(&v2.encode()[..]).is_err());
    }

    #[test]
    fn geometry_limits() {
        assert!(Geometry::for_blocks(MIN_BLOCKS - 1).is_err());
        assert!(Geometry::for_blocks(MIN_BLOCKS).is_ok());
        // 1 TiB and the v1 maximum both lay out.
        assert!(Geometry::for_blocks(1 << 28).is_ok());
        assert!(Geometry::for_blocks(MAX_BLOCKS_V1).is_ok());
        assert!(Geometry::for_blocks(MAX_BLOCKS_V1 + 1).is_err());
    }

    /// `sb` encoded, with the u32 at `off` set to `v` and the tail resealed.
    fn with_u32(sb: &Superblock, off: usize, v: u32) -> Box<crate::block::Block> {
        let mut b = sb.encode();
        put_u32(&mut b[..], off, v);
        block::seal(&mut b[..], BlockKind::Superblock, Ino(0), BlockAddr(0));
        b
    }

    #[test]
    fn unknown_incompat_bits_are_unsupported_not_corrupted() {
        let b = with_u32(&sample(), OFF_INCOMPAT, 0x8000_0008);
        assert_eq!(
            Superblock::decode(&b[..]),
            Err(FormatError::UnsupportedFeatures {
                what: "superblock incompat",
                bits: 0x8000_0008,
            })
        );
        let sb = Superblock {
            incompat: 0x10,
            ..sample()
        };
        assert_eq!(sb.unknown_incompat(), 0x10);
        assert_eq!(sample().unknown_incompat(), 0);
    }

    #[test]
    fn unknown_ro_compat_bits_decode_and_are_reported() {
        // ro_compat bits do not stop a read: the mounter refuses read-write instead.
        let b = with_u32(&sample(), OFF_RO_COMPAT, 0x4);
        let sb = Superblock::decode(&b[..]).unwrap();
        assert_eq!(sb.ro_compat, 0x4);
        assert_eq!(sb.unknown_ro_compat(), 0x4);
        assert_eq!(sample().unknown_ro_compat(), 0);
        // Unknown compat bits mean nothing to a reader at all.
        let b = with_u32(&sample(), OFF_COMPAT, 0xFFFF_FFFF);
        assert!(Superblock::decode(&b[..]).is_ok());
    }

    #[test]
    fn size_refusals_are_unsupported_sizes() {
        for t in [0, 1, MIN_BLOCKS - 1, MAX_BLOCKS_V1 + 1, u64::MAX] {
            assert!(
                matches!(
                    Geometry::for_blocks(t),
                    Err(FormatError::UnsupportedSize { .. })
                ),
                "{t} blocks"
            );
        }
        // In a checksummed superblock, a size v1 cannot lay out is damage.
        let mut b = sample().encode();
        put_u64(&mut b[..], OFF_TOTAL_BLOCKS, MAX_BLOCKS_V1 + 1);
        block::seal(&mut b[..], BlockKind::Superblock, Ino(0), BlockAddr(0));
        assert!(matches!(
            Superblock::decode(&b[..]),
            Err(FormatError::Corrupted { .. })
        ));
    }

    #[test]
    fn foreign_data_is_bad_magic() {
        let b = [0xAAu8; BLOCK_SIZE];
        assert!(matches!(
            Superblock::decode(&b),
            Err(FormatError::BadMagic { .. })
        ));
    }
}
