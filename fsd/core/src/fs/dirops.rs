//! Directory operations on the linear-hashing layout of `formats::dir`.

use formats::block::{BlockAddr, Ino, BLOCK_SIZE};
use formats::dir::{name_hash, Bucket, DirEntry, DirHeader, MAX_OVERFLOW_BLOCKS, OVERFLOW_BASE};

use super::{FsError, FsResult, Inner};

/// One block of a bucket's chain: (file block, physical block, contents).
type ChainBlock = (u64, u64, Bucket);

impl Inner {
    fn dir_header(&mut self, dir: Ino) -> FsResult<(u64, DirHeader)> {
        if !self.node(dir)?.inode.is_dir() {
            return Err(FsError::NotDir);
        }
        let addr = self.fblock_addr(dir, 0)?.ok_or_else(|| {
            FsError::Corrupted(format!("directory {} has no header block", dir.0))
        })?;
        let b = self.read_meta(addr)?;
        Ok((addr, DirHeader::decode(&b[..], dir, BlockAddr(addr))?))
    }

    fn put_header(&mut self, dir: Ino, addr: u64, h: &DirHeader) -> FsResult<()> {
        self.stage(addr, h.encode(dir, BlockAddr(addr)));
        let node = self.node(dir)?;
        node.inode.size = (1 + h.bucket_count()) * BLOCK_SIZE as u64;
        self.mark_dirty(dir);
        Ok(())
    }

    fn put_bucket(&mut self, dir: Ino, addr: u64, b: &Bucket) -> FsResult<()> {
        let blk = b.encode(dir, BlockAddr(addr))?;
        self.stage(addr, blk);
        Ok(())
    }

    /// Hands out the next overflow file block of a directory.
    fn next_overflow(h: &mut DirHeader) -> FsResult<u64> {
        if h.overflow_next as u64 >= MAX_OVERFLOW_BLOCKS {
            return Err(FsError::NoSpace);
        }
        let fb = OVERFLOW_BASE + h.overflow_next as u64;
        h.overflow_next += 1;
        Ok(fb)
    }

    fn bucket_chain(&mut self, dir: Ino, h: &DirHeader, bucket: u64) -> FsResult<Vec<ChainBlock>> {
        let mut out: Vec<ChainBlock> = Vec::new();
        let mut fb = DirHeader::bucket_block(bucket);
        loop {
            if out.len() as u64 > h.overflow_next as u64 + 1 {
                return Err(FsError::Corrupted(format!(
                    "directory {}: overflow chain loops",
                    dir.0
                )));
            }
            let addr = self.fblock_addr(dir, fb)?.ok_or_else(|| {
                FsError::Corrupted(format!(
                    "directory {}: file block {fb} of bucket {bucket} unmapped",
                    dir.0
                ))
            })?;
            let blk = self.read_meta(addr)?;
            let b = Bucket::decode(&blk[..], dir, BlockAddr(addr))?;
            let next = b.next;
            if next != 0 && next >= OVERFLOW_BASE + h.overflow_next as u64 {
                return Err(FsError::Corrupted(format!(
                    "directory {}: overflow link out of range",
                    dir.0
                )));
            }
            out.push((fb, addr, b));
            if next == 0 {
                return Ok(out);
            }
            fb = next;
        }
    }

    pub(crate) fn dir_lookup(&mut self, dir: Ino, name: &[u8]) -> FsResult<Option<DirEntry>> {
        let (_, h) = self.dir_header(dir)?;
        let chain = self.bucket_chain(dir, &h, h.bucket_of(name_hash(name)))?;
        Ok(chain
            .into_iter()
            .flat_map(|(_, _, b)| b.entries)
            .find(|e| e.name == name))
    }

    /// Creates the header and first bucket of a new directory.
    pub(crate) fn dir_init(&mut self, dir: Ino, parent: Ino) -> FsResult<()> {
        let h = DirHeader::new(parent);
        let haddr = self.fblock_alloc(dir, 0)?;
        let baddr = self.fblock_alloc(dir, DirHeader::bucket_block(0))?;
        self.put_bucket(dir, baddr, &Bucket::default())?;
        self.put_header(dir, haddr, &h)
    }

    pub(crate) fn dir_parent(&mut self, dir: Ino) -> FsResult<Ino> {
        Ok(self.dir_header(dir)?.1.parent)
    }

    pub(crate) fn dir_set_parent(&mut self, dir: Ino, parent: Ino) -> FsResult<()> {
        let (addr, mut h) = self.dir_header(dir)?;
        h.parent = parent;
        self.put_header(dir, addr, &h)
    }

    pub(crate) fn dir_entry_count(&mut self, dir: Ino) -> FsResult<u64> {
        Ok(self.dir_header(dir)?.1.entry_count)
    }

    /// Adds an entry; the caller has checked the name is absent.
    pub(crate) fn dir_insert(&mut self, dir: Ino, entry: DirEntry) -> FsResult<()> {
        let (haddr, mut h) = self.dir_header(dir)?;
        let bucket = h.bucket_of(name_hash(&entry.name));
        let mut chain = self.bucket_chain(dir, &h, bucket)?;
        if let Some((_, addr, b)) = chain.iter_mut().find(|(_, _, b)| b.fits(&entry)) {
            b.entries.push(entry);
            let (addr, b) = (*addr, b.clone());
            self.put_bucket(dir, addr, &b)?;
        } else {
            let fb = Self::next_overflow(&mut h)?;
            let addr = self.fblock_alloc(dir, fb)?;
            self.put_bucket(
                dir,
                addr,
                &Bucket {
                    next: 0,
                    entries: vec![entry],
                },
            )?;
            let (_, last_addr, last) = chain.last_mut().expect("a chain has its primary block");
            last.next = fb;
            let (last_addr, last) = (*last_addr, last.clone());
            self.put_bucket(dir, last_addr, &last)?;
        }
        h.entry_count += 1;
        if h.needs_split() {
            self.split_next(dir, &mut h)?;
        }
        self.put_header(dir, haddr, &h)
    }

    /// Splits bucket `h.split` into itself and a new bucket at the end (linear hashing).
    fn split_next(&mut self, dir: Ino, h: &mut DirHeader) -> FsResult<()> {
        let old = h.split as u64;
        let new = h.bucket_count();
        let chain = self.bucket_chain(dir, h, old)?;
        h.split += 1;
        if h.split as u64 == 1u64 << h.level {
            h.level += 1;
            h.split = 0;
        }
        let (mut stay, mut go) = (Vec::new(), Vec::new());
        for (_, _, b) in &chain {
            for e in &b.entries {
                if h.bucket_of(name_hash(&e.name)) == new {
                    go.push(e.clone());
                } else {
                    stay.push(e.clone());
                }
            }
        }
        let reuse: Vec<u64> = chain.iter().skip(1).map(|(fb, _, _)| *fb).collect();
        self.pack_chain(dir, h, DirHeader::bucket_block(old), reuse, stay)?;
        self.fblock_alloc(dir, DirHeader::bucket_block(new))?;
        self.pack_chain(dir, h, DirHeader::bucket_block(new), Vec::new(), go)
    }

    /// Writes `entries` into the chain starting at `first` (already mapped), reusing the
    /// overflow blocks in `reuse`, adding overflow blocks as needed and freeing the rest.
    fn pack_chain(
        &mut self,
        dir: Ino,
        h: &mut DirHeader,
        first: u64,
        reuse: Vec<u64>,
        entries: Vec<DirEntry>,
    ) -> FsResult<()> {
        let mut blocks: Vec<Bucket> = vec![Bucket::default()];
        for e in entries {
            if !blocks.last().expect("non-empty").fits(&e) {
                blocks.push(Bucket::default());
            }
            blocks.last_mut().expect("non-empty").entries.push(e);
        }
        let mut fbs = vec![first];
        let mut reuse = reuse.into_iter();
        for _ in 1..blocks.len() {
            match reuse.next() {
                Some(fb) => fbs.push(fb),
                None => {
                    let fb = Self::next_overflow(h)?;
                    self.fblock_alloc(dir, fb)?;
                    fbs.push(fb);
                }
            }
        }
        for fb in reuse {
            self.fblock_free(dir, fb)?;
        }
        for i in 0..blocks.len() {
            blocks[i].next = fbs.get(i + 1).copied().unwrap_or(0);
            let addr = self.fblock_addr(dir, fbs[i])?.expect("mapped above");
            let b = blocks[i].clone();
            self.put_bucket(dir, addr, &b)?;
        }
        Ok(())
    }

    /// Removes the entry `name`, returning it.
    pub(crate) fn dir_remove(&mut self, dir: Ino, name: &[u8]) -> FsResult<Option<DirEntry>> {
        let (haddr, mut h) = self.dir_header(dir)?;
        let mut chain = self.bucket_chain(dir, &h, h.bucket_of(name_hash(name)))?;
        let Some(i) = chain
            .iter()
            .position(|(_, _, b)| b.entries.iter().any(|e| e.name == name))
        else {
            return Ok(None);
        };
        let pos = chain[i]
            .2
            .entries
            .iter()
            .position(|e| e.name == name)
            .expect("found above");
        let removed = chain[i].2.entries.remove(pos);
        if i > 0 && chain[i].2.entries.is_empty() {
            // Unlink an emptied overflow block from the chain and free it.
            let next = chain[i].2.next;
            let fb = chain[i].0;
            chain[i - 1].2.next = next;
            let (addr, b) = (chain[i - 1].1, chain[i - 1].2.clone());
            self.put_bucket(dir, addr, &b)?;
            self.fblock_free(dir, fb)?;
        } else {
            let (addr, b) = (chain[i].1, chain[i].2.clone());
            self.put_bucket(dir, addr, &b)?;
        }
        h.entry_count -= 1;
        self.put_header(dir, haddr, &h)?;
        Ok(Some(removed))
    }

    /// Every entry of a directory (bucket order).
    pub(crate) fn dir_list(&mut self, dir: Ino) -> FsResult<Vec<DirEntry>> {
        let (_, h) = self.dir_header(dir)?;
        let mut out = Vec::with_capacity(h.entry_count.min(1 << 20) as usize);
        for bucket in 0..h.bucket_count() {
            for (_, _, b) in self.bucket_chain(dir, &h, bucket)? {
                out.extend(b.entries);
            }
        }
        Ok(out)
    }
}
