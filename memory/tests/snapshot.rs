//! Live snapshots: the image shows memory as it was at `begin`, whatever
//! the VM, its devices, swap and migration do while it is written.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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

/// Writes `[tag, i, 0xcc]` to page `i` of the range at `A`.
fn put(vm: &VmMemory, i: u64, tag: u8) {
    vm.write(A + i * PAGE, &[tag, i as u8, 0xcc]).unwrap();
}

/// Checks that page `i` of the image shows `tags[i]` (0: a hole).
fn assert_image_tags(f: &File, tags: &[u8]) {
    for (i, &tag) in tags.iter().enumerate() {
        let want = if tag == 0 {
            [0, 0, 0]
        } else {
            [tag, i as u8, 0xcc]
        };
        assert_eq!(
            image_page(f, A + i as u64 * PAGE),
            want,
            "page {i} of the image"
        );
    }
}

#[test]
fn the_pause_looks_only_at_pages_changed_since_arming() {
    let (ctx, vm) = setup();
    fill(&vm, 1);
    // Nothing changed between arming and the instant: the pause looks at
    // no entry at all, however much memory has contents.
    let snap = LiveSnapshot::prepare(&vm, image()).unwrap();
    snap.begin(&vm, || {}).unwrap();
    let report = snap.copy_rest(&vm, |_, _| {}).unwrap();
    assert_eq!((report.pages, report.paused_visits), (N, 0));

    // Three pages written after arming: the pause looks at those three,
    // and the image holds what they held at the instant.
    let f = image();
    let snap = LiveSnapshot::prepare(&vm, f.try_clone().unwrap()).unwrap();
    let mut tags = vec![1u8; N as usize];
    for i in [0, 5, 9] {
        put(&vm, i, 2);
        tags[i as usize] = 2;
    }
    snap.begin(&vm, || {}).unwrap();
    for i in 0..N {
        put(&vm, i, 3);
    }
    let report = snap.copy_rest(&vm, |_, _| {}).unwrap();
    assert_eq!(report.paused_visits, 3);
    assert_image_tags(&f, &tags);
    no_protection_left(&vm);
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn every_change_between_arming_and_the_instant_is_in_the_image() {
    let (ctx, vm) = setup();
    fill(&vm, 1);
    let early = vm.pin(A + 20 * PAGE, PAGE, RW).unwrap();
    let f = image();
    let snap = LiveSnapshot::prepare(&vm, f.try_clone().unwrap()).unwrap();
    let mut tags = vec![1u8; N as usize];
    // Discarded: a hole; discarded then written again: the new contents.
    vm.discard(A + 10 * PAGE, 3 * PAGE).unwrap();
    tags[10..13].fill(0);
    vm.discard(A + 14 * PAGE, PAGE).unwrap();
    put(&vm, 14, 2);
    tags[14] = 2;
    // Written, then swapped out or moved.
    put(&vm, 15, 2);
    vm.swap_out(A + 15 * PAGE, PAGE).unwrap();
    put(&vm, 16, 2);
    vm.migrate(A + 16 * PAGE, PAGE).unwrap();
    tags[15..17].fill(2);
    // A device writes through a pin taken before arming, and through one
    // taken after.
    early.write(0, &[2]).unwrap();
    tags[20] = 2;
    let late = vm.pin(A + 30 * PAGE, PAGE, RW).unwrap();
    late.write(0, &[2]).unwrap();
    tags[30] = 2;
    // A page absent at arming and written before the instant.
    tags.push(4);
    put(&vm, N, 4);

    snap.begin(&vm, || {}).unwrap();
    // After the instant, nothing reaches the image.
    early.write(0, &[5]).unwrap();
    late.write(0, &[5]).unwrap();
    vm.discard(A + 40 * PAGE, PAGE).unwrap();
    for i in (0..=N).step_by(3) {
        put(&vm, i, 6);
    }
    put(&vm, N + 1, 6);
    tags.push(0);
    let report = snap.copy_rest(&vm, |_, _| {}).unwrap();
    assert_image_tags(&f, &tags);
    assert_eq!(report.pages, N - 3 + 1);
    assert_eq!(report.at_start, 2, "the two pinned pages");
    drop((early, late));
    no_protection_left(&vm);
    audit(&ctx, &[&vm]).unwrap();
}

#[test]
fn a_writer_paused_only_for_the_instant_leaves_its_last_writes_in_the_image() {
    // Racy by nature: a few rounds.
    for _ in 0..10 {
        writer_paused_for_the_instant();
    }
}

fn writer_paused_for_the_instant() {
    let (_ctx, vm) = setup();
    fill(&vm, 1);
    // The writer plays a vCPU: it writes all the time, across arming, and
    // stops between two writes only while the instant is taken.
    let pause = Arc::new(AtomicBool::new(false));
    let parked = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (vm, pause, parked, stop) = (vm.clone(), pause.clone(), parked.clone(), stop.clone());
        let writes = writes.clone();
        std::thread::spawn(move || {
            let mut last = vec![1u8; N as usize];
            let mut at_instant = None;
            let (mut i, mut step, mut tag) = (0u64, 1u64, 2u8);
            while !stop.load(Ordering::Relaxed) {
                if pause.load(Ordering::Acquire) {
                    at_instant = Some(last.clone());
                    parked.store(true, Ordering::Release);
                    while pause.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                    }
                    // Back over the pages written last before the
                    // instant, first.
                    step = N - 1;
                }
                put(&vm, i, tag);
                last[i as usize] = tag;
                writes.fetch_add(1, Ordering::Release);
                i = (i + step) % N;
                if i == 0 {
                    tag = tag.wrapping_add(1).max(2);
                }
            }
            at_instant.expect("the writer was paused once")
        })
    };
    // Some writes during arming, some between arming and the instant.
    let wait_writes = |n| {
        let from = writes.load(Ordering::Acquire);
        while writes.load(Ordering::Acquire) < from + n {
            std::hint::spin_loop();
        }
    };
    wait_writes(N);
    let f = image();
    let snap = LiveSnapshot::prepare(&vm, f.try_clone().unwrap()).unwrap();
    wait_writes(8);
    pause.store(true, Ordering::Release);
    while !parked.load(Ordering::Acquire) {
        std::hint::spin_loop();
    }
    snap.begin(&vm, || pause.store(false, Ordering::Release))
        .unwrap();
    let report = snap.copy_rest(&vm, |_, _| {}).unwrap();
    assert!(report.paused_visits >= 8, "{report:?}");
    stop.store(true, Ordering::Relaxed);
    let at_instant = writer.join().unwrap();
    assert_image_tags(&f, &at_instant);
}

#[test]
fn a_snapshot_given_up_before_its_instant_gives_every_page_back() {
    let (ctx, vm) = setup();
    fill(&vm, 1);
    let snap = LiveSnapshot::prepare(&vm, image()).unwrap();
    put(&vm, 3, 2);
    vm.discard(A + 4 * PAGE, PAGE).unwrap();
    snap.cancel(&vm).unwrap();
    no_protection_left(&vm);
    assert!(vm.entry(A + 4 * PAGE).unwrap() == memory::Entry::None);
    // The guest may protect pages again, and hears of its writes.
    vm.protect_for_listener(A, PAGE, true).unwrap();
    put(&vm, 0, 5);
    assert_eq!(vm.take_write_events(8), vec![A]);
    audit(&ctx, &[&vm]).unwrap();
}
