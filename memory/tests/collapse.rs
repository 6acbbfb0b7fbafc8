//! Collapse (the COLLAPSE call): 512 small entries become one huge entry
//! over a new exclusive frame, and MEMORY-MODEL.md's scenario 10 holds:
//! collapsed before or after a fork, fully or half shared, the parent's
//! writes never reach the child. Refused, leaving everything as it was,
//! while a page is pinned, write-protected or marked. Runs without huge
//! first touches (small pages are what collapses), and once with them.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use common::{PAGE, RO, RW, byte, info};
use memory::{
    Access, Collapse, CollapseRefusal, Context, Entry, Layout, MemError, VmMemory, audit,
};

/// A 2 MiB-aligned address: the second huge block of the test VM.
const H: u64 = 0x20_0000;
/// Bytes in a huge block.
const HUGE: u64 = 2 << 20;
/// Pages in a huge block.
const N: u64 = HUGE / PAGE;

/// The tests' 8 MiB VM, on huge mappings if `huge`.
fn setup(huge: bool) -> (Arc<Context>, Arc<VmMemory>) {
    if huge {
        common::setup_huge()
    } else {
        common::setup()
    }
}

fn check(ctx: &Context, vms: &[&VmMemory]) {
    audit(ctx, vms).unwrap_or_else(|e| panic!("audit: {e}"));
}

/// Writes a distinct byte into every `step`-th page of the block at `H`.
fn fill(vm: &VmMemory, base: u8, step: u64) {
    for i in (0..N).step_by(step as usize) {
        vm.write(H + i * PAGE, &[base.wrapping_add(i as u8)])
            .unwrap();
    }
}

/// Checks what `fill(vm, base, step)` wrote, zeros elsewhere.
fn assert_filled(vm: &VmMemory, base: u8, step: u64) {
    for i in 0..N {
        let want = if i % step == 0 {
            base.wrapping_add(i as u8)
        } else {
            0
        };
        assert_eq!(byte(vm, H + i * PAGE), want, "page {i} of the block");
    }
}

/// Audits `vms`, drops them, and checks that no frame leaked.
fn finish(ctx: &Context, vms: Vec<Arc<VmMemory>>) {
    let refs: Vec<&VmMemory> = vms.iter().map(|v| v.as_ref()).collect();
    check(ctx, &refs);
    drop(refs);
    drop(vms);
    assert_eq!(ctx.stats().resident, 0, "a frame leaked");
}

fn collapsed(vm: &VmMemory) -> u64 {
    match vm.collapse(H).unwrap() {
        Collapse::Done { copied, .. } => copied,
        other => panic!("not collapsed: {other:?}"),
    }
}

#[test]
fn small_pages_become_one_huge_frame_and_split_again() {
    let (ctx, vm) = setup(false);
    fill(&vm, 1, 2);
    assert!(!info(&vm, H).huge);
    assert_eq!(ctx.stats().resident, N / 2);
    assert_eq!(collapsed(&vm), N / 2);
    let i = info(&vm, H + 7 * PAGE);
    assert!(i.huge && i.exclusive, "{i:?}");
    assert_eq!((i.refcount, i.mapcount, i.pincount), (1, 1, 0));
    assert_filled(&vm, 1, 2);
    let s = ctx.stats();
    assert_eq!((s.collapses, s.resident), (1, N), "old frames not freed");
    assert!(!vm.would_fault(H + 3 * PAGE, Access::Write));
    check(&ctx, &[&vm]);
    assert_eq!(vm.collapse(H).unwrap(), Collapse::AlreadyHuge);
    // A split (here by a discard) gets small entries back, over the
    // same frame, from the table kept at the collapse.
    vm.discard(H + PAGE, PAGE).unwrap();
    assert!(!info(&vm, H).huge);
    assert_eq!(ctx.stats().huge_splits, 1);
    assert_filled(&vm, 1, 2);
    check(&ctx, &[&vm]);
    // And collapses again.
    vm.write(H + 9 * PAGE, &[0x99]).unwrap();
    assert_eq!(collapsed(&vm), N - 1);
    assert_eq!(byte(&vm, H + 9 * PAGE), 0x99);
    assert_eq!(byte(&vm, H + PAGE), 0);
    check(&ctx, &[&vm]);
    drop(vm);
    assert_eq!(ctx.stats().resident, 0, "a frame leaked");
}

#[test]
fn an_empty_block_collapses_to_zeros_and_a_split_huge_one_collapses_back() {
    let (ctx, vm) = setup(false);
    assert_eq!(collapsed(&vm), 0);
    assert!(info(&vm, H).huge);
    assert_eq!(byte(&vm, H + HUGE - 1), 0);
    check(&ctx, &[&vm]);
    // With huge first touches: a split entry collapses again.
    let (ctx, vm) = setup(true);
    fill(&vm, 3, 1);
    assert!(info(&vm, H).huge);
    vm.write_protect(H + 5 * PAGE, PAGE).unwrap();
    assert!(!info(&vm, H).huge, "write_protect of one page splits");
    assert_eq!(collapsed(&vm), N);
    assert_filled(&vm, 3, 1);
    check(&ctx, &[&vm]);
}

#[test]
fn s10_collapse_before_fork() {
    let (ctx, p) = setup(false);
    fill(&p, 1, 1);
    collapsed(&p);
    let c = p.fork().unwrap();
    assert!(info(&c, H).huge && !info(&p, H).exclusive);
    p.write(H + 4 * PAGE, &[0xee]).unwrap();
    assert_eq!(
        byte(&c, H + 4 * PAGE),
        5,
        "the child saw the parent's write"
    );
    assert_filled(&c, 1, 1);
    finish(&ctx, vec![p, c]);
}

#[test]
fn s10_collapse_after_fork_fully_shared() {
    let (ctx, p) = setup(false);
    fill(&p, 1, 1);
    let c = p.fork().unwrap();
    assert_eq!(ctx.stats().shared, N);
    assert_eq!(collapsed(&p), N);
    // The parent's block is a new frame; the child keeps the old ones.
    assert_eq!(ctx.stats().shared, 0);
    assert_eq!(ctx.stats().resident, 2 * N);
    for i in 0..N {
        p.write(H + i * PAGE, &[0xa0]).unwrap();
    }
    assert_filled(&c, 1, 1);
    assert_eq!(ctx.stats().copied, 0, "the parent's writes copied");
    // The child's frames are its alone now: its writes reuse them.
    c.write(H, &[0xc0]).unwrap();
    assert_eq!(byte(&p, H), 0xa0);
    assert_eq!(ctx.stats().copied, 0);
    finish(&ctx, vec![p, c]);
}

#[test]
fn s10_collapse_after_fork_half_shared_in_both() {
    let (ctx, p) = setup(false);
    fill(&p, 1, 1);
    let c = p.fork().unwrap();
    // The child copies every other page: half the block stays shared.
    for i in (0..N).step_by(2) {
        c.write(H + i * PAGE + 1, &[0xcc]).unwrap();
    }
    assert_eq!(ctx.stats().shared, N / 2);
    assert_eq!(collapsed(&p), N);
    p.write(H + PAGE, &[0xee]).unwrap();
    p.write(H + 2 * PAGE, &[0xee]).unwrap();
    assert_filled(&c, 1, 1);
    assert_eq!(byte(&c, H + 2 * PAGE + 1), 0xcc);
    assert_eq!(
        byte(&p, H + 2 * PAGE + 1),
        0,
        "the parent saw the child's write"
    );
    // The child collapses too: its own pages and the ones the parent left.
    assert_eq!(collapsed(&c), N);
    c.write(H + 3 * PAGE, &[0x33]).unwrap();
    assert_eq!(byte(&p, H + 3 * PAGE), 4);
    assert_eq!(byte(&p, H + PAGE), 0xee);
    assert_eq!(byte(&c, H + PAGE), 2);
    assert_eq!(ctx.stats().shared, 0);
    finish(&ctx, vec![p, c]);
}

#[test]
fn refused_while_a_page_is_pinned_read_or_write() {
    let (ctx, vm) = setup(false);
    fill(&vm, 1, 1);
    for flags in [RO, RW] {
        let pin = vm.pin(H + 100 * PAGE, 1, flags).unwrap();
        assert_eq!(
            vm.collapse(H).unwrap(),
            Collapse::Refused(CollapseRefusal::Pinned)
        );
        assert!(!info(&vm, H).huge);
        // Still coherent: the guest's write reaches the pinned frame.
        vm.write(H + 100 * PAGE, &[0x42]).unwrap();
        let mut b = [0u8];
        pin.read(0, &mut b).unwrap();
        assert_eq!(b, [0x42]);
        check(&ctx, &[&vm]);
        drop(pin);
        vm.write(H + 100 * PAGE, &[101]).unwrap();
    }
    assert_eq!(collapsed(&vm), N);
    assert_filled(&vm, 1, 1);
    assert_eq!(ctx.stats().collapses, 1);
}

#[test]
fn refused_while_write_protected_or_marked() {
    let (ctx, vm) = setup(false);
    fill(&vm, 1, 1);
    vm.protect_for_listener(H + 8 * PAGE, PAGE, true).unwrap();
    assert_eq!(
        vm.collapse(H).unwrap(),
        Collapse::Refused(CollapseRefusal::WriteProtected)
    );
    vm.discard(H + 8 * PAGE, PAGE).unwrap();
    assert_eq!(
        vm.entry(H + 8 * PAGE),
        Some(Entry::Marker { wp: true }),
        "the protection outlives the page"
    );
    assert_eq!(
        vm.collapse(H).unwrap(),
        Collapse::Refused(CollapseRefusal::Marked)
    );
    vm.protect_for_listener(H + 8 * PAGE, PAGE, false).unwrap();
    assert_eq!(collapsed(&vm), N - 1);
    check(&ctx, &[&vm]);
    // A read-only entry (mprotect-like) is no protection: it collapses,
    // and the new exclusive frame is writable. (The split by the discard
    // maps all 512 pages again, page 8 too.)
    vm.discard(H + PAGE, PAGE).unwrap();
    vm.write_protect(H, HUGE).unwrap();
    assert_eq!(collapsed(&vm), N - 1);
    assert!(!vm.would_fault(H, Access::Write));
    check(&ctx, &[&vm]);
}

#[test]
fn pages_in_swap_are_brought_in_first() {
    let (ctx, vm) = setup(false);
    fill(&vm, 1, 1);
    let r = vm.swap_out(H + 16 * PAGE, 32 * PAGE).unwrap();
    assert_eq!(r.swapped, 32);
    assert_eq!(collapsed(&vm), N);
    assert_filled(&vm, 1, 1);
    assert_eq!(ctx.stats().swapped, 0);
    check(&ctx, &[&vm]);
}

#[test]
fn bad_addresses_and_limits_are_refused_cleanly() {
    let (ctx, vm) = setup(false);
    assert!(matches!(
        vm.collapse(H + PAGE),
        Err(MemError::Unaligned { .. })
    ));
    assert!(matches!(vm.collapse(8 << 20), Err(MemError::NotRam { .. })));
    assert!(matches!(
        vm.collapse(!(HUGE - 1)),
        Err(MemError::NotRam { .. })
    ));
    // A block straddling the end of RAM.
    let odd = VmMemory::new(&ctx, Layout::new(&[(0, 3 << 20)]).unwrap()).unwrap();
    assert!(matches!(odd.collapse(H), Err(MemError::NotRam { .. })));
    vm.set_resident_limit(Some(1000));
    assert_eq!(
        vm.collapse(H).unwrap(),
        Collapse::Refused(CollapseRefusal::ResidentLimit)
    );
    check(&ctx, &[&vm, &odd]);
}

/// Lockless pins and guest writes race collapses and splits of the same
/// block: every pin stays coherent with what the VM reads, nothing leaks.
/// Runs until 50 collapses went through (a pin held refuses one) and at
/// least 20,000 pins were checked.
#[test]
fn pins_racing_collapses_stay_coherent() {
    let (ctx, vm) = setup(false);
    fill(&vm, 1, 1);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU32::new(0));
    let collapser = {
        let (vm, stop, done) = (vm.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Collapse::Done { .. } = vm.collapse(H).unwrap() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                vm.discard(H + 200 * PAGE, PAGE).unwrap();
            }
        })
    };
    let start = std::time::Instant::now();
    let mut round = 0u64;
    while round < 20_000 || done.load(Ordering::Relaxed) < 50 {
        assert!(
            start.elapsed().as_secs() < 60,
            "only {} collapses in 60 s",
            done.load(Ordering::Relaxed)
        );
        round += 1;
        // Page 200 is the collapser's to discard (which splits the
        // block); a discard of a pinned page leaves the pin on the old
        // frame.
        if round * 37 % N == 200 {
            continue;
        }
        let page = H + (round * 37 % N) * PAGE;
        let v = round as u8;
        let pin = vm.pin(page, 16, RW).unwrap();
        pin.write(8, &[v]).unwrap();
        assert_eq!(
            byte(&vm, page + 8),
            v,
            "round {round}: the pin missed the VM's frame"
        );
        vm.write(page + 9, &[v ^ 0xff]).unwrap();
        let mut b = [0u8];
        pin.read(9, &mut b).unwrap();
        assert_eq!(
            b[0],
            v ^ 0xff,
            "round {round}: the VM's write missed the pin"
        );
        drop(pin);
        if round % 64 == 0 {
            std::thread::yield_now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    collapser.join().unwrap();
    check(&ctx, &[&vm]);
    drop(vm);
    assert_eq!(ctx.stats().resident, 0);
}
