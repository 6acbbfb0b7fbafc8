//! Restoring a VM from snapshot files ([`Vm::restore`], `vmm restore`).
//!
//! 1. The state file is read and checked whole (it is small).
//! 2. The memory file is opened with the state's index; `memory` makes
//!    every page it lists an image entry, read on its first access (nothing
//!    of the file is read here).
//! 3. The VMM's first MiB (descriptor tables, page tables, exception
//!    stubs), which the CPU reads without a fault it could report, is made
//!    present now; the ring-0 stacks are pinned as in any program-mode VM.
//! 4. A new KVM VM over that memory, its vCPUs loaded with the saved
//!    registers (those that never started wait for VCPU_START again), the
//!    UART in its saved state.
//!
//! The restored VM runs like one `Vm::new` made: it can fork, swap, be
//! snapshotted again. Program mode without virtio devices only, for now
//! (the state file cannot describe anything else).

use std::path::Path;
use std::sync::{Arc, Mutex};

use memory::{Access, Image, VmMemory};

use crate::console::{Console, ConsoleWriter, Sink};
use crate::kvm::Hypervisor;
use crate::machine::Machine;
use crate::snapfile::{SnapState, SnapfileError};
use crate::vcpu::VcpuControl;
use crate::virtio::VirtioBus;
use crate::vm::{Mode, RootParts, Vm, VmmError, VmmPins, ram_layout};
use crate::x86::program;
use devices::serial::{Irq, Serial};

impl Vm {
    /// A VM restored from the state file `state` and the memory file
    /// `memory_file` that `vmm snapshot --state` (or
    /// [`Vm::snapshot_to_files`]) wrote, ready to start: its vCPUs continue
    /// from the instant of the snapshot, its console goes to `sink`.
    pub fn restore(
        hv: &Hypervisor,
        ctx: &Arc<memory::Context>,
        state: &Path,
        memory_file: &Path,
        sink: Sink,
    ) -> Result<Vm, VmmError> {
        let saved = SnapState::read(state)?;
        let malformed = |why: String| SnapfileError::Malformed {
            path: state.into(),
            why,
        };
        let layout = memory::Layout::new(&saved.ram).map_err(|e| malformed(e.to_string()))?;
        let size = layout.size();
        let expected = ram_layout(size).map_err(|e| malformed(crate::error_chain(&e)))?;
        if layout != expected || size > program::MAX_RAM {
            return Err(malformed(format!(
                "its RAM ranges {:x?} are not a layout program mode makes",
                saved.ram
            ))
            .into());
        }
        let file = std::fs::File::open(memory_file).map_err(|source| SnapfileError::Io {
            what: "cannot open the snapshot memory file",
            path: memory_file.into(),
            source,
        })?;
        let image = Image::open(file, memory_file.display().to_string(), layout, &saved.runs)?;
        let mem = VmMemory::restore(ctx, &image)?;
        mem.keep_small(0, program::LOW_END)?;
        mem.set_unevictable(0, program::LOW_END)?;
        mem.populate(0, program::LOW_END, Access::Read)?;
        let (kvm, fds, running) = crate::fork::build_vcpus(hv, &mem, &saved.vcpus)?;
        let vcpus = fds.len() as u32;
        let controls = running
            .into_iter()
            .map(|r| Arc::new(VcpuControl::new(r)))
            .collect();
        let console = Arc::new(Console::new(sink.clone(), None));
        let serial = Serial::from_state(&saved.uart, Irq::None, ConsoleWriter(console.clone()))
            .map_err(malformed)?;
        let machine = Machine::new(hv.clone(), ctx.clone(), sink);
        let vmm_pins = VmmPins::ring0_stacks(&machine, &mem, vcpus)?;
        let virtio = VirtioBus::new(&[], &mem, &kvm, Mode::Program)?;
        let parts = RootParts {
            machine,
            mem,
            kvm,
            console,
            serial: Mutex::new(serial),
            virtio,
            vmm_pins,
            mode: Mode::Program,
            controls,
            harness: crate::fuzz::harness::Harness::Plain { input: Vec::new() },
        };
        Ok(Vm::root(parts, fds))
    }

    /// Saves the VM as snapshot files: its memory into `image` (a new,
    /// empty file; live unless `live` is false, then with the guest paused
    /// throughout) and its state file at the new path `state`. A VM
    /// restored from them continues from the instant of the snapshot.
    pub fn snapshot_to_files(
        &self,
        image: std::fs::File,
        state: &Path,
        live: bool,
        progress: impl FnMut(u64, u64),
    ) -> Result<crate::snapshot::SaveReport, VmmError> {
        crate::snapshot::save(self.shared(), image, state, live, progress)
    }
}
