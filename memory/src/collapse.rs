//! Collapse: the 512 small entries of a leaf become one huge entry over a
//! new exclusive huge frame (Linux's `MADV_COLLAPSE` and khugepaged, seed
//! 004), by the guest's COLLAPSE call or the background scanner.
//!
//! A collapse *retracts* the leaf's small table (see `table.rs`):
//!
//! ```text
//!   map lock (write)      every locked walk starts under it: faults, pins'
//!                         slow path, fork, reverse-map walks of this VM
//!   └─ leaf lock          the check, the detach, the copy, the install
//!      └─ detach_small    clears the leaf's table pointer, then waits for
//!                         the lockless walkers (R8) still inside the leaf
//! ```
//!
//! 1. Every entry must be none or present without write protection;
//!    a marker, a protected entry or a page pinned refuses the collapse
//!    (MEMORY-MODEL.md: never collapse a protected range or a pin's page).
//!    Pages in swap or under migration are brought in first, outside the
//!    locks.
//! 2. The table is detached and the walkers drained. No pin can be taken
//!    from now on: the slow path waits for the map lock, the fast path
//!    finds no table. Pins taken before are visible now, so the pin
//!    counts are checked again; a pinned page puts the table back.
//! 3. The host mapping of the block goes (KVM drops its view with it, so
//!    vCPUs touching the block exit and wait on the map lock), the pages
//!    are copied into the new frame (none pages stay zero), the host maps
//!    the new frame, and the old entries are dropped like a discard's:
//!    frames shared with other VMs (after a fork) stay theirs.
//! 4. The huge entry is set, writable and exclusive (R2: a new frame), and
//!    the detached table is kept, cleared, for the next split.
//!
//! Without huge mappings on, collapse still works: the entry is huge and
//! the host maps the frame with whatever pages it chooses.

use std::time::{Duration, Instant};

use thiserror::Error;

use crate::entry::Entry;
use crate::layout::{PAGE_SIZE, PAGES_PER_LEAF};
use crate::sync::{Ordering, fence};
use crate::table::Leaf;
use crate::vm::{Access, MemError, VmMemory};

/// Bytes one huge entry maps.
pub const HUGE_SIZE: u64 = PAGES_PER_LEAF * PAGE_SIZE;

/// Why a collapse left the block as it was.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum CollapseRefusal {
    /// A page of the block is pinned.
    #[error("a page of the block is pinned")]
    Pinned,
    /// A page of the block is write-protected.
    #[error("a page of the block is write-protected")]
    WriteProtected,
    /// A page of the block holds a write-protect marker.
    #[error("a page of the block holds a write-protect marker")]
    Marked,
    /// A page kept going to swap or to another frame while we tried.
    #[error("a page of the block kept moving to swap or to another frame")]
    Moving,
    /// The VM has a resident limit: it is reclaimed page by page.
    #[error("the VM has a resident limit")]
    ResidentLimit,
    /// The block was asked to stay on small entries
    /// ([`VmMemory::keep_small`]).
    #[error("the block is kept on small pages")]
    KeptSmall,
}

/// What a collapse did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collapse {
    /// The block is now one huge entry over a new frame.
    Done {
        /// Pages copied into it (the others were none and read zeros).
        copied: u64,
        /// How long the VM's memory-map lock was held for writing: the
        /// longest any vCPU faulting meanwhile was held.
        held: Duration,
    },
    /// The block was one huge entry already.
    AlreadyHuge,
    /// The block was left as it was.
    Refused(CollapseRefusal),
}

/// How often a collapse brings pages back from swap or migration before
/// it gives up on a block that keeps moving.
const TRIES: usize = 3;

impl VmMemory {
    /// Maps the 2 MiB-aligned block at `gpa` with one huge entry over a new
    /// exclusive frame (the COLLAPSE call), unless a page is pinned,
    /// write-protected or marked.
    pub fn collapse(&self, gpa: u64) -> Result<Collapse, MemError> {
        let first = self.huge_block(gpa)?;
        if self.limit.pages().is_some() {
            return Ok(Collapse::Refused(CollapseRefusal::ResidentLimit));
        }
        for _ in 0..TRIES {
            self.bring_in(first)?;
            let _map = self.map_lock.write();
            let start = Instant::now();
            let leaf = self.table.leaf_or_alloc(first);
            let _ptl = leaf.lock().lock();
            match self.collapse_locked(leaf, first)? {
                Some(Collapse::Done { copied, .. }) => {
                    return Ok(Collapse::Done {
                        copied,
                        held: start.elapsed(),
                    });
                }
                Some(other) => return Ok(other),
                None => continue,
            }
        }
        Ok(Collapse::Refused(CollapseRefusal::Moving))
    }

    /// The first page of the block at `gpa`: 2 MiB-aligned, one RAM range,
    /// one leaf.
    fn huge_block(&self, gpa: u64) -> Result<u64, MemError> {
        if gpa % HUGE_SIZE != 0 {
            return Err(MemError::Unaligned {
                gpa,
                align: HUGE_SIZE,
            });
        }
        self.layout
            .page_of(gpa)
            .filter(|&first| first % PAGES_PER_LEAF == 0 && self.is_huge_block(first))
            .ok_or(MemError::NotRam {
                gpa,
                len: HUGE_SIZE,
            })
    }

    /// Reads back the block's pages that are in swap or under migration
    /// (unprotected ones: protected ones refuse the collapse anyway).
    fn bring_in(&self, first: u64) -> Result<(), MemError> {
        let moving: Vec<u64> = {
            let _map = self.map_lock.read();
            let Some(leaf) = self.table.leaf(first) else {
                return Ok(());
            };
            (first..first + PAGES_PER_LEAF)
                .filter(|&p| {
                    let e = leaf.get(p);
                    matches!(e, Entry::Swap { .. } | Entry::Migration { .. }) && !e.wp()
                })
                .collect()
        };
        for p in moving {
            self.fault_page(p, Access::Read)?;
        }
        Ok(())
    }

    /// The collapse itself, under the map lock (write) and the leaf lock;
    /// None if a page went to swap or migration since `bring_in`.
    fn collapse_locked(&self, leaf: &Leaf, first: u64) -> Result<Option<Collapse>, MemError> {
        if leaf.huge().is_some() {
            return Ok(Some(Collapse::AlreadyHuge));
        }
        if leaf.kept_small() {
            return Ok(Some(Collapse::Refused(CollapseRefusal::KeptSmall)));
        }
        let mut old: Vec<(u64, u32)> = Vec::new();
        for p in first..first + PAGES_PER_LEAF {
            let refusal = match leaf.get(p) {
                Entry::None => continue,
                Entry::Marker { .. } => CollapseRefusal::Marked,
                e if e.wp() => CollapseRefusal::WriteProtected,
                Entry::Present { store, .. } => {
                    if self.store(store).meta(p).maybe_pinned() {
                        CollapseRefusal::Pinned
                    } else {
                        old.push((p, store));
                        continue;
                    }
                }
                Entry::Swap { .. } | Entry::Migration { .. } => return Ok(None),
            };
            return Ok(Some(Collapse::Refused(refusal)));
        }
        let table = leaf.detach_small();
        // Pins taken by walkers that have left are counted by now.
        fence(Ordering::SeqCst);
        if old
            .iter()
            .any(|&(p, s)| self.store(s).meta(p).maybe_pinned())
        {
            leaf.reattach_small(table);
            return Ok(Some(Collapse::Refused(CollapseRefusal::Pinned)));
        }
        match self.replace_block(first, &old) {
            Ok(idx) => {
                self.store(idx).slot(first).map_entire();
                for &(p, s) in &old {
                    self.unmap_entry(s, p);
                }
                leaf.install_collapsed(first, Entry::writable(idx), table);
                self.ctx.stats.collapses.fetch_add(1, Ordering::Relaxed);
                Ok(Some(Collapse::Done {
                    copied: old.len() as u64,
                    held: Duration::ZERO,
                }))
            }
            Err(e) => {
                leaf.reattach_small(table);
                Err(e)
            }
        }
    }

    /// Claims a huge frame for the block, copies the `old` pages into it
    /// and makes the host map it instead of them; returns its store.
    /// On failure the host maps the old frames again.
    fn replace_block(&self, first: u64, old: &[(u64, u32)]) -> Result<u32, MemError> {
        let idx = self.alloc_huge(first)?;
        let new = self.store(idx);
        let swapped = self.host_unmap(first, PAGES_PER_LEAF).and_then(|()| {
            for &(p, s) in old {
                let src = self.store(s);
                // SAFETY: both are whole frames of live stores' direct
                // maps: an old frame, held by its entry (the detached
                // table's, which nobody else can change), and the new
                // frame, mapped nowhere yet; the guest cannot write the
                // old one, as the host mapping of the block is gone.
                unsafe { crate::sys::copy_page(src.frame_ptr(p), new.frame_ptr(p)) };
            }
            self.host_map(first, PAGES_PER_LEAF, &new, true)
        });
        if let Err(e) = swapped {
            self.unclaim(idx, first);
            self.remap_old(first, old);
            return Err(e);
        }
        Ok(idx)
    }

    /// Puts back the host mapping of a block whose collapse failed: the
    /// old frames where entries map them (read-only: a write fault makes
    /// them writable again where they may be), nothing elsewhere.
    fn remap_old(&self, first: u64, old: &[(u64, u32)]) {
        let _ = self.host_unmap(first, PAGES_PER_LEAF);
        for &(p, s) in old {
            if let Err(e) = self.host_map(p, 1, &self.store(s), false) {
                log::error!("restoring the host mapping of page {p:#x}: {e}");
            }
        }
    }
}

impl VmMemory {
    /// Collapses up to `budget` blocks that gain from it at no cost
    /// (the background scanner's pass, like khugepaged's): every page
    /// present, exclusive, unpinned and unprotected, so a collapse neither
    /// grows memory nor unshares a frame. Resumes where the last pass
    /// stopped; returns the blocks collapsed.
    pub fn collapse_scan(&self, budget: u64) -> u64 {
        if self.limit.pages().is_some() {
            return 0;
        }
        let leaves = self.table.pages().div_ceil(PAGES_PER_LEAF);
        let mut done = 0;
        for _ in 0..leaves {
            if done >= budget {
                break;
            }
            let i = self.collapse_cursor.fetch_add(1, Ordering::Relaxed) % leaves;
            let first = i * PAGES_PER_LEAF;
            if !self.worth_collapsing(first) {
                continue;
            }
            match self.collapse(self.gpa(first)) {
                Ok(Collapse::Done { .. }) => done += 1,
                Ok(_) => {}
                Err(e) => log::warn!("collapsing the block at page {first:#x}: {e}"),
            }
        }
        done
    }

    /// A lockless look at whether the scanner should collapse the block at
    /// page `first` (the collapse checks again under its locks).
    fn worth_collapsing(&self, first: u64) -> bool {
        let Some(leaf) = self.table.leaf(first) else {
            return false;
        };
        // Unevictable pages (the VMM's own) are left where they are, as
        // the compactor leaves them.
        if leaf.huge_raw() != 0
            || leaf.kept_small()
            || !self.is_huge_block(first)
            || (first..first + PAGES_PER_LEAF).any(|p| self.is_unevictable(p))
        {
            return false;
        }
        let stores = self.stores.read();
        (first..first + PAGES_PER_LEAF).all(|p| match leaf.peek(p) {
            Entry::Present {
                store, wp: false, ..
            } => stores
                .get(store)
                .is_some_and(|s| s.meta(p).exclusive() && !s.meta(p).maybe_pinned()),
            _ => false,
        })
    }
}

impl crate::Context {
    /// One scanner pass over every live VM, up to `budget` blocks each
    /// (see [`VmMemory::collapse_scan`]); returns the blocks collapsed.
    pub fn collapse_scan_all(&self, budget: u64) -> u64 {
        self.live_vms()
            .iter()
            .map(|vm| vm.collapse_scan(budget))
            .sum()
    }
}

/// A background thread collapsing blocks of every VM of a context now and
/// then (Linux's khugepaged). Dropping it stops the thread.
#[derive(Debug)]
pub struct Collapser {
    _worker: crate::periodic::Periodic,
}

impl Collapser {
    /// Starts a pass every `interval`, up to `budget` blocks per VM each.
    pub fn start(
        ctx: &std::sync::Arc<crate::Context>,
        interval: Duration,
        budget: u64,
    ) -> std::io::Result<Self> {
        crate::periodic::Periodic::start("collapser", ctx, interval, move |ctx| {
            ctx.collapse_scan_all(budget);
        })
        .map(|w| Self { _worker: w })
    }
}
