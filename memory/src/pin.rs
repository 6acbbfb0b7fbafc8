//! Pins: how a device holds guest memory (Linux's `FOLL_PIN` GUP).
//!
//! A pin promises: what the device reads or writes through it is what the
//! guest sees at that address. The promise holds because a pin is only
//! taken on an exclusive frame (R4) and nothing ever makes a pinned frame
//! non-exclusive: fork copies it for the child instead of sharing it (R6),
//! and a write fault on it reuses it (R11). So the guest's mapping and the
//! device keep pointing at the same frame.
//!
//! Taking a pin, per page:
//! - a write pin needs a present, writable entry: it takes a write fault
//!   first unless the entry is writable (R9);
//! - a read pin of a read-only entry whose frame is not exclusive takes an
//!   unshare fault first (R9, R10), since the next guest write would copy
//!   the page away from the pin otherwise;
//! - the lockless fast path (R8, `gup_fast`) reads the entry without locks,
//!   takes a reference and a pin, fences, then re-reads the entry and the
//!   VM's write-protect sequence count; any change, an odd count (fork in
//!   progress) or a non-exclusive frame drops the pin and falls back to the
//!   locked path.
//!
//! A pin holds a reference on each frame, so the frames outlive the
//! guest's mapping (DISCARD) and the VM itself.

use std::sync::{Arc, Weak};

use smallvec::SmallVec;
use thiserror::Error;
use vm_memory::VolatileSlice;

use crate::Context;
use crate::entry::Entry;
use crate::layout::PAGE_SIZE;
use crate::store::Store;
use crate::sync::{Ordering, fence};
use crate::table::{Leaf, Walk};
use crate::vm::{Access, MemError, VmMemory};

/// How a range is pinned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinFlags {
    /// The device will write through the pin.
    pub write: bool,
    /// Held across time (posted buffers), rather than for one request.
    pub longterm: bool,
}

/// Misuse of a pin by a device.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PinError {
    /// An access past the pinned range.
    #[error("access {offset:#x}+{len:#x} outside the {pinned:#x} pinned bytes")]
    OutOfRange {
        /// Offset into the pinned range.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Length of the pinned range.
        pinned: u64,
    },
    /// A write through a read-only pin.
    #[error("the pin is read-only")]
    ReadOnly,
}

#[derive(Debug)]
struct PinnedFrame {
    store: Arc<Store>,
    page: u64,
}

/// The host slices of a pin ([`Pin::slices`]): most pins are of one or
/// two runs, which need no allocation.
pub type Slices<'a> = SmallVec<[VolatileSlice<'a>; 2]>;

/// Pinned guest memory. Dropping it unpins.
#[derive(Debug)]
pub struct Pin {
    /// Most pins are of a page or two (a request's header, a buffer that
    /// crosses a page): those need no allocation.
    frames: SmallVec<[PinnedFrame; 2]>,
    gpa: u64,
    len: u64,
    flags: PinFlags,
    ctx: Arc<Context>,
    /// The VM pinned through (its leaves count the pin, see `Leaf::pins`).
    vm: Weak<VmMemory>,
}

impl Pin {
    /// Guest-physical address of the first pinned byte.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Pinned bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the pin covers nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How it was pinned.
    pub fn flags(&self) -> PinFlags {
        self.flags
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), PinError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(PinError::OutOfRange {
                offset,
                len,
                pinned: self.len,
            }),
        }
    }

    /// Calls `f` with each piece of `[offset, offset + len)` that lies in
    /// one frame: (frame address, bytes done so far, piece length).
    fn pieces(&self, offset: u64, len: u64, mut f: impl FnMut(*mut u8, usize, usize)) {
        let mut at = (self.gpa % PAGE_SIZE) + offset;
        let mut done = 0u64;
        while done < len {
            let frame = &self.frames[(at / PAGE_SIZE) as usize];
            let in_page = at % PAGE_SIZE;
            let n = (PAGE_SIZE - in_page).min(len - done);
            let ptr = frame
                .store
                .frame_ptr(frame.page)
                .wrapping_add(in_page as usize);
            f(ptr, done as usize, n as usize);
            done += n;
            at += n;
        }
    }

    /// The pinned bytes as host memory, in order: one slice per run of
    /// frames that sit next to each other in one store. For zero-copy I/O
    /// (`readv`/`writev`, io_uring) straight into guest memory. The slices
    /// live as long as the pin; a device writes through them only if the
    /// pin is a write pin (see [`Pin::flags`]).
    pub fn slices(&self) -> Slices<'_> {
        let mut out: SmallVec<[(*mut u8, usize); 2]> = SmallVec::new();
        self.pieces(0, self.len, |ptr, _, n| match out.last_mut() {
            Some((start, len)) if start.wrapping_add(*len) == ptr => *len += n,
            _ => out.push((ptr, n)),
        });
        out.into_iter()
            // SAFETY: each run lies in consecutive pinned frames of one
            // store's direct map; the pin keeps those frames alive and the
            // store mapped for as long as `self` is borrowed.
            .map(|(ptr, len)| unsafe { VolatileSlice::new(ptr, len) })
            .collect()
    }

    /// Reads pinned memory as the device sees it.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), PinError> {
        self.check(offset, buf.len() as u64)?;
        self.pieces(offset, buf.len() as u64, |ptr, done, n| {
            // SAFETY: `ptr..ptr+n` lies in one pinned frame, which this pin
            // keeps alive and in its store's direct map.
            unsafe { crate::sys::read_frame(ptr, &mut buf[done..done + n]) }
        });
        Ok(())
    }

    /// Writes pinned memory as the device; the guest sees it at once.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), PinError> {
        if !self.flags.write {
            return Err(PinError::ReadOnly);
        }
        self.check(offset, data.len() as u64)?;
        self.pieces(offset, data.len() as u64, |ptr, done, n| {
            // SAFETY: as in `read`; the frame is exclusive to the VM that
            // pinned it (R4), so the write reaches that VM only.
            unsafe { crate::sys::write_frame(ptr, &data[done..done + n]) }
        });
        Ok(())
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let vm = self.vm.upgrade();
        for f in self.frames.drain(..) {
            f.store.meta(f.page).unpin(self.flags.write);
            f.store.put(f.page, true);
            self.ctx.stats.pins.fetch_sub(1, Ordering::Relaxed);
            if let Some(leaf) = vm.as_ref().and_then(|vm| vm.table.leaf(f.page)) {
                leaf.sub_pin();
            }
        }
    }
}

impl VmMemory {
    /// Pins `[gpa, gpa + len)` for a device.
    pub fn pin(&self, gpa: u64, len: u64, flags: PinFlags) -> Result<Pin, MemError> {
        self.pin_pages(gpa, len, flags, |page| {
            match self.pin_fast(page, flags.write) {
                Some(f) => Ok(f),
                None => self.pin_locked(page, flags.write),
            }
        })
    }

    /// Pins through the locked path only (for benchmarks comparing the
    /// two paths).
    #[doc(hidden)]
    pub fn pin_locked_for_bench(
        &self,
        gpa: u64,
        len: u64,
        flags: PinFlags,
    ) -> Result<Pin, MemError> {
        self.pin_pages(gpa, len, flags, |page| self.pin_locked(page, flags.write))
    }

    /// Pins each page of the range with `pin_page`; on an error the pages
    /// pinned so far are unpinned (the partial `Pin` is dropped).
    fn pin_pages(
        &self,
        gpa: u64,
        len: u64,
        flags: PinFlags,
        mut pin_page: impl FnMut(u64) -> Result<PinnedFrame, MemError>,
    ) -> Result<Pin, MemError> {
        let mut pin = Pin {
            frames: SmallVec::new(),
            gpa,
            len,
            flags,
            ctx: self.ctx.clone(),
            vm: self.me.clone(),
        };
        let runs = self.page_range(gpa, len)?;
        if len > 0 {
            for (first, off, run) in runs {
                for page in first..first + (off + run).div_ceil(PAGE_SIZE) {
                    pin.frames.push(pin_page(page)?);
                    if flags.write {
                        self.vmm_writes.note(page);
                    }
                }
            }
        }
        Ok(pin)
    }

    /// The lockless path: no VM lock, no table lock (R8).
    fn pin_fast(&self, page: u64, write: bool) -> Option<PinnedFrame> {
        let seq = self.wp_seq.load(Ordering::SeqCst);
        if seq & 1 != 0 {
            return None;
        }
        let leaf = self.table.leaf(page)?;
        // A walker of the leaf from the first read of its entry to the
        // last: a collapse retracting its small table waits for us.
        leaf.walk(|walk| self.pin_walk(walk, leaf, page, write, seq))
    }

    /// [`VmMemory::pin_fast`] inside its walk of `leaf`.
    fn pin_walk(
        &self,
        walk: &Walk<'_>,
        leaf: &Leaf,
        page: u64,
        write: bool,
        seq: u64,
    ) -> Option<PinnedFrame> {
        // The huge entry first (see `table.rs`): a split writes the small
        // entries before it clears the huge one.
        let huge = walk.huge_raw() != 0;
        let read = || {
            if huge {
                walk.huge_raw()
            } else {
                walk.raw(page)
            }
        };
        let raw = read();
        let Entry::Present {
            store, writable, ..
        } = Entry::unpack(raw)
        else {
            return None;
        };
        if write && !writable {
            return None;
        }
        // The read lock keeps the slot's store in place until the entry is
        // checked again below.
        let stores = self.stores.read();
        let store = stores.get(store)?.clone();
        let meta = store.meta(page);
        if !meta.try_get() {
            return None;
        }
        leaf.add_pin();
        meta.pin(write);
        fence(Ordering::SeqCst);
        if read() != raw || self.wp_seq.load(Ordering::SeqCst) != seq || !meta.exclusive() {
            meta.unpin(write);
            leaf.sub_pin();
            store.put(page, true);
            return None;
        }
        drop(stores);
        self.ctx.stats.pins.fetch_add(1, Ordering::Relaxed);
        Some(PinnedFrame { store, page })
    }

    /// The locked path: resolve the fault the pin needs, then pin under the
    /// table lock.
    fn pin_locked(&self, page: u64, write: bool) -> Result<PinnedFrame, MemError> {
        let access = if write {
            Access::Write
        } else {
            Access::Unshare
        };
        self.under_resolved(page, access, |leaf, _| {
            let idx = leaf
                .get(page)
                .present_store()
                .expect("a resolved fault leaves the entry present");
            let store = self.store(idx);
            let meta = store.meta(page);
            assert!(
                meta.exclusive(),
                "R4: pinning a frame that is not exclusive"
            );
            meta.get();
            leaf.add_pin();
            meta.pin(write);
            self.ctx.stats.pins.fetch_add(1, Ordering::Relaxed);
            PinnedFrame { store, page }
        })
    }
}
