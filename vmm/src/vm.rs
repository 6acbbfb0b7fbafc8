//! A VM: its memory, its KVM VM and vCPU threads, its devices, and how it
//! ends.
//!
//! A VM ends once: the first of EXIT, a guest fault, a reset or an error
//! decides its [`Exit`]; every vCPU is then kicked out of `KVM_RUN` and its
//! thread stops.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use kvm_bindings::kvm_fpu;
use kvm_ioctls::{VcpuFd, VmFd};
use memory::{Layout, LayoutError, MemError, StatsSnapshot, VmMemory};
use thiserror::Error;

use crate::console::{Console, ConsoleWriter, Sink};
use crate::elf::{ElfError, Program};
use crate::fuzz::harness::Harness;
use crate::kvm::{Hypervisor, KvmError, create_vcpu, ioctl};
use crate::machine::{Machine, SpareFor};
pub(crate) use crate::pins::VmmPins;
use crate::vcpu::{self, VcpuControl};
use crate::virtio::VirtioBus;
use crate::x86::cpuid::{self, Guest};
use crate::x86::program::{self, GuestFault};
use devices::pin_test::PinTest;
use devices::serial::{Irq, Serial};

/// Guest RAM below the 32-bit MMIO hole.
pub const LOW_RAM_MAX: u64 = 3 << 30;
/// Where RAM beyond [`LOW_RAM_MAX`] continues.
pub const HIGH_RAM_BASE: u64 = 4 << 30;
/// RAM sizes are multiples of this.
pub const RAM_ALIGN: u64 = 2 << 20;
/// The largest RAM the VMM accepts.
pub const MAX_RAM: u64 = 1 << 40;

/// Errors creating or running a VM.
#[derive(Debug, Error)]
pub enum VmmError {
    /// A configuration value out of range.
    #[error("{0}")]
    Config(String),
    /// The program file was refused.
    #[error("invalid program")]
    Elf(#[from] ElfError),
    /// Guest memory failed.
    #[error("guest memory")]
    Memory(#[from] MemError),
    /// KVM failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The RAM layout was refused.
    #[error("guest RAM layout")]
    Layout(#[from] LayoutError),
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
    /// Booting a kernel failed.
    #[error("{0}")]
    Boot(String),
    /// A live snapshot failed.
    #[error("live snapshot")]
    Snapshot(#[from] memory::SnapshotError),
    /// A virtio device could not be set up.
    #[error("virtio devices")]
    Virtio(#[from] crate::virtio::VirtioError),
    /// A snapshot state file could not be written or used.
    #[error("snapshot files")]
    Snapfile(#[from] crate::snapfile::SnapfileError),
    /// A snapshot memory file could not be used.
    #[error("snapshot memory file")]
    Image(#[from] memory::ImageError),
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The guest called EXIT with this code.
    Code(u64),
    /// The program took an exception.
    Fault(GuestFault),
    /// The guest asked for a reset (a kernel's reboot or poweroff).
    Reset,
    /// The guest triple-faulted or otherwise stopped the CPU.
    Shutdown(String),
    /// The VMM could not go on.
    Error(String),
}

impl Exit {
    /// What WAIT returns for a child that ended this way: its EXIT code,
    /// 256 + vector for an exception, 512 for any other end.
    pub fn wait_status(&self) -> i64 {
        match self {
            Exit::Code(c) => *c as i64,
            Exit::Fault(f) => 256 + i64::from(f.vector),
            Exit::Reset | Exit::Shutdown(_) | Exit::Error(_) => 512,
        }
    }

    /// The process exit status this ending maps to: the guest's code for
    /// EXIT (low 8 bits, as for any process), 0 for a reset, 3 for a guest
    /// fault or shutdown, 1 for a VMM error.
    pub fn status(&self) -> i32 {
        match self {
            Exit::Code(c) => (*c & 0xff) as i32,
            Exit::Reset => 0,
            Exit::Fault(_) | Exit::Shutdown(_) => 3,
            Exit::Error(_) => 1,
        }
    }
}

/// What a finished VM reports.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// How it ended.
    pub exit: Exit,
    /// Memory counters when it ended.
    pub stats: StatsSnapshot,
}

/// What to boot.
#[derive(Debug)]
pub enum Boot {
    /// A static ELF program (program mode), its bytes.
    Program(Vec<u8>),
    /// A Linux kernel.
    Linux(crate::linux::LinuxBoot),
}

/// A VM's configuration.
#[derive(Debug)]
pub struct VmConfig {
    /// RAM in bytes.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// What runs.
    pub boot: Boot,
    /// Where the console goes.
    pub sink: Sink,
    /// Memory tunables.
    pub memory: memory::Config,
    /// Most guest RAM kept resident, in bytes (the rest goes to swap).
    pub mem_limit: Option<u64>,
    /// Virtio devices, in slot order.
    pub devices: Vec<crate::virtio::DeviceConfig>,
    /// The input SNAPSHOT hands the guest (none: an empty input), for
    /// replaying one fuzzing input outside the fuzzer.
    pub input: Option<Vec<u8>>,
}

impl VmConfig {
    /// A program-mode configuration with defaults for the rest.
    pub fn program(bytes: Vec<u8>) -> Self {
        Self {
            mem: 256 << 20,
            vcpus: 1,
            boot: Boot::Program(bytes),
            sink: Sink::Stdout,
            memory: memory::Config::default(),
            mem_limit: None,
            devices: Vec::new(),
            input: None,
        }
    }
}

/// The RAM layout for `mem` bytes: low RAM up to 3 GiB, the rest from 4 GiB.
pub fn ram_layout(mem: u64) -> Result<Layout, VmmError> {
    if mem < RAM_ALIGN || mem % RAM_ALIGN != 0 {
        return Err(VmmError::Config(format!(
            "--mem {mem:#x}: RAM must be a non-zero multiple of 2 MiB"
        )));
    }
    if mem > MAX_RAM {
        return Err(VmmError::Config(format!(
            "--mem {mem:#x}: at most {} GiB of RAM is supported",
            MAX_RAM >> 30
        )));
    }
    let low = mem.min(LOW_RAM_MAX);
    Ok(Layout::new(&[(0, low), (HIGH_RAM_BASE, mem - low)])?)
}

/// Guest kinds the exit loop distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A ring-3 program.
    Program,
    /// A Linux kernel.
    Linux,
}

/// What a VM's vCPU threads share.
#[derive(Debug)]
pub(crate) struct VmShared {
    /// 0 for the root VM, the clone id otherwise.
    pub(crate) id: u32,
    pub(crate) machine: Arc<Machine>,
    pub(crate) mem: Arc<VmMemory>,
    /// The KVM VM; it lives as long as its vCPU threads run. A fork may
    /// move the VM to a new one (see `fork.rs`).
    kvm: Mutex<Arc<VmFd>>,
    pub(crate) console: Arc<Console>,
    pub(crate) serial: Mutex<Serial<ConsoleWriter>>,
    pub(crate) pins: Mutex<PinTest>,
    /// The virtio devices.
    pub(crate) virtio: VirtioBus,
    /// The VMM's own pins (program mode: the ring-0 stacks).
    _vmm_pins: VmmPins,
    pub(crate) mode: Mode,
    pub(crate) controls: Vec<Arc<VcpuControl>>,
    /// What the fuzzing hypercalls do in this VM.
    pub(crate) harness: Harness,
    exit: Mutex<Option<Exit>>,
    ended: Condvar,
}

impl VmShared {
    /// The KVM VM the vCPUs run in now.
    pub(crate) fn kvm(&self) -> Arc<VmFd> {
        self.kvm
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes `kvm` the VM's KVM VM; returns the one it replaces. The
    /// caller has moved every vCPU there (see `fork.rs`).
    pub(crate) fn replace_kvm(&self, kvm: VmFd) -> Arc<VmFd> {
        std::mem::replace(
            &mut *self.kvm.lock().unwrap_or_else(PoisonError::into_inner),
            Arc::new(kvm),
        )
    }

    /// Ends the VM with `exit` unless it already ended; stops every vCPU.
    pub(crate) fn finish(&self, exit: Exit) {
        {
            let mut slot = self.exit.lock().unwrap_or_else(PoisonError::into_inner);
            if slot.is_some() {
                return;
            }
            log::debug!("VM {} ends: {exit:?}", self.id);
            *slot = Some(exit.clone());
        }
        self.ended.notify_all();
        for c in &self.controls {
            c.stop();
        }
        self.console.flush();
        self.machine.record_exit(self.id, &exit);
    }

    fn wait(&self) -> Exit {
        let mut slot = self.exit.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(e) = slot.clone() {
                return e;
            }
            slot = self
                .ended
                .wait(slot)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// What a root VM is made of (by [`Vm::new`] or a restore).
pub(crate) struct RootParts {
    pub(crate) machine: Arc<Machine>,
    pub(crate) mem: Arc<VmMemory>,
    pub(crate) kvm: VmFd,
    pub(crate) console: Arc<Console>,
    pub(crate) serial: Mutex<Serial<ConsoleWriter>>,
    pub(crate) virtio: VirtioBus,
    pub(crate) vmm_pins: VmmPins,
    pub(crate) mode: Mode,
    pub(crate) controls: Vec<Arc<VcpuControl>>,
    pub(crate) harness: Harness,
}

/// A VM: the root VM made by [`Vm::new`] or [`Vm::restore`], or a clone
/// made by [`Vm::fork`].
#[derive(Debug)]
pub struct Vm {
    shared: Arc<VmShared>,
    idle: Vec<VcpuFd>,
    threads: Vec<JoinHandle<()>>,
}

impl Vm {
    /// Creates a VM, ready to start: memory laid out, the guest loaded,
    /// vCPUs created with their entry state.
    pub fn new(
        hv: &Hypervisor,
        ctx: &Arc<memory::Context>,
        mut cfg: VmConfig,
    ) -> Result<Self, VmmError> {
        let harness = Harness::Plain {
            input: cfg.input.take().unwrap_or_default(),
        };
        Self::with_harness(hv, ctx, cfg, harness)
    }

    /// Like [`Vm::new`], with the fuzzing hypercalls doing what `harness`
    /// says.
    pub(crate) fn with_harness(
        hv: &Hypervisor,
        ctx: &Arc<memory::Context>,
        cfg: VmConfig,
        harness: Harness,
    ) -> Result<Self, VmmError> {
        let layout = ram_layout(cfg.mem)?;
        let max_vcpus = match cfg.boot {
            Boot::Program(_) => program::MAX_VCPUS,
            Boot::Linux(_) => hv.max_vcpus().min(254) as u32,
        };
        if cfg.vcpus == 0 || cfg.vcpus > max_vcpus {
            return Err(VmmError::Config(format!(
                "--vcpus {}: between 1 and {max_vcpus} vCPUs are supported",
                cfg.vcpus
            )));
        }
        let mode = match cfg.boot {
            Boot::Program(_) => Mode::Program,
            Boot::Linux(_) => Mode::Linux,
        };
        // Check the program before any VM exists.
        let program = match &cfg.boot {
            Boot::Program(bytes) => {
                if cfg.mem > program::MAX_RAM {
                    return Err(VmmError::Config(format!(
                        "--mem: program mode maps at most {} GiB",
                        program::MAX_RAM >> 30
                    )));
                }
                Some(Program::parse(bytes.clone(), &layout)?)
            }
            Boot::Linux(_) => None,
        };
        let mem = VmMemory::new(ctx, layout)?;
        let kvm = hv.create_vm(&mem)?;
        let console = Arc::new(Console::new(cfg.sink.clone(), None));
        let irq = match mode {
            Mode::Program => Irq::None,
            Mode::Linux => crate::linux::serial_irq(&kvm)?,
        };
        let serial = Mutex::new(Serial::new(irq, ConsoleWriter(console.clone())));
        let virtio = VirtioBus::new(&cfg.devices, &mem, &kvm, mode)?;

        let guest = match mode {
            Mode::Program => Guest::Program,
            Mode::Linux => Guest::Kernel,
        };
        let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
        for index in 0..cfg.vcpus {
            let cpuid = cpuid::shape(hv.supported_cpuid(), index, guest);
            vcpus.push(create_vcpu(&kvm, index, &cpuid)?);
        }
        let controls = (0..cfg.vcpus)
            .map(|i| Arc::new(VcpuControl::new(mode == Mode::Linux || i == 0)))
            .collect();

        let machine = Machine::new(hv.clone(), ctx.clone(), cfg.sink.clone());
        let mut vmm_pins = VmmPins::none(&machine);
        match (&cfg.boot, program) {
            (Boot::Program(_), Some(program)) => {
                // The VMM pins its ring-0 stacks there for the VM's life:
                // on a huge frame, each fork would copy 2 MiB for them.
                mem.keep_small(0, program::LOW_END)?;
                program::build(&mem, cfg.vcpus)?;
                // The CPU reads these without a fault it could report.
                mem.set_unevictable(0, program::LOW_END)?;
                vmm_pins = VmmPins::ring0_stacks(&machine, &mem, cfg.vcpus)?;
                program.load(&mem)?;
                let top = mem.layout().ranges()[0].len & !0xf;
                for (index, vcpu) in vcpus.iter().enumerate() {
                    setup_program_vcpu(vcpu, index as u32, hv)?;
                    if index == 0 {
                        let regs = program::regs(program.entry, top, mem.layout().size());
                        ioctl("set registers", vcpu.set_regs(&regs))?;
                    }
                }
            }
            (Boot::Linux(linux), _) => {
                let entries = crate::virtio::cmdline_entries(virtio.len());
                crate::linux::boot(linux, &mem, &kvm, &vcpus, &entries)?
            }
            (Boot::Program(_), None) => unreachable!("programs are parsed above"),
        }
        // Loading is done: from here on, the limit holds.
        mem.set_resident_limit(cfg.mem_limit.map(|b| b.div_ceil(memory::PAGE_SIZE)));

        let parts = RootParts {
            machine,
            mem,
            kvm,
            console,
            serial,
            virtio,
            vmm_pins,
            mode,
            controls,
            harness,
        };
        Ok(Self::root(parts, vcpus))
    }

    /// The root VM made of `parts`, with its vCPUs not started.
    pub(crate) fn root(parts: RootParts, vcpus: Vec<VcpuFd>) -> Self {
        Self {
            shared: Arc::new(VmShared {
                id: 0,
                machine: parts.machine,
                mem: parts.mem,
                kvm: Mutex::new(Arc::new(parts.kvm)),
                console: parts.console,
                serial: parts.serial,
                pins: Mutex::new(PinTest::new()),
                virtio: parts.virtio,
                _vmm_pins: parts.vmm_pins,
                mode: parts.mode,
                controls: parts.controls,
                harness: parts.harness,
                exit: Mutex::new(None),
                ended: Condvar::new(),
            }),
            idle: vcpus,
            threads: Vec::new(),
        }
    }

    /// The VM's id: 0 for the root VM, the clone id otherwise.
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// The VM's memory.
    pub fn memory(&self) -> &Arc<VmMemory> {
        &self.shared.mem
    }

    /// The VM's virtio devices.
    pub fn virtio(&self) -> &VirtioBus {
        &self.shared.virtio
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), VmmError> {
        let fds = std::mem::take(&mut self.idle);
        self.threads = spawn_vcpus(&self.shared, fds)?;
        Ok(())
    }

    /// Makes the next clone's KVM VM, vCPUs and empty memory now, so that
    /// the next fork only forks memory and loads vCPU states (each fork
    /// makes the one after it so, on a thread of its own); for a VM large
    /// enough, also the KVM VM the fork moves it to (see `fork.rs`).
    pub fn prepare_fork(&self) -> Result<(), VmmError> {
        let (shared, n) = (&self.shared, self.shared.controls.len());
        let machine = &shared.machine;
        let mut wanted = vec![SpareFor::Clone];
        if crate::fork::may_move(&shared.mem) {
            wanted.push(SpareFor::Parent);
        }
        for what in wanted {
            machine.make_spare(what, &shared.mem, n)?;
            machine.start_spare_maker(what, &shared.mem, n);
        }
        Ok(())
    }

    /// Forks the running VM: the clone continues from this instant with
    /// the same vCPU state and its memory copy-on-write; it runs on its own
    /// threads until it ends. The VM's vCPUs are paused meanwhile.
    pub fn fork(&self) -> Result<Vm, VmmError> {
        let id = crate::fork::fork(&self.shared, None)?;
        let shared =
            self.shared.machine.clone_shared(id).ok_or_else(|| {
                VmmError::Config(format!("clone {id} ended before it was returned"))
            })?;
        Ok(Vm {
            shared,
            idle: Vec::new(),
            threads: Vec::new(),
        })
    }

    /// Writes a point-in-time image of the running VM's memory to `image`
    /// while the guest keeps running (see [`crate::snapshot`]).
    pub fn snapshot_live(
        &self,
        image: std::fs::File,
        progress: impl FnMut(u64, u64),
    ) -> Result<crate::snapshot::LiveReport, VmmError> {
        crate::snapshot::live(&self.shared, image, progress)
    }

    /// Like [`Vm::snapshot_live`], with the guest paused until the image is
    /// written (a stop-the-world snapshot).
    pub fn snapshot_stopped(
        &self,
        image: std::fs::File,
        progress: impl FnMut(u64, u64),
    ) -> Result<crate::snapshot::LiveReport, VmmError> {
        crate::snapshot::stopped(&self.shared, image, progress)
    }

    /// A handle that can end the VM from any thread, while another waits
    /// for it.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.shared.clone())
    }

    /// How long the last fork of this VM or of its family kept the forked
    /// VM's vCPUs paused.
    pub fn last_fork_pause(&self) -> std::time::Duration {
        self.shared.machine.last_pause()
    }

    /// The vCPUs of a VM that was not started, for code that runs them
    /// itself (benchmarks of the bare exit loop).
    pub(crate) fn take_idle(&mut self) -> Vec<VcpuFd> {
        std::mem::take(&mut self.idle)
    }

    /// Ends the VM from outside with `exit` (if it has not ended yet).
    pub fn stop(&self, exit: Exit) {
        self.shared.finish(exit);
    }

    /// Waits for the VM to end and for its vCPU threads to stop. For the
    /// root VM this also stops every clone still running.
    pub fn wait(mut self) -> Outcome {
        let machine = self.shared.machine.clone();
        let exit = if self.shared.id == 0 {
            let exit = self.shared.wait();
            for t in self.threads.drain(..) {
                if t.join().is_err() {
                    log::error!("a vCPU thread panicked");
                }
            }
            machine.stop_clones();
            exit
        } else {
            let id = self.shared.id;
            drop(self.shared);
            machine
                .wait_clone(id)
                .unwrap_or_else(|| Exit::Error(format!("clone {id} was already waited for")))
        };
        Outcome {
            exit,
            stats: machine.stats(),
        }
    }

    /// Waits for the VM to end and for its vCPU threads to stop, keeping
    /// its state (a fuzzing session's root VM).
    pub(crate) fn wait_keep(&mut self) -> Exit {
        let exit = self.shared.wait();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
        exit
    }

    /// What the VM's threads share.
    pub(crate) fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }

    /// Starts the VM and waits for it to end.
    pub fn run(mut self) -> Result<Outcome, VmmError> {
        self.start()?;
        Ok(self.wait())
    }
}

/// Ends a VM from any thread (see [`Vm::stop_handle`]).
#[derive(Clone, Debug)]
pub struct StopHandle(Arc<VmShared>);

impl StopHandle {
    /// Ends the VM with `exit` unless it already ended.
    pub fn stop(&self, exit: Exit) {
        self.0.finish(exit);
    }

    /// Like [`Vm::snapshot_to_files`], from any thread.
    pub fn snapshot_to_files(
        &self,
        image: std::fs::File,
        state: &std::path::Path,
        live: bool,
        progress: impl FnMut(u64, u64),
    ) -> Result<crate::snapshot::SaveReport, VmmError> {
        crate::snapshot::save(&self.0, image, state, live, progress)
    }

    /// Like [`Vm::snapshot_live`], from any thread.
    pub fn snapshot_live(
        &self,
        image: std::fs::File,
        progress: impl FnMut(u64, u64),
    ) -> Result<crate::snapshot::LiveReport, VmmError> {
        crate::snapshot::live(&self.0, image, progress)
    }
}

/// Starts one thread per vCPU of `shared`.
pub(crate) fn spawn_vcpus(
    shared: &Arc<VmShared>,
    fds: Vec<VcpuFd>,
) -> Result<Vec<JoinHandle<()>>, VmmError> {
    vcpu::install_kick_handler();
    let mut threads = Vec::with_capacity(fds.len());
    for (index, fd) in fds.into_iter().enumerate() {
        let vm = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vm{}-vcpu{index}", shared.id))
            .spawn(move || vcpu::run(vm, fd, index as u32))
            .map_err(VmmError::Thread)?;
        shared.controls[index].set_thread(&handle);
        threads.push(handle);
    }
    Ok(threads)
}

impl VmShared {
    /// The state a clone starts from, minus vCPU state: a new KVM VM over
    /// `mem`, a console prefixed with the clone's id, the UART's state, and
    /// a pin-test device without pins.
    pub(crate) fn clone_devices(
        &self,
        id: u32,
        mem: Arc<VmMemory>,
        kvm: VmFd,
        controls: Vec<Arc<VcpuControl>>,
        virtio: crate::virtio::Frozen,
        harness: Harness,
    ) -> Result<VmShared, VmmError> {
        let virtio = VirtioBus::restore(virtio, &mem, &kvm, self.mode)?;
        let vmm_pins = match self.mode {
            Mode::Program => VmmPins::ring0_stacks(&self.machine, &mem, controls.len() as u32)?,
            Mode::Linux => VmmPins::none(&self.machine),
        };
        let sink = if harness.is_fuzzing() {
            Sink::Discard
        } else {
            self.machine.sink.clone()
        };
        let console = Arc::new(Console::new(sink, Some(id)));
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone_to(Irq::None, ConsoleWriter(console.clone()));
        Ok(VmShared {
            id,
            machine: self.machine.clone(),
            mem,
            kvm: Mutex::new(Arc::new(kvm)),
            console,
            serial: Mutex::new(serial),
            pins: Mutex::new(PinTest::new()),
            virtio,
            _vmm_pins: vmm_pins,
            mode: self.mode,
            controls,
            harness,
            exit: Mutex::new(None),
            ended: Condvar::new(),
        })
    }
}

pub(crate) fn setup_program_vcpu(
    vcpu: &VcpuFd,
    index: u32,
    hv: &Hypervisor,
) -> Result<(), VmmError> {
    let base = ioctl("read system registers", vcpu.get_sregs())?;
    let avx = cpuid::has_avx(hv.supported_cpuid());
    ioctl(
        "set system registers",
        vcpu.set_sregs(&program::sregs(index, base, avx)),
    )?;
    if avx {
        let mut xcrs = ioctl("read XCR0", vcpu.get_xcrs())?;
        xcrs.nr_xcrs = 1;
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = 0b111; // x87, SSE, AVX
        ioctl("enable AVX state", vcpu.set_xcrs(&xcrs))?;
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    ioctl("set the FPU state", vcpu.set_fpu(&fpu))?;
    Ok(())
}
