//! Live snapshots of a running VM's memory ([`crate::vm::Vm::snapshot_live`],
//! the API socket's `snapshot-live`, `vmm snapshot --live`).
//!
//! 1. Every vCPU saves its state and waits (the state a restore would
//!    load), and the virtio devices are held still.
//! 2. `memory` write-protects every page with contents and copies those a
//!    device may write through a pin: that instant is the image's.
//! 3. The vCPUs and devices go on; `memory` copies each page out before
//!    its first write, and every other page in the background.
//!
//! The guest is paused for 1 and 2 only: a visit per present page, like a
//! fork, and no copy but of device-writable pages.

use std::fs::File;
use std::time::{Duration, Instant};

use memory::{LiveSnapshot, SnapshotReport};

use crate::fork::{Paused, pause_vcpus};
use crate::vm::{VmShared, VmmError};

/// What a live snapshot did and how long it took.
#[derive(Clone, Copy, Debug)]
pub struct LiveReport {
    /// How long the guest was paused.
    pub pause: Duration,
    /// From the pause request to the image on disk.
    pub total: Duration,
    /// vCPUs whose state was saved (parked ones have none to save).
    pub vcpus: usize,
    /// What memory did.
    pub memory: SnapshotReport,
}

/// Writes the image of `vm`'s memory into `image`.
pub(crate) fn live(
    vm: &VmShared,
    image: File,
    progress: impl FnMut(u64, u64),
) -> Result<LiveReport, VmmError> {
    let snap = LiveSnapshot::prepare(&vm.mem, image)?;
    let start = Instant::now();
    let Paused {
        paused,
        states,
        failure,
    } = pause_vcpus(vm, None);
    let resume = || {
        for &i in &paused {
            vm.controls[i].resume();
        }
    };
    if let Some(why) = failure {
        resume();
        return Err(VmmError::Config(format!("cannot snapshot: {why}")));
    }
    let begun = {
        let _still = vm.virtio.hold();
        snap.begin(&vm.mem)
    };
    resume();
    let pause = start.elapsed();
    begun?;
    let memory = snap.copy_rest(&vm.mem, progress)?;
    Ok(LiveReport {
        pause,
        total: start.elapsed(),
        vcpus: states.iter().flatten().count(),
        memory,
    })
}
