//! The per-VM stage-2 table: page number → [`Entry`].
//!
//! Two levels, like an x86 page directory and page table:
//!
//! ```text
//!   top[page / 512] ──► Leaf { lock, huge, small ──► Small[page % 512] }
//!   (one top entry per 2 MiB of RAM; a leaf covers 512 pages)
//! ```
//!
//! Rules (MEMORY-MODEL.md, "Huge mappings and table retraction"):
//! - leaf entries change only under their leaf's lock;
//! - a top entry, once it points at a leaf, never changes: it is installed
//!   once (compare-and-swap from empty), and leaves live until the table
//!   is dropped, so a reference obtained from a top entry stays valid for
//!   the table's lifetime;
//! - what a collapse retracts is the leaf's small table (the next level
//!   down, Linux's PTE table), which only code holding the VM's memory-map
//!   lock for writing and the leaf's lock detaches, after waiting for the
//!   lockless walkers (see "Retraction" below).
//!
//! # Huge entries
//! A leaf may instead hold one *huge* entry, mapping its whole 2 MiB with
//! one huge frame (Linux's PMD-mapped THP). The leaf stays installed and
//! its lock guards the huge entry as it guards small ones (the PMD lock);
//! while a huge entry is set, every small entry is none:
//!
//! ```text
//!   top[i] ──► Leaf { lock, huge: Present{store, w}, small: [none; 512] or ∅ }
//!   split:     Leaf { lock, huge: none, small: [Present{store, w}; 512] }
//! ```
//!
//! (A leaf made for a huge entry, by fork, has no small table until it is
//! split.)
//!
//! Splitting writes the 512 small entries first, then clears the huge one;
//! a lockless reader loads the huge entry first and reads small entries
//! only when it is clear, so it sees one or the other.
//!
//! # Retraction
//! The 512 small entries live in a table of their own ([`Small`], Linux's
//! PTE table) that the leaf points to. A collapse (see `collapse.rs`)
//! *retracts* it: with the VM's memory-map lock held for writing (every
//! locked walk starts under it) and the leaf's lock, it detaches the table
//! and waits until no lockless walker (R8) is inside the leaf; only then is
//! the table reused, kept for the next split like Linux's deposited page
//! table:
//!
//! ```text
//!   Leaf { small ──► Small[512], deposit: ∅ }          before
//!   Leaf { small: ∅, huge: Present{..}, deposit ──► Small[none; 512] }
//! ```
//!
//! So the small table may only be read under the leaf's lock, under the
//! memory-map lock, or inside [`Leaf::walk`], which counts the walker in
//! the leaf (a Dekker pairing with the detach: the walker counts itself,
//! then loads the pointer; the retraction clears the pointer, then reads
//! the count; a sequentially consistent fence between the two on each
//! side). A lockless walker that finds neither a huge entry nor a
//! small table reads none, and falls back to the locked path, which waits
//! for the collapse.
//! Code that knows nothing of huge entries only reaches leaves through
//! `VmMemory`'s splitting accessors, which also mark the leaf as used by
//! small entries: a first touch maps a leaf huge only while it is unused
//! (see `huge.rs`).
//!
//! While a live snapshot arms its protection (see `snapshot.rs`), the table
//! records every page whose entry is set to anything but a protected entry
//! with contents ([`Changes`]): those are the pages the snapshot's instant
//! must look at again, and the only ones.

use std::sync::Arc;

use crate::entry::Entry;
use crate::layout::PAGES_PER_LEAF;
use crate::lock::{Rank, RankedMutex};
use crate::sync::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering, fence};

const YOUNG_WORDS: usize = (PAGES_PER_LEAF as usize).div_ceil(64);

/// A leaf's small entries, packed (Linux's PTE table).
#[derive(Debug)]
pub(crate) struct Small([AtomicU64; PAGES_PER_LEAF as usize]);

impl Small {
    fn new() -> Box<Self> {
        Box::new(Self(std::array::from_fn(|_| AtomicU64::new(0))))
    }

    fn slot(&self, page: u64) -> &AtomicU64 {
        &self.0[(page % PAGES_PER_LEAF) as usize]
    }

    /// The packed entries.
    pub(crate) fn entries(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().map(|e| e.load(Ordering::Acquire))
    }
}

/// 512 entries and the lock that serialises changes to them.
#[derive(Debug)]
pub(crate) struct Leaf {
    lock: RankedMutex<()>,
    /// The huge entry, packed (0: none).
    huge: AtomicU64,
    /// Code that knows only small entries has used this leaf.
    small_used: AtomicBool,
    /// The VM asked for small entries here ([`crate::VmMemory::keep_small`],
    /// Linux's `MADV_NOHUGEPAGE`): no first touch and no collapse maps the
    /// leaf huge. Set once, under the lock; kept for the leaf's life.
    kept_small: AtomicBool,
    /// The small entries (a `Box<Small>` turned into a raw pointer); null
    /// only while a huge entry is set (after a collapse, or in a leaf made
    /// for one), or while a collapse runs.
    small: AtomicPtr<Small>,
    /// A retracted small table, all none, kept for the next split (null:
    /// none). Changed only under the leaf's lock; no walker can reach it.
    deposit: AtomicPtr<Small>,
    /// Lockless walkers inside [`Leaf::walk`]: a retraction waits for none.
    walkers: AtomicU32,
    /// Pins taken through this leaf and not yet dropped: a hint that lets
    /// fork skip the frame metadata of leaves nobody pinned. It may count
    /// too many (a pinned page since discarded), never too few: a pinner
    /// raises it before its pin count and fork reads it after making the
    /// write-protect sequence count odd (the Dekker pairing of R8).
    pins: AtomicU32,
    /// Pages made present since reclaim last looked at them (the closest
    /// thing to an accessed bit this host gives: our own faults).
    young: [AtomicU64; YOUNG_WORDS],
    /// The table's count of present entries.
    present: Arc<AtomicU64>,
    /// The table's record of changed entries.
    changes: Arc<Changes>,
}

impl Leaf {
    /// An empty leaf; `small`: with a small table (a leaf about to hold a
    /// huge entry needs none until it is split).
    fn new(present: Arc<AtomicU64>, changes: Arc<Changes>, small: bool) -> Self {
        Self {
            lock: RankedMutex::new(Rank::Table, ()),
            huge: AtomicU64::new(0),
            small_used: AtomicBool::new(false),
            kept_small: AtomicBool::new(false),
            small: AtomicPtr::new(if small {
                Box::into_raw(Small::new())
            } else {
                std::ptr::null_mut()
            }),
            deposit: AtomicPtr::new(std::ptr::null_mut()),
            walkers: AtomicU32::new(0),
            pins: AtomicU32::new(0),
            young: std::array::from_fn(|_| AtomicU64::new(0)),
            present,
            changes,
        }
    }

    /// The word and bit of `page` in `young`.
    fn young_bit(page: u64) -> (usize, u64) {
        let i = (page % PAGES_PER_LEAF) as usize;
        (i / 64, 1 << (i % 64))
    }

    /// Clears the page's young bit; returns whether it was set.
    pub(crate) fn take_young(&self, page: u64) -> bool {
        let (w, bit) = Self::young_bit(page);
        self.young[w].fetch_and(!bit, Ordering::Relaxed) & bit != 0
    }

    /// Whether a pin may have been taken through this leaf.
    pub(crate) fn maybe_pinned(&self) -> bool {
        self.pins.load(Ordering::SeqCst) != 0
    }

    /// Counts a pin taken through this leaf (before the frame's pin count).
    pub(crate) fn add_pin(&self) {
        self.pins.fetch_add(1, Ordering::SeqCst);
    }

    /// Counts a pin dropped or abandoned.
    pub(crate) fn sub_pin(&self) {
        let old = self.pins.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(old > 0, "leaf pin hint underflow");
    }

    /// The leaf's lock (the page-table lock).
    pub(crate) fn lock(&self) -> &RankedMutex<()> {
        &self.lock
    }

    /// Reads an entry; the caller holds the leaf's lock or the memory-map
    /// lock, which exclude a retraction (lockless readers use
    /// [`Leaf::walk`]). Under a huge entry, every page reads as a small
    /// entry with the same frame store and access.
    pub(crate) fn get(&self, page: u64) -> Entry {
        assert_locked();
        match self.huge() {
            Some(e) => e,
            None => Entry::unpack(self.raw(page)),
        }
    }

    /// The small table, if attached. The caller holds the leaf's lock or
    /// the memory-map lock, or is inside [`Leaf::walk`].
    fn small(&self) -> Option<&Small> {
        let ptr = self.small.load(Ordering::SeqCst);
        // SAFETY: a non-null `small` came from `Box::into_raw`; it is freed
        // or reused only by `drop` (`&mut self`) or after `detach_small`,
        // which holds the leaf lock and the memory-map lock for writing and
        // waits for every walker: the caller's lock or walk excludes both.
        (!ptr.is_null()).then(|| unsafe { &*ptr })
    }

    /// Runs `f` as a lockless walker of this leaf (R8): the small table it
    /// reads through the [`Walk`] stays valid until it returns, though its
    /// entries may change at any time. Keep `f` short: a collapse waits.
    pub(crate) fn walk<R>(&self, f: impl FnOnce(&Walk<'_>) -> R) -> R {
        self.walkers.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence in `detach_small` (a store, then a load of
        // the other's word, on each side).
        fence(Ordering::SeqCst);
        let r = f(&Walk { leaf: self });
        self.walkers.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// Reads an entry without a lock, as [`Leaf::walk`] does.
    pub(crate) fn peek(&self, page: u64) -> Entry {
        self.walk(|w| w.get(page))
    }

    /// The huge entry, packed (0: none): the lockless walk's read.
    pub(crate) fn huge_raw(&self) -> u64 {
        self.huge.load(Ordering::Acquire)
    }

    /// The huge entry, if one is set.
    pub(crate) fn huge(&self) -> Option<Entry> {
        match self.huge.load(Ordering::Acquire) {
            0 => None,
            raw => Some(Entry::unpack(raw)),
        }
    }

    /// Whether code that knows only small entries has used this leaf:
    /// then it holds no huge entry, and no first touch will set one.
    pub(crate) fn used_small(&self) -> bool {
        self.small_used.load(Ordering::Acquire)
    }

    /// Marks the leaf as used by code that knows only small entries; the
    /// caller holds the lock (a first touch reads the mark under it before
    /// it maps the leaf huge) and has split any huge entry.
    pub(crate) fn mark_small(&self) {
        crate::lock::assert_held_any(&[Rank::Table, Rank::ChildTable]);
        debug_assert!(self.huge().is_none(), "marked small while huge");
        self.small_used.store(true, Ordering::Release);
    }

    /// Keeps the leaf on small entries for good (see `kept_small`); the
    /// caller holds the lock and has split any huge entry.
    pub(crate) fn keep_small(&self) {
        self.mark_small();
        self.kept_small.store(true, Ordering::Release);
    }

    /// Whether the VM asked for small entries in this leaf.
    pub(crate) fn kept_small(&self) -> bool {
        self.kept_small.load(Ordering::Acquire)
    }

    /// Whether the leaf may be mapped huge by a first touch: no code that
    /// knows only small entries used it, and every entry is none. The
    /// caller holds the lock.
    pub(crate) fn may_map_huge(&self) -> bool {
        !self.small_used.load(Ordering::Relaxed)
            && self.huge.load(Ordering::Relaxed) == 0
            && self
                .small()
                .is_none_or(|t| t.entries().all(|e| e == Entry::None.pack()))
    }

    /// Sets the huge entry of a leaf whose entries are all none, `first`
    /// being its first page; the caller holds the lock. Counted as 512
    /// present, young pages.
    pub(crate) fn set_huge(&self, first: u64, entry: Entry) {
        crate::lock::assert_held_any(&[Rank::Table, Rank::ChildTable]);
        debug_assert!(matches!(entry, Entry::Present { wp: false, .. }));
        debug_assert!(self.may_map_huge() || self.huge().is_some());
        let was = self.huge.swap(entry.pack(), Ordering::SeqCst);
        if was == 0 {
            self.present.fetch_add(PAGES_PER_LEAF, Ordering::Relaxed);
            for w in &self.young {
                w.store(u64::MAX, Ordering::Relaxed);
            }
        }
        // As `set` records every change (a new frame after a copy too).
        if self.changes.recording() {
            (first..first + PAGES_PER_LEAF).for_each(|p| self.changes.note(p));
        }
    }

    /// Replaces the huge entry by `small` in every page, the same mapping
    /// 512 times; the caller holds the lock. Nothing the guest can see
    /// changes, so nothing is counted or recorded.
    pub(crate) fn split_huge(&self, small: Entry) {
        crate::lock::assert_held_any(&[Rank::Table, Rank::ChildTable]);
        debug_assert!(self.huge().is_some(), "split of a leaf that is not huge");
        let raw = small.pack();
        let table = self.attach_small();
        for e in table.0.iter() {
            e.store(raw, Ordering::Release);
        }
        self.huge.store(0, Ordering::SeqCst);
    }

    /// The small table, attaching the deposited one (or a new one) if a
    /// collapse retracted it; the caller holds the lock. The entries are
    /// written before a caller clears the huge entry, so a lockless walker
    /// that finds no huge entry finds them.
    fn attach_small(&self) -> &Small {
        if let Some(t) = self.small() {
            return t;
        }
        let deposit = self.deposit.swap(std::ptr::null_mut(), Ordering::Relaxed);
        let fresh = if deposit.is_null() {
            Box::into_raw(Small::new())
        } else {
            // SAFETY: a deposited table came from `Box::into_raw`, and only
            // we, under the leaf lock, can reach it.
            let t = unsafe { &*deposit };
            t.0.iter().for_each(|e| e.store(0, Ordering::Relaxed));
            deposit
        };
        self.small.store(fresh, Ordering::SeqCst);
        self.small().expect("just attached")
    }

    /// Detaches the small table for a collapse and waits until no
    /// lockless walker is inside the leaf; returns it, now the caller's
    /// alone. The caller holds the memory-map lock for writing and the
    /// leaf's lock, and either gives the table back with
    /// [`Leaf::reattach_small`] or retires it with [`Leaf::install_collapsed`].
    pub(crate) fn detach_small(&self) -> Box<Small> {
        crate::lock::assert_held(Rank::MapLock);
        crate::lock::assert_held(Rank::Table);
        let ptr = self.small.swap(std::ptr::null_mut(), Ordering::SeqCst);
        assert!(!ptr.is_null(), "detach of a leaf without small entries");
        fence(Ordering::SeqCst);
        let mut turn = 0;
        while self.walkers.load(Ordering::SeqCst) != 0 {
            crate::sync::spin(turn);
            turn = turn.wrapping_add(1);
        }
        // SAFETY: `ptr` came from `Box::into_raw`; it is no longer in the
        // leaf, no lock holder can reach it (we hold both locks that
        // exclude us) and every walker that could have loaded it has left.
        unsafe { Box::from_raw(ptr) }
    }

    /// Gives back a table detached by [`Leaf::detach_small`] (a collapse
    /// that was refused); the caller holds the locks it was detached under.
    pub(crate) fn reattach_small(&self, table: Box<Small>) {
        crate::lock::assert_held(Rank::Table);
        let was = self.small.swap(Box::into_raw(table), Ordering::SeqCst);
        debug_assert!(was.is_null(), "reattached over a table");
    }

    /// Finishes a collapse: sets the huge entry `entry` over the leaf
    /// whose small table `old` was detached (its entries already dropped
    /// by the caller), counting the leaf as 512 present young pages, and
    /// keeps `old`, cleared, for the next split.
    pub(crate) fn install_collapsed(&self, first: u64, entry: Entry, old: Box<Small>) {
        crate::lock::assert_held(Rank::Table);
        debug_assert!(matches!(entry, Entry::Present { wp: false, .. }));
        debug_assert!(self.huge().is_none() && self.small().is_none());
        let mut was_present = 0;
        for e in old.0.iter() {
            if Entry::raw_is_present(e.swap(0, Ordering::Relaxed)) {
                was_present += 1;
            }
        }
        // Checked builds poison the retired table until a split takes it
        // back: a walker that reads it (one the detach failed to wait for)
        // trips over it.
        #[cfg(any(loom, debug_assertions))]
        old.0
            .iter()
            .for_each(|e| e.store(RETIRED, Ordering::SeqCst));
        self.huge.store(entry.pack(), Ordering::SeqCst);
        self.present
            .fetch_add(PAGES_PER_LEAF - was_present, Ordering::Relaxed);
        for w in &self.young {
            w.store(u64::MAX, Ordering::Relaxed);
        }
        if self.changes.recording() {
            (first..first + PAGES_PER_LEAF).for_each(|p| self.changes.note(p));
        }
        let was = self.deposit.swap(Box::into_raw(old), Ordering::Relaxed);
        if !was.is_null() {
            // SAFETY: a deposited table came from `Box::into_raw` and is
            // reachable only through `deposit`, which we just emptied.
            drop(unsafe { Box::from_raw(was) });
        }
    }

    /// The packed entries, the leaf's first page first (none while the
    /// small table is detached); the caller holds the leaf's lock or the
    /// memory-map lock. For walks over whole leaves.
    pub(crate) fn raw_entries(&self) -> impl Iterator<Item = u64> + '_ {
        assert_locked();
        let entries: &[AtomicU64] = self.small().map_or(&[], |t| &t.0);
        entries.iter().map(|e| e.load(Ordering::Acquire))
    }

    /// Reads the packed entry (0, none, if the small table is detached);
    /// the caller holds the leaf's lock or the memory-map lock.
    pub(crate) fn raw(&self, page: u64) -> u64 {
        assert_locked();
        self.load(page)
    }

    /// The packed small entry of `page`, 0 (none) while the small table is
    /// detached; the caller is entitled to read it (see [`Leaf::small`]).
    fn load(&self, page: u64) -> u64 {
        self.small()
            .map_or(0, |t| t.slot(page).load(Ordering::Acquire))
    }

    /// Writes an entry. The caller holds this leaf's lock. An entry that
    /// becomes present is counted and marked young; while changes are
    /// recorded, any entry but a protected one with contents is recorded.
    pub(crate) fn set(&self, page: u64, entry: Entry) {
        crate::lock::assert_held_any(&[Rank::Table, Rank::ChildTable]);
        debug_assert!(
            self.huge.load(Ordering::Relaxed) == 0,
            "small entry {page:#x} set under a huge entry"
        );
        if self.changes.recording() && !(entry.wp() && entry.has_contents()) {
            self.changes.note(page);
        }
        let new = entry.pack();
        let old = self.attach_small().slot(page).swap(new, Ordering::Release);
        match (Entry::raw_is_present(old), Entry::raw_is_present(new)) {
            (false, true) => {
                self.present.fetch_add(1, Ordering::Relaxed);
                let (w, bit) = Self::young_bit(page);
                self.young[w].fetch_or(bit, Ordering::Relaxed);
            }
            (true, false) => {
                self.present.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Writes entries into pages of this leaf that hold none (fork filling
    /// its child's fresh leaf): each one a plain store, and the present
    /// ones counted and marked young once for all, where [`Leaf::set`]
    /// pays up to three atomic read-modify-writes an entry. The caller
    /// holds this leaf's lock.
    pub(crate) fn fill_empty(&self, entries: &[(u64, Entry)]) {
        crate::lock::assert_held_any(&[Rank::Table, Rank::ChildTable]);
        self.small_used.store(true, Ordering::Relaxed);
        let mut present = 0;
        let mut young = [0u64; YOUNG_WORDS];
        let table = self.attach_small();
        for &(page, entry) in entries {
            let new = entry.pack();
            let slot = table.slot(page);
            debug_assert_eq!(
                slot.load(Ordering::Relaxed),
                Entry::None.pack(),
                "filled over an entry"
            );
            slot.store(new, Ordering::Release);
            if Entry::raw_is_present(new) {
                present += 1;
                let (w, bit) = Self::young_bit(page);
                young[w] |= bit;
            }
        }
        if present > 0 {
            self.present.fetch_add(present, Ordering::Relaxed);
        }
        for (w, bits) in young.into_iter().enumerate() {
            if bits != 0 {
                self.young[w].fetch_or(bits, Ordering::Relaxed);
            }
        }
    }
}

/// Debug builds: asserts that the thread holds a lock that excludes a
/// retraction (a leaf lock or a memory-map lock).
fn assert_locked() {
    crate::lock::assert_held_any(&[
        Rank::MapLock,
        Rank::ChildMapLock,
        Rank::Table,
        Rank::ChildTable,
    ]);
}

impl Drop for Leaf {
    fn drop(&mut self) {
        for p in [&self.small, &self.deposit] {
            let ptr = p.swap(std::ptr::null_mut(), Ordering::Relaxed);
            if !ptr.is_null() {
                // SAFETY: both came from `Box::into_raw`; `&mut self`
                // proves no walker or lock holder is left.
                drop(unsafe { Box::from_raw(ptr) });
            }
        }
    }
}

/// What a retired small table holds in checked builds (no entry packs to
/// it).
#[cfg(any(loom, debug_assertions))]
const RETIRED: u64 = u64::MAX;

/// A lockless walker inside a leaf (see [`Leaf::walk`]).
pub(crate) struct Walk<'a> {
    leaf: &'a Leaf,
}

impl Walk<'_> {
    /// The huge entry, packed (0: none). Read it before small entries: a
    /// split writes those first.
    pub(crate) fn huge_raw(&self) -> u64 {
        self.leaf.huge_raw()
    }

    /// A small entry, packed; 0 (none) while the small table is detached.
    pub(crate) fn raw(&self, page: u64) -> u64 {
        let raw = self.leaf.load(page);
        #[cfg(any(loom, debug_assertions))]
        assert_ne!(raw, RETIRED, "a lockless walker read a retired table");
        raw
    }

    /// The entry of `page`, huge or small.
    pub(crate) fn get(&self, page: u64) -> Entry {
        match self.huge_raw() {
            0 => match self.raw(page) {
                // Detached under us: the collapse may have set the huge
                // entry by now.
                0 => Entry::unpack(self.huge_raw()),
                raw => Entry::unpack(raw),
            },
            raw => Entry::unpack(raw),
        }
    }
}

/// Pages whose entries were set, recorded while a live snapshot arms its
/// protection: each page once, in the order of their first change since
/// the last [`Changes::take`].
///
/// Recording starts before the snapshot visits any leaf and `note` runs
/// under the leaf lock of the entry it records, so an entry set after the
/// snapshot visited it is always recorded.
#[derive(Debug)]
pub(crate) struct Changes {
    /// Non-zero while recording.
    on: AtomicU32,
    log: RankedMutex<ChangeLog>,
}

#[derive(Debug, Default)]
struct ChangeLog {
    /// A bit per page recorded since the last take.
    seen: Vec<u64>,
    pages: Vec<u64>,
}

impl Changes {
    fn new() -> Self {
        Self {
            on: AtomicU32::new(0),
            log: RankedMutex::new(Rank::Changes, ChangeLog::default()),
        }
    }

    pub(crate) fn recording(&self) -> bool {
        self.on.load(Ordering::Acquire) != 0
    }

    fn note(&self, page: u64) {
        let mut log = self.log.lock();
        let (w, bit) = ((page / 64) as usize, 1 << (page % 64));
        // A change noted as recording stops is harmless: it is dropped.
        if let Some(word) = log.seen.get_mut(w) {
            if *word & bit == 0 {
                *word |= bit;
                log.pages.push(page);
            }
        }
    }

    /// Starts recording changes of a table of `pages` pages.
    pub(crate) fn start(&self, pages: u64) {
        let mut log = self.log.lock();
        log.seen = vec![0; pages.div_ceil(64) as usize];
        log.pages.clear();
        self.on.store(1, Ordering::SeqCst);
    }

    /// The pages recorded since the last take; recording goes on.
    pub(crate) fn take(&self) -> Vec<u64> {
        let mut log = self.log.lock();
        let pages = std::mem::take(&mut log.pages);
        for p in &pages {
            log.seen[(p / 64) as usize] &= !(1 << (p % 64));
        }
        pages
    }

    /// Stops recording; the pages recorded since the last take.
    pub(crate) fn stop(&self) -> Vec<u64> {
        self.on.store(0, Ordering::SeqCst);
        let mut log = self.log.lock();
        log.seen = Vec::new();
        std::mem::take(&mut log.pages)
    }
}

/// The stage-2 table of one VM.
#[derive(Debug)]
pub(crate) struct Table {
    top: Box<[AtomicU64]>,
    pages: u64,
    present: Arc<AtomicU64>,
    changes: Arc<Changes>,
}

impl Table {
    /// An empty table for `pages` pages.
    pub(crate) fn new(pages: u64) -> Self {
        Self {
            top: (0..pages.div_ceil(PAGES_PER_LEAF))
                .map(|_| AtomicU64::new(0))
                .collect(),
            pages,
            present: Arc::new(AtomicU64::new(0)),
            changes: Arc::new(Changes::new()),
        }
    }

    /// The record of changed entries (see [`Changes`]).
    pub(crate) fn changes(&self) -> &Changes {
        &self.changes
    }

    /// Present entries.
    pub(crate) fn present(&self) -> u64 {
        self.present.load(Ordering::Relaxed)
    }

    /// Number of pages covered.
    pub(crate) fn pages(&self) -> u64 {
        self.pages
    }

    fn slot(&self, page: u64) -> &AtomicU64 {
        assert!(page < self.pages, "page {page} outside the table");
        &self.top[(page / PAGES_PER_LEAF) as usize]
    }

    /// The leaf covering `page`, if one was installed.
    pub(crate) fn leaf(&self, page: u64) -> Option<&Leaf> {
        let raw = self.slot(page).load(Ordering::Acquire);
        // SAFETY: a non-zero top entry is a pointer produced by
        // `Box::into_raw` in `leaf_or_alloc`, freed only in `drop`, which
        // cannot run while `&self` is borrowed.
        (raw != 0).then(|| unsafe { &*(raw as *const Leaf) })
    }

    /// The leaf covering `page`, installing an empty one if there is none.
    pub(crate) fn leaf_or_alloc(&self, page: u64) -> &Leaf {
        self.leaf_or_alloc_with(page, true)
    }

    /// Like [`Table::leaf_or_alloc`], for a leaf that gets a huge entry
    /// next: a new one has no small table (a split attaches one).
    pub(crate) fn leaf_or_alloc_huge(&self, page: u64) -> &Leaf {
        self.leaf_or_alloc_with(page, false)
    }

    fn leaf_or_alloc_with(&self, page: u64, small: bool) -> &Leaf {
        if let Some(leaf) = self.leaf(page) {
            return leaf;
        }
        let fresh = Box::into_raw(Box::new(Leaf::new(
            self.present.clone(),
            self.changes.clone(),
            small,
        )));
        match self
            .slot(page)
            .compare_exchange(0, fresh as u64, Ordering::AcqRel, Ordering::Acquire)
        {
            // SAFETY: we just installed `fresh`; it lives until `drop`.
            Ok(_) => unsafe { &*fresh },
            Err(_) => {
                // SAFETY: `fresh` came from `Box::into_raw` above and was
                // never shared: the install lost the race.
                drop(unsafe { Box::from_raw(fresh) });
                self.leaf(page).expect("top entry set by the winner")
            }
        }
    }

    /// Reads an entry without a lock (a lockless walk, see [`Leaf::walk`]).
    pub(crate) fn get(&self, page: u64) -> Entry {
        self.leaf(page).map_or(Entry::None, |l| l.peek(page))
    }

    /// Indices of the installed leaves, in order.
    pub(crate) fn leaves(&self) -> impl Iterator<Item = (u64, &Leaf)> {
        (0..self.top.len() as u64).filter_map(move |i| {
            self.leaf(i * PAGES_PER_LEAF)
                .map(|l| (i * PAGES_PER_LEAF, l))
        })
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        for slot in self.top.iter() {
            let raw = slot.load(Ordering::Acquire);
            if raw != 0 {
                // SAFETY: installed by `leaf_or_alloc` from `Box::into_raw`;
                // `&mut self` proves no reference to it remains.
                drop(unsafe { Box::from_raw(raw as *mut Leaf) });
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn leaves_are_installed_once() {
        let t = Table::new(2000);
        assert!(t.leaf(5).is_none());
        let a = t.leaf_or_alloc(5) as *const Leaf;
        let b = t.leaf_or_alloc(511) as *const Leaf;
        assert_eq!(a, b);
        assert_ne!(a, t.leaf_or_alloc(512) as *const Leaf);
        assert_eq!(t.leaves().map(|(p, _)| p).collect::<Vec<_>>(), vec![0, 512]);
        let leaf = t.leaf(5).unwrap();
        let _g = leaf.lock().lock();
        leaf.set(5, Entry::writable(3));
        assert_eq!(t.get(5), Entry::writable(3));
        assert_eq!(t.present(), 1);
        assert!(leaf.take_young(5) && !leaf.take_young(5) && !leaf.take_young(6));
        leaf.set(5, Entry::Marker { wp: true });
        assert_eq!(t.present(), 0);
        assert_eq!(t.get(6), Entry::None);
        assert_eq!(t.get(1999), Entry::None);
    }

    #[test]
    #[should_panic(expected = "outside the table")]
    fn out_of_range_panics() {
        Table::new(10).get(10);
    }
}
