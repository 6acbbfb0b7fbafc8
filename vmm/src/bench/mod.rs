//! `vmm bench`: the performance figures the project is held to, each
//! measured in one run next to the baseline it is compared with.
//!
//! Guest-side timings use the TSC (read natively in ring 3 here) and are
//! converted with a rate calibrated against the host clock in the same run.

mod fuzz;
mod fuzz_e2e;
mod huge;
mod restore;
mod snapshot;
mod swap;
mod virtio;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use memory::{PAGE_SIZE, PinFlags, VmMemory};

use crate::console::Sink;
use crate::kvm::Hypervisor;
use crate::vm::{Exit, Vm, VmConfig, VmmError};

/// The benchmark guest (resources/guests/bench.c).
const GUEST: &[u8] = crate::guests::BENCH;
const MAILBOX: u64 = 0x20_0000;

/// Knobs for a run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Smaller sizes and fewer repetitions (a smoke run, not a measurement).
    pub quick: bool,
    /// Run only the figures of these groups (see [`GROUPS`]); all if empty.
    pub only: Vec<String>,
}

/// The groups of figures, in the order they run.
pub const GROUPS: &[&str] = &[
    "startup",
    "hypercall",
    "cow",
    "pin",
    "fork",
    "virtio",
    "swap",
    "migration",
    "snapshot",
    "fuzz",
    "restore",
    "huge",
];

/// One measured figure.
#[derive(Clone, Debug)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// The value, formatted with its unit.
    pub value: String,
    /// How it compares with its goal or baseline.
    pub verdict: String,
}

fn median_u64(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads the time-stamp counter; it has no preconditions
    // and touches no memory.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks per second, against the host's monotonic clock.
fn tsc_rate() -> f64 {
    let (t0, c0) = (Instant::now(), rdtsc());
    std::thread::sleep(Duration::from_millis(100));
    let (t1, c1) = (Instant::now(), rdtsc());
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
}

struct Bench {
    hv: Hypervisor,
    quick: bool,
    figures: Vec<Figure>,
    console: Option<Arc<Mutex<Vec<u8>>>>,
    /// VMs made by [`Bench::vm_with`] use huge mappings.
    huge: bool,
    /// And copy shared huge blocks so.
    huge_cow: memory::HugeCow,
    /// Forks measured by [`Bench::fork_touched_vm`] find their clone's
    /// KVM VM made ahead ([`Vm::prepare_fork`]).
    prepared: bool,
}

impl Bench {
    fn vm(&mut self, mem: u64, mode: u64, count: u64, tsc: f64) -> Result<Vm, VmmError> {
        self.vm_with(mem, 1, &[mode, count, 0, 0, tsc as u64], Vec::new())
    }

    /// A benchmark VM with `vcpus` vCPUs, `words` in its mailbox and
    /// virtio `devices`.
    fn vm_with(
        &mut self,
        mem: u64,
        vcpus: u32,
        words: &[u64],
        devices: Vec<crate::virtio::DeviceConfig>,
    ) -> Result<Vm, VmmError> {
        let ctx = memory::Context::new(memory::Config {
            huge: self.huge,
            huge_cow: self.huge_cow,
            ..memory::Config::default()
        });
        let (sink, console) = Sink::capture();
        self.console = Some(console);
        let vm = Vm::new(
            &self.hv,
            &ctx,
            VmConfig {
                mem,
                vcpus,
                sink,
                devices,
                ..VmConfig::program(GUEST.to_vec())
            },
        )?;
        let mailbox: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        vm.memory().write(MAILBOX, &mailbox)?;
        Ok(vm)
    }

    /// Runs `vm` to its end; an error, with the guest's console, unless it
    /// exited with 0.
    fn run_to_exit(&self, vm: Vm, what: &str) -> Result<(), VmmError> {
        let outcome = vm.run()?;
        if outcome.exit != Exit::Code(0) {
            return Err(VmmError::Config(format!(
                "{what} guest ended {:?}: {}",
                outcome.exit,
                self.console_text()
            )));
        }
        Ok(())
    }

    fn console_text(&self) -> String {
        self.console.as_ref().map_or(String::new(), |c| {
            String::from_utf8_lossy(&c.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
        })
    }

    fn mailbox(mem: &VmMemory, index: u64) -> u64 {
        let mut b = [0u8; 8];
        mem.read(MAILBOX + index * 8, &mut b)
            .map_or(0, |()| u64::from_le_bytes(b))
    }

    fn record(&mut self, name: &str, value: String, verdict: String) {
        println!("{name:<58} {value:>14}   {verdict}");
        self.figures.push(Figure {
            name: name.into(),
            value,
            verdict,
        });
    }

    /// `vmm run --program hello` as a whole process.
    fn process_wall_time(&mut self) -> Result<(), VmmError> {
        let exe = std::env::current_exe().map_err(VmmError::Thread)?;
        let dir = std::env::temp_dir().join(format!("vmm-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(VmmError::Thread)?;
        let hello = dir.join("hello.elf");
        std::fs::write(&hello, crate::guests::HELLO).map_err(VmmError::Thread)?;
        let runs = if self.quick { 5 } else { 30 };
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            let out = std::process::Command::new(&exe)
                .args(["run", "--program"])
                .arg(&hello)
                .output()
                .map_err(VmmError::Thread)?;
            times.push(t.elapsed());
            if !out.status.success() {
                return Err(VmmError::Config(format!(
                    "hello run failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        let m = median(times);
        self.record(
            "process wall time, `vmm run --program hello` (median)",
            format!("{:.2} ms", m.as_secs_f64() * 1e3),
            goal(m.as_secs_f64() * 1e3 <= 20.0, "goal <= 20 ms"),
        );
        Ok(())
    }

    /// From `Vm::new` to the exit of the guest's first instruction.
    fn first_instruction(&mut self, tsc: f64) -> Result<(), VmmError> {
        let runs = if self.quick { 5 } else { 30 };
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            let mut vm = self.vm(64 << 20, 5, 0, tsc)?;
            first_exit(&mut vm)?;
            times.push(t.elapsed());
        }
        let m = median(times);
        self.record(
            "VM creation to first guest instruction (median)",
            format!("{:.2} ms", m.as_secs_f64() * 1e3),
            goal(m.as_secs_f64() * 1e3 <= 5.0, "goal <= 5 ms"),
        );
        Ok(())
    }

    /// Ticks per call of the hypercall loop, run on a bare KVM_RUN loop
    /// that only counts exits (its memory made present first, since it
    /// resolves no faults).
    fn bare_hypercalls(&mut self, n: u64, tsc: f64) -> Result<u64, VmmError> {
        let mut vm = self.vm(64 << 20, 1, n, tsc)?;
        let mem = vm.memory().clone();
        mem.populate(0x10_0000, 0x80_0000, memory::Access::Write)?;
        mem.populate((64 << 20) - 0x1_0000, 0x1_0000, memory::Access::Write)?;
        let mut fd = vm.take_idle().remove(0);
        loop {
            match fd.run() {
                Ok(VcpuExit::IoOut(0x510, data)) if data.first() == Some(&0) => break,
                Ok(VcpuExit::IoOut(..)) => {}
                Ok(other) => return Err(VmmError::Config(format!("bare loop: {other:?}"))),
                Err(e) if e.errno() == libc::EFAULT => {
                    return Err(VmmError::Config("bare loop: a memory fault".into()));
                }
                Err(e) => return Err(VmmError::Config(format!("KVM_RUN: {e}"))),
            }
        }
        Ok(Self::mailbox(&mem, 2))
    }

    /// Ticks per call of the same loop through the VMM.
    fn vmm_hypercalls(&mut self, n: u64, tsc: f64) -> Result<u64, VmmError> {
        let vm = self.vm(64 << 20, 1, n, tsc)?;
        let mem = vm.memory().clone();
        self.run_to_exit(vm, "hypercall loop")?;
        Ok(Self::mailbox(&mem, 2))
    }

    /// A hypercall through the VMM next to a bare KVM_RUN loop, the two
    /// alternated and each timed by the guest itself.
    fn hypercall_round_trip(&mut self, tsc: f64) -> Result<(), VmmError> {
        let n: u64 = if self.quick { 2_000 } else { 10_000 };
        let rounds = if self.quick { 1 } else { 5 };
        let (mut bare, mut full) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            bare.push(self.bare_hypercalls(n, tsc)?);
            full.push(self.vmm_hypercalls(n, tsc)?);
        }
        // Exits here cost either about 26 or about 35 us, switching between
        // runs whatever the VMM does; the best of several alternated runs
        // compares the two loops on the same footing.
        let raw = bare.iter().copied().min().unwrap_or(0) as f64 / tsc;
        let full = full.iter().copied().min().unwrap_or(0) as f64 / tsc;
        self.record(
            &format!("bare KVM_RUN -> exit -> KVM_RUN round trip (best of {rounds})"),
            format!("{:.2} us", raw * 1e6),
            "baseline".into(),
        );
        let ratio = full / raw;
        self.record(
            &format!("hypercall round trip through the VMM (best of {rounds})"),
            format!("{:.2} us", full * 1e6),
            goal(
                ratio <= 1.2,
                &format!("{ratio:.2}x the bare loop, goal <= 1.2x"),
            ),
        );
        Ok(())
    }

    /// Linux fork() of a process with the anonymous memory of `area`,
    /// written again before each sample (so every page table entry is
    /// writable, as after the guest's writes below).
    fn linux_fork(area: LinuxArea) -> Result<Duration, VmmError> {
        let mut times = Vec::new();
        for _ in 0..3 {
            area.touch();
            times.push(area.fork_once()?);
        }
        Ok(median(times))
    }

    /// Fork latency of a VM that has just written `bytes` of memory, next
    /// to Linux fork(): its first fork, which makes the KVM VM and host
    /// mapping the VM moves to (see `fork.rs`), and a later one, which
    /// finds them made ahead by the fork before (here by
    /// [`Vm::prepare_fork`]). Each
    /// sample forks a new VM once: a second fork of the same VM would find
    /// its pages write-protected by the first and pay nearly nothing for
    /// them, which no guest that writes would see.
    fn fork_latency(&mut self, bytes: u64, tsc: f64) -> Result<(), VmmError> {
        let linux = Self::linux_fork(LinuxArea::new(bytes as usize)?)?;
        let first = self.fork_samples(bytes, tsc)?;
        self.prepared = true;
        let later = self.fork_samples(bytes, tsc);
        self.prepared = false;
        let later = later?;
        let mib = bytes >> 20;
        self.record(
            &format!("Linux fork(), {mib} MiB touched anonymous memory"),
            format!("{:.2} ms", linux.as_secs_f64() * 1e3),
            "baseline".into(),
        );
        for (which, (total, pause, phases)) in [
            ("a VM's first fork (moves: place made now)", first),
            ("a later fork (moves: place made ahead)", later),
        ] {
            let ratio = total.as_secs_f64() / linux.as_secs_f64();
            self.record(
                &format!("VM fork, {mib} MiB touched, {which}"),
                format!("{:.2} ms", total.as_secs_f64() * 1e3),
                goal(ratio <= 1.0, &format!("{ratio:.2}x Linux, goal <= 1.0x")),
            );
            let pause_ms = pause.as_secs_f64() * 1e3;
            self.record(
                &format!("  of which the guest was paused, {mib} MiB"),
                format!("{pause_ms:.2} ms"),
                if mib >= 1024 {
                    goal(pause_ms <= 2.0, "goal <= 2 ms at 1 GiB")
                } else {
                    "reported".into()
                },
            );
            self.fork_steps(mib, &phases);
        }
        Ok(())
    }

    /// Where a fork's time goes (medians of each memory step on its own);
    /// building the clone's KVM VM, when not made ahead, runs beside the
    /// copy.
    fn fork_steps(&mut self, mib: u64, phases: &[memory::ForkPhases]) {
        let step = |f: fn(&memory::ForkPhases) -> Duration| median(phases.iter().map(f).collect());
        let steps = [
            (
                "taking write access ahead, guest running",
                step(|p| p.demote),
            ),
            ("  of it shedding host page table entries", step(|p| p.shed)),
            (
                "protecting pages written since (or mapping the VM afresh), paused",
                step(|p| p.protect),
            ),
            ("copying the tables, guest running", step(|p| p.copy)),
        ];
        for (what, took) in steps {
            self.record(
                &format!("  step: {what}, {mib} MiB"),
                format!("{:.2} ms", took.as_secs_f64() * 1e3),
                "reported".into(),
            );
        }
    }

    /// Three forks of a new VM each that has just written `bytes`: the
    /// medians of the fork's total time and of the guest's pause, and the
    /// memory steps' times of each.
    fn fork_samples(
        &mut self,
        bytes: u64,
        tsc: f64,
    ) -> Result<(Duration, Duration, Vec<memory::ForkPhases>), VmmError> {
        let pages = bytes / PAGE_SIZE;
        let mut totals = Vec::new();
        let mut pauses = Vec::new();
        let mut phases = Vec::new();
        for _ in 0..3 {
            let (total, pause, steps) = self.fork_touched_vm(bytes + (64 << 20), pages, tsc)?;
            totals.push(total);
            pauses.push(pause);
            phases.push(steps);
        }
        Ok((median(totals), median(pauses), phases))
    }

    /// Starts a VM that touches `pages` pages, forks it once when it has,
    /// and returns the fork's total time, the guest's pause and the memory
    /// steps' times.
    fn fork_touched_vm(
        &mut self,
        mem_bytes: u64,
        pages: u64,
        tsc: f64,
    ) -> Result<(Duration, Duration, memory::ForkPhases), VmmError> {
        let mut vm = self.vm(mem_bytes, 4, pages, tsc)?;
        vm.start()?;
        wait_touched(&vm, |vm| vm.memory().context().stats().resident >= pages)?;
        if self.prepared {
            vm.prepare_fork()?;
        }
        // Nothing left behind by an earlier sample (an old KVM VM, a host
        // mapping) is torn down during this one.
        crate::retire::wait_idle();
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        let forked = vm.fork();
        let total = t.elapsed();
        let pause = vm.last_fork_pause();
        let steps = vm.memory().last_fork_phases();
        if let Ok(child) = &forked {
            child.stop(Exit::Code(0));
        }
        vm.stop(Exit::Code(0));
        let _ = vm.wait();
        if let Ok(child) = forked {
            let _ = child.wait();
        }
        Ok((total, pause, steps))
    }

    /// One copy-on-write fault next to one exit plus a 4 KiB copy
    /// (medians of several runs).
    fn cow_fault(&mut self, tsc: f64) -> Result<(), VmmError> {
        let n: u64 = if self.quick { 200 } else { 1_000 };
        let rounds = if self.quick { 1 } else { 5 };
        let (mut cows, mut exits, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let copy = copy_4k_cost();
        for _ in 0..rounds {
            let vm = self.vm(64 << 20, 2, n, tsc)?;
            let mem = vm.memory().clone();
            self.run_to_exit(vm, "COW")?;
            let (cow, exit) = (Self::mailbox(&mem, 2), Self::mailbox(&mem, 3));
            cows.push(cow);
            exits.push(exit);
            // Each run times its faults and its exits side by side.
            ratios.push(cow as f64 / (exit as f64 + copy * tsc));
        }
        let cow = median_u64(cows) as f64 / tsc;
        let exit = median_u64(exits) as f64 / tsc;
        ratios.sort_by(f64::total_cmp);
        let ratio = ratios[ratios.len() / 2];
        self.record(
            "exit round trip (port write the VMM ignores, median)",
            format!("{:.2} us", exit * 1e6),
            "baseline".into(),
        );
        self.record(
            "4 KiB copy",
            format!("{:.3} us", copy * 1e6),
            "baseline".into(),
        );
        self.record(
            "copy-on-write write fault, as the guest sees it (median)",
            format!("{:.2} us", cow * 1e6),
            goal(
                ratio <= 1.5,
                &format!("{ratio:.2}x exit + copy (median of per-run ratios), goal <= 1.5x"),
            ),
        );
        Ok(())
    }

    /// Pin and unpin of one exclusive page.
    fn pin_unpin(&mut self) -> Result<(), VmmError> {
        let ctx = memory::Context::new(memory::Config::default());
        let mem = VmMemory::new(&ctx, crate::vm::ram_layout(16 << 20)?)?;
        mem.write(0x10_0000, &[1])?;
        let n = if self.quick { 20_000 } else { 500_000 };
        let flags = PinFlags {
            write: true,
            longterm: false,
        };
        let t = Instant::now();
        for _ in 0..n {
            drop(mem.pin(0x10_0000, PAGE_SIZE, flags)?);
        }
        let fast = t.elapsed().as_secs_f64() / f64::from(n);
        let t = Instant::now();
        for _ in 0..n / 10 {
            drop(mem.pin_locked_for_bench(0x10_0000, PAGE_SIZE, flags)?);
        }
        let locked = t.elapsed().as_secs_f64() / f64::from(n / 10);
        self.record(
            "pin + unpin, one exclusive 4 KiB page, lockless path",
            format!("{:.0} ns", fast * 1e9),
            goal(fast * 1e9 <= 200.0, "goal <= 200 ns"),
        );
        self.record(
            "pin + unpin, locked path",
            format!("{:.0} ns", locked * 1e9),
            "reported".into(),
        );
        Ok(())
    }

    /// Forks per second of a 16 MiB VM that forks, writes a page, exits.
    fn fork_rate(&mut self, tsc: f64) -> Result<(), VmmError> {
        let n: u64 = if self.quick { 20 } else { 300 };
        let vm = self.vm(16 << 20, 3, n, tsc)?;
        let t = Instant::now();
        let outcome = vm.run()?;
        let per = t.elapsed().as_secs_f64() / n as f64;
        if outcome.exit != Exit::Code(0) {
            return Err(VmmError::Config(format!(
                "fork loop ended {:?}: {}",
                outcome.exit,
                self.console_text()
            )));
        }
        self.record(
            "forks per second, 16 MiB VM (fork, child writes a page, exits, wait)",
            format!("{:.0} /s", 1.0 / per),
            format!("{:.2} ms per cycle", per * 1e3),
        );
        Ok(())
    }
}

/// Runs vCPU 0 of the VM `vm` (not started) until the exit of the guest's
/// first instruction: it called out, or it touched a page not yet present
/// (a fault exit).
fn first_exit(vm: &mut Vm) -> Result<(), VmmError> {
    let mut fd = vm.take_idle().remove(0);
    loop {
        match fd.run() {
            Ok(VcpuExit::IoOut(..)) => return Ok(()),
            Err(e) if e.errno() == libc::EFAULT => return Ok(()),
            Ok(VcpuExit::IoIn(_, data)) => data.fill(0xff),
            Ok(other) => return Err(VmmError::Config(format!("first exit was {other:?}"))),
            Err(e) => return Err(VmmError::Config(format!("KVM_RUN: {e}"))),
        }
    }
}

/// Waits (up to two minutes) until `touched` says the started `vm` has
/// touched its memory; stops the VM if it does not.
fn wait_touched(vm: &Vm, touched: impl Fn(&Vm) -> bool) -> Result<(), VmmError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !touched(vm) {
        if Instant::now() > deadline {
            vm.stop(Exit::Error("touching memory took too long".into()));
            return Err(VmmError::Config(
                "the guest did not touch its memory in time".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn goal(met: bool, what: &str) -> String {
    format!("{} ({what})", if met { "MET" } else { "NOT MET" })
}

/// Time to copy 4 KiB between two warm buffers.
fn copy_4k_cost() -> f64 {
    let src = vec![1u8; 4096 * 64];
    let mut dst = vec![0u8; 4096 * 64];
    let n = 200_000;
    let t = Instant::now();
    for i in 0..n {
        let off = (i % 64) * 4096;
        dst[off..off + 4096].copy_from_slice(&src[off..off + 4096]);
        std::hint::black_box(&mut dst);
    }
    t.elapsed().as_secs_f64() / n as f64
}

/// Touched anonymous memory of this process, for the Linux fork baseline.
struct LinuxArea {
    ptr: *mut libc::c_void,
    len: usize,
}

impl LinuxArea {
    /// Like [`LinuxArea::new`], on transparent huge pages: 2 MiB aligned
    /// and advised, so that Linux backs it with 2 MiB pages where it can.
    fn new_huge(len: usize) -> Result<Self, VmmError> {
        let area = Self::aligned(len)?;
        // SAFETY: an advice on our own mapping; it changes how Linux backs
        // the pages, not their contents.
        if unsafe { libc::madvise(area.ptr, len, libc::MADV_HUGEPAGE) } != 0 {
            return Err(VmmError::Thread(std::io::Error::last_os_error()));
        }
        area.touch();
        Ok(area)
    }

    /// An untouched area of `len` bytes at a 2 MiB-aligned address.
    fn aligned(len: usize) -> Result<Self, VmmError> {
        const HUGE: usize = 2 << 20;
        let outer = Self::reserve(len + HUGE)?;
        let start = outer.ptr as usize;
        let head = start.next_multiple_of(HUGE) - start;
        let ptr = outer
            .ptr
            .cast::<u8>()
            .wrapping_add(head)
            .cast::<libc::c_void>();
        let tail = outer.len - head - len;
        std::mem::forget(outer);
        for (at, n) in [
            (start as *mut libc::c_void, head),
            (ptr.cast::<u8>().wrapping_add(len).cast(), tail),
        ] {
            if n > 0 {
                // SAFETY: the slack around the aligned part of the mapping
                // just made, which nothing refers to.
                unsafe { libc::munmap(at, n) };
            }
        }
        Ok(Self { ptr, len })
    }

    fn new(len: usize) -> Result<Self, VmmError> {
        let area = Self::reserve(len)?;
        area.touch();
        Ok(area)
    }

    fn reserve(len: usize) -> Result<Self, VmmError> {
        // SAFETY: a fresh private anonymous mapping at an address of the
        // kernel's choosing aliases nothing.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(VmmError::Thread(std::io::Error::last_os_error()));
        }
        Ok(Self { ptr, len })
    }

    /// Writes a byte of every page.
    fn touch(&self) {
        let base = self.ptr.cast::<u8>();
        for off in (0..self.len).step_by(PAGE_SIZE as usize) {
            let byte = base.wrapping_add(off);
            // SAFETY: `byte` is inside this mapping, which only this
            // benchmark uses.
            unsafe { byte.write_volatile(1) };
        }
    }

    /// Forks once; the child exits at once. Returns the time fork() took in
    /// the parent.
    fn fork_once(&self) -> Result<Duration, VmmError> {
        let t = Instant::now();
        // SAFETY: the child calls only the async-signal-safe `_exit`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: exiting the child without running any destructor.
            unsafe { libc::_exit(0) };
        }
        let took = t.elapsed();
        if pid < 0 {
            return Err(VmmError::Thread(std::io::Error::last_os_error()));
        }
        let mut status = 0;
        // SAFETY: waits for the child just created; `status` is ours.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        Ok(took)
    }
}

impl Drop for LinuxArea {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping `new` created; nothing refers to it.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Runs every benchmark and prints its figures.
pub fn run(opts: BenchOptions) -> Result<Vec<Figure>, VmmError> {
    let hv = Hypervisor::open()?;
    let mut b = Bench {
        hv,
        quick: opts.quick,
        figures: Vec::new(),
        console: None,
        huge: false,
        huge_cow: memory::HugeCow::default(),
        prepared: false,
    };
    if let Some(bad) = opts.only.iter().find(|g| !GROUPS.contains(&g.as_str())) {
        return Err(VmmError::Config(format!(
            "--only {bad}: the groups are {}",
            GROUPS.join(", ")
        )));
    }
    let on = |g: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == g);
    let tsc = tsc_rate();
    println!("{:<58} {:>14}   verdict", "figure", "value");
    if on("startup") {
        b.process_wall_time()?;
        b.first_instruction(tsc)?;
    }
    if on("hypercall") {
        b.hypercall_round_trip(tsc)?;
    }
    if on("cow") {
        b.cow_fault(tsc)?;
    }
    if on("pin") {
        b.pin_unpin()?;
    }
    if on("fork") {
        b.fork_rate(tsc)?;
        let sizes: &[u64] = if opts.quick {
            &[32 << 20]
        } else {
            &[256 << 20, 1 << 30]
        };
        for &bytes in sizes {
            b.fork_latency(bytes, tsc)?;
        }
    }
    if on("virtio") {
        b.virtio_blk(tsc)?;
        b.fork_with_requests_in_flight()?;
        b.virtio_net(tsc)?;
    }
    if on("swap") {
        b.swap(tsc)?;
    }
    if on("migration") {
        b.migration(tsc)?;
    }
    if on("snapshot") {
        let sizes: &[u64] = if opts.quick {
            &[64 << 20]
        } else {
            &[256 << 20, 1 << 30]
        };
        for &bytes in sizes {
            b.snapshots(bytes, tsc)?;
        }
    }
    if on("fuzz") {
        b.fuzz_resets(tsc)?;
        b.fuzz_end_to_end()?;
    }
    if on("restore") {
        b.restore(tsc)?;
    }
    if on("huge") {
        memory::huge_pages_available().map_err(VmmError::Config)?;
        let sizes: &[u64] = if opts.quick {
            &[64 << 20]
        } else {
            &[1 << 30, 4 << 30]
        };
        for &bytes in sizes {
            b.huge_fork(bytes, tsc)?;
        }
        b.huge_stream(if opts.quick { 64 << 20 } else { 1 << 30 }, tsc)?;
        b.huge_collapse(if opts.quick { 8 } else { 64 })?;
        b.huge_cow_policies(if opts.quick { 16 << 20 } else { 256 << 20 }, tsc)?;
    }
    Ok(b.figures)
}
