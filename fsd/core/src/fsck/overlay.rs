//! A read-only view of a store with some blocks replaced: lets fsck check an image as it
//! will be after journal replay without writing anything.

use std::collections::HashMap;
use std::io;

use formats::BLOCK_SIZE;

use crate::store::BlockStore;

pub(super) struct Overlay<'a> {
    inner: &'a dyn BlockStore,
    blocks: HashMap<u64, Vec<u8>>,
}

impl<'a> Overlay<'a> {
    /// `blocks` are applied in order, so a later image of a block wins.
    pub(super) fn new(
        inner: &'a dyn BlockStore,
        blocks: impl IntoIterator<Item = (u64, Vec<u8>)>,
    ) -> Self {
        Overlay {
            inner,
            blocks: blocks
                .into_iter()
                .filter(|(_, b)| b.len() == BLOCK_SIZE)
                .collect(),
        }
    }
}

impl BlockStore for Overlay<'_> {
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read(addr, buf)?;
        for (i, chunk) in buf.chunks_mut(BLOCK_SIZE).enumerate() {
            if let Some(b) = self.blocks.get(&(addr + i as u64)) {
                chunk.copy_from_slice(b);
            }
        }
        Ok(())
    }

    fn write(&self, _addr: u64, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the replay overlay is read-only",
        ))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, _addr: u64, _nblocks: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the replay overlay is read-only",
        ))
    }
}
