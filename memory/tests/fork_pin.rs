//! Fork and pins at the memory level: MEMORY-MODEL.md's acceptance
//! scenarios 1-9 and seed 003's two failure stories, with VMM reads and
//! writes standing in for the guest's (they take the same faults).

mod common;

use std::sync::Arc;

use common::{A, RO, RW, byte, info, setup};
use memory::{Layout, VmMemory, audit};

#[test]
fn s1_basic_cow_after_fork() {
    let (ctx, p) = setup();
    p.write(A, &[1]).unwrap();
    let c = p.fork().unwrap();
    let i = info(&p, A);
    assert!(!i.exclusive && i.mapcount == 2 && i.refcount == 2, "{i:?}");
    assert_eq!(ctx.stats().shared, 1);
    p.write(A, &[2]).unwrap();
    assert_eq!(byte(&c, A), 1, "child saw the parent's write");
    assert_eq!(byte(&p, A), 2);
    assert!(info(&p, A).exclusive);
    // The child's frame is now its alone but still marked maybe-shared, as
    // in Linux: its next write fault reuses it (sole reference) instead of
    // copying.
    let ci = info(&c, A);
    assert!(
        !ci.exclusive && ci.refcount == 1 && ci.mapcount == 1,
        "{ci:?}"
    );
    assert_eq!(ctx.stats().shared, 0);
    c.write(A, &[3]).unwrap();
    assert!(info(&c, A).exclusive);
    assert_eq!(
        ctx.stats().copied,
        1,
        "the child's write copied a sole-reference frame"
    );
    assert_eq!(byte(&p, A), 2);
}

#[test]
fn s2_read_only_then_writable_again_does_not_make_shared_frames_writable() {
    let (_ctx, p) = setup();
    p.write(A, &[1]).unwrap();
    let c = p.fork().unwrap();
    p.write_protect(A, 4096).unwrap();
    assert_eq!(
        p.unprotect(A, 4096).unwrap(),
        0,
        "a shared frame became writable"
    );
    assert!(p.would_fault(A, memory::Access::Write));
    p.write(A, &[2]).unwrap();
    assert_eq!(byte(&c, A), 1);
}

#[test]
fn s3_child_read_pin_survives_the_parents_write() {
    let (_ctx, p) = setup();
    p.write(A, &[1]).unwrap();
    let c = p.fork().unwrap();
    let pin = c.pin(A, 1, RO).unwrap();
    c.discard(A, 4096).unwrap();
    p.write(A, &[2]).unwrap();
    let mut b = [0u8];
    pin.read(0, &mut b).unwrap();
    assert_eq!(b, [1], "child's pin saw the parent's later write");
}

#[test]
fn s4_parent_pin_before_and_after_fork() {
    for pin_before in [true, false] {
        let (_ctx, p) = setup();
        p.write(A, &[1]).unwrap();
        let (pin, c) = if pin_before {
            let pin = p.pin(A, 1, RO).unwrap();
            let c = p.fork().unwrap();
            assert_ne!(
                p.frame_mappers(A),
                c.frame_mappers(A),
                "pinned frame shared"
            );
            (pin, c)
        } else {
            let c = p.fork().unwrap();
            (p.pin(A, 1, RO).unwrap(), c)
        };
        p.discard(A, 4096).unwrap();
        c.write(A, &[9]).unwrap();
        let mut b = [0u8];
        pin.read(0, &mut b).unwrap();
        assert_eq!(
            b,
            [1],
            "parent's pin saw the child's write (pin before fork: {pin_before})"
        );
    }
}

#[test]
fn s5_rw_pin_then_read_only_then_guest_write() {
    let (ctx, p) = setup();
    p.write(A, &[1]).unwrap();
    let pin = p.pin(A, 4096, RW).unwrap();
    p.write_protect(A, 4096).unwrap();
    p.write(A, &[7]).unwrap();
    let mut b = [0u8];
    pin.read(0, &mut b).unwrap();
    assert_eq!(b, [7], "device does not see the guest's write");
    assert_eq!(ctx.stats().copied, 0, "pinned frame copied");
}

#[test]
fn s6_rw_pin_then_fork_keeps_the_pinned_frame_private() {
    let (ctx, p) = setup();
    p.write(A, &[1]).unwrap();
    let pin = p.pin(A, 4096, RW).unwrap();
    let c = p.fork().unwrap();
    assert_eq!(info(&p, A).mapcount, 1);
    assert!(info(&p, A).exclusive);
    assert!(
        !p.would_fault(A, memory::Access::Write),
        "pinned parent page lost write access"
    );
    p.write(A, &[5]).unwrap();
    let mut b = [0u8];
    pin.read(0, &mut b).unwrap();
    assert_eq!(b, [5]);
    assert_eq!(byte(&c, A), 1);
    pin.write(1, &[6]).unwrap();
    assert_eq!(byte(&p, A + 1), 6);
    assert_eq!(byte(&c, A + 1), 0, "device write reached the child");
    assert_eq!(ctx.stats().copied, 1, "exactly the fork-time copy");
}

#[test]
fn s7_read_pin_on_shared_frame_unshares() {
    let (ctx, p) = setup();
    p.write(A, &[1]).unwrap();
    let c = p.fork().unwrap();
    let pin = p.pin(A, 1, RO).unwrap();
    assert!(info(&p, A).exclusive);
    assert_eq!(
        ctx.stats().copied,
        1,
        "unshare did not copy a frame the child maps"
    );
    p.write(A, &[3]).unwrap();
    let mut b = [0u8];
    pin.read(0, &mut b).unwrap();
    assert_eq!(b, [3], "pin does not see the parent's write");
    assert_eq!(byte(&c, A), 1);
}

#[test]
fn s8_unshare_reuses_a_frame_whose_sharer_is_gone() {
    let (ctx, p) = setup();
    p.write(A, &[1]).unwrap();
    drop(p.fork().unwrap());
    assert!(!info(&p, A).exclusive);
    let pin = p.pin(A, 1, RO).unwrap();
    assert_eq!(
        ctx.stats().copied,
        0,
        "unshare copied a sole-reference frame"
    );
    p.write(A, &[4]).unwrap();
    let mut b = [0u8];
    pin.read(0, &mut b).unwrap();
    assert_eq!(b, [4]);
}

#[test]
fn s9_read_pin_on_exclusive_frame() {
    let (ctx, p) = setup();
    p.write(A, &[1]).unwrap();
    let pin = p.pin(A, 1, RO).unwrap();
    p.write(A, &[8]).unwrap();
    let mut b = [0u8];
    pin.read(0, &mut b).unwrap();
    assert_eq!((b, ctx.stats().copied), ([8], 0));
}

#[test]
fn story_vmsplice_child_cannot_read_the_parents_secret() {
    // Seed 003: the parent writes a secret after fork; the child, holding
    // a read reference taken after fork and having dropped its mapping,
    // must still read the boring data.
    let (_ctx, p) = setup();
    p.write(A, b"Boring Data").unwrap();
    let c = p.fork().unwrap();
    let pin = c.pin(A, 11, RO).unwrap();
    c.discard(A, 4096).unwrap();
    p.write(A, b"Secret Data").unwrap();
    let mut b = [0u8; 11];
    pin.read(0, &mut b).unwrap();
    assert_eq!(&b, b"Boring Data");
}

#[test]
fn story_pin_stays_reliable_across_a_read_only_mapping() {
    // Seed 003, io_uring: a buffer registered (pinned) then mapped
    // read-only for some reason; the guest's next write must land in the
    // pinned frame, not in a copy.
    let (_ctx, p) = setup();
    p.write(A, &[0; 4096]).unwrap();
    let pin = p.pin(A, 4096, RW).unwrap();
    p.write_protect(A, 4096).unwrap();
    p.write(A, &[0xff; 4096]).unwrap();
    let mut b = [0u8; 4096];
    pin.read(0, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 0xff), "stale data through the pin");
}

#[test]
fn discard_of_a_pinned_page_keeps_the_frame_for_the_pin() {
    let (ctx, p) = setup();
    p.write(A, &[9; 8192]).unwrap();
    let pin = p.pin(A, 8192, RW).unwrap();
    p.discard(A, 4096).unwrap();
    assert_eq!(byte(&p, A), 0);
    let mut b = [0u8; 2];
    pin.read(4095, &mut b).unwrap();
    assert_eq!(b, [9, 9]);
    assert_eq!(ctx.stats().pins, 2);
    drop(pin);
    assert_eq!(ctx.stats().pins, 0);
}

#[test]
fn pinned_memory_as_host_slices() {
    let (_ctx, p) = setup();
    p.write(A + 100, &[1; 8192]).unwrap();
    let pin = p.pin(A + 100, 8192, RW).unwrap();
    let slices = pin.slices();
    assert_eq!(slices.iter().map(|s| s.len()).sum::<usize>(), 8192);
    assert_eq!(
        slices.len(),
        1,
        "frames of one store at consecutive pages are one run"
    );
    use vm_memory::Bytes;
    slices[0].write_slice(&[9; 4], 8188).unwrap();
    let mut b = [0u8; 4];
    p.read(A + 100 + 8188, &mut b).unwrap();
    assert_eq!(
        b, [9; 4],
        "a write through the slice is not in guest memory"
    );
}

#[test]
fn pin_misuse_is_an_error() {
    let (_ctx, p) = setup();
    let pin = p.pin(A, 10, RO).unwrap();
    assert!(pin.write(0, &[1]).is_err());
    assert!(pin.read(5, &mut [0u8; 6]).is_err());
    assert!(pin.read(u64::MAX, &mut [0u8; 2]).is_err());
    assert!(p.pin(8 << 20, 1, RO).is_err());
}

#[test]
fn nothing_leaks_when_every_vm_and_pin_is_gone() {
    let (ctx, p) = setup();
    p.write(0x20_0000, &[1; 64 << 10]).unwrap();
    let pin = p.pin(0x20_0000, 4096, RW).unwrap();
    let c1 = p.fork().unwrap();
    let c2 = c1.fork().unwrap();
    c2.write(0x20_1000, &[2]).unwrap();
    p.write(0x20_2000, &[3]).unwrap();
    drop((p, c1));
    let mut b = [0u8];
    pin.read(0, &mut b).unwrap();
    assert_eq!(b, [1]);
    drop((c2, pin));
    let s = ctx.stats();
    assert_eq!(
        (s.resident, s.shared, s.pins, s.stores),
        (0, 0, 0, 0),
        "{s:?}"
    );
}

#[test]
fn reverse_map_finds_every_mapper() {
    let (_ctx, p) = setup();
    p.write(A, &[1]).unwrap();
    let c = p.fork().unwrap();
    let g = c.fork().unwrap();
    let mut ids: Vec<u64> = p.frame_mappers(A).into_iter().map(|m| m.0).collect();
    ids.sort();
    assert_eq!(ids, vec![p.id(), c.id(), g.id()]);
    assert_eq!(info(&p, A).mapcount, 3);
    c.write(A, &[2]).unwrap();
    assert_eq!(p.frame_mappers(A).len(), 2);
    assert_eq!(c.frame_mappers(A), vec![(c.id(), A)]);
}

#[test]
fn a_vm_keeps_only_the_stores_it_uses() {
    // Each fork shares every frame; each write after it copies into a store
    // where that page's slot is free, so with 20 clones alive at once the
    // parent needs about 20 stores. Once they are gone it must let go of
    // the stores it no longer maps, or a long fuzzing run would hold
    // memfds (file descriptors) and address space forever.
    let (ctx, p) = setup();
    p.write(A, &[0; 8192]).unwrap();
    let mut alive = std::collections::VecDeque::new();
    for i in 0..300u32 {
        alive.push_back(p.fork().unwrap());
        p.write(A, &i.to_le_bytes()).unwrap();
        p.write(A + 4096, &i.to_le_bytes()).unwrap();
        if alive.len() > 20 {
            alive.pop_front();
        }
    }
    assert!(
        ctx.stats().stores >= 20,
        "the test no longer needs many stores"
    );
    alive.clear();
    let s = ctx.stats();
    assert!(s.stores <= 3, "{} stores open with no clone left", s.stores);
    memory::audit(&ctx, &[&p]).unwrap();
}

/// A fork into a spare made ahead is a fork like any other; a spare that
/// was used, or made for another layout, is refused.
#[test]
fn a_fork_into_a_spare_is_an_ordinary_fork() {
    let (ctx, p) = setup();
    p.write(A, &[1]).unwrap();
    let spare = VmMemory::new(&ctx, p.layout().clone()).unwrap();
    let c = p.fork_into(spare.clone(), |_| {}).unwrap();
    assert!(Arc::ptr_eq(&c, &spare));
    drop(spare);
    p.write(A, &[2]).unwrap();
    assert_eq!((byte(&p, A), byte(&c, A)), (2, 1));
    audit(&ctx, &[&p, &c]).unwrap();
    assert!(matches!(
        p.fork_into(c.clone(), |_| {}),
        Err(memory::MemError::SpareUnfit)
    ));
    let other = VmMemory::new(&ctx, Layout::new(&[(0, 4 << 20)]).unwrap()).unwrap();
    assert!(matches!(
        p.fork_into(other, |_| {}),
        Err(memory::MemError::SpareUnfit)
    ));
    audit(&ctx, &[&p, &c]).unwrap();
    drop((p, c));
    assert_eq!(ctx.stats().resident, 0);
}

/// A spare with a store made ahead takes the fork's copy of a pinned page
/// there: the fork opens no store of its own, and the store is the
/// child's like any other (closed with it).
#[test]
fn a_fork_copies_pinned_pages_into_the_store_made_ahead() {
    let (ctx, p) = setup();
    p.write(A, &[1]).unwrap();
    let pin = p.pin(A, 1, RW).unwrap();
    let spare = VmMemory::new(&ctx, p.layout().clone()).unwrap();
    spare.make_store_ahead().unwrap();
    spare.make_store_ahead().unwrap();
    let stores = ctx.stats().stores;
    let c = p.fork_into(spare, |_| {}).unwrap();
    assert_eq!(ctx.stats().copied, 1, "the pinned page is copied");
    assert_eq!(ctx.stats().stores, stores, "the fork opened a store");
    p.write(A, &[2]).unwrap();
    assert_eq!((byte(&p, A), byte(&c, A)), (2, 1));
    audit(&ctx, &[&p, &c]).unwrap();
    drop(c);
    assert_eq!(ctx.stats().stores, stores - 1, "the child's store stayed");
    let unused = VmMemory::new(&ctx, p.layout().clone()).unwrap();
    unused.make_store_ahead().unwrap();
    drop(unused);
    assert_eq!(ctx.stats().stores, stores - 1, "an unused store stayed");
    drop((pin, p));
    assert_eq!((ctx.stats().resident, ctx.stats().stores), (0, 0));
}
