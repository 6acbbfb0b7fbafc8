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

/// Migrations back to back under a vCPU that writes the pages without
/// pause: its faults on pages moved meanwhile are retried, never taken for
/// faults nothing can resolve (which stops the VM).
#[test]
fn a_vcpu_writing_pages_migrated_back_to_back_is_never_stuck() {
    let (outcome, console) = run_program(guest("migrate_storm"), 64 * MIB, 2);
    assert_eq!(outcome.exit, Exit::Code(0), "{console}");
    assert!(console.contains("MIGRATE-STORM-OK"), "{console}");
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
