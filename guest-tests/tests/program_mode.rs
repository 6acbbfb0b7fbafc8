//! Program mode through the library: guest programs from guests/ run in real
//! VMs (KVM), and the tests check what the guest ABI promises.

use guest_tests::elf::{self, CORRUPTIONS, Corruption};
use guest_tests::{MIB, assert_exit, guest, hypervisor, run_program, run_program_full};
use vmm::elf::ElfError;
use vmm::x86::program::GuestFault;
use vmm::{Exit, Vm, VmConfig, VmmError};

/// Exit code the test guests use when one of their own checks fails.
const GUEST_CHECK_FAILED: u64 = 99;

const LOW_RAM_MAX: u64 = 3 << 30;
const HIGH_RAM_BASE: u64 = 4 << 30;

// ---- console and exit codes ---------------------------------------------

#[test]
fn serial_and_write_output_reach_the_console_in_order() {
    let (outcome, console) = run_program(guest("serial_write"), 64 * MIB, 1);
    assert_exit(&outcome, &console, 0);
    assert_eq!(
        console, "1 serial\n2 write\n3 serial\n4 write, then serial on the same line\n",
        "console output, in program order"
    );
}

#[test]
fn exit_codes_come_back_exactly() {
    for code in [0, 1, 42, 255, 256, 0xdead_beef, u64::MAX] {
        let mut program = guest("exit_code");
        elf::set_u64(&mut program, "exit_value", code);
        let (outcome, console) = run_program(program, 64 * MIB, 1);
        assert_exit(&outcome, &console, code);
        assert_eq!(console, format!("exit_code: exiting with {code:#018x}\n"));
        assert_eq!(outcome.exit.status(), (code & 0xff) as i32, "{code:#x}");
    }
}

// ---- exceptions ------------------------------------------------------------

/// Runs a program that announces itself, then faults at its `fault_insn`.
fn expect_fault(name: &str, vector: u8, error: u64, cr2: u64) {
    let program = guest(name);
    let rip = elf::symbol(&program, "fault_insn");
    let (outcome, console) = run_program(program, 256 * MIB, 1);
    assert_eq!(
        outcome.exit,
        Exit::Fault(GuestFault {
            vector,
            rip,
            error,
            cr2
        }),
        "{name}: console:\n{console}"
    );
    assert!(
        console.starts_with(&format!("{name}: ")) && !console.contains("FAIL"),
        "{name}: the program should print its first line and nothing after the fault:\n{console}"
    );
    assert_eq!(outcome.exit.status(), 3);
}

#[test]
fn page_fault_on_a_write_far_outside_ram() {
    // Error code: not present, write, user.
    expect_fault("fault_pf_write", 14, 0b110, (1 << 40) + 0x123);
}

#[test]
fn page_fault_on_a_read_in_the_hole_below_4_gib() {
    // Error code: not present, read, user.
    expect_fault("fault_pf_read", 14, 0b100, 0xc000_0048);
}

#[test]
fn invalid_opcode() {
    expect_fault("fault_ud", 6, 0, 0);
}

#[test]
fn general_protection_from_a_privileged_instruction() {
    expect_fault("fault_gp", 13, 0, 0);
}

#[test]
fn divide_error() {
    expect_fault("fault_de", 0, 0, 0);
}

// ---- registers -------------------------------------------------------------

#[test]
fn hypercalls_preserve_every_register_but_rax() {
    let (outcome, console) = run_program(guest("hc_regs"), 64 * MIB, 1);
    assert_exit(&outcome, &console, 0);
    assert_eq!(
        console,
        "unknown: preserved\n\
         hc_regs: WRITE with every register set\n\
         WRITE: preserved\n\
         STATS: preserved\n\
         DISCARD: preserved\n\
         VCPU_START: preserved\n\
         WRITE outside RAM: preserved\n",
        "each call should leave every register but RAX as it was"
    );
}

/// `name=0x...` from the entry line.
fn field(console: &str, name: &str) -> u64 {
    let at = console
        .find(&format!("{name}=0x"))
        .unwrap_or_else(|| panic!("no {name}= in:\n{console}"))
        + name.len()
        + 3;
    u64::from_str_radix(&console[at..at + 16], 16).unwrap()
}

#[test]
fn entry_state_rdi_rsp_ring_3_and_sse() {
    // Ring-3 code runs natively on a PVM host: CS, SS and RFLAGS read there
    // are the host's user values, so only the privilege level is checked.
    for mem in [64 * MIB, 256 * MIB, 3584 * MIB] {
        let (outcome, console) = run_program(guest("entry_state"), mem, 1);
        assert_exit(&outcome, &console, 0);
        let low_end = mem.min(LOW_RAM_MAX);
        assert_eq!(field(&console, "rdi"), mem, "RDI = RAM size:\n{console}");
        let rsp = field(&console, "rsp");
        assert!(
            rsp % 16 == 0 && rsp <= low_end && rsp > low_end - 4096,
            "RSP {rsp:#x} should be 16-byte aligned at the top of low RAM ({low_end:#x})"
        );
        assert_eq!(field(&console, "cs") & 3, 3, "CPL 3 (CS.RPL)");
        assert_eq!(field(&console, "ss") & 3, 3, "SS.RPL 3");
        assert!(console.contains("\nsse: ok\n"), "SSE in ring 3:\n{console}");
    }
}

// ---- memory ----------------------------------------------------------------

/// The places guests/mem_layout.c checks and writes, as (address, value).
fn layout_writes(mem: u64) -> Vec<(u64, u64)> {
    let pattern = |a: u64| a ^ 0x5aa5_c33c_0000_0000;
    let low = mem.min(LOW_RAM_MAX);
    let end = if mem <= LOW_RAM_MAX {
        mem
    } else {
        HIGH_RAM_BASE + (mem - LOW_RAM_MAX)
    };
    let mut pages = vec![MIB, (low / 2) & !0xfff, low - 2 * MIB];
    if end > HIGH_RAM_BASE {
        pages.extend([
            HIGH_RAM_BASE,
            HIGH_RAM_BASE + (((end - HIGH_RAM_BASE) / 2) & !0xfff),
            end - 4096,
        ]);
    }
    let mut words: Vec<u64> = pages.iter().flat_map(|p| [*p, p + 4088]).collect();
    words.push(low - 8);
    words.into_iter().map(|a| (a, pattern(a))).collect()
}

fn check_layout(mem: u64) {
    let run = run_program_full(guest("mem_layout"), mem, 1);
    assert_exit(&run.outcome, &run.console, 0);
    for (addr, want) in layout_writes(mem) {
        let mut b = [0u8; 8];
        run.memory
            .read(addr, &mut b)
            .unwrap_or_else(|e| panic!("host read at {addr:#x}: {e}"));
        assert_eq!(
            u64::from_le_bytes(b),
            want,
            "the guest's write at {addr:#x} (mem {mem:#x}) did not land; console:\n{}",
            run.console
        );
    }
    // A page next to a written one that the guest never touched.
    let mut b = [0xffu8; 64];
    run.memory.read(MIB + 64 * 4096, &mut b).unwrap();
    assert_eq!(b, [0u8; 64], "untouched RAM reads zero from the host");
}

#[test]
fn ram_reads_zero_until_written_and_writes_land() {
    check_layout(256 * MIB);
}

#[test]
fn ram_above_4_gib_reads_zero_until_written_and_writes_land() {
    check_layout(3584 * MIB);
}

#[test]
fn discard_frees_frames_and_pages_read_zero() {
    let (outcome, console) = run_program(guest("discard"), 64 * MIB, 1);
    assert_exit(&outcome, &console, 0);
    assert!(console.starts_with("discard: resident "), "{console}");
}

#[test]
fn stats_counts_follow_the_cap_and_refuse_buffers_outside_ram() {
    let (outcome, console) = run_program(guest("stats"), 64 * MIB, 1);
    assert_exit(&outcome, &console, 0);
    let counters = outcome.stats.to_abi().len();
    assert_eq!(
        console,
        format!("stats: {counters} counters\n"),
        "a full STATS call returns every counter the VMM has"
    );
}

// ---- hostile hypercalls -------------------------------------------------------

#[test]
fn hostile_hypercalls_get_errors_and_the_vm_goes_on() {
    let (outcome, console) = run_program(guest("hostile"), 64 * MIB, 1);
    assert_exit(&outcome, &console, 0);
    assert_eq!(
        console, "hostile: survived\n",
        "refused WRITEs must print nothing"
    );
}

// ---- vCPUs -----------------------------------------------------------------------

#[test]
fn vcpu_start_runs_vcpu_1_once_and_they_share_memory() {
    let (outcome, console) = run_program(guest("vcpu_start"), 64 * MIB, 2);
    assert_exit(&outcome, &console, 0);
    assert_eq!(
        console,
        "vcpu_start: vCPU 1 ran with rdi 0x0000000000000001 and answered\n"
    );
}

#[test]
fn vcpu_start_without_a_second_vcpu_is_refused() {
    let (outcome, console) = run_program(guest("vcpu_start"), 64 * MIB, 1);
    assert_exit(&outcome, &console, GUEST_CHECK_FAILED);
    assert!(
        console.contains("FAIL: VCPU_START 1: got 0xffffffffffffffea, want 0x0000000000000000"),
        "VCPU_START 1 with one vCPU should be -EINVAL:\n{console}"
    );
}

#[test]
fn extra_vcpus_never_run_without_vcpu_start() {
    let (outcome, console) = run_program(guest("vcpu_idle"), 64 * MIB, 3);
    assert_exit(&outcome, &console, 0);
    assert_eq!(console, "vcpu_idle: only vCPU 0 ran\n");
}

// ---- refused before the VM runs -------------------------------------------------

fn new_vm(program: Vec<u8>, mem: u64, vcpus: u32) -> Result<Vm, VmmError> {
    let hv = hypervisor();
    let ctx = memory::Context::new(memory::Config::default());
    let (sink, _) = vmm::Sink::capture();
    Vm::new(
        &hv,
        &ctx,
        VmConfig {
            mem,
            vcpus,
            sink,
            ..VmConfig::program(program)
        },
    )
}

#[test]
fn bad_programs_are_refused_with_the_reason() {
    let good = guest("exit_code");
    let first = elf::loads(&good)[0];
    for c in CORRUPTIONS {
        let err = match new_vm(elf::corrupt(&good, c), 256 * MIB, 1) {
            Ok(_) => panic!("{c:?}: the VM was created"),
            Err(VmmError::Elf(e)) => e,
            Err(e) => panic!("{c:?}: {}", vmm::error_chain(&e)),
        };
        let ok = match c {
            Corruption::TruncatedHeader => matches!(
                err,
                ElfError::Truncated {
                    what: "the ELF header",
                    ..
                }
            ),
            Corruption::TruncatedSegment => matches!(
                err,
                ElfError::Truncated {
                    what: "a segment's file data",
                    ..
                }
            ),
            Corruption::Machine => err == ElfError::Machine(40),
            Corruption::Class32 => err == ElfError::Class,
            Corruption::Pie => err == ElfError::Pie,
            Corruption::OutsideRam => {
                matches!(err, ElfError::OutsideRam { paddr, .. } if paddr == 2 << 30)
            }
            Corruption::BelowOneMib => {
                matches!(
                    err,
                    ElfError::BelowLowEnd {
                        paddr: 0x8_0000,
                        ..
                    }
                )
            }
            Corruption::Overlap => matches!(err, ElfError::Overlap { .. }),
            Corruption::EntryOutside => err == ElfError::Entry(0x100),
            Corruption::Empty => err == ElfError::Magic,
        };
        assert!(ok, "{c:?}: wrong error {err:?}");
    }
    // The unbroken program is accepted, with its segments where the file says.
    let vm = new_vm(good, 256 * MIB, 1).expect("the good program");
    let mut b = [0u8; 4];
    vm.memory().read(first.paddr, &mut b).unwrap();
    assert_eq!(&b, b"\x7fELF", "first segment loaded at its address");
}

#[test]
fn bad_configurations_are_refused() {
    for (mem, vcpus) in [
        (0, 1),
        (3 * MIB, 1),
        (2 << 40, 1),
        (64 * MIB, 0),
        (64 * MIB, 100_000),
    ] {
        match new_vm(guest("exit_code"), mem, vcpus) {
            Err(VmmError::Config(msg)) => assert!(!msg.is_empty()),
            Err(e) => panic!("mem {mem:#x}, vcpus {vcpus}: {}", vmm::error_chain(&e)),
            Ok(_) => panic!("mem {mem:#x}, vcpus {vcpus}: accepted"),
        }
    }
}
