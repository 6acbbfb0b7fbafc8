//! Forking a running VM (FORK, `Vm::fork`).
//!
//! 1. Every other vCPU of the parent is asked to pause; each completes the
//!    access KVM may be emulating and saves its own state (the forking vCPU
//!    saved its own already).
//! 2. `memory` forks the guest memory (copy-on-write, pinned frames copied).
//! 3. The parent's vCPUs resume: the parent is paused only for 1 and 2.
//! 4. The clone gets a new KVM VM over its memory, vCPUs loaded with the
//!    saved states (vCPUs that never started stay parked), a copy of the
//!    device state (the UART; a pin-test device without pins), a console
//!    prefixed with its id, and its own threads.

use std::sync::Arc;

use crate::abi::errno;
use crate::kvm::create_vcpu;
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

    // 1. Pause.
    let pause_start = std::time::Instant::now();
    let mut paused = Vec::new();
    let mut failure = None;
    for i in (0..n).filter(|i| Some(*i) != caller_index) {
        match parent.controls[i].request_pause() {
            PauseRequest::Pausing => paused.push(i),
            PauseRequest::Parked => {}
            PauseRequest::Stopped => failure = Some("the VM is stopping".to_string()),
        }
    }
    machine.wake_waiters();
    for &i in &paused {
        match parent.controls[i].wait_paused() {
            Some(Ok(state)) => states[i] = Some(state),
            Some(Err(e)) => failure = Some(e),
            None => failure = Some("the VM is stopping".to_string()),
        }
    }
    // 2. Fork memory, unless a vCPU could not pause.
    let child_mem = match &failure {
        None => Some(parent.mem.fork()),
        Some(_) => None,
    };
    // 3. Resume.
    for &i in &paused {
        parent.controls[i].resume();
    }
    machine.set_last_pause(pause_start.elapsed());
    if let Some(why) = failure {
        return Err(VmmError::Config(format!("cannot fork: {why}")));
    }
    let child_mem = child_mem.expect("forked above")?;

    // 4. The clone.
    let hv = &machine.hv;
    let kvm = hv.create_vm(&child_mem)?;
    let mut fds = Vec::with_capacity(n);
    let mut controls = Vec::with_capacity(n);
    for (i, state) in states.iter().enumerate() {
        let cpuid = cpuid::shape(hv.supported_cpuid(), i as u32, Guest::Program);
        let fd = create_vcpu(&kvm, i as u32, &cpuid)?;
        match state {
            Some(state) => state.restore(&fd)?,
            None => setup_program_vcpu(&fd, i as u32, hv)?,
        }
        controls.push(Arc::new(VcpuControl::new(state.is_some())));
        fds.push(fd);
    }
    let id = machine.next_id();
    let shared = Arc::new(parent.clone_devices(id, child_mem, kvm, controls)?);
    // Recorded before it runs: a clone may end (and record its exit) at
    // once.
    machine.add_clone(id, parent.id, shared.clone());
    match spawn_vcpus(&shared, fds) {
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
