//! Resetting pages of a VM to what its origin maps: the reset of snapshot
//! fuzzing. The origin is the VM this one was forked from and that never
//! runs (the snapshot); after a run, the pages the run wrote are made to
//! read what the origin reads again.
//!
//! A page the run wrote is, in the common case, mapped writable, so its
//! frame is this VM's alone (R1): its bytes are overwritten in place with
//! the origin's, and it stays writable, so the next run writes it without
//! a fault. (Giving the page back to the origin's frame instead would make
//! every run pay a copy-on-write fault for each page it writes again.)
//!
//! ```text
//!   this VM            origin            action
//!   writable frame F   frame O           copy O's bytes into F
//!   writable frame F   none              zero F
//!   anything else                        read the origin's page, write it
//!                                        like the VMM writes (slow path)
//! ```
//!
//! Both VMs' map locks are held for reading, and, for each leaf, both leaf
//! locks: this VM's first, then the origin's (the origin plays the second
//! VM's role of the lock order in `lib.rs`). The origin's frames cannot
//! change while its leaf lock is held, and neither can this VM's entry.

use crate::entry::Entry;
use crate::layout::{PAGE_SIZE, PAGES_PER_LEAF};
use crate::lock::Rank;
use crate::vm::{MemError, VmMemory};

/// What a reset did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetReport {
    /// Pages whose frame got the origin's bytes.
    pub copied: u64,
    /// Pages whose frame was zeroed (the origin has none).
    pub zeroed: u64,
    /// Pages that already read what the origin reads.
    pub same: u64,
    /// Pages reset through the slow path (not mapped writable here).
    pub slow: u64,
}

impl VmMemory {
    /// Makes each page in `pages` (page numbers, in any order, repeats
    /// allowed; sorted on return) read what it reads in `origin`. `origin`
    /// must have this VM's layout and must not run meanwhile.
    pub fn reset_pages(
        &self,
        origin: &VmMemory,
        pages: &mut Vec<u64>,
    ) -> Result<ResetReport, MemError> {
        assert_eq!(
            self.layout.pages(),
            origin.layout.pages(),
            "a VM is reset to an origin of its own layout"
        );
        pages.sort_unstable();
        pages.dedup();
        pages.retain(|&p| p < self.layout.pages());
        let mut report = ResetReport::default();
        let mut slow = Vec::new();
        {
            let _map = self.map_lock.read();
            let _origin_map = origin.map_lock.read_as(Rank::ChildMapLock);
            for group in pages.chunk_by(|a, b| a / PAGES_PER_LEAF == b / PAGES_PER_LEAF) {
                self.reset_leaf(origin, group, &mut report, &mut slow);
            }
        }
        for page in slow {
            self.reset_page_slow(origin, page)?;
            report.slow += 1;
        }
        Ok(report)
    }

    /// The fast path for pages of one leaf; the others go to `slow`. The
    /// caller holds both map locks.
    fn reset_leaf(
        &self,
        origin: &VmMemory,
        group: &[u64],
        report: &mut ResetReport,
        slow: &mut Vec<u64>,
    ) {
        // Both leaves small before either lock is taken.
        let origin_leaf = origin.small_leaf(group[0]);
        let Some(leaf) = self.small_leaf(group[0]) else {
            // Nothing mapped here: only the origin can have something.
            slow.extend(
                group
                    .iter()
                    .filter(|&&p| origin.table.get(p) != Entry::None),
            );
            return;
        };
        let _ptl = leaf.lock().lock();
        let _origin_ptl = origin_leaf.map(|l| l.lock().lock_as(Rank::ChildTable));
        for &p in group {
            let theirs = origin_leaf.map_or(Entry::None, |l| l.get(p));
            let mine = leaf.get(p);
            let Entry::Present {
                store,
                writable: true,
                wp: false,
                ..
            } = mine
            else {
                // Unchanged: nothing mapped in either, or the origin's own
                // frame (entries name stores by each VM's own slot
                // numbers, so the frames are compared, not the entries).
                if (mine == Entry::None && theirs == Entry::None)
                    || self.same_frame(origin, mine, theirs)
                {
                    report.same += 1;
                } else {
                    slow.push(p);
                }
                continue;
            };
            // Writable: the frame is this VM's alone (R1), so no one else
            // sees the bytes change.
            let dst = self.store(store).frame_ptr(p);
            match theirs {
                Entry::Present { store: o, .. } => {
                    let src = origin.store(o).frame_ptr(p);
                    // SAFETY: both are whole frames held by entries whose
                    // leaf locks are held, in the stores' direct maps; they
                    // differ (this one is exclusive to this VM).
                    unsafe { crate::sys::copy_page(src, dst) };
                    report.copied += 1;
                }
                Entry::None => {
                    // SAFETY: a whole frame held by this VM's entry under
                    // its leaf lock, exclusive to this VM.
                    unsafe { crate::sys::zero_page(dst) };
                    report.zeroed += 1;
                }
                _ => slow.push(p),
            }
        }
    }

    /// Whether two present entries (this VM's and the origin's, of one page)
    /// name the same frame.
    fn same_frame(&self, origin: &VmMemory, mine: Entry, theirs: Entry) -> bool {
        match (mine.present_store(), theirs.present_store()) {
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(&self.store(a), &origin.store(b)),
            _ => false,
        }
    }

    /// Resets one page the way the VMM writes: the origin's bytes (zeros
    /// if it has none) written through a write fault. No lock is held.
    fn reset_page_slow(&self, origin: &VmMemory, page: u64) -> Result<(), MemError> {
        let gpa = self.gpa(page);
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        origin.read(gpa, &mut buf)?;
        self.write(gpa, &buf)
    }
}
