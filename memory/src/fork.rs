//! VM fork: the child gets the parent's memory copy-on-write (R6, Linux's
//! `copy_present_ptes` and `__folio_try_dup_anon_rmap`).
//!
//! Under the parent's memory-map lock (write) and with its write-protect
//! sequence count held odd, each leaf is copied under the parent's and the
//! child's leaf locks:
//!
//! - a frame that may be pinned is **copied** for the child; the parent
//!   keeps its pinned original, still writable and exclusive, so a device
//!   keeps seeing what the parent's guest sees;
//! - every other present frame loses its anon-exclusive bit and is mapped
//!   read-only in both VMs (the parent's host page loses write access
//!   before its entry changes);
//! - write-protect markers and bits are not inherited: a child starts
//!   without a write listener.
//!
//! Against the lockless pin path (R8) the ordering is Dekker's: fork makes
//! the sequence count odd, fences, then reads pin counts; a pinner raises
//! the pin count, fences, then re-reads the sequence count. Either fork
//! sees the pin (and copies) or the pinner sees the count move (and backs
//! off to the locked path, which waits for fork).
//!
//! Cost: one visit per installed leaf and per present entry; absent memory
//! costs nothing, so fork scales with mapped pages, not RAM size.

use std::sync::Arc;

use crate::entry::Entry;
use crate::layout::PAGES_PER_LEAF;
use crate::lock::Rank;
use crate::store::Store;
use crate::sync::{Ordering, fence};
use crate::table::Leaf;
use crate::vm::{MemError, VmMemory};

/// What fork does with one present entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// Map the frame read-only in both VMs.
    Share { store: u32, soft_dirty: bool },
    /// Give the child a copy (the frame may be pinned).
    Copy { store: u32, writable: bool },
}

impl VmMemory {
    /// Forks this VM's memory: returns the child's, sharing every frame
    /// copy-on-write except those that may be pinned. The caller keeps the
    /// VM's vCPUs from running for the duration, so the child is a
    /// snapshot of one instant.
    pub fn fork(self: &Arc<Self>) -> Result<Arc<VmMemory>, MemError> {
        let child = VmMemory::new(&self.ctx, self.layout.clone())?;
        let _parent_map = self.map_lock.write();
        let _child_map = child.map_lock.write_as(Rank::ChildMapLock);

        // The child starts with the parent's store list, so entries copy
        // verbatim; it becomes a mapper of every one of those stores.
        let stores = self.stores.read().share();
        for (_, s) in stores.stores() {
            s.add_mapper(child.id());
        }
        *child.stores.write() = stores;
        child
            .home
            .store(self.home.load(Ordering::Relaxed), Ordering::Relaxed);

        // raw_write_seqcount_begin(&src_mm->write_protect_seq)
        self.wp_seq.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let result = self
            .table
            .leaves()
            .try_for_each(|(first, leaf)| self.fork_leaf(&child, first, leaf));
        self.wp_seq.fetch_add(1, Ordering::SeqCst);
        result?;
        drop(_child_map);
        child.drop_unused_slots();
        Ok(child)
    }

    fn fork_leaf(&self, child: &VmMemory, first: u64, leaf: &Leaf) -> Result<(), MemError> {
        let end = (first + PAGES_PER_LEAF).min(self.table.pages());
        let _ptl = leaf.lock().lock();
        let child_leaf = child.table.leaf_or_alloc(first);
        let _child_ptl = child_leaf.lock().lock_as(Rank::ChildTable);

        // Pass 1: decide, and take write access away from the parent's
        // host pages that become shared before any entry says so.
        let mut plans: Vec<(u64, Plan)> = Vec::new();
        {
            let stores = self.stores.read();
            for p in first..end {
                if let Entry::Present {
                    store,
                    writable,
                    soft_dirty,
                    ..
                } = leaf.get(p)
                {
                    let meta = stores
                        .get(store)
                        .expect("an entry names a filled slot")
                        .meta(p);
                    let plan = if meta.exclusive() && meta.maybe_pinned() {
                        Plan::Copy { store, writable }
                    } else {
                        Plan::Share { store, soft_dirty }
                    };
                    plans.push((p, plan));
                }
            }
        }
        let demote: Vec<u64> = plans
            .iter()
            .filter(|(p, plan)| {
                matches!(plan, Plan::Share { .. })
                    && matches!(leaf.get(*p), Entry::Present { writable: true, .. })
            })
            .map(|(p, _)| *p)
            .collect();
        for run in demote.chunk_by(|a, b| a + 1 == *b) {
            self.host_protect(run[0], run.len() as u64, false)?;
        }

        // Pass 2: apply.
        let mut child_map: Vec<(u64, u32, bool)> = Vec::with_capacity(plans.len());
        for (p, plan) in plans {
            match plan {
                Plan::Share { store, soft_dirty } => {
                    let s = self.store(store);
                    let meta = s.meta(p);
                    if meta.exclusive() {
                        meta.clear_exclusive();
                    }
                    meta.get();
                    self.frame_map(&s, p);
                    child.stores.read().hold(store);
                    let ro = |wp| Entry::Present {
                        store,
                        writable: false,
                        wp,
                        soft_dirty,
                    };
                    // The parent keeps its write protection; the child
                    // does not inherit it.
                    leaf.set(p, ro(leaf.get(p).wp()));
                    child_leaf.set(p, ro(false));
                    child_map.push((p, store, false));
                }
                Plan::Copy { store, writable } => {
                    let idx = child.alloc_frame(p, child_map.last().map(|c| c.1))?;
                    let new = child.store(idx);
                    if let Err(e) = copy_frame(&new, &self.store(store), p) {
                        new.put(p, true);
                        return Err(e);
                    }
                    child.frame_map(&new, p);
                    child_leaf.set(
                        p,
                        Entry::Present {
                            store: idx,
                            writable,
                            wp: false,
                            soft_dirty: true,
                        },
                    );
                    child_map.push((p, idx, writable));
                    self.ctx.stats.copied.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        for run in child_map.chunk_by(|a, b| a.0 + 1 == b.0 && a.1 == b.1 && a.2 == b.2) {
            let (p, idx, writable) = run[0];
            child.host_map(p, run.len() as u64, &child.store(idx), writable)?;
        }
        Ok(())
    }
}

/// Copies the frame of page `page` from `src` into a frame just claimed in
/// `dst` (mapped nowhere yet). A device writing the source through a pin
/// meanwhile may leave the copy torn, as DMA can during Linux's fork; the
/// copy never reaches outside the two frames.
pub(crate) fn copy_frame(dst: &Store, src: &Store, page: u64) -> Result<(), MemError> {
    // SAFETY: `src.frame_ptr(page)` is a whole frame of a store the caller
    // holds, so its direct map stays mapped for the call.
    unsafe {
        crate::sys::write_file_page(
            dst.fd(),
            page * crate::layout::PAGE_SIZE,
            src.frame_ptr(page),
        )
    }
    .map_err(MemError::Copy)
}
