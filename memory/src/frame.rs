//! Per-frame metadata: the counts and the anon-exclusive bit.
//!
//! Counts are exact (R16):
//! - `refcount`: every reference that keeps the frame alive: one per stage-2
//!   entry that maps it, one per pin, one per transient holder (a copy in
//!   progress, a lockless pin attempt).
//! - `mapcount`: stage-2 entries (of any VM) mapping it.
//! - `pincount`: device pins; `write_pins`: those of them that may write.
//!
//! A frame is *free* when `refcount` is 0: its store slot is a hole that
//! reads zeros. Releasing the last reference passes through `FREEING` while
//! the slot is punched, so nobody can claim it before it reads zeros again.

use crate::sync::{AtomicU32, Ordering};

const FREEING: u32 = u32::MAX;
const ANON_EXCLUSIVE: u32 = 1;

/// Metadata of one frame (one 4 KiB slot of a store).
#[derive(Debug, Default)]
pub(crate) struct FrameMeta {
    refcount: AtomicU32,
    mapcount: AtomicU32,
    pincount: AtomicU32,
    write_pins: AtomicU32,
    flags: AtomicU32,
}

impl FrameMeta {
    /// Claims a free slot as a new frame with one reference, exclusive (R2).
    pub(crate) fn try_claim(&self) -> bool {
        if self
            .refcount
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        self.mapcount.store(0, Ordering::Relaxed);
        self.pincount.store(0, Ordering::Relaxed);
        self.write_pins.store(0, Ordering::Relaxed);
        self.flags.store(ANON_EXCLUSIVE, Ordering::Release);
        true
    }

    /// Takes another reference; the caller already holds one (directly or
    /// through a locked entry that maps the frame).
    pub(crate) fn get(&self) {
        let old = self.refcount.fetch_add(1, Ordering::Relaxed);
        debug_assert!(old != 0 && old != FREEING, "get on a free frame");
    }

    /// Takes a reference unless the frame is free or being freed (the
    /// lockless path's `try_get_folio`).
    pub(crate) fn try_get(&self) -> bool {
        let mut c = self.refcount.load(Ordering::Relaxed);
        loop {
            if c == 0 || c == FREEING {
                return false;
            }
            match self.refcount.compare_exchange_weak(
                c,
                c + 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => c = now,
            }
        }
    }

    /// Drops a reference. Returns true if it was the last one: the frame is
    /// then `FREEING` and the caller must punch its slot and call
    /// [`FrameMeta::finish_free`].
    #[must_use]
    pub(crate) fn put(&self) -> bool {
        let mut c = self.refcount.load(Ordering::Relaxed);
        loop {
            debug_assert!(c != 0 && c != FREEING, "put on a free frame");
            let next = if c == 1 { FREEING } else { c - 1 };
            match self
                .refcount
                .compare_exchange_weak(c, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return c == 1,
                Err(now) => c = now,
            }
        }
    }

    /// Marks a `FREEING` frame free once its slot reads zeros again.
    pub(crate) fn finish_free(&self) {
        debug_assert_eq!(self.refcount.load(Ordering::Relaxed), FREEING);
        self.flags.store(0, Ordering::Relaxed);
        self.refcount.store(0, Ordering::Release);
    }

    pub(crate) fn refcount(&self) -> u32 {
        match self.refcount.load(Ordering::Acquire) {
            FREEING => 0,
            c => c,
        }
    }

    pub(crate) fn mapcount(&self) -> u32 {
        self.mapcount.load(Ordering::Acquire)
    }

    /// Counts one more mapping; returns the new mapcount.
    pub(crate) fn map(&self) -> u32 {
        self.mapcount.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Counts one mapping fewer; returns the new mapcount.
    pub(crate) fn unmap(&self) -> u32 {
        let old = self.mapcount.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(old > 0, "mapcount underflow");
        old - 1
    }

    pub(crate) fn pincount(&self) -> u32 {
        self.pincount.load(Ordering::Acquire)
    }

    /// Counts one pin (`write`: the device may write through it); the
    /// caller holds a reference for it.
    pub(crate) fn pin(&self, write: bool) {
        if write {
            self.write_pins.fetch_add(1, Ordering::SeqCst);
        }
        self.pincount.fetch_add(1, Ordering::SeqCst);
    }

    /// Counts one pin fewer.
    pub(crate) fn unpin(&self, write: bool) {
        let old = self.pincount.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(old > 0, "pincount underflow");
        if write {
            let old = self.write_pins.fetch_sub(1, Ordering::AcqRel);
            debug_assert!(old > 0, "write pin count underflow");
        }
    }

    /// Whether a device may write the frame through a pin, without any
    /// fault the VM would see.
    pub(crate) fn maybe_write_pinned(&self) -> bool {
        self.write_pins.load(Ordering::SeqCst) > 0
    }

    /// Whether the frame may be pinned. The count is exact, so "may be"
    /// means "is, or a lockless pinner is about to find out it may not".
    pub(crate) fn maybe_pinned(&self) -> bool {
        self.pincount.load(Ordering::SeqCst) > 0
    }

    /// Clears the anon-exclusive bit. Callers have just checked, after a
    /// fence, that no pin exists (R4: never on a pinned frame).
    pub(crate) fn clear_exclusive(&self) {
        self.flags.fetch_and(!ANON_EXCLUSIVE, Ordering::SeqCst);
    }

    pub(crate) fn exclusive(&self) -> bool {
        self.flags.load(Ordering::Acquire) & ANON_EXCLUSIVE != 0
    }

    pub(crate) fn set_exclusive(&self) {
        self.flags.fetch_or(ANON_EXCLUSIVE, Ordering::AcqRel);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn claim_put_free() {
        let f = FrameMeta::default();
        assert!(f.try_claim());
        assert!(f.exclusive());
        assert_eq!(f.refcount(), 1);
        assert!(!f.try_claim(), "claimed twice");
        assert!(f.put(), "last put did not report it");
        assert_eq!(f.refcount(), 0);
        assert!(!f.try_claim(), "claimed while freeing");
        f.finish_free();
        assert!(!f.exclusive());
        assert!(f.try_claim());
    }

    #[test]
    fn references_and_pins() {
        let f = FrameMeta::default();
        assert!(!f.try_get(), "reference taken on a free frame");
        assert!(f.try_claim());
        assert!(f.try_get());
        f.get();
        assert_eq!(f.refcount(), 3);
        f.pin(false);
        assert!(f.maybe_pinned() && !f.maybe_write_pinned());
        f.pin(true);
        assert!(f.maybe_write_pinned());
        f.unpin(true);
        f.unpin(false);
        assert!(!f.maybe_pinned() && !f.maybe_write_pinned());
        assert!(!f.put() && !f.put());
        f.clear_exclusive();
        assert!(!f.exclusive());
        assert!(f.put());
        assert!(!f.try_get(), "reference taken while freeing");
    }

    #[test]
    fn mapcount_counts() {
        let f = FrameMeta::default();
        assert!(f.try_claim());
        assert_eq!(f.map(), 1);
        assert_eq!(f.map(), 2);
        assert_eq!(f.unmap(), 1);
        assert_eq!(f.mapcount(), 1);
    }
}
