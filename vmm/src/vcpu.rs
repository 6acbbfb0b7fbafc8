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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock, PoisonError};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_regs, kvm_run, kvm_sregs, kvm_sync_regs, kvm_xcrs, kvm_xsave};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use memory::Access;

use crate::abi::{HYPERCALL_PORT, Hypercall, errno};
use crate::kvm::{KvmError, ioctl};
use crate::machine::WaitError;
use crate::vm::{Exit, Mode, VmShared};
use crate::x86::decode::{self, CpuState, FaultDecoder, PageAccess};
use crate::x86::program::{self, FAULT_PORT, GuestFault};

/// Consecutive faults that needed nothing, while no other thread changed
/// the host mapping, before the VM is stopped: a hundred in a row means
/// the VMM cannot tell what the guest needs.
const MAX_STUCK: u32 = 100;

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

/// Sends the kick signal to vCPU thread `t`: its `KVM_RUN` returns at once.
pub(crate) fn kick_thread(t: libc::pthread_t) {
    // SAFETY: `t` names a vCPU thread of this process whose handle is
    // joined only after its VM ended (or a fuzzing target's thread, which
    // owns the target); a signal to a thread that already returned is
    // harmless (ESRCH is ignored).
    unsafe { libc::pthread_kill(t, kick_signal()) };
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
    /// Asked to save its state and wait (for a fork).
    Pausing,
    /// Waiting, its state saved.
    Paused,
    /// Told to stop for good.
    Stopped,
}

/// What a pause request found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PauseRequest {
    /// The vCPU will pause; wait for it.
    Pausing,
    /// It never started: it has no state to save.
    Parked,
    /// It is stopping with its VM.
    Stopped,
}

/// What the vCPU thread must do next.
enum Next {
    Start(u64, u64),
    Run,
    Pause,
    Stop,
}

/// The handle other threads use to start, pause or stop one vCPU.
#[derive(Debug)]
pub(crate) struct VcpuControl {
    state: Mutex<State>,
    changed: Condvar,
    thread: OnceLock<libc::pthread_t>,
    saved: Mutex<Option<Result<VcpuState, String>>>,
    /// A vCPU of the KVM VM the VM moved to, for the thread to run from
    /// before it next enters the guest (see `fork.rs`), and whether one
    /// waits there (read before every step, so an atomic).
    moved: Mutex<Option<VcpuFd>>,
    moved_pending: AtomicBool,
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
            saved: Mutex::new(None),
            moved: Mutex::new(None),
            moved_pending: AtomicBool::new(false),
        }
    }

    /// Hands the vCPU `fd`, loaded with its state, to run from now on: its
    /// VM moved to a new KVM VM while it was paused, parked or forking.
    pub(crate) fn move_to(&self, fd: VcpuFd) {
        *self.moved.lock().unwrap_or_else(PoisonError::into_inner) = Some(fd);
        self.moved_pending.store(true, Ordering::Release);
    }

    /// The vCPU's side of [`VcpuControl::move_to`].
    fn take_moved(&self) -> Option<VcpuFd> {
        if !self.moved_pending.swap(false, Ordering::Acquire) {
            return None;
        }
        self.moved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    pub(crate) fn set_thread(&self, handle: &JoinHandle<()>) {
        let _ = self.thread.set(handle.as_pthread_t());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn kick(&self) {
        if let Some(t) = self.thread.get() {
            kick_thread(*t);
        }
    }

    /// Asks a parked vCPU to start and waits until it runs; false if it is
    /// not parked.
    pub(crate) fn start(&self, rip: u64, rsp: u64) -> bool {
        let mut s = self.lock();
        if *s != State::Parked {
            return false;
        }
        *s = State::Starting(rip, rsp);
        self.changed.notify_all();
        while matches!(*s, State::Starting(..)) {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        true
    }

    /// Stops the vCPU and kicks it out of `KVM_RUN`.
    pub(crate) fn stop(&self) {
        *self.lock() = State::Stopped;
        self.changed.notify_all();
        self.kick();
    }

    /// Asks a running vCPU to save its state and wait.
    pub(crate) fn request_pause(&self) -> PauseRequest {
        let mut s = self.lock();
        while matches!(*s, State::Starting(..)) {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        match *s {
            State::Running => {
                *s = State::Pausing;
                drop(s);
                self.kick();
                PauseRequest::Pausing
            }
            State::Parked => PauseRequest::Parked,
            State::Pausing | State::Paused | State::Stopped | State::Starting(..) => {
                PauseRequest::Stopped
            }
        }
    }

    /// Whether someone asked this vCPU to pause or stop.
    pub(crate) fn interrupted(&self) -> bool {
        matches!(*self.lock(), State::Pausing | State::Stopped)
    }

    /// Waits until a pause request was served; the vCPU's saved state, or
    /// None if it stopped instead.
    pub(crate) fn wait_paused(&self) -> Option<Result<VcpuState, String>> {
        let mut s = self.lock();
        while *s == State::Pausing {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        drop(s);
        self.saved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Lets a paused vCPU run again.
    pub(crate) fn resume(&self) {
        let mut s = self.lock();
        if *s == State::Paused {
            *s = State::Running;
            self.changed.notify_all();
        }
    }

    /// The vCPU thread's side: blocks while there is nothing to do.
    fn next(&self) -> Next {
        let mut s = self.lock();
        loop {
            match *s {
                State::Running => return Next::Run,
                State::Starting(rip, rsp) => return Next::Start(rip, rsp),
                State::Pausing => return Next::Pause,
                State::Stopped => return Next::Stop,
                State::Parked | State::Paused => {
                    s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner)
                }
            }
        }
    }

    /// The vCPU thread's side: it started (state Running again).
    fn started(&self) {
        let mut s = self.lock();
        if matches!(*s, State::Starting(..)) {
            *s = State::Running;
        }
        self.changed.notify_all();
    }

    /// The vCPU thread's side: its state is saved (or could not be).
    fn paused(&self, state: Result<VcpuState, String>) {
        *self.saved.lock().unwrap_or_else(PoisonError::into_inner) = Some(state);
        let mut s = self.lock();
        if *s == State::Pausing {
            *s = State::Paused;
        }
        self.changed.notify_all();
    }
}

/// Runs vCPU `index` until its VM ends.
pub(crate) fn run(shared: Arc<VmShared>, fd: VcpuFd, index: u32) {
    let control = shared.controls[index as usize].clone();
    let mut cpu = Vcpu::new(shared.clone(), fd, index);
    cpu.bind_thread();
    // A bug that panics here must end the VM, not leave it waiting for a
    // vCPU that is gone.
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cpu.run_loop(&control)));
    if let Err(panic) = ran {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        shared.finish(Exit::Error(format!("vCPU {index} failed: {what}")));
    }
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
}

impl Vcpu {
    pub(crate) fn new(shared: Arc<VmShared>, fd: VcpuFd, index: u32) -> Self {
        Self {
            shared,
            fd,
            index,
            stuck: 0,
            host_seen: 0,
            decoder: FaultDecoder::default(),
        }
    }

    /// Makes the calling thread the one a kick reaches: it must be the
    /// thread that calls [`Vcpu::step`].
    pub(crate) fn bind_thread(&mut self) {
        install_kick_handler();
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|r| r.set(run_ptr));
    }

    /// Switches to the vCPU its VM moved to, if it moved. The old one goes
    /// to the retiring thread once a kick can no longer reach it.
    ///
    /// The new vCPU has not exited yet, so `kvm_run` holds none of its
    /// registers: they are copied there, as an exit would, for a hypercall
    /// to return through (see [`Vcpu::set_rax`]).
    pub(crate) fn follow_move(&mut self, control: &VcpuControl) {
        if let Some(fd) = control.take_moved() {
            let old = std::mem::replace(&mut self.fd, fd);
            self.bind_thread();
            crate::retire::later(old);
            match self.fd.get_regs() {
                Ok(regs) => self.fd.sync_regs_mut().regs = regs,
                Err(e) => self.shared.finish(Exit::Error(format!(
                    "vCPU {} cannot read its registers after moving: {e}",
                    self.index
                ))),
            }
        }
    }

    fn run_loop(&mut self, control: &VcpuControl) {
        loop {
            let next = control.next();
            self.follow_move(control);
            match next {
                Next::Run => match self.step() {
                    Flow::Go | Flow::DirtyRingFull | Flow::ChildSnapshot(..) => {}
                    Flow::End(exit) => {
                        self.shared.finish(exit);
                        break;
                    }
                    // Outside fuzzing, DONE ends the VM like EXIT.
                    Flow::Done(status) => {
                        self.shared.finish(Exit::Code(status));
                        break;
                    }
                },
                Next::Start(rip, rsp) => {
                    let r = self.enter_at(rip, rsp);
                    control.started();
                    if let Err(e) = r {
                        self.shared.finish(Exit::Error(e));
                        break;
                    }
                }
                Next::Pause => {
                    let state = self.capture();
                    control.paused(state);
                }
                Next::Stop => break,
            }
        }
    }
}

pub(crate) struct Vcpu {
    pub(crate) shared: Arc<VmShared>,
    pub(crate) fd: VcpuFd,
    index: u32,
    stuck: u32,
    /// The memory's host-mapping change count when the guest last entered.
    host_seen: u64,
    decoder: FaultDecoder,
}

/// What one exit left the vCPU to do.
#[derive(Debug)]
pub(crate) enum Flow {
    /// Run on.
    Go,
    /// The VM ends this way.
    End(Exit),
    /// The guest called DONE(status): a fuzzing run ended.
    Done(u64),
    /// KVM's dirty ring is full: harvest it before running on.
    DirtyRingFull,
    /// A fuzzing clone asked for a child snapshot called SNAPSHOT(buf, cap).
    ChildSnapshot(u64, u64),
}

/// The architectural state of one program-mode vCPU: enough to continue it
/// in a forked VM.
#[derive(Debug)]
pub(crate) struct VcpuState {
    pub(crate) regs: kvm_regs,
    pub(crate) sregs: kvm_sregs,
    pub(crate) xsave: kvm_xsave,
    pub(crate) xcrs: kvm_xcrs,
    /// The guest's TSC when the state was saved, if KVM told it: a VM
    /// continued elsewhere keeps its time.
    pub(crate) tsc: Option<u64>,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        Self {
            regs: self.regs,
            sregs: self.sregs,
            // The 4 KiB region is all of it: program-mode guests have no
            // XSAVE feature beyond it (see `restore`).
            xsave: kvm_xsave {
                region: self.xsave.region,
                ..Default::default()
            },
            xcrs: self.xcrs,
            tsc: self.tsc,
        }
    }
}

impl VcpuState {
    /// Loads the state into a vCPU that has not run yet.
    pub(crate) fn restore(&self, fd: &VcpuFd) -> Result<(), KvmError> {
        ioctl("set system registers", fd.set_sregs(&self.sregs))?;
        ioctl("set XCR0", fd.set_xcrs(&self.xcrs))?;
        // SAFETY: the kernel reads as many bytes as the guest's XSAVE
        // features need; the CPUID the VMM gives program-mode guests offers
        // only x87, SSE and AVX state, which fits the 4 KiB `kvm_xsave`.
        // KVM checks the contents itself (a buffer read from a snapshot
        // file included).
        ioctl("set the FPU and vector registers", unsafe {
            fd.set_xsave(&self.xsave)
        })?;
        ioctl("set registers", fd.set_regs(&self.regs))?;
        if let Some(tsc) = self.tsc {
            ioctl("set the TSC", write_tsc(fd, tsc))?;
        }
        Ok(())
    }
}

/// The guest's time-stamp counter, as an MSR.
const MSR_IA32_TSC: u32 = 0x10;

/// Reads the guest's TSC of `fd`, if KVM tells it.
pub(crate) fn read_tsc(fd: &VcpuFd) -> Option<u64> {
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .ok()?;
    (fd.get_msrs(&mut msrs).ok()? == 1).then(|| msrs.as_slice()[0].data)
}

/// Sets the guest's TSC of `fd` to `value`, the way KVM takes it as meant:
/// a host write close to the TSC KVM expects is taken for an attempt to
/// keep vCPUs in step and ignored, so a distant value goes first.
pub(crate) fn write_tsc(fd: &VcpuFd, value: u64) -> Result<(), kvm_ioctls::Error> {
    let entry = |data| kvm_bindings::kvm_msr_entry {
        index: MSR_IA32_TSC,
        data,
        ..Default::default()
    };
    let msrs =
        kvm_bindings::Msrs::from_entries(&[entry(value.wrapping_add(1 << 62)), entry(value)])
            .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
    match fd.set_msrs(&msrs)? {
        2 => Ok(()),
        _ => Err(kvm_ioctls::Error::new(libc::EINVAL)),
    }
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

    /// Completes any access KVM was emulating (so no exit is half done),
    /// then reads the vCPU's state.
    pub(crate) fn capture(&mut self) -> Result<VcpuState, String> {
        self.settle()?;
        let fail = |what: &str, e: kvm_ioctls::Error| format!("vCPU {}: {what}: {e}", self.index);
        let s = self.fd.sync_regs();
        Ok(VcpuState {
            regs: s.regs,
            sregs: s.sregs,
            xsave: self
                .fd
                .get_xsave()
                .map_err(|e| fail("reading vector registers", e))?,
            xcrs: self.fd.get_xcrs().map_err(|e| fail("reading XCR0", e))?,
            tsc: read_tsc(&self.fd),
        })
    }

    /// Completes the exit KVM is waiting on (the rest of an `out` or of an
    /// emulated access) without running guest code: its registers are then
    /// final and may be read or replaced.
    pub(crate) fn settle(&mut self) -> Result<(), String> {
        let fail = |what: &str, e: kvm_ioctls::Error| format!("vCPU {}: {what}: {e}", self.index);
        let mut settled = false;
        for _ in 0..16 {
            self.fd.set_kvm_immediate_exit(1);
            match self.fd.run() {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    settled = true;
                    break;
                }
                Ok(VcpuExit::IoIn(port, data)) => pio_in(&self.shared, port, data),
                Ok(VcpuExit::MmioRead(gpa, data)) => mmio_read(&self.shared, gpa, data)?,
                Ok(VcpuExit::MmioWrite(gpa, data)) => {
                    let (b, n) = copy8(data);
                    mmio_write(&self.shared, gpa, &b[..n])?;
                }
                Ok(other) => {
                    return Err(format!("vCPU {} cannot pause during {other:?}", self.index));
                }
                Err(e) => return Err(fail("completing a pending access", e)),
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        if !settled {
            return Err(format!(
                "vCPU {} kept emulating; cannot pause it",
                self.index
            ));
        }
        Ok(())
    }

    /// SNAPSHOT from this vCPU: in a fuzzing session's root VM, takes the
    /// snapshot and ends the VM; elsewhere, hands over the input.
    fn snapshot(&mut self, buf: u64, cap: u64) -> Flow {
        if self.shared.harness.child_wanted() {
            return Flow::ChildSnapshot(buf, cap);
        }
        if !matches!(self.shared.harness, crate::fuzz::harness::Harness::Root(_)) {
            let n = crate::fuzz::harness::plain_snapshot(&self.shared, buf, cap);
            self.set_rax(n as u64);
            return Flow::Go;
        }
        let taken = self
            .capture()
            .and_then(|state| crate::fuzz::vm_target::take(&self.shared, state, buf, cap));
        self.shared.harness.set_taken(taken);
        Flow::End(Exit::Code(0))
    }

    /// FORK from this vCPU: returns the child's id (the child sees 0).
    fn fork(&mut self) -> i64 {
        self.set_rax(0);
        let state = match self.capture() {
            Ok(s) => s,
            Err(e) => {
                log::warn!("FORK: {e}");
                return -errno::EIO;
            }
        };
        let forked = crate::fork::fork(&self.shared, Some((self.index, state)));
        let control = self.shared.controls[self.index as usize].clone();
        self.follow_move(&control);
        match forked {
            Ok(id) => i64::from(id),
            Err(e) => {
                log::warn!("FORK: {}", chain(&e));
                crate::fork::errno_of(&e)
            }
        }
    }

    /// WAIT from this vCPU.
    fn wait(&self, child: u64) -> i64 {
        let Ok(child) = u32::try_from(child) else {
            return -errno::ECHILD;
        };
        let control = &self.shared.controls[self.index as usize];
        match self
            .shared
            .machine
            .wait_child(self.shared.id, child, || control.interrupted())
        {
            Ok(exit) => exit.wait_status(),
            Err(WaitError::NotChild) => -errno::ECHILD,
            Err(WaitError::Interrupted) => -errno::EINTR,
        }
    }

    /// Starts a secondary program-mode vCPU at `rip` with `rsp`.
    fn enter_at(&mut self, rip: u64, rsp: u64) -> Result<(), String> {
        let regs = program::regs(rip, rsp, u64::from(self.index));
        self.fd
            .set_regs(&regs)
            .map_err(|e| format!("cannot start vCPU {}: {e}", self.index))
    }

    /// Runs the guest until one exit is handled.
    pub(crate) fn step(&mut self) -> Flow {
        self.host_seen = self.shared.mem.host_mapping_changes();
        let event = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                pio_in(&self.shared, port, data);
                return Flow::Go;
            }
            Ok(VcpuExit::MmioRead(gpa, data)) => {
                return match mmio_read(&self.shared, gpa, data) {
                    Ok(()) => Flow::Go,
                    Err(e) => Flow::End(Exit::Error(e)),
                };
            }
            Ok(VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL)) => {
                return Flow::DirtyRingFull;
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
            Ok(VcpuExit::InternalError) => {
                if self.shared.mode == Mode::Linux
                    && crate::linux::emulation_failure(&mut self.fd, &self.shared.mem)
                {
                    return Flow::Go;
                }
                Event::Stop(Exit::Error(format!(
                    "KVM internal error on vCPU {} (emulation failure?) at rip {:#x}",
                    self.index,
                    self.regs().regs.rip
                )))
            }
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
                Flow::Go
            }
            Event::Stop(exit) => Flow::End(exit),
            Event::Out(port, data, len) => self.on_out(port, &data[..len]),
            Event::MmioWrite(gpa, data, len) => match mmio_write(&self.shared, gpa, &data[..len]) {
                Ok(()) => Flow::Go,
                Err(e) => Flow::End(Exit::Error(e)),
            },
            Event::MemoryFault => match self.resolve_memory_fault() {
                Ok(()) => Flow::Go,
                Err(e) => Flow::End(Exit::Error(e)),
            },
        }
    }

    fn on_out(&mut self, port: u16, data: &[u8]) -> Flow {
        match port {
            HYPERCALL_PORT if data.len() == 4 => {
                let nr = u64::from(u32::from_le_bytes(data.try_into().expect("4 bytes")));
                let regs = self.regs().regs;
                let fuzzing = self.shared.harness.is_fuzzing();
                let result = match Hypercall::from_nr(nr) {
                    // A fuzzing clone is reset, not forked; its vCPU is
                    // driven by the fuzzer, not by the pause protocol; a
                    // reset does not take write protection back.
                    Some(Hypercall::Fork | Hypercall::VcpuStart | Hypercall::Wp) if fuzzing => {
                        Ok(-errno::EOPNOTSUPP)
                    }
                    Some(Hypercall::Fork) => Ok(self.fork()),
                    Some(Hypercall::Wait) => Ok(self.wait(regs.rdi)),
                    Some(Hypercall::Snapshot) => return self.snapshot(regs.rdi, regs.rsi),
                    Some(Hypercall::Done) => return Flow::Done(regs.rdi),
                    _ => {
                        crate::hypercall::dispatch(&self.shared, nr, [regs.rdi, regs.rsi, regs.r10])
                    }
                };
                match result {
                    Ok(ret) => {
                        self.set_rax(ret as u64);
                        Flow::Go
                    }
                    Err(exit) => Flow::End(exit),
                }
            }
            FAULT_PORT if self.shared.mode == Mode::Program => {
                let s = self.regs();
                let fault =
                    GuestFault::from_frame(&self.shared.mem, data[0], s.regs.rsp, s.sregs.cr2);
                Flow::End(Exit::Fault(fault))
            }
            _ => {
                if pio_out(&self.shared, port, data) {
                    Flow::Go
                } else {
                    Flow::End(Exit::Reset)
                }
            }
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
        // The instruction bytes and the guest's page tables are read the
        // way the CPU reads them: a page in swap or being moved is brought
        // back first (that alone may be all the fault needed).
        let brought_back = std::cell::Cell::new(false);
        let reader = |gpa: u64, buf: &mut [u8]| {
            if mem.peek(gpa, buf) {
                return true;
            }
            let len = buf.len() as u64;
            if !mem.layout().contains(gpa, len) || mem.populate(gpa, len, Access::Read).is_err() {
                return false;
            }
            brought_back.set(true);
            mem.peek(gpa, buf)
        };
        let mut decoded = self.decoder.instruction_accesses(&cpu, &reader);
        let mut progress = match &decoded {
            Ok(list) => self.resolve(list)?,
            Err(_) => false,
        };
        if !progress {
            // Perhaps a remembered translation went stale: walk afresh.
            self.decoder.flush();
            decoded = self.decoder.instruction_accesses(&cpu, &reader);
            progress = match &decoded {
                Ok(list) => self.resolve(list)?,
                Err(e) => {
                    log::debug!("vCPU {}: {e}", self.index);
                    false
                }
            };
        }
        if !progress {
            progress = self.resolve(&decode::implicit_accesses(&cpu, &reader))?;
        }
        progress |= brought_back.get();
        // Nothing to resolve, but the host mapping changed while the guest
        // ran (a page was being moved or protected by another thread): the
        // fault was real, and the retry goes through once that is done.
        progress |= mem.host_mapping_changes() != self.host_seen;
        if progress {
            self.stuck = 0;
            return Ok(());
        }
        self.stuck += 1;
        if self.stuck > 1 {
            std::thread::yield_now();
        }
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

    /// Resolves each access that would fault; true if any did. When the
    /// lockless check finds nothing to do, every access is resolved again
    /// under the memory locks: a page that a migration or a swap-out is
    /// taking away loses its host mapping before its entry changes, and
    /// only the locks see (and wait for) that.
    fn resolve(&self, accesses: &[PageAccess]) -> Result<bool, String> {
        let mem = &self.shared.mem;
        let fault = |a: &PageAccess, access| {
            mem.fault(a.gpa, access).map_err(|e| {
                format!(
                    "cannot resolve a guest fault at {:#x}: {}",
                    a.gpa,
                    chain(&e)
                )
            })
        };
        let access_of = |a: &PageAccess| if a.write { Access::Write } else { Access::Read };
        let mut progress = false;
        for a in accesses {
            if mem.would_fault(a.gpa, access_of(a)) {
                fault(a, access_of(a))?;
                progress = true;
            }
        }
        if !progress {
            for a in accesses {
                progress |= fault(a, access_of(a))?;
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

/// Port writes other than hypercalls; false if the guest asked for a reset.
fn pio_out(shared: &VmShared, port: u16, data: &[u8]) -> bool {
    if devices::serial::Serial::<crate::console::ConsoleWriter>::handles(port) {
        let mut serial = shared.serial.lock().unwrap_or_else(PoisonError::into_inner);
        for b in data {
            serial.write(port, *b);
        }
        return true;
    }
    if shared.mode == Mode::Linux && crate::linux::pio_out_resets(port, data) {
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
    if crate::virtio::VirtioBus::in_window(gpa) {
        shared.virtio.read(gpa, data);
        return Ok(());
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
    if crate::virtio::VirtioBus::in_window(gpa) {
        shared.virtio.write(gpa, data);
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
    fn a_vcpu_starts_once_and_pauses_when_asked() {
        let c = Arc::new(VcpuControl::new(false));
        assert_eq!(c.request_pause(), PauseRequest::Parked);
        let starter = {
            let c = c.clone();
            std::thread::spawn(move || c.start(1, 2))
        };
        assert!(matches!(c.next(), Next::Start(1, 2)));
        c.started();
        assert!(starter.join().unwrap());
        assert!(!c.start(1, 2), "started twice");
        assert!(matches!(c.next(), Next::Run));
        assert_eq!(c.request_pause(), PauseRequest::Pausing);
        assert!(c.interrupted());
        assert!(matches!(c.next(), Next::Pause));
        c.paused(Err("no vCPU in this test".into()));
        assert!(matches!(c.wait_paused(), Some(Err(_))));
        c.resume();
        assert!(matches!(c.next(), Next::Run));
        c.stop();
        assert!(matches!(c.next(), Next::Stop));
        assert_eq!(c.request_pause(), PauseRequest::Stopped);
    }

    #[test]
    fn errors_chain_their_sources() {
        let e = std::io::Error::other(crate::vm::VmmError::Config("inner".into()));
        assert_eq!(chain(&e), "inner");
    }
}
