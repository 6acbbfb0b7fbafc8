//! Write protection for a listener (userfaultfd write-protect's analogue).
//!
//! A protected page is mapped read-only, whatever its frame; its entry
//! carries the `wp` bit. The first write to it reports to the VM's listener
//! before anything else happens (R11), then the protection is lifted and
//! the write fault resolves as usual (reuse or copy). Two kinds of listener:
//!
//! - *asynchronous* (the default, like `UFFD_FEATURE_WP_ASYNC`): the page
//!   number is recorded and the write goes on; [`VmMemory::take_write_events`]
//!   drains the record. A page written after it was protected appears exactly
//!   once until it is protected again.
//! - *synchronous* ([`VmMemory::set_write_listener`]): the listener is called,
//!   outside every memory lock, before the write lands (it may read the page,
//!   to copy it out for a snapshot). Two vCPUs writing one page at once may
//!   both call it. Under the page's leaf lock, the fault asks the listener
//!   whether it must hear of the write ([`WriteListener::must_hear`]: by
//!   default once per write; a live snapshot, until it copied the page),
//!   and lifts the protection once it need not.
//!
//! Protection must never be lost silently (seed 001): a protected page that
//! loses its frame for any reason but an explicit unprotect or the VM's end
//! keeps the bit, in a marker (discard, balloon), a swap entry or a
//! migration entry. A forked child does not inherit protection.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, PoisonError, RwLock};

use crate::entry::Entry;
use crate::layout::PAGE_SIZE;
use crate::lock::{Rank, RankedMutex};
use crate::sync::Ordering;
use crate::table::Leaf;
use crate::vm::{MemError, VmMemory};

/// Told of the first write to a protected page, before the write lands.
pub trait WriteListener: Send + Sync {
    /// The VM is about to write the page holding `gpa` (page aligned).
    fn before_write(&self, vm: &VmMemory, gpa: u64);

    /// Whether a write to the protected page at `gpa` must be told to the
    /// listener before it lands; `told`: this write told it already. Asked
    /// under the page's leaf lock, so it must take no memory lock. By
    /// default, each write is told once.
    fn must_hear(&self, _vm: &VmMemory, _gpa: u64, told: bool) -> bool {
        !told
    }

    /// Whether the protection of the page at `gpa` is the listener's own,
    /// so a write to it is not recorded for
    /// [`VmMemory::take_write_events`]. Asked under the page's leaf lock.
    fn protects(&self, _vm: &VmMemory, _gpa: u64) -> bool {
        true
    }
}

/// A VM's write-protect state: its listener and the pages recorded for it.
pub(crate) struct WpState {
    listener: RwLock<Option<Arc<dyn WriteListener>>>,
    events: RankedMutex<Vec<u64>>,
    /// A live snapshot owns the VM's protection (see `snapshot.rs`).
    snapshot: AtomicBool,
}

impl std::fmt::Debug for WpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WpState").finish_non_exhaustive()
    }
}

impl WpState {
    pub(crate) fn new() -> Self {
        Self {
            listener: RwLock::new(None),
            events: RankedMutex::new(Rank::WpEvents, Vec::new()),
            snapshot: AtomicBool::new(false),
        }
    }

    /// Marks a live snapshot as running; false if one already is.
    pub(crate) fn begin_snapshot(&self) -> bool {
        !self.snapshot.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn snapshot_running(&self) -> bool {
        self.snapshot.load(Ordering::Acquire)
    }

    pub(crate) fn end_snapshot(&self) {
        self.snapshot.store(false, Ordering::Release);
    }
}

/// What arming or lifting protection did to one page.
pub(crate) enum Protect {
    Unchanged,
    Changed,
    /// A device may write the frame through a pin: reported as written.
    DeviceMayWrite,
}

impl VmMemory {
    /// Arms (`on`) or lifts write protection over `[gpa, gpa + len)` (whole
    /// pages). Armed on an empty page, it waits there as a marker. A page
    /// whose frame a device may write through a pin cannot be protected
    /// from that device: it is reported as written at once (recorded, or
    /// told to the synchronous listener) and left unprotected. Returns the
    /// number of pages whose protection changed.
    pub fn protect_for_listener(&self, gpa: u64, len: u64, on: bool) -> Result<u64, MemError> {
        if self.wp.snapshot_running() {
            return Err(MemError::Busy("a live snapshot is being taken"));
        }
        let mut changed = 0;
        let mut written = Vec::new();
        self.walk_leaves_in(gpa, len, on, |leaf, at, n| {
            for page in at..at + n {
                match self.protect_entry(leaf, page, on)? {
                    Protect::Unchanged => {}
                    Protect::Changed => changed += 1,
                    Protect::DeviceMayWrite => written.push(self.gpa(page)),
                }
            }
            Ok(())
        })?;
        if self.has_listener() {
            for gpa in written {
                self.tell_listener(gpa);
            }
        } else if !written.is_empty() {
            self.ctx
                .stats
                .wp_events
                .fetch_add(written.len() as u64, Ordering::Relaxed);
            self.wp.events.lock().extend(written);
        }
        Ok(changed)
    }

    /// Sets or clears the `wp` bit of one entry; the caller holds its leaf's
    /// lock.
    pub(crate) fn protect_entry(
        &self,
        leaf: &Leaf,
        page: u64,
        on: bool,
    ) -> Result<Protect, MemError> {
        let e = leaf.get(page);
        if e.wp() == on {
            return Ok(Protect::Unchanged);
        }
        let next = match e {
            Entry::None => Entry::Marker { wp: true },
            Entry::Marker { .. } => Entry::None,
            Entry::Present {
                store, writable, ..
            } => {
                if on && self.store(store).meta(page).maybe_write_pinned() {
                    return Ok(Protect::DeviceMayWrite);
                }
                if on && writable {
                    // The host page loses write access before the entry
                    // says so.
                    self.host_protect(page, 1, false)?;
                }
                e.with_wp(on)
            }
            Entry::Swap { .. } | Entry::Migration { .. } => e.with_wp(on),
        };
        leaf.set(page, next);
        Ok(Protect::Changed)
    }

    /// Installs a synchronous listener (or, with `None`, goes back to
    /// recording writes for [`VmMemory::take_write_events`]).
    pub fn set_write_listener(&self, listener: Option<Arc<dyn WriteListener>>) {
        *self
            .wp
            .listener
            .write()
            .unwrap_or_else(PoisonError::into_inner) = listener;
    }

    /// Drains up to `max` recorded writes: guest-physical page addresses,
    /// oldest first.
    pub fn take_write_events(&self, max: usize) -> Vec<u64> {
        let mut events = self.wp.events.lock();
        let n = max.min(events.len());
        events.drain(..n).collect()
    }

    pub(crate) fn has_listener(&self) -> bool {
        self.wp
            .listener
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    fn listener(&self) -> Option<Arc<dyn WriteListener>> {
        self.wp
            .listener
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether a write to protected page `page` must be told to the
    /// synchronous listener first (see [`WriteListener::must_hear`]); the
    /// caller holds the page's leaf lock.
    pub(crate) fn must_tell(&self, page: u64, told: bool) -> bool {
        self.listener()
            .is_some_and(|l| l.must_hear(self, self.gpa(page), told))
    }

    /// Calls the synchronous listener for the page holding `gpa`; no
    /// memory lock is held.
    pub(crate) fn tell_listener(&self, gpa: u64) {
        if let Some(l) = self.listener() {
            self.ctx.stats.wp_events.fetch_add(1, Ordering::Relaxed);
            l.before_write(self, gpa & !(PAGE_SIZE - 1));
        }
    }

    /// A write reached a protected page whose listener has been told (or
    /// records it): the protection is lifted; the write fault goes on.
    pub(crate) fn lift_protection(
        &self,
        leaf: &Leaf,
        page: u64,
        store: u32,
        writable: bool,
        soft_dirty: bool,
    ) {
        let gpa = self.gpa(page);
        if !self.listener().is_some_and(|l| l.protects(self, gpa)) {
            self.wp.events.lock().push(gpa);
            self.ctx.stats.wp_events.fetch_add(1, Ordering::Relaxed);
        }
        leaf.set(
            page,
            Entry::Present {
                store,
                writable,
                wp: false,
                soft_dirty,
            },
        );
    }
}
