//! Linux boot: Debian's kernel, as `scripts/fetch-kernel` caches it under
//! `target/kernel/`, boots in a real VM far enough to print its first
//! console lines through the VM's serial port; bad kernels, command lines
//! and initrds are refused before any vCPU runs.
//!
//! Ring-0 guest code is emulated on hosts like this one, so a whole boot
//! takes far too long for a test: the boot tests stop the VM once the
//! lines they look for appear.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::linux::LinuxBoot;
use vmm::{Boot, Exit, Hypervisor, Sink, Vm, VmConfig};

/// How long a boot test waits for its console lines.
const BOUND: Duration = Duration::from_secs(240);

/// Reads a kernel file cached by scripts/fetch-kernel.
fn kernel_file(name: &str) -> Vec<u8> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds this crate");
    let path = root.join("target/kernel").join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}): run scripts/fetch-kernel first (scripts/setup runs it)",
            path.display()
        )
    })
}

fn config(
    kernel: Vec<u8>,
    initrd: Option<Vec<u8>>,
    cmdline: &str,
    mem: u64,
) -> (VmConfig, Arc<Mutex<Vec<u8>>>) {
    let (sink, console) = Sink::capture();
    let cfg = VmConfig {
        mem,
        vcpus: 1,
        boot: Boot::Linux(LinuxBoot {
            kernel,
            initrd,
            cmdline: cmdline.into(),
        }),
        sink,
        memory: memory::Config::default(),
        mem_limit: None,
        devices: Vec::new(),
        input: None,
    };
    (cfg, console)
}

fn create(cfg: VmConfig) -> Result<Vm, String> {
    let hv = Hypervisor::open().expect("/dev/kvm");
    let ctx = memory::Context::new(memory::Config::default());
    Vm::new(&hv, &ctx, cfg).map_err(|e| vmm::error_chain(&e))
}

/// Boots `cfg` until the console shows every one of `want` and `also`
/// holds, or [`BOUND`] passes; stops the VM and returns the console and
/// how long it took.
fn boot_until(
    cfg: VmConfig,
    console: &Arc<Mutex<Vec<u8>>>,
    want: &[&str],
    also: impl Fn(&Vm) -> bool,
) -> (String, Duration) {
    let mut vm = create(cfg).expect("the VM is created");
    let start = Instant::now();
    vm.start().expect("the vCPUs start");
    let text = || String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    let seen = loop {
        let t = text();
        if want.iter().all(|w| t.contains(w)) && also(&vm) {
            break true;
        }
        if start.elapsed() > BOUND {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = start.elapsed();
    vm.stop(Exit::Reset);
    let outcome = vm.wait();
    let t = text();
    assert!(
        seen,
        "after {took:?} the console lacks one of {want:?} or the guest's memory is not as \
         expected; the VM ended with {:?}; console:\n{t}",
        outcome.exit
    );
    assert_eq!(
        outcome.exit,
        Exit::Reset,
        "the VM ended on its own before the test stopped it; console:\n{t}"
    );
    eprintln!("seen after {took:?}");
    (t, took)
}

#[test]
fn vmlinux_boots_through_pvh_to_its_first_console_lines() {
    let (cfg, console) = config(
        kernel_file("vmlinux"),
        None,
        vmm::linux::DEFAULT_CMDLINE,
        256 << 20,
    );
    let (text, _) = boot_until(
        cfg,
        &console,
        &[
            "Linux version",
            &format!("Command line: {}", vmm::linux::DEFAULT_CMDLINE),
            "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
        ],
        |_| true,
    );
    // The e820 map the kernel received: the boot area and legacy region
    // reserved, the rest of the 256 MiB usable.
    assert!(
        text.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000007ffff] usable")
            && text.contains("BIOS-e820: [mem 0x0000000000080000-0x00000000000fffff] reserved"),
        "{text}"
    );
}

#[test]
fn vmlinux_finds_its_initrd_and_every_vcpu() {
    let (mut cfg, console) = config(
        kernel_file("vmlinux"),
        Some(vec![0x5a; 3 << 20]),
        vmm::linux::DEFAULT_CMDLINE,
        256 << 20,
    );
    cfg.vcpus = 2;
    boot_until(
        cfg,
        &console,
        &[
            // Page aligned, as high in low RAM as it goes.
            "RAMDISK: [mem 0x0fd00000-0x0fffffff]",
            // The MP table lists both vCPUs.
            "Processors: 2",
        ],
        |_| true,
    );
}

#[test]
fn bzimage_runs_its_decompressor() {
    // Debian's decompressor is built without progress messages; with
    // `nokaslr` it prints one line through COM1 (which `earlyprintk`
    // names) and decompresses to 16 MiB. Decompressing the whole kernel
    // takes far longer than this test may, where ring 0 is emulated, so it
    // checks that the decompressor runs: the line appears and the first
    // page of its output is written.
    let (cfg, console) = config(
        kernel_file("vmlinuz"),
        None,
        "console=ttyS0 earlyprintk=ttyS0 nokaslr reboot=k panic=1",
        256 << 20,
    );
    boot_until(
        cfg,
        &console,
        &["KASLR disabled: 'nokaslr' on cmdline."],
        |vm| !vm.memory().would_fault(16 << 20, memory::Access::Read),
    );
}

/// A minimal ELF "kernel" without a PVH note: at its 64-bit entry (2 MiB)
/// it prints `ok` on COM1 and resets the machine through the i8042.
fn reset_kernel() -> Vec<u8> {
    const LOAD: u64 = 0x20_0000;
    let code: &[u8] = &[
        0x66, 0xba, 0xf8, 0x03, // mov $0x3f8, %dx
        0xb0, b'o', 0xee, // mov $'o', %al; out %al, (%dx)
        0xb0, b'k', 0xee, // mov $'k', %al; out %al, (%dx)
        0xb0, 0xfe, 0xe6, 0x64, // mov $0xfe, %al; out %al, $0x64
        0xf4, 0xeb, 0xfd, // hlt; jmp .-1
    ];
    let mut elf = vec![0u8; 0x78];
    elf[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&LOAD.to_le_bytes()); // e_entry
    elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = &mut elf[64..120];
    ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&0x78u64.to_le_bytes()); // p_offset
    ph[16..24].copy_from_slice(&LOAD.to_le_bytes()); // p_vaddr
    ph[24..32].copy_from_slice(&LOAD.to_le_bytes()); // p_paddr
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(code);
    elf
}

#[test]
fn an_i8042_reset_ends_the_vm_with_reset() {
    let (cfg, console) = config(reset_kernel(), None, "console=ttyS0", 64 << 20);
    let outcome = create(cfg)
        .expect("the VM is created")
        .run()
        .expect("it runs");
    assert_eq!(outcome.exit, Exit::Reset);
    assert_eq!(outcome.exit.status(), 0);
    assert_eq!(String::from_utf8_lossy(&console.lock().unwrap()), "ok");
}

#[test]
fn malformed_kernels_are_refused() {
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("empty", Vec::new(), "neither a bzImage nor an ELF vmlinux"),
        (
            "text",
            b"hello, world".repeat(100),
            "neither a bzImage nor an ELF vmlinux",
        ),
        (
            "truncated ELF",
            b"\x7fELF\x02\x01\x01".to_vec(),
            "invalid ELF kernel",
        ),
        (
            "bzImage without a 64-bit entry",
            old_bzimage(),
            "64-bit entry",
        ),
    ];
    for (what, bytes, expect) in cases {
        let (cfg, _) = config(bytes, None, "console=ttyS0", 64 << 20);
        let e = create(cfg).expect_err(what);
        assert!(e.contains(expect), "{what}: {e}");
    }
}

/// A bzImage header of boot protocol 2.12 without XLF_KERNEL_64.
fn old_bzimage() -> Vec<u8> {
    let mut b = vec![0u8; 0x4000];
    b[0x1f1] = 3; // setup_sects
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes());
    b[0x211] = 1; // LOADED_HIGH
    b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    b
}

#[test]
fn bad_command_lines_and_initrds_are_refused() {
    let vmlinux = kernel_file("vmlinux");
    let (cfg, _) = config(vmlinux.clone(), None, &"x".repeat(5000), 256 << 20);
    let e = create(cfg).expect_err("a 5000-byte command line");
    assert!(
        e.contains("command line") && e.contains("at most 2047"),
        "{e}"
    );

    let (cfg, _) = config(vmlinux.clone(), None, "console=ttyS0\n", 256 << 20);
    let e = create(cfg).expect_err("a newline in the command line");
    assert!(e.contains("command line"), "{e}");

    let (cfg, _) = config(
        vmlinux,
        Some(vec![0u8; 200 << 20]),
        "console=ttyS0",
        256 << 20,
    );
    let e = create(cfg).expect_err("an initrd larger than free RAM");
    assert!(e.contains("initrd") && e.contains("--mem"), "{e}");
}
