//! Model checking (loom) of the lockless pin path (R8) against a concurrent
//! fork (R6), migration and a live snapshot arming its protection: every
//! interleaving of the atomics involved, not a lucky few.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p memory --release --test loom`
//! (scripts/test does). Release mode: the debug-build lock-order tracker
//! uses thread-locals, which loom's threads share.

#![cfg(loom)]

use std::sync::Arc;

use std::os::unix::fs::FileExt;

use memory::{
    Collapse, CollapseRefusal, Config, Context, Entry, HUGE_SIZE, Layout, LiveSnapshot, Pin,
    PinFlags, VmMemory, audit,
};

const RW: PinFlags = PinFlags {
    write: true,
    longterm: true,
};

const PAGE: u64 = 0x5000;

fn read(vm: &VmMemory) -> u8 {
    let mut b = [0u8];
    vm.read(PAGE, &mut b).unwrap();
    b[0]
}

/// Runs `f` under loom with at most `bound` preemptions, on a fresh VM of
/// 8 pages (two leaves of 4 under loom) whose page at PAGE holds 1.
fn model(bound: usize, f: impl Fn(Arc<Context>, Arc<VmMemory>) + Sync + Send + 'static) {
    model_with(bound, false, f);
}

/// Like [`model`]; with `huge`, the page's whole leaf is one huge entry
/// (a leaf is 4 pages under loom).
fn model_with(
    bound: usize,
    huge: bool,
    f: impl Fn(Arc<Context>, Arc<VmMemory>) + Sync + Send + 'static,
) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(bound);
    builder.max_branches = 20_000;
    builder.check(move || {
        let ctx = Context::new(Config {
            fault_around: 1,
            huge,
            ..Config::default()
        });
        let vm = VmMemory::new(&ctx, Layout::new(&[(0, 0x8000)]).unwrap()).unwrap();
        vm.write(PAGE, &[1]).unwrap();
        f(ctx, vm);
    });
}

/// Checks that the device (through `pin`) and `vm` see each other's
/// writes.
fn assert_coherent(vm: &VmMemory, pin: &Pin) {
    pin.write(0, &[7]).unwrap();
    assert_eq!(read(vm), 7, "the VM does not see the device's write");
    vm.write(PAGE, &[8]).unwrap();
    let mut b = [0u8];
    pin.read(0, &mut b).unwrap();
    assert_eq!(b[0], 8, "the device does not see the VM's write");
}

/// A pin taken while the VM forks always ends up on the frame the parent
/// maps, exclusive, and never shared with the child.
#[test]
fn lockless_pin_races_fork() {
    pin_races_fork(false);
}

/// A write pin taken while the VM forks (with `huge`, of a page of a huge
/// entry, whose frame fork copies whole when it may be pinned): the
/// device and the parent see each other's writes, the child neither.
fn pin_races_fork(huge: bool) {
    model_with(3, huge, |ctx, vm| {
        let forker = {
            let vm = vm.clone();
            loom::thread::spawn(move || vm.fork().unwrap())
        };
        let pin = vm.pin(PAGE, 1, RW).unwrap();
        let child = forker.join().unwrap();

        audit(&ctx, &[&vm, &child]).unwrap();
        // The device and the parent see each other's writes...
        assert_coherent(&vm, &pin);
        // ...and the child sees neither.
        assert_eq!(read(&child), 1, "the child sees the pinned frame");
        drop((pin, child, vm));
        assert_eq!(ctx.stats().resident, 0);
    });
}

/// A read-only pin taken while the VM forks: whichever wins, the pin ends
/// on an exclusive frame that the parent maps, so the parent's next write
/// reaches the pin and never the child.
#[test]
fn read_only_pin_races_fork() {
    model(3, |ctx, vm| {
        let forker = {
            let vm = vm.clone();
            loom::thread::spawn(move || vm.fork().unwrap())
        };
        let pin = vm.pin(PAGE, 1, PinFlags::default()).unwrap();
        let child = forker.join().unwrap();

        audit(&ctx, &[&vm, &child]).unwrap();
        vm.write(PAGE, &[9]).unwrap();
        let mut b = [0u8];
        pin.read(0, &mut b).unwrap();
        assert_eq!(b[0], 9, "the read-only pin lost the parent's write");
        assert_eq!(read(&child), 1, "the child sees the parent's write");
        drop((pin, child, vm));
        assert_eq!(ctx.stats().resident, 0);
    });
}

/// Seed 000 section II: migration against the lockless pin path. Either
/// the migration sees the pin (and leaves the frame where it is) or the
/// pinner sees the migration entry (and pins the moved frame afterwards):
/// the pin always ends on the frame the VM maps.
#[test]
fn lockless_pin_races_migration() {
    model(3, |ctx, vm| {
        let mover = {
            let vm = vm.clone();
            loom::thread::spawn(move || vm.migrate(PAGE, 1).unwrap())
        };
        let pin = vm.pin(PAGE, 1, RW).unwrap();
        let report = mover.join().unwrap();
        assert_eq!(report.moved + report.pinned, 1);

        audit(&ctx, &[&vm]).unwrap();
        assert_coherent(&vm, &pin);
        drop((pin, vm));
        assert_eq!(ctx.stats().resident, 0);
    });
}

/// Migration, a lockless pin and a fork all at once: the pin stays
/// coherent with the parent, the child never sees the parent's later
/// writes, and every count adds up.
#[test]
fn migration_pin_and_fork_race() {
    op_fork_and_pin_race(|vm| {
        vm.migrate(PAGE, 1).unwrap();
    });
}

/// `op` on one thread, a fork on another and a lockless pin at once: the
/// pin stays coherent with the parent, and the child reads what the page
/// held at the fork.
fn op_fork_and_pin_race(op: fn(&VmMemory)) {
    model(2, move |ctx, vm| {
        let other = {
            let vm = vm.clone();
            loom::thread::spawn(move || op(&vm))
        };
        let forker = {
            let vm = vm.clone();
            loom::thread::spawn(move || vm.fork().unwrap())
        };
        let pin = vm.pin(PAGE, 1, RW).unwrap();
        other.join().unwrap();
        let child = forker.join().unwrap();

        audit(&ctx, &[&vm, &child]).unwrap();
        assert_coherent(&vm, &pin);
        assert_eq!(read(&child), 1, "the child sees the parent's writes");
        drop((pin, child, vm));
        assert_eq!(ctx.stats().resident, 0);
    });
}

/// A device pin taken while a live snapshot arms its protection (the
/// write-protect sequence held odd, as by fork, but with the guest
/// running): either arming sees the pin, leaves the page writable and the
/// instant copies it, or the pinner backs off to a write fault, which the
/// snapshot catches up on. Either way the image holds what the device
/// wrote before the instant and nothing it wrote after.
#[test]
fn lockless_pin_races_snapshot_arming() {
    model(2, |ctx, vm| {
        let image = memory::open_unlinked(&std::env::temp_dir()).unwrap();
        let armer = {
            let (vm, image) = (vm.clone(), image.try_clone().unwrap());
            loom::thread::spawn(move || LiveSnapshot::prepare(&vm, image).unwrap())
        };
        let pin = vm.pin(PAGE, 1, RW).unwrap();
        pin.write(0, &[7]).unwrap();
        let snap = armer.join().unwrap();
        snap.begin(&vm, || {}).unwrap();
        pin.write(0, &[9]).unwrap();
        snap.copy_rest(&vm, |_, _| {}).unwrap();
        let mut b = [0u8];
        image.read_exact_at(&mut b, PAGE).unwrap();
        assert_eq!(
            b[0], 7,
            "the image misses the device's write before the instant"
        );

        audit(&ctx, &[&vm]).unwrap();
        assert_coherent(&vm, &pin);
        drop((pin, snap, vm));
        assert_eq!(ctx.stats().resident, 0);
    });
}

/// A pin of a page of a huge entry while another thread splits the entry
/// (a discard of a neighbouring page): the lockless path reads the huge
/// entry and the split writes the small ones before clearing it, so the
/// pin ends on the frame the VM maps, exclusive, whichever wins.
#[test]
fn lockless_pin_races_a_huge_split() {
    model_with(3, true, |ctx, vm| {
        assert!(vm.frame_info(PAGE).unwrap().huge);
        let splitter = {
            let vm = vm.clone();
            loom::thread::spawn(move || vm.discard(PAGE + 0x1000, 0x1000).unwrap())
        };
        let pin = vm.pin(PAGE, 1, RW).unwrap();
        splitter.join().unwrap();
        audit(&ctx, &[&vm]).unwrap();
        assert!(!vm.frame_info(PAGE).unwrap().huge);
        assert_coherent(&vm, &pin);
        let mut b = [1u8];
        vm.read(PAGE + 0x1000, &mut b).unwrap();
        assert_eq!(b[0], 0, "the discarded page kept its contents");
        drop((pin, vm));
        assert_eq!(ctx.stats().resident, 0);
    });
}

/// A pin of a page of a huge entry while the VM forks: the pinned frame
/// is copied whole for the child or the pin backs off and unshares after.
#[test]
fn lockless_pin_races_a_huge_fork() {
    pin_races_fork(true);
}

/// Write protection armed on an empty page while a first touch of another
/// page of the same empty leaf maps the leaf huge: whichever wins, the
/// protection is kept (a marker, or a protected page of the split entry).
#[test]
fn protection_of_an_empty_page_races_a_huge_first_touch() {
    model_with(3, true, |ctx, vm| {
        let toucher = {
            let vm = vm.clone();
            loom::thread::spawn(move || vm.write(0x1000, &[5]).unwrap())
        };
        vm.protect_for_listener(0x2000, 0x1000, true).unwrap();
        toucher.join().unwrap();
        assert!(
            vm.entry(0x2000).unwrap().wp(),
            "the protection was lost to the huge first touch"
        );
        let mut b = [0u8];
        vm.read(0x1000, &mut b).unwrap();
        assert_eq!(b[0], 5);
        audit(&ctx, &[&vm]).unwrap();
        drop(vm);
        assert_eq!(ctx.stats().resident, 0);
    });
}

/// Seed 004: a collapse retracts the small table of the leaf that a
/// lockless pin is walking. Either the collapse sees the pin (and leaves
/// everything as it was) or the pinner finds the table gone or changed
/// (and pins through the locked path, after the collapse): the pin ends
/// on the frame the VM maps, whichever wins, and no frame leaks.
#[test]
fn lockless_pin_races_a_collapse() {
    model(3, |ctx, vm| {
        let block = PAGE - PAGE % HUGE_SIZE;
        let pinner = {
            let vm = vm.clone();
            loom::thread::spawn(move || vm.pin(PAGE, 1, RW).unwrap())
        };
        let outcome = vm.collapse(block).unwrap();
        let pin = pinner.join().unwrap();
        audit(&ctx, &[&vm]).unwrap();
        let huge = vm.frame_info(PAGE).unwrap().huge;
        match outcome {
            Collapse::Done { .. } => assert!(huge, "collapsed, yet not huge"),
            Collapse::Refused(CollapseRefusal::Pinned) => assert!(!huge),
            other => panic!("unexpected {other:?}"),
        }
        assert_coherent(&vm, &pin);
        drop((pin, vm));
        assert_eq!(ctx.stats().resident, 0);
    });
}

/// A collapse, a fork and a lockless pin at once: the child reads what
/// the block held at the fork, the pin stays coherent with the parent.
#[test]
fn collapse_fork_and_pin_race() {
    op_fork_and_pin_race(|vm| {
        vm.collapse(PAGE - PAGE % HUGE_SIZE).unwrap();
    });
}

/// A lockless read of an entry (the walk every lockless path starts with)
/// while a collapse retracts the table under it: it reads the old small
/// entry, none (mid-collapse), or the huge one, never a retired table.
/// (The reader runs on the spawned thread: with the collapse there, loom's
/// bounded search does not reach a reader stopped inside its walk.)
#[test]
fn lockless_read_races_a_collapse() {
    model(3, |ctx, vm| {
        let block = PAGE - PAGE % HUGE_SIZE;
        let reader = {
            let vm = vm.clone();
            loom::thread::spawn(move || vm.entry(PAGE).unwrap())
        };
        assert!(matches!(vm.collapse(block).unwrap(), Collapse::Done { .. }));
        let seen = reader.join().unwrap();
        assert!(
            matches!(seen, Entry::Present { .. } | Entry::None),
            "{seen:?}"
        );
        audit(&ctx, &[&vm]).unwrap();
        drop(vm);
        assert_eq!(ctx.stats().resident, 0);
    });
}
