//! VM fork: the child gets the parent's memory copy-on-write (R6, Linux's
//! `copy_present_ptes` and `__folio_try_dup_anon_rmap`).
//!
//! Everything happens under the parent's memory-map lock (write) with its
//! write-protect sequence count held odd, in two phases:
//!
//! 1. *Protect* (the caller keeps the parent's vCPUs paused): the parent's
//!    entries are scanned; every writable page that will be shared loses
//!    write access in the host mapping (one `mprotect` per run of such
//!    pages, across leaves), and every frame that may be pinned is copied
//!    for the child now, so the copy is the state at this instant. Frame
//!    metadata is read only in leaves whose pin hint is set.
//! 2. *Copy* (the parent's vCPUs may run again: a write to a page that will
//!    be shared faults, and its resolution waits for the memory-map lock):
//!    under each leaf's lock and the child's, the parent's entries become
//!    read-only and lose nothing else, the child's entries are filled, frame
//!    counts and the anon-exclusive bits are updated, and the child's host
//!    mapping is built.
//!
//! Decisions: a frame that may be pinned is **copied** for the child (the
//! parent keeps its pinned original, writable and exclusive, so a device
//! keeps seeing what the parent's guest sees); every other frame loses its
//! anon-exclusive bit and is mapped read-only in both VMs. A swap entry is
//! copied, naming the same slot, and both copies lose their exclusive bit.
//! A migration entry is copied too (it keeps the old frame mapped), and
//! both copies become plain read entries.
//! Write-protect markers and bits are not inherited: a child starts
//! without a listener.
//!
//! Against the lockless pin path (R8) the ordering is Dekker's: fork makes
//! the sequence count odd, fences, then reads pin hints and pin counts; a
//! pinner raises the hint and the pin count, fences, then re-reads the
//! sequence count. Either fork sees the pin (and copies) or the pinner sees
//! the count move (and backs off to the locked path, which waits for fork).
//!
//! A huge entry (see `huge.rs`) forks as one: shared read-only in both
//! with its frame's head losing the anon-exclusive bit, or, when its frame
//! may be pinned, copied whole (a new 2 MiB frame) for the child. Copying
//! whole keeps the child huge and the parent untouched; splitting and
//! copying only the pinned pages would save memory but leave both VMs
//! with 512 small entries to fault through.
//!
//! Cost: one visit per installed leaf and per present entry; absent memory
//! costs nothing, so fork scales with mapped pages, not RAM size.
//!
//! On the host, taking write access from a page that the host maps costs
//! per page table entry (`mprotect` changes each one, and KVM drops its own
//! mapping of each through its MMU notifier): measured here, 150-200 ns a
//! page, more than a whole Linux `fork()` spends per page. So before write
//! access is taken ahead of a fork, runs of fully written leaves *shed*
//! their host entries: `mremap(MREMAP_DONTUNMAP)` moves them out whole page
//! tables at a time (about 1 ns a page, plus KVM's per-page drop), leaving
//! the host mapping's areas in place, empty, with the same backing and
//! protection; `mprotect` then only changes the areas. The moved entries
//! are torn down by the reaper thread (`host_reap.rs`) once the fork is
//! done, off the fork's path. The guest refaults a shed page from the same
//! frame on its next access (KVM had dropped its mapping anyway).
//!
//! The trade, measured here at 1 GiB: the fork's path loses the 45-50 ms
//! of `mprotect`; KVM's own drop stays (about 60 ns a page, 15-20 ms,
//! more while the guest runs than while it is paused); tearing the moved
//! entries down costs the reaper about 60 ms of CPU alone, and up to
//! 200 ms when it overlaps other heavy memory work (another VM filling
//! its RAM). Latency is bought with some CPU after the fork.
//!
//! Taking write access from a shed run is one `mprotect` for the whole
//! run, under the memory-map lock held for writing, which (like phase 1
//! below) relies on every path that changes or resolves an entry taking
//! that lock.
//!
//! *Moving the parent* ([`VmMemory::fork_rehosted`]) takes KVM's drop off
//! the path too, for a caller that can throw the parent's KVM mappings
//! away whole (a new KVM VM over new host ranges, made ahead; the old one
//! torn down later, elsewhere). Phase 1 then changes no host page: it
//! plans as usual, hands the parent's host mapping to a spare's memory in
//! exchange for the spare's empty one, and maps every present page there
//! as it will be after the fork, in runs (a written leaf is one `mmap`):
//! what will be shared read-only, the rest as it was. The old mapping,
//! still writable, must be unreachable from then on: the spare that holds
//! it is spent (refused as a spare again) and its drop, with the old KVM
//! VM, hands the mapping to the reaper (`host_reap.rs`). Measured here at
//! 1 GiB: 0.5-0.7x Linux's `fork()`, the guest paused 1-1.4 ms (the walk
//! that maps).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::entry::{Entry, MigrationKind};
use crate::layout::PAGES_PER_LEAF;
use crate::lock::Rank;
use crate::store::Store;
use crate::sync::{Ordering, fence};
use crate::table::Leaf;
use crate::vm::{MemError, VmMemory};

/// How long the steps of a VM's last fork took: diagnostics, for the
/// benchmark's breakdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForkPhases {
    /// Shedding host page table entries ahead, a part of `demote`.
    pub shed: Duration,
    /// Taking write access ahead while the guest ran
    /// ([`VmMemory::demote_writable`]), shedding included.
    pub demote: Duration,
    /// Phase 1, the guest paused: protecting what was written since and
    /// copying what may be pinned.
    pub protect: Duration,
    /// Phase 2, the guest running again: copying the tables and building
    /// the child's host mapping.
    pub copy: Duration,
}

/// Extends `run` (first page, pages) by the leaf at `first` if `member`
/// and it follows on; returns the run this leaf ends, if any.
fn grow_run(run: &mut Option<(u64, u64)>, first: u64, member: bool) -> Option<(u64, u64)> {
    match run {
        Some((start, n)) if member && *start + *n == first => {
            *n += PAGES_PER_LEAF;
            None
        }
        _ => std::mem::replace(run, member.then_some((first, PAGES_PER_LEAF))),
    }
}

/// What phase 1 did to one leaf, for phase 2.
struct LeafPlan {
    first: u64,
    /// Pages whose host mapping phase 1 made read-only (bit per page).
    demoted: [u64; (PAGES_PER_LEAF as usize).div_ceil(64)],
    /// Frames copied for the child: (page, child's slot, writable).
    copies: Vec<(u64, u32, bool)>,
    /// A huge frame copied whole for the child: (child's slot, writable).
    huge_copy: Option<(u32, bool)>,
}

impl LeafPlan {
    fn demoted(&self, page: u64) -> bool {
        let i = (page - self.first) as usize;
        self.demoted[i / 64] & (1 << (i % 64)) != 0
    }

    fn set_demoted(&mut self, page: u64) {
        let i = (page - self.first) as usize;
        self.demoted[i / 64] |= 1 << (i % 64);
    }
}

/// A run of consecutive pages to write-protect.
#[derive(Default)]
pub(crate) struct Runs {
    start: u64,
    len: u64,
    /// Only gather the runs: a fork that rehosts the VM maps its pages
    /// read-only in the new host mapping instead.
    gather_only: bool,
}

impl Runs {
    pub(crate) fn add(&mut self, vm: &VmMemory, page: u64) -> Result<(), MemError> {
        if self.len > 0 && self.start + self.len == page {
            self.len += 1;
            return Ok(());
        }
        self.flush(vm)?;
        self.start = page;
        self.len = 1;
        Ok(())
    }

    pub(crate) fn flush(&mut self, vm: &VmMemory) -> Result<(), MemError> {
        if self.len > 0 {
            if !self.gather_only {
                vm.host_protect(self.start, self.len, false)?;
            }
            self.len = 0;
        }
        Ok(())
    }
}

impl VmMemory {
    /// Takes write access from every writable page, while the vCPUs still
    /// run: the host mapping first (a run of pages per leaf, one `mprotect`
    /// each), then the entries, which stay exclusive, so a write meanwhile
    /// reuses its frame after a fault (R11). A fork or a live snapshot that
    /// follows finds only the pages written since, and pauses the guest
    /// for those alone: taking write access from pages KVM maps is the
    /// dominant cost of both on hosts like this one. Runs of fully written
    /// leaves first shed their host page table entries (see
    /// [`VmMemory::shed_dense_host_entries`]), so that `mprotect` has no
    /// entry to change there, and then lose write access a whole run at a
    /// time ([`VmMemory::demote_runs_whole`]). Returns the pages changed.
    pub fn demote_writable(&self) -> Result<u64, MemError> {
        let start = Instant::now();
        // What an earlier demotion shed and no fork released goes first.
        self.release_shed();
        let dense = self.shed_dense_host_entries();
        let shed = start.elapsed();
        let mut changed = self.demote_runs_whole(&dense)?;
        {
            let _map = self.map_lock.read();
            for (first, leaf) in self.table.leaves() {
                let _ptl = leaf.lock().lock();
                if leaf.huge().is_some() {
                    changed += self.demote_huge(leaf, first)?;
                    continue;
                }
                let mut runs = Runs::default();
                let mut pages = Vec::new();
                let end = (first + PAGES_PER_LEAF).min(self.table.pages());
                for p in first..end {
                    if let Entry::Present { writable: true, .. } = leaf.get(p) {
                        runs.add(self, p)?;
                        pages.push(p);
                    }
                }
                runs.flush(self)?;
                for p in pages {
                    changed += u64::from(crate::vm::demote_entry(leaf, p));
                }
            }
        }
        self.note_phases(|t| {
            t.shed = shed;
            t.demote = start.elapsed();
        });
        Ok(changed)
    }

    /// Empties the host mapping of every run of leaves whose pages are all
    /// present, writable and of one store (one host mapping each, as a
    /// guest that wrote its memory leaves it): their page table entries
    /// move out whole and are torn down on the reaper thread, so that
    /// taking write access from those pages afterwards finds no entries to
    /// change one by one. Nothing else changes: every page keeps its
    /// backing and protection, and an access refaults it from the same
    /// frame. Best effort: the entries are read without the leaf locks (a
    /// page that changes meanwhile only makes the run cost more or less),
    /// and a host that cannot move them leaves them where they are.
    /// Returns the runs shed, as (first page, pages).
    fn shed_dense_host_entries(&self) -> Vec<(u64, u64)> {
        let _map = self.map_lock.read();
        let pages = self.table.pages();
        let mut run: Option<(u64, u64)> = None;
        let mut done = Vec::new();
        // Runs of writable huge entries: the host maps each with one entry
        // (a 2 MiB page), so there is nothing to shed, only a run to
        // take write access from at once.
        let mut huge_run: Option<(u64, u64)> = None;
        let mut huge_runs = Vec::new();
        let mut shed = |(first, n): (u64, u64)| match self.host_move_entries_out(first, n) {
            Ok(moved) => {
                self.shed_list().push(moved);
                done.push((first, n));
            }
            Err(e) => log::debug!("host entries of pages {first:#x}+{n} stay: {e}"),
        };
        for (first, leaf) in self.table.leaves() {
            let huge = matches!(leaf.huge(), Some(Entry::Present { writable: true, .. }));
            huge_runs.extend(grow_run(&mut huge_run, first, huge));
            let dense = !huge && first + PAGES_PER_LEAF <= pages && {
                let one = match leaf.get(first) {
                    Entry::Present {
                        store,
                        writable: true,
                        ..
                    } => Some(store),
                    _ => None,
                };
                one.is_some()
                    && (first..first + PAGES_PER_LEAF).all(|p| match leaf.get(p) {
                        Entry::Present {
                            store,
                            writable: true,
                            ..
                        } => Some(store) == one,
                        _ => false,
                    })
            };
            if let Some(ended) = grow_run(&mut run, first, dense) {
                shed(ended);
            }
        }
        if let Some(last) = run {
            shed(last);
        }
        huge_runs.extend(huge_run);
        done.extend(huge_runs);
        done
    }

    /// Takes write access from whole runs of leaves at once: one
    /// `mprotect` a run instead of one a leaf (each splits and merges the
    /// host's areas), then the entries, leaf by leaf. With the memory-map
    /// lock held for writing no entry can change and no fault can look at
    /// one (every path that changes or resolves an entry takes that lock),
    /// so no one sees the pages read-only on the host while their entries
    /// are still writable. A run with a page that is not present any more
    /// is left to the leaf-by-leaf pass: its host page must stay
    /// inaccessible. Returns the entries changed.
    fn demote_runs_whole(&self, runs: &[(u64, u64)]) -> Result<u64, MemError> {
        if runs.is_empty() {
            return Ok(0);
        }
        let _map = self.map_lock.write();
        let mut changed = 0;
        for &(first, n) in runs {
            let present = (first..first + n)
                .step_by(PAGES_PER_LEAF as usize)
                .all(|at| {
                    self.table.leaf(at).is_some_and(|leaf| {
                        leaf.huge().is_some()
                            || (at..at + PAGES_PER_LEAF)
                                .all(|p| matches!(leaf.get(p), Entry::Present { .. }))
                    })
                });
            if !present {
                continue;
            }
            self.host_protect(first, n, false)?;
            for at in (first..first + n).step_by(PAGES_PER_LEAF as usize) {
                let leaf = self.table.leaf(at).expect("a shed leaf exists");
                let _ptl = leaf.lock().lock();
                if let Some(Entry::Present {
                    store,
                    writable: true,
                    soft_dirty,
                    ..
                }) = leaf.huge()
                {
                    leaf.set_huge(at, Entry::read_only(store, soft_dirty));
                    changed += PAGES_PER_LEAF;
                    continue;
                }
                for p in at..at + PAGES_PER_LEAF {
                    changed += u64::from(crate::vm::demote_entry(leaf, p));
                }
            }
        }
        Ok(changed)
    }

    /// Makes the huge entry of `leaf` read-only, host page first; the
    /// caller holds the leaf's lock. Returns the pages changed.
    fn demote_huge(&self, leaf: &Leaf, first: u64) -> Result<u64, MemError> {
        let Some(Entry::Present {
            store,
            writable: true,
            soft_dirty,
            ..
        }) = leaf.huge()
        else {
            return Ok(0);
        };
        self.host_protect(first, PAGES_PER_LEAF, false)?;
        leaf.set_huge(first, Entry::read_only(store, soft_dirty));
        Ok(PAGES_PER_LEAF)
    }

    /// Hands the host page table entries shed so far to the reaper. Fork
    /// does so once it is done, so that tearing them down does not compete
    /// with it for the host's mapping lock or a CPU.
    pub(crate) fn release_shed(&self) {
        let shed = std::mem::take(&mut *self.shed_list());
        for moved in shed {
            crate::host_reap::release_later(moved);
        }
    }

    fn shed_list(&self) -> std::sync::MutexGuard<'_, Vec<crate::sys::Mapping>> {
        self.shed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long the steps of this VM's last fork took (the demotion ahead
    /// is the last one, whether a fork followed it or not).
    pub fn last_fork_phases(&self) -> ForkPhases {
        *self
            .phases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn note_phases(&self, f: impl FnOnce(&mut ForkPhases)) {
        f(&mut self
            .phases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    /// Forks this VM's memory: returns the child's, sharing every frame
    /// copy-on-write except those that may be pinned. The caller keeps the
    /// VM's vCPUs from running for the duration, so the child is a
    /// snapshot of one instant.
    pub fn fork(self: &Arc<Self>) -> Result<Arc<VmMemory>, MemError> {
        self.fork_with(|_| {})
    }

    /// Like [`VmMemory::fork`], but calls `protected` with the child's
    /// memory as soon as the snapshot is taken: every page the child will
    /// share is then write-protected in the parent and every pinned frame
    /// copied, so the caller may let the VM's vCPUs run again (a guest write
    /// to a shared page faults and waits for the fork) and prepare the
    /// child (its host ranges are final) while the tables are copied.
    pub fn fork_with(
        self: &Arc<Self>,
        protected: impl FnOnce(&Arc<VmMemory>),
    ) -> Result<Arc<VmMemory>, MemError> {
        let child = VmMemory::with_limit(&self.ctx, self.layout.clone(), self.limit.inherit())?;
        self.fork_locked(child, None, |child, _| protected(child))
    }

    /// Like [`VmMemory::fork_with`], into `spare`: memory made by
    /// [`VmMemory::new`] with this VM's context and layout, which nothing
    /// has used since. Made ahead, together with whatever will run it (a
    /// KVM VM whose memory slots point at its host ranges, which do not
    /// move), it takes that setup out of the fork. It inherits this VM's
    /// resident limit as it is now.
    pub fn fork_into(
        self: &Arc<Self>,
        spare: Arc<VmMemory>,
        protected: impl FnOnce(&Arc<VmMemory>),
    ) -> Result<Arc<VmMemory>, MemError> {
        let spare = self.fitting_spare(spare)?;
        self.fork_locked(spare, None, |child, _| protected(child))
    }

    /// Like [`VmMemory::fork_into`] (or [`VmMemory::fork_with`] without
    /// `spare`), moving this VM to the host mapping of `host` on the way:
    /// memory made like a spare, which is spent afterwards: it holds this
    /// VM's old mapping, is refused as a spare, and should be dropped
    /// (off any path that waits: its drop hands the mapping to the reaper).
    ///
    /// Taking write access from pages the host maps costs per page (the
    /// host's entries and KVM's own, dropped through its MMU notifier):
    /// more than a whole Linux `fork()` spends per page. A VM whose KVM
    /// mappings can be thrown away whole (a new KVM VM over `host`'s host
    /// ranges, the old one dropped off the fork's path) skips all of it:
    /// this VM's entries are mapped afresh in `host`'s mapping, what will
    /// be shared read-only and the rest as it was, and the old mapping,
    /// still writable, goes to the reaper when `host` is dropped (see
    /// `host_reap.rs`). Nothing may access the old mapping afterwards: the
    /// caller must stop the old KVM VM's vCPUs for good before `protected`
    /// returns.
    ///
    /// `protected` learns whether the move happened: it did unless the
    /// snapshot failed, and then the VM keeps its host mapping.
    pub fn fork_rehosted(
        self: &Arc<Self>,
        spare: Option<Arc<VmMemory>>,
        host: &Arc<VmMemory>,
        protected: impl FnOnce(&Arc<VmMemory>, bool),
    ) -> Result<Arc<VmMemory>, MemError> {
        let host = self.fitting_spare(host.clone())?;
        let child = match spare {
            Some(spare) => self.fitting_spare(spare)?,
            None => VmMemory::with_limit(&self.ctx, self.layout.clone(), self.limit.inherit())?,
        };
        self.fork_locked(child, Some(&host), protected)
    }

    /// `spare` if it is memory made by [`VmMemory::new`] with this VM's
    /// context and layout that nothing has used since, ready for this VM's
    /// resident limit.
    fn fitting_spare(&self, spare: Arc<VmMemory>) -> Result<Arc<VmMemory>, MemError> {
        let fits = Arc::ptr_eq(&spare.ctx, &self.ctx)
            && spare.layout == self.layout
            && !spare.is_spent()
            && spare.table.leaves().next().is_none()
            && spare.stores.read().stores().next().is_none();
        if !fits {
            return Err(MemError::SpareUnfit);
        }
        spare.limit.copy_from(&self.limit);
        Ok(spare)
    }

    /// The fork itself, into the empty `child`, moving this VM to the host
    /// mapping of `rehost` if given.
    fn fork_locked(
        self: &Arc<Self>,
        child: Arc<VmMemory>,
        rehost: Option<&VmMemory>,
        protected: impl FnOnce(&Arc<VmMemory>, bool),
    ) -> Result<Arc<VmMemory>, MemError> {
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
        let start = Instant::now();
        let (plans, rehosted) = match rehost {
            None => (self.protect_for_fork(&child, None), false),
            Some(host) => match self.rehost_for_fork(&child, host) {
                Ok(plans) => (Ok(plans), true),
                Err(e) => (Err(e), false),
            },
        };
        let protect = start.elapsed();
        protected(&child, rehosted);
        let start = Instant::now();
        let result = plans.and_then(|plans| {
            let mut child_runs = MapRuns::default();
            for plan in &plans {
                let leaf = self.table.leaf(plan.first).expect("planned leaves exist");
                self.copy_leaf(&child, leaf, plan, &mut child_runs)?;
            }
            child_runs.flush(&child)
        });
        self.wp_seq.fetch_add(1, Ordering::SeqCst);
        let copy = start.elapsed();
        self.note_phases(|t| {
            t.protect = protect;
            t.copy = copy;
        });
        if let Some(spare) = rehost.filter(|_| rehosted) {
            spare.mark_spent();
            self.note_move();
        }
        result?;
        drop(_child_map);
        child.drop_unused_slots();
        drop(_parent_map);
        // (After a failed fork they go with the next one, or the VM.)
        self.release_shed();
        Ok(child)
    }

    /// Phase 1 of a fork that moves this VM to the host mapping of `host`:
    /// plans like [`VmMemory::protect_for_fork`] without touching the old
    /// host mapping, and maps every present page in the new one as it will
    /// be after the fork (read-only if it will be shared), a leaf at a time
    /// right after planning it. On failure the VM keeps its host mapping,
    /// untouched.
    fn rehost_for_fork(
        &self,
        child: &VmMemory,
        host: &VmMemory,
    ) -> Result<Vec<LeafPlan>, MemError> {
        self.swap_host(host);
        let mut runs = MapRuns::default();
        let planned = self
            .protect_for_fork(child, Some(&mut runs))
            .and_then(|plans| runs.flush(self).map(|()| plans));
        if planned.is_err() {
            self.swap_host(host);
        }
        planned
    }

    /// Adds the pages of `leaf`, as `plan` leaves them, to `runs`: runs of
    /// one store and protection, to map in a host mapping that maps nothing
    /// there yet.
    fn map_as_after_fork(
        &self,
        leaf: &Leaf,
        plan: &LeafPlan,
        runs: &mut MapRuns,
    ) -> Result<(), MemError> {
        if let Some(Entry::Present {
            store, writable, ..
        }) = leaf.huge()
        {
            let keep = writable && !plan.demoted(plan.first);
            return runs.add_many(self, plan.first, PAGES_PER_LEAF, store, keep);
        }
        // Runs within the leaf first (a written leaf is one), read from the
        // packed entries: this walk is most of the guest's pause. (Handing
        // each page to `MapRuns::add` instead made this step 10-15%
        // slower at 1 GiB.)
        let end = (plan.first + PAGES_PER_LEAF).min(self.table.pages());
        let mut run: Option<(u64, u64, u32, bool)> = None;
        for (p, raw) in (plan.first..end).zip(leaf.raw_entries()) {
            let here = Entry::raw_present(raw)
                .map(|(store, writable)| (store, writable && !plan.demoted(p)));
            match (&mut run, here) {
                (Some((_, n, s, w)), Some(h)) if (*s, *w) == h => *n += 1,
                (_, here) => {
                    if let Some((first, n, s, w)) = run.take() {
                        runs.add_many(self, first, n, s, w)?;
                    }
                    run = here.map(|(s, w)| (p, 1, s, w));
                }
            }
        }
        match run {
            Some((first, n, s, w)) => runs.add_many(self, first, n, s, w),
            None => Ok(()),
        }
    }

    /// Phase 1: write-protect what will be shared, copy what may be pinned.
    /// A fork that moves the VM (`moving`) only plans the protection and
    /// maps each leaf, planned, into `moving`'s runs.
    fn protect_for_fork(
        &self,
        child: &VmMemory,
        mut moving: Option<&mut MapRuns>,
    ) -> Result<Vec<LeafPlan>, MemError> {
        let mut plans = Vec::new();
        let mut runs = Runs {
            gather_only: moving.is_some(),
            ..Runs::default()
        };
        let stores = self.stores.read().share();
        for (first, leaf) in self.table.leaves() {
            let plan = match moving.as_deref_mut() {
                Some(map) if leaf.huge().is_none() && !leaf.maybe_pinned() => {
                    self.plan_and_map_plain(first, leaf, map)?
                }
                Some(map) => {
                    let plan = self.plan_leaf(child, &stores, first, leaf, &mut runs)?;
                    self.map_as_after_fork(leaf, &plan, map)?;
                    plan
                }
                None => self.plan_leaf(child, &stores, first, leaf, &mut runs)?,
            };
            plans.push(plan);
        }
        runs.flush(self)?;
        Ok(plans)
    }

    /// For a fork that moves the VM, phase 1 of a leaf with no huge entry
    /// and no pin: every writable page is to be protected and nothing
    /// copied, so every present page maps read-only after the fork. One
    /// pass over the packed entries plans and maps (this walk is most of
    /// the guest's pause).
    fn plan_and_map_plain(
        &self,
        first: u64,
        leaf: &Leaf,
        map: &mut MapRuns,
    ) -> Result<LeafPlan, MemError> {
        let mut plan = LeafPlan {
            first,
            demoted: [0; (PAGES_PER_LEAF as usize).div_ceil(64)],
            copies: Vec::new(),
            huge_copy: None,
        };
        // The current run: (first index, length, store).
        let mut run: Option<(u64, u64, u32)> = None;
        for (i, raw) in (0..PAGES_PER_LEAF).zip(leaf.raw_entries()) {
            if Entry::raw_is_writable(raw) {
                plan.demoted[(i / 64) as usize] |= 1 << (i % 64);
            }
            let here = Entry::raw_present(raw).map(|(store, _)| store);
            match (&mut run, here) {
                (Some((_, n, s)), Some(h)) if *s == h => *n += 1,
                (_, here) => {
                    if let Some((at, n, s)) = run.take() {
                        map.add_many(self, first + at, n, s, false)?;
                    }
                    run = here.map(|s| (i, 1, s));
                }
            }
        }
        if let Some((at, n, s)) = run {
            map.add_many(self, first + at, n, s, false)?;
        }
        Ok(plan)
    }

    /// Phase 1 for the leaf at `first`.
    fn plan_leaf(
        &self,
        child: &VmMemory,
        stores: &crate::slots::StoreList,
        first: u64,
        leaf: &Leaf,
        runs: &mut Runs,
    ) -> Result<LeafPlan, MemError> {
        let end = (first + PAGES_PER_LEAF).min(self.table.pages());
        let pinned_leaf = leaf.maybe_pinned();
        let mut plan = LeafPlan {
            first,
            demoted: [0; (PAGES_PER_LEAF as usize).div_ceil(64)],
            copies: Vec::new(),
            huge_copy: None,
        };
        if let Some(huge) = leaf.huge() {
            self.protect_huge_for_fork(child, stores, first, huge, &mut plan, runs)?;
            return Ok(plan);
        }
        // After a demotion ahead most leaves have nothing writable and no
        // pin: one pass over the packed entries tells (the guest is paused
        // for this step).
        if !pinned_leaf && !leaf.raw_entries().any(Entry::raw_is_writable) {
            return Ok(plan);
        }
        for p in first..end {
            // Entries cannot change: every writer of them takes the
            // memory-map lock, which fork holds for writing.
            let Entry::Present {
                store, writable, ..
            } = leaf.get(p)
            else {
                continue;
            };
            let pinned = pinned_leaf && {
                let meta = stores
                    .get(store)
                    .expect("an entry names a filled slot")
                    .meta(p);
                meta.exclusive() && meta.maybe_pinned()
            };
            if pinned {
                runs.flush(self)?;
                let src = stores.get(store).expect("an entry names a filled slot");
                let idx = child.alloc_frame(p, plan.copies.last().map(|c| c.1))?;
                let new = child.store(idx);
                if let Err(e) = copy_frame(&new, src, p) {
                    child.unclaim(idx, p);
                    return Err(e);
                }
                child.frame_map(&new, p);
                plan.copies.push((p, idx, writable));
                self.ctx.stats.copied.fetch_add(1, Ordering::Relaxed);
            } else if writable {
                runs.add(self, p)?;
                plan.set_demoted(p);
            } else {
                runs.flush(self)?;
            }
        }
        Ok(plan)
    }

    /// Phase 1 for a huge entry: copied whole for the child if its frame
    /// may be pinned, else write-protected if writable.
    fn protect_huge_for_fork(
        &self,
        child: &VmMemory,
        stores: &crate::slots::StoreList,
        first: u64,
        huge: Entry,
        plan: &mut LeafPlan,
        runs: &mut Runs,
    ) -> Result<(), MemError> {
        let Entry::Present {
            store, writable, ..
        } = huge
        else {
            unreachable!("a huge entry is present");
        };
        let src = stores.get(store).expect("an entry names a filled slot");
        let head = src.slot(first);
        if head.exclusive() && head.maybe_pinned() {
            runs.flush(self)?;
            let idx = child.alloc_huge(first)?;
            // The parent's pinned huge frame is held by its entry, which
            // cannot change under the map lock.
            crate::huge::copy_huge_frame(&child.store(idx), src, first);
            plan.huge_copy = Some((idx, writable));
            self.ctx
                .stats
                .copied
                .fetch_add(PAGES_PER_LEAF, Ordering::Relaxed);
        } else if writable {
            for p in first..first + PAGES_PER_LEAF {
                runs.add(self, p)?;
                plan.set_demoted(p);
            }
        } else {
            runs.flush(self)?;
        }
        Ok(())
    }

    /// Phase 2 for a huge entry: shared read-only in both, or the child
    /// maps the copy phase 1 made.
    fn copy_huge(
        &self,
        child: &VmMemory,
        child_leaf: &Leaf,
        leaf: &Leaf,
        plan: &LeafPlan,
        huge: Entry,
    ) -> Result<(u32, bool), MemError> {
        let first = plan.first;
        let Entry::Present {
            store,
            writable,
            soft_dirty,
            ..
        } = huge
        else {
            unreachable!("a huge entry is present");
        };
        if let Some((idx, w)) = plan.huge_copy {
            let new = child.store(idx);
            new.slot(first).map_entire();
            child_leaf.set_huge(
                first,
                Entry::Present {
                    store: idx,
                    writable: w,
                    wp: false,
                    soft_dirty: true,
                },
            );
            return Ok((idx, w));
        }
        if writable && !plan.demoted(first) {
            return Err(MemError::Unsupported {
                gpa: self.gpa(first),
                state: "writable but neither protected nor copied by fork",
            });
        }
        let s = self.store(store);
        let head = s.slot(first);
        if head.exclusive() {
            head.clear_exclusive();
        }
        head.get();
        head.map_entire();
        if writable {
            leaf.set_huge(first, Entry::read_only(store, soft_dirty));
        }
        child_leaf.set_huge(first, Entry::read_only(store, soft_dirty));
        Ok((store, false))
    }

    /// Phase 2 for one leaf: parent entries read-only, child entries
    /// filled, counts updated. Appends the child's host mapping runs.
    fn copy_leaf(
        &self,
        child: &VmMemory,
        leaf: &Leaf,
        plan: &LeafPlan,
        child_runs: &mut MapRuns,
    ) -> Result<(), MemError> {
        let first = plan.first;
        let end = (first + PAGES_PER_LEAF).min(self.table.pages());
        let _ptl = leaf.lock().lock();
        let parent_huge = leaf.huge();
        let child_leaf = if parent_huge.is_some() {
            child.table.leaf_or_alloc_huge(first)
        } else {
            child.table.leaf_or_alloc(first)
        };
        let _child_ptl = child_leaf.lock().lock_as(Rank::ChildTable);
        if leaf.kept_small() {
            // Like a VMA's VM_NOHUGEPAGE, the request is inherited.
            child_leaf.keep_small();
        }
        if let Some(huge) = parent_huge {
            let (slot, writable) = self.copy_huge(child, child_leaf, leaf, plan, huge)?;
            if plan.huge_copy.is_none() {
                child.stores.read().hold_many(slot, 1);
            }
            child_runs.add_many(child, first, PAGES_PER_LEAF, slot, writable)?;
            return Ok(());
        }
        let mut copies = plan.copies.iter().peekable();
        // Uses per child slot: (slot, count); leaves use very few slots.
        let mut holds: Vec<(u32, u64)> = Vec::new();
        // The child's pages, mapped once the parent's list is released
        // (mapping reads the child's list: same lock rank).
        let mut mapped: Vec<(u64, u32, bool)> = Vec::with_capacity(PAGES_PER_LEAF as usize);
        // The child's entries, written into its fresh leaf at once.
        let mut filled: Vec<(u64, Entry)> = Vec::with_capacity(PAGES_PER_LEAF as usize);
        let mut newly_shared = 0u64;
        let mut failed = None;
        {
            let stores = self.stores.read();
            for p in first..end {
                let (store, writable, wp, soft_dirty) = match leaf.get(p) {
                    Entry::Present {
                        store,
                        writable,
                        wp,
                        soft_dirty,
                    } => (store, writable, wp, soft_dirty),
                    Entry::Swap { slot, wp, .. } => {
                        // R6: both entries name the slot; neither is
                        // exclusive any more.
                        self.ctx.swap_in_use().dup(slot);
                        let shared = |wp| Entry::Swap {
                            slot,
                            exclusive: false,
                            wp,
                        };
                        leaf.set(p, shared(wp));
                        filled.push((p, shared(false)));
                        continue;
                    }
                    Entry::Migration { store, wp, .. } => {
                        // R6: the old frame is shared now; both entries
                        // restore read-only, and the moved frame shared.
                        let s = stores.get(store).expect("an entry names a filled slot");
                        let meta = s.meta(p);
                        meta.get();
                        if meta.map() == 2 {
                            newly_shared += 1;
                        }
                        let read = |wp| Entry::Migration {
                            store,
                            kind: MigrationKind::Read,
                            wp,
                        };
                        leaf.set(p, read(wp));
                        filled.push((p, read(false)));
                        hold(&mut holds, store);
                        continue;
                    }
                    Entry::None | Entry::Marker { .. } => continue,
                };
                if let Some(&(_, idx, copy_writable)) = copies.next_if(|c| c.0 == p) {
                    filled.push((
                        p,
                        Entry::Present {
                            store: idx,
                            writable: copy_writable,
                            wp: false,
                            soft_dirty: true,
                        },
                    ));
                    mapped.push((p, idx, copy_writable));
                    continue;
                }
                if writable && !plan.demoted(p) {
                    // Not copied and not protected: impossible while fork
                    // holds the map lock, but never share a writable frame.
                    failed = Some(MemError::Unsupported {
                        gpa: self.gpa(p),
                        state: "writable but neither protected nor copied by fork",
                    });
                    break;
                }
                let s = stores.get(store).expect("an entry names a filled slot");
                let meta = s.meta(p);
                if meta.exclusive() {
                    meta.clear_exclusive();
                }
                meta.get();
                if meta.map() == 2 {
                    newly_shared += 1;
                }
                let ro = |wp| Entry::Present {
                    store,
                    writable: false,
                    wp,
                    soft_dirty,
                };
                // The parent keeps its write protection; the child does not
                // inherit it. (An entry demoted ahead is read-only already.)
                if writable {
                    leaf.set(p, ro(wp));
                }
                filled.push((p, ro(false)));
                hold(&mut holds, store);
                mapped.push((p, store, false));
            }
        }
        // The references taken so far are the child's entries' even when
        // the copy stops here: the child's teardown drops them.
        child_leaf.fill_empty(&filled);
        if let Some(e) = failed {
            return Err(e);
        }
        self.ctx
            .stats
            .shared
            .fetch_add(newly_shared, Ordering::Relaxed);
        {
            let child_stores = child.stores.read();
            for (idx, n) in holds {
                child_stores.hold_many(idx, n);
            }
        }
        for (p, slot, writable) in mapped {
            child_runs.add(child, p, slot, writable)?;
        }
        Ok(())
    }
}

/// Counts one more use of slot `store` in a leaf's tally.
fn hold(holds: &mut Vec<(u32, u64)>, store: u32) {
    match holds.iter_mut().find(|h| h.0 == store) {
        Some(h) => h.1 += 1,
        None => holds.push((store, 1)),
    }
}

/// The child's host mapping, built a run at a time: consecutive pages of
/// one store with the same protection are one `mmap`.
#[derive(Default)]
struct MapRuns {
    /// (first page, pages, slot, writable)
    run: Option<(u64, u64, u32, bool)>,
}

impl MapRuns {
    fn add(&mut self, vm: &VmMemory, page: u64, slot: u32, writable: bool) -> Result<(), MemError> {
        self.add_many(vm, page, 1, slot, writable)
    }

    /// Adds `pages` pages from `page` on, all of store `slot`.
    fn add_many(
        &mut self,
        vm: &VmMemory,
        page: u64,
        pages: u64,
        slot: u32,
        writable: bool,
    ) -> Result<(), MemError> {
        if let Some((first, n, s, w)) = &mut self.run {
            if *first + *n == page && *s == slot && *w == writable {
                *n += pages;
                return Ok(());
            }
        }
        self.flush(vm)?;
        self.run = Some((page, pages, slot, writable));
        Ok(())
    }

    fn flush(&mut self, vm: &VmMemory) -> Result<(), MemError> {
        if let Some((first, n, slot, writable)) = self.run.take() {
            vm.host_map(first, n, &vm.store(slot), writable)?;
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
