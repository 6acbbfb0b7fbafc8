//! Helpers shared by the memory crate's integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use memory::{Config, Context, FrameInfo, Layout, PinFlags, VmMemory};

/// A page-aligned address well inside the test VM's RAM.
pub const A: u64 = 0x10_0000;
/// Bytes in a page.
pub const PAGE: u64 = 4096;

/// A long-term write pin.
pub const RW: PinFlags = PinFlags {
    write: true,
    longterm: true,
};
/// A long-term read-only pin.
pub const RO: PinFlags = PinFlags {
    write: false,
    longterm: true,
};

/// A context without fault-around and one 8 MiB VM.
pub fn setup() -> (Arc<Context>, Arc<VmMemory>) {
    let ctx = Context::new(Config {
        fault_around: 1,
        ..Config::default()
    });
    let vm = VmMemory::new(&ctx, Layout::new(&[(0, 8 << 20)]).unwrap()).unwrap();
    (ctx, vm)
}

/// Like [`setup`], on huge mappings (needs 2 MiB shmem pages on the host:
/// `scripts/setup` sets the knob).
pub fn setup_huge() -> (Arc<Context>, Arc<VmMemory>) {
    setup_huge_cow(memory::HugeCow::default())
}

/// Like [`setup_huge`], with `cow` for what a write to a shared huge block
/// copies.
pub fn setup_huge_cow(cow: memory::HugeCow) -> (Arc<Context>, Arc<VmMemory>) {
    memory::huge_pages_available().expect("the host must back shared memory with 2 MiB pages");
    let ctx = Context::new(Config {
        fault_around: 1,
        huge: true,
        huge_cow: cow,
        ..Config::default()
    });
    let vm = VmMemory::new(&ctx, Layout::new(&[(0, 8 << 20)]).unwrap()).unwrap();
    (ctx, vm)
}

/// The byte at `gpa` as the VMM reads it.
pub fn byte(vm: &VmMemory, gpa: u64) -> u8 {
    let mut b = [0u8];
    vm.read(gpa, &mut b).unwrap();
    b[0]
}

/// The frame behind `gpa`, which must be present.
pub fn info(vm: &VmMemory, gpa: u64) -> FrameInfo {
    vm.frame_info(gpa).expect("page present")
}

/// Protection of the host page at `addr` as "rw", "r-" or "--", from
/// /proc/self/maps.
pub fn host_prot(addr: u64) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (range, perms) = (parts.next().unwrap(), parts.next().unwrap());
        let (lo, hi) = range.split_once('-').unwrap();
        let lo = u64::from_str_radix(lo, 16).unwrap();
        let hi = u64::from_str_radix(hi, 16).unwrap();
        if (lo..hi).contains(&addr) {
            return perms[..2].to_string();
        }
    }
    panic!("{addr:#x} is not mapped at all");
}
