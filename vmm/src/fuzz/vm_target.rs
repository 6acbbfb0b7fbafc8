//! The VM-backed [`Target`]: a clone of the snapshot, reset after every
//! run to exactly the snapshot's state.
//!
//! # Taking the snapshot
//! The root VM runs until the guest calls SNAPSHOT(buf, cap). Its vCPU
//! saves its state there; its virtio devices are drained (no request
//! still writes memory or a disk) and held still while the root's memory
//! is forked into the *origin*, a VM that never runs, and their state is
//! kept as the snapshot's device *template* (transport state, and devices
//! over copy-on-write views of their host side: a block device's
//! overlay). The coverage map is dropped from the origin, so it reads as
//! zeros. The root VM then ends. Devices whose host side cannot go back
//! to the snapshot (network links, host sockets) are refused there.
//!
//! # One run
//! 1. The input goes into the guest's buffer (a VMM write, recorded) and
//!    its length into RAX; the vCPU runs until DONE, a guest exception, the
//!    wall-clock timeout or the exit budget.
//! 2. Reset:
//!    - each device is reset, drained and put back as the template has it
//!      (a block overlay drops the run's writes), then held still; the
//!      pin-test device drops its pins;
//!    - the pages written since the last reset, as KVM's dirty ring and
//!      the VMM's own record list them (devices write through pins, which
//!      the record lists, and discards are listed too), get the origin's
//!      bytes again ([`memory::VmMemory::reset_pages`]); the coverage map
//!      is read from those same pages first (the others are zero);
//!    - each transport gets the template's state back, its rings pinned
//!      again in the reset memory;
//!    - the registers, the FPU/SSE state and the TSC are restored.
//!
//! The cost of a reset grows with the pages (and disk blocks) a run wrote,
//! never with RAM or disk size: no step walks the VM's memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use devices::pin_test::PinTest;
use kvm_bindings::{KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET, kvm_device_attr};
use kvm_ioctls::{SyncReg, VcpuFd};
use memory::VmMemory;

use super::harness::Harness;
use super::spare::{Recipe, Spare, Spares};
use super::{Crash, FuzzError, MAP_SIZE, Target, Verdict};
use crate::dirty::Dirty;
use crate::vcpu::{Flow, Vcpu, VcpuControl, VcpuState};
use crate::virtio::Template;
use crate::vm::{Exit, Vm, VmConfig, VmShared};
use crate::x86::program::COVERAGE_MAP;

const MAP_PAGES: u64 = MAP_SIZE as u64 / memory::PAGE_SIZE;

/// What the root's SNAPSHOT produced.
#[derive(Debug)]
pub(crate) struct Taken {
    origin: Arc<VmMemory>,
    devices: Template,
    state: VcpuState,
    buf: u64,
    cap: u64,
}

/// The root's SNAPSHOT: forks its memory into the origin.
pub(crate) fn take(
    shared: &VmShared,
    state: VcpuState,
    buf: u64,
    cap: u64,
) -> Result<Box<Taken>, String> {
    if shared.controls.len() != 1 {
        return Err("fuzzing targets run on one vCPU (--vcpus 1)".into());
    }
    if cap > 0 && !shared.mem.layout().contains(buf, cap) {
        return Err(format!(
            "SNAPSHOT's input buffer {buf:#x}+{cap:#x} is not guest RAM"
        ));
    }
    // The devices are drained and held still while memory is forked, so
    // the snapshot holds no buffer a request was still writing.
    let (frozen, still) = shared
        .virtio
        .freeze_drained()
        .map_err(|e| format!("cannot save the devices' state: {}", crate::error_chain(&e)))?;
    let origin = shared
        .mem
        .fork()
        .map_err(|e| format!("cannot fork the snapshot: {}", crate::error_chain(&e)))?;
    drop(still);
    let devices = Template::new(frozen)?;
    origin
        .discard(COVERAGE_MAP, MAP_SIZE as u64)
        .map_err(|e| format!("cannot clear the coverage map: {}", crate::error_chain(&e)))?;
    Ok(Box::new(Taken {
        origin,
        devices,
        state,
        buf,
        cap,
    }))
}

/// Limits of one run.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Wall-clock time before a run counts as a hang.
    pub timeout: Duration,
    /// VM exits before a run counts as a hang.
    pub exits: u64,
    /// After a run whose reset would restore more pages than this (those
    /// it dirtied, and those kept writable, see [`VmTarget`]), the clone
    /// is made anew from the snapshot instead of reset (its private frames
    /// go back). None: always reset, which `vmm bench` measures as the faster
    /// choice here at any size (see the README).
    pub refork_above: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(1),
            exits: 1_000_000,
            refork_above: None,
        }
    }
}

/// Unarmed pages (see [`VmTarget`]'s `harvest`) a clone keeps beyond twice
/// its write set, and at most: restoring 2048 pages every run costs about
/// what 80 write faults on tracked pages cost here.
const UNARMED_MIN: u64 = 64;
const UNARMED_MAX: u64 = 2048;

/// A VM stopped at its reset point, which clones run inputs from.
#[derive(Debug)]
pub struct Snapshot {
    /// The session's root VM (its devices and machine), shared by every
    /// snapshot of the tree.
    root: Arc<Vm>,
    /// The snapshot this one was taken in a clone of (its frames are
    /// shared copy-on-write with this one's).
    parent: Option<Arc<Snapshot>>,
    taken: Box<Taken>,
    /// The next clone, made ahead (see `spare.rs`).
    spare: Arc<Spares>,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.spare.close();
    }
}

pub(crate) fn vm_err(what: &str, e: &dyn std::error::Error) -> FuzzError {
    FuzzError::Vm(format!("{what}: {}", crate::error_chain(e)))
}

impl Snapshot {
    /// A snapshot. A root snapshot has its first clone made ahead at
    /// once; a child snapshot (a tree may hold many) only from its first
    /// clone on, so one never cloned costs no thread and no KVM VM.
    fn new(root: Arc<Vm>, parent: Option<Arc<Snapshot>>, taken: Box<Taken>) -> Arc<Self> {
        let is_root = parent.is_none();
        let snap = Arc::new(Snapshot {
            root,
            parent,
            taken,
            spare: Arc::default(),
        });
        if is_root {
            snap.refill_spare();
        }
        snap
    }

    /// Runs the program of `cfg` until it calls SNAPSHOT.
    pub fn take(
        hv: &crate::Hypervisor,
        ctx: &Arc<memory::Context>,
        cfg: VmConfig,
    ) -> Result<Arc<Snapshot>, FuzzError> {
        let harness = Harness::Root(Mutex::new(None));
        let mut root = Vm::with_harness(hv, ctx, cfg, harness)
            .map_err(|e| FuzzError::Vm(crate::error_chain(&e)))?;
        root.start()
            .map_err(|e| FuzzError::Vm(crate::error_chain(&e)))?;
        let exit = root.wait_keep();
        match root.shared().harness.take_taken() {
            Some(Ok(taken)) => Ok(Snapshot::new(Arc::new(root), None, taken)),
            Some(Err(e)) => Err(FuzzError::Vm(e)),
            None => Err(FuzzError::NoSnapshot(exit_text(&exit))),
        }
    }

    /// Runs `program` with `mem` bytes of RAM and `devices`, in a memory
    /// context of its own with `memory`'s settings (`huge`: 2 MiB
    /// mappings) and with its console going to `sink`, until it calls
    /// SNAPSHOT.
    pub fn of_program(
        hv: &crate::Hypervisor,
        program: Vec<u8>,
        mem: u64,
        devices: Vec<crate::virtio::DeviceConfig>,
        sink: crate::Sink,
        memory: memory::Config,
    ) -> Result<Arc<Snapshot>, FuzzError> {
        let ctx = memory::Context::new(memory);
        let cfg = VmConfig {
            mem,
            devices,
            sink,
            ..VmConfig::program(program)
        };
        Self::take(hv, &ctx, cfg)
    }

    /// The snapshot this one was taken from, for a child snapshot.
    pub fn parent(&self) -> Option<&Arc<Snapshot>> {
        self.parent.as_ref()
    }

    /// The origin's memory (the snapshot's pages).
    pub fn memory(&self) -> &Arc<VmMemory> {
        &self.taken.origin
    }

    /// A new clone of the snapshot, ready to run inputs. It takes the
    /// clone made ahead if one is ready (else makes one now), and has the
    /// next one made.
    pub fn target(self: &Arc<Self>, limits: Limits) -> Result<VmTarget, FuzzError> {
        let target = VmTarget::new(self, limits);
        self.refill_spare();
        target
    }

    /// Whether the next clone is made ahead (see [`Snapshot::target`]).
    pub fn spare_ready(&self) -> bool {
        self.spare.ready(|_| true)
    }

    /// Turns making clones ahead on (the default: the next one is made at
    /// once) or off (the one made is dropped).
    pub fn make_clones_ahead(&self, on: bool) {
        self.spare.set_on(on);
        if on {
            self.refill_spare();
        }
    }

    /// Has the next clone made ahead, unless one is there or on its way.
    fn refill_spare(&self) {
        self.spare.want("fuzz-spare", || {
            let recipe = self.recipe();
            move || Spare::make(&recipe)
        });
    }

    /// What making a clone of this snapshot takes.
    fn recipe(&self) -> Recipe {
        Recipe {
            hv: self.root.shared().machine.hv.clone(),
            origin: self.taken.origin.clone(),
            state: self.taken.state.clone(),
        }
    }
}

fn exit_text(exit: &Exit) -> String {
    match exit {
        Exit::Code(c) => format!("it exited with code {c}"),
        Exit::Fault(f) => f.to_string(),
        Exit::Reset => "it reset".into(),
        Exit::Shutdown(s) | Exit::Error(s) => s.clone(),
    }
}

/// How the guest's TSC is put back to the snapshot's value.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TscReset {
    /// Through KVM's TSC offset attribute: offset = snapshot TSC − host TSC.
    Offset(u64),
    /// Through the TSC MSR, written twice: KVM takes a write close to the
    /// TSC it expects as a synchronisation and ignores it, so a far value
    /// goes first.
    Msr(u64),
    /// The snapshot has no TSC reading.
    None,
}

/// A clone of a [`Snapshot`] that runs one input at a time.
pub struct VmTarget {
    snap: Arc<Snapshot>,
    vcpu: Vcpu,
    dirty: Dirty,
    pages: Vec<u64>,
    map: Box<[u8]>,
    /// Map pages that hold bytes from the last run (bit per page).
    map_filled: u16,
    tsc: TscReset,
    limits: Limits,
    clock: Arc<RunClock>,
    /// Pages the last reset restored.
    last_dirty: usize,
    /// Time spent reading and re-arming KVM's dirty tracking.
    harvest_time: Duration,
    /// Pages whose dirty-ring entries were collected without re-arming
    /// KVM's write tracking: the guest writes them again unseen, so every
    /// reset restores them (see `dirty.rs`).
    unarmed: Vec<u64>,
    /// Pages the last run that started with none unarmed wrote.
    write_set: u64,
    /// The dirty ring filled during this run.
    ring_filled: bool,
}

impl std::fmt::Debug for VmTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmTarget")
            .field("id", &self.vcpu.shared.id)
            .finish()
    }
}

impl VmTarget {
    fn new(snap: &Arc<Snapshot>, limits: Limits) -> Result<Self, FuzzError> {
        let root = snap.root.shared();
        let Spare {
            mem,
            kvm,
            fd,
            dirty,
            tsc,
        } = match snap.spare.take(|_| true) {
            Some(spare) => spare,
            None => Spare::make(&snap.recipe())?,
        };
        let id = root.machine.next_id();
        let controls = vec![Arc::new(VcpuControl::new(true))];
        let harness = Harness::Clone {
            input_len: AtomicU64::new(0),
            input_at: AtomicU64::new(0),
            child_wanted: AtomicBool::new(false),
        };
        let devices = snap
            .taken
            .devices
            .fork()
            .map_err(|e| vm_err("cannot fork the snapshot's devices", &e))?;
        let shared = root
            .clone_devices(id, mem, kvm, controls, devices, harness)
            .map_err(|e| vm_err("cannot set up the clone", &e))?;
        let vcpu = Vcpu::new(Arc::new(shared), fd, 0);
        let target = Self {
            snap: snap.clone(),
            vcpu,
            dirty,
            pages: Vec::new(),
            map: vec![0u8; MAP_SIZE].into_boxed_slice(),
            map_filled: 0,
            tsc,
            limits,
            clock: Arc::new(RunClock::default()),
            last_dirty: 0,
            harvest_time: Duration::ZERO,
            unarmed: Vec::new(),
            write_set: 0,
            ring_filled: false,
        };
        log::debug!("fuzzing clone {id}: TSC reset by {:?}", target.tsc);
        Ok(target)
    }

    /// Pages the last reset restored (the run's dirtied pages).
    pub fn last_dirty(&self) -> usize {
        self.last_dirty
    }

    /// Time spent reading and re-arming KVM's dirty tracking, over all
    /// runs so far.
    pub fn harvest_time(&self) -> Duration {
        self.harvest_time
    }

    /// The clone's memory.
    pub fn memory(&self) -> &Arc<VmMemory> {
        &self.vcpu.shared.mem
    }

    fn vm_error(e: impl std::fmt::Display) -> FuzzError {
        FuzzError::Vm(e.to_string())
    }

    /// Writes the input and gets the vCPU ready to run it.
    fn start_run(&mut self, input: &[u8]) -> Result<(), FuzzError> {
        self.vcpu.bind_thread();
        self.clock.bind();
        let taken = &self.snap.taken;
        let n = (input.len() as u64).min(taken.cap);
        let shared = self.vcpu.shared.clone();
        if n > 0 {
            shared
                .mem
                .write(taken.buf, &input[..n as usize])
                .map_err(|e| FuzzError::Vm(crate::error_chain(&e)))?;
        }
        if let Harness::Clone {
            input_len,
            input_at,
            ..
        } = &shared.harness
        {
            input_len.store(n, Ordering::Relaxed);
            input_at.store(taken.buf, Ordering::Relaxed);
        }
        self.vcpu.fd.sync_regs_mut().regs.rax = n;
        self.vcpu.fd.set_sync_dirty_reg(SyncReg::Register);
        // Last, so that the guest's clock starts where the snapshot's
        // stopped however long the target sat idle.
        self.restore_tsc()
    }

    /// Runs `input` until the guest calls SNAPSHOT again and takes a child
    /// snapshot there: clones of the child start at that second SNAPSHOT,
    /// each run's input in its buffer, and share the child's pages
    /// copy-on-write, as the child shares this clone's snapshot's. This
    /// clone is then reset as after any run. An error if the run ends
    /// without that SNAPSHOT.
    pub fn take_child(&mut self, input: &[u8]) -> Result<Arc<Snapshot>, FuzzError> {
        let shared = self.vcpu.shared.clone();
        let Harness::Clone { child_wanted, .. } = &shared.harness else {
            return Err(FuzzError::Vm("not a fuzzing clone".into()));
        };
        child_wanted.store(true, Ordering::Relaxed);
        let started = self.start_run(input);
        let ended = started.and_then(|()| self.drive());
        child_wanted.store(false, Ordering::Relaxed);
        self.clock.stop();
        let child = match ended {
            Ok(Ended::Child(buf, cap)) => self.fork_child(buf, cap),
            Ok(Ended::Verdict(v)) => Err(FuzzError::NoSnapshot(format!(
                "the run ended ({v}) before a second SNAPSHOT"
            ))),
            Err(e) => Err(e),
        };
        self.reset()?;
        child
    }

    /// The child snapshot at the guest's SNAPSHOT(buf, cap) now.
    fn fork_child(&mut self, buf: u64, cap: u64) -> Result<Arc<Snapshot>, FuzzError> {
        let state = self.vcpu.capture().map_err(FuzzError::Vm)?;
        let taken = take(&self.vcpu.shared, state, buf, cap).map_err(FuzzError::Vm)?;
        Ok(Snapshot::new(
            self.snap.root.clone(),
            Some(self.snap.clone()),
            taken,
        ))
    }

    /// Runs the vCPU until the run ends.
    fn drive(&mut self) -> Result<Ended, FuzzError> {
        let started = self.clock.start(&self.limits);
        let mut exits = 0u64;
        loop {
            match self.vcpu.step() {
                Flow::Go => {
                    exits += 1;
                    if exits > self.limits.exits || self.clock.expired(started) {
                        return Ok(Ended::Verdict(Verdict::Hang));
                    }
                }
                Flow::DirtyRingFull => {
                    // Re-arming frees the ring; the unarmed pages may have
                    // been written before it, so this run restores them.
                    let shared = &self.vcpu.shared;
                    self.pages.append(&mut self.unarmed);
                    self.ring_filled = true;
                    self.dirty
                        .harvest(&shared.kvm(), &shared.mem, &mut self.pages, true)
                        .map_err(Self::vm_error)?;
                }
                Flow::ChildSnapshot(buf, cap) => return Ok(Ended::Child(buf, cap)),
                Flow::Done(0) => return Ok(Ended::Verdict(Verdict::Ok)),
                Flow::Done(status) => return Ok(Ended::Verdict(Verdict::Fail(status))),
                Flow::End(Exit::Fault(f)) => {
                    return Ok(Ended::Verdict(Verdict::Crash(f)));
                }
                Flow::End(Exit::Code(c)) => return Ok(Ended::Verdict(Verdict::Exit(c))),
                // The guest destroyed its own exception handling (its
                // descriptor tables are guest memory): a crash of the
                // target, reported as the double fault it could not take.
                Flow::End(Exit::Shutdown(_)) => {
                    let s = self.vcpu.fd.sync_regs();
                    return Ok(Ended::Verdict(Verdict::Crash(Crash {
                        vector: 8,
                        rip: s.regs.rip,
                        error: 0,
                        cr2: s.sregs.cr2,
                    })));
                }
                Flow::End(other) => return Err(FuzzError::Vm(exit_text(&other))),
            }
        }
    }

    /// Puts the clone back to the snapshot's state; reads the coverage the
    /// run left on the way.
    fn reset(&mut self) -> Result<(), FuzzError> {
        self.vcpu.settle().map_err(FuzzError::Vm)?;
        let shared = self.vcpu.shared.clone();
        let mem = &shared.mem;
        // Devices first: once they are drained, nothing but this thread
        // writes the clone's memory until they are restored.
        let devices = shared
            .virtio
            .rewind()
            .map_err(|e| FuzzError::Vm(crate::error_chain(&e)))?;
        *shared.pins.lock().unwrap_or_else(PoisonError::into_inner) = PinTest::new();
        let harvest = Instant::now();
        self.harvest(&shared.kvm(), mem)?;
        self.harvest_time += harvest.elapsed();
        mem.take_vmm_writes(&mut self.pages);
        self.read_coverage(mem)?;
        if self
            .limits
            .refork_above
            .is_some_and(|n| self.pages.len() > n)
        {
            drop(devices);
            return self.refork();
        }
        mem.reset_pages(&self.snap.taken.origin, &mut self.pages)
            .map_err(|e| FuzzError::Vm(crate::error_chain(&e)))?;
        devices.restore(self.snap.taken.devices.states());
        self.last_dirty = self.pages.len();
        self.pages.clear();
        self.restore_vcpu()
    }

    /// Lists the pages the run may have written: those KVM reports now,
    /// and the unarmed ones, which KVM no longer reports. Newly reported
    /// pages stay unarmed too: a target mostly writes the same pages run
    /// after run, and copying one back costs far less here than taking
    /// write access from it and the fault of its next write. A run that
    /// started with none unarmed shows the target's whole write set; once
    /// the unarmed pages are more than twice that (pages written once and
    /// never again pile up), KVM takes write access from all of them again.
    fn harvest(&mut self, kvm: &kvm_ioctls::VmFd, mem: &VmMemory) -> Result<(), FuzzError> {
        // A ring that filled mid-run was re-armed then: what it reports
        // now is only the end of the run.
        let filled = std::mem::take(&mut self.ring_filled);
        let whole_set = self.unarmed.is_empty() && !filled;
        self.pages.extend_from_slice(&self.unarmed);
        let before = self.pages.len();
        let armed = self
            .dirty
            .harvest(kvm, mem, &mut self.pages, false)
            .map_err(Self::vm_error)?;
        if armed {
            return Ok(());
        }
        if whole_set {
            self.write_set = (self.pages.len() - before) as u64;
        }
        self.unarmed.extend_from_slice(&self.pages[before..]);
        self.unarmed.sort_unstable();
        self.unarmed.dedup();
        let keep = (2 * self.write_set + UNARMED_MIN).min(UNARMED_MAX);
        if self.unarmed.len() as u64 > keep {
            self.dirty
                .harvest(kvm, mem, &mut self.pages, true)
                .map_err(Self::vm_error)?;
            self.unarmed.clear();
        }
        Ok(())
    }

    /// Replaces the clone by a new one from the snapshot, keeping the
    /// coverage the run left.
    fn refork(&mut self) -> Result<(), FuzzError> {
        let mut fresh = self.snap.target(self.limits)?;
        std::mem::swap(&mut fresh.map, &mut self.map);
        fresh.map_filled = self.map_filled;
        fresh.last_dirty = self.pages.len();
        fresh.harvest_time = self.harvest_time;
        fresh.clock = self.clock.clone();
        *self = fresh;
        Ok(())
    }

    /// Copies the map pages the run wrote into the map buffer, and zeroes
    /// those the previous run had filled.
    fn read_coverage(&mut self, mem: &VmMemory) -> Result<(), FuzzError> {
        let first = COVERAGE_MAP / memory::PAGE_SIZE;
        let mut filled = 0u16;
        for &p in &self.pages {
            if (first..first + MAP_PAGES).contains(&p) {
                filled |= 1 << (p - first);
            }
        }
        for i in 0..MAP_PAGES as usize {
            let page = &mut self.map[i * 4096..(i + 1) * 4096];
            if filled & (1 << i) != 0 {
                mem.read(COVERAGE_MAP + i as u64 * 4096, page)
                    .map_err(|e| FuzzError::Vm(crate::error_chain(&e)))?;
            } else if self.map_filled & (1 << i) != 0 {
                page.fill(0);
            }
        }
        self.map_filled = filled;
        Ok(())
    }

    fn restore_vcpu(&mut self) -> Result<(), FuzzError> {
        let state = &self.snap.taken.state;
        let fd = &mut self.vcpu.fd;
        fd.sync_regs_mut().regs = state.regs;
        fd.set_sync_dirty_reg(SyncReg::Register);
        if fd.sync_regs().sregs != state.sregs {
            fd.sync_regs_mut().sregs = state.sregs;
            fd.set_sync_dirty_reg(SyncReg::SystemRegister);
        }
        // SAFETY: a 4 KiB `kvm_xsave` for a program-mode vCPU, whose CPUID
        // offers no state beyond it (see VcpuState::restore).
        unsafe { fd.set_xsave(&state.xsave) }
            .map_err(|e| FuzzError::Vm(format!("cannot restore the FPU state: {e}")))
    }

    fn restore_tsc(&mut self) -> Result<(), FuzzError> {
        let fd = &self.vcpu.fd;
        let fail = |e: kvm_ioctls::Error| FuzzError::Vm(format!("cannot restore the TSC: {e}"));
        match self.tsc {
            TscReset::Offset(guest) => {
                let offset = guest.wrapping_sub(host_tsc());
                let attr = kvm_device_attr {
                    group: KVM_VCPU_TSC_CTRL,
                    attr: u64::from(KVM_VCPU_TSC_OFFSET),
                    addr: &raw const offset as u64,
                    flags: 0,
                };
                vcpu_attr(fd, KVM_SET_DEVICE_ATTR(), &attr)
                    .map_err(|e| FuzzError::Vm(format!("cannot restore the TSC offset: {e}")))
            }
            TscReset::Msr(guest) => crate::vcpu::write_tsc(fd, guest).map_err(fail),
            TscReset::None => Ok(()),
        }
    }
}

impl Target for VmTarget {
    fn run(&mut self, input: &[u8]) -> Result<Verdict, FuzzError> {
        self.start_run(input)?;
        let ended = self.drive();
        self.clock.stop();
        self.reset()?;
        match ended? {
            Ended::Verdict(v) => Ok(v),
            Ended::Child(..) => Err(FuzzError::Vm(
                "SNAPSHOT asked for a child snapshot outside take_child".into(),
            )),
        }
    }

    fn coverage(&self) -> &[u8] {
        &self.map
    }
}

/// How [`VmTarget::drive`] stopped.
enum Ended {
    /// The run ended.
    Verdict(Verdict),
    /// The guest called SNAPSHOT(buf, cap) for a child snapshot.
    Child(u64, u64),
}

pub(crate) fn tsc_offset_supported(fd: &VcpuFd) -> bool {
    let attr = kvm_device_attr {
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr: 0,
        flags: 0,
    };
    vcpu_attr(fd, KVM_HAS_DEVICE_ATTR(), &attr).is_ok()
}

vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_DEVICE_ATTR,
    kvm_bindings::KVMIO,
    0xe1,
    kvm_device_attr
);
vmm_sys_util::ioctl_iow_nr!(
    KVM_HAS_DEVICE_ATTR,
    kvm_bindings::KVMIO,
    0xe3,
    kvm_device_attr
);

/// A device-attribute ioctl on a vCPU (kvm-ioctls offers them on arm64
/// only).
fn vcpu_attr(fd: &VcpuFd, nr: libc::c_ulong, attr: &kvm_device_attr) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `attr` is a live kvm_device_attr for the call; KVM reads it
    // and, for SET, reads the u64 at `attr.addr`, which the caller keeps
    // alive (or 0 for HAS, which reads nothing there).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), nr as _, attr) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn host_tsc() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86-64.
    unsafe { std::arch::x86_64::_rdtsc() }
}

/// The watchdog's view of one target's current run.
#[derive(Debug, Default)]
struct RunClock {
    /// When the current run started (ns since the watchdog's epoch; 0: no
    /// run), and its timeout.
    started: AtomicU64,
    timeout: AtomicU64,
    /// The `started` value of the run the watchdog kicked.
    kicked: AtomicU64,
    /// The thread that runs the vCPU.
    thread: AtomicU64,
    registered: AtomicBool,
}

impl RunClock {
    /// Makes the calling thread the one kicked when a run is too long.
    fn bind(self: &Arc<Self>) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.thread.store(me, Ordering::Relaxed);
        if !self.registered.swap(true, Ordering::Relaxed) {
            watchdog()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Arc::downgrade(self));
        }
    }

    fn start(&self, limits: &Limits) -> u64 {
        let now = epoch_ns().max(1);
        self.timeout
            .store(limits.timeout.as_nanos() as u64, Ordering::Relaxed);
        self.started.store(now, Ordering::Release);
        now
    }

    fn stop(&self) {
        self.started.store(0, Ordering::Release);
    }

    fn expired(&self, started: u64) -> bool {
        self.kicked.load(Ordering::Acquire) == started
    }
}

fn epoch_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The clocks the watchdog thread looks at; it starts with the first.
fn watchdog() -> &'static Mutex<Vec<std::sync::Weak<RunClock>>> {
    static CLOCKS: OnceLock<Mutex<Vec<std::sync::Weak<RunClock>>>> = OnceLock::new();
    CLOCKS.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("fuzz-watchdog".into())
            .spawn(watch);
        if let Err(e) = spawned {
            log::error!("cannot start the fuzzing watchdog: {e}");
        }
        Mutex::new(Vec::new())
    })
}

/// Kicks every vCPU whose run is past its timeout, a few times per
/// timeout.
fn watch() {
    loop {
        let mut shortest = Duration::from_millis(50);
        {
            let mut clocks = watchdog().lock().unwrap_or_else(PoisonError::into_inner);
            clocks.retain(|c| c.strong_count() > 0);
            let now = epoch_ns();
            for c in clocks.iter().filter_map(std::sync::Weak::upgrade) {
                let started = c.started.load(Ordering::Acquire);
                let timeout = c.timeout.load(Ordering::Relaxed);
                shortest =
                    shortest.min(Duration::from_nanos(timeout / 4).max(Duration::from_micros(500)));
                if started != 0 && now.saturating_sub(started) > timeout {
                    c.kicked.store(started, Ordering::Release);
                    crate::vcpu::kick_thread(c.thread.load(Ordering::Relaxed));
                }
            }
        }
        std::thread::sleep(shortest);
    }
}

/// What makes one [`Target`] per fuzzing job.
pub type TargetFactory = Box<dyn FnMut() -> Result<Box<dyn Target>, FuzzError> + Send>;

/// Runs `program` (with `mem` bytes of RAM, on 2 MiB mappings if `huge`,
/// and `devices`) to its SNAPSHOT and returns a factory of clones of that
/// snapshot, each run cut short after `timeout`. The program's console
/// output up to SNAPSHOT goes to stdout; the clones' output is dropped.
pub fn vm_targets(
    program: Vec<u8>,
    (mem, huge): (u64, bool),
    timeout: Duration,
    devices: Vec<crate::virtio::DeviceConfig>,
) -> Result<TargetFactory, FuzzError> {
    let hv = crate::Hypervisor::open().map_err(|e| FuzzError::Vm(crate::error_chain(&e)))?;
    let memory = memory::Config {
        huge,
        ..memory::Config::default()
    };
    let snap = Snapshot::of_program(&hv, program, mem, devices, crate::Sink::Stdout, memory)?;
    let limits = Limits {
        timeout,
        ..Limits::default()
    };
    Ok(Box::new(move || {
        snap.target(limits).map(|t| Box::new(t) as Box<dyn Target>)
    }))
}
