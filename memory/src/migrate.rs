//! Page migration: moving a frame's contents to a new frame while the guest
//! runs (MEMORY-MODEL.md R5, R7, R15; Linux's `try_to_migrate_one` and
//! `remove_migration_pte`).
//!
//! 1. *Unmap*: every entry mapping the old frame becomes a migration entry
//!    that remembers how to come back:
//!    - an exclusive frame (one mapping, possibly writable or pinned) is
//!      handled under its leaf lock as R7 says: the host page loses
//!      access, the entry becomes `Write` (it was writable) or
//!      `ReadExclusive`, a fence, then the pin check: a pinned frame is
//!      restored and skipped; otherwise it loses its anon-exclusive bit;
//!    - a shared frame (never writable, never pinned: R1, R4) gets a `Read`
//!      entry in every VM that maps it, found through the store's reverse
//!      map, one VM at a time.
//!
//!    The migration entry keeps the old frame's mapping counted, so the
//!    frame stays alive and a fork can copy the entry.
//! 2. *Copy* into a fresh frame (another store, same page number), with
//!    no lock held: nothing can write the old frame now.
//! 3. *Restore*: every migration entry naming the old frame, in every VM
//!    that may hold one (a VM forked meanwhile included: fork turns
//!    `Write` and `ReadExclusive` entries into `Read` ones in both VMs,
//!    R6), becomes a present entry of the new frame: writable only from a
//!    `Write` entry (and never under write protection), the new frame
//!    exclusive unless some entry was `Read` (R15).
//!
//! An access to a page under migration waits (on the context's migration
//! condition variable) until a migration finishes, then retries.

use std::sync::Arc;
use std::time::Instant;

use crate::entry::{Entry, MigrationKind};
use crate::layout::PAGE_SIZE;
use crate::store::Store;
use crate::sync::{Ordering, fence};
use crate::table::Leaf;
use crate::vm::{MemError, VmMemory};

/// What a migration request did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrateReport {
    /// Pages moved to new frames.
    pub moved: u64,
    /// Pages skipped because a device holds a pin on their frame.
    pub pinned: u64,
}

/// What happened to one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageMove {
    Moved,
    Pinned,
    /// Nothing to move (no frame, or it is in swap or already moving).
    Skipped,
}

impl VmMemory {
    /// Moves the frames of the present pages of `[gpa, gpa + len)` to new
    /// frames now, while other vCPUs keep running (an access to a page in
    /// flight waits for it). Pinned frames are skipped and reported.
    pub fn migrate(&self, gpa: u64, len: u64) -> Result<MigrateReport, MemError> {
        let mut report = MigrateReport::default();
        for (first, off, run) in self.page_range(gpa, len)? {
            for page in first..first + (off + run).div_ceil(PAGE_SIZE) {
                match self.migrate_page(page, None)? {
                    PageMove::Moved => report.moved += 1,
                    PageMove::Pinned => report.pinned += 1,
                    PageMove::Skipped => {}
                }
            }
        }
        Ok(report)
    }

    /// Moves one page's frame; `to`: the store slot to put the new frame
    /// in first (the compactor's choice).
    pub(crate) fn migrate_page(&self, page: u64, to: Option<u32>) -> Result<PageMove, MemError> {
        self.migrate_page_with(page, to, || {})
    }

    /// Like [`VmMemory::migrate`] for the page holding `gpa`, calling
    /// `between` once its entries are migration entries and before the
    /// frame is copied (for tests of what may happen meanwhile: a fork, a
    /// discard, an access that must wait).
    #[doc(hidden)]
    pub fn migrate_page_between(
        &self,
        gpa: u64,
        between: impl FnOnce(),
    ) -> Result<MigrateReport, MemError> {
        let page = self
            .layout
            .page_of(gpa)
            .ok_or(MemError::NotRam { gpa, len: 1 })?;
        Ok(match self.migrate_page_with(page, None, between)? {
            PageMove::Moved => MigrateReport {
                moved: 1,
                pinned: 0,
            },
            PageMove::Pinned => MigrateReport {
                moved: 0,
                pinned: 1,
            },
            PageMove::Skipped => MigrateReport::default(),
        })
    }

    fn migrate_page_with(
        &self,
        page: u64,
        to: Option<u32>,
        between: impl FnOnce(),
    ) -> Result<PageMove, MemError> {
        let old = match self.unmap_for_migration(page)? {
            Ok(old) => old,
            Err(outcome) => return Ok(outcome),
        };
        between();
        let result = self.move_frame(page, &old, to);
        old.put(page, true);
        self.ctx.migration.finished();
        result.map(|()| PageMove::Moved)
    }

    /// Step 1. Returns the old frame's store, with a reference the caller
    /// drops, or why nothing is to be moved.
    fn unmap_for_migration(&self, page: u64) -> Result<Result<Arc<Store>, PageMove>, MemError> {
        let _map = self.map_lock.read();
        let Some(leaf) = self.small_leaf(page) else {
            return Ok(Err(PageMove::Skipped));
        };
        let _ptl = leaf.lock().lock();
        let Entry::Present {
            store: idx,
            writable,
            wp,
            ..
        } = leaf.get(page)
        else {
            return Ok(Err(PageMove::Skipped));
        };
        let store = self.store(idx);
        let meta = store.meta(page);
        if !meta.exclusive() {
            meta.get();
            drop((_ptl, _map));
            for id in store.mappers() {
                if let Some(vm) = self.ctx.vm(id) {
                    vm.mark_shared_migrating(page, &store)?;
                }
            }
            return Ok(Ok(store));
        }
        if meta.maybe_pinned() {
            return Ok(Err(PageMove::Pinned));
        }
        let old = leaf.get(page);
        self.host_unmap(page, 1)?;
        let kind = if writable {
            MigrationKind::Write
        } else {
            MigrationKind::ReadExclusive
        };
        leaf.set(
            page,
            Entry::Migration {
                store: idx,
                kind,
                wp,
            },
        );
        fence(Ordering::SeqCst);
        if meta.maybe_pinned() {
            self.host_map(page, 1, &store, writable)?;
            leaf.set(page, old);
            return Ok(Err(PageMove::Pinned));
        }
        meta.clear_exclusive();
        meta.get();
        Ok(Ok(store))
    }

    /// Step 1 for one VM's mapping of a shared frame.
    fn mark_shared_migrating(&self, page: u64, store: &Arc<Store>) -> Result<(), MemError> {
        self.with_leaf_locked(page, |leaf| {
            let Entry::Present { store: idx, wp, .. } = leaf.get(page) else {
                return Ok(());
            };
            if !Arc::ptr_eq(&self.store(idx), store) {
                return Ok(());
            }
            self.host_unmap(page, 1)?;
            leaf.set(
                page,
                Entry::Migration {
                    store: idx,
                    kind: MigrationKind::Read,
                    wp,
                },
            );
            Ok(())
        })
    }

    /// Steps 2 and 3.
    fn move_frame(&self, page: u64, old: &Arc<Store>, to: Option<u32>) -> Result<(), MemError> {
        let idx = self.alloc_frame(page, to)?;
        let new = self.store(idx);
        if let Err(e) = crate::fork::copy_frame(&new, old, page) {
            // Put everything back on the old frame rather than lose it.
            self.unclaim(idx, page);
            self.restore_all(page, old, old)?;
            return Err(e);
        }
        let restored = self.restore_all(page, old, &new);
        // The claim was only to hold the frame while it was filled.
        self.unclaim(idx, page);
        restored?;
        self.ctx.stats.migrated.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Step 3 in every VM that may name the old frame, until no new one
    /// shows up: a VM forked from one not yet restored holds a copy of its
    /// migration entry, and is already listed as a mapper of the old store
    /// by the time its parent is restored.
    fn restore_all(&self, page: u64, old: &Arc<Store>, new: &Arc<Store>) -> Result<(), MemError> {
        let mut done: Vec<u64> = Vec::new();
        loop {
            let pending: Vec<u64> = old
                .mappers()
                .into_iter()
                .filter(|id| !done.contains(id))
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            for id in pending {
                done.push(id);
                if let Some(vm) = self.ctx.vm(id) {
                    vm.restore_migration(page, old, new)?;
                }
            }
        }
    }

    /// Step 3 for one VM: its migration entry for the old frame at `page`,
    /// if it has one, becomes a present entry of `new` (which may be the
    /// old frame itself, when the copy failed).
    fn restore_migration(
        &self,
        page: u64,
        old: &Arc<Store>,
        new: &Arc<Store>,
    ) -> Result<(), MemError> {
        self.with_leaf_locked(page, |leaf| {
            let Entry::Migration {
                store: old_idx,
                kind,
                wp,
            } = leaf.get(page)
            else {
                return Ok(());
            };
            if !Arc::ptr_eq(&self.store(old_idx), old) {
                return Ok(());
            }
            // R15, before any lockless pinner can see the entry: exclusive
            // unless restored from a plain read entry (then the frame may be
            // shared, and all its entries are read ones).
            let meta = new.meta(page);
            if kind == MigrationKind::Read {
                meta.clear_exclusive();
            } else {
                meta.set_exclusive();
            }
            let writable = kind == MigrationKind::Write && !wp;
            let new_idx = self.hold_slot_of(new);
            if let Err(e) = self.host_map(page, 1, new, writable) {
                self.slot_release(new_idx);
                return Err(e);
            }
            meta.get();
            self.frame_map(new, page);
            leaf.set(
                page,
                Entry::Present {
                    store: new_idx,
                    writable,
                    wp,
                    soft_dirty: true,
                },
            );
            self.unmap_entry(old_idx, page);
            Ok(())
        })
    }

    /// Runs `f` under the map lock (read) and the leaf lock of `page`, if
    /// its leaf exists.
    pub(crate) fn with_leaf_locked<R: Default>(
        &self,
        page: u64,
        f: impl FnOnce(&Leaf) -> Result<R, MemError>,
    ) -> Result<R, MemError> {
        let _map = self.map_lock.read();
        let Some(leaf) = self.small_leaf(page) else {
            return Ok(R::default());
        };
        let _ptl = leaf.lock().lock();
        f(leaf)
    }

    /// Waits until some migration finishes, if one may still be under way
    /// since `seen` (a value of [`Migrations::seen`] read while the
    /// caller saw a migration entry under its leaf lock).
    pub(crate) fn wait_for_migration(&self, seen: u64) {
        let start = Instant::now();
        self.ctx.migration.wait(seen);
        let waited = start.elapsed().as_nanos() as u64;
        self.ctx
            .stats
            .migration_wait_max_ns
            .fetch_max(waited, Ordering::Relaxed);
    }
}

/// Where accesses to pages under migration wait.
#[derive(Debug)]
pub(crate) struct Migrations {
    finished: crate::sync::AtomicU64,
    lock: crate::sync::Mutex<()>,
    cond: crate::sync::Condvar,
}

impl Migrations {
    pub(crate) fn new() -> Self {
        Self {
            finished: crate::sync::AtomicU64::new(0),
            lock: crate::sync::Mutex::new(()),
            cond: crate::sync::Condvar::new(),
        }
    }

    /// Migrations finished so far.
    pub(crate) fn seen(&self) -> u64 {
        self.finished.load(Ordering::SeqCst)
    }

    /// Counts a finished migration and wakes the waiters.
    fn finished(&self) {
        self.finished.fetch_add(1, Ordering::SeqCst);
        let _g = crate::sync::lock(&self.lock);
        self.cond.notify_all();
    }

    /// Waits until a migration finishes after `seen`.
    fn wait(&self, seen: u64) {
        let mut g = crate::sync::lock(&self.lock);
        while self.finished.load(Ordering::SeqCst) == seen {
            g = crate::sync::wait(&self.cond, g);
        }
    }
}

// ---- compaction --------------------------------------------------------

impl VmMemory {
    /// Moves up to `budget` frames that sit outside this VM's home store
    /// into it, where the home store's frame for their page is free, so
    /// that runs of pages merge back into one host mapping (copy-on-write
    /// copies land in other stores while a clone shares the original).
    /// Pinned, unevictable and shared pages stay. Returns how many moved.
    pub fn compact(&self, budget: u64) -> Result<u64, MemError> {
        let mut moved = 0;
        for page in self.compaction_candidates(budget) {
            if self.migrate_page(page, Some(self.home.load(Ordering::Relaxed)))? == PageMove::Moved
            {
                moved += 1;
                // A frame that was shared comes back read-only; if this VM
                // is its only user now, it may be writable again, as a
                // write fault would make it (R11's reuse), so that it
                // merges with its writable neighbours.
                self.with_leaf_locked(page, |leaf| self.reuse_if_sole(leaf, page))?;
            }
        }
        Ok(moved)
    }

    /// Up to `budget` pages whose frame is outside the home store while the
    /// home store's frame for that page is free.
    fn compaction_candidates(&self, budget: u64) -> Vec<u64> {
        let home_idx = self.home.load(Ordering::Relaxed);
        let Some(home) = self.stores.read().get(home_idx).cloned() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (first, leaf) in self.table.leaves() {
            // A huge frame is in one piece already.
            if leaf.huge().is_some() {
                continue;
            }
            let end = (first + crate::layout::PAGES_PER_LEAF).min(self.table.pages());
            for page in first..end {
                if out.len() as u64 >= budget {
                    return out;
                }
                let Entry::Present { store, .. } = leaf.peek(page) else {
                    continue;
                };
                if store == home_idx || self.is_unevictable(page) {
                    continue;
                }
                // Only frames this VM maps alone: two VMs with different
                // home stores would pull a shared frame back and forth.
                let sole = self
                    .stores
                    .read()
                    .get(store)
                    .is_some_and(|s| s.meta(page).mapcount() == 1);
                if home.meta(page).refcount() == 0 && sole {
                    out.push(page);
                }
            }
        }
        out
    }
}

impl crate::Context {
    /// Compacts every live VM, up to `budget` pages each (see
    /// [`VmMemory::compact`]); returns the pages moved.
    pub fn compact_all(&self, budget: u64) -> u64 {
        let mut moved = 0;
        for vm in self.live_vms() {
            match vm.compact(budget) {
                Ok(n) => moved += n,
                Err(e) => log::warn!("compacting VM {}: {e}", vm.id()),
            }
        }
        moved
    }
}

/// A background thread compacting every VM of a context now and then.
/// Dropping it stops the thread.
#[derive(Debug)]
pub struct Compactor {
    _worker: crate::periodic::Periodic,
}

impl Compactor {
    /// Starts compacting `ctx`'s VMs every `interval`, up to `budget`
    /// pages per VM each time.
    pub fn start(
        ctx: &Arc<crate::Context>,
        interval: std::time::Duration,
        budget: u64,
    ) -> std::io::Result<Self> {
        crate::periodic::Periodic::start("compactor", ctx, interval, move |ctx| {
            ctx.compact_all(budget);
        })
        .map(|w| Self { _worker: w })
    }
}
