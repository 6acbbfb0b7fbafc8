//! Swap-out and swap-in of guest pages (MEMORY-MODEL.md R5, R7, R13, R14).
//!
//! Swap-out of a page takes one of two paths, by its frame:
//!
//! - *exclusive* (mapped by this entry alone, possibly writable, possibly
//!   pinned), all under the entry's leaf lock, as Linux's
//!   `try_to_unmap_one` with `__folio_try_share_anon_rmap` (R7):
//!   the host page loses access, the entry becomes a swap entry (so a
//!   lockless pinner re-reading it backs off), a fence, then the pin check:
//!   a pinned frame is restored and skipped. Otherwise the contents go to a
//!   slot, the frame loses its anon-exclusive bit and its mapping, and the
//!   swap entry records that it was exclusive (R13).
//! - *shared* (not exclusive: no writable mapping and no pin anywhere, R1
//!   and R4): the contents cannot change, so they are written to a slot
//!   once, without locks, while a reference held on the frame keeps a
//!   write fault from reusing it; then every VM that maps it (found through
//!   the store's reverse map) gets a swap entry naming that slot, one VM at
//!   a time under its own locks. A VM that maps it later (a fork that ran
//!   meanwhile) keeps the frame; nothing is lost, less is reclaimed.
//!
//! Swap-in (R14) reads the slot into a fresh frame of the faulting VM,
//! checking the slot's checksum (or, for a restored VM's image entry, the
//! page's run in the snapshot memory file, see `image.rs`). The fresh frame is this VM's alone, so it
//! is exclusive whatever the entry said, and writable unless a write
//! listener protects the page. Other VMs naming the same slot read their
//! own copies when they touch it.

use std::sync::Arc;

use crate::entry::Entry;
use crate::layout::PAGE_SIZE;
use crate::store::Store;
use crate::swap::PageBuf;
use crate::sync::{AtomicU64, Ordering, fence};
use crate::table::Leaf;
use crate::vm::{MemError, VmMemory};

/// What a swap-out request did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwapOutReport {
    /// Pages of this VM now in swap.
    pub swapped: u64,
    /// Pages skipped because a device holds a pin on their frame.
    pub pinned: u64,
}

/// What happened to one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageOut {
    Swapped,
    Pinned,
    /// Nothing to do: no frame (absent, already in swap, being migrated).
    Skipped,
}

impl VmMemory {
    /// Writes the present pages of `[gpa, gpa + len)` to swap now and
    /// unmaps them; the next access reads them back. Pages a device holds
    /// pinned are skipped (reported, not an error), and so are unevictable
    /// ones.
    pub fn swap_out(&self, gpa: u64, len: u64) -> Result<SwapOutReport, MemError> {
        let mut report = SwapOutReport::default();
        for (first, off, run) in self.page_range(gpa, len)? {
            for page in first..first + (off + run).div_ceil(PAGE_SIZE) {
                match self.swap_out_page(page)? {
                    PageOut::Swapped => report.swapped += 1,
                    PageOut::Pinned => report.pinned += 1,
                    PageOut::Skipped => {}
                }
            }
        }
        Ok(report)
    }

    /// Swaps out one page.
    pub(crate) fn swap_out_page(&self, page: u64) -> Result<PageOut, MemError> {
        if self.is_unevictable(page) {
            return Ok(PageOut::Skipped);
        }
        let shared = {
            let _map = self.map_lock.read();
            // A page of a huge entry goes alone: the entry is split.
            let Some(leaf) = self.small_leaf(page) else {
                return Ok(PageOut::Skipped);
            };
            let _ptl = leaf.lock().lock();
            let Entry::Present { store: idx, .. } = leaf.get(page) else {
                return Ok(PageOut::Skipped);
            };
            let store = self.store(idx);
            let meta = store.meta(page);
            if meta.exclusive() {
                return self.swap_out_exclusive(leaf, page, idx, &store);
            }
            // Keeps the frame alive and not reusable by a write fault
            // (which needs the sole reference) until every mapping is done.
            meta.get();
            store
        };
        let result = self.swap_out_shared(page, &shared);
        shared.put(page, true);
        result
    }

    /// The exclusive path; the caller holds the leaf lock.
    fn swap_out_exclusive(
        &self,
        leaf: &Leaf,
        page: u64,
        idx: u32,
        store: &Arc<Store>,
    ) -> Result<PageOut, MemError> {
        let old = leaf.get(page);
        let Entry::Present { writable, wp, .. } = old else {
            unreachable!("the caller saw a present entry under the same lock");
        };
        let meta = store.meta(page);
        debug_assert_eq!(meta.mapcount(), 1, "an exclusive frame mapped twice");
        if meta.maybe_pinned() {
            return Ok(PageOut::Pinned);
        }
        let swap = self
            .ctx
            .swap_or_open()
            .map_err(|source| self.swap_error(page, source))?;
        // R7: invalidate, fence, check pins.
        self.host_unmap(page, 1)?;
        leaf.set(
            page,
            Entry::Swap {
                slot: u32::MAX,
                exclusive: true,
                wp,
            },
        );
        fence(Ordering::SeqCst);
        let restore = |me: &Self| -> Result<(), MemError> {
            me.host_map(page, 1, store, writable)?;
            leaf.set(page, old);
            Ok(())
        };
        if meta.maybe_pinned() {
            restore(self)?;
            return Ok(PageOut::Pinned);
        }
        let mut buf: PageBuf = [0; PAGE_SIZE as usize];
        // SAFETY: the frame is a whole page of a store we hold; no guest
        // mapping or pin can write it now (unmapped above, no pins).
        unsafe { crate::sys::read_frame(store.frame_ptr(page), &mut buf) };
        let slot = match swap.store(&buf) {
            Ok(slot) => slot,
            Err(source) => {
                restore(self)?;
                return Err(self.swap_error(page, source));
            }
        };
        leaf.set(
            page,
            Entry::Swap {
                slot,
                exclusive: true,
                wp,
            },
        );
        meta.clear_exclusive();
        self.unmap_entry(idx, page);
        Ok(PageOut::Swapped)
    }

    /// The shared path: the caller holds a reference on the frame and no
    /// lock.
    fn swap_out_shared(&self, page: u64, store: &Arc<Store>) -> Result<PageOut, MemError> {
        let mut buf: PageBuf = [0; PAGE_SIZE as usize];
        // SAFETY: the frame is held by the caller's reference; it is not
        // exclusive, so nothing writes it (R1, R4) and our reference keeps
        // a write fault from reusing it.
        unsafe { crate::sys::read_frame(store.frame_ptr(page), &mut buf) };
        let swap = self
            .ctx
            .swap_or_open()
            .map_err(|source| self.swap_error(page, source))?;
        let slot = swap
            .store(&buf)
            .map_err(|source| self.swap_error(page, source))?;
        let mut mine = false;
        for id in store.mappers() {
            let Some(vm) = self.ctx.vm(id) else { continue };
            let done = vm.swap_out_mapping(page, store, slot)?;
            mine |= done && vm.id() == self.id();
        }
        // The slot's first reference was ours; the entries hold the rest.
        swap.put(slot);
        Ok(if mine {
            PageOut::Swapped
        } else {
            PageOut::Skipped
        })
    }

    /// Replaces this VM's mapping of `store`'s frame at `page`, if it has
    /// one, by a swap entry naming `slot`. Returns whether it did.
    fn swap_out_mapping(&self, page: u64, store: &Arc<Store>, slot: u32) -> Result<bool, MemError> {
        let _map = self.map_lock.read();
        let Some(leaf) = self.small_leaf(page) else {
            return Ok(false);
        };
        let _ptl = leaf.lock().lock();
        let Entry::Present { store: idx, wp, .. } = leaf.get(page) else {
            return Ok(false);
        };
        if !Arc::ptr_eq(&self.store(idx), store) {
            return Ok(false);
        }
        debug_assert!(
            !store.meta(page).exclusive(),
            "shared path on an exclusive frame"
        );
        self.host_unmap(page, 1)?;
        self.ctx.swap_in_use().dup(slot);
        leaf.set(
            page,
            Entry::Swap {
                slot,
                exclusive: false,
                wp,
            },
        );
        self.unmap_entry(idx, page);
        Ok(true)
    }

    /// Reads a swapped-out page back into a fresh frame (R14); the caller
    /// holds the leaf lock.
    pub(crate) fn swap_in(
        &self,
        leaf: &Leaf,
        page: u64,
        slot: u32,
        wp: bool,
    ) -> Result<(), MemError> {
        if crate::context::Slots::is_image(slot) && self.limit.pages().is_none() {
            // With the rest of its run (see `restore.rs`).
            return self.image_in(leaf, page, slot).map(|_| ());
        }
        let swap = self.ctx.swap_in_use();
        let mut buf: PageBuf = [0; PAGE_SIZE as usize];
        swap.load(slot, &mut buf)
            .map_err(|source| self.swap_error(page, source))?;
        let hint = page
            .checked_sub(1)
            .and_then(|p| self.table.get(p).present_store());
        self.install_fresh(leaf, page, hint, wp, Some(&buf))?;
        swap.put(slot);
        let counter = if crate::context::Slots::is_image(slot) {
            &self.ctx.stats.image_loads
        } else {
            &self.ctx.stats.swap_ins
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn swap_error(&self, page: u64, source: crate::swap::SwapError) -> MemError {
        MemError::Swap {
            gpa: self.gpa(page),
            source,
        }
    }
}

// ---- keeping a VM under its memory limit ------------------------------

/// Pages the last faults made present, which reclaim leaves alone: the
/// instruction that faulted needs them all at once (code, stack, and up to
/// two pages per operand), and evicting one would make it fault forever.
pub const RECENT: usize = 8;

/// The last [`RECENT`] pages a fault made present.
#[derive(Debug)]
pub(crate) struct Recent {
    /// Page number + 1; 0 is an empty slot.
    pages: [AtomicU64; RECENT],
    next: AtomicU64,
}

impl Recent {
    pub(crate) fn new() -> Self {
        Self {
            pages: std::array::from_fn(|_| AtomicU64::new(0)),
            next: AtomicU64::new(0),
        }
    }

    fn push(&self, page: u64) {
        if self.contains(page) {
            return;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % RECENT;
        self.pages[i].store(page + 1, Ordering::Relaxed);
    }

    fn contains(&self, page: u64) -> bool {
        self.pages
            .iter()
            .any(|p| p.load(Ordering::Relaxed) == page + 1)
    }
}

/// A VM's reclaim state: its limit and where the clock hand points.
#[derive(Debug)]
pub(crate) struct Limit {
    /// Most present pages, 0 for no limit.
    pages: AtomicU64,
    hand: AtomicU64,
    pub(crate) recent: Recent,
    /// Page ranges reclaim never takes (`mlock`): (first page, pages).
    unevictable: std::sync::RwLock<Vec<(u64, u64)>>,
}

impl Limit {
    pub(crate) fn new() -> Self {
        Self {
            pages: AtomicU64::new(0),
            hand: AtomicU64::new(0),
            recent: Recent::new(),
            unevictable: std::sync::RwLock::new(Vec::new()),
        }
    }

    /// A child's copy: the same limit and unevictable ranges.
    pub(crate) fn inherit(&self) -> Self {
        let child = Self::new();
        child.copy_from(self);
        child
    }

    /// Takes `parent`'s limit and unevictable ranges.
    pub(crate) fn copy_from(&self, parent: &Self) {
        self.pages
            .store(parent.pages.load(Ordering::Relaxed), Ordering::Relaxed);
        *self.unevictable_mut() = parent.unevictable().clone();
    }

    pub(crate) fn pages(&self) -> Option<u64> {
        match self.pages.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    fn unevictable(&self) -> std::sync::RwLockReadGuard<'_, Vec<(u64, u64)>> {
        self.unevictable
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn unevictable_mut(&self) -> std::sync::RwLockWriteGuard<'_, Vec<(u64, u64)>> {
        self.unevictable
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_unevictable(&self, page: u64) -> bool {
        self.unevictable()
            .iter()
            .any(|&(first, n)| page >= first && page < first + n)
    }
}

impl VmMemory {
    /// Keeps at most `pages` of this VM's pages present (None: no limit),
    /// swapping out cold ones after each fault that goes over. Pages a
    /// device holds pinned, pages marked unevictable and the pages of the
    /// last few faults are never taken, so the VM can exceed the limit by
    /// those. A forked child inherits the limit.
    pub fn set_resident_limit(&self, pages: Option<u64>) {
        self.limit
            .pages
            .store(pages.map_or(0, |p| p.max(1)), Ordering::Relaxed);
    }

    /// The limit [`VmMemory::set_resident_limit`] set.
    pub fn resident_limit(&self) -> Option<u64> {
        self.limit.pages()
    }

    /// Pages present now (mapped to a frame, shared or not).
    pub fn resident(&self) -> u64 {
        self.table.present()
    }

    /// Of [`VmMemory::resident`], the pages mapped by small (4 KiB)
    /// entries: those whose host mappings cost a fork per page (a snapshot
    /// that may change at once).
    pub fn resident_small(&self) -> u64 {
        let _map = self.map_lock.read();
        let huge = self
            .table
            .leaves()
            .filter(|(_, leaf)| leaf.huge().is_some())
            .count() as u64;
        self.table
            .present()
            .saturating_sub(huge * crate::layout::PAGES_PER_LEAF)
    }

    /// Marks `[gpa, gpa + len)` unevictable, like `mlock`: reclaim and
    /// [`VmMemory::swap_out`] leave its pages present. For memory the
    /// host's CPU reads on the guest's behalf without a fault it could
    /// report (descriptor tables, exception stubs, page tables).
    pub fn set_unevictable(&self, gpa: u64, len: u64) -> Result<(), MemError> {
        let runs = self.page_range(gpa, len)?;
        let mut ranges = self.limit.unevictable_mut();
        for (first, off, run) in runs {
            ranges.push((first, (off + run).div_ceil(PAGE_SIZE)));
        }
        Ok(())
    }

    pub(crate) fn is_unevictable(&self, page: u64) -> bool {
        self.limit.is_unevictable(page)
    }

    /// Notes that a fault made `page` present or writable.
    pub(crate) fn note_fault(&self, page: u64) {
        if self.limit.pages().is_some() {
            self.limit.recent.push(page);
        }
    }

    /// If the VM is over its limit, swaps out cold pages until it is not
    /// (or nothing more can go). Called with no lock held, after a fault.
    pub(crate) fn reclaim_if_over(&self) {
        let Some(limit) = self.limit.pages() else {
            return;
        };
        if self.table.present() <= limit {
            return;
        }
        if let Err(e) = self.reclaim_to(limit) {
            log::warn!("reclaim for VM {}: {e}", self.id());
        }
    }

    /// The clock: walks the table from the hand; a young page loses its
    /// young bit and stays (second chance), an old one goes to swap. At
    /// most two turns, so a VM whose pages cannot go stays over.
    fn reclaim_to(&self, limit: u64) -> Result<(), MemError> {
        let pages = self.table.pages();
        let mut scanned = 0u64;
        while self.table.present() > limit && scanned < 2 * pages {
            let page = self.limit.hand.fetch_add(1, Ordering::Relaxed) % pages;
            scanned += 1;
            let Some(leaf) = self.small_leaf(page) else {
                // Skip the rest of an absent leaf.
                let skip = crate::layout::PAGES_PER_LEAF - page % crate::layout::PAGES_PER_LEAF - 1;
                self.limit.hand.fetch_add(skip, Ordering::Relaxed);
                scanned += skip;
                continue;
            };
            if !matches!(leaf.peek(page), Entry::Present { .. })
                || self.limit.recent.contains(page)
                || self.is_unevictable(page)
                || leaf.take_young(page)
            {
                continue;
            }
            self.swap_out_page(page)?;
        }
        Ok(())
    }
}
