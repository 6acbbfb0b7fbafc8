//! Huge mappings at the memory level: a first touch maps a 2 MiB block
//! with one huge entry, and MEMORY-MODEL.md's acceptance scenarios 1-9 and
//! seed 003's stories hold on it; splitting (discard, write-protect,
//! swap-out of one page, a copy-on-write of one page) keeps every page's
//! contents and exclusivity; nothing leaks. Needs 2 MiB shmem pages on the
//! host (`scripts/setup` sets the knob): without them every test fails.

mod common;

use std::sync::Arc;

use common::{PAGE, RO, RW, byte};
use memory::{Access, Context, FrameInfo, VmMemory, audit};

/// A 2 MiB-aligned address: the second huge block of the test VM.
const H: u64 = 0x20_0000;
/// Bytes in a huge block.
const HUGE: u64 = 2 << 20;
/// Pages in a huge block.
const N: u64 = HUGE / PAGE;

fn setup() -> (Arc<Context>, Arc<VmMemory>) {
    common::setup_huge()
}

fn info(vm: &VmMemory, gpa: u64) -> FrameInfo {
    vm.frame_info(gpa).expect("page present")
}

fn check(ctx: &Context, vms: &[&VmMemory]) {
    audit(ctx, vms).unwrap_or_else(|e| panic!("audit: {e}"));
}

/// Writes a distinct byte into every page of the block at `H`.
fn fill(vm: &VmMemory, base: u8) {
    for i in 0..N {
        vm.write(H + i * PAGE, &[base.wrapping_add(i as u8)])
            .unwrap();
    }
}

fn assert_filled(vm: &VmMemory, base: u8, except: &[u64]) {
    for i in (0..N).filter(|i| !except.contains(i)) {
        assert_eq!(
            byte(vm, H + i * PAGE),
            base.wrapping_add(i as u8),
            "page {i} of the block"
        );
    }
}

#[test]
fn a_first_touch_maps_the_block_with_one_huge_frame() {
    let (ctx, vm) = setup();
    vm.write(H + 5 * PAGE + 7, &[1]).unwrap();
    let i = info(&vm, H);
    assert!(i.huge && i.exclusive, "{i:?}");
    assert_eq!((i.refcount, i.mapcount, i.pincount), (1, 1, 0));
    assert!(!vm.would_fault(H + HUGE - 1, Access::Write));
    let s = ctx.stats();
    assert_eq!((s.huge_maps, s.resident, s.first_touch), (1, N, 1));
    // The block below it is not RAM-aligned work: page 0 is its own block,
    // also mapped huge on first touch; a block straddling the end of RAM
    // is not (here RAM ends on a block boundary, so every block is whole).
    vm.write(0x1000, &[2]).unwrap();
    assert!(info(&vm, 0x1000).huge);
    check(&ctx, &[&vm]);
    drop(vm);
    assert_eq!(ctx.stats().resident, 0, "a huge frame leaked");
}

/// The kB of 2 MiB host pages mapped in the host area holding `addr`.
fn pmd_mapped_kb(addr: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    let mut kb = 0;
    for line in smaps.lines() {
        let head = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = head.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                inside = (a..b).contains(&addr);
                continue;
            }
        }
        if inside && (line.starts_with("ShmemPmdMapped:") || line.starts_with("FilePmdMapped:")) {
            kb += line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    kb
}

#[test]
fn the_host_backs_the_block_with_a_2m_page() {
    let (_ctx, vm) = setup();
    fill(&vm, 1);
    // What KVM sees: the VM's host mapping of the block, read through.
    let (gpa, _, host) = vm.host_ranges()[0];
    assert_eq!(gpa, 0);
    let addr = host + H;
    assert_eq!(addr % HUGE, 0, "host mapping not 2 MiB aligned");
    // SAFETY: the block is present and readable in the host mapping, and
    // stays so while `vm` lives.
    let first = unsafe { std::ptr::read_volatile(addr as *const u8) };
    assert_eq!(first, 1);
    let pmd = pmd_mapped_kb(addr);
    assert!(
        pmd >= 2048,
        "no 2 MiB host page maps the block ({pmd} kB PMD-mapped in its area)"
    );
}

#[test]
fn s1_basic_cow_after_fork_copies_one_page() {
    let (ctx, p) = setup();
    fill(&p, 1);
    let c = p.fork().unwrap();
    let i = info(&p, H);
    assert!(
        i.huge && !i.exclusive && i.mapcount == 2 && i.refcount == 2,
        "{i:?}"
    );
    assert!(info(&c, H).huge);
    assert_eq!(ctx.stats().shared, N);
    check(&ctx, &[&p, &c]);
    p.write(H + 3 * PAGE, &[0xee]).unwrap();
    assert_eq!(byte(&c, H + 3 * PAGE), 4, "child saw the parent's write");
    assert_eq!(byte(&p, H + 3 * PAGE), 0xee);
    assert!(!info(&p, H).huge, "the parent's entry was not split");
    assert!(info(&c, H).huge, "the child's entry was split");
    assert!(info(&p, H + 3 * PAGE).exclusive);
    assert_eq!(ctx.stats().copied, 1, "one 4 KiB copy");
    assert_eq!(ctx.stats().huge_splits, 1);
    assert_filled(&p, 1, &[3]);
    assert_filled(&c, 1, &[]);
    check(&ctx, &[&p, &c]);
    // The child alone maps the rest of it huge; its write reuses nothing
    // the parent still maps.
    c.write(H + 4 * PAGE, &[0xcc]).unwrap();
    assert_eq!(byte(&p, H + 4 * PAGE), 5);
    check(&ctx, &[&p, &c]);
    drop(c);
    check(&ctx, &[&p]);
    drop(p);
    assert_eq!(ctx.stats().resident, 0);
}

#[test]
fn s1_a_sole_reference_is_reused_whole() {
    let (ctx, p) = setup();
    fill(&p, 1);
    drop(p.fork().unwrap());
    assert!(!info(&p, H).exclusive);
    p.write(H, &[9]).unwrap();
    let i = info(&p, H);
    assert!(i.huge && i.exclusive, "{i:?}");
    assert_eq!(ctx.stats().copied, 0);
    check(&ctx, &[&p]);
}

#[test]
fn s2_read_only_then_writable_again_does_not_make_shared_frames_writable() {
    let (ctx, p) = setup();
    fill(&p, 1);
    let c = p.fork().unwrap();
    p.write_protect(H, PAGE).unwrap();
    assert_eq!(
        p.unprotect(H, PAGE).unwrap(),
        0,
        "a shared frame became writable"
    );
    assert!(p.would_fault(H, Access::Write));
    p.write(H, &[2]).unwrap();
    assert_eq!(byte(&c, H), 1);
    check(&ctx, &[&p, &c]);
}

#[test]
fn s3_child_read_pin_survives_the_parents_write() {
    let (ctx, p) = setup();
    fill(&p, 1);
    let c = p.fork().unwrap();
    let pin = c.pin(H + PAGE, 1, RO).unwrap();
    c.discard(H, HUGE).unwrap();
    p.write(H + PAGE, &[0x77]).unwrap();
    let mut b = [0u8];
    pin.read(0, &mut b).unwrap();
    assert_eq!(b, [2], "child's pin saw the parent's later write");
    check(&ctx, &[&p, &c]);
}

#[test]
fn s4_parent_pin_before_and_after_fork() {
    for pin_before in [true, false] {
        let (ctx, p) = setup();
        fill(&p, 1);
        let (pin, c) = if pin_before {
            let pin = p.pin(H, 1, RO).unwrap();
            let c = p.fork().unwrap();
            assert_ne!(
                p.frame_mappers(H),
                c.frame_mappers(H),
                "pinned frame shared"
            );
            (pin, c)
        } else {
            let c = p.fork().unwrap();
            (p.pin(H, 1, RO).unwrap(), c)
        };
        p.discard(H, HUGE).unwrap();
        c.write(H, &[9]).unwrap();
        let mut b = [0u8];
        pin.read(0, &mut b).unwrap();
        assert_eq!(
            b,
            [1],
            "parent's pin saw the child's write (before: {pin_before})"
        );
        check(&ctx, &[&p, &c]);
    }
}

#[test]
fn s5_rw_pin_then_read_only_then_guest_write() {
    let (ctx, p) = setup();
    fill(&p, 1);
    let pin = p.pin(H, PAGE, RW).unwrap();
    p.write_protect(H, PAGE).unwrap();
    p.write(H, &[7]).unwrap();
    let mut b = [0u8];
    pin.read(0, &mut b).unwrap();
    assert_eq!(b, [7], "device does not see the guest's write");
    assert_eq!(ctx.stats().copied, 0, "pinned frame copied");
    check(&ctx, &[&p]);
}

#[test]
fn s6_rw_pin_then_fork_copies_the_block_for_the_child() {
    let (ctx, p) = setup();
    fill(&p, 1);
    let pin = p.pin(H + PAGE, PAGE, RW).unwrap();
    let c = p.fork().unwrap();
    let (pi, ci) = (info(&p, H), info(&c, H));
    assert!(pi.huge && pi.exclusive && pi.mapcount == 1, "{pi:?}");
    assert!(ci.huge && ci.exclusive && ci.mapcount == 1, "{ci:?}");
    assert!(
        !p.would_fault(H + PAGE, Access::Write),
        "pinned parent page lost write access"
    );
    p.write(H + PAGE, &[5]).unwrap();
    let mut b = [0u8];
    pin.read(0, &mut b).unwrap();
    assert_eq!(b, [5]);
    assert_eq!(byte(&c, H + PAGE), 2);
    pin.write(1, &[6]).unwrap();
    assert_eq!(byte(&p, H + PAGE + 1), 6);
    assert_eq!(byte(&c, H + PAGE + 1), 0, "device write reached the child");
    assert_filled(&c, 1, &[]);
    assert_eq!(
        ctx.stats().copied,
        N,
        "exactly the fork-time copy of the block"
    );
    check(&ctx, &[&p, &c]);
    drop((pin, c, p));
    assert_eq!(ctx.stats().resident, 0);
}

#[test]
fn s7_read_pin_on_shared_frame_unshares() {
    let (ctx, p) = setup();
    fill(&p, 1);
    let c = p.fork().unwrap();
    let pin = p.pin(H, 1, RO).unwrap();
    assert!(info(&p, H).exclusive);
    assert_eq!(
        ctx.stats().copied,
        1,
        "unshare did not copy a page the child maps"
    );
    p.write(H, &[3]).unwrap();
    let mut b = [0u8];
    pin.read(0, &mut b).unwrap();
    assert_eq!(b, [3], "pin does not see the parent's write");
    assert_eq!(byte(&c, H), 1);
    check(&ctx, &[&p, &c]);
}

#[test]
fn s8_unshare_reuses_a_frame_whose_sharer_is_gone() {
    let (ctx, p) = setup();
    fill(&p, 1);
    drop(p.fork().unwrap());
    assert!(!info(&p, H).exclusive);
    let pin = p.pin(H, 1, RO).unwrap();
    assert_eq!(
        ctx.stats().copied,
        0,
        "unshare copied a sole-reference frame"
    );
    assert!(info(&p, H).huge);
    p.write(H, &[4]).unwrap();
    let mut b = [0u8];
    pin.read(0, &mut b).unwrap();
    assert_eq!(b, [4]);
    check(&ctx, &[&p]);
}

#[test]
fn s9_read_pin_on_exclusive_frame() {
    let (ctx, p) = setup();
    fill(&p, 1);
    let pin = p.pin(H + 9 * PAGE, 1, RO).unwrap();
    p.write(H + 9 * PAGE, &[8]).unwrap();
    let mut b = [0u8];
    pin.read(0, &mut b).unwrap();
    assert_eq!((b, ctx.stats().copied), ([8], 0));
    assert_eq!(info(&p, H).pincount, 1);
    check(&ctx, &[&p]);
}

#[test]
fn story_vmsplice_child_cannot_read_the_parents_secret() {
    let (ctx, p) = setup();
    p.write(H, b"Boring Data").unwrap();
    let c = p.fork().unwrap();
    let pin = c.pin(H, 11, RO).unwrap();
    c.discard(H, HUGE).unwrap();
    p.write(H, b"Secret Data").unwrap();
    let mut b = [0u8; 11];
    pin.read(0, &mut b).unwrap();
    assert_eq!(&b, b"Boring Data");
    check(&ctx, &[&p, &c]);
}

#[test]
fn splits_keep_every_page_and_free_the_frame_with_its_last_page() {
    let (ctx, p) = setup();
    fill(&p, 1);
    // A discard of one page splits the entry; the others keep their data.
    assert_eq!(p.discard(H + 2 * PAGE, PAGE).unwrap(), 1);
    assert!(!info(&p, H).huge);
    assert_eq!(byte(&p, H + 2 * PAGE), 0);
    assert_filled(&p, 1, &[2]);
    // Every page stays exclusive and writable after the split (I.6 b).
    assert!(info(&p, H + 100 * PAGE).exclusive);
    assert!(!p.would_fault(H + 100 * PAGE, Access::Write));
    check(&ctx, &[&p]);
    // The frame lives while any page maps it, and goes whole.
    let before = ctx.stats().resident;
    p.discard(H, HUGE).unwrap();
    assert_eq!(ctx.stats().resident, before - N);
    check(&ctx, &[&p]);
}

#[test]
fn write_protect_and_swap_out_of_one_page_split() {
    let (ctx, p) = setup();
    fill(&p, 1);
    assert_eq!(p.write_protect(H + PAGE, PAGE).unwrap(), 1);
    assert!(p.would_fault(H + PAGE, Access::Write));
    assert!(!p.would_fault(H, Access::Write));
    let r = p.swap_out(H + 3 * PAGE, PAGE).unwrap();
    assert_eq!((r.swapped, r.pinned), (1, 0));
    check(&ctx, &[&p]);
    assert_filled(&p, 1, &[]);
    assert_eq!(ctx.stats().swap_ins, 1);
    p.write(H + PAGE, &[0x55]).unwrap();
    assert_eq!(byte(&p, H + PAGE), 0x55);
    check(&ctx, &[&p]);
}

#[test]
fn many_forks_and_writes_leak_nothing() {
    let (ctx, p) = setup();
    fill(&p, 1);
    p.write(H + HUGE, &[1]).unwrap();
    let mut vms = vec![p.clone()];
    for round in 0..4u8 {
        let c = vms[round as usize % vms.len()].fork().unwrap();
        c.write(H + u64::from(round) * 7 * PAGE, &[round]).unwrap();
        if round % 2 == 1 {
            c.discard(H + HUGE, HUGE).unwrap();
        }
        vms.push(c);
        let refs: Vec<&VmMemory> = vms.iter().map(|v| v.as_ref()).collect();
        check(&ctx, &refs);
    }
    drop(vms);
    drop(p);
    assert_eq!(ctx.stats().resident, 0);
    assert_eq!(ctx.stats().shared, 0);
}

#[test]
fn a_page_the_other_vm_copied_away_is_reused_not_copied() {
    let (ctx, p) = setup();
    fill(&p, 1);
    let c = p.fork().unwrap();
    p.write(H + 3 * PAGE, &[0xee]).unwrap();
    assert_eq!(ctx.stats().copied, 1);
    // Page 3 of the huge frame is now mapped by the child's huge entry
    // alone: its write splits that entry and reuses the page.
    c.write(H + 3 * PAGE, &[0xcc]).unwrap();
    assert_eq!(
        ctx.stats().copied,
        1,
        "the child copied a page only it maps"
    );
    let i = info(&c, H + 3 * PAGE);
    assert!(!i.huge && i.exclusive, "{i:?}");
    // A page both still map is copied.
    c.write(H + 4 * PAGE, &[0xcc]).unwrap();
    assert_eq!(ctx.stats().copied, 2);
    assert_eq!((byte(&p, H + 3 * PAGE), byte(&p, H + 4 * PAGE)), (0xee, 5));
    check(&ctx, &[&p, &c]);
    drop((c, p));
    assert_eq!(ctx.stats().resident, 0);
}

/// The three choices of what a vCPU's write to a shared huge block copies
/// (`VmMemory::fault`, as a write exit resolves it): the page, the block,
/// or the page and then, on the next write fault in that block, the block.
#[test]
fn a_write_fault_on_a_shared_block_copies_as_configured() {
    use memory::HugeCow;
    for cow in [HugeCow::Page, HugeCow::Block, HugeCow::Adaptive] {
        let (ctx, p) = common::setup_huge_cow(cow);
        fill(&p, 1);
        let c = p.fork().unwrap();
        assert!(c.fault(H + 2 * PAGE, Access::Write).unwrap());
        let (copied, huge) = (ctx.stats().copied, info(&c, H).huge);
        match cow {
            HugeCow::Block => assert_eq!((copied, huge), (N, true), "{cow:?}"),
            _ => assert_eq!((copied, huge), (1, false), "{cow:?}"),
        }
        assert!(c.fault(H + 3 * PAGE, Access::Write).unwrap() || cow == HugeCow::Block);
        let s = ctx.stats();
        match cow {
            HugeCow::Page => assert_eq!((s.copied, s.collapses), (2, 0), "{cow:?}"),
            HugeCow::Block => assert_eq!((s.copied, s.collapses), (N, 0), "{cow:?}"),
            // The second fault copies its page, then the block collapses.
            HugeCow::Adaptive => assert_eq!((s.copied, s.collapses), (2, 1), "{cow:?}"),
        }
        let i = info(&c, H + 100 * PAGE);
        assert_eq!(
            i.huge && i.exclusive,
            cow != HugeCow::Page,
            "{cow:?}: {i:?}"
        );
        // Either way the child's writes stay its own.
        c.write(H + 100 * PAGE, &[0xcc]).unwrap();
        assert_filled(&p, 1, &[]);
        assert_filled(&c, 1, &[100]);
        check(&ctx, &[&p, &c]);
        drop((p, c));
        assert_eq!(ctx.stats().resident, 0, "{cow:?}: a frame leaked");
    }
}

/// Memory kept small (`VmMemory::keep_small`, Linux's MADV_NOHUGEPAGE) is
/// never mapped huge: not by a first touch, not by a collapse, not in a
/// fork's child; a huge block asked for later is split in place. A pinned
/// page there costs a fork 4 KiB, not the whole block.
#[test]
fn memory_kept_small_stays_small_across_touch_collapse_and_fork() {
    use memory::{Collapse, CollapseRefusal};
    let (ctx, vm) = setup();
    vm.keep_small(0, PAGE).unwrap();
    vm.write(0x1000, &[1]).unwrap();
    assert!(!info(&vm, 0x1000).huge, "first touch of a kept block");
    assert_eq!(
        vm.collapse(0).unwrap(),
        Collapse::Refused(CollapseRefusal::KeptSmall)
    );
    // A block already huge is split in place, contents and all.
    fill(&vm, 3);
    assert!(info(&vm, H).huge);
    vm.keep_small(H + 7 * PAGE, 1).unwrap();
    assert!(!info(&vm, H).huge);
    assert_filled(&vm, 3, &[]);

    // A block kept small before anything touched it.
    let empty = 2 * HUGE;
    vm.keep_small(empty, HUGE).unwrap();

    let pin = vm.pin(0x1000, PAGE, RW).unwrap();
    let c = vm.fork().unwrap();
    assert_eq!(ctx.stats().copied, 1, "the pinned page alone is copied");
    assert_eq!(byte(&c, 0x1000), 1);
    c.write(empty + PAGE, &[9]).unwrap();
    assert!(
        !info(&c, empty + PAGE).huge,
        "the child keeps the block small"
    );
    assert_eq!(
        c.collapse(H).unwrap(),
        Collapse::Refused(CollapseRefusal::KeptSmall)
    );
    check(&ctx, &[&vm, &c]);
    drop((pin, c, vm));
    assert_eq!(ctx.stats().resident, 0);
}
