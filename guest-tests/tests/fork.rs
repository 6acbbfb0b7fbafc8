//! VM fork end to end: the FORK and WAIT hypercalls, fork with several
//! vCPUs, fork through the library while the guest runs, and a stress run
//! of 8 VMs forking and writing at once.

use std::time::{Duration, Instant};

use guest_tests::{MIB, guest, hypervisor, run_program};
use vmm::{Exit, Sink, Vm, VmConfig};

fn expect_ok(program: &str, vcpus: u32, marker: &str) -> String {
    let (outcome, console) = run_program(guest(program), 64 * MIB, vcpus);
    assert_eq!(outcome.exit, Exit::Code(0), "{program}: {console}");
    assert!(
        console.contains(marker),
        "{program}: no {marker} in: {console}"
    );
    console
}

#[test]
fn fork_and_wait_semantics() {
    let console = expect_ok("fork_wait", 1, "FORK-WAIT-OK");
    assert!(
        console.contains("[1] hello from the clone\n"),
        "clone output not prefixed with its id: {console}"
    );
}

#[test]
fn fork_copies_every_running_vcpu() {
    expect_ok("fork_vcpus", 2, "FORK-VCPUS-OK");
}

/// From its second fork on, a VM with 40 MiB written moves to a KVM VM
/// and host mapping made ahead (the first fork has them made). The guest
/// checks its memory, its second vCPU, its TSC and a device pin across
/// four forks, and each clone what it saw.
#[test]
fn forks_of_a_large_vm_move_it_and_it_runs_on() {
    let vm = guest_tests::Running::start(guest("fork_move"), 96 * MIB, 2);
    let memory = vm.memory.clone();
    let (outcome, console) = vm.finish();
    assert_eq!(outcome.exit, Exit::Code(0), "{console}");
    assert!(console.contains("FORK-MOVE-OK"), "{console}");
    // Every fork (the guest makes four) moves it. (Its host mapping's
    // address does not tell: the last move may land where the first
    // mapping was, once that is unmapped.)
    assert_eq!(memory.moves(), 4, "forks that moved the VM: {console}");
}

#[test]
fn eight_vms_fork_and_write_at_once_and_nothing_leaks() {
    let started = Instant::now();
    expect_ok("fork_stress", 1, "FORK-STRESS-OK");
    assert!(started.elapsed() < Duration::from_secs(60));
}

fn counter(mem: &memory::VmMemory) -> u64 {
    let mut b = [0u8; 8];
    mem.read(0x20_0000, &mut b).unwrap();
    u64::from_le_bytes(b)
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Starts `program` in a 32 MiB VM of `ctx`, its console captured.
fn start(ctx: &std::sync::Arc<memory::Context>, program: &str) -> Vm {
    let (sink, _) = Sink::capture();
    let mut vm = Vm::new(
        &hypervisor(),
        ctx,
        VmConfig {
            mem: 32 * MIB,
            sink,
            ..VmConfig::program(guest(program))
        },
    )
    .unwrap();
    vm.start().unwrap();
    vm
}

#[test]
fn library_fork_of_a_running_guest() {
    let ctx = memory::Context::new(memory::Config::default());
    let vm = start(&ctx, "spin_counter");
    let parent = vm.memory().clone();
    wait_until("the guest counts", || counter(&parent) > 10_000);
    // The clone's KVM VM and memory made ahead: the fork runs it there.
    vm.prepare_fork().expect("prepare a fork");
    let child = vm.fork().expect("fork");
    assert_ne!(child.id(), 0);
    let cmem = child.memory().clone();
    let at_fork = counter(&cmem);
    // Both run on from the fork, each in its own memory.
    wait_until("the clone counts", || counter(&cmem) > at_fork + 10_000);
    let p = counter(&parent);
    wait_until("the parent counts", || counter(&parent) > p + 10_000);
    parent.write(0x20_1000, &[0xaa]).unwrap();
    let mut b = [0u8];
    cmem.read(0x20_1000, &mut b).unwrap();
    assert_eq!(b[0], 0, "the parent's write reached the clone");
    assert!(vm.last_fork_pause() > Duration::ZERO);
    child.stop(Exit::Code(3));
    assert_eq!(child.wait().exit, Exit::Code(3));
    // Again, with whatever the first fork made ahead (or made now).
    let child = vm.fork().expect("second fork");
    let second = child.memory().clone();
    let at_fork = counter(&second);
    wait_until("the second clone counts", || {
        counter(&second) > at_fork + 10_000
    });
    child.stop(Exit::Code(4));
    assert_eq!(child.wait().exit, Exit::Code(4));
    drop(second);
    vm.stop(Exit::Code(0));
    let outcome = vm.wait();
    assert_eq!(outcome.exit, Exit::Code(0));
    drop((parent, cmem));
    let s = ctx.stats();
    assert_eq!(
        (s.resident, s.stores),
        (0, 0),
        "frames or stores left: {s:?}"
    );
}

/// On huge mappings, a fork copies for the clone only the pages the VMM
/// keeps pinned (its ring-0 stacks), not the 2 MiB block around them: that
/// block is kept on small pages (`VmMemory::keep_small`), while the rest
/// of RAM is mapped huge and shared.
#[test]
fn a_fork_on_huge_mappings_copies_only_the_pinned_pages() {
    let ctx = memory::Context::new(memory::Config {
        huge: true,
        ..memory::Config::default()
    });
    let vm = start(&ctx, "vcpu_idle");
    let before = ctx.stats();
    assert!(before.huge_maps >= 1, "nothing mapped huge: {before:?}");
    let child = vm.fork().expect("fork");
    let copied = ctx.stats().copied - before.copied;
    assert!(
        (1..64).contains(&copied),
        "the fork copied {copied} pages for the clone"
    );
    assert_eq!(child.wait().exit, Exit::Code(0));
    assert_eq!(vm.wait().exit, Exit::Code(0));
}
