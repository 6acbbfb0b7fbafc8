//! Write protection for a listener: the asynchronous record, the
//! synchronous listener, markers, and what fork, discard and pins do to
//! protection (MEMORY-MODEL.md, "Write-protect markers"; scenario 11's
//! fork and zap parts).

mod common;

use std::sync::{Arc, Mutex};

use common::{A, PAGE, RO, RW, byte, setup};
use memory::{Entry, PinFlags, VmMemory, WriteListener, audit};

fn events(vm: &VmMemory) -> Vec<u64> {
    vm.take_write_events(usize::MAX)
}

#[test]
fn each_written_page_is_recorded_once_until_protected_again() {
    let (ctx, vm) = setup();
    vm.write(A, &[1; 3 * PAGE as usize]).unwrap();
    assert_eq!(vm.protect_for_listener(A, 3 * PAGE, true).unwrap(), 3);
    assert!(events(&vm).is_empty());
    assert!(matches!(
        vm.entry(A),
        Some(Entry::Present {
            wp: true,
            writable: false,
            ..
        })
    ));
    vm.write(A + PAGE, &[2]).unwrap();
    vm.write(A + PAGE + 8, &[3]).unwrap();
    vm.write(A + 2 * PAGE, &[4]).unwrap();
    assert_eq!(events(&vm), vec![A + PAGE, A + 2 * PAGE]);
    assert!(events(&vm).is_empty(), "drained twice");
    assert_eq!(byte(&vm, A + PAGE), 2, "the write did not land");
    assert_eq!(byte(&vm, A + PAGE + 8), 3);
    // Reads report nothing; a new protection reports the next write again.
    assert_eq!(byte(&vm, A), 1);
    vm.protect_for_listener(A + PAGE, PAGE, true).unwrap();
    vm.write(A + PAGE, &[5]).unwrap();
    assert_eq!(events(&vm), vec![A + PAGE]);
    assert_eq!(ctx.stats().wp_events, 3);
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn protection_on_an_empty_page_waits_as_a_marker() {
    let (ctx, vm) = setup();
    vm.protect_for_listener(A, PAGE, true).unwrap();
    assert_eq!(vm.entry(A), Some(Entry::Marker { wp: true }));
    // A read makes it present, still protected.
    assert_eq!(byte(&vm, A), 0);
    vm.populate(A, PAGE, memory::Access::Read).unwrap();
    assert!(matches!(
        vm.entry(A),
        Some(Entry::Present {
            wp: true,
            writable: false,
            ..
        })
    ));
    vm.write(A, &[7]).unwrap();
    assert_eq!(events(&vm), vec![A]);
    // Lifting protection from a marker leaves nothing behind.
    vm.protect_for_listener(A + PAGE, PAGE, true).unwrap();
    vm.protect_for_listener(A + PAGE, PAGE, false).unwrap();
    assert_eq!(vm.entry(A + PAGE), Some(Entry::None));
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn discard_keeps_protection_as_a_marker() {
    let (_ctx, vm) = setup();
    vm.write(A, &[1]).unwrap();
    vm.protect_for_listener(A, PAGE, true).unwrap();
    vm.discard(A, PAGE).unwrap();
    assert_eq!(vm.entry(A), Some(Entry::Marker { wp: true }));
    vm.write(A, &[2]).unwrap();
    assert_eq!(events(&vm), vec![A], "the write after a discard was missed");
}

#[test]
fn unprotect_drops_protection_without_a_record() {
    let (_ctx, vm) = setup();
    vm.write(A, &[1]).unwrap();
    vm.protect_for_listener(A, PAGE, true).unwrap();
    assert_eq!(vm.protect_for_listener(A, PAGE, false).unwrap(), 1);
    vm.write(A, &[2]).unwrap();
    assert!(events(&vm).is_empty());
}

#[test]
fn a_forked_child_does_not_inherit_protection() {
    let (ctx, p) = setup();
    p.write(A, &[1]).unwrap();
    p.protect_for_listener(A, PAGE, true).unwrap();
    p.protect_for_listener(A + PAGE, PAGE, true).unwrap();
    let c = p.fork().unwrap();
    assert!(matches!(c.entry(A), Some(Entry::Present { wp: false, .. })));
    assert_eq!(
        c.entry(A + PAGE),
        Some(Entry::None),
        "child inherited a marker"
    );
    c.write(A, &[2]).unwrap();
    c.write(A + PAGE, &[2]).unwrap();
    assert!(events(&c).is_empty());
    assert!(
        events(&p).is_empty(),
        "the child's write was reported to the parent"
    );
    assert_eq!(byte(&p, A), 1);
    // The parent keeps its protection, on the present page and the marker.
    p.write(A, &[3]).unwrap();
    p.write(A + PAGE, &[3]).unwrap();
    assert_eq!(events(&p), vec![A, A + PAGE]);
    assert_eq!(byte(&c, A), 2);
    audit(&ctx, &[&p, &c]).unwrap();
}

#[test]
fn a_page_a_device_may_write_is_reported_at_once() {
    let (_ctx, vm) = setup();
    vm.write(A, &[1; 2 * PAGE as usize]).unwrap();
    let w = vm.pin(A, PAGE, RW).unwrap();
    let r = vm.pin(A + PAGE, PAGE, RO).unwrap();
    assert_eq!(vm.protect_for_listener(A, 2 * PAGE, true).unwrap(), 1);
    // The device can write A through its pin without any fault: it counts
    // as written now. A read pin needs nothing.
    assert_eq!(events(&vm), vec![A]);
    w.write(0, &[9]).unwrap();
    vm.write(A, &[8]).unwrap();
    assert!(events(&vm).is_empty(), "A reported twice");
    vm.write(A + PAGE, &[8]).unwrap();
    assert_eq!(events(&vm), vec![A + PAGE]);
    drop((w, r));
}

/// Records, for each write it hears of, what the page held before.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(u64, u8)>>,
}

impl WriteListener for Recorder {
    fn before_write(&self, vm: &VmMemory, gpa: u64) {
        let mut b = [0u8];
        vm.read(gpa, &mut b).unwrap();
        self.seen.lock().unwrap().push((gpa, b[0]));
    }
}

#[test]
fn a_synchronous_listener_sees_the_page_before_the_write() {
    let (ctx, vm) = setup();
    let rec = Arc::new(Recorder::default());
    vm.set_write_listener(Some(rec.clone()));
    vm.write(A, &[1]).unwrap();
    vm.protect_for_listener(A, 2 * PAGE, true).unwrap();
    vm.write(A, &[2]).unwrap();
    vm.write(A, &[3]).unwrap();
    vm.write(A + PAGE, &[4]).unwrap();
    assert_eq!(*rec.seen.lock().unwrap(), vec![(A, 1), (A + PAGE, 0)]);
    assert_eq!(byte(&vm, A), 3);
    assert!(
        events(&vm).is_empty(),
        "a synchronous listener's writes were also recorded"
    );
    assert_eq!(ctx.stats().wp_events, 2);
    // Device writes are writes too: a write pin hears of it first.
    vm.protect_for_listener(A, PAGE, true).unwrap();
    let pin = vm
        .pin(
            A,
            PAGE,
            PinFlags {
                write: true,
                longterm: false,
            },
        )
        .unwrap();
    assert_eq!(rec.seen.lock().unwrap().last(), Some(&(A, 3)));
    drop(pin);
    vm.set_write_listener(None);
    audit(&ctx, &[&vm]).unwrap();
}
