//! Live snapshots: a point-in-time image of a running VM's memory, written
//! while the guest keeps running (QEMU's background snapshot, built on
//! write protection with a synchronous listener, see `wp.rs`).
//!
//! Image file: sparse, guest-physical byte `gpa` at file offset `gpa`, as
//! long as the highest RAM address. Pages that were absent at the instant
//! of the snapshot, and pages of zeros, are holes.
//!
//! ```text
//!  vCPUs:   run ──────────────────┤ paused ├── run ─────────────────────
//!  prepare: [arm: protect every page with contents; catch up on pages
//!            that changed meanwhile, until few are left]
//!  begin:                         [catch up on the last changed pages;
//!                                  copy pages a device may write]
//!  listener:                                  first write to page P:
//!                                             copy P, then the write lands
//!  copier:                                    P0 P1 P2 ... copy each page
//!                                             nobody copied, lift its
//!                                             protection (runs of pages)
//! ```
//!
//! Arming, while the guest runs: the table starts recording every page
//! whose entry is set to anything but a protected entry with contents
//! (`table.rs`, [`crate::table::Changes`]); then every page with contents
//! loses host write access and gets the `wp` bit, except pages whose frame
//! a device may write through a pin, which are only listed. Before the
//! instant the listener hears of nothing: a write to a protected page
//! lifts its protection as if no one listened, and the table records the
//! page. Catching up on a page looks at its entry again (under its leaf
//! lock) and protects it, or notes that it has no contents any more.
//!
//! The instant, with the vCPUs paused and devices held still, under the
//! memory-map lock (write) and the write-protect sequence held odd (R8):
//! recording stops, the pages it recorded and the listed pages are caught
//! up (pages a device may write are copied now), and the listener starts
//! hearing writes. The pause costs a visit per page changed since the last
//! catch-up and per page a device may write, whatever the RAM size.
//!
//! Who copies a page: each page is *claimed* once (a bit per page). A
//! copier reads the page first and claims it after; only the claimant
//! writes the image. After the instant, a write to a protected page that
//! the snapshot still needs (had contents at the instant, not claimed)
//! lands only once the listener has claimed it: the fault asks the
//! listener under the page's leaf lock ([`WriteListener::must_hear`]), so
//! a fault that started before the instant asks again. Whoever claims a
//! page read it before any later write to it landed. A write that arrives
//! after the copier lifted a page's protection finds the page claimed.
//!
//! A DISCARD (or balloon inflation) of a protected page is a write while a
//! snapshot runs: after the instant the listener is told first
//! (`VmMemory::discard`); before it, the table records the page.
//!
//! While a snapshot runs, the VM's write protection belongs to it: arming
//! protection for the guest is refused ([`MemError::Busy`]), and a snapshot
//! is refused while the guest holds protection or another listener is set.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use thiserror::Error;

use crate::entry::Entry;
use crate::layout::{PAGE_SIZE, PAGES_PER_LEAF};
use crate::slots::StoreList;
use crate::sync::{AtomicU32, Ordering, fence};
use crate::table::Leaf;
use crate::vm::{MemError, VmMemory};
use crate::wp::WriteListener;

/// Pages the copier handles together (one read pass, one lift of
/// protection, as few image writes as the runs of contents allow).
const RUN: u64 = 64;

/// Catch-up rounds arming runs at most while the guest runs.
const CATCH_UP_ROUNDS: usize = 4;

/// Arming stops catching up once a round found this few pages changed.
const FEW: usize = 64;

/// Why a live snapshot failed.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// Write protection is in use by the guest or another listener.
    #[error("the VM's write protection is in use ({0}); a live snapshot needs it")]
    Busy(&'static str),
    /// The image file could not be sized or written.
    #[error("cannot write the snapshot image")]
    Image(#[source] io::Error),
    /// Guest memory could not be protected or read.
    #[error("guest memory")]
    Memory(#[from] MemError),
}

/// What a finished snapshot did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotReport {
    /// Pages that had contents at the instant of the snapshot.
    pub pages: u64,
    /// Of those, copied at the start because a device may write them.
    pub at_start: u64,
    /// Copied by the listener, before a write landed.
    pub before_write: u64,
    /// Copied by the background copier.
    pub in_background: u64,
    /// Pages of zeros, left as holes.
    pub zero: u64,
    /// Entries the instant looked at, with the guest paused: pages changed
    /// since arming last caught up, and pages a device may write.
    pub paused_visits: u64,
}

/// Where a snapshot is (`LiveSnapshot::stage`).
const NEW: u32 = 0;
/// Protection armed; the instant is not taken yet.
const ARMED: u32 = 1;
/// The instant is taken: the listener hears writes.
const TAKEN: u32 = 2;
/// Finished or given up: every page given back.
const ENDED: u32 = 3;

/// A live snapshot in progress: the VM's write listener.
pub struct LiveSnapshot {
    image: File,
    /// Pages with contents (bit per page number): at the instant, once it
    /// is taken.
    todo: Vec<AtomicU64>,
    /// Pages whose contents are in the image or on their way (claimed).
    claimed: Vec<AtomicU64>,
    /// Pages left unprotected because a device may write their frames
    /// through a pin: every catch-up looks at them again.
    pinned: Mutex<Vec<u64>>,
    stage: AtomicU32,
    /// Entries the instant looked at.
    paused_visits: AtomicU64,
    /// Listener calls under way.
    in_flight: AtomicUsize,
    before_write: AtomicU64,
    zero: AtomicU64,
    /// The first error writing the image (a listener cannot return one).
    failed: Mutex<Option<io::Error>>,
}

impl std::fmt::Debug for LiveSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSnapshot").finish_non_exhaustive()
    }
}

fn bit(map: &[AtomicU64], page: u64) -> bool {
    map[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
}

/// Sets a bit; true if this call set it.
fn set_bit(map: &[AtomicU64], page: u64) -> bool {
    let mask = 1 << (page % 64);
    map[(page / 64) as usize].fetch_or(mask, Ordering::AcqRel) & mask == 0
}

fn clear_bit(map: &[AtomicU64], page: u64) {
    map[(page / 64) as usize].fetch_and(!(1 << (page % 64)), Ordering::AcqRel);
}

fn bitmap(pages: u64) -> Vec<AtomicU64> {
    (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
}

/// Whether a device may write the frame of present page `page` through a
/// pin.
fn write_pinned(stores: &StoreList, store: u32, page: u64) -> bool {
    stores
        .get(store)
        .expect("an entry names a filled slot")
        .meta(page)
        .maybe_write_pinned()
}

impl LiveSnapshot {
    /// Prepares a live snapshot of `vm` into `image` (truncated, then
    /// sized to the RAM) and arms its protection: the slow part, done
    /// while the guest runs. [`LiveSnapshot::begin`] takes the instant;
    /// if it is never called, [`LiveSnapshot::cancel`] gives the VM's
    /// pages back.
    pub fn prepare(vm: &VmMemory, image: File) -> Result<Arc<Self>, SnapshotError> {
        let snap = Self::new(vm, image)?;
        snap.arm(vm)?;
        Ok(snap)
    }

    fn new(vm: &VmMemory, image: File) -> Result<Arc<Self>, SnapshotError> {
        let end = vm.layout.ranges().iter().map(|r| r.gpa + r.len).max();
        image.set_len(0).map_err(SnapshotError::Image)?;
        image
            .set_len(end.unwrap_or(0))
            .map_err(SnapshotError::Image)?;
        let pages = vm.table.pages();
        Ok(Arc::new(Self {
            image,
            todo: bitmap(pages),
            claimed: bitmap(pages),
            pinned: Mutex::new(Vec::new()),
            stage: AtomicU32::new(NEW),
            paused_visits: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            before_write: AtomicU64::new(0),
            zero: AtomicU64::new(0),
            failed: Mutex::new(None),
        }))
    }

    fn taken(&self) -> bool {
        self.stage.load(Ordering::Acquire) == TAKEN
    }

    fn take_pinned(&self) -> Vec<u64> {
        std::mem::take(&mut *self.pinned.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Arms protection over every page with contents while the guest runs,
    /// then catches up on the pages that changed meanwhile, a few rounds,
    /// so the instant finds few left.
    fn arm(self: &Arc<Self>, vm: &VmMemory) -> Result<(), SnapshotError> {
        if vm.has_listener() {
            return Err(SnapshotError::Busy("a write listener is set"));
        }
        if !vm.wp.begin_snapshot() {
            return Err(SnapshotError::Busy("another live snapshot runs"));
        }
        // Until the instant the listener hears nothing (see `must_hear`).
        self.stage.store(ARMED, Ordering::Release);
        let listener: Arc<dyn WriteListener> = self.clone();
        vm.set_write_listener(Some(listener));
        let armed = self.protect_all(vm).and_then(|()| {
            for _ in 0..CATCH_UP_ROUNDS {
                let _map = vm.map_lock.read();
                let pages = self.with_seq_odd(vm, || {
                    let mut pages = vm.table.changes().take();
                    pages.extend(self.take_pinned());
                    self.catch_up(vm, pages, false).map(|(n, _)| n)
                })?;
                if pages <= FEW {
                    break;
                }
            }
            Ok(())
        });
        if armed.is_err() {
            self.give_back(vm)?;
        }
        armed
    }

    /// Runs `f` with the VM's write-protect sequence count odd, fenced, so
    /// the lockless pin path backs off or is seen (R8, as fork does). The
    /// caller holds the memory-map lock, which keeps fork, the count's
    /// other writer, out.
    fn with_seq_odd<R>(&self, vm: &VmMemory, f: impl FnOnce() -> R) -> R {
        crate::lock::assert_held(crate::lock::Rank::MapLock);
        vm.wp_seq.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let r = f();
        vm.wp_seq.fetch_add(1, Ordering::SeqCst);
        r
    }

    /// Arming's walk: every page with contents gets protected, or listed
    /// if a device may write it. Fails if the guest holds protection.
    fn protect_all(&self, vm: &VmMemory) -> Result<(), SnapshotError> {
        let _map = vm.map_lock.read();
        // Before any leaf is visited: a change after a visit is recorded.
        vm.table.changes().start(vm.table.pages());
        self.with_seq_odd(vm, || {
            for (first, leaf) in vm.small_leaves() {
                let _ptl = leaf.lock().lock();
                // Read under the leaf lock: faults run meanwhile and may
                // add stores, but not empty a slot an entry names.
                let stores = vm.stores.read();
                let end = (first + PAGES_PER_LEAF).min(vm.table.pages());
                self.protect_leaf(vm, leaf, first, end, &stores)?;
            }
            Ok(())
        })
    }

    /// Protects pages `[first, end)` of `leaf` (its lock held): the host
    /// mapping in runs of pages first, then the entries.
    fn protect_leaf(
        &self,
        vm: &VmMemory,
        leaf: &Leaf,
        first: u64,
        end: u64,
        stores: &StoreList,
    ) -> Result<(), SnapshotError> {
        if (first..end).any(|p| leaf.get(p).wp()) {
            return Err(SnapshotError::Busy("the guest holds write protection"));
        }
        // Frame metadata only where the leaf says a pin may exist.
        let leaf_pinned = leaf.maybe_pinned();
        let mut runs = crate::fork::Runs::default();
        let mut protect = Vec::new();
        let mut pinned = Vec::new();
        let mut host = Ok(());
        for page in first..end {
            let e = leaf.get(page);
            if let Entry::Present {
                store, writable, ..
            } = e
            {
                if leaf_pinned && write_pinned(stores, store, page) {
                    pinned.push(page);
                    continue;
                }
                if writable && host.is_ok() {
                    host = runs.add(vm, page);
                }
            }
            if e.has_contents() {
                protect.push(page);
            }
        }
        let host = host.and_then(|()| runs.flush(vm));
        for &page in &protect {
            if host.is_ok() {
                leaf.set(page, leaf.get(page).with_wp(true));
                set_bit(&self.todo, page);
            } else {
                // Some host pages lost write access: their entries follow,
                // unprotected (the next write reuses the frame).
                crate::vm::demote_entry(leaf, page);
            }
        }
        host?;
        for &page in &pinned {
            set_bit(&self.todo, page);
        }
        self.pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(pinned);
        Ok(())
    }

    /// Looks again at the entries of `pages`, each under its leaf lock:
    /// pages without contents leave the snapshot, the others get protected,
    /// and those a device may write are listed again (`paused` false) or
    /// copied now (`paused`). The caller holds the memory-map lock and the
    /// write-protect sequence odd. Returns the pages looked at and the
    /// copies.
    #[allow(clippy::type_complexity)]
    fn catch_up(
        &self,
        vm: &VmMemory,
        mut pages: Vec<u64>,
        paused: bool,
    ) -> Result<(usize, Vec<(u64, Vec<u8>)>), MemError> {
        pages.sort_unstable();
        pages.dedup();
        let mut copies = Vec::new();
        let mut pinned = Vec::new();
        for &page in &pages {
            let Some(leaf) = vm.small_leaf(page) else {
                clear_bit(&self.todo, page);
                continue;
            };
            let _ptl = leaf.lock().lock();
            // Under the leaf lock (see `protect_all`).
            let stores = vm.stores.read();
            let e = leaf.get(page);
            if !e.has_contents() {
                // A marker of ours, left by a discard: nothing to keep.
                if e.wp() {
                    leaf.set(page, Entry::None);
                }
                clear_bit(&self.todo, page);
                continue;
            }
            set_bit(&self.todo, page);
            if let Entry::Present {
                store, writable, ..
            } = e
            {
                if write_pinned(&stores, store, page) {
                    if paused {
                        let mut bytes = vec![0u8; PAGE_SIZE as usize];
                        let frame = stores.get(store).expect("an entry names a filled slot");
                        // SAFETY: `stores` holds the store and the leaf
                        // lock keeps the entry, so the frame stays mapped;
                        // devices are held still, so nothing writes it
                        // meanwhile.
                        unsafe { crate::sys::read_frame(frame.frame_ptr(page), &mut bytes) };
                        set_bit(&self.claimed, page);
                        copies.push((page, bytes));
                    } else {
                        pinned.push(page);
                    }
                    continue;
                }
                if writable {
                    // The host page loses write access before the entry.
                    vm.host_protect(page, 1, false)?;
                }
            }
            if !e.wp() {
                leaf.set(page, e.with_wp(true));
            }
        }
        self.pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(pinned);
        Ok((pages.len(), copies))
    }

    /// Takes the snapshot's instant. The caller has paused the VM's vCPUs
    /// and holds its devices still; `resume` lets them go again, and is
    /// called exactly once, as early as the instant allows (on every path).
    /// Then [`LiveSnapshot::copy_rest`] completes the image.
    ///
    /// Under the memory-map lock (write) with the write-protect sequence
    /// odd, so the lockless pin path backs off (R8): recording changes
    /// stops, the pages it recorded since arming last caught up, and those
    /// a device may write, are caught up (the latter copied), and the
    /// listener starts hearing writes; then `resume`. Nothing here walks
    /// the table.
    pub fn begin(&self, vm: &VmMemory, resume: impl FnOnce()) -> Result<(), SnapshotError> {
        if self.stage.load(Ordering::Acquire) != ARMED {
            resume();
            return Err(SnapshotError::Busy("the snapshot is not armed"));
        }
        let caught_up = {
            let _map = vm.map_lock.write();
            self.with_seq_odd(vm, || {
                let mut pages = vm.table.changes().stop();
                pages.extend(self.take_pinned());
                let caught_up = self.catch_up(vm, pages, true);
                if let Ok((n, _)) = &caught_up {
                    self.paused_visits.store(*n as u64, Ordering::Relaxed);
                }
                // A fault waiting for the map lock asks the listener again.
                self.stage.store(TAKEN, Ordering::Release);
                resume();
                caught_up
            })
        };
        let failed = match caught_up {
            Ok((_, copies)) => {
                for (page, bytes) in copies {
                    self.write_image(vm.gpa(page), &bytes);
                }
                match self.check() {
                    Ok(()) => return Ok(()),
                    Err(e) => e,
                }
            }
            Err(e) => e.into(),
        };
        self.give_back(vm)?;
        Err(failed)
    }

    /// Gives up a snapshot that was prepared (and possibly begun) but will
    /// not be completed: every page gets its protection lifted and the
    /// listener goes. Nothing happens if the snapshot ended already.
    pub fn cancel(&self, vm: &VmMemory) -> Result<(), SnapshotError> {
        self.give_back(vm)
    }

    /// Stops recording, lifts every protection of this snapshot, removes
    /// the listener; once.
    fn give_back(&self, vm: &VmMemory) -> Result<(), SnapshotError> {
        if matches!(self.stage.swap(ENDED, Ordering::AcqRel), NEW | ENDED) {
            return Ok(());
        }
        vm.table.changes().stop();
        let lifted = self.lift_all(vm);
        vm.set_write_listener(None);
        vm.wp.end_snapshot();
        lifted
    }

    fn write_image(&self, gpa: u64, bytes: &[u8]) {
        if bytes.iter().all(|b| *b == 0) {
            self.zero
                .fetch_add(bytes.len() as u64 / PAGE_SIZE, Ordering::Relaxed);
            return;
        }
        if let Err(e) = self.image.write_all_at(bytes, gpa) {
            self.fail(e);
        }
    }

    fn fail(&self, e: io::Error) {
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        failed.get_or_insert(e);
    }

    fn check(&self) -> Result<(), SnapshotError> {
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        match failed.take() {
            Some(e) => Err(SnapshotError::Image(e)),
            None => Ok(()),
        }
    }

    /// Copies every page nobody copied yet, lifting protection as it goes,
    /// then removes the listener and waits for the copies still under way.
    /// `progress(done, total)` hears of each run of pages.
    pub fn copy_rest(
        &self,
        vm: &VmMemory,
        progress: impl FnMut(u64, u64),
    ) -> Result<SnapshotReport, SnapshotError> {
        let copied = self.copy_todo(vm, true, progress);
        self.stage.store(ENDED, Ordering::Release);
        vm.set_write_listener(None);
        vm.wp.end_snapshot();
        while self.in_flight.load(Ordering::Acquire) != 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
        self.finish(copied?)
    }

    /// Copies every page with contents now, without any protection: the
    /// caller keeps the VM's vCPUs paused and its devices still until this
    /// returns (a stop-the-world snapshot).
    pub fn copy_stopped(
        vm: &VmMemory,
        image: File,
        progress: impl FnMut(u64, u64),
    ) -> Result<SnapshotReport, SnapshotError> {
        let snap = Self::new(vm, image)?;
        vm.walk_leaves(0, vm.table.pages(), false, |leaf, at, n| {
            for page in at..at + n {
                if !matches!(leaf.get(page), Entry::None | Entry::Marker { .. }) {
                    set_bit(&snap.todo, page);
                }
            }
            Ok(())
        })?;
        let copied = snap.copy_todo(vm, false, progress)?;
        snap.finish(copied)
    }

    /// Copies the pages to do that nobody claimed, in runs, lifting their
    /// protection after each run if `lift`. The report so far.
    fn copy_todo(
        &self,
        vm: &VmMemory,
        lift: bool,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<SnapshotReport, SnapshotError> {
        let pages = vm.table.pages();
        let total = self
            .todo
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum();
        let mut report = SnapshotReport {
            pages: total,
            ..SnapshotReport::default()
        };
        let mut done = 0;
        for first in (0..pages).step_by(RUN as usize) {
            let end = (first + RUN).min(pages);
            let run: Vec<u64> = (first..end).filter(|p| bit(&self.todo, *p)).collect();
            if run.is_empty() {
                continue;
            }
            report.in_background += self.copy_run(vm, &run) as u64;
            if lift {
                self.lift(vm, run[0], run[run.len() - 1] + 1)?;
            }
            done += run.len() as u64;
            progress(done, total);
        }
        Ok(report)
    }

    /// Completes `report` once every copy is done and the image is on disk.
    fn finish(&self, mut report: SnapshotReport) -> Result<SnapshotReport, SnapshotError> {
        self.check()?;
        self.image.sync_data().map_err(SnapshotError::Image)?;
        report.before_write = self.before_write.load(Ordering::Relaxed);
        report.zero = self.zero.load(Ordering::Relaxed);
        report.paused_visits = self.paused_visits.load(Ordering::Relaxed);
        report.at_start = report.pages - report.in_background - report.before_write;
        Ok(report)
    }

    /// Copies the unclaimed pages of `run` (sorted page numbers): reads
    /// them all, claims them, and writes each stretch of consecutive
    /// claimed pages with one call. Returns the pages it claimed.
    fn copy_run(&self, vm: &VmMemory, run: &[u64]) -> usize {
        let base = run[0];
        let span = (run[run.len() - 1] - base + 1) as usize;
        let mut buf = vec![0u8; span * PAGE_SIZE as usize];
        let mut mine = vec![false; span];
        for &page in run {
            if bit(&self.claimed, page) {
                continue;
            }
            let i = (page - base) as usize;
            let out = &mut buf[i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize];
            if let Err(e) = vm.read(vm.gpa(page), out) {
                // Claimed all the same, so a write waiting for this copy
                // goes on; the snapshot fails.
                self.fail(io::Error::other(e));
                set_bit(&self.claimed, page);
                continue;
            }
            mine[i] = set_bit(&self.claimed, page);
        }
        // Stretches of consecutive claimed pages with contents, within one
        // guest-physical run each; claimed pages of zeros stay holes.
        let page_bytes = |i: usize| &buf[i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize];
        let contiguous = |a: usize, b: usize| {
            vm.gpa(base + b as u64) == vm.gpa(base + a as u64) + (b - a) as u64 * PAGE_SIZE
        };
        let mut stretch: Option<(usize, usize)> = None;
        let flush = |stretch: Option<(usize, usize)>| {
            if let Some((s, e)) = stretch {
                let bytes = &buf[s * PAGE_SIZE as usize..e * PAGE_SIZE as usize];
                if let Err(err) = self.image.write_all_at(bytes, vm.gpa(base + s as u64)) {
                    self.fail(err);
                }
            }
        };
        for (i, _) in mine.iter().enumerate().filter(|(_, m)| **m) {
            if page_bytes(i).iter().all(|b| *b == 0) {
                self.zero.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            stretch = match stretch {
                Some((s, e)) if e == i && contiguous(s, i) => Some((s, i + 1)),
                other => {
                    flush(other);
                    Some((i, i + 1))
                }
            };
        }
        flush(stretch);
        mine.iter().filter(|m| **m).count()
    }
}

impl LiveSnapshot {
    /// Lifts the protection this snapshot armed on pages `[first, end)`.
    fn lift(&self, vm: &VmMemory, first: u64, end: u64) -> Result<(), SnapshotError> {
        vm.walk_leaves(first, end - first, false, |leaf, at, n| {
            for page in (at..at + n).filter(|p| bit(&self.todo, *p)) {
                if leaf.get(page).wp() {
                    vm.protect_entry(leaf, page, false)?;
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    fn lift_all(&self, vm: &VmMemory) -> Result<(), SnapshotError> {
        self.lift(vm, 0, vm.table.pages())
    }
}

/// Counts a listener call while it runs.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Self(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl WriteListener for LiveSnapshot {
    fn before_write(&self, vm: &VmMemory, gpa: u64) {
        let _busy = InFlight::enter(&self.in_flight);
        let Some(page) = vm.layout.page_of(gpa) else {
            return;
        };
        if self.taken() && bit(&self.todo, page) && self.copy_run(vm, &[page]) == 1 {
            self.before_write.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Before the instant, never (arming catches up on the page); after
    /// it, until the page is claimed, whether or not this write told the
    /// listener already: a write told before the instant is told again.
    fn must_hear(&self, vm: &VmMemory, gpa: u64, _told: bool) -> bool {
        vm.layout
            .page_of(gpa)
            .is_some_and(|p| self.taken() && bit(&self.todo, p) && !bit(&self.claimed, p))
    }

    /// The pages with contents are the snapshot's; others with protection
    /// can only be the guest's, met while arming (which then gives up).
    fn protects(&self, vm: &VmMemory, gpa: u64) -> bool {
        vm.layout.page_of(gpa).is_some_and(|p| bit(&self.todo, p))
    }
}
