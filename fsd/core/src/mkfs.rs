//! `fsd mkfs`: lays out an empty image of any supported format version (the newest by
//! default).

use std::time::{SystemTime, UNIX_EPOCH};

use formats::bitmap;
use formats::block::{BlockAddr, BlockKind, BLOCK_SIZE, PAYLOAD_SIZE};
use formats::dir::{Bucket, DirHeader};
use formats::extent::Extent;
use formats::inode::{InlineArea, Inode, Timespec, INODE_SIZE, S_IFDIR};
use formats::journal::JournalSuper;
use formats::superblock::{
    FsState, Geometry, Superblock, BITS_PER_BITMAP_BLOCK, ORPHAN_INO, ROOT_INO, SUPER_MAGIC,
};
use formats::version::FormatVersion;

use crate::store::BlockStore;

#[derive(Debug, thiserror::Error)]
pub enum MkfsError {
    #[error("{0} already holds a Molt image; use --force to overwrite it")]
    ExistingImage(String),
    #[error("cannot make a filesystem of this size: {0}")]
    Size(formats::FormatError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Format(#[from] formats::FormatError),
}

pub struct MkfsOptions {
    pub force: bool,
    /// Owner of the root directory.
    pub uid: u32,
    pub gid: u32,
    /// Format version of the image.
    pub version: FormatVersion,
}

impl Default for MkfsOptions {
    fn default() -> Self {
        MkfsOptions {
            force: false,
            uid: 0,
            gid: 0,
            version: FormatVersion::CURRENT,
        }
    }
}

pub fn now() -> Timespec {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timespec {
        sec: d.as_secs() as i64,
        nsec: d.subsec_nanos(),
    }
}

/// A value that differs between runs, for uuids and journal sequence starts.
fn entropy(salt: u64) -> u64 {
    let t = now();
    let mut x =
        (t.sec as u64) ^ ((t.nsec as u64) << 32) ^ ((std::process::id() as u64) << 16) ^ salt;
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

/// Whether block 0 of the store carries the Molt magic.
pub fn has_molt_magic(store: &dyn BlockStore) -> std::io::Result<bool> {
    if store.num_blocks() == 0 {
        return Ok(false);
    }
    let mut b = vec![0u8; BLOCK_SIZE];
    store.read(0, &mut b)?;
    Ok(u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) == SUPER_MAGIC)
}

/// Writes an empty filesystem: bitmaps, journal superblock, the root and orphan
/// directories, and finally the superblock, then flushes. Only O(bitmap) blocks are
/// written, so a sparse 1 TiB image takes moments.
pub fn mkfs(
    store: &dyn BlockStore,
    name: &str,
    opts: &MkfsOptions,
) -> Result<Superblock, MkfsError> {
    if !opts.force && has_molt_magic(store)? {
        return Err(MkfsError::ExistingImage(name.to_string()));
    }
    let version = opts.version;
    if !version.is_supported() {
        return Err(MkfsError::Format(
            formats::FormatError::UnsupportedVersion {
                what: "mkfs",
                found: version.0,
                supported: FormatVersion::CURRENT.0,
            },
        ));
    }
    let geo = Geometry::for_version(store.num_blocks(), version).map_err(MkfsError::Size)?;
    let t = now();

    // Data area: root dir header + bucket 0, then orphan dir header + bucket 0.
    let root_blocks = geo.data_start;
    let orphan_blocks = geo.data_start + 2;
    let used_blocks = geo.data_start + 4;

    // Invalidate any old superblock first so an interrupted mkfs never looks like an image.
    store.write(0, &vec![0u8; BLOCK_SIZE])?;

    let mut ibits = vec![0u8; geo.inode_bitmap_blocks as usize * PAYLOAD_SIZE];
    for i in 0..(geo.inode_bitmap_blocks as u64 * BITS_PER_BITMAP_BLOCK) {
        let used = i <= ORPHAN_INO.0 as u64 || i > geo.inode_count as u64;
        if used {
            bitmap::set_bit(&mut ibits, i as usize, true);
        }
    }
    write_bitmap(
        store,
        BlockKind::InodeBitmap,
        geo.inode_bitmap_start,
        &ibits,
    )?;

    let mut bbits = vec![0u8; geo.block_bitmap_blocks as usize * PAYLOAD_SIZE];
    let total_bits = geo.block_bitmap_blocks as u64 * BITS_PER_BITMAP_BLOCK;
    fill_bits(&mut bbits, 0, used_blocks);
    fill_bits(&mut bbits, geo.total_blocks, total_bits);
    write_bitmap(
        store,
        BlockKind::BlockBitmap,
        geo.block_bitmap_start,
        &bbits,
    )?;

    let mut itable = vec![0u8; BLOCK_SIZE];
    for (ino, first, mode) in [
        (ROOT_INO, root_blocks, S_IFDIR | 0o755),
        (ORPHAN_INO, orphan_blocks, S_IFDIR | 0o700),
    ] {
        let mut inode = Inode::new(version, mode, opts.uid, opts.gid, t);
        inode.nlink = 2;
        inode.size = 2 * BLOCK_SIZE as u64;
        inode.blocks = 2;
        inode.extent_count = 1;
        inode.inline = InlineArea::Extents(vec![Extent {
            logical: 0,
            physical: first,
            len: 2,
            unwritten: false,
        }]);
        let (addr, off) = geo.inode_location(ino);
        debug_assert_eq!(addr.0, geo.inode_table_start);
        inode.encode(ino, &mut itable[off..off + INODE_SIZE])?;
        store.write(
            first,
            &DirHeader::new(ino).encode(ino, BlockAddr(first))[..],
        )?;
        store.write(
            first + 1,
            &Bucket::default().encode(ino, BlockAddr(first + 1))?[..],
        )?;
    }
    store.write(geo.inode_table_start, &itable)?;

    let jsb = JournalSuper {
        blocks: geo.journal_blocks,
        sequence: entropy(1) >> 16,
    };
    store.write(
        geo.journal_start,
        &jsb.encode(BlockAddr(geo.journal_start))[..],
    )?;

    let mut uuid = [0u8; 16];
    uuid[..8].copy_from_slice(&entropy(2).to_le_bytes());
    uuid[8..].copy_from_slice(&entropy(3).to_le_bytes());
    let sb = Superblock {
        format_version: version,
        compat: 0,
        ro_compat: 0,
        incompat: Superblock::incompat_for(version, None),
        state: FsState::Clean,
        geometry: geo,
        free_blocks: geo.total_blocks - used_blocks,
        free_inodes: geo.inode_count - ORPHAN_INO.0,
        mount_count: 0,
        uuid,
        created_sec: t.sec,
        last_mount_sec: 0,
        conversion_cursor: 0,
        conversion_target: None,
    };
    store.flush()?;
    store.write(0, &sb.encode()[..])?;
    store.flush()?;
    Ok(sb)
}

fn fill_bits(bits: &mut [u8], from: u64, to: u64) {
    for i in from..to {
        bitmap::set_bit(bits, i as usize, true);
    }
}

fn write_bitmap(
    store: &dyn BlockStore,
    kind: BlockKind,
    start: u64,
    bits: &[u8],
) -> std::io::Result<()> {
    for (i, chunk) in bits.chunks(PAYLOAD_SIZE).enumerate() {
        let addr = start + i as u64;
        store.write(addr, &bitmap::encode(kind, chunk, BlockAddr(addr))[..])?;
    }
    Ok(())
}
