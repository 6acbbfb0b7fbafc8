//! Faults under a running guest: the host write-protects a page again and
//! again while the guest writes it; each store must land exactly once,
//! whether the fault arrives as `EFAULT` (native stores: decoded and
//! retried) or as an MMIO exit (stores KVM emulates: completed by the VMM).

use std::time::Duration;

use guest_tests::{Running, guest};
use vmm::{Exit, Outcome};

const MAILBOX: u64 = 0x20_0000;
const TARGET: u64 = 0x22_0000;

/// Runs `program`, write-protecting `TARGET` 400 times while the guest
/// writes it, then tells the guest to finish and check its counts; returns
/// the outcome, console and how many protections took effect (each forces
/// one more fault).
fn hammer(program: &str) -> (Outcome, String, u64) {
    let vm = Running::start(guest(program), 64 << 20, 1);
    vm.wait_until("the guest started", |vm| vm.read_u64(MAILBOX) != 0);
    let mut effective = 0;
    for _ in 0..400 {
        effective += vm
            .memory
            .write_protect(TARGET, 4096)
            .expect("write_protect");
        std::thread::sleep(Duration::from_micros(300));
    }
    // Tell the guest to finish; this write takes a fault like the guest's.
    vm.write_u64(MAILBOX + 16, 1);
    let (outcome, console) = vm.finish();
    (outcome, console, effective)
}

#[test]
fn native_stores_to_a_page_protected_under_the_guest_land_once() {
    let (outcome, out, protected) = hammer("fault_path");
    assert_eq!(outcome.exit, Exit::Code(0), "console: {out}");
    assert!(out.contains("FAULT-PATH-OK"), "console: {out}");
    assert!(
        protected >= 20,
        "only {protected} protections took effect: the test proved little"
    );
    assert!(
        outcome.stats.reused >= protected - 1,
        "{} write faults reused the frame for {protected} protections",
        outcome.stats.reused
    );
    assert_eq!(outcome.stats.copied, 0, "an exclusive frame was copied");
}

#[test]
fn emulated_stores_to_a_page_protected_under_the_guest_land_once() {
    let (outcome, out, protected) = hammer("fault_path_pio");
    assert_eq!(outcome.exit, Exit::Code(0), "console: {out}");
    assert!(out.contains("FAULT-PATH-PIO-OK"), "console: {out}");
    assert!(
        protected >= 20,
        "only {protected} protections took effect: the test proved little"
    );
    assert!(outcome.stats.reused >= protected - 1, "{:?}", outcome.stats);
}
