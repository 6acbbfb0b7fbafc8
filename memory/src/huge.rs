//! Huge mappings: one entry and one 2 MiB frame for a whole leaf.
//!
//! With [`crate::Config::huge`], the first touch of a leaf that is empty
//! and has never been used by small entries claims a huge frame (512
//! slots of one store, see `frame.rs`) and maps the leaf with one huge
//! entry (see `table.rs`); the host maps the block with a 2 MiB page
//! where it can. Faults, pins and fork know huge entries; everything
//! else reaches leaves through the accessors here, which *split* a huge
//! entry into 512 small ones first (Linux's `split_huge_pmd`) and mark the
//! leaf, under its lock, so that no first touch maps it huge afterwards:
//!
//! - the small entries map the same frame's pages, with the same access;
//! - each page gets a mapping, the frame 511 more references (one per
//!   entry instead of one for the huge entry), and each page the frame's
//!   anon-exclusive bit (seed 000, I.6 b: forwarded, never cleared and
//!   set again, so a pinned frame stays exclusive throughout);
//! - the host mapping is left as it is: same file, same protection.
//!
//! A split frame stays one huge frame (its references and pins are
//! counted at its head) until its last reference goes; its pages are then
//! freed together. Pages of it that were discarded or copied away keep
//! their memory until then (Linux defers splitting a large folio too).
//!
//! A write or unshare fault on a read-only huge entry reuses the frame
//! when it is exclusive or this entry holds the only reference (R10,
//! R11), like a small one. Otherwise the entry is split and the one page
//! faulted is copied (4 KiB, not 2 MiB): the other 511 pages stay shared;
//! or reused, if this entry is the page's only mapping and nothing but
//! mappings holds the frame (`Store::sole_reference`: after a fork, the
//! parent copied the page away and the child writes it).
//!
//! Lock order is the crate's (see `lib.rs`): a split takes only the
//! leaf's lock, under the memory-map lock held for reading, like any
//! change of a leaf entry.

use crate::HugeCow;
use crate::entry::Entry;
use crate::layout::{PAGE_SIZE, PAGES_PER_LEAF};
use crate::store::Store;
use crate::sync::Ordering;
use crate::table::Leaf;
use crate::vm::{MemError, VmMemory};

/// Where the host says whether it can back shared memory with 2 MiB pages.
pub const SHMEM_THP_KNOB: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
/// The per-size override of [`SHMEM_THP_KNOB`] for 2 MiB pages.
pub const SHMEM_THP_2M_KNOB: &str =
    "/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled";

/// The selected value of a sysfs choice file (`a [b] c` → `b`).
fn selected(text: &str) -> Option<&str> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(&text[start..end])
}

/// Checks that the host can back guest frames (memfds) with 2 MiB pages
/// when asked with `MADV_HUGEPAGE`; the error names the knob to set.
pub fn huge_pages_available() -> Result<(), String> {
    let read = |path: &str| {
        std::fs::read_to_string(path).map_err(|e| {
            format!("--huge needs 2 MiB pages for shared memory, but {path} cannot be read ({e})")
        })
    };
    let global = read(SHMEM_THP_KNOB)?;
    // Kernels before per-size THP have only the global knob.
    let per_size = std::fs::read_to_string(SHMEM_THP_2M_KNOB).ok();
    check_knobs(&global, per_size.as_deref())
}

/// The decision of [`huge_pages_available`] on the knobs' contents.
fn check_knobs(global: &str, per_size: Option<&str>) -> Result<(), String> {
    let global = selected(global).unwrap_or("");
    let per_size = per_size.and_then(selected).unwrap_or("inherit");
    let ok = |v: &str| matches!(v, "always" | "within_size" | "advise" | "force");
    let (knob, value, fix) = if per_size == "inherit" {
        (SHMEM_THP_KNOB, global, "advise")
    } else {
        (SHMEM_THP_2M_KNOB, per_size, "inherit")
    };
    if ok(value) {
        return Ok(());
    }
    Err(format!(
        "--huge needs 2 MiB pages for shared memory, but {knob} is `{value}`; \
         as root: echo {fix} > {knob}"
    ))
}

impl VmMemory {
    /// The leaf covering `page`, if installed, for code that knows only
    /// small entries: a huge entry there is split first, and the leaf is
    /// never mapped huge by a first touch afterwards. The caller holds the
    /// memory-map lock (read or write) and no leaf lock.
    pub(crate) fn small_leaf(&self, page: u64) -> Option<&Leaf> {
        let leaf = self.table.leaf(page)?;
        self.make_small(leaf, page);
        Some(leaf)
    }

    /// Like [`VmMemory::small_leaf`], installing the leaf if missing.
    pub(crate) fn small_leaf_or_alloc(&self, page: u64) -> &Leaf {
        let leaf = self.table.leaf_or_alloc(page);
        self.make_small(leaf, page);
        leaf
    }

    /// The installed leaves with their first pages, for code that knows
    /// only small entries (each split as by [`VmMemory::small_leaf`]).
    pub(crate) fn small_leaves(&self) -> impl Iterator<Item = (u64, &Leaf)> {
        self.table.leaves().inspect(|&(first, leaf)| {
            self.make_small(leaf, first);
        })
    }

    /// Keeps `[gpa, gpa + len)` on small entries, like Linux's
    /// `madvise(MADV_NOHUGEPAGE)`: a huge entry over any of it is split,
    /// and no first touch or collapse maps its blocks huge again (a fork's
    /// child keeps the request). For memory the VMM pins for the VM's
    /// life: fork copies a pinned frame for the child, and a huge one
    /// would cost it 2 MiB where a small one costs 4 KiB.
    pub fn keep_small(&self, gpa: u64, len: u64) -> Result<(), MemError> {
        let runs = self.page_range(gpa, len)?;
        let _map = self.map_lock.read();
        for (first, off, run) in runs {
            let end = first + (off + run).div_ceil(PAGE_SIZE);
            let mut page = first - first % PAGES_PER_LEAF;
            while page < end {
                let leaf = self.table.leaf_or_alloc(page);
                let _ptl = leaf.lock().lock();
                self.split_locked(leaf, page);
                leaf.keep_small();
                page += PAGES_PER_LEAF;
            }
        }
        Ok(())
    }

    /// Splits the leaf's huge entry, if any, and marks the leaf used by
    /// small entries, both under its lock: a first touch, which checks the
    /// mark under the same lock, cannot map it huge between the caller's
    /// look and its use. Once marked and split, only loads: a collapse,
    /// the other way a leaf becomes huge, waits for the memory-map lock
    /// the caller holds.
    fn make_small(&self, leaf: &Leaf, page: u64) {
        if leaf.used_small() && leaf.huge_raw() == 0 {
            return;
        }
        let _ptl = leaf.lock().lock();
        self.split_locked(leaf, page - page % PAGES_PER_LEAF);
        leaf.mark_small();
    }

    /// Splits the huge entry of `leaf` (first page `first`) into 512 small
    /// ones, if it still has one; the caller holds the leaf's lock.
    pub(crate) fn split_locked(&self, leaf: &Leaf, first: u64) {
        let Some(Entry::Present {
            store: idx,
            writable,
            soft_dirty,
            ..
        }) = leaf.huge()
        else {
            return;
        };
        let store = self.store(idx);
        let head = store.slot(first);
        let exclusive = head.exclusive();
        for p in first..first + PAGES_PER_LEAF {
            let own = store.slot(p);
            if p != first {
                if exclusive {
                    own.set_exclusive();
                } else {
                    own.clear_exclusive();
                }
            }
            self.frame_map(&store, p);
        }
        head.get_many(PAGES_PER_LEAF as u32 - 1);
        self.stores.read().hold_many(idx, PAGES_PER_LEAF - 1);
        head.unmap_entire();
        leaf.split_huge(Entry::Present {
            store: idx,
            writable,
            wp: false,
            soft_dirty,
        });
        self.ctx.stats.huge_splits.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a first touch of `page` may map its leaf huge: huge
    /// mappings are on, no resident limit is set (reclaim works page by
    /// page), and the leaf covers one 2 MiB-aligned block of one RAM range.
    pub(crate) fn wants_huge(&self, leaf: &Leaf, page: u64) -> bool {
        if !self.ctx.config.huge || self.limit.pages().is_some() {
            return false;
        }
        self.is_huge_block(page - page % PAGES_PER_LEAF) && leaf.may_map_huge()
    }

    /// Whether the leaf whose first page is `first` covers one 2 MiB-aligned
    /// block of one RAM range (pages are numbered across the holes between
    /// ranges, so a leaf may not).
    pub(crate) fn is_huge_block(&self, first: u64) -> bool {
        let last = first + PAGES_PER_LEAF - 1;
        let (Some(a), Some(b)) = (self.layout.gpa_of(first), self.layout.gpa_of(last)) else {
            return false;
        };
        a % (PAGES_PER_LEAF * PAGE_SIZE) == 0 && b == a + (PAGES_PER_LEAF - 1) * PAGE_SIZE
    }

    /// Maps the empty leaf holding `page` with a fresh huge frame,
    /// writable; the caller holds the leaf's lock and checked
    /// [`VmMemory::wants_huge`]. Falls back (returns false) when no store
    /// has the block free and a new one cannot be made.
    pub(crate) fn first_touch_huge(&self, leaf: &Leaf, page: u64) -> Result<bool, MemError> {
        let first = page - page % PAGES_PER_LEAF;
        let idx = match self.alloc_huge(first) {
            Ok(idx) => idx,
            Err(e) => {
                log::warn!("no huge frame for page {first:#x}, mapping small pages: {e}");
                return Ok(false);
            }
        };
        let store = self.store(idx);
        if let Err(e) = self.host_map(first, PAGES_PER_LEAF, &store, true) {
            self.unclaim(idx, first);
            return Err(e);
        }
        store.slot(first).map_entire();
        leaf.set_huge(first, Entry::writable(idx));
        self.ctx.stats.first_touch.fetch_add(1, Ordering::Relaxed);
        self.ctx.stats.huge_maps.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Claims a huge frame for the block at `first` in some store of this
    /// VM, creating a store if none has the block free.
    pub(crate) fn alloc_huge(&self, first: u64) -> Result<u32, MemError> {
        self.alloc_with(None, |s| s.try_claim_huge(first))
    }

    /// A write fault (`write`) or an unshare fault on the read-only huge
    /// entry `huge` of `leaf`; the caller holds the leaf's lock. Returns
    /// false if the entry was split instead, for the small path to go on.
    pub(crate) fn huge_cow_fault(
        &self,
        leaf: &Leaf,
        page: u64,
        huge: Entry,
        write: bool,
    ) -> Result<bool, MemError> {
        let first = page - page % PAGES_PER_LEAF;
        let Entry::Present { store: idx, .. } = huge else {
            unreachable!("a huge entry is present");
        };
        let store = self.store(idx);
        let head = store.slot(first);
        let reuse = if head.exclusive() {
            true
        } else if head.refcount() == 1 {
            // Only this entry holds the frame (as in `cow_fault`).
            head.set_exclusive();
            true
        } else {
            false
        };
        if !reuse {
            if self.ctx.config.huge_cow == HugeCow::Block {
                self.copy_huge_block(leaf, first, idx, write)?;
                return Ok(true);
            }
            // The page alone may still be this entry's only: then the
            // small path reuses it after the split instead of copying.
            let sole = store.sole_reference(page);
            self.split_locked(leaf, first);
            if sole {
                store.slot(page).set_exclusive();
            } else {
                // The small path copies this page next: not yet a second.
                self.cow_block
                    .store((first / PAGES_PER_LEAF + 1) | COW_FIRST, Ordering::Relaxed);
            }
            return Ok(false);
        }
        if write {
            self.host_protect(first, PAGES_PER_LEAF, true)?;
            leaf.set_huge(first, Entry::writable(idx));
            self.ctx.stats.reused.fetch_add(1, Ordering::Relaxed);
        }
        Ok(true)
    }
}

/// Copies the huge frame at `first` of `src` into the one just claimed at
/// `first` of `dst` (mapped nowhere yet). A device writing the source
/// through a pin meanwhile may leave the copy torn, as DMA can during
/// Linux's fork; the copy never reaches outside the two frames.
pub(crate) fn copy_huge_frame(dst: &Store, src: &Store, first: u64) {
    for p in first..first + PAGES_PER_LEAF {
        // SAFETY: both stores are borrowed, so their direct maps stay
        // mapped for the call, and a huge frame is 512 slots of one store,
        // so every page lies inside both.
        unsafe { crate::sys::copy_page(src.frame_ptr(p), dst.frame_ptr(p)) };
    }
}

/// Marks [`VmMemory::cow_block`] as split by the fault whose page the
/// small path is about to copy.
const COW_FIRST: u64 = 1 << 63;

impl VmMemory {
    /// Replaces the shared huge frame `old_idx` of `leaf` (first page
    /// `first`) by an exclusive copy of the whole block
    /// ([`HugeCow::Block`]); the caller holds the leaf's lock.
    fn copy_huge_block(
        &self,
        leaf: &Leaf,
        first: u64,
        old_idx: u32,
        writable: bool,
    ) -> Result<(), MemError> {
        let idx = self.alloc_huge(first)?;
        let (old, new) = (self.store(old_idx), self.store(idx));
        copy_huge_frame(&new, &old, first);
        if let Err(e) = self.host_map(first, PAGES_PER_LEAF, &new, writable) {
            self.unclaim(idx, first);
            return Err(e);
        }
        new.slot(first).map_entire();
        leaf.set_huge(
            first,
            Entry::Present {
                store: idx,
                writable,
                wp: false,
                soft_dirty: true,
            },
        );
        old.slot(first).unmap_entire();
        old.put(first, true);
        drop(old);
        self.slot_release(old_idx);
        self.ctx
            .stats
            .copied
            .fetch_add(PAGES_PER_LEAF, Ordering::Relaxed);
        Ok(())
    }

    /// [`HugeCow::Adaptive`]: a copy-on-write fault copied `page` out of a
    /// block whose huge entry this VM split on an earlier copy-on-write
    /// fault; the block is to be collapsed once the fault is done.
    pub(crate) fn note_small_cow(&self, page: u64) {
        if self.ctx.config.huge_cow != HugeCow::Adaptive {
            return;
        }
        let block = page / PAGES_PER_LEAF + 1;
        let last = self.cow_block.load(Ordering::Relaxed);
        if last == block | COW_FIRST {
            self.cow_block.store(block, Ordering::Relaxed);
        } else if last == block {
            self.collapse_wanted.store(block, Ordering::Relaxed);
        }
    }

    /// Collapses the block a fault asked for ([`VmMemory::note_small_cow`]);
    /// called by the faulting thread once it holds no lock.
    pub(crate) fn collapse_wanted_block(&self) {
        // Every vCPU fault passes here: a load, not a swap, when nothing
        // is wanted.
        if self.collapse_wanted.load(Ordering::Relaxed) == 0 {
            return;
        }
        let block = self.collapse_wanted.swap(0, Ordering::Relaxed);
        if block == 0 {
            return;
        }
        self.cow_block.store(0, Ordering::Relaxed);
        let gpa = self.gpa((block - 1) * PAGES_PER_LEAF);
        match self.collapse(gpa) {
            Ok(c) => log::trace!("collapse of the block at {gpa:#x} after copy-on-write: {c:?}"),
            Err(e) => log::debug!("collapse of the block at {gpa:#x} after copy-on-write: {e}"),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::{SHMEM_THP_2M_KNOB, SHMEM_THP_KNOB, check_knobs, selected};

    #[test]
    fn reads_the_selected_value() {
        assert_eq!(
            selected("always within_size [advise] never deny force"),
            Some("advise")
        );
        assert_eq!(selected("[inherit] never"), Some("inherit"));
        assert_eq!(selected("never"), None);
    }

    #[test]
    fn refuses_hosts_without_2m_shared_pages_naming_the_knob() {
        let never = "always within_size advise [never] deny force";
        let advise = "always within_size [advise] never deny force";
        let e = check_knobs(never, Some("always [inherit] within_size advise never")).unwrap_err();
        assert!(
            e.contains(SHMEM_THP_KNOB) && e.contains("`never`") && e.contains("echo advise"),
            "{e}"
        );
        assert!(check_knobs(advise, Some("[inherit] never")).is_ok());
        assert!(check_knobs(advise, None).is_ok());
        assert!(check_knobs(never, None).is_err());
        // The per-size knob wins when it is not `inherit`.
        let e = check_knobs(advise, Some("always inherit within_size advise [never]")).unwrap_err();
        assert!(
            e.contains(SHMEM_THP_2M_KNOB) && e.contains("echo inherit"),
            "{e}"
        );
        assert!(check_knobs(never, Some("always inherit [within_size] advise never")).is_ok());
    }
}
