//! Swap-out and swap-in at the memory level: R7, R13 and R14, shared
//! frames swapped once, fork of swap entries (R6), protection kept in swap,
//! checksums, and no leaked slot.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use common::{A, PAGE, RO, RW, byte, info, setup};
use memory::{Config, Context, Entry, Layout, MemError, SwapError, SwapOutReport, VmMemory, audit};

fn swapped(n: u64) -> SwapOutReport {
    SwapOutReport {
        swapped: n,
        pinned: 0,
    }
}

fn slot(vm: &VmMemory, gpa: u64) -> (u32, bool, bool) {
    match vm.entry(gpa) {
        Some(Entry::Swap {
            slot,
            exclusive,
            wp,
        }) => (slot, exclusive, wp),
        e => panic!("{gpa:#x} is not in swap: {e:?}"),
    }
}

#[test]
fn an_exclusive_page_goes_to_swap_and_comes_back_exclusive() {
    let (ctx, vm) = setup();
    vm.write(A, &[1; PAGE as usize]).unwrap();
    vm.write(A + PAGE, &[2]).unwrap();
    let before = ctx.stats();
    assert_eq!(vm.swap_out(A, 2 * PAGE).unwrap(), swapped(2));
    let (_, exclusive, wp) = slot(&vm, A);
    assert!(exclusive && !wp, "R13: the entry records exclusivity");
    let s = ctx.stats();
    assert_eq!((s.swapped, s.resident), (2, before.resident - 2));
    audit(&ctx, &[&vm]).unwrap();
    // A read brings it back: exclusive, and writable since nothing
    // protects it (R14).
    assert_eq!(byte(&vm, A + 17), 1);
    assert!(matches!(
        vm.entry(A),
        Some(Entry::Present { writable: true, .. })
    ));
    assert!(info(&vm, A).exclusive);
    // A write brings the other back.
    vm.write(A + PAGE + 1, &[3]).unwrap();
    assert_eq!((byte(&vm, A + PAGE), byte(&vm, A + PAGE + 1)), (2, 3));
    let s = ctx.stats();
    assert_eq!((s.swapped, s.swap_ins, s.resident), (0, 2, before.resident));
    // Absent pages and pages already in swap are not counted.
    assert_eq!(vm.swap_out(A + 4 * PAGE, PAGE).unwrap(), swapped(0));
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn a_pinned_page_is_skipped_and_its_pin_stays_coherent() {
    let (ctx, vm) = setup();
    vm.write(A, &[1; 2 * PAGE as usize]).unwrap();
    let pin = vm.pin(A, PAGE, RW).unwrap();
    let report = vm.swap_out(A, 2 * PAGE).unwrap();
    assert_eq!(
        report,
        SwapOutReport {
            swapped: 1,
            pinned: 1
        }
    );
    assert!(matches!(vm.entry(A), Some(Entry::Present { .. })));
    pin.write(0, &[9]).unwrap();
    assert_eq!(byte(&vm, A), 9, "the pinned page's mapping was lost");
    vm.write(A + 1, &[8]).unwrap();
    let mut b = [0; 2];
    pin.read(0, &mut b).unwrap();
    assert_eq!(b, [9, 8]);
    drop(pin);
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn a_shared_frame_is_swapped_once_for_every_vm() {
    let (ctx, p) = setup();
    p.write(A, &[5; PAGE as usize]).unwrap();
    let c = p.fork().unwrap();
    let resident = ctx.stats().resident;
    assert_eq!(p.swap_out(A, PAGE).unwrap(), swapped(1));
    let (sp, xp, _) = slot(&p, A);
    let (sc, xc, _) = slot(&c, A);
    assert_eq!(sp, sc, "the shared frame was written twice");
    assert!(!xp && !xc);
    let s = ctx.stats();
    assert_eq!((s.swapped, s.resident), (1, resident - 1));
    audit(&ctx, &[&p, &c]).unwrap();
    // Each VM reads back its own copy; the slot goes with the last.
    p.write(A, &[6]).unwrap();
    assert_eq!(ctx.stats().swapped, 1);
    assert_eq!(byte(&c, A), 5, "the parent's write reached the child");
    assert_eq!(byte(&c, A + 1), 5);
    assert_eq!(ctx.stats().swapped, 0);
    assert!(info(&c, A).exclusive && info(&p, A).exclusive);
    audit(&ctx, &[&p, &c]).unwrap();
}

#[test]
fn fork_copies_swap_entries_without_their_exclusive_bit() {
    let (ctx, p) = setup();
    p.write(A, &[5]).unwrap();
    p.swap_out(A, PAGE).unwrap();
    let c = p.fork().unwrap();
    let (sp, xp, _) = slot(&p, A);
    let (sc, xc, _) = slot(&c, A);
    assert!(sp == sc && !xp && !xc, "R6");
    audit(&ctx, &[&p, &c]).unwrap();
    c.write(A, &[6]).unwrap();
    assert_eq!(byte(&p, A), 5, "the child's write reached the parent");
    assert_eq!(byte(&c, A), 6);
    drop(c);
    audit(&ctx, &[&p]).unwrap();
}

#[test]
fn write_protection_survives_swap() {
    let (ctx, vm) = setup();
    vm.write(A, &[1]).unwrap();
    vm.protect_for_listener(A, PAGE, true).unwrap();
    vm.swap_out(A, PAGE).unwrap();
    assert!(slot(&vm, A).2, "the swap entry lost the protection");
    assert_eq!(byte(&vm, A), 1);
    assert!(
        matches!(
            vm.entry(A),
            Some(Entry::Present {
                wp: true,
                writable: false,
                ..
            })
        ),
        "R14: a protected page comes back read-only"
    );
    vm.write(A, &[2]).unwrap();
    assert_eq!(vm.take_write_events(8), vec![A]);
    // Protection armed on a page already in swap is kept too.
    vm.swap_out(A, PAGE).unwrap();
    vm.protect_for_listener(A, PAGE, true).unwrap();
    vm.write(A, &[3]).unwrap();
    assert_eq!(vm.take_write_events(8), vec![A]);
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn discard_and_teardown_free_their_slots() {
    let (ctx, vm) = setup();
    vm.write(A, &[1; 4 * PAGE as usize]).unwrap();
    vm.protect_for_listener(A, PAGE, true).unwrap();
    vm.swap_out(A, 4 * PAGE).unwrap();
    let c = vm.fork().unwrap();
    assert_eq!(ctx.stats().swapped, 4);
    vm.discard(A, 2 * PAGE).unwrap();
    assert_eq!(
        vm.entry(A),
        Some(Entry::Marker { wp: true }),
        "discard dropped protection"
    );
    assert_eq!(byte(&vm, A), 0);
    assert_eq!(ctx.stats().swapped, 4, "the child still names the slots");
    drop(c);
    assert_eq!(ctx.stats().swapped, 2);
    audit(&ctx, &[&vm]).unwrap();
    drop(vm);
    let s = ctx.stats();
    assert_eq!((s.swapped, s.resident), (0, 0));
}

#[test]
fn pins_and_host_views_read_swapped_pages_back() {
    let (ctx, vm) = setup();
    vm.write(A, &[4; 2 * PAGE as usize]).unwrap();
    vm.swap_out(A, 2 * PAGE).unwrap();
    let pin = vm.pin(A, PAGE, RO).unwrap();
    let mut b = [0; 1];
    pin.read(10, &mut b).unwrap();
    assert_eq!(b, [4]);
    assert!(info(&vm, A).exclusive, "R4");
    drop(pin);
    // An exclusive page made read-only (mprotect-style) comes back
    // writable: it is exclusive and no listener protects it (R14).
    assert_eq!(byte(&vm, A + PAGE), 4);
    vm.write_protect(A + PAGE, PAGE).unwrap();
    vm.swap_out(A + PAGE, PAGE).unwrap();
    assert_eq!(byte(&vm, A + PAGE), 4);
    assert!(matches!(
        vm.entry(A + PAGE),
        Some(Entry::Present { writable: true, .. })
    ));
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn a_damaged_slot_ends_with_an_error_not_wrong_data() {
    let dir = std::env::temp_dir().join(format!("swap-damage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("swap");
    let ctx = Context::new(Config {
        fault_around: 1,
        swap_file: Some(path.clone()),
        ..Config::default()
    });
    let vm = VmMemory::new(&ctx, Layout::new(&[(0, 8 << 20)]).unwrap()).unwrap();
    vm.write(A, &[1; PAGE as usize]).unwrap();
    vm.write(A + PAGE, &[2; PAGE as usize]).unwrap();
    vm.swap_out(A, 2 * PAGE).unwrap();
    let (s, _, _) = slot(&vm, A);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0xee], u64::from(s) * PAGE + 123)
        .unwrap();
    let mut b = [0u8; 1];
    match vm.read(A, &mut b) {
        Err(MemError::Swap {
            gpa,
            source: SwapError::Corrupt { slot, .. },
        }) => assert_eq!((gpa, slot), (A, s)),
        other => panic!("a damaged slot was read back: {other:?} {b:?}"),
    }
    assert_eq!(byte(&vm, A + PAGE), 2, "an intact neighbour");
    drop(vm);
    drop(ctx);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        0,
        "swap file not emptied"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn concurrent_swap_out_and_writes_lose_nothing() {
    let (ctx, vm) = setup();
    let pages = 16u64;
    let writer = {
        let vm: Arc<VmMemory> = vm.clone();
        std::thread::spawn(move || {
            for round in 1..=200u64 {
                for p in 0..pages {
                    vm.write(A + p * PAGE, &round.to_le_bytes()).unwrap();
                }
            }
        })
    };
    let mut rounds = 0;
    while rounds < 50 || !writer.is_finished() {
        vm.swap_out(A, pages * PAGE).unwrap();
        rounds += 1;
    }
    writer.join().unwrap();
    for p in 0..pages {
        let mut b = [0; 8];
        vm.read(A + p * PAGE, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 200, "page {p} lost a write");
    }
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn a_resident_limit_is_kept_with_nothing_lost() {
    let (ctx, vm) = setup();
    vm.set_resident_limit(Some(16));
    for p in 0..200u64 {
        vm.write(A + p * PAGE, &p.to_le_bytes()).unwrap();
        assert!(
            vm.resident() <= 16,
            "{} pages present after page {p}",
            vm.resident()
        );
    }
    assert!(ctx.stats().swapped >= 184);
    for p in (0..200u64).rev() {
        let mut b = [0; 8];
        vm.read(A + p * PAGE, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), p);
        assert!(vm.resident() <= 16);
    }
    // A child inherits the limit.
    let c = vm.fork().unwrap();
    assert_eq!(c.resident_limit(), Some(16));
    for p in 0..64u64 {
        c.write(A + p * PAGE, &[1]).unwrap();
    }
    assert!(c.resident() <= 16);
    audit(&ctx, &[&vm, &c]).unwrap();
}

#[test]
fn pinned_and_unevictable_pages_stay_and_do_not_stop_progress() {
    let (ctx, vm) = setup();
    vm.write(A, &[1; 24 * PAGE as usize]).unwrap();
    let pin = vm.pin(A, 20 * PAGE, RW).unwrap();
    vm.set_unevictable(A + 20 * PAGE, 4 * PAGE).unwrap();
    vm.set_resident_limit(Some(16));
    for p in 24..300u64 {
        vm.write(A + p * PAGE, &[2]).unwrap();
    }
    // The pinned and unevictable pages are all still present; the rest
    // is held to the few pages the last faults needed.
    for p in 0..24 {
        assert!(
            matches!(vm.entry(A + p * PAGE), Some(Entry::Present { .. })),
            "page {p}"
        );
    }
    assert!(
        vm.resident() <= 24 + memory::RECENT_FAULTS as u64,
        "{}",
        vm.resident()
    );
    assert_eq!(
        vm.swap_out(A + 20 * PAGE, 4 * PAGE).unwrap(),
        swapped(0),
        "unevictable pages went"
    );
    pin.write(0, &[3]).unwrap();
    assert_eq!(byte(&vm, A), 3);
    drop(pin);
    audit(&ctx, &[&vm]).unwrap();
}
