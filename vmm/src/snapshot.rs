//! Live snapshots of a running VM's memory ([`crate::vm::Vm::snapshot_live`],
//! the API socket's `snapshot-live`, `vmm snapshot --live`).
//!
//! 1. While the guest runs, `memory` write-protects every page with
//!    contents, then catches up on the pages that changed meanwhile.
//! 2. Every vCPU saves its state and waits (the state a restore would
//!    load), and the virtio devices are held still.
//! 3. `memory` catches up on the pages changed since its last catch-up and
//!    copies those a device may write through a pin: that instant is the
//!    image's.
//! 4. The vCPUs and devices go on; `memory` copies each page out before
//!    its first write, and every other page in the background.
//!
//! The guest is paused for 2 and 3 only: a visit per page changed since
//! the last catch-up, whatever the RAM size, and no copy but of
//! device-writable pages.

use std::fs::File;
use std::path::Path;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use memory::{LiveSnapshot, SnapshotReport};

use crate::fork::{Paused, pause_vcpus};
use crate::snapfile::{SnapState, SnapfileError};
use crate::vcpu::VcpuState;
use crate::vm::{Mode, VmShared, VmmError};

/// What a live snapshot did and how long it took.
#[derive(Clone, Copy, Debug)]
pub struct LiveReport {
    /// How long the guest was paused.
    pub pause: Duration,
    /// Of the pause, how long the vCPUs took to stop and save their state.
    pub vcpu_save: Duration,
    /// Before the pause, while the guest ran: arming write protection.
    pub arm: Duration,
    /// From the pause request to the image on disk.
    pub total: Duration,
    /// vCPUs whose state was saved (parked ones have none to save).
    pub vcpus: usize,
    /// What memory did.
    pub memory: SnapshotReport,
}

/// The state of the VM at a snapshot's instant, besides its memory.
pub(crate) struct AtInstant {
    /// Each vCPU's state; None for one that never started.
    states: Vec<Option<VcpuState>>,
    /// The UART's.
    uart: devices::serial::SerialState,
}

/// Writes the image of `vm`'s memory into `image` while the guest runs.
pub(crate) fn live(
    vm: &VmShared,
    image: File,
    progress: impl FnMut(u64, u64),
) -> Result<LiveReport, VmmError> {
    live_saving(vm, image, progress).map(|(report, _)| report)
}

fn live_saving(
    vm: &VmShared,
    image: File,
    progress: impl FnMut(u64, u64),
) -> Result<(LiveReport, AtInstant), VmmError> {
    // While the guest runs, protect every page: the pause then only covers
    // pages changed since. Pins devices keep between requests go first, or
    // their pages would count as written through a pin at the instant.
    let t = Instant::now();
    vm.virtio.drop_cached_pins();
    let snap = LiveSnapshot::prepare(&vm.mem, image)?;
    let arm = t.elapsed();
    let (mut report, started, at) = match paused(vm, |resume| Ok(snap.begin(&vm.mem, resume)?)) {
        Ok(done) => done,
        Err(e) => {
            // The pause never came (`begin` gives up by itself).
            if let Err(e) = snap.cancel(&vm.mem) {
                log::warn!("snapshot: giving pages back: {}", crate::error_chain(&e));
            }
            return Err(e);
        }
    };
    report.arm = arm;
    report.memory = snap.copy_rest(&vm.mem, progress)?;
    report.total = started.elapsed();
    Ok((report, at))
}

/// Writes the image of `vm`'s memory into `image` with the guest paused
/// throughout (the baseline a live snapshot is measured against).
pub(crate) fn stopped(
    vm: &VmShared,
    image: File,
    progress: impl FnMut(u64, u64),
) -> Result<LiveReport, VmmError> {
    stopped_saving(vm, image, progress).map(|(report, _)| report)
}

fn stopped_saving(
    vm: &VmShared,
    image: File,
    progress: impl FnMut(u64, u64),
) -> Result<(LiveReport, AtInstant), VmmError> {
    let mut memory = SnapshotReport::default();
    let (mut report, _, at) = paused(vm, |resume| {
        memory = LiveSnapshot::copy_stopped(&vm.mem, image, progress)?;
        resume();
        Ok(())
    })?;
    report.memory = memory;
    Ok((report, at))
}

/// What saving a snapshot to files did.
#[derive(Clone, Copy, Debug)]
pub struct SaveReport {
    /// The memory image's part.
    pub snapshot: LiveReport,
    /// Listing the memory file's pages with contents, with checksums.
    pub index: Duration,
    /// Pages the index lists.
    pub pages: u64,
    /// Runs it lists them in.
    pub runs: usize,
    /// From the pause request to both files on disk.
    pub total: Duration,
}

/// Saves `vm` as snapshot files: its memory into `image` (live, or with
/// the guest paused throughout), then its state file at the new path
/// `state` (see [`crate::snapfile`]). Program mode without virtio devices
/// only, for now.
pub(crate) fn save(
    vm: &VmShared,
    image: File,
    state: &Path,
    live: bool,
    progress: impl FnMut(u64, u64),
) -> Result<SaveReport, VmmError> {
    if vm.mode != Mode::Program {
        return Err(SnapfileError::Unsupported(
            "snapshot files are written for program-mode VMs only (not Linux guests) for now"
                .into(),
        )
        .into());
    }
    if !vm.virtio.is_empty() {
        return Err(SnapfileError::Unsupported(format!(
            "snapshot files are written for VMs without virtio devices only for now; this VM has {}",
            vm.virtio.len()
        ))
        .into());
    }
    if state.exists() {
        return Err(SnapfileError::Io {
            what: "will not overwrite the existing snapshot state file",
            path: state.into(),
            source: std::io::ErrorKind::AlreadyExists.into(),
        }
        .into());
    }
    let started = Instant::now();
    let reader = image.try_clone().map_err(VmmError::Thread)?;
    let (snapshot, at) = if live {
        live_saving(vm, image, progress)?
    } else {
        stopped_saving(vm, image, progress)?
    };
    let t = Instant::now();
    let layout = vm.mem.layout();
    let runs = memory::index_image(&reader, layout).map_err(|source| SnapfileError::Io {
        what: "cannot read back the memory image to index it for",
        path: state.into(),
        source,
    })?;
    let index = t.elapsed();
    let file = SnapState {
        ram: layout.ranges().iter().map(|r| (r.gpa, r.len)).collect(),
        vcpus: at.states,
        uart: at.uart,
        runs,
    };
    file.write(state)?;
    Ok(SaveReport {
        snapshot,
        index,
        pages: file.runs.iter().map(|r| u64::from(r.pages)).sum(),
        runs: file.runs.len(),
        total: started.elapsed(),
    })
}

/// Runs `f` with every vCPU paused (its state saved) and the devices held
/// still, until `f` calls the resume function it is given (or returns); a
/// report with the pause's timings, when the pause began, and the state
/// saved at its start.
fn paused(
    vm: &VmShared,
    f: impl FnOnce(&mut dyn FnMut()) -> Result<(), VmmError>,
) -> Result<(LiveReport, Instant, AtInstant), VmmError> {
    let started = Instant::now();
    let Paused {
        paused,
        states,
        failure,
    } = pause_vcpus(vm, None);
    let vcpu_save = started.elapsed();
    // The vCPUs, the only users of the UART, are paused.
    let uart = vm
        .serial
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .state();
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
        arm: Duration::ZERO,
        total: pause,
        vcpus: states.iter().flatten().count(),
        memory: SnapshotReport::default(),
    };
    Ok((report, started, AtInstant { states, uart }))
}
