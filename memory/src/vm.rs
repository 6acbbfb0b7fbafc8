//! The memory of one VM: its stage-2 table, its stores, and the host
//! mapping derived from the table.
//!
//! # Host mapping
//! The VM's RAM is one reservation of host address space, page `p` at
//! `base + p * 4K`; KVM's memslots point into it. What the guest can do with
//! a page follows from its entry:
//!
//! | entry                 | host page                                   |
//! |-----------------------|---------------------------------------------|
//! | none, marker, swap, migration | `PROT_NONE` (an access faults)      |
//! | present, read-only    | the frame (store fd at `p * 4K`), `PROT_READ` |
//! | present, writable     | the frame, `PROT_READ | PROT_WRITE`         |
//!
//! When an entry loses access the host page loses it first; when it gains
//! access the host page gains it first and the entry follows. Both happen
//! under the entry's leaf lock, so no one can observe an entry more
//! permissive than the host mapping behind it.

use std::io;

use thiserror::Error;

use crate::Context;
use crate::entry::Entry;
use crate::layout::{Layout, PAGE_SIZE};
use crate::lock::{Rank, RankedRwLock};
use crate::slots::StoreList;
use crate::store::Store;
use crate::wp::WpState;
use std::sync::Arc;

use crate::sync::{AtomicU32, AtomicU64, Ordering};
use crate::sys::Mapping;
use crate::table::{Leaf, Table};

/// Errors of guest-memory operations.
#[derive(Debug, Error)]
pub enum MemError {
    /// The range is not guest RAM.
    #[error("guest-physical range {gpa:#x}+{len:#x} is not RAM")]
    NotRam {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        len: u64,
    },
    /// The address is not aligned as the call needs.
    #[error("guest-physical address {gpa:#x} is not aligned to {align:#x}")]
    Unaligned {
        /// The address.
        gpa: u64,
        /// The alignment needed.
        align: u64,
    },
    /// A spare handed to [`VmMemory::fork_into`] was used already, or
    /// made for another context or layout.
    #[error("the spare memory for a fork is not an unused one of this VM's layout")]
    SpareUnfit,
    /// The host refused to create a frame store.
    #[error("cannot create a frame store")]
    Store(#[source] io::Error),
    /// The host refused to fill a frame (out of memory).
    #[error("cannot copy a frame")]
    Copy(#[source] io::Error),
    /// The host refused to reserve address space for the VM's RAM.
    #[error("cannot reserve {len:#x} bytes of host address space for guest RAM")]
    Reserve {
        /// Bytes requested.
        len: u64,
        /// What the host said.
        #[source]
        source: io::Error,
    },
    /// A change to the host mapping failed.
    #[error("cannot change the host mapping of guest page {page:#x} (+{pages} pages)")]
    HostMap {
        /// First page number.
        page: u64,
        /// Number of pages.
        pages: u64,
        /// What the host said.
        #[source]
        source: io::Error,
    },
    /// The host's limit on mappings per process was reached.
    #[error(
        "the host allows no more memory mappings (vm.max_map_count = {limit}); \
         raise it, e.g. `sysctl -w vm.max_map_count=1048576`"
    )]
    MapCount {
        /// The current limit.
        limit: u64,
    },
    /// A page could not go to swap or come back from it.
    #[error("guest page {gpa:#x} cannot go to swap or come back")]
    Swap {
        /// Guest-physical address of the page.
        gpa: u64,
        /// What went wrong.
        #[source]
        source: crate::swap::SwapError,
    },
    /// The VM's write protection is taken by something else.
    #[error("write protection is busy: {0}")]
    Busy(&'static str),
    /// The page is in a state this build cannot resolve.
    #[error("guest page {gpa:#x} is {state}, which cannot be resolved")]
    Unsupported {
        /// Guest-physical address of the page.
        gpa: u64,
        /// Its state.
        state: &'static str,
    },
}

/// Reads `vm.max_map_count`.
pub fn max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What an access needs from a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read: the page must be present.
    Read,
    /// Write: present, writable and therefore exclusive.
    Write,
    /// Read through a reference that must stay coherent with later guest
    /// writes: present and exclusive, possibly still read-only (R9, R10).
    Unshare,
}

impl Access {
    /// Whether an entry already allows this access without a fault.
    pub(crate) fn allowed_by(self, e: Entry, exclusive: impl FnOnce(u32) -> bool) -> bool {
        match (self, e) {
            (_, Entry::Present { writable: true, .. }) => true,
            (Access::Read, Entry::Present { .. }) => true,
            (Access::Unshare, Entry::Present { store, .. }) => exclusive(store),
            _ => false,
        }
    }
}

/// The state of the frame a page maps, for tests and diagnostics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    /// References to the frame (mappings, pins, transient holders).
    pub refcount: u32,
    /// Stage-2 entries mapping it, in any VM.
    pub mapcount: u32,
    /// Pins on it.
    pub pincount: u32,
    /// The anon-exclusive bit.
    pub exclusive: bool,
    /// The page is mapped by a huge entry (the counts are then the huge
    /// frame's, and `mapcount` counts huge entries too).
    pub huge: bool,
}

/// The memory of one VM.
#[derive(Debug)]
pub struct VmMemory {
    id: u64,
    /// This VM's own handle, for pins that must find it again later.
    pub(crate) me: std::sync::Weak<VmMemory>,
    pub(crate) ctx: Arc<Context>,
    pub(crate) layout: Layout,
    pub(crate) table: Table,
    /// The stores this VM's entries may name, by slot (see `slots.rs`).
    pub(crate) stores: RankedRwLock<StoreList>,
    /// Index of the store new frames go to first.
    pub(crate) home: AtomicU32,
    /// The collapse scanner's next leaf (see `collapse.rs`).
    pub(crate) collapse_cursor: AtomicU64,
    /// The block (leaf index + 1; 0: none) of this VM's last copy-on-write
    /// fault on a block a huge entry shared, and the block such a fault
    /// asked to collapse ([`crate::HugeCow::Adaptive`]).
    pub(crate) cow_block: AtomicU64,
    pub(crate) collapse_wanted: AtomicU64,
    /// The host mapping KVM sees. std's lock, a leaf: readers hold it
    /// around one host call each (under the memory-map lock, like every
    /// change of the mapping); only a fork that moves the VM to a new host
    /// mapping writes it (see `fork.rs`), holding the memory-map lock for
    /// writing, so it never waits for a reader.
    host: std::sync::RwLock<Mapping>,
    /// Calls that changed what the host mapping maps or allows, counted
    /// once each has returned (see [`VmMemory::host_mapping_changes`]).
    /// std's atomic, not the one loom models: it orders no memory access,
    /// a vCPU only compares two of its values.
    host_changes: std::sync::atomic::AtomicU64,
    /// Set once this memory, a spare, holds a moved VM's old host mapping
    /// ([`VmMemory::mark_spent`]). std's atomic: only its owner's later
    /// calls read it.
    spent: std::sync::atomic::AtomicBool,
    /// Forks that moved this VM to a spare's host mapping
    /// ([`VmMemory::moves`]). std's atomic: a count, ordering nothing.
    moves: std::sync::atomic::AtomicU64,
    /// Linux's `mmap_lock`: read for faults and pins, write for fork and
    /// teardown-like changes of the whole VM.
    pub(crate) map_lock: RankedRwLock<()>,
    /// Linux's `write_protect_seq`: odd while fork or a live snapshot
    /// write-protects the VM; the lockless pin path gives up when it sees
    /// it odd or changed.
    pub(crate) wp_seq: AtomicU64,
    /// Counts the discards that dropped a present page (see
    /// [`VmMemory::discard_generation`]).
    discards: AtomicU64,
    /// Write protection for a listener (see `wp.rs`).
    pub(crate) wp: WpState,
    /// The resident limit and reclaim's state (see `reclaim.rs`).
    pub(crate) limit: crate::reclaim::Limit,
    /// Pages the VMM wrote, when a reset needs them (see `dirty.rs`).
    pub(crate) vmm_writes: crate::dirty::VmmWrites,
    /// Host page table entries moved out of the host mapping and not yet
    /// handed to the reaper (see `fork.rs`). Ownership handles only, like
    /// `Arc`: std's lock, taken under no other and around nothing else.
    pub(crate) shed: std::sync::Mutex<Vec<Mapping>>,
    /// How long the steps of the last fork took (diagnostics; std's lock,
    /// like `shed`).
    pub(crate) phases: std::sync::Mutex<crate::fork::ForkPhases>,
    /// A store made ahead ([`VmMemory::make_store_ahead`]) for the first
    /// frame no store of the VM has free (std's lock, like `shed`).
    ahead: std::sync::Mutex<Option<Arc<Store>>>,
}

impl VmMemory {
    /// Creates the memory of a new VM: nothing present, no host memory used.
    pub fn new(ctx: &Arc<Context>, layout: Layout) -> Result<Arc<Self>, MemError> {
        Self::with_limit(ctx, layout, crate::reclaim::Limit::new())
    }

    /// Like [`VmMemory::new`], with a resident limit's state.
    pub(crate) fn with_limit(
        ctx: &Arc<Context>,
        layout: Layout,
        limit: crate::reclaim::Limit,
    ) -> Result<Arc<Self>, MemError> {
        let host = Self::reserve_host(ctx, &layout)?;
        let vm = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            id: ctx.new_vm_id(),
            ctx: ctx.clone(),
            table: Table::new(layout.pages()),
            layout,
            stores: RankedRwLock::new(Rank::Stores, StoreList::default()),
            home: AtomicU32::new(0),
            collapse_cursor: AtomicU64::new(0),
            cow_block: AtomicU64::new(0),
            collapse_wanted: AtomicU64::new(0),
            host: std::sync::RwLock::new(host),
            host_changes: std::sync::atomic::AtomicU64::new(0),
            spent: std::sync::atomic::AtomicBool::new(false),
            moves: std::sync::atomic::AtomicU64::new(0),
            map_lock: RankedRwLock::new(Rank::MapLock, ()),
            wp_seq: AtomicU64::new(0),
            discards: AtomicU64::new(0),
            wp: WpState::new(),
            limit,
            vmm_writes: Default::default(),
            shed: std::sync::Mutex::new(Vec::new()),
            phases: Default::default(),
            ahead: std::sync::Mutex::new(None),
        });
        ctx.register(&vm);
        Ok(vm)
    }

    /// Process-unique id of this VM's memory (reverse maps name VMs by it).
    #[inline]
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Changes whenever the host mapping of the VM's RAM (what KVM maps
    /// from) changes, counted once the change is made. A fault KVM reports
    /// for an access the table allows is explained when this moved while
    /// the guest ran: another thread moved or protected the page meanwhile
    /// (a migration, a swap-out, a fork), and the access will go through
    /// once that is done.
    pub fn host_mapping_changes(&self) -> u64 {
        self.host_changes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Changes whenever a discard drops a present page: the one way a
    /// pinned frame stops being the frame the guest maps at its page (every
    /// other change of a page's frame refuses or skips pinned frames: R4,
    /// R6, R11, swap-out, migration, collapse). A device that keeps page
    /// pins across requests reads this before it takes them and uses them
    /// only while it reads the same.
    ///
    /// Ordering: the count goes up (release) after the entries changed, so
    /// a pin taken after reading the new count (acquire) sees the change.
    #[inline]
    pub fn discard_generation(&self) -> u64 {
        self.discards.load(Ordering::Acquire)
    }

    /// The shared context.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Where RAM lives.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The host ranges KVM must be given as memslots: (guest-physical
    /// address, length, host address).
    pub fn host_ranges(&self) -> Vec<(u64, u64, u64)> {
        self.layout
            .ranges()
            .iter()
            .map(|r| (r.gpa, r.len, self.host().page_ptr(r.first_page) as u64))
            .collect()
    }

    /// The entry of the page holding `gpa` (a snapshot: it may change).
    pub fn entry(&self, gpa: u64) -> Option<Entry> {
        self.layout.page_of(gpa).map(|p| self.table.get(p))
    }

    /// Whether `access` to the page at `gpa` would fault now. False for
    /// addresses outside RAM.
    pub fn would_fault(&self, gpa: u64, access: Access) -> bool {
        let Some(page) = self.layout.page_of(gpa) else {
            return false;
        };
        let e = self.table.get(page);
        !access.allowed_by(e, |s| self.frame_exclusive(s, page))
    }

    /// The frame the page holding `gpa` maps, if it is present.
    pub fn frame_info(&self, gpa: u64) -> Option<FrameInfo> {
        let page = self.layout.page_of(gpa)?;
        let _map = self.map_lock.read();
        let leaf = self.table.leaf(page)?;
        let _ptl = leaf.lock().lock();
        let store = leaf.get(page).present_store()?;
        let meta_owner = self.store(store);
        let meta = meta_owner.meta(page);
        Some(FrameInfo {
            refcount: meta.refcount(),
            mapcount: meta.mapcount() + meta.folio().entire(),
            pincount: meta.pincount(),
            exclusive: meta.exclusive(),
            huge: leaf.huge().is_some(),
        })
    }

    /// The store in slot `idx`, which an entry (or a claimed frame) of
    /// this VM names, so the slot cannot be emptied meanwhile.
    pub(crate) fn store(&self, idx: u32) -> Arc<Store> {
        self.stores
            .read()
            .get(idx)
            .expect("a slot in use is filled")
            .clone()
    }

    /// Empties every slot nothing uses (a fresh child shares its parent's
    /// whole list, but maps only some of those stores).
    pub(crate) fn drop_unused_slots(&self) {
        let home = self.home.load(Ordering::Relaxed);
        let mut stores = self.stores.write();
        let slots: Vec<u32> = stores.indices().collect();
        for idx in slots {
            if let Some(s) = stores.take_if_unused(idx, home) {
                s.remove_mapper(self.id);
            }
        }
    }

    /// The slot of `store` in this VM's list, added if missing, with one
    /// more use counted (for an entry about to name it).
    pub(crate) fn hold_slot_of(&self, store: &Arc<Store>) -> u32 {
        {
            let stores = self.stores.read();
            if let Some(idx) = stores.find(store) {
                stores.hold_many(idx, 1);
                return idx;
            }
        }
        let mut stores = self.stores.write();
        let idx = match stores.find(store) {
            Some(idx) => idx,
            None => {
                store.add_mapper(self.id);
                stores.insert(store.clone())
            }
        };
        stores.hold_many(idx, 1);
        idx
    }

    /// Counts one use fewer of slot `idx`, emptying it if it is unused.
    pub(crate) fn slot_release(&self, idx: u32) {
        if !self.stores.read().release(idx) {
            return;
        }
        let home = self.home.load(Ordering::Relaxed);
        let taken = self.stores.write().take_if_unused(idx, home);
        if let Some(store) = taken {
            store.remove_mapper(self.id);
        }
    }

    pub(crate) fn frame_exclusive(&self, store: u32, page: u64) -> bool {
        self.stores
            .read()
            .get(store)
            .is_some_and(|s| s.meta(page).exclusive())
    }

    pub(crate) fn page_range(&self, gpa: u64, len: u64) -> Result<crate::layout::Runs, MemError> {
        self.layout
            .split(gpa, len)
            .ok_or(MemError::NotRam { gpa, len })
    }

    pub(crate) fn gpa(&self, page: u64) -> u64 {
        self.layout.gpa_of(page).unwrap_or(u64::MAX)
    }

    // ---- host mapping -------------------------------------------------

    fn host_err(page: u64, pages: u64, source: io::Error) -> MemError {
        if source.raw_os_error() == Some(libc::ENOMEM) {
            if let Some(limit) = max_map_count() {
                return MemError::MapCount { limit };
            }
        }
        MemError::HostMap {
            page,
            pages,
            source,
        }
    }

    /// Maps `pages` frames of one store at `page`.
    pub(crate) fn host_map(
        &self,
        page: u64,
        pages: u64,
        store: &Store,
        writable: bool,
    ) -> Result<(), MemError> {
        self.host_call(|h| h.map_file(page, pages, store.fd(), writable))
            .map_err(|e| Self::host_err(page, pages, e))
    }

    pub(crate) fn host_unmap(&self, page: u64, pages: u64) -> Result<(), MemError> {
        self.host_call(|h| h.unmap(page, pages))
            .map_err(|e| Self::host_err(page, pages, e))
    }

    pub(crate) fn host_protect(
        &self,
        page: u64,
        pages: u64,
        writable: bool,
    ) -> Result<(), MemError> {
        self.host_call(|h| h.protect(page, pages, writable))
            .map_err(|e| Self::host_err(page, pages, e))
    }

    /// Moves the host page table entries of `pages` pages from `page` out
    /// of the host mapping (see [`Mapping::move_entries_out`]).
    pub(crate) fn host_move_entries_out(&self, page: u64, pages: u64) -> std::io::Result<Mapping> {
        self.host_call(|h| h.move_entries_out(page, pages))
    }

    /// One call that changes the host mapping, counted once it returned
    /// (see [`VmMemory::host_mapping_changes`]).
    fn host_call<T>(&self, call: impl FnOnce(&Mapping) -> io::Result<T>) -> io::Result<T> {
        let done = call(&self.host());
        self.host_changed();
        done
    }

    /// The host mapping, for one call.
    fn host(&self) -> std::sync::RwLockReadGuard<'_, Mapping> {
        self.host
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn host_changed(&self) {
        self.host_changes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// An empty host mapping for RAM of `layout`.
    fn reserve_host(ctx: &Context, layout: &Layout) -> Result<Mapping, MemError> {
        let len = layout.size();
        if ctx.config.huge {
            Mapping::reserve_huge(len as usize)
        } else {
            Mapping::reserve(len as usize)
        }
        .map_err(|source| MemError::Reserve { len, source })
    }

    /// Marks this spare as holding a moved VM's old host mapping: it is
    /// never used as a spare again, and its drop hands the mapping to the
    /// reaper, which unmaps it a piece at a time off every path (see
    /// `host_reap.rs`); at once it would hold the host's mapping lock for
    /// tens of milliseconds per GiB. Nothing may reach the old mapping
    /// any more.
    pub(crate) fn mark_spent(&self) {
        self.spent.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many forks moved this VM to a new host mapping
    /// ([`VmMemory::fork_rehosted`]). A move cannot be told from the
    /// mapping's address: the new one may be placed where an earlier,
    /// since unmapped, one was.
    pub fn moves(&self) -> u64 {
        self.moves.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn note_move(&self) {
        self.moves
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether [`VmMemory::mark_spent`] was called.
    pub(crate) fn is_spent(&self) -> bool {
        self.spent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Gives this VM the host mapping of `spare` and `spare` this VM's: a
    /// fork that rehosts the parent (see `fork.rs`). The caller holds this
    /// VM's memory-map lock for writing and `spare` is used by no one.
    pub(crate) fn swap_host(&self, spare: &VmMemory) {
        let mut mine = self
            .host
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut theirs = spare
            .host
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::swap(&mut *mine, &mut *theirs);
        drop((mine, theirs));
        self.host_changed();
    }

    // ---- frames --------------------------------------------------------

    /// Counts a new mapping of a frame, keeping the shared counter exact.
    pub(crate) fn frame_map(&self, store: &Store, page: u64) {
        if store.meta(page).map() == 2 {
            self.ctx.stats.shared.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drops an entry's mapping of the frame in slot `idx`: the frame
    /// loses a mapping and a reference, the slot a use.
    pub(crate) fn unmap_entry(&self, idx: u32, page: u64) {
        let store = self.store(idx);
        if store.meta(page).unmap() == 1 {
            self.ctx.stats.shared.fetch_sub(1, Ordering::Relaxed);
        }
        store.put(page, true);
        drop(store);
        self.slot_release(idx);
    }

    /// Claims a fresh frame for `page` in some store of this VM, creating a
    /// store if none has the slot free. `hint` is tried first (a neighbour's
    /// store, so host mappings merge). Returns the store's index.
    pub(crate) fn alloc_frame(&self, page: u64, hint: Option<u32>) -> Result<u32, MemError> {
        self.alloc_with(hint, |s| s.try_claim(page))
    }

    /// Claims a frame with `claim` in some store of this VM (`hint`, then
    /// the home store, then the others), creating a store, which becomes
    /// the home store, if none has it free. Returns the store's index.
    pub(crate) fn alloc_with(
        &self,
        hint: Option<u32>,
        claim: impl Fn(&Store) -> bool,
    ) -> Result<u32, MemError> {
        {
            let stores = self.stores.read();
            let home = self.home.load(Ordering::Relaxed);
            let order = hint
                .into_iter()
                .chain(std::iter::once(home))
                .chain(stores.indices());
            for idx in order {
                if stores.try_claim(idx, &claim) {
                    return Ok(idx);
                }
            }
        }
        let ahead = self
            .ahead
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let fresh = match ahead {
            Some(store) => store,
            None => Store::new(&self.ctx, self.layout.pages()).map_err(MemError::Store)?,
        };
        fresh.add_mapper(self.id);
        let mut stores = self.stores.write();
        let idx = stores.insert(fresh);
        let claimed = stores.try_claim(idx, &claim);
        debug_assert!(claimed, "a fresh store had the frame taken");
        self.home.store(idx, Ordering::Relaxed);
        Ok(idx)
    }

    /// Makes, now, the store the VM's next frame will need if none of its
    /// stores has one free (a memory file and its mapping: 30-100 us
    /// here). For memory made ahead of a fork: the copies a fork makes for
    /// the child (pinned pages) are made while the parent's vCPUs wait.
    pub fn make_store_ahead(&self) -> Result<(), MemError> {
        let mut ahead = self
            .ahead
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ahead.is_none() {
            *ahead = Some(Store::new(&self.ctx, self.layout.pages()).map_err(MemError::Store)?);
        }
        Ok(())
    }

    /// Gives a claimed frame back (it was never mapped).
    pub(crate) fn unclaim(&self, store: u32, page: u64) {
        self.store(store).put(page, true);
        self.slot_release(store);
    }

    /// Runs `f` on each leaf that covers part of `[first, first + pages)`,
    /// with the page range inside that leaf, holding the memory-map lock for
    /// reading and the leaf's lock.
    /// `create` installs missing leaves instead of skipping them.
    pub(crate) fn walk_leaves<F>(
        &self,
        first: u64,
        pages: u64,
        create: bool,
        mut f: F,
    ) -> Result<(), MemError>
    where
        F: FnMut(&Leaf, u64, u64) -> Result<(), MemError>,
    {
        let _map = self.map_lock.read();
        let end = first + pages;
        let mut at = first;
        while at < end {
            let leaf_end = (at / crate::layout::PAGES_PER_LEAF + 1) * crate::layout::PAGES_PER_LEAF;
            let run_end = end.min(leaf_end);
            let leaf = if create {
                Some(self.small_leaf_or_alloc(at))
            } else {
                self.small_leaf(at)
            };
            if let Some(leaf) = leaf {
                let _ptl = leaf.lock().lock();
                f(leaf, at, run_end - at)?;
            }
            at = run_end;
        }
        Ok(())
    }

    /// Like [`VmMemory::walk_leaves`], over the pages of a guest-physical
    /// range (whole pages, across RAM ranges).
    pub(crate) fn for_each_leaf_in<F>(&self, gpa: u64, len: u64, f: F) -> Result<(), MemError>
    where
        F: FnMut(&Leaf, u64, u64) -> Result<(), MemError>,
    {
        self.walk_leaves_in(gpa, len, false, f)
    }

    /// Like [`VmMemory::for_each_leaf_in`]; `create` installs missing
    /// leaves instead of skipping them.
    pub(crate) fn walk_leaves_in<F>(
        &self,
        gpa: u64,
        len: u64,
        create: bool,
        mut f: F,
    ) -> Result<(), MemError>
    where
        F: FnMut(&Leaf, u64, u64) -> Result<(), MemError>,
    {
        for (first, off, run) in self.page_range(gpa, len)? {
            let pages = (off + run).div_ceil(PAGE_SIZE);
            self.walk_leaves(first, pages, create, &mut f)?;
        }
        Ok(())
    }

    /// Runs `f` on each page of a guest-physical range whose leaf exists,
    /// holding the map lock for reading and the page's leaf lock.
    fn for_each_page_locked<F>(&self, gpa: u64, len: u64, mut f: F) -> Result<(), MemError>
    where
        F: FnMut(&Leaf, u64) -> Result<(), MemError>,
    {
        self.for_each_leaf_in(gpa, len, |leaf, at, n| {
            (at..at + n).try_for_each(|p| f(leaf, p))
        })
    }

    // ---- VMM access to guest memory -------------------------------------

    /// Reads guest memory as the VMM: present pages through their frames,
    /// absent ones as zeros. Never changes a mapping.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let mut done = 0usize;
        for (first, off, len) in self.page_range(gpa, buf.len() as u64)? {
            let mut page = first;
            let mut off = off;
            let mut left = len as usize;
            while left > 0 {
                let n = left.min((PAGE_SIZE - off) as usize);
                let out = &mut buf[done..done + n];
                self.read_page(page, off, out)?;
                done += n;
                left -= n;
                page += 1;
                off = 0;
            }
        }
        Ok(())
    }

    fn read_page(&self, page: u64, off: u64, out: &mut [u8]) -> Result<(), MemError> {
        let mut copy = |ptr: *mut u8| {
            // SAFETY: `ptr` is the start of the page's frame, held by its
            // entry under the leaf lock for the duration; `off + len` ≤ 4K
            // (callers split at page boundaries).
            unsafe { crate::sys::read_frame(ptr.wrapping_add(off as usize), out) }
        };
        {
            let _map = self.map_lock.read();
            let Some(leaf) = self.table.leaf(page) else {
                out.fill(0);
                return Ok(());
            };
            let _ptl = leaf.lock().lock();
            match leaf.get(page) {
                Entry::Present { store, .. } => {
                    copy(self.store(store).frame_ptr(page));
                    return Ok(());
                }
                Entry::None | Entry::Marker { .. } => {
                    out.fill(0);
                    return Ok(());
                }
                // Read back from swap, or wait for the move, first.
                Entry::Swap { .. } | Entry::Migration { .. } => {}
            }
        }
        self.with_page(page, Access::Read, copy)
    }

    /// Reads guest memory without any lock, for heuristics that tolerate a
    /// stale or torn answer (decoding the instruction behind a fault, whose
    /// result is retried anyway). Absent pages read as zeros; false if a
    /// page is not RAM or not in memory.
    pub fn peek(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let Some(runs) = self.layout.split(gpa, buf.len() as u64) else {
            return false;
        };
        let mut done = 0usize;
        for (first, off, len) in runs {
            let (mut page, mut off, mut left) = (first, off, len as usize);
            while left > 0 {
                let n = left.min((PAGE_SIZE - off) as usize);
                let out = &mut buf[done..done + n];
                match self.table.get(page) {
                    Entry::Present { store, .. } => {
                        let Some(s) = self.stores.read().get(store).cloned() else {
                            return false;
                        };
                        // SAFETY: `s` is held, so its direct map stays mapped;
                        // the range lies in one frame. The frame may change
                        // under the read: callers accept a stale answer.
                        unsafe {
                            crate::sys::read_frame(
                                s.frame_ptr(page).wrapping_add(off as usize),
                                out,
                            )
                        };
                    }
                    Entry::None | Entry::Marker { .. } => out.fill(0),
                    Entry::Swap { .. } | Entry::Migration { .. } => return false,
                }
                done += n;
                left -= n;
                page += 1;
                off = 0;
            }
        }
        true
    }

    /// Writes guest memory as the VMM: each page takes a write fault first,
    /// exactly as if the guest wrote it (copy-on-write is broken for this VM
    /// only).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let mut done = 0usize;
        for (first, off, len) in self.page_range(gpa, data.len() as u64)? {
            let mut page = first;
            let mut off = off;
            let mut left = len as usize;
            while left > 0 {
                let n = left.min((PAGE_SIZE - off) as usize);
                let src = &data[done..done + n];
                self.with_page(page, Access::Write, |ptr| {
                    // SAFETY: `ptr` is the start of the page's frame, held
                    // writable and exclusive under the leaf lock for the
                    // duration of this closure; `off + n` ≤ 4K.
                    unsafe { crate::sys::write_frame(ptr.wrapping_add(off as usize), src) }
                })?;
                self.vmm_writes.note(page);
                done += n;
                left -= n;
                page += 1;
                off = 0;
            }
        }
        Ok(())
    }

    /// Makes every page of `[gpa, gpa + len)` allow `access` now (Linux's
    /// `mm_populate`), for memory the VMM needs present before the guest
    /// runs.
    pub fn populate(&self, gpa: u64, len: u64, access: Access) -> Result<(), MemError> {
        for (first, off, run) in self.page_range(gpa, len)? {
            for page in first..first + (off + run).div_ceil(PAGE_SIZE) {
                self.fault_page(page, access)?;
            }
        }
        Ok(())
    }

    /// Resolves whatever fault `access` to `page` needs, then runs `f` on
    /// the frame's direct-map address while the entry is locked in a state
    /// that allows `access`.
    pub(crate) fn with_page<R>(
        &self,
        page: u64,
        access: Access,
        f: impl FnOnce(*mut u8) -> R,
    ) -> Result<R, MemError> {
        self.under_resolved(page, access, |leaf, _| {
            let store = leaf
                .get(page)
                .present_store()
                .expect("an entry that allows an access is present");
            f(self.store(store).frame_ptr(page))
        })
    }

    /// Discards `[gpa, gpa + len)`: the VM's mappings are dropped and the next
    /// touch reads zeros. A pinned frame stays alive for its pin. Returns the
    /// number of pages that had a frame.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<u64, MemError> {
        // For a live snapshot, dropping a protected page's contents is a
        // write: the snapshot copies the page first. That is checked under
        // the locks that drop the page (a snapshot may protect it between
        // an earlier check and the drop); a leaf holding such a page is
        // left alone until the listener, which takes no lock of ours, has
        // been told, and the walk starts again (whether it must hear of a
        // page is the listener's to say: `WriteListener::must_hear`). (A
        // listener of the guest's
        // own protection is not told, as userfaultfd's is not of
        // MADV_DONTNEED: the page keeps its protection, as a marker.)
        let mut told: Vec<u64> = Vec::new();
        let mut dropped = 0;
        loop {
            let mut tell = Vec::new();
            let walked = self.for_each_leaf_in(gpa, len, |leaf, at, n| {
                if self.wp.snapshot_running() {
                    tell.extend((at..at + n).filter(|p| {
                        let e = leaf.get(*p);
                        e.wp() && e.has_contents() && self.must_tell(*p, told.contains(p))
                    }));
                    if !tell.is_empty() {
                        return Err(MemError::Busy("a live snapshot copies the pages first"));
                    }
                }
                dropped += self.discard_leaf(leaf, at, n)?;
                Ok(())
            });
            if tell.is_empty() {
                walked?;
                return Ok(dropped);
            }
            for p in tell {
                self.tell_listener(self.gpa(p));
                told.push(p);
            }
        }
    }

    /// Drops the entries of pages `[at, at + n)` of `leaf` (its lock held);
    /// returns the frames it unmapped.
    fn discard_leaf(&self, leaf: &Leaf, at: u64, n: u64) -> Result<u64, MemError> {
        let mut dropped = 0;
        self.host_unmap(at, n)?;
        for p in at..at + n {
            let e = leaf.get(p);
            if matches!(e, Entry::None | Entry::Marker { .. }) {
                continue;
            }
            // Dropping the contents is a change a reset to a snapshot
            // must undo, as the VMM's writes are.
            self.vmm_writes.note(p);
            // Protection outlives the page's contents (a marker).
            let wp = e.wp();
            leaf.set(
                p,
                if wp {
                    Entry::Marker { wp }
                } else {
                    Entry::None
                },
            );
            match e {
                // A migration entry keeps the old frame mapped; the
                // mover then finds nothing to restore here.
                Entry::Present { store, .. } | Entry::Migration { store, .. } => {
                    self.unmap_entry(store, p);
                    dropped += 1;
                }
                Entry::Swap { slot, .. } => self.ctx.swap_in_use().put(slot),
                Entry::None | Entry::Marker { .. } => {}
            }
        }
        if dropped > 0 {
            // After the entries changed (see `discard_generation`).
            self.discards.fetch_add(1, Ordering::Release);
        }
        Ok(dropped)
    }

    /// Makes the present pages of `[gpa, gpa + len)` writable again where
    /// that needs no fault, like `mprotect(PROT_READ | PROT_WRITE)`: only
    /// pages whose frame is exclusive become writable (R1); the others stay
    /// read-only and take a write fault, which copies or reuses them.
    pub fn unprotect(&self, gpa: u64, len: u64) -> Result<u64, MemError> {
        let mut changed = 0;
        self.for_each_page_locked(gpa, len, |leaf, p| {
            if let Entry::Present {
                store,
                writable: false,
                wp: false,
                ..
            } = leaf.get(p)
            {
                if self.frame_exclusive(store, p) {
                    self.host_protect(p, 1, true)?;
                    leaf.set(p, Entry::writable(store));
                    changed += 1;
                }
            }
            Ok(())
        })?;
        Ok(changed)
    }

    /// The VMs mapping the frame that the page holding `gpa` maps, as
    /// (memory id, guest-physical address), found through the store's
    /// reverse map. Empty if the page is not present.
    pub fn frame_mappers(&self, gpa: u64) -> Vec<(u64, u64)> {
        let Some(page) = self.layout.page_of(gpa) else {
            return Vec::new();
        };
        let Some(idx) = self.table.get(page).present_store() else {
            return Vec::new();
        };
        let store = self.store(idx);
        let mut out = Vec::new();
        for id in store.mappers() {
            let Some(vm) = self.ctx.vm(id) else { continue };
            if let Some(i) = vm.table.get(page).present_store() {
                if Arc::ptr_eq(&vm.store(i), &store) {
                    out.push((id, gpa));
                }
            }
        }
        out
    }

    /// Makes the present pages of `[gpa, gpa + len)` read-only, like
    /// `mprotect(PROT_READ)`: frames stay exclusive, so the next write
    /// reuses them (R11) after a fault.
    pub fn write_protect(&self, gpa: u64, len: u64) -> Result<u64, MemError> {
        let mut changed = 0;
        self.for_each_page_locked(gpa, len, |leaf, p| {
            if let Entry::Present { writable: true, .. } = leaf.get(p) {
                self.host_protect(p, 1, false)?;
                changed += u64::from(demote_entry(leaf, p));
            }
            Ok(())
        })?;
        Ok(changed)
    }
}

/// Makes a writable present entry read-only, keeping everything else (its
/// frame stays exclusive: the next write reuses it). The caller holds the
/// leaf's lock and took the host page's write access first. True if the
/// entry changed.
pub(crate) fn demote_entry(leaf: &Leaf, p: u64) -> bool {
    let Entry::Present {
        store,
        writable: true,
        wp,
        soft_dirty,
    } = leaf.get(p)
    else {
        return false;
    };
    leaf.set(
        p,
        Entry::Present {
            store,
            writable: false,
            wp,
            soft_dirty,
        },
    );
    true
}

impl Drop for VmMemory {
    fn drop(&mut self) {
        // Every frame this VM maps loses one mapping and one reference. A
        // store that no one else holds is closed right after, which frees
        // its memory at once, so its frames need no hole punching.
        self.ctx.unregister(self.id);
        self.release_shed();
        let stores = self.stores.write().take_all();
        for s in stores.iter().flatten() {
            s.remove_mapper(self.id);
        }
        let sole: Vec<bool> = stores
            .iter()
            .map(|s| s.as_ref().is_some_and(|s| Arc::strong_count(s) == 1))
            .collect();
        // Nobody else can reach the table now; the lock is for the rule
        // that entries are read under one.
        let _map = self.map_lock.write();
        for (first, leaf) in self.table.leaves() {
            if let Some(Entry::Present { store, .. }) = leaf.huge() {
                let Some(s) = &stores[store as usize] else {
                    log::error!("huge entry {first:#x} names an empty store slot");
                    continue;
                };
                s.slot(first).unmap_entire();
                s.put(first, !sole[store as usize]);
                continue;
            }
            for p in first..(first + crate::layout::PAGES_PER_LEAF).min(self.table.pages()) {
                match leaf.get(p) {
                    Entry::Present { store, .. } | Entry::Migration { store, .. } => {
                        let Some(s) = &stores[store as usize] else {
                            log::error!("page {p:#x} names an empty store slot");
                            continue;
                        };
                        if s.meta(p).unmap() == 1 {
                            self.ctx.stats.shared.fetch_sub(1, Ordering::Relaxed);
                        }
                        s.put(p, !sole[store as usize]);
                    }
                    Entry::Swap { slot, .. } => self.ctx.swap_in_use().put(slot),
                    _ => {}
                }
            }
        }
        if *self.spent.get_mut() {
            let host = self
                .host
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            crate::host_reap::release_later(host.take());
        }
    }
}
