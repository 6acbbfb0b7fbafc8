//! Frame stores: memfds that hold guest frames.
//!
//! A store is a sparse memfd as large as the guest's RAM. The frame for page
//! number `p` of any VM always lives at offset `p * 4K` of some store, so:
//! - a VM's frames that sit in one store map as one host mapping, because
//!   adjacent pages are adjacent in the file (Linux merges such VMAs);
//! - a frame keeps its offset when it is shared with a forked VM (fork keeps
//!   page numbers), so sharing needs no remapping arithmetic;
//! - a second frame for the same page number (a copy-on-write copy while
//!   the original is still mapped elsewhere) needs another store. A VM
//!   therefore owns a short list of stores, see [`crate::vm`].
//!
//! ```text
//!   store A (memfd):  [p0][  ][p2][p3][  ]...   holes cost no memory
//!   store B (memfd):  [  ][  ][p2][  ][  ]...   p2 copied after a fork
//! ```
//!
//! Every store is also mapped once, read-write, into the VMM (the *direct
//! map*), which is how `memory` itself reads and writes frames whatever the
//! guest's own mapping allows.
//!
//! A huge frame (see `frame.rs`) is the 512 slots of one 2 MiB-aligned
//! block; with huge mappings on, the host backs such a block with one
//! 2 MiB page (shmem THP, asked for with `MADV_HUGEPAGE` on every mapping
//! of the store) once all of it is written or faulted in.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;

use crate::Context;
use crate::frame::FrameMeta;
use crate::layout::{PAGE_SIZE, PAGES_PER_LEAF};
use crate::lock::{Rank, RankedMutex};
use std::sync::Arc;

use crate::sync::{AtomicU64, Ordering};
use crate::sys::{self, Mapping};

/// One memfd of frames with their metadata.
#[derive(Debug)]
pub(crate) struct Store {
    id: u64,
    fd: OwnedFd,
    direct: Mapping,
    chunks: Box<[OnceLock<Box<[FrameMeta]>>]>,
    live: AtomicU64,
    /// The reverse map: ids of the VMs whose store lists hold this store,
    /// so whose entries may name its frames (Linux's anon_vma chain). The
    /// frame of page `p` can only be mapped at page `p`, so a walk checks
    /// one entry per VM.
    mappers: RankedMutex<Vec<u64>>,
    ctx: Arc<Context>,
}

impl Store {
    /// Creates an empty store with room for `pages` frames.
    pub(crate) fn new(ctx: &Arc<Context>, pages: u64) -> io::Result<Arc<Self>> {
        let len = pages * PAGE_SIZE;
        let fd = sys::memfd(c"guest-frames", len)?;
        let direct = if ctx.config.huge {
            Mapping::shared_huge(fd.as_fd(), len as usize)?
        } else {
            Mapping::shared(fd.as_fd(), len as usize)?
        };
        let chunks = (0..pages.div_ceil(PAGES_PER_LEAF))
            .map(|_| OnceLock::new())
            .collect();
        let id = ctx.next_store_id.fetch_add(1, Ordering::Relaxed);
        ctx.stats.stores.fetch_add(1, Ordering::Relaxed);
        let store = Arc::new(Self {
            id,
            fd,
            direct,
            chunks,
            live: AtomicU64::new(0),
            mappers: RankedMutex::new(Rank::Rmap, Vec::new()),
            ctx: ctx.clone(),
        });
        ctx.add_store(&store);
        Ok(store)
    }

    /// The frames that are not free, as (first page, metadata of that
    /// page); a huge frame appears once, as its head.
    pub(crate) fn frames(&self) -> impl Iterator<Item = (u64, &FrameMeta)> {
        self.chunks.iter().enumerate().flat_map(|(c, chunk)| {
            chunk.get().into_iter().flat_map(move |metas| {
                metas
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| m.refcount() > 0)
                    .map(move |(i, m)| (c as u64 * PAGES_PER_LEAF + i as u64, m))
            })
        })
    }

    /// The live huge frames, as (head page, head's metadata): one look per
    /// 2 MiB, since a huge frame starts at a leaf's first slot.
    pub(crate) fn huge_frames(&self) -> impl Iterator<Item = (u64, &FrameMeta)> {
        self.chunks.iter().enumerate().filter_map(|(c, chunk)| {
            let head = chunk.get()?.first()?;
            (head.is_head() && head.refcount() > 0).then_some((c as u64 * PAGES_PER_LEAF, head))
        })
    }

    /// Records that VM `vm` may map this store's frames.
    pub(crate) fn add_mapper(&self, vm: u64) {
        let mut m = self.mappers.lock();
        if !m.contains(&vm) {
            m.push(vm);
        }
    }

    /// Forgets VM `vm` (it is going away).
    pub(crate) fn remove_mapper(&self, vm: u64) {
        self.mappers.lock().retain(|v| *v != vm);
    }

    /// The VMs that may map this store's frames.
    pub(crate) fn mappers(&self) -> Vec<u64> {
        self.mappers.lock().clone()
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Number of frames that are not free.
    pub(crate) fn live(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// Metadata of the slot at `page`, allocating its chunk on first use.
    pub(crate) fn slot(&self, page: u64) -> &FrameMeta {
        let chunk = &self.chunks[(page / PAGES_PER_LEAF) as usize];
        let chunk =
            chunk.get_or_init(|| (0..PAGES_PER_LEAF).map(|_| FrameMeta::default()).collect());
        &chunk[(page % PAGES_PER_LEAF) as usize]
    }

    /// The frame at `page`: its own slot's metadata and the one that holds
    /// its references and pins (the head's, for a page of a huge frame).
    /// The caller holds a reference to the frame, directly or through a
    /// locked entry that maps it, or (the lockless pin path) only uses
    /// what it finds after taking one with `try_get` and checking again.
    pub(crate) fn meta(&self, page: u64) -> FrameRef<'_> {
        let own = self.slot(page);
        let folio = if own.is_tail() {
            self.slot(huge_head(page))
        } else {
            own
        };
        FrameRef { own, folio }
    }

    /// Whether the entry mapping `page` (which the caller holds locked) is
    /// the only way to reach that page's contents: R11's "sole reference"
    /// test. For a frame of its own, its one reference is that entry's.
    /// For a page of a huge frame, whose references are the whole frame's:
    /// that entry is the page's only mapping, and every reference to the
    /// frame is a mapping (no pin, no transient holder), so no one else
    /// can reach this page.
    pub(crate) fn sole_reference(&self, page: u64) -> bool {
        let own = self.slot(page);
        let head = huge_head(page);
        let in_huge = own.is_tail() || (page == head && own.is_head());
        if !in_huge {
            return own.refcount() == 1;
        }
        let folio = self.slot(head);
        let entire = folio.entire();
        if own.mapcount() + entire != 1 {
            return false;
        }
        let mappings: u32 = (head..head + PAGES_PER_LEAF)
            .map(|p| self.slot(p).mapcount())
            .sum();
        folio.refcount() == mappings + entire
    }

    /// Claims the free slot at `page` as a fresh, zeroed, exclusive frame
    /// holding one reference.
    pub(crate) fn try_claim(&self, page: u64) -> bool {
        if !self.slot(page).try_claim() {
            return false;
        }
        self.live.fetch_add(1, Ordering::Relaxed);
        self.ctx.stats.resident.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Claims the free, 2 MiB-aligned block at `head` as a fresh, zeroed,
    /// exclusive huge frame holding one reference. Fails, claiming
    /// nothing, unless every slot of the block is free.
    pub(crate) fn try_claim_huge(&self, head: u64) -> bool {
        debug_assert_eq!(head % PAGES_PER_LEAF, 0, "a huge frame is aligned");
        if self.slot(head).refcount() != 0 {
            return false;
        }
        for p in head + 1..head + PAGES_PER_LEAF {
            if !self.slot(p).try_claim_tail() {
                (head + 1..p).for_each(|q| self.slot(q).release_tail());
                return false;
            }
        }
        if !self.slot(head).try_claim() {
            (head + 1..head + PAGES_PER_LEAF).for_each(|q| self.slot(q).release_tail());
            return false;
        }
        self.slot(head).make_head();
        self.live.fetch_add(PAGES_PER_LEAF, Ordering::Relaxed);
        self.ctx
            .stats
            .resident
            .fetch_add(PAGES_PER_LEAF, Ordering::Relaxed);
        true
    }

    /// Drops one reference to the frame at `page` (to the whole huge frame,
    /// for a page of one), freeing it if that was the last. `punch` is
    /// false only when the whole store is about to close, which frees the
    /// memory at once.
    pub(crate) fn put(&self, page: u64, punch: bool) {
        let (first, meta) = if self.slot(page).is_tail() {
            (huge_head(page), self.slot(huge_head(page)))
        } else {
            (page, self.slot(page))
        };
        if !meta.put() {
            return;
        }
        let pages = if meta.is_head() { PAGES_PER_LEAF } else { 1 };
        if punch {
            if let Err(e) = sys::punch_hole(self.fd(), first * PAGE_SIZE, pages * PAGE_SIZE) {
                // The slots may still hold data: keep them out of
                // circulation rather than hand out frames that do not read
                // zeros.
                log::error!("freeing frame {first} of store {}: {e}", self.id);
                return;
            }
        }
        if pages > 1 {
            (first + 1..first + pages).for_each(|q| self.slot(q).release_tail());
        }
        meta.finish_free();
        self.live.fetch_sub(pages, Ordering::Relaxed);
        self.ctx.stats.resident.fetch_sub(pages, Ordering::Relaxed);
    }

    /// Host address of the frame at `page` in the direct map.
    pub(crate) fn frame_ptr(&self, page: u64) -> *mut u8 {
        self.direct.page_ptr(page)
    }
}

/// The head page of the 2 MiB block holding `page`.
pub(crate) fn huge_head(page: u64) -> u64 {
    page & !(PAGES_PER_LEAF - 1)
}

/// One frame as seen from one of its pages (see [`Store::meta`]): the
/// counts of references and pins are the frame's, the mapcount and the
/// anon-exclusive bit the page's own.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FrameRef<'a> {
    own: &'a FrameMeta,
    folio: &'a FrameMeta,
}

impl<'a> FrameRef<'a> {
    /// The metadata of the whole frame (the head's for a huge frame).
    pub(crate) fn folio(&self) -> &'a FrameMeta {
        self.folio
    }

    pub(crate) fn get(&self) {
        self.folio.get();
    }

    pub(crate) fn try_get(&self) -> bool {
        self.folio.try_get()
    }

    pub(crate) fn refcount(&self) -> u32 {
        self.folio.refcount()
    }

    pub(crate) fn pincount(&self) -> u32 {
        self.folio.pincount()
    }

    pub(crate) fn pin(&self, write: bool) {
        self.folio.pin(write);
    }

    pub(crate) fn unpin(&self, write: bool) {
        self.folio.unpin(write);
    }

    pub(crate) fn maybe_pinned(&self) -> bool {
        self.folio.maybe_pinned()
    }

    pub(crate) fn maybe_write_pinned(&self) -> bool {
        self.folio.maybe_write_pinned()
    }

    pub(crate) fn mapcount(&self) -> u32 {
        self.own.mapcount()
    }

    pub(crate) fn map(&self) -> u32 {
        self.own.map()
    }

    pub(crate) fn unmap(&self) -> u32 {
        self.own.unmap()
    }

    /// The page's anon-exclusive bit; while a huge entry maps the frame,
    /// the head's bit, which stands for the whole frame (see `frame.rs`).
    pub(crate) fn exclusive(&self) -> bool {
        if self.folio.entire() > 0 {
            self.folio.exclusive()
        } else {
            self.own.exclusive()
        }
    }

    pub(crate) fn set_exclusive(&self) {
        self.own.set_exclusive();
    }

    pub(crate) fn clear_exclusive(&self) {
        self.own.clear_exclusive();
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.ctx.stats.stores.fetch_sub(1, Ordering::Relaxed);
        let live = self.live();
        if live != 0 {
            // Only reachable if a reference count went wrong: report it, the
            // memory itself is returned when the memfd closes.
            log::error!("store {} dropped with {live} live frames", self.id);
            self.ctx.stats.resident.fetch_sub(live, Ordering::Relaxed);
        }
    }
}
