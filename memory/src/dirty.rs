//! The record of guest pages the VMM wrote itself: through
//! [`VmMemory::write`] and through write pins (devices). KVM's dirty
//! tracking sees only the guest's own stores; a reset to a snapshot needs
//! both.
//!
//! Off until [`VmMemory::track_vmm_writes`] turns it on. A page is listed
//! once until the record is drained: one bit per page says it is listed.

use std::sync::OnceLock;

use crate::lock::{Rank, RankedMutex};
use crate::sync::{AtomicU64, Ordering};
use crate::vm::VmMemory;

/// Pages the VMM wrote since the record was last drained.
#[derive(Debug, Default)]
pub(crate) struct VmmWrites {
    /// Set once tracking is on: one bit per page, and the pages listed.
    on: OnceLock<Record>,
}

#[derive(Debug)]
struct Record {
    listed: Box<[AtomicU64]>,
    pages: RankedMutex<Vec<u64>>,
}

impl VmmWrites {
    /// Notes that the VMM wrote `page` (nothing if tracking is off).
    pub(crate) fn note(&self, page: u64) {
        let Some(r) = self.on.get() else { return };
        let Some(word) = r.listed.get((page / 64) as usize) else {
            return;
        };
        let bit = 1u64 << (page % 64);
        if word.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            r.pages.lock().push(page);
        }
    }
}

impl VmMemory {
    /// Starts recording the pages the VMM writes into this VM (a fork's
    /// child starts without a record).
    pub fn track_vmm_writes(&self) {
        let words = self.layout.pages().div_ceil(64) as usize;
        let _ = self.vmm_writes.on.set(Record {
            listed: (0..words).map(|_| AtomicU64::new(0)).collect(),
            pages: RankedMutex::new(Rank::VmmWrites, Vec::new()),
        });
    }

    /// Moves the page numbers the VMM wrote since the last call into `out`
    /// (each once); empty if tracking is off.
    pub fn take_vmm_writes(&self, out: &mut Vec<u64>) {
        let Some(r) = self.vmm_writes.on.get() else {
            return;
        };
        let taken = std::mem::take(&mut *r.pages.lock());
        for &page in &taken {
            r.listed[(page / 64) as usize].fetch_and(!(1u64 << (page % 64)), Ordering::Relaxed);
        }
        out.extend_from_slice(&taken);
    }
}
