//! Program mode: a static ELF runs directly in ring 3 of a 64-bit guest.
//!
//! The VMM owns the first MiB of RAM and builds there what a ring-3 program
//! needs from a kernel: descriptor tables, one TSS per vCPU, an I/O
//! permission bitmap allowing every port, exception stubs and an identity
//! map of RAM and the virtio-mmio window (2 MiB pages, user-accessible,
//! writable, accessed and dirty bits preset so the CPU never writes them).
//!
//! ```text
//!  0x01000 GDT    null, kernel code/data, user data/code, TSS per vCPU
//!  0x02000 IDT    32 interrupt gates → stubs
//!  0x03000 stubs  per vector: [push 0] mov al,vec; mov dx,0x511; out; hlt
//!  0x04000 TSSs   128 bytes apart; I/O bitmap offset points at 0x0c000
//!  0x0c000 I/O bitmap (8 KiB of zeros + 0xff)
//!  0x10000 ring-0 stacks, 1 KiB per vCPU
//!  0x50000 PML4, 0x51000 PDPT, 0x52000.. one PD per GiB mapped
//!  0xe0000 the fuzzing coverage map (64 KiB, see COVERAGE_MAP)
//! ```
//!
//! An exception in the program enters its stub in ring 0 (on the vCPU's
//! ring-0 stack); the stub reports the vector on port 0x511 and the VMM
//! reads the exception frame `[error, rip, cs, rflags, rsp, ss]` at RSP.
//!
//! PVM ignores RFLAGS.IOPL for ring-3 port I/O but honours the TSS I/O
//! bitmap, so both are set.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};
use memory::{MemError, VmMemory};

/// Port the exception stubs report on.
pub const FAULT_PORT: u16 = 0x511;
/// First byte a program may load at.
pub const LOW_END: u64 = 1 << 20;
/// Where the 64 KiB fuzzing coverage map lives (the hypercall
/// COVERAGE_MAP returns it): guest RAM the program may write, zero at each
/// fuzzing run's start.
pub const COVERAGE_MAP: u64 = 0xe0000;
/// Most vCPUs program mode lays out.
pub const MAX_VCPUS: u32 = 128;
/// Most RAM program mode can identity-map.
pub const MAX_RAM: u64 = 128 << 30;
/// The virtio-mmio window.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of the virtio-mmio window.
pub const MMIO_SIZE: u64 = 0x2_0000;

const GDT: u64 = 0x1000;
const IDT: u64 = 0x2000;
const STUBS: u64 = 0x3000;
const TSS: u64 = 0x4000;
const TSS_STRIDE: u64 = 128;
const IO_BITMAP: u64 = 0xc000;
const IO_BITMAP_LEN: u64 = 8192;
const STACKS: u64 = 0x10000;
const STACK_SIZE: u64 = 1024;
const PML4: u64 = 0x50000;
const PDPT: u64 = 0x51000;
const PDS: u64 = 0x52000;

const SEL_KCODE: u16 = 0x08;
const SEL_UDATA: u16 = 0x18 | 3;
const SEL_UCODE: u16 = 0x20 | 3;
const SEL_TSS0: u16 = 0x28;

// The layout above must fit below 1 MiB and the I/O bitmap offset in 16 bits.
const _: () = {
    assert!(TSS + MAX_VCPUS as u64 * TSS_STRIDE <= IO_BITMAP);
    assert!(IO_BITMAP - TSS < 0x1_0000);
    assert!(IO_BITMAP + IO_BITMAP_LEN < STACKS);
    assert!(STACKS + MAX_VCPUS as u64 * STACK_SIZE <= PML4);
    assert!(PDS + (MAX_RAM / (1 << 30) + 2) * 0x1000 <= COVERAGE_MAP);
    assert!(COVERAGE_MAP + crate::fuzz::MAP_SIZE as u64 <= LOW_END);
    assert!(SEL_TSS0 as u64 + MAX_VCPUS as u64 * 16 <= 0x1000);
};

/// Vectors for which the CPU pushes an error code.
const ERROR_CODE_VECTORS: [u8; 10] = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30];

/// The ring-0 stacks of `vcpus` vCPUs, which the CPU writes while it
/// delivers an exception, when a fault can no longer be reported: the VMM
/// keeps them pinned for writing in every VM, so they are always present,
/// writable and exclusive (fork copies them instead of sharing them).
/// Everything else the CPU reads in the first MiB may be shared read-only.
pub fn ring0_stacks(vcpus: u32) -> (u64, u64) {
    (STACKS, u64::from(vcpus) * STACK_SIZE)
}

fn tss_addr(vcpu: u32) -> u64 {
    TSS + u64::from(vcpu) * TSS_STRIDE
}

fn gib_needed(mem: &VmMemory) -> u64 {
    let ram_end = mem
        .layout()
        .ranges()
        .iter()
        .map(|r| r.gpa + r.len)
        .max()
        .unwrap_or(0);
    ram_end.max(MMIO_BASE + MMIO_SIZE).div_ceil(1 << 30)
}

/// Writes the structures for `vcpus` vCPUs into guest memory.
pub fn build(mem: &VmMemory, vcpus: u32) -> Result<(), MemError> {
    assert!(
        (1..=MAX_VCPUS).contains(&vcpus),
        "vCPU count checked by the caller"
    );
    let w64 = |gpa: u64, v: u64| mem.write(gpa, &v.to_le_bytes());

    // GDT.
    let descriptors: [u64; 5] = [
        0,
        0x00af_9b00_0000_ffff, // kernel code, 64-bit, accessed
        0x00cf_9300_0000_ffff, // kernel data, accessed
        0x00cf_f300_0000_ffff, // user data (DPL 3), accessed
        0x00af_fb00_0000_ffff, // user code, 64-bit (DPL 3), accessed
    ];
    for (i, d) in descriptors.iter().enumerate() {
        w64(GDT + i as u64 * 8, *d)?;
    }
    for v in 0..vcpus {
        let base = tss_addr(v);
        let limit = tss_limit(v);
        let lo = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x8b << 40) // present, busy 64-bit TSS
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        let at = GDT + u64::from(SEL_TSS0) + u64::from(v) * 16;
        w64(at, lo)?;
        w64(at + 8, base >> 32)?;
        // TSS: RSP0 and the I/O bitmap offset.
        w64(base + 4, STACKS + (u64::from(v) + 1) * STACK_SIZE)?;
        mem.write(base + 0x66, &((IO_BITMAP - base) as u16).to_le_bytes())?;
    }
    mem.write(IO_BITMAP + IO_BITMAP_LEN, &[0xff])?;

    // Exception stubs and the IDT.
    for v in 0..32u8 {
        let stub = STUBS + u64::from(v) * 16;
        let mut code = Vec::with_capacity(16);
        if !ERROR_CODE_VECTORS.contains(&v) {
            code.extend_from_slice(&[0x6a, 0x00]); // push $0
        }
        code.extend_from_slice(&[0xb0, v]); // mov $v, %al
        code.extend_from_slice(&[0x66, 0xba]); // mov $FAULT_PORT, %dx
        code.extend_from_slice(&FAULT_PORT.to_le_bytes());
        code.extend_from_slice(&[0xee, 0xf4, 0xeb, 0xfd]); // out; hlt; jmp hlt
        mem.write(stub, &code)?;
        let gate = (stub & 0xffff)
            | (u64::from(SEL_KCODE) << 16)
            | (0x8e00 << 32) // present, DPL 0, interrupt gate
            | (((stub >> 16) & 0xffff) << 48);
        w64(IDT + u64::from(v) * 16, gate)?;
        w64(IDT + u64::from(v) * 16 + 8, stub >> 32)?;
    }

    // Identity map: RAM and the virtio-mmio window, 2 MiB pages.
    const ENTRY: u64 = 0x67; // present, writable, user, accessed, dirty
    w64(PML4, PDPT | ENTRY)?;
    for gib in 0..gib_needed(mem) {
        let pd = PDS + gib * 0x1000;
        w64(PDPT + gib * 8, pd | ENTRY)?;
    }
    let map_2m = |gpa: u64, extra: u64| {
        let gib = gpa >> 30;
        w64(
            PDS + gib * 0x1000 + ((gpa >> 21) & 0x1ff) * 8,
            gpa | ENTRY | 0x80 | extra,
        )
    };
    for r in mem.layout().ranges() {
        let mut at = r.gpa;
        while at < r.gpa + r.len {
            map_2m(at, 0)?;
            at += 2 << 20;
        }
    }
    map_2m(MMIO_BASE, 0x18)?; // cache disabled, write-through
    Ok(())
}

fn tss_limit(vcpu: u32) -> u64 {
    (IO_BITMAP - tss_addr(vcpu)) + IO_BITMAP_LEN
}

/// Segment and control registers of vCPU `index` entering the program.
pub fn sregs(index: u32, mut s: kvm_sregs, osxsave: bool) -> kvm_sregs {
    let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.cs = seg(SEL_UCODE, 11, 1, 0);
    s.ss = seg(SEL_UDATA, 3, 0, 1);
    s.ds = s.ss;
    s.es = s.ss;
    s.fs = s.ss;
    s.gs = s.ss;
    let tss = tss_addr(index);
    s.tr = kvm_segment {
        base: tss,
        limit: tss_limit(index) as u32,
        selector: SEL_TSS0 + (index as u16) * 16,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    s.ldt = kvm_segment {
        unusable: 1,
        ..Default::default()
    };
    s.gdt = kvm_dtable {
        base: GDT,
        limit: (u64::from(SEL_TSS0) + u64::from(MAX_VCPUS) * 16 - 1) as u16,
        padding: [0; 3],
    };
    s.idt = kvm_dtable {
        base: IDT,
        limit: 32 * 16 - 1,
        padding: [0; 3],
    };
    s.cr3 = PML4;
    // PAE, OSFXSR, OSXMMEXCPT (SSE), and OSXSAVE where AVX state is enabled.
    s.cr4 = (1 << 5) | (1 << 9) | (1 << 10) | if osxsave { 1 << 18 } else { 0 };
    // PE, MP, ET, NE, WP, PG.
    s.cr0 = 1 | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
    s.efer = 1 | (1 << 8) | (1 << 10); // SCE, LME, LMA
    s
}

/// General-purpose registers entering the program at `rip`.
pub fn regs(rip: u64, rsp: u64, rdi: u64) -> kvm_regs {
    kvm_regs {
        rip,
        rsp,
        rdi,
        rflags: 0x2 | (3 << 12), // IOPL 3, interrupts off
        ..Default::default()
    }
}

/// An exception the program took, as the stub reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestFault {
    /// Exception vector.
    pub vector: u8,
    /// Faulting instruction.
    pub rip: u64,
    /// Error code (0 for vectors without one).
    pub error: u64,
    /// CR2 at the time (the address of a page fault).
    pub cr2: u64,
}

impl GuestFault {
    /// Reads the exception frame the stub left at `rsp`.
    pub fn from_frame(mem: &VmMemory, vector: u8, rsp: u64, cr2: u64) -> Self {
        let mut frame = [0u8; 16];
        let ok = mem.read(rsp, &mut frame).is_ok();
        let word = |i: usize| u64::from_le_bytes(frame[i * 8..i * 8 + 8].try_into().unwrap());
        Self {
            vector,
            rip: if ok { word(1) } else { 0 },
            error: if ok { word(0) } else { 0 },
            cr2,
        }
    }

    /// The mnemonic of the vector ("#PF").
    pub fn mnemonic(&self) -> &'static str {
        const NAMES: [&str; 22] = [
            "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP",
            "#SS", "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
        ];
        NAMES.get(self.vector as usize).copied().unwrap_or("#??")
    }
}

impl std::fmt::Display for GuestFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "guest fault: vector {} ({}) at rip {:#x}, error {:#x}, cr2 {:#x}",
            self.vector,
            self.mnemonic(),
            self.rip,
            self.error,
            self.cr2
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memory::{Config, Context, Layout};

    #[test]
    fn tables_map_ram_and_the_mmio_window() {
        let ctx = Context::new(Config::default());
        let mem = VmMemory::new(&ctx, Layout::new(&[(0, 64 << 20)]).unwrap()).unwrap();
        build(&mem, 2).unwrap();
        let r64 = |gpa: u64| {
            let mut b = [0u8; 8];
            mem.read(gpa, &mut b).unwrap();
            u64::from_le_bytes(b)
        };
        assert_eq!(r64(PML4), PDPT | 0x67);
        assert_eq!(r64(PDPT + 3 * 8), (PDS + 0x3000) | 0x67);
        assert_eq!(r64(PDS + 31 * 8), (31 << 21) | 0xe7);
        assert_eq!(r64(PDS + 32 * 8), 0, "RAM ends at 64 MiB");
        assert_eq!(r64(PDS + 0x3000 + 0x80 * 8), MMIO_BASE | 0xff);
        // vCPU 1's TSS: RSP0 and bitmap offset.
        assert_eq!(r64(tss_addr(1) + 4), STACKS + 2 * STACK_SIZE);
        // Stub 14 (#PF) has no push; stub 3 (#BP) pushes a zero first.
        let mut b = [0u8; 2];
        mem.read(STUBS + 14 * 16, &mut b).unwrap();
        assert_eq!(b, [0xb0, 14]);
        mem.read(STUBS + 3 * 16, &mut b).unwrap();
        assert_eq!(b, [0x6a, 0]);
    }

    #[test]
    fn fault_message() {
        let f = GuestFault {
            vector: 14,
            rip: 0x401000,
            error: 6,
            cr2: 0x7ff0_0000_0000,
        };
        assert_eq!(
            f.to_string(),
            "guest fault: vector 14 (#PF) at rip 0x401000, error 0x6, cr2 0x7ff000000000"
        );
    }
}
