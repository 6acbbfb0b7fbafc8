//! Resetting a clone's pages to its origin (snapshot fuzzing): every kind
//! of change a run can make is undone, written pages stay writable, and
//! nothing leaks.

mod common;

use common::{A, PAGE, RW, byte, setup};
use memory::{Access, VmMemory};

/// Reads `len` bytes at `gpa`.
fn bytes(vm: &VmMemory, gpa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    vm.read(gpa, &mut b).unwrap();
    b
}

fn page_of(gpa: u64) -> u64 {
    gpa / PAGE
}

#[test]
fn a_reset_undoes_writes_new_pages_and_discards() {
    let (ctx, root) = setup();
    for i in 0..4 {
        root.write(A + i * PAGE, &[10 + i as u8; 64]).unwrap();
    }
    let origin = root.fork().unwrap();
    let clone = origin.fork().unwrap();
    let before = bytes(&origin, A, 8 * PAGE as usize);

    // A run: overwrite a shared page twice (the second time it is already
    // the clone's own), write two pages the origin never had, discard one.
    let mut touched = Vec::new();
    for _ in 0..2 {
        clone.write(A, &[0xaa; 100]).unwrap();
        clone.write(A + 5 * PAGE, &[0xbb; 10]).unwrap();
        clone.write(A + 6 * PAGE, &[0xcc; 10]).unwrap();
        clone.discard(A + 2 * PAGE, PAGE).unwrap();
        touched.extend([A, A + 5 * PAGE, A + 6 * PAGE, A + 2 * PAGE].map(page_of));
        let report = clone.reset_pages(&origin, &mut touched).unwrap();
        touched.clear();
        assert_eq!(bytes(&clone, A, 8 * PAGE as usize), before);
        assert_eq!(report.copied, 1, "{report:?}");
        assert_eq!(report.zeroed, 2, "{report:?}");
        assert_eq!(report.slow, 1, "the discarded page: {report:?}");
        // The written pages stay writable: the next run writes them
        // without a fault.
        assert!(!clone.would_fault(A, Access::Write));
        assert!(!clone.would_fault(A + 5 * PAGE, Access::Write));
    }
    // The origin never changed.
    assert_eq!(bytes(&origin, A, 8 * PAGE as usize), before);
    memory::audit(&ctx, &[&root, &origin, &clone]).unwrap();
    drop((root, origin, clone));
    assert_eq!(ctx.stats().resident, 0, "frames leaked");
}

#[test]
fn pages_a_run_did_not_change_are_left_alone() {
    let (ctx, root) = setup();
    root.write(A, &[1; 8]).unwrap();
    let origin = root.fork().unwrap();
    let clone = origin.fork().unwrap();
    let resident = ctx.stats().resident;
    let mut pages = vec![page_of(A), page_of(A + PAGE), page_of(A)];
    let report = clone.reset_pages(&origin, &mut pages).unwrap();
    assert_eq!(report.same, 2, "{report:?}");
    assert_eq!(pages.len(), 2, "pages are deduplicated");
    assert_eq!(ctx.stats().resident, resident, "a reset allocated frames");
    assert_eq!(byte(&clone, A), 1);
}

#[test]
fn a_device_write_through_a_pin_is_recorded_and_reset() {
    let (_ctx, root) = setup();
    root.write(A, &[7; 16]).unwrap();
    let origin = root.fork().unwrap();
    let clone = origin.fork().unwrap();
    clone.track_vmm_writes();
    {
        let pin = clone.pin(A + 8, 16, RW).unwrap();
        pin.write(0, &[9; 16]).unwrap();
    }
    clone.write(A + 3 * PAGE, &[1]).unwrap();
    let mut pages = Vec::new();
    clone.take_vmm_writes(&mut pages);
    pages.sort_unstable();
    assert_eq!(pages, [page_of(A), page_of(A + 3 * PAGE)]);
    let mut again = Vec::new();
    clone.take_vmm_writes(&mut again);
    assert!(again.is_empty(), "drained pages came back: {again:?}");
    clone.reset_pages(&origin, &mut pages).unwrap();
    assert_eq!(
        bytes(&clone, A, 32),
        [7u8; 16]
            .iter()
            .chain(&[0u8; 16])
            .copied()
            .collect::<Vec<_>>()
    );
    assert_eq!(byte(&clone, A + 3 * PAGE), 0);
}

#[test]
fn a_swapped_page_is_reset_too() {
    let ctx = memory::Context::new(memory::Config {
        fault_around: 1,
        ..memory::Config::default()
    });
    ctx.open_swap().unwrap();
    let root = VmMemory::new(&ctx, memory::Layout::new(&[(0, 8 << 20)]).unwrap()).unwrap();
    root.write(A, &[5; 32]).unwrap();
    let origin = root.fork().unwrap();
    let clone = origin.fork().unwrap();
    clone.write(A, &[6; 32]).unwrap();
    clone.swap_out(A, PAGE).unwrap();
    let mut pages = vec![page_of(A)];
    let report = clone.reset_pages(&origin, &mut pages).unwrap();
    assert_eq!(report.slow, 1, "{report:?}");
    assert_eq!(bytes(&clone, A, 32), [5u8; 32]);
}
