//! Forking a running VM (FORK, `Vm::fork`).
//!
//! 1. Every other vCPU of the parent is asked to pause; each completes the
//!    access KVM may be emulating and saves its own state (the forking vCPU
//!    saved its own already).
//! 2. `memory` write-protects what the clone will share and copies pinned
//!    frames: the snapshot.
//! 3. The parent's vCPUs resume, while `memory` copies the tables (a write
//!    to a shared page waits for that); the parent is paused for 1 and 2.
//! 4. The clone gets a new KVM VM over its memory, vCPUs loaded with the
//!    saved states (vCPUs that never started stay parked), a copy of the
//!    device state (the UART; a pin-test device without pins), a console
//!    prefixed with its id, and its own threads.
//!
//! Creating a KVM VM, its memory slots and its vCPUs costs this host more
//! than the rest of a fork of a VM on huge mappings (1.5-3 ms against
//! about 1 ms per GiB), so after each fork a thread makes a [`Spare`]: the
//! next clone's empty memory, which already has its host ranges, and a KVM
//! VM with memory slots over them and its vCPUs. The next fork takes it,
//! forks memory into it and only loads the vCPU states.

use std::sync::Arc;

use crate::abi::errno;
use kvm_ioctls::{VcpuFd, VmFd};
use memory::VmMemory;

use crate::kvm::{Hypervisor, create_vcpu};
use crate::vcpu::{PauseRequest, VcpuControl, VcpuState};
use crate::vm::{Exit, Mode, VmShared, VmmError, setup_program_vcpu, spawn_vcpus};
use crate::x86::cpuid::{self, Guest};

/// The errno FORK returns for a failure.
pub(crate) fn errno_of(e: &VmmError) -> i64 {
    match e {
        VmmError::Config(_) => -errno::EOPNOTSUPP,
        VmmError::Memory(_) | VmmError::Thread(_) => -errno::ENOMEM,
        _ => -errno::EIO,
    }
}

/// vCPUs a pause request reached (see [`pause_vcpus`]).
pub(crate) struct Paused {
    /// The vCPUs now paused, to resume later.
    pub(crate) paused: Vec<usize>,
    /// Each paused vCPU's saved state, by index.
    pub(crate) states: Vec<Option<VcpuState>>,
    /// Why a vCPU could not pause (the VM is stopping, its state could
    /// not be saved).
    pub(crate) failure: Option<String>,
}

/// Asks every vCPU of `vm` but `skip` to save its state and wait, and waits
/// for them; parked vCPUs stay as they are.
pub(crate) fn pause_vcpus(vm: &VmShared, skip: Option<usize>) -> Paused {
    let n = vm.controls.len();
    let mut out = Paused {
        paused: Vec::new(),
        states: (0..n).map(|_| None).collect(),
        failure: None,
    };
    for i in (0..n).filter(|i| Some(*i) != skip) {
        match vm.controls[i].request_pause() {
            PauseRequest::Pausing => out.paused.push(i),
            PauseRequest::Parked => {}
            PauseRequest::Stopped => out.failure = Some("the VM is stopping".to_string()),
        }
    }
    vm.machine.wake_waiters();
    for &i in &out.paused {
        match vm.controls[i].wait_paused() {
            Some(Ok(state)) => out.states[i] = Some(state),
            Some(Err(e)) => out.failure = Some(e),
            None => out.failure = Some("the VM is stopping".to_string()),
        }
    }
    out
}

/// Forks `parent`; `caller` is the forking vCPU and its saved state when
/// the fork comes from a hypercall. Returns the clone's id.
pub(crate) fn fork(
    parent: &Arc<VmShared>,
    caller: Option<(u32, VcpuState)>,
) -> Result<u32, VmmError> {
    if parent.mode != Mode::Program {
        return Err(VmmError::Config(
            "fork is supported for program-mode guests only".into(),
        ));
    }
    let machine = &parent.machine;
    machine.reap();
    let n = parent.controls.len();
    let caller_index = caller.as_ref().map(|(i, _)| *i as usize);
    let mut states: Vec<Option<VcpuState>> = (0..n).map(|_| None).collect();
    if let Some((i, state)) = caller {
        states[i as usize] = Some(state);
    }

    // 0. While the vCPUs run, take write access from every page: the
    // pause then only covers pages written since.
    if let Err(e) = parent.mem.demote_writable() {
        log::debug!("fork: demoting pages ahead: {}", crate::vcpu::chain(&e));
    }
    // 1. Pause.
    let pause_start = std::time::Instant::now();
    let Paused {
        paused,
        states: mut saved,
        failure,
    } = pause_vcpus(parent, caller_index);
    for (slot, state) in states.iter_mut().zip(saved.iter_mut()) {
        if state.is_some() {
            *slot = state.take();
        }
    }
    // 2. Fork memory, unless a vCPU could not pause. 3. As soon as memory
    // is write-protected, resume the vCPUs and start building the clone's
    // KVM VM and vCPUs on another thread, while memory copies the tables (a
    // guest write to a shared page waits for that).
    let resumed = std::cell::Cell::new(false);
    let resume = || {
        if !resumed.replace(true) {
            for &i in &paused {
                parent.controls[i].resume();
            }
            machine.set_last_pause(pause_start.elapsed());
        }
    };
    if let Some(why) = failure {
        resume();
        return Err(VmmError::Config(format!("cannot fork: {why}")));
    }
    // Devices stand still from before memory is snapshotted until after.
    let (frozen, mut still) = match parent.virtio.freeze() {
        Ok((frozen, guard)) => (frozen, Some(guard)),
        Err(e) => {
            resume();
            return Err(e.into());
        }
    };
    let mut builder = None;
    let (spare_mem, mut made) = match machine.take_spare(&parent.mem, n) {
        Some(Spare { mem, kvm, vcpus }) => (Some(mem), Some((kvm, vcpus))),
        None => (None, None),
    };
    let protected = |child: &Arc<VmMemory>| {
        drop(still.take());
        resume();
        let (hv, child) = (machine.hv.clone(), child.clone());
        let states = std::mem::take(&mut states);
        let made = made.take();
        builder = Some(
            std::thread::Builder::new()
                .name("clone-setup".into())
                .spawn(move || match made {
                    Some((kvm, fds)) => load_vcpus(&hv, kvm, fds, &states),
                    None => build_vcpus(&hv, &child, &states),
                }),
        );
    };
    let child_mem = match spare_mem {
        Some(mem) => parent.mem.fork_into(mem, protected),
        None => parent.mem.fork_with(protected),
    };
    drop(still);
    resume();
    let built = match builder {
        Some(Ok(handle)) => handle.join().unwrap_or_else(|_| {
            Err(VmmError::Config(
                "building the clone's vCPUs panicked".into(),
            ))
        }),
        Some(Err(e)) => Err(VmmError::Thread(e)),
        None => Err(VmmError::Config(
            "memory fork ended before its snapshot".into(),
        )),
    };
    let child_mem = child_mem?;
    let (kvm, fds, running) = built?;
    let controls = running
        .into_iter()
        .map(|r| Arc::new(VcpuControl::new(r)))
        .collect();

    // 4. The clone.
    let id = machine.next_id();
    let harness = parent.harness.for_clone();
    let shared = Arc::new(parent.clone_devices(id, child_mem, kvm, controls, frozen, harness)?);
    // Recorded before it runs: a clone may end (and record its exit) at
    // once.
    machine.add_clone(id, parent.id, shared.clone());
    let spawned = spawn_vcpus(&shared, fds);
    // The next clone, made once this one runs (not to compete with it).
    machine.refill_spare(&parent.mem, n);
    match spawned {
        Ok(threads) => machine.set_threads(id, threads),
        Err(e) => {
            shared.finish(Exit::Error(format!(
                "cannot start the clone: {}",
                crate::error_chain(&e)
            )));
            return Err(e);
        }
    }
    Ok(id)
}

/// A KVM VM over `mem` with vCPUs in `states` (None: a vCPU that never
/// started, parked again); returns them and which ones run.
pub(crate) fn build_vcpus(
    hv: &Hypervisor,
    mem: &VmMemory,
    states: &[Option<VcpuState>],
) -> Result<(VmFd, Vec<VcpuFd>, Vec<bool>), VmmError> {
    let kvm = hv.create_vm(mem)?;
    let fds = create_vcpus(hv, &kvm, states.len())?;
    load_vcpus(hv, kvm, fds, states)
}

/// `n` fresh vCPUs of `kvm`, shaped for program mode.
fn create_vcpus(hv: &Hypervisor, kvm: &VmFd, n: usize) -> Result<Vec<VcpuFd>, VmmError> {
    (0..n as u32)
        .map(|i| {
            let cpuid = cpuid::shape(hv.supported_cpuid(), i, Guest::Program);
            Ok(create_vcpu(kvm, i, &cpuid)?)
        })
        .collect()
}

/// Loads `states` into the fresh vCPUs `fds` of `kvm` (None: a vCPU that
/// never started, parked again); returns them and which ones run.
fn load_vcpus(
    hv: &Hypervisor,
    kvm: VmFd,
    fds: Vec<VcpuFd>,
    states: &[Option<VcpuState>],
) -> Result<(VmFd, Vec<VcpuFd>, Vec<bool>), VmmError> {
    for (i, (fd, state)) in fds.iter().zip(states).enumerate() {
        match state {
            Some(state) => state.restore(fd)?,
            None => setup_program_vcpu(fd, i as u32, hv)?,
        }
    }
    Ok((kvm, fds, states.iter().map(Option::is_some).collect()))
}

/// The next clone of a VM, made ahead of its fork (see the module
/// documentation): empty memory of the VM's layout, and a KVM VM with
/// memory slots over it and `vcpus` vCPUs.
#[derive(Debug)]
pub(crate) struct Spare {
    mem: Arc<VmMemory>,
    kvm: VmFd,
    vcpus: Vec<VcpuFd>,
}

impl Spare {
    /// A spare for forks of VMs of `ctx` with `layout` and `vcpus` vCPUs.
    pub(crate) fn make(
        hv: &Hypervisor,
        ctx: &Arc<memory::Context>,
        layout: memory::Layout,
        vcpus: usize,
    ) -> Result<Self, VmmError> {
        let mem = VmMemory::new(ctx, layout)?;
        // The frames the fork copies for the clone (pinned ones) go there.
        mem.make_store_ahead()?;
        let kvm = hv.create_vm(&mem)?;
        let vcpus = create_vcpus(hv, &kvm, vcpus)?;
        Ok(Self { mem, kvm, vcpus })
    }

    /// Whether it fits a fork of `parent` with `vcpus` vCPUs.
    pub(crate) fn fits(&self, parent: &VmMemory, vcpus: usize) -> bool {
        self.vcpus.len() == vcpus && self.mem.layout() == parent.layout()
    }
}
