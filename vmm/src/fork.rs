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
//!
//! A VM with many pages on small mappings ([`MOVE_MIN_PAGES`]) *moves* at
//! a fork to a second spare: taking write access from its pages
//! in place would cost per page, mostly in KVM dropping its own mapping of
//! each (75-95 ns a page here, a whole Linux `fork()`'s worth). Instead,
//! memory maps the VM afresh in the spare's host ranges
//! (`VmMemory::fork_rehosted`), its vCPUs move to the spare's KVM VM
//! (loaded with their states, TSC included, and wired to the same device
//! notifiers) before they run again, and the old KVM VM and vCPUs are
//! dropped on the retiring thread once the fork is done (`retire.rs`),
//! the old host mapping a piece at a time by memory's reaper. The guest
//! sees nothing of it. Each fork has the next spares made on a thread of
//! lower priority; a fork that finds none makes the one it moves to
//! itself, before the pause (0.5-1 ms, still far below what it saves),
//! and `Vm::prepare_fork` makes both at once.

use std::sync::Arc;

use crate::abi::errno;
use kvm_ioctls::{VcpuFd, VmFd};
use memory::VmMemory;

use crate::kvm::{Hypervisor, create_vcpu};
use crate::machine::SpareFor;
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

    // 0. A large VM moves to a new KVM VM and host mapping, made ahead or
    // now (0.5-1 ms) while the vCPUs run; a VM that does not move takes
    // write access from every page while they run: the pause then only
    // covers pages written since.
    let move_wanted = may_move(&parent.mem) && parent.mem.resident_small() >= MOVE_MIN_PAGES;
    let _quiet = crate::retire::hold();
    let target = if move_wanted {
        machine
            .take_spare(SpareFor::Parent, &parent.mem, n)
            .or_else(|| match machine.spare_now(&parent.mem, n) {
                Ok(spare) => Some(spare),
                Err(e) => {
                    log::debug!("fork: the VM stays where it is: {}", crate::vcpu::chain(&e));
                    None
                }
            })
    } else {
        None
    };
    if target.is_none() {
        if let Err(e) = parent.mem.demote_writable() {
            log::debug!("fork: demoting pages ahead: {}", crate::vcpu::chain(&e));
        }
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
        if let Some(t) = target {
            crate::retire::later(t);
        }
        return Err(VmmError::Config(format!("cannot fork: {why}")));
    }
    // Devices stand still from before memory is snapshotted until after.
    let (frozen, mut still) = match parent.virtio.freeze() {
        Ok((frozen, guard)) => (frozen, Some(guard)),
        Err(e) => {
            resume();
            if let Some(t) = target {
                crate::retire::later(t);
            }
            return Err(e.into());
        }
    };
    let mut moving = target.and_then(|t| match prepare_move(parent, t, &states) {
        Ok(m) => Some(m),
        Err(e) => {
            log::debug!("fork: the VM stays where it is: {}", crate::vcpu::chain(&e));
            None
        }
    });
    let new_host = moving.as_ref().map(|m| m.mem.clone());
    let mut builder = None;
    let (spare_mem, mut made) = match machine.take_spare(SpareFor::Clone, &parent.mem, n) {
        Some(Spare { mem, kvm, vcpus }) => (Some(mem), Some((kvm, vcpus))),
        None => (None, None),
    };
    let mut protected = |child: &Arc<VmMemory>, moved: bool| {
        if let Some(m) = moving.take().filter(|_| moved) {
            finish_move(parent, m);
        }
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
    let child_mem = match (&new_host, spare_mem) {
        (Some(host), spare) => parent.mem.fork_rehosted(spare, host, protected),
        (None, Some(mem)) => parent.mem.fork_into(mem, |c| protected(c, false)),
        (None, None) => parent.mem.fork_with(|c| protected(c, false)),
    };
    drop(still);
    resume();
    // The spare memory (memory has handed the old host mapping on to its
    // reaper) and what was not used if the VM did not move.
    if let Some(left) = new_host {
        crate::retire::later((left, moving));
    }
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
    // The next clone (and place to move to) is made on a thread of lower
    // priority: asking for it before the clone runs keeps the ask itself
    // off the two vCPUs' CPUs, and the making off the clone's start.
    machine.refill_spare(SpareFor::Clone, &parent.mem, n);
    if move_wanted {
        machine.refill_spare(SpareFor::Parent, &parent.mem, n);
    }
    let spawned = spawn_vcpus(&shared, fds);
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

/// Pages on small mappings from which a fork moves the VM rather than
/// take write access from its pages in place (see the module
/// documentation): a move costs loading the vCPUs again (tens of
/// microseconds) and, when none was made ahead, making the KVM VM to move
/// to (0.5-1 ms); taking write access costs 75-95 ns a small page, so at
/// this count already 0.6-0.8 ms on the fork's path, and it grows. A
/// VM on huge mappings forks in place: taking write access from a 2 MiB
/// page costs about what a move's mapping of it does.
const MOVE_MIN_PAGES: u64 = 8192;

/// Whether forks of a VM of memory `mem` may move it: its RAM can hold
/// [`MOVE_MIN_PAGES`].
pub(crate) fn may_move(mem: &VmMemory) -> bool {
    mem.layout().size() / memory::PAGE_SIZE >= MOVE_MIN_PAGES
}

/// Where a forking VM moves: a spare's memory (whose host mapping becomes
/// the VM's), KVM VM and vCPUs, loaded with the VM's vCPU states.
#[derive(Debug)]
struct Move {
    mem: Arc<VmMemory>,
    kvm: VmFd,
    vcpus: Vec<VcpuFd>,
}

/// Loads the paused VM's vCPU `states` into `spare` and wires the VM's
/// device notifications into it.
fn prepare_move(
    parent: &VmShared,
    spare: Spare,
    states: &[Option<VcpuState>],
) -> Result<Move, VmmError> {
    let (kvm, vcpus, _) = load_vcpus(&parent.machine.hv, spare.kvm, spare.vcpus, states)?;
    parent.virtio.wire_notifications(&kvm)?;
    Ok(Move {
        mem: spare.mem,
        kvm,
        vcpus,
    })
}

/// Memory has moved the VM to `to`'s host mapping: its vCPUs follow to
/// `to`'s KVM VM before any of them runs again, and the old KVM VM goes
/// to the retiring thread (its vCPUs follow as each thread switches).
fn finish_move(parent: &VmShared, to: Move) {
    let old = parent.replace_kvm(to.kvm);
    for (control, fd) in parent.controls.iter().zip(to.vcpus) {
        control.move_to(fd);
    }
    crate::retire::later(old);
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
