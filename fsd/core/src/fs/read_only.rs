//! Read-only mounts: the image is opened without a single write, and every change is
//! refused with [`FsError::ReadOnly`] (EROFS).
//!
//! Only a clean image is mounted read-only: a dirty one (state not clean, or a journal
//! holding transactions) would need a replay, which writes, and serving it without the
//! replay would show an older state than the one acknowledged. The refusal names the
//! way out (a read-write mount once, or `fsd fsck --repair`).
//!
//! The mechanism is the latch every mutating path already checks (`failed`, through
//! `check_writable`): it is set from the start, so operations, commits, conversion steps
//! and access-time updates all refuse or skip. The `read_only` flag tells the few calls
//! that succeed on a read-only filesystem without writing: `sync` (nothing is pending)
//! and `unmount` (the image stays as it was found).

use std::sync::Arc;

use formats::block::BLOCK_SIZE;
use formats::superblock::FsState;

use super::{journal, Fs, FsError, FsResult};
use crate::store::BlockStore;

/// Why every change to a read-only mount is refused.
const READ_ONLY_WHY: &str = "the filesystem is mounted read-only";

/// The refusal of a dirty image.
const DIRTY_WHY: &str = "the image was not unmounted cleanly and its journal may hold \
    changes, which a read-only mount cannot replay (replaying writes); mount it read-write \
    once, or run `fsd fsck --repair`, then mount it read-only";

impl Fs {
    /// Opens a clean image read-only: reads the superblock, checks that the image was
    /// unmounted cleanly and the journal is empty, and loads the bitmaps. Nothing is
    /// written, now or later: every mutating operation fails with [`FsError::ReadOnly`],
    /// access times are not updated, and [`Fs::unmount`] leaves the image untouched.
    /// Read-only-compatible features this version does not know do not prevent it.
    pub fn mount_read_only(store: Arc<dyn BlockStore>) -> FsResult<Fs> {
        let mut b = vec![0u8; BLOCK_SIZE];
        store.read(0, &mut b)?;
        let sb = super::decode_mountable_superblock(&b, store.as_ref())?;
        match sb.state {
            FsState::Clean => {}
            FsState::Errors => {
                return Err(FsError::Corrupted(
                    "the image is marked as having errors".into(),
                ))
            }
            _ => return Err(FsError::Unsupported(DIRTY_WHY)),
        }
        if !journal::scan(store.as_ref(), &sb.geometry)?
            .transactions
            .is_empty()
        {
            return Err(FsError::Unsupported(DIRTY_WHY));
        }
        // With an empty journal, taking the image over as a live successor does exactly
        // what is needed and writes nothing: nothing pinned, nothing withheld.
        let fs = Fs::adopt(store, &[])?;
        {
            let mut g = fs.lock();
            g.read_only = true;
            g.failed = Some(READ_ONLY_WHY.into());
        }
        Ok(fs)
    }

    /// Whether the filesystem was mounted read-only.
    pub fn is_read_only(&self) -> bool {
        self.lock().read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{Atime, SetAttr};
    use crate::mkfs::{mkfs, MkfsOptions};
    use crate::store::MemStore;
    use formats::inode::S_IFREG;
    use formats::superblock::ROOT_INO;

    fn image() -> Arc<MemStore> {
        let store = Arc::new(MemStore::new(4096));
        mkfs(store.as_ref(), "test", &MkfsOptions::default()).unwrap();
        store
    }

    fn bytes(store: &MemStore) -> Vec<u8> {
        let mut all = Vec::new();
        let mut b = vec![0u8; BLOCK_SIZE];
        for a in 0..store.num_blocks() {
            store.read(a, &mut b).unwrap();
            all.extend_from_slice(&b);
        }
        all
    }

    #[test]
    fn a_read_only_mount_writes_nothing_and_refuses_every_change() {
        let store = image();
        {
            let fs = Fs::mount(store.clone()).unwrap();
            let ino = fs
                .mknod(ROOT_INO, b"f", S_IFREG | 0o644, 0, 0, 0)
                .unwrap()
                .ino;
            fs.write(ino, 0, b"hello").unwrap();
            fs.unmount().unwrap();
        }
        let before = bytes(&store);
        let fs = Fs::mount_read_only(store.clone()).unwrap();
        assert!(fs.is_read_only());
        let ino = fs.lookup(ROOT_INO, b"f").unwrap().ino;
        // A read that would update the access time on a writable mount.
        assert_eq!(fs.read_with(ino, 0, 5, Atime::Always).unwrap(), b"hello");
        fs.note_access(ino, Atime::Always).unwrap();
        let refused = |what: &str, r: FsResult<()>| match r {
            Err(FsError::ReadOnly(_)) => {}
            other => panic!("{what}: expected a read-only refusal, got {other:?}"),
        };
        refused(
            "mknod",
            fs.mknod(ROOT_INO, b"g", S_IFREG | 0o644, 0, 0, 0)
                .map(|_| ()),
        );
        refused("write", fs.write(ino, 0, b"x").map(|_| ()));
        refused("unlink", fs.unlink(ROOT_INO, b"f").map(|_| ()));
        refused("mkdir", fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).map(|_| ()));
        let truncate = SetAttr {
            size: Some(0),
            ..Default::default()
        };
        refused("setattr", fs.setattr(ino, truncate).map(|_| ()));
        fs.sync().unwrap();
        fs.commit_older_than(std::time::Duration::ZERO).unwrap();
        fs.unmount().unwrap();
        assert!(
            before == bytes(&store),
            "the read-only mount wrote to the image"
        );
    }

    #[test]
    fn a_dirty_image_is_refused_read_only() {
        let store = image();
        let fs = Fs::mount(store.clone()).unwrap();
        fs.mknod(ROOT_INO, b"f", S_IFREG | 0o644, 0, 0, 0).unwrap();
        fs.sync().unwrap();
        // Not unmounted: the state says mounted and the journal holds the new file.
        match Fs::mount_read_only(store.clone()) {
            Err(FsError::Unsupported(why)) => assert!(why.contains("not unmounted cleanly")),
            Err(e) => panic!("wrong refusal: {e}"),
            Ok(_) => panic!("a dirty image was mounted read-only"),
        }
    }
}
