//! Fuzzing clones made ahead.
//!
//! A clone is the snapshot's memory forked (its origin never runs, so a
//! fork of it made now is the same as one made later), a KVM VM whose
//! dirty-tracked memory slots point at it, and one vCPU holding the
//! snapshot's state. Making those is nearly all of a new clone's cost here
//! (the KVM VM and vCPU about 0.4 ms, the fork 60-90 us), so each snapshot
//! has the next one (its *spare*) made ahead by a thread of its own, which
//! waits while a spare is ready (a child snapshot starts it at its first
//! clone, not when taken). A spare holds no frame of its own: its
//! memory shares every frame with the origin until the clone runs (the
//! pages the VMM pins in a clone are copied when the clone is set up).
//!
//! The maker thread (see `ahead.rs`) holds a [`Recipe`], the origin among
//! it, never the snapshot. When the snapshot goes, it closes its
//! [`Spares`] and waits for the thread to end, so nothing the thread made
//! or held outlives the snapshot.

use std::sync::Arc;

use kvm_ioctls::{VcpuFd, VmFd};
use memory::VmMemory;

use super::FuzzError;
use super::vm_target::{TscReset, tsc_offset_supported, vm_err};
use crate::dirty::Dirty;
use crate::kvm::create_vcpu;
use crate::vcpu::VcpuState;
use crate::x86::cpuid::{self, Guest};

/// A clone's memory and KVM side, made ahead.
#[derive(Debug)]
pub(crate) struct Spare {
    /// A fork of the origin, recording the VMM's writes.
    pub(crate) mem: Arc<VmMemory>,
    pub(crate) kvm: VmFd,
    /// With the snapshot's state loaded, and the register areas KVM syncs
    /// through `kvm_run` filled (an exit would fill them; each run writes
    /// RAX through them).
    pub(crate) fd: VcpuFd,
    pub(crate) dirty: Dirty,
    pub(crate) tsc: TscReset,
}

/// How to make a spare for one snapshot.
#[derive(Debug)]
pub(crate) struct Recipe {
    pub(crate) hv: crate::Hypervisor,
    pub(crate) origin: Arc<VmMemory>,
    pub(crate) state: VcpuState,
}

impl Spare {
    pub(crate) fn make(r: &Recipe) -> Result<Self, FuzzError> {
        // Forked before the KVM VM exists: building the clone's host
        // mapping then wakes no KVM notifier.
        let mem = r
            .origin
            .fork()
            .map_err(|e| vm_err("cannot fork the snapshot", &e))?;
        mem.track_vmm_writes();
        // The pages the VMM pins in the clone are copied there.
        mem.make_store_ahead()
            .map_err(|e| vm_err("cannot make a clone's memory", &e))?;
        let (kvm, tracking) =
            r.hv.create_vm_tracked(&mem)
                .map_err(|e| vm_err("cannot create the clone's VM", &e))?;
        let cpuid = cpuid::shape(r.hv.supported_cpuid(), 0, Guest::Program);
        let mut fd =
            create_vcpu(&kvm, 0, &cpuid).map_err(|e| vm_err("cannot create a vCPU", &e))?;
        r.state
            .restore(&fd)
            .map_err(|e| vm_err("cannot load the snapshot's vCPU state", &e))?;
        fd.sync_regs_mut().regs = r.state.regs;
        fd.sync_regs_mut().sregs = r.state.sregs;
        let dirty = Dirty::new(&fd, &tracking, &mem).map_err(|e| FuzzError::Io {
            what: "cannot map the dirty ring".into(),
            source: e,
        })?;
        let tsc = match r.state.tsc {
            Some(t) if tsc_offset_supported(&fd) => TscReset::Offset(t),
            Some(t) => TscReset::Msr(t),
            None => TscReset::None,
        };
        Ok(Self {
            mem,
            kvm,
            fd,
            dirty,
            tsc,
        })
    }
}

/// A snapshot's clone made ahead, and its maker.
pub(crate) type Spares = crate::ahead::MadeAhead<Spare>;
