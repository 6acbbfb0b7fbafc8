//! Live snapshots: a point-in-time image of a running VM's memory, written
//! while the guest keeps running (QEMU's background snapshot, built on
//! write protection with a synchronous listener, see `wp.rs`).
//!
//! Image file: sparse, guest-physical byte `gpa` at file offset `gpa`, as
//! long as the highest RAM address. Pages that were absent at the instant
//! of the snapshot, and pages of zeros, are holes.
//!
//! ```text
//!  vCPUs:   run ──┤ paused ├── run ─────────────────────────────────
//!  begin:         [protect every page that has contents; copy pages a
//!                  device may write through a pin]
//!  listener:                  first write to page P: copy P, then the
//!                             write lands
//!  copier:                    P0 P1 P2 ... copy each page nobody copied,
//!                             lift its protection (runs of pages)
//! ```
//!
//! Who copies a page: each page is *claimed* once (a bit per page). A
//! copier reads the page first and claims it after; only the claimant
//! writes the image. A write lands only once the listener told of it has
//! returned, and the listener claims before it returns, so whoever claims a
//! page read it before any write to it landed. A write that arrives after
//! the copier lifted a page's protection finds the page claimed already.
//!
//! A DISCARD (or balloon inflation) of a protected page is a write while a
//! snapshot runs: the listener is told first (`VmMemory::discard`).
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
use crate::sync::{Ordering, fence};
use crate::vm::{MemError, VmMemory};
use crate::wp::WriteListener;

/// Pages the copier handles together (one read pass, one lift of
/// protection, as few image writes as the runs of contents allow).
const RUN: u64 = 64;

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

/// What phase 1 of `begin` found.
struct Paused {
    /// Pages a device may write, copied at the instant.
    copies: Vec<(u64, Vec<u8>)>,
    /// A page the guest protected: the snapshot is refused.
    guest_wp: bool,
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
}

/// A live snapshot in progress: the VM's write listener.
pub struct LiveSnapshot {
    image: File,
    /// Pages protected at the start (bit per page number).
    todo: Vec<AtomicU64>,
    /// Pages whose contents are in the image or on their way (claimed).
    claimed: Vec<AtomicU64>,
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

fn bitmap(pages: u64) -> Vec<AtomicU64> {
    (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
}

impl LiveSnapshot {
    /// Prepares a live snapshot of `vm` into `image` (truncated, then
    /// sized to the RAM): the slow part, done before the VM is paused.
    pub fn prepare(vm: &VmMemory, image: File) -> Result<Arc<Self>, SnapshotError> {
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
            in_flight: AtomicUsize::new(0),
            before_write: AtomicU64::new(0),
            zero: AtomicU64::new(0),
            failed: Mutex::new(None),
        }))
    }

    /// Takes the snapshot's instant. The caller has paused the VM's vCPUs
    /// and holds its devices still; `resume` lets them go again, and is
    /// called exactly once, as early as the instant allows (on every path).
    /// Then [`LiveSnapshot::copy_rest`] completes the image.
    ///
    /// Like fork, in two phases under the memory-map lock (write) with the
    /// write-protect sequence odd, so the lockless pin path backs off (R8):
    ///
    /// 1. *paused*: every writable page with contents loses host write
    ///    access (runs of pages, one `mprotect` each), swap and migration
    ///    entries get the `wp` bit, and frames a device may write through a
    ///    pin are copied; then `resume`.
    /// 2. *running*: present entries get the `wp` bit. A guest write meets
    ///    a read-only host page and its fault waits for the map lock, so it
    ///    reaches the listener.
    pub fn begin(
        self: &Arc<Self>,
        vm: &VmMemory,
        resume: impl FnOnce(),
    ) -> Result<(), SnapshotError> {
        if vm.has_listener() {
            resume();
            return Err(SnapshotError::Busy("a write listener is set"));
        }
        if !vm.wp.begin_snapshot() {
            resume();
            return Err(SnapshotError::Busy("another live snapshot runs"));
        }
        let listener: Arc<dyn WriteListener> = self.clone();
        vm.set_write_listener(Some(listener));
        let protected = {
            let _map = vm.map_lock.write();
            vm.wp_seq.fetch_add(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let paused = self.protect_paused(vm);
            resume();
            self.protect_running(vm);
            vm.wp_seq.fetch_add(1, Ordering::SeqCst);
            paused
        };
        let failed = match protected {
            Ok(Paused {
                copies,
                guest_wp: false,
            }) => {
                for (page, bytes) in copies {
                    self.write_image(vm.gpa(page), &bytes);
                }
                match self.check() {
                    Ok(()) => return Ok(()),
                    Err(e) => e,
                }
            }
            Ok(Paused { guest_wp: true, .. }) => {
                SnapshotError::Busy("the guest holds write protection")
            }
            Err(e) => e.into(),
        };
        // Give every page back.
        let lifted = self.lift_all(vm);
        vm.set_write_listener(None);
        vm.wp.end_snapshot();
        lifted?;
        Err(failed)
    }

    /// Phase 1 of [`LiveSnapshot::begin`]; the caller holds the map lock
    /// for writing.
    fn protect_paused(&self, vm: &VmMemory) -> Result<Paused, MemError> {
        let mut out = Paused {
            copies: Vec::new(),
            guest_wp: false,
        };
        let mut runs = crate::fork::Runs::default();
        let stores = vm.stores.read().share();
        'leaves: for (first, leaf) in vm.table.leaves() {
            let _ptl = leaf.lock().lock();
            let end = (first + PAGES_PER_LEAF).min(vm.table.pages());
            // Frame metadata only where the leaf says a pin may exist.
            let leaf_pinned = leaf.maybe_pinned();
            let mut todo = 0u64;
            for page in first..end {
                if page % 64 == 0 && todo != 0 {
                    self.todo[(page / 64 - 1) as usize].fetch_or(todo, Ordering::Relaxed);
                    todo = 0;
                }
                let e = leaf.get(page);
                if e.wp() {
                    out.guest_wp = true;
                    self.todo[(page / 64) as usize].fetch_or(todo, Ordering::Relaxed);
                    break 'leaves;
                }
                match e {
                    Entry::None | Entry::Marker { .. } => continue,
                    Entry::Present {
                        store, writable, ..
                    } => {
                        let frame = leaf_pinned
                            .then(|| stores.get(store).expect("an entry names a filled slot"))
                            .filter(|f| f.meta(page).maybe_write_pinned());
                        if let Some(frame) = frame {
                            let mut bytes = vec![0u8; PAGE_SIZE as usize];
                            // SAFETY: `stores` holds the store and the map
                            // lock (write) keeps the entry, so the frame
                            // stays mapped; devices are held still, so
                            // nothing writes it meanwhile.
                            unsafe { crate::sys::read_frame(frame.frame_ptr(page), &mut bytes) };
                            set_bit(&self.claimed, page);
                            out.copies.push((page, bytes));
                        } else if writable {
                            if let Err(e) = runs.add(vm, page) {
                                // Phase 2 still demotes the pages done so
                                // far, and `begin` gives them back.
                                todo |= 1 << (page % 64);
                                self.todo[(page / 64) as usize].fetch_or(todo, Ordering::Relaxed);
                                let _ = runs.flush(vm);
                                return Err(e);
                            }
                        }
                    }
                    Entry::Swap {
                        slot, exclusive, ..
                    } => leaf.set(
                        page,
                        Entry::Swap {
                            slot,
                            exclusive,
                            wp: true,
                        },
                    ),
                    Entry::Migration { store, kind, .. } => leaf.set(
                        page,
                        Entry::Migration {
                            store,
                            kind,
                            wp: true,
                        },
                    ),
                }
                todo |= 1 << (page % 64);
            }
            if todo != 0 {
                self.todo[((end - 1) / 64) as usize].fetch_or(todo, Ordering::Relaxed);
            }
        }
        runs.flush(vm)?;
        Ok(out)
    }

    /// Phase 2 of [`LiveSnapshot::begin`]: the present pages to do (not
    /// those copied already) get the `wp` bit. The caller holds the map
    /// lock for writing.
    fn protect_running(&self, vm: &VmMemory) {
        for (first, leaf) in vm.table.leaves() {
            let _ptl = leaf.lock().lock();
            let end = (first + PAGES_PER_LEAF).min(vm.table.pages());
            for page in (first..end).filter(|p| bit(&self.todo, *p) && !bit(&self.claimed, *p)) {
                if let Entry::Present {
                    store,
                    wp: false,
                    soft_dirty,
                    ..
                } = leaf.get(page)
                {
                    leaf.set(
                        page,
                        Entry::Present {
                            store,
                            writable: false,
                            wp: true,
                            soft_dirty,
                        },
                    );
                }
            }
        }
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
        let snap = Self::prepare(vm, image)?;
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
                self.fail(io::Error::other(e));
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
        if bit(&self.todo, page) && self.copy_run(vm, &[page]) == 1 {
            self.before_write.fetch_add(1, Ordering::Relaxed);
        }
    }
}
