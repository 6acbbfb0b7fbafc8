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
    /// Of the pause, how long the vCPUs took to stop and save their state.
    pub vcpu_save: Duration,
    /// From the pause request to the image on disk.
    pub total: Duration,
    /// vCPUs whose state was saved (parked ones have none to save).
    pub vcpus: usize,
    /// What memory did.
    pub memory: SnapshotReport,
}

/// Writes the image of `vm`'s memory into `image` while the guest runs.
pub(crate) fn live(
    vm: &VmShared,
    image: File,
    progress: impl FnMut(u64, u64),
) -> Result<LiveReport, VmmError> {
    let snap = LiveSnapshot::prepare(&vm.mem, image)?;
    // While the guest runs, take write access from every page: the pause
    // then only covers pages written since.
    if let Err(e) = vm.mem.demote_writable() {
        log::debug!("snapshot: demoting pages ahead: {}", crate::error_chain(&e));
    }
    let (mut report, started) = paused(vm, |resume| Ok(snap.begin(&vm.mem, resume)?))?;
    report.memory = snap.copy_rest(&vm.mem, progress)?;
    report.total = started.elapsed();
    Ok(report)
}

/// Writes the image of `vm`'s memory into `image` with the guest paused
/// throughout (the baseline a live snapshot is measured against).
pub(crate) fn stopped(
    vm: &VmShared,
    image: File,
    progress: impl FnMut(u64, u64),
) -> Result<LiveReport, VmmError> {
    let mut memory = SnapshotReport::default();
    let (mut report, _) = paused(vm, |resume| {
        memory = LiveSnapshot::copy_stopped(&vm.mem, image, progress)?;
        resume();
        Ok(())
    })?;
    report.memory = memory;
    Ok(report)
}

/// Runs `f` with every vCPU paused (its state saved) and the devices held
/// still, until `f` calls the resume function it is given (or returns); a
/// report with the pause's timings, and when the pause began.
fn paused(
    vm: &VmShared,
    f: impl FnOnce(&mut dyn FnMut()) -> Result<(), VmmError>,
) -> Result<(LiveReport, Instant), VmmError> {
    let started = Instant::now();
    let Paused {
        paused,
        states,
        failure,
    } = pause_vcpus(vm, None);
    let vcpu_save = started.elapsed();
    let mut still = Some(vm.virtio.hold());
    let mut pause = None;
    let mut resume = || {
        if pause.is_none() {
            drop(still.take());
            for &i in &paused {
                vm.controls[i].resume();
            }
            pause = Some(started.elapsed());
        }
    };
    let done = match failure {
        Some(why) => Err(VmmError::Config(format!("cannot snapshot: {why}"))),
        None => f(&mut resume),
    };
    resume();
    done?;
    let pause = pause.unwrap_or_default();
    let report = LiveReport {
        pause,
        vcpu_save,
        total: pause,
        vcpus: states.iter().flatten().count(),
        memory: SnapshotReport::default(),
    };
    Ok((report, started))
}
