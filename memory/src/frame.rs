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
//!
//! # Huge frames (Linux's large folios)
//! A huge frame is 512 consecutive slots of one store, 2 MiB aligned. Its
//! first slot is the *head*; the 511 others are *tails*:
//!
//! ```text
//!   slot:     head          tail          tail     ...   tail
//!   refcount  all refs      TAIL_REF      TAIL_REF       TAIL_REF
//!   pincount  all pins      -             -              -
//!   entire    huge entries  -             -              -
//!   mapcount  small entries mapping that one 4 KiB page (each slot)
//!   exclusive that page's bit; the head's is also the huge entry's (R3)
//! ```
//!
//! References and pins are the whole frame's (a pin of one page keeps all
//! 512 alive, as a folio pin does); mappings and the anon-exclusive bit are
//! per 4 KiB page, because a huge entry can be split into 512 small ones
//! that go separate ways (one copied on write, one discarded). The bit of
//! a page is only read through a small entry; through a huge entry, the
//! head's bit stands for the whole frame, and splitting the entry copies
//! it to every page (seed 000, I.6 b). A tail's refcount holds `TAIL_REF`
//! so that no one claims the slot as a frame of its own. A huge frame is
//! freed whole, when its last reference goes.

use crate::sync::{AtomicU32, Ordering};

const FREEING: u32 = u32::MAX;
/// The refcount of a tail slot.
const TAIL_REF: u32 = u32::MAX - 1;
const ANON_EXCLUSIVE: u32 = 1;
/// The head of a huge frame.
const HEAD: u32 = 2;
/// A tail of a huge frame.
const TAIL: u32 = 4;

/// Metadata of one frame (one 4 KiB slot of a store).
#[derive(Debug, Default)]
pub(crate) struct FrameMeta {
    refcount: AtomicU32,
    mapcount: AtomicU32,
    pincount: AtomicU32,
    write_pins: AtomicU32,
    flags: AtomicU32,
    /// Huge entries mapping the frame (heads of huge frames only).
    entire: AtomicU32,
}

impl FrameMeta {
    /// Claims a free slot as a new frame with one reference, exclusive (R2).
    pub(crate) fn try_claim(&self) -> bool {
        self.claim_as(1, ANON_EXCLUSIVE)
    }

    /// Claims a free slot as a tail of a huge frame being claimed.
    pub(crate) fn try_claim_tail(&self) -> bool {
        self.claim_as(TAIL_REF, TAIL)
    }

    /// Claims a free slot with `refcount` and `flags`, every count zero.
    fn claim_as(&self, refcount: u32, flags: u32) -> bool {
        if self
            .refcount
            .compare_exchange(0, refcount, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        self.mapcount.store(0, Ordering::Relaxed);
        self.pincount.store(0, Ordering::Relaxed);
        self.write_pins.store(0, Ordering::Relaxed);
        self.entire.store(0, Ordering::Relaxed);
        self.flags.store(flags, Ordering::Release);
        true
    }

    /// Gives back a tail claimed by [`FrameMeta::try_claim_tail`] (the
    /// huge frame was not claimed, or is freed).
    pub(crate) fn release_tail(&self) {
        debug_assert_eq!(self.refcount.load(Ordering::Relaxed), TAIL_REF);
        self.flags.store(0, Ordering::Relaxed);
        self.refcount.store(0, Ordering::Release);
    }

    /// Marks a frame just claimed by [`FrameMeta::try_claim`] as the head
    /// of a huge frame whose tails are claimed.
    pub(crate) fn make_head(&self) {
        self.flags.fetch_or(HEAD, Ordering::Release);
    }

    /// Whether this slot is the head of a huge frame.
    pub(crate) fn is_head(&self) -> bool {
        self.flags.load(Ordering::Acquire) & HEAD != 0
    }

    /// Whether this slot is a tail of a huge frame.
    pub(crate) fn is_tail(&self) -> bool {
        self.flags.load(Ordering::Acquire) & TAIL != 0
    }

    /// Huge entries mapping this head.
    pub(crate) fn entire(&self) -> u32 {
        self.entire.load(Ordering::Acquire)
    }

    /// Counts one more huge entry mapping this head; returns the new count.
    pub(crate) fn map_entire(&self) -> u32 {
        count_up(&self.entire)
    }

    /// Counts one huge entry fewer; returns the new count.
    pub(crate) fn unmap_entire(&self) -> u32 {
        count_down(&self.entire)
    }

    /// Takes `n` more references at once (a huge entry split into `n`
    /// small ones); the caller already holds one.
    pub(crate) fn get_many(&self, n: u32) {
        let old = self.refcount.fetch_add(n, Ordering::Relaxed);
        debug_assert!(old != 0 && old < TAIL_REF, "get_many on a free frame");
    }

    /// Takes another reference; the caller already holds one (directly or
    /// through a locked entry that maps the frame).
    pub(crate) fn get(&self) {
        let old = self.refcount.fetch_add(1, Ordering::Relaxed);
        debug_assert!(old != 0 && old < TAIL_REF, "get on a free frame");
    }

    /// Takes a reference unless the frame is free or being freed (the
    /// lockless path's `try_get_folio`).
    pub(crate) fn try_get(&self) -> bool {
        let mut c = self.refcount.load(Ordering::Relaxed);
        loop {
            if c == 0 || c >= TAIL_REF {
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
            debug_assert!(c != 0 && c < TAIL_REF, "put on a free frame");
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
            FREEING | TAIL_REF => 0,
            c => c,
        }
    }

    pub(crate) fn mapcount(&self) -> u32 {
        self.mapcount.load(Ordering::Acquire)
    }

    /// Counts one more mapping; returns the new mapcount.
    pub(crate) fn map(&self) -> u32 {
        count_up(&self.mapcount)
    }

    /// Counts one mapping fewer; returns the new mapcount.
    pub(crate) fn unmap(&self) -> u32 {
        count_down(&self.mapcount)
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

/// Adds one to a count of mappings; returns the new count.
fn count_up(count: &AtomicU32) -> u32 {
    count.fetch_add(1, Ordering::AcqRel) + 1
}

/// Takes one from a count of mappings; returns the new count.
fn count_down(count: &AtomicU32) -> u32 {
    let old = count.fetch_sub(1, Ordering::AcqRel);
    debug_assert!(old > 0, "mapping count underflow");
    old - 1
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
