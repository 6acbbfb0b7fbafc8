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
        let direct = Mapping::shared(fd.as_fd(), len as usize)?;
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

    /// The frames that are not free, as (page, metadata).
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

    /// Metadata of the frame at `page`, allocating its chunk on first use.
    pub(crate) fn meta(&self, page: u64) -> &FrameMeta {
        let chunk = &self.chunks[(page / PAGES_PER_LEAF) as usize];
        let chunk =
            chunk.get_or_init(|| (0..PAGES_PER_LEAF).map(|_| FrameMeta::default()).collect());
        &chunk[(page % PAGES_PER_LEAF) as usize]
    }

    /// Claims the free slot at `page` as a fresh, zeroed, exclusive frame
    /// holding one reference.
    pub(crate) fn try_claim(&self, page: u64) -> bool {
        if !self.meta(page).try_claim() {
            return false;
        }
        self.live.fetch_add(1, Ordering::Relaxed);
        self.ctx.stats.resident.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Drops one reference to the frame at `page`, freeing it if that was the
    /// last. `punch` is false only when the whole store is about to close,
    /// which frees the memory at once.
    pub(crate) fn put(&self, page: u64, punch: bool) {
        let meta = self.meta(page);
        if !meta.put() {
            return;
        }
        if punch {
            if let Err(e) = sys::punch_hole(self.fd(), page * PAGE_SIZE, PAGE_SIZE) {
                // The slot may still hold data: keep it out of circulation
                // rather than hand out a frame that does not read zeros.
                log::error!("freeing frame {page} of store {}: {e}", self.id);
                return;
            }
        }
        meta.finish_free();
        self.live.fetch_sub(1, Ordering::Relaxed);
        self.ctx.stats.resident.fetch_sub(1, Ordering::Relaxed);
    }

    /// Host address of the frame at `page` in the direct map.
    pub(crate) fn frame_ptr(&self, page: u64) -> *mut u8 {
        self.direct.page_ptr(page)
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
