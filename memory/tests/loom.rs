//! Model checking (loom) of the lockless pin path (R8) against a concurrent
//! fork (R6): every interleaving of the atomics involved, not a lucky few.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p memory --release --test loom`
//! (scripts/test does). Release mode: the debug-build lock-order tracker
//! uses thread-locals, which loom's threads share.

#![cfg(loom)]

use memory::{Config, Context, Layout, PinFlags, VmMemory, audit};

const PAGE: u64 = 0x5000;

fn read(vm: &VmMemory) -> u8 {
    let mut b = [0u8];
    vm.read(PAGE, &mut b).unwrap();
    b[0]
}

/// A pin taken while the VM forks always ends up on the frame the parent
/// maps, exclusive, and never shared with the child.
#[test]
fn lockless_pin_races_fork() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        let ctx = Context::new(Config {
            fault_around: 1,
            ..Config::default()
        });
        // 8 pages: two leaves of 4 under loom.
        let vm = VmMemory::new(&ctx, Layout::new(&[(0, 0x8000)]).unwrap()).unwrap();
        vm.write(PAGE, &[1]).unwrap();

        let forker = {
            let vm = vm.clone();
            loom::thread::spawn(move || vm.fork().unwrap())
        };
        let pin = vm
            .pin(
                PAGE,
                1,
                PinFlags {
                    write: true,
                    longterm: true,
                },
            )
            .unwrap();
        let child = forker.join().unwrap();

        audit(&ctx, &[&vm, &child]).unwrap();
        // The device and the parent see each other's writes...
        pin.write(0, &[7]).unwrap();
        assert_eq!(read(&vm), 7, "the parent does not see the device's write");
        vm.write(PAGE, &[8]).unwrap();
        let mut b = [0u8];
        pin.read(0, &mut b).unwrap();
        assert_eq!(b[0], 8, "the device does not see the parent's write");
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
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        let ctx = Context::new(Config {
            fault_around: 1,
            ..Config::default()
        });
        let vm = VmMemory::new(&ctx, Layout::new(&[(0, 0x8000)]).unwrap()).unwrap();
        vm.write(PAGE, &[1]).unwrap();

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
