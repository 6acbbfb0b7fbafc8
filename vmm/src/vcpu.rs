//! vCPU threads and the exit loop.
//!
//! Each vCPU runs `KVM_RUN` on its own thread and handles its exits there:
//! port I/O (hypercalls, the exception stubs' reports, the UART), MMIO, and
//! memory faults. Faults come in two shapes on this host:
//!
//! - `KVM_RUN` fails with `EFAULT` and no address (a native guest access to
//!   a page the host maps read-only or not at all). The instruction did not
//!   execute: the VMM decodes it to find the pages it touches, lets
//!   `memory` resolve them, and runs it again.
//! - `KVM_EXIT_MMIO` inside RAM (an access that KVM emulated). The access
//!   did not happen: the VMM resolves the fault, then performs the load or
//!   store itself, and KVM completes the instruction with it.
//!
//! Stopping: another thread sets the vCPU's state and sends it a signal
//! whose handler sets `immediate_exit`, so `KVM_RUN` returns `EINTR` at once
//! whether the signal arrived before or during the call.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock, PoisonError};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_run, kvm_sync_regs};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use memory::Access;

use crate::abi::{HYPERCALL_PORT, errno};
use crate::vm::{Exit, Mode, VmShared};
use crate::x86::decode::{self, CpuState, PageAccess};
use crate::x86::program::{self, FAULT_PORT, GuestFault};

/// Consecutive unexplained faults at one RIP before the VM is stopped.
const MAX_STUCK: u32 = 3;

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's mapped `kvm_run`, set by
            // the vCPU loop before its first KVM_RUN and valid until the
            // thread clears it; this only computes a field's address.
            let flag = unsafe { &raw mut (*run).immediate_exit };
            // SAFETY: `flag` points into that live mapping; a byte store is
            // async-signal-safe and KVM reads the flag on entry.
            unsafe { flag.write_volatile(1) };
        }
    });
}

/// Installs the kick signal's handler (once per process).
pub(crate) fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            log::error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// Where a vCPU is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A program-mode vCPU waiting for VCPU_START.
    Parked,
    /// Told to start at (rip, rsp).
    Starting(u64, u64),
    /// Running guest code.
    Running,
    /// Told to stop for good.
    Stopped,
}

/// The handle other threads use to start or stop one vCPU.
#[derive(Debug)]
pub(crate) struct VcpuControl {
    state: Mutex<State>,
    changed: Condvar,
    thread: OnceLock<libc::pthread_t>,
}

impl VcpuControl {
    pub(crate) fn new(running: bool) -> Self {
        Self {
            state: Mutex::new(if running {
                State::Running
            } else {
                State::Parked
            }),
            changed: Condvar::new(),
            thread: OnceLock::new(),
        }
    }

    pub(crate) fn set_thread(&self, handle: &JoinHandle<()>) {
        let _ = self.thread.set(handle.as_pthread_t());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks a parked vCPU to start; false if it is not parked.
    pub(crate) fn start(&self, rip: u64, rsp: u64) -> bool {
        let mut s = self.lock();
        if *s != State::Parked {
            return false;
        }
        *s = State::Starting(rip, rsp);
        self.changed.notify_all();
        true
    }

    /// Stops the vCPU and kicks it out of `KVM_RUN`.
    pub(crate) fn stop(&self) {
        *self.lock() = State::Stopped;
        self.changed.notify_all();
        if let Some(t) = self.thread.get() {
            // SAFETY: `t` names a vCPU thread of this process; its handle is
            // joined only after the VM ended, and a signal to a thread that
            // already returned is harmless (ESRCH is ignored).
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }

    /// Blocks until the vCPU may run; returns a start request, or None
    /// when it must stop.
    fn wait_runnable(&self) -> Option<Option<(u64, u64)>> {
        let mut s = self.lock();
        loop {
            match *s {
                State::Running => return Some(None),
                State::Starting(rip, rsp) => {
                    *s = State::Running;
                    return Some(Some((rip, rsp)));
                }
                State::Stopped => return None,
                State::Parked => s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner),
            }
        }
    }

    fn stopped(&self) -> bool {
        *self.lock() == State::Stopped
    }
}

/// Runs vCPU `index` until its VM ends.
pub(crate) fn run(shared: Arc<VmShared>, mut fd: VcpuFd, index: u32) {
    let run_ptr: *mut kvm_run = fd.get_kvm_run();
    KVM_RUN.with(|r| r.set(run_ptr));
    let control = shared.controls[index as usize].clone();
    let mut cpu = Vcpu {
        shared,
        fd,
        index,
        stuck: 0,
    };
    match control.wait_runnable() {
        None => {}
        Some(start) => {
            if let Some((rip, rsp)) = start {
                if let Err(e) = cpu.enter_at(rip, rsp) {
                    cpu.shared.finish(Exit::Error(e));
                }
            }
            while !control.stopped() && cpu.step() {}
        }
    }
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
}

struct Vcpu {
    shared: Arc<VmShared>,
    fd: VcpuFd,
    index: u32,
    stuck: u32,
}

/// An exit whose data was copied out of `kvm_run`.
enum Event {
    Out(u16, [u8; 8], usize),
    MmioWrite(u64, [u8; 8], usize),
    Stop(Exit),
    Interrupted,
    MemoryFault,
}

fn copy8(data: &[u8]) -> ([u8; 8], usize) {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    (b, n)
}

impl Vcpu {
    fn regs(&self) -> kvm_sync_regs {
        self.fd.sync_regs()
    }

    fn set_rax(&mut self, value: u64) {
        self.fd.sync_regs_mut().regs.rax = value;
        self.fd.set_sync_dirty_reg(SyncReg::Register);
    }

    /// Starts a secondary program-mode vCPU at `rip` with `rsp`.
    fn enter_at(&mut self, rip: u64, rsp: u64) -> Result<(), String> {
        let regs = program::regs(rip, rsp, u64::from(self.index));
        self.fd
            .set_regs(&regs)
            .map_err(|e| format!("cannot start vCPU {}: {e}", self.index))
    }

    /// Runs the guest until one exit is handled; false when the vCPU must
    /// stop.
    fn step(&mut self) -> bool {
        let event = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                pio_in(&self.shared, port, data);
                return true;
            }
            Ok(VcpuExit::MmioRead(gpa, data)) => {
                return match mmio_read(&self.shared, gpa, data) {
                    Ok(()) => true,
                    Err(e) => {
                        self.shared.finish(Exit::Error(e));
                        false
                    }
                };
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let (b, n) = copy8(data);
                Event::Out(port, b, n)
            }
            Ok(VcpuExit::MmioWrite(gpa, data)) => {
                let (b, n) = copy8(data);
                Event::MmioWrite(gpa, b, n)
            }
            Ok(VcpuExit::Hlt) => Event::Stop(Exit::Shutdown("the guest halted".into())),
            Ok(VcpuExit::Shutdown) => Event::Stop(Exit::Shutdown(
                "the guest triple-faulted (KVM_EXIT_SHUTDOWN)".into(),
            )),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET
                    || kind == kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN
                {
                    Event::Stop(Exit::Reset)
                } else {
                    Event::Stop(Exit::Error(format!("system event {kind}")))
                }
            }
            Ok(VcpuExit::InternalError) => Event::Stop(Exit::Error(format!(
                "KVM internal error on vCPU {} (emulation failure?) at rip {:#x}",
                self.index,
                self.regs().regs.rip
            ))),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Event::Stop(Exit::Error(format!(
                "KVM could not enter the guest (reason {reason:#x}, cpu {cpu})"
            ))),
            Ok(other) => Event::Stop(Exit::Error(format!("unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Event::Interrupted,
            Err(e) if e.errno() == libc::EFAULT => Event::MemoryFault,
            Err(e) => Event::Stop(Exit::Error(format!("KVM_RUN failed: {e}"))),
        };
        match event {
            Event::Interrupted => {
                self.fd.set_kvm_immediate_exit(0);
                true
            }
            Event::Stop(exit) => {
                self.shared.finish(exit);
                false
            }
            Event::Out(port, data, len) => self.on_out(port, &data[..len]),
            Event::MmioWrite(gpa, data, len) => match mmio_write(&self.shared, gpa, &data[..len]) {
                Ok(()) => true,
                Err(e) => {
                    self.shared.finish(Exit::Error(e));
                    false
                }
            },
            Event::MemoryFault => match self.resolve_memory_fault() {
                Ok(()) => true,
                Err(e) => {
                    self.shared.finish(Exit::Error(e));
                    false
                }
            },
        }
    }

    fn on_out(&mut self, port: u16, data: &[u8]) -> bool {
        match port {
            HYPERCALL_PORT if data.len() == 4 => {
                let nr = u64::from(u32::from_le_bytes(data.try_into().expect("4 bytes")));
                let regs = self.regs().regs;
                match crate::hypercall::dispatch(&self.shared, nr, [regs.rdi, regs.rsi, regs.r10]) {
                    Ok(ret) => {
                        self.set_rax(ret as u64);
                        true
                    }
                    Err(exit) => {
                        self.shared.finish(exit);
                        false
                    }
                }
            }
            FAULT_PORT if self.shared.mode == Mode::Program => {
                let s = self.regs();
                let fault =
                    GuestFault::from_frame(&self.shared.mem, data[0], s.regs.rsp, s.sregs.cr2);
                self.shared.finish(Exit::Fault(fault));
                false
            }
            _ => pio_out(&self.shared, port, data),
        }
    }

    /// Finds and resolves the faults behind an `EFAULT` from `KVM_RUN`.
    fn resolve_memory_fault(&mut self) -> Result<(), String> {
        let s = self.regs();
        let cpu = CpuState {
            regs: &s.regs,
            sregs: &s.sregs,
        };
        let mem = &self.shared.mem;
        let reader = |gpa: u64, buf: &mut [u8]| mem.read(gpa, buf).is_ok();
        let decoded = decode::instruction_accesses(&cpu, &reader);
        let mut progress = match &decoded {
            Ok(list) => self.resolve(list)?,
            Err(e) => {
                log::debug!("vCPU {}: {e}", self.index);
                false
            }
        };
        if !progress {
            progress = self.resolve(&decode::implicit_accesses(&cpu, &reader))?;
        }
        if progress {
            self.stuck = 0;
            return Ok(());
        }
        self.stuck += 1;
        if self.stuck >= MAX_STUCK {
            let why = match decoded {
                Ok(list) => format!("its accesses {list:x?} need nothing"),
                Err(e) => e.to_string(),
            };
            return Err(format!(
                "vCPU {}: unresolvable memory fault at rip {:#x}: {why}",
                self.index, s.regs.rip
            ));
        }
        Ok(())
    }

    /// Resolves each access that would fault; true if any did.
    fn resolve(&self, accesses: &[PageAccess]) -> Result<bool, String> {
        let mem = &self.shared.mem;
        let mut progress = false;
        for a in accesses {
            let access = if a.write { Access::Write } else { Access::Read };
            if mem.would_fault(a.gpa, access) {
                mem.fault(a.gpa, access).map_err(|e| {
                    format!(
                        "cannot resolve a guest fault at {:#x}: {}",
                        a.gpa,
                        chain(&e)
                    )
                })?;
                progress = true;
            }
        }
        Ok(progress)
    }
}

pub(crate) use crate::error_chain as chain;

fn pio_in(shared: &VmShared, port: u16, data: &mut [u8]) {
    if devices::serial::Serial::<crate::console::ConsoleWriter>::handles(port) && data.len() == 1 {
        data[0] = shared
            .serial
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read(port);
        return;
    }
    if shared.mode == Mode::Linux {
        if let Some(v) = crate::linux::pio_in(port) {
            data.fill(0);
            data[0] = v;
            return;
        }
    }
    data.fill(0xff);
}

/// Port writes other than hypercalls; false if the VM must stop.
fn pio_out(shared: &VmShared, port: u16, data: &[u8]) -> bool {
    if devices::serial::Serial::<crate::console::ConsoleWriter>::handles(port) {
        let mut serial = shared.serial.lock().unwrap_or_else(PoisonError::into_inner);
        for b in data {
            serial.write(port, *b);
        }
        return true;
    }
    if shared.mode == Mode::Linux && crate::linux::pio_out_resets(port, data) {
        shared.finish(Exit::Reset);
        return false;
    }
    true
}

/// An emulated load: from RAM (after resolving its fault) or a device.
fn mmio_read(shared: &VmShared, gpa: u64, data: &mut [u8]) -> Result<(), String> {
    let mem = &shared.mem;
    if mem.layout().contains(gpa, data.len() as u64) {
        return mem
            .read(gpa, data)
            .map_err(|e| format!("emulated load from {gpa:#x}: {}", chain(&e)));
    }
    data.fill(0xff);
    Ok(())
}

/// An emulated store: into RAM (a write fault first, so copy-on-write is
/// broken exactly as for a native store) or a device.
fn mmio_write(shared: &VmShared, gpa: u64, data: &[u8]) -> Result<(), String> {
    let mem = &shared.mem;
    if mem.layout().contains(gpa, data.len() as u64) {
        return mem
            .write(gpa, data)
            .map_err(|e| format!("emulated store to {gpa:#x}: {}", chain(&e)));
    }
    Ok(())
}

/// The hypercall result for a start request (VCPU_START).
pub(crate) fn start_vcpu(shared: &VmShared, index: u64, rip: u64, rsp: u64) -> i64 {
    if shared.mode != Mode::Program || index == 0 || index >= shared.controls.len() as u64 {
        return -errno::EINVAL;
    }
    if shared.controls[index as usize].start(rip, rsp) {
        0
    } else {
        -errno::EBUSY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpu_starts_once() {
        let c = VcpuControl::new(false);
        assert!(c.start(1, 2));
        assert!(!c.start(1, 2), "started twice");
        assert_eq!(c.wait_runnable(), Some(Some((1, 2))));
        assert!(!c.start(1, 2), "started while running");
        c.stop();
        assert_eq!(c.wait_runnable(), None);
    }

    #[test]
    fn errors_chain_their_sources() {
        let e = std::io::Error::other(crate::vm::VmmError::Config("inner".into()));
        assert_eq!(chain(&e), "inner");
    }
}
