//! Taking write access ahead of a fork or a snapshot, while the guest runs:
//! frames stay exclusive, a write reuses its frame, and a fork after it is
//! the same fork.

mod common;

use common::{A, PAGE, RW, byte, info, setup};
use memory::{Entry, audit};

#[test]
fn demoted_pages_stay_exclusive_and_a_write_reuses_them() {
    let (ctx, vm) = setup();
    vm.write(A, &[1; 4 * PAGE as usize]).unwrap();
    assert_eq!(vm.demote_writable().unwrap(), 4);
    assert_eq!(vm.demote_writable().unwrap(), 0, "nothing left to demote");
    assert!(matches!(
        vm.entry(A),
        Some(Entry::Present {
            writable: false,
            ..
        })
    ));
    assert!(info(&vm, A).exclusive);
    let before = ctx.stats();
    vm.write(A, &[2]).unwrap();
    let after = ctx.stats();
    assert_eq!(after.copied, before.copied, "a demoted page was copied");
    assert_eq!(after.reused, before.reused + 1);
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn a_fork_after_demotion_shares_and_copies_as_before() {
    let (ctx, vm) = setup();
    vm.write(A, &[1; 2 * PAGE as usize]).unwrap();
    let pin = vm.pin(A + PAGE, PAGE, RW).unwrap();
    vm.demote_writable().unwrap();
    vm.write(A, &[3]).unwrap();
    let child = vm.fork().unwrap();
    // The unpinned page is shared; the pinned one was copied for the child.
    assert_eq!(info(&vm, A).mapcount, 2);
    assert_eq!(info(&vm, A + PAGE).mapcount, 1);
    pin.write(0, &[7]).unwrap();
    assert_eq!(byte(&vm, A + PAGE), 7);
    assert_eq!(
        byte(&child, A + PAGE),
        1,
        "the child sees the device's later write"
    );
    vm.write(A, &[4]).unwrap();
    assert_eq!(byte(&child, A), 3);
    drop(pin);
    audit(&ctx, &[&vm, &child]).unwrap();
}
