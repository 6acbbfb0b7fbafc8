//! The VMM's own pins in a VM's memory (not device pins): program mode's
//! ring-0 stacks, which the CPU writes while it delivers an exception,
//! when a fault can no longer be reported.

use std::sync::Arc;

use memory::{Pin, PinFlags, VmMemory};

use crate::machine::Machine;
use crate::vm::VmmError;
use crate::x86::program;

/// The VMM's own long-term pins in one VM. They are not device pins, so
/// the counters users see leave them out.
#[derive(Debug)]
pub(crate) struct VmmPins {
    pins: Vec<Pin>,
    pages: u64,
    machine: Arc<Machine>,
}

impl VmmPins {
    pub(crate) fn none(machine: &Arc<Machine>) -> Self {
        Self {
            pins: Vec::new(),
            pages: 0,
            machine: machine.clone(),
        }
    }

    /// Program mode: the ring-0 stacks (see [`program::ring0_stacks`]).
    pub(crate) fn ring0_stacks(
        machine: &Arc<Machine>,
        mem: &VmMemory,
        vcpus: u32,
    ) -> Result<Self, VmmError> {
        let (gpa, len) = program::ring0_stacks(vcpus);
        let flags = PinFlags {
            write: true,
            longterm: true,
        };
        let pin = mem.pin(gpa, len, flags)?;
        let pages = (gpa + len).div_ceil(memory::PAGE_SIZE) - gpa / memory::PAGE_SIZE;
        machine
            .vmm_pinned
            .fetch_add(pages, std::sync::atomic::Ordering::Relaxed);
        Ok(Self {
            pins: vec![pin],
            pages,
            machine: machine.clone(),
        })
    }
}

impl Drop for VmmPins {
    fn drop(&mut self) {
        self.pins.clear();
        self.machine
            .vmm_pinned
            .fetch_sub(self.pages, std::sync::atomic::Ordering::Relaxed);
    }
}
