//! Live snapshots: the image shows memory as it was at `begin`, whatever
//! the VM, its devices, swap and migration do while it is written.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{A, PAGE, RW, setup};
use memory::{LiveSnapshot, MemError, SnapshotError, VmMemory, audit};

/// Pages the tests fill.
const N: u64 = 256;

/// An unlinked scratch file.
fn image() -> File {
    memory::open_unlinked(&std::env::temp_dir()).unwrap()
}

/// Page `i` of the range at `A` holds `tag` and its index.
fn fill(vm: &VmMemory, tag: u8) {
    for i in 0..N {
        vm.write(A + i * PAGE, &[tag, i as u8, 0xcc]).unwrap();
    }
}

/// Prepares a snapshot of `vm` into `f` and takes its instant.
fn start(vm: &VmMemory, f: File) -> Result<Arc<LiveSnapshot>, SnapshotError> {
    let snap = LiveSnapshot::prepare(vm, f)?;
    snap.begin(vm, || {})?;
    Ok(snap)
}

fn image_page(f: &File, gpa: u64) -> [u8; 3] {
    let mut b = [0u8; 3];
    f.read_exact_at(&mut b, gpa).unwrap();
    b
}

fn assert_image_shows(f: &File, tag: u8) {
    for i in 0..N {
        assert_eq!(
            image_page(f, A + i * PAGE),
            [tag, i as u8, 0xcc],
            "page {i} of the image"
        );
    }
}

fn no_protection_left(vm: &VmMemory) {
    for i in 0..N {
        assert!(
            !vm.entry(A + i * PAGE).unwrap().wp(),
            "page {i} still protected"
        );
    }
}

#[test]
fn the_image_shows_memory_at_begin_while_writes_go_on() {
    let (ctx, vm) = setup();
    fill(&vm, 1);
    let f = image();
    let snap = start(&vm, f.try_clone().unwrap()).unwrap();
    // Half the pages are written before the copier gets to them.
    for i in (0..N).step_by(2) {
        vm.write(A + i * PAGE, &[2]).unwrap();
    }
    let report = snap.copy_rest(&vm, |_, _| {}).unwrap();
    assert_image_shows(&f, 1);
    assert_eq!(report.pages, N);
    assert_eq!(report.before_write, N / 2);
    assert_eq!(report.in_background, N / 2);
    assert_eq!(report.at_start, 0);
    // The writes landed; nothing is protected any more.
    let mut b = [0u8];
    vm.read(A, &mut b).unwrap();
    assert_eq!(b[0], 2);
    no_protection_left(&vm);
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn a_writer_racing_the_copier_never_leaks_into_the_image() {
    let (_ctx, vm) = setup();
    fill(&vm, 1);
    let f = image();
    let snap = LiveSnapshot::prepare(&vm, f.try_clone().unwrap()).unwrap();
    let (go, stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let writer = {
        let (vm, go, stop) = (vm.clone(), go.clone(), stop.clone());
        std::thread::spawn(move || {
            while !go.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
            let mut tag = 2u8;
            while !stop.load(Ordering::Relaxed) {
                for i in (0..N).rev() {
                    vm.write(A + i * PAGE, &[tag, 0xee, 0xee]).unwrap();
                }
                tag = tag.wrapping_add(1).max(2);
            }
        })
    };
    // The writer starts as soon as the instant is taken, racing the rest
    // of `begin` as well as the copier.
    snap.begin(&vm, || go.store(true, Ordering::Release))
        .unwrap();
    let report = snap.copy_rest(&vm, |_, _| {}).unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_image_shows(&f, 1);
    assert_eq!(report.before_write + report.in_background, N);
}

#[test]
fn swapped_and_migrated_pages_are_in_the_image() {
    let (ctx, vm) = setup();
    fill(&vm, 1);
    vm.swap_out(A, 16 * PAGE).unwrap();
    vm.migrate(A + 16 * PAGE, 16 * PAGE).unwrap();
    let f = image();
    let snap = start(&vm, f.try_clone().unwrap()).unwrap();
    // A swapped-out page written during the snapshot: swapped in, copied,
    // then written.
    vm.write(A + 3 * PAGE, &[9]).unwrap();
    vm.swap_out(A + 32 * PAGE, 8 * PAGE).unwrap();
    vm.migrate(A + 40 * PAGE, 8 * PAGE).unwrap();
    vm.write(A + 33 * PAGE, &[9]).unwrap();
    snap.copy_rest(&vm, |_, _| {}).unwrap();
    assert_image_shows(&f, 1);
    no_protection_left(&vm);
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn a_page_a_device_may_write_is_copied_at_the_start() {
    let (_ctx, vm) = setup();
    fill(&vm, 1);
    let pin = vm.pin(A, PAGE, RW).unwrap();
    let f = image();
    let snap = start(&vm, f.try_clone().unwrap()).unwrap();
    // The device writes without any fault the listener could hear.
    pin.write(0, &[7, 7, 7]).unwrap();
    let report = snap.copy_rest(&vm, |_, _| {}).unwrap();
    assert_image_shows(&f, 1);
    assert_eq!(report.at_start, 1);
    drop(pin);
}

#[test]
fn a_device_pin_taken_during_the_snapshot_is_heard() {
    let (_ctx, vm) = setup();
    fill(&vm, 1);
    let f = image();
    let snap = start(&vm, f.try_clone().unwrap()).unwrap();
    let pin = vm.pin(A + 5 * PAGE, PAGE, RW).unwrap();
    pin.write(0, &[7, 7, 7]).unwrap();
    let report = snap.copy_rest(&vm, |_, _| {}).unwrap();
    assert_image_shows(&f, 1);
    assert_eq!(report.before_write, 1);
}

#[test]
fn a_discard_during_the_snapshot_keeps_the_old_contents_in_the_image() {
    let (ctx, vm) = setup();
    fill(&vm, 1);
    let f = image();
    let snap = start(&vm, f.try_clone().unwrap()).unwrap();
    vm.discard(A + 8 * PAGE, 8 * PAGE).unwrap();
    snap.copy_rest(&vm, |_, _| {}).unwrap();
    assert_image_shows(&f, 1);
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn absent_pages_and_zeros_are_holes_and_later_touches_stay_out() {
    let (_ctx, vm) = setup();
    vm.write(A, &[1]).unwrap();
    vm.write(A + PAGE, &[0]).unwrap();
    let f = image();
    let snap = start(&vm, f.try_clone().unwrap()).unwrap();
    // First touches after the instant are not in the image.
    vm.write(A + 2 * PAGE, &[5]).unwrap();
    let report = snap.copy_rest(&vm, |_, _| {}).unwrap();
    assert_eq!(report.pages, 2);
    assert_eq!(report.zero, 1);
    assert_eq!(f.metadata().unwrap().len(), 8 << 20, "as long as RAM");
    assert_eq!(image_page(&f, A)[0], 1);
    assert_eq!(image_page(&f, A + 2 * PAGE)[0], 0);
}

#[test]
fn forking_during_the_snapshot_leaves_the_image_alone() {
    let (ctx, vm) = setup();
    fill(&vm, 1);
    let f = image();
    let snap = start(&vm, f.try_clone().unwrap()).unwrap();
    let child = vm.fork().unwrap();
    child.write(A, &[4]).unwrap();
    vm.write(A + PAGE, &[5]).unwrap();
    assert!(!child.entry(A + 2 * PAGE).unwrap().wp(), "inherited");
    snap.copy_rest(&vm, |_, _| {}).unwrap();
    assert_image_shows(&f, 1);
    audit(&ctx, &[&vm, &child]).unwrap();
}

#[test]
fn protection_held_by_the_guest_and_a_second_snapshot_are_refused() {
    let (_ctx, vm) = setup();
    fill(&vm, 1);
    vm.protect_for_listener(A, PAGE, true).unwrap();
    let refused = start(&vm, image()).unwrap_err();
    assert!(matches!(refused, SnapshotError::Busy(_)), "{refused:?}");
    // Refusing gave back the pages it had protected, not the guest's.
    assert!(vm.entry(A).unwrap().wp());
    assert!(!vm.entry(A + PAGE).unwrap().wp());
    vm.protect_for_listener(A, PAGE, false).unwrap();

    let snap = start(&vm, image()).unwrap();
    assert!(matches!(start(&vm, image()), Err(SnapshotError::Busy(_))));
    assert!(matches!(
        vm.protect_for_listener(A, PAGE, true),
        Err(MemError::Busy(_))
    ));
    snap.copy_rest(&vm, |_, _| {}).unwrap();
    vm.protect_for_listener(A, PAGE, true).unwrap();
}

#[test]
fn a_read_pin_that_unshares_a_page_keeps_it_protected() {
    let (_ctx, vm) = setup();
    fill(&vm, 1);
    let child = vm.fork().unwrap();
    let f = image();
    let snap = start(&vm, f.try_clone().unwrap()).unwrap();
    // The frame is shared with the child: the pin copies it (R9).
    let pin = vm.pin(A, PAGE, common::RO).unwrap();
    vm.write(A, &[3]).unwrap();
    snap.copy_rest(&vm, |_, _| {}).unwrap();
    assert_image_shows(&f, 1);
    drop((pin, child));
}

#[test]
fn a_stop_the_world_copy_has_every_page() {
    let (_ctx, vm) = setup();
    fill(&vm, 1);
    vm.swap_out(A, 4 * PAGE).unwrap();
    let f = image();
    let report = LiveSnapshot::copy_stopped(&vm, f.try_clone().unwrap(), |_, _| {}).unwrap();
    assert_image_shows(&f, 1);
    assert_eq!(report.pages, N);
    assert_eq!(report.in_background, N);
}
