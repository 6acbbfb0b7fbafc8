//! Fault resolution: first touch, write faults and unshare faults.
//!
//! All three run under the VM's memory-map lock (read) and the leaf lock of
//! the faulting page, like Linux's `handle_pte_fault`. The decisions follow
//! MEMORY-MODEL.md:
//!
//! - first touch: fresh zeroed frames, exclusive (R2), mapped writable;
//! - write fault (R11, `do_wp_page`): exclusive → reuse; sole reference →
//!   mark exclusive and reuse; otherwise copy into a new exclusive frame;
//! - unshare fault (R10): as a write fault, but the entry stays read-only.
//!
//! Copying when unsure is always allowed (an unnecessary copy); reusing a
//! frame someone else can still reach never is.

use crate::entry::Entry;
use crate::store::Store;
use std::sync::Arc;

use crate::sync::Ordering;
use crate::table::Leaf;
use crate::vm::{Access, MemError, VmMemory};

/// What one attempt at a fault came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Resolved (true if an entry changed).
    Done(bool),
    /// The write listener must be told first (outside the locks).
    TellListener,
    /// The page is being migrated: wait for a migration to finish after
    /// this many had (read under the leaf lock), then try again.
    WaitMigration(u64),
}

impl VmMemory {
    /// Resolves a guest fault: makes the page holding `gpa` allow `access`.
    /// Called for vCPU exits. Returns whether anything changed: false when
    /// the page already allowed the access (another vCPU resolved it, or
    /// the fault was spurious).
    pub fn fault(&self, gpa: u64, access: Access) -> Result<bool, MemError> {
        let page = self
            .layout
            .page_of(gpa)
            .ok_or(MemError::NotRam { gpa, len: 1 })?;
        let changed = self.fault_page(page, access)?;
        if changed {
            self.ctx.stats.host_faults.fetch_add(1, Ordering::Relaxed);
        }
        self.collapse_wanted_block();
        Ok(changed)
    }

    /// Resolves `access` to page number `page`; returns whether anything
    /// changed.
    pub(crate) fn fault_page(&self, page: u64, access: Access) -> Result<bool, MemError> {
        let mut changed = false;
        self.under_resolved(page, access, |_, c| changed = c)?;
        Ok(changed)
    }

    /// Resolves `access` to `page`, then runs `f` under the map lock and the
    /// page's leaf lock with its entry in a state that allows the access (`f`
    /// also learns whether resolving changed anything). Whatever a fault must
    /// do outside the locks (tell a write listener, wait for a migration) is
    /// done here, between attempts.
    pub(crate) fn under_resolved<R>(
        &self,
        page: u64,
        access: Access,
        f: impl FnOnce(&Leaf, bool) -> R,
    ) -> Result<R, MemError> {
        let mut listener_told = false;
        let mut changed = false;
        let mut f = Some(f);
        loop {
            let step = {
                let _map = self.map_lock.read();
                let leaf = self.table.leaf_or_alloc(page);
                let _ptl = leaf.lock().lock();
                let step = self.fault_locked(leaf, page, access, listener_told)?;
                if step == Step::Done(true) {
                    changed = true;
                }
                if access.allowed_by(leaf.get(page), |s| self.frame_exclusive(s, page)) {
                    let f = f.take().expect("runs once");
                    Ok(f(leaf, changed))
                } else {
                    Err(step)
                }
            };
            let step = match step {
                Ok(result) => {
                    if changed {
                        self.note_fault(page);
                        self.reclaim_if_over();
                    }
                    return Ok(result);
                }
                Err(step) => step,
            };
            match step {
                Step::TellListener => {
                    self.tell_listener(self.gpa(page));
                    listener_told = true;
                }
                Step::WaitMigration(seen) => {
                    self.wait_for_migration(seen);
                    // The move ended: the page changed under the caller
                    // (a retried access may now succeed where it failed).
                    changed = true;
                }
                // Progress (a marker became a read-only frame, say): go on.
                Step::Done(_) => {}
            }
        }
    }

    /// The body of a fault; the caller holds the map lock and `leaf`'s lock.
    /// `listener_told`: the write listener was already told of this fault.
    pub(crate) fn fault_locked(
        &self,
        leaf: &Leaf,
        page: u64,
        access: Access,
        listener_told: bool,
    ) -> Result<Step, MemError> {
        crate::lock::assert_held(crate::lock::Rank::MapLock);
        crate::lock::assert_held(crate::lock::Rank::Table);
        let e = leaf.get(page);
        if access.allowed_by(e, |s| self.frame_exclusive(s, page)) {
            return Ok(Step::Done(false));
        }
        if let Some(huge) = leaf.huge() {
            // Present, never protected: only a write or an unshare of a
            // read-only entry gets here.
            if self.huge_cow_fault(leaf, page, huge, access == Access::Write)? {
                return Ok(Step::Done(true));
            }
            // Split: the page goes on as a small one.
            return self.fault_locked(leaf, page, access, listener_told);
        }
        match e {
            Entry::None => {
                if !(self.wants_huge(leaf, page) && self.first_touch_huge(leaf, page)?) {
                    self.first_touch(leaf, page)?;
                }
            }
            Entry::Marker { wp } => self.touch_marker(leaf, page, wp)?,
            Entry::Present {
                store,
                wp,
                soft_dirty,
                writable,
            } => {
                if wp && access == Access::Write {
                    // R11: a write listener hears of the write first.
                    if self.must_tell(page, listener_told) {
                        return Ok(Step::TellListener);
                    }
                    self.lift_protection(leaf, page, store, writable, soft_dirty);
                }
                self.cow_fault(leaf, page, store, access == Access::Write)?
            }
            Entry::Swap { slot, wp, .. } => self.swap_in(leaf, page, slot, wp)?,
            Entry::Migration { .. } => {
                return Ok(Step::WaitMigration(self.ctx.migration.seen()));
            }
        }
        Ok(Step::Done(true))
    }

    /// Makes the empty pages of the fault-around block of `page` present.
    fn first_touch(&self, leaf: &Leaf, page: u64) -> Result<(), MemError> {
        // Under a memory limit, pages are made present one at a time.
        let around = if self.limit.pages().is_some() {
            1
        } else {
            self.ctx.config.fault_around
        };
        let start = page & !(around - 1);
        let end = (start + around).min(self.table.pages());
        let mut hint = start
            .checked_sub(1)
            .and_then(|p| self.table.get(p).present_store());
        let mut claimed: Vec<(u64, u32)> = Vec::new();
        for p in start..end {
            match leaf.get(p) {
                Entry::None => match self.alloc_frame(p, hint) {
                    Ok(idx) => {
                        claimed.push((p, idx));
                        hint = Some(idx);
                    }
                    Err(e) if p == page => {
                        self.unclaim_all(&claimed);
                        return Err(e);
                    }
                    Err(e) => log::warn!("fault-around skipped page {p:#x}: {e}"),
                },
                other => hint = other.present_store().or(hint),
            }
        }
        self.ctx.stats.first_touch.fetch_add(1, Ordering::Relaxed);
        let mut result = Ok(());
        for run in claimed.chunk_by(|a, b| a.0 + 1 == b.0 && a.1 == b.1) {
            let (first, idx) = run[0];
            let store = self.store(idx);
            match self.host_map(first, run.len() as u64, &store, true) {
                Ok(()) if result.is_ok() => {
                    for &(p, _) in run {
                        self.frame_map(&store, p);
                        leaf.set(p, Entry::writable(idx));
                    }
                }
                Ok(()) => {
                    // An earlier run failed: keep the host page consistent
                    // with the entry, which stays empty.
                    let _ = self.host_unmap(first, run.len() as u64);
                    self.unclaim_all(run);
                }
                Err(e) => {
                    self.unclaim_all(run);
                    if run.iter().any(|&(p, _)| p == page) || result.is_err() {
                        result = Err(e);
                    } else {
                        log::warn!("fault-around skipped pages at {first:#x}: {e}");
                    }
                }
            }
        }
        result
    }

    fn unclaim_all(&self, claimed: &[(u64, u32)]) {
        for &(p, idx) in claimed {
            self.unclaim(idx, p);
        }
    }

    /// First touch of a page whose empty entry keeps a write-protect: one
    /// fresh frame, mapped read-only while the protection is armed.
    fn touch_marker(&self, leaf: &Leaf, page: u64, wp: bool) -> Result<(), MemError> {
        self.install_fresh(leaf, page, None, wp, None)?;
        self.ctx.stats.first_touch.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Maps a fresh exclusive frame at `page` (R2), filled with `contents`
    /// (zeros without), writable unless `wp` protects it; the caller holds
    /// the leaf lock. `hint`: a store to try first.
    pub(crate) fn install_fresh(
        &self,
        leaf: &Leaf,
        page: u64,
        hint: Option<u32>,
        wp: bool,
        contents: Option<&crate::swap::PageBuf>,
    ) -> Result<(), MemError> {
        let idx = self.alloc_frame(page, hint)?;
        let store = self.store(idx);
        let filled = match contents {
            // SAFETY: `buf` is a live page-sized buffer for the whole call.
            Some(buf) => unsafe {
                crate::sys::write_file_page(
                    store.fd(),
                    page * crate::layout::PAGE_SIZE,
                    buf.as_ptr(),
                )
            }
            .map_err(MemError::Copy),
            None => Ok(()),
        };
        if let Err(e) = filled.and_then(|()| self.host_map(page, 1, &store, !wp)) {
            self.unclaim(idx, page);
            return Err(e);
        }
        self.frame_map(&store, page);
        leaf.set(
            page,
            Entry::Present {
                store: idx,
                writable: !wp,
                wp,
                soft_dirty: true,
            },
        );
        Ok(())
    }

    /// Makes a read-only, unprotected page whose frame lost its exclusive
    /// bit to sharing writable again if no other reference remains (R11's
    /// reuse, without waiting for the write fault); the caller holds the
    /// leaf lock. Exclusive read-only pages were made so on purpose and
    /// stay.
    pub(crate) fn reuse_if_sole(&self, leaf: &Leaf, page: u64) -> Result<(), MemError> {
        let Entry::Present {
            store: idx,
            writable: false,
            wp: false,
            ..
        } = leaf.get(page)
        else {
            return Ok(());
        };
        let store = self.store(idx);
        let meta = store.meta(page);
        if meta.exclusive() || !store.sole_reference(page) {
            return Ok(());
        }
        meta.set_exclusive();
        self.host_protect(page, 1, true)?;
        leaf.set(page, Entry::writable(idx));
        Ok(())
    }

    /// Write fault (`write` = true, R11) or unshare fault (R10) on a present
    /// page that does not allow the access.
    fn cow_fault(&self, leaf: &Leaf, page: u64, idx: u32, write: bool) -> Result<(), MemError> {
        let store = self.store(idx);
        let meta = store.meta(page);
        let reuse = if meta.exclusive() {
            true
        } else if store.sole_reference(page) {
            // Sole reference: only this entry holds the frame, and no
            // lockless pin can take one without seeing the entry change.
            meta.set_exclusive();
            true
        } else {
            false
        };
        if !reuse {
            self.note_small_cow(page);
            return self.copy_on_fault(leaf, page, idx, &store, write);
        }
        if write {
            self.host_protect(page, 1, true)?;
            leaf.set(page, Entry::writable(idx));
            self.ctx.stats.reused.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Replaces the frame of `page` by an exclusive copy.
    fn copy_on_fault(
        &self,
        leaf: &Leaf,
        page: u64,
        old_idx: u32,
        old: &Arc<Store>,
        writable: bool,
    ) -> Result<(), MemError> {
        let hint = page
            .checked_sub(1)
            .filter(|p| p / crate::layout::PAGES_PER_LEAF == page / crate::layout::PAGES_PER_LEAF)
            .and_then(|p| match leaf.get(p) {
                Entry::Present {
                    store,
                    writable: true,
                    ..
                } => Some(store),
                _ => None,
            });
        let idx = self.alloc_frame(page, hint)?;
        let new = self.store(idx);
        // `old` is not exclusive, so nobody writes it meanwhile (R1: no
        // writable entry maps it; pins exist only on exclusive frames).
        if let Err(e) = crate::fork::copy_frame(&new, old, page) {
            self.unclaim(idx, page);
            return Err(e);
        }
        if let Err(e) = self.host_map(page, 1, &new, writable) {
            self.unclaim(idx, page);
            return Err(e);
        }
        self.frame_map(&new, page);
        // An unshare keeps a listener's protection (a write fault lifted it
        // before getting here): the copy is still protected.
        let wp = leaf.get(page).wp();
        debug_assert!(!(wp && writable), "a protected page made writable");
        leaf.set(
            page,
            Entry::Present {
                store: idx,
                writable,
                wp,
                soft_dirty: true,
            },
        );
        self.unmap_entry(old_idx, page);
        self.ctx.stats.copied.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
