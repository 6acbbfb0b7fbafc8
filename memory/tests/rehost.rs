//! A fork that moves the parent to a new host mapping
//! (`VmMemory::fork_rehosted`): the new mapping shows every page as the
//! table says, shared pages read-only; the spare keeps the old one, is
//! spent, and hands it to the reaper when dropped.

mod common;

use std::sync::Arc;

use common::{A, PAGE, RW, byte, host_prot, info, setup, setup_huge};
use memory::{Entry, VmMemory, audit};

fn host_base(vm: &VmMemory) -> u64 {
    vm.host_ranges()[0].2
}

/// Every page of `vm`'s host mapping allows what its entry allows, and a
/// present page shows through it what the VMM reads.
fn assert_host_follows_table(vm: &VmMemory) {
    let (gpa, len, host) = vm.host_ranges()[0];
    for off in (0..len).step_by(PAGE as usize) {
        let want = match vm.entry(gpa + off).unwrap() {
            Entry::Present { writable: true, .. } => "rw",
            Entry::Present { .. } => "r-",
            _ => "--",
        };
        assert_eq!(host_prot(host + off), want, "page {off:#x}");
        if want != "--" {
            let mut via_vmm = [0u8; 8];
            vm.read(gpa + off, &mut via_vmm).unwrap();
            // SAFETY: the page is mapped readable (checked above) and the
            // test is the only user of the VM.
            let via_host = unsafe { std::ptr::read_volatile((host + off) as *const [u8; 8]) };
            assert_eq!(via_host, via_vmm, "page {off:#x}");
        }
    }
}

fn spare_of(vm: &VmMemory) -> Arc<VmMemory> {
    VmMemory::new(vm.context(), vm.layout().clone()).unwrap()
}

#[test]
fn the_parent_moves_to_the_spare_mapping_with_shared_pages_read_only() {
    let (ctx, p) = setup();
    for i in 0..64u64 {
        p.write(A + i * PAGE, &[i as u8 + 1; 8]).unwrap();
    }
    // A pinned page is copied for the child and stays writable here.
    let pinned = A + 70 * PAGE;
    p.write(pinned, &[0x77; 8]).unwrap();
    let pin = p.pin(pinned, PAGE, RW).unwrap();
    let host = spare_of(&p);
    let (old, new) = (host_base(&p), host_base(&host));
    let mut told = None;
    let c = p
        .fork_rehosted(None, &host, |_, moved| told = Some(moved))
        .unwrap();
    assert_eq!(told, Some(true));
    assert_eq!(host_base(&p), new, "the parent did not move");
    assert_eq!((p.moves(), c.moves(), host.moves()), (1, 0, 0));
    // The spare holds the old mapping until it is dropped (its drop hands
    // it to the reaper) and is never a spare again.
    assert_eq!(host_base(&host), old);
    let again = p.fork_into(host.clone(), |_| panic!("a spent spare was used"));
    assert!(
        matches!(again, Err(memory::MemError::SpareUnfit)),
        "{again:?}"
    );
    assert_host_follows_table(&p);
    assert_host_follows_table(&c);
    assert_eq!(host_prot(new + A), "r-");
    assert_eq!(host_prot(new + pinned), "rw");
    assert!(!info(&p, A).exclusive);
    audit(&ctx, &[&p, &c, &host]).unwrap();

    // Copy-on-write works as after any fork.
    p.write(A, &[0xaa]).unwrap();
    assert_eq!(byte(&c, A), 1);
    assert_eq!(byte(&p, A), 0xaa);
    assert_host_follows_table(&p);
    drop(pin);
    drop(host);
    assert_eq!(byte(&p, A + PAGE), 2);
    assert_host_follows_table(&p);
    drop(c);
    audit(&ctx, &[&p]).unwrap();
}

#[test]
fn a_rehosted_fork_into_a_spare_child_and_again() {
    let (ctx, p) = setup();
    p.write(A, &[5]).unwrap();
    // Swap, marker and absent pages stay unmapped in the new mapping.
    p.write(A + PAGE, &[6]).unwrap();
    p.swap_out(A + PAGE, PAGE).unwrap();
    let (host, child) = (spare_of(&p), spare_of(&p));
    let c = p
        .fork_rehosted(Some(child), &host, |_, moved| assert!(moved))
        .unwrap();
    assert!(matches!(p.entry(A + PAGE), Some(Entry::Swap { .. })));
    assert_host_follows_table(&p);
    // The parent forks again from its new mapping.
    let host2 = spare_of(&p);
    let next = host_base(&host2);
    let c2 = p
        .fork_rehosted(None, &host2, |_, moved| assert!(moved))
        .unwrap();
    assert_eq!(host_base(&p), next);
    assert_eq!(p.moves(), 2);
    assert_host_follows_table(&p);
    for vm in [&p, &c, &c2] {
        assert_eq!(byte(vm, A), 5);
        assert_eq!(byte(vm, A + PAGE), 6);
    }
    audit(&ctx, &[&p, &c, &c2, &host, &host2]).unwrap();
}

#[test]
fn a_used_spare_is_refused_and_the_parent_keeps_its_mapping() {
    let (_ctx, p) = setup();
    p.write(A, &[1]).unwrap();
    let host = spare_of(&p);
    host.write(A, &[2]).unwrap();
    let old = host_base(&p);
    let forked = p.fork_rehosted(None, &host, |_, _| panic!("no snapshot expected"));
    assert!(forked.is_err());
    assert_eq!(host_base(&p), old);
    assert_eq!(p.moves(), 0);
    assert_host_follows_table(&p);
}

#[test]
fn huge_entries_move_whole() {
    let (ctx, p) = setup_huge();
    let block = 2 << 20;
    p.write(block, &[9; 64]).unwrap();
    p.write(block + (1 << 20), &[8; 64]).unwrap();
    assert!(
        p.frame_info(block).unwrap().huge,
        "not backed by a huge frame"
    );
    let host = spare_of(&p);
    let c = p
        .fork_rehosted(None, &host, |_, moved| assert!(moved))
        .unwrap();
    assert_host_follows_table(&p);
    assert_eq!(host_prot(host_base(&p) + block), "r-");
    p.write(block, &[1]).unwrap();
    assert_eq!(byte(&c, block), 9);
    assert_eq!(byte(&p, block + (1 << 20)), 8);
    assert_host_follows_table(&p);
    audit(&ctx, &[&p, &c, &host]).unwrap();
}
