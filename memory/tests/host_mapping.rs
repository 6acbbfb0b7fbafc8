//! The host mapping follows the stage-2 table, frames are allocated on first
//! touch and freed when no longer mapped.

mod common;

use common::host_prot;
use memory::{Access, Config, Context, Entry, Layout, VmMemory};

fn vm(fault_around: u64) -> (std::sync::Arc<Context>, std::sync::Arc<VmMemory>, u64) {
    let ctx = Context::new(Config {
        fault_around,
        ..Config::default()
    });
    let vm = VmMemory::new(&ctx, Layout::new(&[(0, 4 << 20)]).unwrap()).unwrap();
    let host = vm.host_ranges()[0].2;
    (ctx, vm, host)
}

#[test]
fn first_touch_allocates_the_block_around_the_page() {
    let (ctx, vm, host) = vm(16);
    assert_eq!(host_prot(host + 0x5000), "--");
    assert_eq!(ctx.stats().resident, 0);
    vm.fault(0x5000, Access::Read).unwrap();
    assert_eq!(ctx.stats().resident, 16);
    for p in 0..16 {
        assert!(matches!(
            vm.entry(p * 0x1000),
            Some(Entry::Present { writable: true, .. })
        ));
        assert_eq!(host_prot(host + p * 0x1000), "rw");
    }
    assert_eq!(vm.entry(0x10000), Some(Entry::None));
    assert_eq!(host_prot(host + 0x10000), "--");
}

#[test]
fn single_page_first_touch() {
    let (ctx, vm, host) = vm(1);
    vm.fault(0x3000, Access::Write).unwrap();
    assert_eq!(ctx.stats().resident, 1);
    assert_eq!(host_prot(host + 0x3000), "rw");
    assert_eq!(host_prot(host + 0x2000), "--");
    assert_eq!(host_prot(host + 0x4000), "--");
}

#[test]
fn vmm_writes_are_seen_through_the_host_mapping() {
    let (_ctx, vm, host) = vm(16);
    vm.write(0x1ffe, &[1, 2, 3, 4]).unwrap();
    let mut b = [0u8; 4];
    vm.read(0x1ffe, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
    // SAFETY: both pages were just made present and writable, and this test
    // is the only user of the VM.
    let seen = unsafe { std::ptr::read_unaligned((host + 0x1ffe) as *const u32) };
    assert_eq!(seen, u32::from_le_bytes([1, 2, 3, 4]));
}

#[test]
fn reads_of_untouched_memory_are_zero_and_allocate_nothing() {
    let (ctx, vm, _) = vm(16);
    let mut b = [0xffu8; 64];
    vm.read(0x20000, &mut b).unwrap();
    assert_eq!(b, [0u8; 64]);
    assert_eq!(ctx.stats().resident, 0);
}

#[test]
fn write_protect_then_write_reuses_the_exclusive_frame() {
    let (ctx, vm, host) = vm(1);
    vm.write(0x7000, &[9]).unwrap();
    assert_eq!(vm.write_protect(0x7000, 0x1000).unwrap(), 1);
    assert_eq!(host_prot(host + 0x7000), "r-");
    assert!(vm.would_fault(0x7000, Access::Write));
    assert!(!vm.would_fault(0x7000, Access::Read));
    vm.fault(0x7000, Access::Write).unwrap();
    assert_eq!(host_prot(host + 0x7000), "rw");
    let s = ctx.stats();
    assert_eq!((s.reused, s.copied, s.resident), (1, 0, 1));
    let mut b = [0u8];
    vm.read(0x7000, &mut b).unwrap();
    assert_eq!(b, [9]);
}

#[test]
fn discard_frees_frames_and_reads_zero_afterwards() {
    let (ctx, vm, host) = vm(1);
    vm.write(0x9000, &[5; 0x2000]).unwrap();
    assert_eq!(ctx.stats().resident, 2);
    assert_eq!(vm.discard(0x9000, 0x2000).unwrap(), 2);
    assert_eq!(ctx.stats().resident, 0);
    assert_eq!(host_prot(host + 0x9000), "--");
    assert_eq!(vm.entry(0x9000), Some(Entry::None));
    vm.fault(0x9000, Access::Write).unwrap();
    let mut b = [1u8; 16];
    vm.read(0x9000, &mut b).unwrap();
    assert_eq!(b, [0; 16], "a discarded page did not read zeros");
}

#[test]
fn dropping_the_vm_frees_everything() {
    let (ctx, vm, _) = vm(16);
    vm.write(0, &vec![3u8; 1 << 20]).unwrap();
    assert_eq!(ctx.stats().resident, 256);
    drop(vm);
    let s = ctx.stats();
    assert_eq!((s.resident, s.stores), (0, 0));
}

#[test]
fn bad_ranges_are_errors() {
    let (_ctx, vm, _) = vm(16);
    assert!(vm.write(4 << 20, &[1]).is_err());
    assert!(vm.write((4 << 20) - 1, &[1, 2]).is_err());
    assert!(vm.read(u64::MAX, &mut [0u8; 2]).is_err());
    assert!(vm.fault(4 << 20, Access::Read).is_err());
    assert!(vm.discard(0, u64::MAX).is_err());
}

/// Whether the host page at `addr` has a page table entry, from
/// /proc/self/pagemap (bit 63: present).
fn host_entry_present(addr: u64) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
    f.seek(SeekFrom::Start(addr / 4096 * 8)).unwrap();
    let mut word = [0u8; 8];
    f.read_exact(&mut word).unwrap();
    u64::from_le_bytes(word) >> 63 == 1
}

/// The byte at `addr` read through the host mapping (faulting its entry
/// in).
fn host_byte(addr: u64) -> u8 {
    // SAFETY: the page is present in the VM (callers made it so), so its
    // host page is mapped at least readable, and this test is the VM's only
    // user.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

#[test]
fn demoting_a_written_leaf_sheds_its_host_entries_and_keeps_its_data() {
    let (ctx, vm, host) = vm(1);
    let leaf = 2 << 20;
    let data: Vec<u8> = (0..512u32 * 4096).map(|i| (i / 4096) as u8).collect();
    vm.write(leaf, &data).unwrap();
    vm.write(0x3000, &[9]).unwrap();
    for p in 0..512 {
        assert_eq!(host_byte(host + leaf + p * 4096), p as u8);
    }
    assert_eq!(host_byte(host + 0x3000), 9);
    assert!(host_entry_present(host + leaf + 5 * 4096));
    assert!(host_entry_present(host + 0x3000));

    assert_eq!(vm.demote_writable().unwrap(), 513);
    // The full leaf lost its host entries; the lone page kept its own.
    for p in [0, 5, 511] {
        let addr = host + leaf + p * 4096;
        assert!(!host_entry_present(addr), "page {p} kept its entry");
        assert_eq!(host_prot(addr), "r-");
    }
    assert!(host_entry_present(host + 0x3000));
    assert_eq!(host_prot(host + 0x3000), "r-");
    assert_eq!(host_prot(host + 0x10_0000), "--", "an absent page opened");
    // Every page refaults from its own frame.
    for p in 0..512 {
        assert_eq!(host_byte(host + leaf + p * 4096), p as u8);
    }

    // A fork after it shares the data; a write after it copies as ever.
    let child = vm.fork().unwrap();
    let child_host = child.host_ranges()[0].2;
    assert_eq!(host_byte(child_host + leaf + 7 * 4096), 7);
    vm.write(leaf + 7 * 4096, &[0xaa]).unwrap();
    assert_eq!(host_byte(host + leaf + 7 * 4096), 0xaa);
    assert_eq!(host_byte(child_host + leaf + 7 * 4096), 7);
    memory::audit(&ctx, &[&vm, &child]).unwrap();
}
