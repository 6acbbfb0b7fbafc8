//! Page migration at the memory level: the three kinds of migration entry
//! (R15), pinned frames skipped (R7), shared frames moved for every VM,
//! what a fork, a discard or an access does while a page is in flight
//! (R6), and protection kept.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{A, PAGE, RO, RW, byte, info, setup};
use memory::{Entry, MigrateReport, MigrationKind, VmMemory, audit};

fn store_of(vm: &VmMemory, gpa: u64) -> u32 {
    match vm.entry(gpa) {
        Some(Entry::Present { store, .. }) => store,
        e => panic!("{gpa:#x} is not present: {e:?}"),
    }
}

fn moved(n: u64) -> MigrateReport {
    MigrateReport {
        moved: n,
        pinned: 0,
    }
}

#[test]
fn a_writable_page_moves_and_stays_writable_and_exclusive() {
    let (ctx, vm) = setup();
    vm.write(A, &[7; PAGE as usize]).unwrap();
    let before = store_of(&vm, A);
    assert_eq!(vm.migrate(A, PAGE).unwrap(), moved(1));
    assert_ne!(store_of(&vm, A), before, "the frame did not move");
    assert!(matches!(
        vm.entry(A),
        Some(Entry::Present { writable: true, .. })
    ));
    assert!(info(&vm, A).exclusive);
    assert_eq!(byte(&vm, A + 4095), 7);
    let s = ctx.stats();
    assert_eq!((s.migrated, s.resident), (1, 1));
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn a_read_only_exclusive_page_comes_back_read_only_and_exclusive() {
    let (ctx, vm) = setup();
    vm.write(A, &[7]).unwrap();
    vm.write_protect(A, PAGE).unwrap();
    vm.migrate_page_between(A, || {
        assert!(matches!(
            vm.entry(A),
            Some(Entry::Migration {
                kind: MigrationKind::ReadExclusive,
                ..
            })
        ));
    })
    .unwrap();
    assert!(matches!(
        vm.entry(A),
        Some(Entry::Present {
            writable: false,
            ..
        })
    ));
    assert!(
        info(&vm, A).exclusive,
        "R15: read-exclusive restores exclusive"
    );
    let copied = ctx.stats().copied;
    vm.write(A, &[8]).unwrap();
    assert_eq!(
        ctx.stats().copied,
        copied,
        "an exclusive frame was copied on write"
    );
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn pinned_frames_are_skipped_and_nothing_is_lost() {
    let (ctx, vm) = setup();
    vm.write(A, &[1; 3 * PAGE as usize]).unwrap();
    let w = vm.pin(A, PAGE, RW).unwrap();
    let r = vm.pin(A + PAGE, PAGE, RO).unwrap();
    let report = vm.migrate(A, 3 * PAGE).unwrap();
    assert_eq!(
        report,
        MigrateReport {
            moved: 1,
            pinned: 2
        }
    );
    w.write(0, &[5]).unwrap();
    assert_eq!(byte(&vm, A), 5, "the write pin lost its page");
    vm.write(A + PAGE, &[6]).unwrap();
    let mut b = [0];
    r.read(0, &mut b).unwrap();
    assert_eq!(b, [6], "the read pin lost its page");
    drop((w, r));
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn a_shared_frame_moves_for_every_vm_and_stays_shared_read_only() {
    let (ctx, p) = setup();
    p.write(A, &[3]).unwrap();
    let c = p.fork().unwrap();
    p.migrate_page_between(A, || {
        for vm in [&p, &c] {
            assert!(matches!(
                vm.entry(A),
                Some(Entry::Migration {
                    kind: MigrationKind::Read,
                    ..
                })
            ));
        }
    })
    .unwrap();
    let i = info(&p, A);
    assert!(!i.exclusive && i.mapcount == 2, "{i:?}");
    assert_eq!(ctx.stats().resident, 1, "the old frame was not freed");
    p.write(A, &[4]).unwrap();
    assert_eq!((byte(&p, A), byte(&c, A)), (4, 3));
    audit(&ctx, &[&p, &c]).unwrap();
}

#[test]
fn a_fork_while_a_page_is_in_flight_makes_both_entries_read_entries() {
    let (ctx, p) = setup();
    p.write(A, &[1]).unwrap();
    let mut child = None;
    p.migrate_page_between(A, || {
        assert!(matches!(
            p.entry(A),
            Some(Entry::Migration {
                kind: MigrationKind::Write,
                ..
            })
        ));
        let c = p.fork().unwrap();
        for vm in [&p, &c] {
            assert!(
                matches!(
                    vm.entry(A),
                    Some(Entry::Migration {
                        kind: MigrationKind::Read,
                        ..
                    })
                ),
                "R6: fork must turn a write migration entry into a read one"
            );
        }
        child = Some(c);
    })
    .unwrap();
    let c = child.unwrap();
    for vm in [&p, &c] {
        assert!(matches!(
            vm.entry(A),
            Some(Entry::Present {
                writable: false,
                ..
            })
        ));
    }
    assert!(
        !info(&p, A).exclusive,
        "a frame mapped by two VMs is exclusive"
    );
    audit(&ctx, &[&p, &c]).unwrap();
    p.write(A, &[2]).unwrap();
    assert_eq!(
        (byte(&p, A), byte(&c, A)),
        (2, 1),
        "missed COW after migration"
    );
    audit(&ctx, &[&p, &c]).unwrap();
}

#[test]
fn a_discard_while_a_page_is_in_flight_wins() {
    let (ctx, vm) = setup();
    vm.write(A, &[1]).unwrap();
    vm.protect_for_listener(A, PAGE, true).unwrap();
    vm.migrate_page_between(A, || {
        vm.discard(A, PAGE).unwrap();
    })
    .unwrap();
    assert_eq!(vm.entry(A), Some(Entry::Marker { wp: true }));
    assert_eq!(byte(&vm, A), 0);
    assert_eq!(ctx.stats().resident, 0, "the moved frame leaked");
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn protection_survives_migration() {
    let (ctx, vm) = setup();
    vm.write(A, &[1]).unwrap();
    vm.protect_for_listener(A, PAGE, true).unwrap();
    vm.migrate(A, PAGE).unwrap();
    assert!(matches!(
        vm.entry(A),
        Some(Entry::Present {
            wp: true,
            writable: false,
            ..
        })
    ));
    vm.write(A, &[2]).unwrap();
    assert_eq!(vm.take_write_events(8), vec![A]);
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn an_access_to_a_page_in_flight_waits_and_sees_the_moved_data() {
    let (ctx, vm) = setup();
    vm.write(A, &[1]).unwrap();
    let started = Arc::new(AtomicBool::new(false));
    let reader = {
        let (vm, started) = (vm.clone(), started.clone());
        move || {
            while !started.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
            vm.write(A + 1, &[2]).unwrap();
            byte(&vm, A)
        }
    };
    let mut handle = None;
    vm.migrate_page_between(A, || {
        handle = Some(std::thread::spawn(reader));
        started.store(true, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(20));
    })
    .unwrap();
    assert_eq!(handle.unwrap().join().unwrap(), 1);
    assert_eq!(byte(&vm, A + 1), 2);
    let waited = ctx.stats().migration_wait_max_ns;
    assert!(waited >= 5_000_000, "the access did not wait: {waited} ns");
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn concurrent_writes_and_migrations_lose_nothing() {
    let (ctx, vm) = setup();
    let pages = 8u64;
    vm.write(A, &[0; 8 * PAGE as usize]).unwrap();
    let writer = {
        let vm = vm.clone();
        std::thread::spawn(move || {
            for round in 1..=300u64 {
                for p in 0..pages {
                    vm.write(A + p * PAGE, &round.to_le_bytes()).unwrap();
                }
            }
        })
    };
    let mut moved = 0;
    let mut rounds = 0;
    while rounds < 50 || !writer.is_finished() {
        moved += vm.migrate(A, pages * PAGE).unwrap().moved;
        let _ = vm.fork().unwrap();
        rounds += 1;
    }
    writer.join().unwrap();
    assert!(moved > 0);
    for p in 0..pages {
        let mut b = [0; 8];
        vm.read(A + p * PAGE, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 300, "page {p} lost a write");
    }
    audit(&ctx, &[&vm]).unwrap();
}

/// Host mappings (lines of /proc/self/maps) inside the VM's RAM.
fn host_mappings(vm: &VmMemory) -> usize {
    let (_, len, base) = vm.host_ranges()[0];
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let (a, b) = (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            );
            a >= base && b <= base + len
        })
        .count()
}

#[test]
fn compaction_merges_what_copy_on_write_scattered() {
    let (ctx, p) = setup();
    p.write(A, &[1; 64 * PAGE as usize]).unwrap();
    let c = p.fork().unwrap();
    for i in (0..64).step_by(2) {
        p.write(A + i * PAGE, &[2]).unwrap();
    }
    drop(c);
    let scattered = host_mappings(&p);
    assert!(scattered >= 64, "{scattered} mappings only");
    let moved = p.compact(1000).unwrap();
    assert!(moved >= 32, "{moved} frames moved");
    let merged = host_mappings(&p);
    assert!(merged <= 4, "{merged} host mappings after compaction");
    for i in 0..64 {
        assert_eq!(byte(&p, A + i * PAGE), if i % 2 == 0 { 2 } else { 1 });
    }
    assert_eq!(ctx.compact_all(1000), 0, "nothing left to compact");
    audit(&ctx, &[&p]).unwrap();
}
