//! Tearing down host page tables off the paths that wait for them.
//!
//! Dropping a populated range of host page table entries costs per entry
//! (on this kind of host several hundred nanoseconds each: a gigabyte is
//! tens of milliseconds). Fork sheds the parent's entries by moving them
//! out whole (see `Mapping::move_entries_out`); the range they moved to is
//! handed here once the fork is done and unmapped by one thread, a piece
//! at a time, while the VMs run. (At the lowest priority it would hold the
//! host's mapping lock while preempted, and every `mmap` of the VMM would
//! wait for it.) Nothing reaches those entries meanwhile: no memslot
//! names the range and no pointer into it exists; a frame freed meanwhile
//! is unmapped from it by the host like from any other mapping. A fork
//! that moves the VM to new host ranges hands over the old host mapping
//! whole the same way; the memslots of the old KVM VM still name it, but
//! no vCPU runs there any more (KVM drops its mappings as pieces go).

use crate::sys::Mapping;

/// Pages unmapped per call: short enough that a fault's `mmap` never waits
/// long behind one.
const CHUNK_PAGES: u64 = 64;

/// Starts the reaper thread unless it runs: done when the first memory
/// context is made, so that no fork pays for starting a thread (which
/// waits for the host's mapping lock like an `mmap`).
#[cfg(not(loom))]
pub(crate) fn start() {
    reaper();
}

#[cfg(loom)]
pub(crate) fn start() {}

#[cfg(not(loom))]
fn reaper() -> Option<&'static std::sync::mpsc::Sender<Mapping>> {
    use std::sync::OnceLock;
    use std::sync::mpsc::{Sender, channel};
    static REAPER: OnceLock<Option<Sender<Mapping>>> = OnceLock::new();
    REAPER
        .get_or_init(|| {
            let (tx, rx) = channel::<Mapping>();
            std::thread::Builder::new()
                .name("host-reaper".into())
                .spawn(move || {
                    for m in rx {
                        m.release_gradually(CHUNK_PAGES);
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

/// Unmaps `m` soon, on the reaper thread (now, if it cannot be started).
#[cfg(not(loom))]
pub(crate) fn release_later(m: Mapping) {
    match reaper() {
        Some(tx) => {
            if let Err(back) = tx.send(m) {
                back.0.release_gradually(CHUNK_PAGES);
            }
        }
        None => m.release_gradually(CHUNK_PAGES),
    }
}

/// Under loom no thread is started: the range is unmapped at once.
#[cfg(loom)]
pub(crate) fn release_later(m: Mapping) {
    m.release_gradually(CHUNK_PAGES);
}
