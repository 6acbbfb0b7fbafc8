//! Write protection for a listener through the guest ABI (WP, WP_EVENTS).

use guest_tests::{MIB, guest, run_program};
use vmm::Exit;

#[test]
fn wp_events_report_each_written_page_once() {
    let (outcome, console) = run_program(guest("wp"), 64 * MIB, 1);
    assert_eq!(outcome.exit, Exit::Code(0), "{console}");
    assert!(console.contains("WP-OK"), "{console}");
    assert_eq!(outcome.stats.wp_events, 15, "{console}");
}

#[test]
fn swapped_pages_come_back_intact() {
    let (outcome, console) = run_program(guest("swap"), 64 * MIB, 1);
    assert_eq!(outcome.exit, Exit::Code(0), "{console}");
    assert!(console.contains("SWAP-OK"), "{console}");
    assert!(outcome.stats.swap_ins >= 64, "{:?}", outcome.stats);
}

#[test]
fn a_counter_survives_swap_and_migration_under_a_running_vcpu() {
    let (outcome, console) = run_program(guest("counter_race"), 64 * MIB, 2);
    assert_eq!(outcome.exit, Exit::Code(0), "{console}");
    assert!(console.contains("COUNTER-RACE-OK"), "{console}");
    assert!(
        outcome.stats.swap_ins >= 200 && outcome.stats.migrated >= 200,
        "{:?}",
        outcome.stats
    );
}
