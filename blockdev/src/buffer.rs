//! Block-aligned heap buffers for `O_DIRECT` I/O.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use crate::BLOCK_SIZE;

/// A zero-initialised heap buffer aligned to [`BLOCK_SIZE`], whose length is a whole
/// number of blocks. It owns its memory, so an engine can keep it in its in-flight table
/// while the kernel writes into it.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `AlignedBuf` uniquely owns its allocation (like `Box<[u8]>`), so moving it to
// another thread or sharing `&AlignedBuf` is as sound as for `Box<[u8]>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: see `Send`; shared references only give `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `nblocks` zeroed blocks. Panics if `nblocks` is zero or the size overflows.
    pub fn zeroed(nblocks: usize) -> Self {
        assert!(nblocks > 0, "empty AlignedBuf");
        let len = nblocks
            .checked_mul(BLOCK_SIZE)
            .expect("AlignedBuf size overflows");
        let layout = Layout::from_size_align(len, BLOCK_SIZE).expect("valid layout");
        // SAFETY: `layout` has a non-zero size (nblocks > 0 checked above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len }
    }

    /// Length in bytes (a multiple of [`BLOCK_SIZE`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an `AlignedBuf` holds at least one block.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Number of blocks.
    pub fn nblocks(&self) -> usize {
        self.len / BLOCK_SIZE
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed at allocation) bytes that this
        // value owns; the borrow of `self` keeps them alive and unaliased by `&mut`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, BLOCK_SIZE).expect("valid layout");
        // SAFETY: `ptr` was returned by `alloc_zeroed` with exactly this layout and is
        // freed only here, once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} blocks)", self.nblocks())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut b = AlignedBuf::zeroed(3);
        assert_eq!(b.len(), 3 * BLOCK_SIZE);
        assert_eq!(b.as_mut_ptr() as usize % BLOCK_SIZE, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[5] = 7;
        assert_eq!(b[5], 7);
    }
}
