//! Makes a golden image: a 1 MiB image of format version N (the newest by default),
//! populated through `Fs` so that every kind of metadata structure appears in it at least
//! once, unmounted cleanly.
//!
//! ```text
//! cargo run -p fsd --example make_golden -- formats/golden/v<N>.img [N]
//! ```
//!
//! A golden image is generated once per format version and committed; its test
//! (`fsd/tests/golden.rs`) spells out the tree below independently, so this generator may
//! change for a later version without touching an older image. The uuid, times, inode
//! generations, journal sequence and block placement differ between runs.

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use formats::block::{BlockAddr, Ino, BLOCK_SIZE};
use formats::dir::DirHeader;
use formats::inode::{Inode, INODE_SIZE, S_IFCHR, S_IFIFO, S_IFSOCK};
use formats::superblock::{Superblock, MIN_BLOCKS, ROOT_INO};
use formats::version::FormatVersion;
use fsd_core::fs::{Fs, XattrFlags};
use fsd_core::fsck::{self, FsckOptions};
use fsd_core::mkfs::{mkfs, MkfsOptions};
use fsd_core::store::{BlockStore, MemStore};

const UID: u32 = 1000;
const GID: u32 = 1000;
const BS: u64 = BLOCK_SIZE as u64;

/// Deterministic file content: byte `i` of stream `seed`.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed as u32 * 97) as u8 ^ (i >> 9) as u8)
        .collect()
}

/// Names in `/many`: 180 bytes each, so a bucket block holds 21 of them.
fn many_name(i: usize) -> Vec<u8> {
    let mut n = format!("link-{i:03}-").into_bytes();
    while n.len() < 180 {
        n.push(b'a' + (n.len() % 26) as u8);
    }
    n
}

fn populate(fs: &Fs) -> Result<()> {
    let mk = |parent: Ino, name: &str| -> Result<Ino> {
        Ok(fs.mkdir(parent, name.as_bytes(), 0o755, UID, GID)?.ino)
    };
    let file = |parent: Ino, name: &str, mode: u32| -> Result<Ino> {
        Ok(fs.mknod(parent, name.as_bytes(), mode, 0, UID, GID)?.ino)
    };
    let put = |ino: Ino, offset: u64, data: &[u8]| -> Result<()> {
        ensure!(fs.write(ino, offset, data)? == data.len(), "short write");
        Ok(())
    };
    let xattr = |ino: Ino, name: &str, value: &[u8]| -> Result<()> {
        Ok(fs.setxattr(ino, name.as_bytes(), value, XattrFlags::default())?)
    };

    // Nested directories, a file with one inline extent, xattrs on a file and a directory,
    // a hard link, a short (inline) and a long (one data block) symlink.
    let docs = mk(ROOT_INO, "docs")?;
    let notes = mk(docs, "notes")?;
    let deep = mk(notes, "deep")?;
    let leaf = file(deep, "leaf.txt", 0o644)?;
    put(leaf, 0, b"leaf\n")?;
    let readme = file(notes, "readme.txt", 0o640)?;
    put(readme, 0, &pattern(1, 5000))?;
    xattr(readme, "user.origin", b"golden-image")?;
    xattr(readme, "user.empty", b"")?;
    xattr(docs, "user.project", b"molt")?;
    xattr(docs, "trusted.golden", &[0, 1, 2, 0xff])?;
    fs.link(readme, docs, b"readme-link")?;
    fs.symlink(docs, b"short-link", b"notes/readme.txt", UID, GID)?;
    let long_target = format!("notes/deep/{}/leaf.txt", "d".repeat(190));
    fs.symlink(docs, b"long-link", long_target.as_bytes(), UID, GID)?;

    // A file with more extents than the inline area holds (12 in v1 and v2, 9 in v3),
    // holes, and a preallocated unwritten extent; special files.
    let data = mk(ROOT_INO, "data")?;
    let frag = file(data, "fragmented.bin", 0o644)?;
    let content = pattern(2, 16 * BLOCK_SIZE);
    // Last block first: each block lands after the previous one on the image, so no two
    // file blocks merge into one extent.
    for fb in (0..16).rev() {
        put(
            frag,
            fb * BS,
            &content[(fb * BS) as usize..((fb + 1) * BS) as usize],
        )?;
    }
    let sparse = file(data, "sparse.bin", 0o644)?;
    put(sparse, 0, b"head")?;
    put(sparse, 40 * BS + 100, &pattern(3, 3000))?;
    let pre = file(data, "prealloc.bin", 0o600)?;
    put(pre, 0, &pattern(4, BLOCK_SIZE))?;
    fs.fallocate(pre, 0, BS, 3 * BS)?;
    fs.mknod(data, b"fifo", S_IFIFO | 0o644, 0, UID, GID)?;
    fs.mknod(data, b"chardev", S_IFCHR | 0o600, (1 << 8) | 3, 0, 0)?;
    fs.mknod(data, b"socket", S_IFSOCK | 0o755, 0, UID, GID)?;
    fs.link(frag, ROOT_INO, b"frag-link")?;

    // A directory of 120 long names: split buckets, each with overflow blocks. Most names
    // are hard links to one file, since a 1 MiB image has only 63 inodes.
    let many = mk(ROOT_INO, "many")?;
    let target = file(many, "target", 0o644)?;
    put(target, 0, b"target\n")?;
    for i in 0..8 {
        let f = file(many, &format!("file-{i}"), 0o644)?;
        put(f, 0, format!("file {i}\n").as_bytes())?;
    }
    for i in 0..111 {
        fs.link(target, many, &many_name(i))?;
    }
    Ok(())
}

fn inode_of(store: &dyn BlockStore, sb: &Superblock, ino: Ino) -> Result<Inode> {
    let (addr, off) = sb.geometry.inode_location(ino);
    let mut b = vec![0u8; BLOCK_SIZE];
    store.read(addr.0, &mut b)?;
    Inode::decode(ino, &b[off..off + INODE_SIZE], sb.newest_layout())?
        .context("inode slot is empty")
}

/// Confirms the image holds what it is made for.
fn verify(store: &MemStore, version: FormatVersion) -> Result<()> {
    let report = fsck::check(store, &FsckOptions::default())?;
    if !report.is_clean() {
        bail!("fsck:\n{}", report.render("golden"));
    }
    let mut b = vec![0u8; BLOCK_SIZE];
    store.read(0, &mut b)?;
    let sb = Superblock::decode(&b)?;
    ensure!(
        sb.format_version == version,
        "the image has format v{}",
        sb.format_version.0
    );

    let copy = Arc::new(MemStore::from_image(store.image()));
    let fs = Fs::mount(copy)?;
    let data = fs.lookup(ROOT_INO, b"data")?.ino;
    let frag = fs.lookup(data, b"fragmented.bin")?.ino;
    let many = fs.lookup(ROOT_INO, b"many")?.ino;
    fs.unmount()?;

    let frag = inode_of(store, &sb, frag)?;
    ensure!(
        frag.layout == version
            && frag.extent_count as usize > frag.codec().inline_capacity()
            && frag.extent_block != 0,
        "fragmented.bin has {} extents and no extent block",
        frag.extent_count
    );
    // The header is file block 0, the first inline extent.
    let header_addr = inode_of(store, &sb, many)?.inline_extents()[0].physical;
    store.read(header_addr, &mut b)?;
    let h = DirHeader::decode(&b, many, BlockAddr(header_addr))?;
    ensure!(
        h.bucket_count() > 1 && h.overflow_next > 0,
        "/many has {} buckets and {} overflow blocks",
        h.bucket_count(),
        h.overflow_next
    );
    Ok(())
}

fn main() -> Result<()> {
    const USAGE: &str = "usage: make_golden <output image> [format version]";
    let out = std::env::args().nth(1).context(USAGE)?;
    let version = match std::env::args().nth(2) {
        Some(v) => FormatVersion(v.parse().context(USAGE)?),
        None => FormatVersion::CURRENT,
    };
    ensure!(
        version.is_supported(),
        "format version {} is unknown",
        version.0
    );
    let store = Arc::new(MemStore::new(MIN_BLOCKS));
    mkfs(
        store.as_ref(),
        &out,
        &MkfsOptions {
            version,
            ..MkfsOptions::default()
        },
    )?;
    let fs = Fs::mount(store.clone())?;
    populate(&fs)?;
    fs.unmount()?;
    verify(&store, version)?;
    let image = store.image();
    std::fs::write(&out, &image).with_context(|| format!("writing {out}"))?;
    println!("{out}: format v{}, {} bytes", version.0, image.len());
    Ok(())
}
