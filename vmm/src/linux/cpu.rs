//! The CPU state a kernel is entered with, and the descriptor and page
//! tables behind it.
//!
//! - PVH entry: 32-bit protected mode, paging off, flat 4 GiB segments,
//!   EBX = the `hvm_start_info` address (the PVH boot ABI).
//! - 64-bit entry (bzImage at +0x200, or a vmlinux's `e_entry`): long mode
//!   with the first 4 GiB identity-mapped by 2 MiB pages, `__BOOT_CS` =
//!   0x10 and `__BOOT_DS` = 0x18 as the boot protocol asks, RSI = the zero
//!   page.
//!
//! Every vCPU gets the FPU state, MSRs and local APIC wiring a BIOS would
//! leave. Only vCPU 0 gets entry registers: with the in-kernel irqchip the
//! others wait for INIT/SIPI from the kernel.

use kvm_bindings::{Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use memory::{MemError, VmMemory};

use super::{GDT_ADDR, PD_ADDR, PDPT_ADDR, PML4_ADDR, STACK_TOP};
use crate::kvm::{KvmError, ioctl};

/// Code selector (`__BOOT_CS`).
const SEL_CODE: u16 = 0x10;
/// Data selector (`__BOOT_DS`).
const SEL_DATA: u16 = 0x18;
/// Task register selector.
const SEL_TSS: u16 = 0x20;
/// GDT entries (the TSS takes two in long mode).
const GDT_ENTRIES: usize = 6;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// 32-bit PVH entry at `rip` with EBX = `start_info`.
    Pvh {
        /// The PVH entry point.
        rip: u64,
        /// The `hvm_start_info` address.
        start_info: u64,
    },
    /// 64-bit entry at `rip` with RSI = `zero_page`.
    Long {
        /// The 64-bit entry point.
        rip: u64,
        /// The `boot_params` address.
        zero_page: u64,
    },
}

impl Entry {
    fn long(&self) -> bool {
        matches!(self, Entry::Long { .. })
    }
}

/// The GDT for `entry`: null, null, code (`0x10`), data (`0x18`), TSS
/// (`0x20`, base 0, limit 0x67, busy).
pub fn gdt(entry: Entry) -> [u64; GDT_ENTRIES] {
    let code = if entry.long() {
        0x00af_9b00_0000_ffff // 64-bit, present, execute/read, accessed
    } else {
        0x00cf_9b00_0000_ffff // 32-bit, 4 GiB
    };
    [
        0,
        0,
        code,
        0x00cf_9300_0000_ffff, // data, 4 GiB, read/write, accessed
        0x0000_8b00_0000_0067, // busy TSS at 0, limit 0x67
        0,
    ]
}

/// The identity map of the first 4 GiB: one PML4 page, one PDPT page and
/// four page directories of 2 MiB pages, as (address, page) pairs.
pub fn page_tables() -> Vec<(u64, Vec<u8>)> {
    const PRESENT_RW: u64 = 0b11;
    const HUGE: u64 = 1 << 7;
    let page = |entries: &mut dyn Iterator<Item = u64>| {
        let mut p = vec![0u8; 4096];
        for (i, e) in entries.enumerate() {
            p[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        p
    };
    let mut out = vec![
        (
            PML4_ADDR,
            page(&mut std::iter::once(PDPT_ADDR | PRESENT_RW)),
        ),
        (
            PDPT_ADDR,
            page(&mut (0..4).map(|i| (PD_ADDR + i * 4096) | PRESENT_RW)),
        ),
    ];
    for gib in 0..4u64 {
        let pd = page(&mut (0..512).map(|i| (gib << 30 | i << 21) | PRESENT_RW | HUGE));
        out.push((PD_ADDR + gib * 4096, pd));
    }
    out
}

/// Writes the GDT and, for the 64-bit entry, the page tables.
pub fn write_tables(mem: &VmMemory, entry: Entry) -> Result<(), MemError> {
    let gdt: Vec<u8> = gdt(entry).iter().flat_map(|d| d.to_le_bytes()).collect();
    mem.write(GDT_ADDR, &gdt)?;
    if entry.long() {
        for (addr, page) in page_tables() {
            mem.write(addr, &page)?;
        }
    }
    Ok(())
}

fn segment(selector: u16, descriptor: u64) -> kvm_segment {
    let flags = descriptor >> 52;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present: 1,
        dpl: 0,
        db: ((flags >> 2) & 1) as u8,
        s: 1,
        l: ((flags >> 1) & 1) as u8,
        g: 1,
        ..Default::default()
    }
}

/// The system registers for vCPU 0, starting from KVM's reset state `base`.
pub fn sregs(entry: Entry, base: kvm_sregs) -> kvm_sregs {
    let g = gdt(entry);
    let mut s = base;
    s.cs = segment(SEL_CODE, g[2]);
    let data = segment(SEL_DATA, g[3]);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: SEL_TSS,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    if entry.long() {
        s.cr0 = CR0_PE | CR0_ET | CR0_PG;
        s.cr3 = PML4_ADDR;
        s.cr4 = CR4_PAE;
        s.efer = EFER_LME | EFER_LMA;
    } else {
        s.cr0 = CR0_PE | CR0_ET;
        s.cr3 = 0;
        s.cr4 = 0;
        s.efer = 0;
    }
    s
}

/// The general registers for vCPU 0.
pub fn regs(entry: Entry) -> kvm_regs {
    let mut r = kvm_regs {
        rflags: 2,
        ..Default::default()
    };
    match entry {
        Entry::Pvh { rip, start_info } => {
            r.rip = rip;
            r.rbx = start_info;
        }
        Entry::Long { rip, zero_page } => {
            r.rip = rip;
            r.rsi = zero_page;
            r.rsp = STACK_TOP;
            r.rbp = STACK_TOP;
        }
    }
    r
}

fn lapic_reg(regs: &[std::os::raw::c_char; 1024], at: usize) -> u32 {
    let b: [u8; 4] = std::array::from_fn(|i| regs[at + i] as u8);
    u32::from_le_bytes(b)
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], at: usize, v: u32) {
    for (i, b) in v.to_le_bytes().into_iter().enumerate() {
        regs[at + i] = b as std::os::raw::c_char;
    }
}

fn delivery_mode(lvt: u32, mode: u32) -> u32 {
    (lvt & !0x700) | (mode << 8)
}

/// Prepares one vCPU; `entry` is given for vCPU 0 only.
pub fn setup_vcpu(vcpu: &VcpuFd, entry: Option<Entry>) -> Result<(), KvmError> {
    // LINT0 delivers the 8259's interrupts, LINT1 NMIs, as a BIOS sets them.
    let mut lapic = ioctl("read the local APIC", vcpu.get_lapic())?;
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        delivery_mode(lvt1, APIC_MODE_NMI),
    );
    ioctl("set the local APIC", vcpu.set_lapic(&lapic))?;

    for (index, data) in [
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ] {
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }])
        .expect("one entry fits");
        // An MSR this KVM does not know only costs the kernel a default.
        if ioctl("set an MSR", vcpu.set_msrs(&msrs))? != 1 {
            log::debug!("KVM does not take MSR {index:#x}");
        }
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    ioctl("set the FPU state", vcpu.set_fpu(&fpu))?;

    if let Some(entry) = entry {
        let base = ioctl("read system registers", vcpu.get_sregs())?;
        ioctl("set system registers", vcpu.set_sregs(&sregs(entry, base)))?;
        ioctl("set registers", vcpu.set_regs(&regs(entry)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PVH: Entry = Entry::Pvh {
        rip: 0x100_0850,
        start_info: 0x8_0100,
    };
    const LONG: Entry = Entry::Long {
        rip: 0x100_0000,
        zero_page: 0x8_1000,
    };

    #[test]
    fn pvh_enters_flat_protected_mode() {
        let s = sregs(PVH, kvm_sregs::default());
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!((s.cr4, s.efer), (0, 0));
        assert_eq!((s.cs.l, s.cs.db, s.cs.type_), (0, 1, 0xb));
        assert_eq!((s.ds.db, s.ds.type_, s.ds.limit), (1, 3, 0xffff_ffff));
        assert_eq!((s.tr.type_, s.tr.limit, s.tr.base), (0xb, 0x67, 0));
        let r = regs(PVH);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0850, 0x8_0100, 2));
    }

    #[test]
    fn long_mode_entry_pages_and_points_at_the_zero_page() {
        let s = sregs(LONG, kvm_sregs::default());
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db), (0x10, 1, 0));
        assert_eq!(s.ss.selector, 0x18);
        let r = regs(LONG);
        assert_eq!((r.rip, r.rsi), (0x100_0000, 0x8_1000));
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let t = page_tables();
        let entry = |addr: u64, i: usize| {
            let p = &t.iter().find(|(a, _)| *a == addr).unwrap().1;
            u64::from_le_bytes(p[i * 8..i * 8 + 8].try_into().unwrap())
        };
        assert_eq!(entry(PML4_ADDR, 0), PDPT_ADDR | 3);
        assert_eq!(entry(PDPT_ADDR, 3), (PD_ADDR + 3 * 4096) | 3);
        assert_eq!(entry(PD_ADDR, 8), (8 << 21) | 0x83);
        assert_eq!(entry(PD_ADDR + 3 * 4096, 511), (0xffe0_0000) | 0x83);
    }

    #[test]
    fn lint_wiring() {
        assert_eq!(delivery_mode(0x0001_0000, APIC_MODE_EXTINT), 0x0001_0700);
        assert_eq!(delivery_mode(0x0000_0700, APIC_MODE_NMI), 0x0000_0400);
    }
}
