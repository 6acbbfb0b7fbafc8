//! Restoring a VM's memory from a snapshot memory file, lazily (see
//! `image.rs` for the file and its image entries).
//!
//! A restored VM's first access to a page of a run reads the whole run
//! (one read, checked once) and makes every page of it that this VM still
//! names in the file present in fresh exclusive frames, like Linux's swap
//! readahead and the fault-around of first touches: a guest that walks its
//! memory takes one fault per run, not one per page. Under a resident
//! limit only the page touched comes in (as for first touches).

use std::sync::Arc;

use crate::Context;
use crate::entry::Entry;
use crate::image::{Image, ImageError, image_slot, split_slot};
use crate::layout::{PAGE_SIZE, PAGES_PER_LEAF};
use crate::sync::Ordering;
use crate::table::Leaf;
use crate::vm::{MemError, VmMemory};

impl VmMemory {
    /// The memory of a VM restored from `image`: every page the index
    /// lists starts as an image entry (exclusive: nothing else maps it) and
    /// is read on its first access; every other page is empty. Costs one
    /// entry write per listed page; nothing of the file is read.
    pub fn restore(ctx: &Arc<Context>, image: &Arc<Image>) -> Result<Arc<Self>, ImageError> {
        let vm = Self::new(ctx, image.layout().clone())?;
        if image.pages() == 0 {
            return Ok(vm);
        }
        let area = ctx.attach_image(image, image.pages())?;
        let map = vm.map_lock.write();
        for run in image.runs() {
            let end = run.first + run.pages;
            let mut page = run.first;
            while page < end {
                let stop = end.min((page / PAGES_PER_LEAF + 1) * PAGES_PER_LEAF);
                let leaf = vm.small_leaf_or_alloc(page);
                let _ptl = leaf.lock().lock();
                for p in page..stop {
                    leaf.set(
                        p,
                        Entry::Swap {
                            slot: image_slot(area, p),
                            exclusive: true,
                            wp: false,
                        },
                    );
                }
                page = stop;
            }
        }
        drop(map);
        Ok(vm)
    }

    /// Brings in the image page `page` (whose entry names `slot`) with the
    /// pages of its run that this VM still names in the same leaf, each in
    /// a fresh exclusive frame, writable unless protected (R2, R14). The
    /// caller holds the map lock and the leaf lock. Returns the pages it
    /// made present.
    pub(crate) fn image_in(&self, leaf: &Leaf, page: u64, slot: u32) -> Result<u64, MemError> {
        let err = |source| MemError::Swap {
            gpa: self.gpa(page),
            source,
        };
        let (area, _) = split_slot(slot);
        let image = self.ctx.image_of(area).map_err(err)?;
        let (first, bytes) = image.load_run(area, page).map_err(err)?;
        let leaf_first = page / PAGES_PER_LEAF * PAGES_PER_LEAF;
        let lo = first.max(leaf_first);
        let hi = (first + bytes.len() as u64 / PAGE_SIZE).min(leaf_first + PAGES_PER_LEAF);
        // (page, store, protected) of each frame filled.
        let mut filled: Vec<(u64, u32, bool)> = Vec::new();
        let mut hint = page
            .checked_sub(1)
            .and_then(|p| self.table.get(p).present_store());
        let mut result = Ok(());
        for p in lo..hi {
            let wp = match leaf.get(p) {
                Entry::Swap { slot: s, wp, .. } if s == image_slot(area, p) => wp,
                _ => continue,
            };
            let off = ((p - first) * PAGE_SIZE) as usize;
            match self.fill_frame(p, hint, &bytes[off..off + PAGE_SIZE as usize]) {
                Ok(idx) => {
                    filled.push((p, idx, wp));
                    hint = Some(idx);
                }
                Err(e) if p == page => {
                    result = Err(e);
                    break;
                }
                Err(e) => log::warn!("image read-around skipped page {p:#x}: {e}"),
            }
        }
        if let Err(e) = result {
            for &(p, idx, _) in &filled {
                self.unclaim(idx, p);
            }
            return Err(e);
        }
        let mut made = 0;
        for run in filled.chunk_by(|a, b| a.0 + 1 == b.0 && a.1 == b.1 && a.2 == b.2) {
            let (at, idx, wp) = run[0];
            let store = self.store(idx);
            if let Err(e) = self.host_map(at, run.len() as u64, &store, !wp) {
                for &(p, idx, _) in run {
                    self.unclaim(idx, p);
                }
                if run.iter().any(|r| r.0 == page) {
                    result = Err(e);
                } else {
                    log::warn!("image read-around skipped pages at {at:#x}: {e}");
                }
                continue;
            }
            for &(p, idx, wp) in run {
                self.frame_map(&store, p);
                leaf.set(
                    p,
                    Entry::Present {
                        store: idx,
                        writable: !wp,
                        wp,
                        soft_dirty: true,
                    },
                );
                self.ctx.swap_in_use().put(image_slot(area, p));
                made += 1;
            }
        }
        self.ctx
            .stats
            .image_loads
            .fetch_add(made, Ordering::Relaxed);
        result.map(|()| made)
    }

    /// Claims a fresh frame for `p` (trying store `hint` first) and fills
    /// it with `bytes` (one page); returns its store. Not mapped yet.
    fn fill_frame(&self, p: u64, hint: Option<u32>, bytes: &[u8]) -> Result<u32, MemError> {
        let idx = self.alloc_frame(p, hint)?;
        let store = self.store(idx);
        // SAFETY: `bytes` is a live buffer of one whole page for the call.
        let written =
            unsafe { crate::sys::write_file_page(store.fd(), p * PAGE_SIZE, bytes.as_ptr()) };
        if let Err(e) = written {
            self.unclaim(idx, p);
            return Err(MemError::Copy(e));
        }
        Ok(idx)
    }
}
