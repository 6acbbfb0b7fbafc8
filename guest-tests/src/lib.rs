//! Guest programs used by the tests, and helpers to run them.
//!
//! `build.rs` compiles every `guests/*.c` and `guests/*.S` into a static
//! ELF program; [`guest`] returns one by name. [`run_program`] runs a program
//! in a VM through the `vmm` library with a capturing console and a time
//! limit; [`run_vmm`] runs the `vmm` binary (whose path only its own crate's
//! tests know, as `env!("CARGO_BIN_EXE_vmm")`) with a time limit.
//!
//! Every helper panics with a clear message when something outside the
//! guest fails (no /dev/kvm, a missing program, a VM that cannot be
//! created): tests that need KVM fail, they never skip.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use memory::VmMemory;
use vmm::{Exit, Hypervisor, Outcome, Sink, StopHandle, Vm, VmConfig};

/// Where build.rs put the programs.
const GUEST_DIR: &str = concat!(env!("OUT_DIR"), "/guests");

/// How long a guest or a `vmm` process may run before its test fails.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// One MiB.
pub const MIB: u64 = 1 << 20;

/// The path of the built program `name` (`guests/<name>.c` or `.S`).
pub fn guest_path(name: &str) -> PathBuf {
    let path = Path::new(GUEST_DIR).join(format!("{name}.elf"));
    if !path.is_file() {
        let mut known: Vec<String> = std::fs::read_dir(GUEST_DIR)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        known.sort();
        panic!("no guest program {name} in {GUEST_DIR}; built: {known:?}");
    }
    path
}

/// The bytes of the built program `name`.
pub fn guest(name: &str) -> Vec<u8> {
    let path = guest_path(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The VMM's log in a test's output: its warnings and errors, and its
/// notes on forks (why a fork left the VM where it was). The test harness
/// shows what a test's threads print only when the test fails.
struct TestLog;

impl log::Log for TestLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn || m.target() == "vmm::fork"
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("[{} {}] {}", r.level(), r.target(), r.args());
        }
    }

    fn flush(&self) {}
}

/// Opens /dev/kvm, or fails the test saying why. Also sends the VMM's log
/// to the test's output (see [`TestLog`]).
pub fn hypervisor() -> Hypervisor {
    static LOG: std::sync::Once = std::sync::Once::new();
    LOG.call_once(|| {
        if log::set_logger(&TestLog).is_ok() {
            log::set_max_level(log::LevelFilter::Debug);
        }
    });
    Hypervisor::open().unwrap_or_else(|e| {
        panic!(
            "these tests run real VMs and need /dev/kvm: {}",
            vmm::error_chain(&e)
        )
    })
}

/// A finished VM.
#[derive(Debug)]
pub struct Run {
    /// How it ended.
    pub outcome: Outcome,
    /// Everything its console printed.
    pub console: String,
    /// Its memory, to inspect after the run.
    pub memory: Arc<VmMemory>,
}

/// Runs `program` with `mem` bytes of RAM and `vcpus` vCPUs through the
/// library; returns how it ended and its console output.
pub fn run_program(program: Vec<u8>, mem: u64, vcpus: u32) -> (Outcome, String) {
    let run = run_program_full(program, mem, vcpus);
    (run.outcome, run.console)
}

/// Like [`run_program`], and keeps the VM's memory for inspection.
///
/// The VM must end within [`TIMEOUT`], or it is stopped and the test
/// fails.
pub fn run_program_full(program: Vec<u8>, mem: u64, vcpus: u32) -> Run {
    let vm = Running::start(program, mem, vcpus);
    let memory = vm.memory.clone();
    let (outcome, console) = vm.finish();
    Run {
        outcome,
        console,
        memory,
    }
}

/// How to run a test program.
#[derive(Clone, Debug)]
pub struct Options {
    /// Guest RAM in bytes.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// `--mem-limit`: most RAM kept resident, in bytes.
    pub mem_limit: Option<u64>,
    /// Virtio devices, in slot order.
    pub devices: Vec<vmm::virtio::DeviceConfig>,
    /// `--huge`: 2 MiB mappings.
    pub huge: bool,
}

impl Options {
    /// `mem` bytes of RAM, `vcpus` vCPUs, no limit.
    pub fn new(mem: u64, vcpus: u32) -> Self {
        Self {
            mem,
            vcpus,
            mem_limit: None,
            devices: Vec::new(),
            huge: false,
        }
    }
}

/// Like [`run_program`], with every option.
pub fn run_program_opts(program: Vec<u8>, opts: &Options) -> (Outcome, String) {
    Running::start_opts(program, opts).finish()
}

/// A program running in a VM that the test drives from the host (reading
/// and writing its memory) while it runs.
pub struct Running {
    /// The VM's memory.
    pub memory: Arc<VmMemory>,
    /// The VM's virtio devices, by slot.
    pub devices: Vec<devices::virtio::mmio::Shared>,
    console: Arc<std::sync::Mutex<Vec<u8>>>,
    stop: StopHandle,
    ended: mpsc::Receiver<Outcome>,
}

impl Running {
    /// Starts `program` with `mem` bytes of RAM and `vcpus` vCPUs.
    pub fn start(program: Vec<u8>, mem: u64, vcpus: u32) -> Self {
        Self::start_opts(program, &Options::new(mem, vcpus))
    }

    /// Like [`Running::start`], with virtio devices in slot order.
    pub fn start_with(
        program: Vec<u8>,
        mem: u64,
        vcpus: u32,
        devices: Vec<vmm::virtio::DeviceConfig>,
    ) -> Self {
        let opts = Options {
            devices,
            ..Options::new(mem, vcpus)
        };
        Self::start_opts(program, &opts)
    }

    /// Starts `program` as `opts` say.
    pub fn start_opts(program: Vec<u8>, opts: &Options) -> Self {
        let hv = hypervisor();
        if opts.huge {
            memory::huge_pages_available()
                .unwrap_or_else(|e| panic!("huge mappings unavailable: {e}"));
        }
        let ctx = memory::Context::new(memory::Config {
            huge: opts.huge,
            ..memory::Config::default()
        });
        let (sink, console) = Sink::capture();
        let cfg = VmConfig {
            mem: opts.mem,
            vcpus: opts.vcpus,
            sink,
            mem_limit: opts.mem_limit,
            devices: opts.devices.clone(),
            ..VmConfig::program(program)
        };
        let mut vm = Vm::new(&hv, &ctx, cfg)
            .unwrap_or_else(|e| panic!("cannot create the VM: {}", vmm::error_chain(&e)));
        let memory = vm.memory().clone();
        let devices = (0..vm.virtio().len())
            .filter_map(|i| vm.virtio().transport(i).cloned())
            .collect();
        vm.start()
            .unwrap_or_else(|e| panic!("cannot start the VM: {}", vmm::error_chain(&e)));
        let stop = vm.stop_handle();
        let (tx, ended) = mpsc::channel();
        std::thread::Builder::new()
            .name("vm-wait".into())
            .spawn(move || {
                // The receiver is gone only if the test already failed.
                let _ = tx.send(vm.wait());
            })
            .expect("cannot spawn a thread");
        Self {
            memory,
            devices,
            console,
            stop,
            ended,
        }
    }

    /// The handle that stops the VM (or snapshots it) from the test.
    pub fn handle(&self) -> &StopHandle {
        &self.stop
    }

    /// What the console printed so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.console.lock().unwrap_or_else(|e| e.into_inner()))
            .into_owned()
    }

    /// The u64 at guest-physical `gpa`.
    pub fn read_u64(&self, gpa: u64) -> u64 {
        let mut b = [0u8; 8];
        self.memory
            .read(gpa, &mut b)
            .unwrap_or_else(|e| panic!("cannot read {gpa:#x}: {}", vmm::error_chain(&e)));
        u64::from_le_bytes(b)
    }

    /// Writes the u64 at guest-physical `gpa` (a write fault, as the
    /// guest's would be).
    pub fn write_u64(&self, gpa: u64, value: u64) {
        self.memory
            .write(gpa, &value.to_le_bytes())
            .unwrap_or_else(|e| panic!("cannot write {gpa:#x}: {}", vmm::error_chain(&e)));
    }

    /// Waits until `cond` holds, failing the test after [`TIMEOUT`].
    pub fn wait_until(&self, what: &str, mut cond: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !cond(self) {
            if Instant::now() > deadline {
                self.stop
                    .stop(Exit::Error("the test's time limit passed".into()));
                panic!(
                    "timed out waiting until {what}; console:\n{}",
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for the VM to end; it is stopped and the test fails if that
    /// takes longer than [`TIMEOUT`].
    pub fn finish(self) -> (Outcome, String) {
        match self.ended.recv_timeout(TIMEOUT) {
            Ok(outcome) => (outcome, self.console()),
            Err(_) => {
                self.stop
                    .stop(Exit::Error("the test's time limit passed".into()));
                panic!(
                    "the guest did not end within {TIMEOUT:?}; console so far:\n{}",
                    self.console()
                )
            }
        }
    }
}

/// Asserts that a run ended with EXIT `code`, showing the console if not.
#[track_caller]
pub fn assert_exit(outcome: &Outcome, console: &str, code: u64) {
    assert_eq!(
        outcome.exit,
        Exit::Code(code),
        "the guest should exit with {code}; console:\n{console}"
    );
}

/// What a `vmm` process did.
#[derive(Debug)]
pub struct VmmOutput {
    /// Its exit status (None if a signal ended it).
    pub status: Option<i32>,
    /// Its standard output (the guest's console).
    pub stdout: String,
    /// Its standard error (VMM messages).
    pub stderr: String,
}

impl std::fmt::Display for VmmOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs the `vmm` binary at `bin` with `args`; kills it and fails the test
/// if it runs longer than [`TIMEOUT`].
pub fn run_vmm(bin: &Path, args: &[&str]) -> VmmOutput {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`vmm {}` did not end within {TIMEOUT:?}; stdout:\n{}\nstderr:\n{}",
                    args.join(" "),
                    out.join().unwrap_or_default(),
                    err.join().unwrap_or_default()
                );
            }
            Err(e) => panic!("cannot wait for vmm: {e}"),
        }
    };
    VmmOutput {
        status: status.code(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// Reading and patching ELF64 files (built guests) for tests.
pub mod fuzzing;

pub mod elf {
    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// Writes `v` little-endian at byte `at`.
    pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Writes `v` little-endian at byte `at`.
    pub fn put_u16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Offset of the ELF header's e_type.
    pub const E_TYPE: usize = 16;
    /// Offset of e_machine.
    pub const E_MACHINE: usize = 18;
    /// Offset of e_entry.
    pub const E_ENTRY: usize = 24;
    /// Offset of e_ident[EI_CLASS].
    pub const EI_CLASS: usize = 4;
    /// Offset of p_paddr in a program header.
    pub const P_PADDR: usize = 24;
    /// Offset of p_vaddr in a program header.
    pub const P_VADDR: usize = 16;

    /// One PT_LOAD program header.
    #[derive(Clone, Copy, Debug)]
    pub struct Load {
        /// Where the header itself is in the file.
        pub header: usize,
        /// p_offset.
        pub offset: u64,
        /// p_vaddr.
        pub vaddr: u64,
        /// p_paddr.
        pub paddr: u64,
        /// p_filesz.
        pub filesz: u64,
        /// p_memsz.
        pub memsz: u64,
    }

    /// The PT_LOAD headers with a non-zero memory size, in file order.
    pub fn loads(b: &[u8]) -> Vec<Load> {
        let phoff = u64_at(b, 32) as usize;
        let phentsize = usize::from(u16_at(b, 54));
        let phnum = usize::from(u16_at(b, 56));
        (0..phnum)
            .map(|i| phoff + i * phentsize)
            .filter(|&h| u32_at(b, h) == 1)
            .map(|h| Load {
                header: h,
                offset: u64_at(b, h + 8),
                vaddr: u64_at(b, h + 16),
                paddr: u64_at(b, h + 24),
                filesz: u64_at(b, h + 32),
                memsz: u64_at(b, h + 40),
            })
            .filter(|l| l.memsz > 0)
            .collect()
    }

    /// The value of symbol `name` from the symbol table; panics if absent.
    pub fn symbol(b: &[u8], name: &str) -> u64 {
        let shoff = u64_at(b, 40) as usize;
        let shentsize = usize::from(u16_at(b, 58));
        let shnum = usize::from(u16_at(b, 60));
        for i in 0..shnum {
            let sh = shoff + i * shentsize;
            if u32_at(b, sh + 4) != 2 {
                continue; // not SHT_SYMTAB
            }
            let off = u64_at(b, sh + 24) as usize;
            let size = u64_at(b, sh + 32) as usize;
            let entsize = u64_at(b, sh + 56) as usize;
            let strtab = shoff + u32_at(b, sh + 40) as usize * shentsize;
            let str_off = u64_at(b, strtab + 24) as usize;
            for s in (off..off + size).step_by(entsize) {
                let at = str_off + u32_at(b, s) as usize;
                let end = at + b[at..].iter().position(|c| *c == 0).unwrap_or(0);
                if &b[at..end] == name.as_bytes() {
                    return u64_at(b, s + 8);
                }
            }
        }
        panic!("the program has no symbol {name}");
    }

    /// Ways to break a good program file.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Corruption {
        /// Cut inside the ELF header.
        TruncatedHeader,
        /// Cut inside the last segment's file data.
        TruncatedSegment,
        /// e_machine = 40 (ARM).
        Machine,
        /// e_ident[EI_CLASS] = 1 (32-bit).
        Class32,
        /// e_type = ET_DYN (a PIE).
        Pie,
        /// The first segment moved to 2 GiB (outside 256 MiB of RAM).
        OutsideRam,
        /// The first segment moved to 512 KiB.
        BelowOneMib,
        /// The last segment moved onto the first.
        Overlap,
        /// e_entry = 0x100, in no segment.
        EntryOutside,
        /// No bytes at all.
        Empty,
    }

    /// Every corruption.
    pub const CORRUPTIONS: [Corruption; 10] = [
        Corruption::TruncatedHeader,
        Corruption::TruncatedSegment,
        Corruption::Machine,
        Corruption::Class32,
        Corruption::Pie,
        Corruption::OutsideRam,
        Corruption::BelowOneMib,
        Corruption::Overlap,
        Corruption::EntryOutside,
        Corruption::Empty,
    ];

    /// `good` broken in the way `c` says.
    pub fn corrupt(good: &[u8], c: Corruption) -> Vec<u8> {
        let mut b = good.to_vec();
        let loads = loads(&b);
        assert!(loads.len() >= 2, "the program needs two segments");
        let (first, last) = (loads[0], loads[loads.len() - 1]);
        match c {
            Corruption::TruncatedHeader => b.truncate(40),
            Corruption::TruncatedSegment => {
                b.truncate((last.offset + last.filesz / 2) as usize);
            }
            Corruption::Machine => put_u16(&mut b, E_MACHINE, 40),
            Corruption::Class32 => b[EI_CLASS] = 1,
            Corruption::Pie => put_u16(&mut b, E_TYPE, 3),
            Corruption::OutsideRam => put_u64(&mut b, first.header + P_PADDR, 2 << 30),
            Corruption::BelowOneMib => put_u64(&mut b, first.header + P_PADDR, 0x8_0000),
            Corruption::Overlap => put_u64(&mut b, last.header + P_PADDR, first.paddr),
            Corruption::EntryOutside => put_u64(&mut b, E_ENTRY, 0x100),
            Corruption::Empty => b.clear(),
        }
        b
    }

    /// Sets the initialised u64 variable `name` in the file to `value`.
    pub fn set_u64(b: &mut [u8], name: &str, value: u64) {
        let addr = symbol(b, name);
        let load = loads(b)
            .into_iter()
            .find(|l| addr >= l.vaddr && addr + 8 <= l.vaddr + l.filesz)
            .unwrap_or_else(|| panic!("{name} is not in the file part of a segment"));
        put_u64(b, (load.offset + addr - load.vaddr) as usize, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_is_a_static_x86_64_executable() {
        let mut n = 0;
        for e in std::fs::read_dir(GUEST_DIR).unwrap() {
            let b = std::fs::read(e.unwrap().path()).unwrap();
            assert_eq!(&b[..4], b"\x7fELF");
            assert_eq!(b[elf::EI_CLASS], 2, "64-bit");
            assert_eq!(u16::from_le_bytes([b[16], b[17]]), 2, "ET_EXEC");
            assert_eq!(u16::from_le_bytes([b[18], b[19]]), 62, "x86-64");
            assert!(elf::loads(&b).iter().all(|l| l.paddr >= MIB));
            n += 1;
        }
        assert!(n >= 10, "only {n} guests built");
    }

    #[test]
    fn patching_a_variable_changes_the_file() {
        let mut b = guest("exit_code");
        let before = b.clone();
        elf::set_u64(&mut b, "exit_value", 0x1234_5678);
        let changed: Vec<usize> = (0..b.len()).filter(|&i| b[i] != before[i]).collect();
        assert!(!changed.is_empty() && changed.len() <= 8, "{changed:?}");
    }
}

/// A scratch file in the temporary directory, removed when dropped.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A file named after `name` and this process, holding `bytes`.
    pub fn new(name: &str, bytes: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("vmm-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        Self(path)
    }

    /// The file's contents now.
    pub fn read(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
