//! Which guest pages does the faulting instruction touch?
//!
//! On this host a guest access that KVM cannot map (a write to a page the
//! host maps read-only, any access to an inaccessible one) makes `KVM_RUN`
//! fail with `EFAULT` and no address. The instruction has not executed, so
//! the VMM decodes it at RIP, translates every memory operand (implicit
//! stack and string operands included) through the guest's page tables,
//! and lets `memory` resolve each page that the access would fault on.
//! Then the instruction is simply run again.

use iced_x86::{Decoder, DecoderOptions, InstructionInfoFactory, OpAccess, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};
use thiserror::Error;

use super::paging::{PagingRegs, TableRef, WalkError, translate};

const PAGE: u64 = 4096;

/// An access to one guest-physical page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageAccess {
    /// Any address in the page.
    pub gpa: u64,
    /// Whether the access writes.
    pub write: bool,
}

/// What the decoder could not do.
#[derive(Debug, Error)]
pub enum DecodeError {
    /// The instruction bytes at RIP could not be read or translated.
    #[error("cannot fetch the instruction at rip {rip:#x}")]
    Fetch {
        /// The guest's RIP.
        rip: u64,
        /// Why.
        #[source]
        source: WalkError,
    },
    /// The bytes at RIP are not a valid instruction.
    #[error("invalid instruction at rip {0:#x}")]
    Invalid(u64),
}

/// The register state the decoder needs.
#[derive(Clone, Copy, Debug)]
pub struct CpuState<'a> {
    /// General-purpose registers.
    pub regs: &'a kvm_regs,
    /// Segment and control registers.
    pub sregs: &'a kvm_sregs,
}

impl CpuState<'_> {
    fn paging(&self) -> PagingRegs {
        PagingRegs {
            cr0: self.sregs.cr0,
            cr3: self.sregs.cr3,
            cr4: self.sregs.cr4,
            efer: self.sregs.efer,
        }
    }

    fn bitness(&self) -> u32 {
        let long = self.sregs.efer & (1 << 10) != 0;
        if long && self.sregs.cs.l != 0 {
            64
        } else if self.sregs.cs.db != 0 {
            32
        } else {
            16
        }
    }

    /// A register's value for address computation; for a segment
    /// register, its base (zero for CS, DS, ES and SS in 64-bit mode).
    pub(crate) fn reg(&self, r: Register) -> Option<u64> {
        let g = self.regs;
        let s = self.sregs;
        let flat = self.bitness() == 64;
        let full = r.full_register();
        let v = match full {
            Register::RAX => g.rax,
            Register::RBX => g.rbx,
            Register::RCX => g.rcx,
            Register::RDX => g.rdx,
            Register::RSI => g.rsi,
            Register::RDI => g.rdi,
            Register::RSP => g.rsp,
            Register::RBP => g.rbp,
            Register::R8 => g.r8,
            Register::R9 => g.r9,
            Register::R10 => g.r10,
            Register::R11 => g.r11,
            Register::R12 => g.r12,
            Register::R13 => g.r13,
            Register::R14 => g.r14,
            Register::R15 => g.r15,
            Register::RIP => g.rip,
            Register::ES | Register::CS | Register::SS | Register::DS if flat => 0,
            Register::ES => s.es.base,
            Register::CS => s.cs.base,
            Register::SS => s.ss.base,
            Register::DS => s.ds.base,
            Register::FS => s.fs.base,
            Register::GS => s.gs.base,
            _ => return None,
        };
        // Sub-registers (EAX, AX, AL...) are the low bits of the full one.
        let bits = r.size() * 8;
        Some(if r.is_segment_register() || bits >= 64 {
            v
        } else {
            v & ((1u64 << bits) - 1)
        })
    }
}

/// Reads guest-physical memory; false if `gpa` is not readable RAM.
pub trait PhysReader {
    /// Fills `buf` from `gpa`.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool;
}

impl<F: Fn(u64, &mut [u8]) -> bool> PhysReader for F {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self(gpa, buf)
    }
}

fn read_u64(mem: &impl PhysReader, gpa: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    mem.read_phys(gpa, &mut b).then(|| u64::from_le_bytes(b))
}

/// Translations remembered between faults: a tiny software TLB, keyed by
/// CR3 and linear page, one entry per guest page whatever its size (a
/// 2 MiB page is one entry, as in the CPU's own TLB). An entry can go
/// stale when the guest edits its page tables; a stale translation only
/// makes the VMM resolve the wrong page, the instruction faults again, and
/// the caller flushes and decodes afresh.
#[derive(Debug, Default)]
struct Tlb {
    entries: [TlbEntry; 8],
    next: usize,
}

/// One remembered translation: `va & !mask` maps to `gpa_base`.
#[derive(Clone, Copy, Debug, Default)]
struct TlbEntry {
    cr3: u64,
    va_base: u64,
    gpa_base: u64,
    /// Page size minus one; zero marks an empty entry.
    mask: u64,
}

impl Tlb {
    fn lookup(&self, cr3: u64, va: u64) -> Option<u64> {
        self.entries
            .iter()
            .find(|e| e.mask != 0 && e.cr3 == cr3 && va & !e.mask == e.va_base)
            .map(|e| e.gpa_base | (va & e.mask))
    }

    fn insert(&mut self, cr3: u64, va: u64, gpa: u64, page_size: u64) {
        let mask = page_size - 1;
        self.entries[self.next] = TlbEntry {
            cr3,
            va_base: va & !mask,
            gpa_base: gpa & !mask,
            mask,
        };
        self.next = (self.next + 1) % self.entries.len();
    }

    fn flush(&mut self) {
        self.entries = [TlbEntry::default(); 8];
    }
}

/// Per-vCPU state of the fault decoder, kept between faults.
pub struct FaultDecoder {
    tlb: Tlb,
    info: InstructionInfoFactory,
}

impl Default for FaultDecoder {
    fn default() -> Self {
        Self {
            tlb: Tlb::default(),
            info: InstructionInfoFactory::new(),
        }
    }
}

impl std::fmt::Debug for FaultDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultDecoder")
            .field("tlb", &self.tlb)
            .finish()
    }
}

impl FaultDecoder {
    /// Forgets every remembered translation.
    pub fn flush(&mut self) {
        self.tlb.flush();
    }

    /// Translates `va` (remembered or walked); a walk adds the page-table
    /// entries it read to `out`.
    fn translate(
        &mut self,
        cpu: &CpuState<'_>,
        mem: &impl PhysReader,
        va: u64,
        write: bool,
        out: &mut Vec<PageAccess>,
    ) -> Result<u64, WalkError> {
        let paging = cpu.paging();
        if let Some(gpa) = self.tlb.lookup(paging.cr3, va) {
            return Ok(gpa);
        }
        let t = translate(&paging, va, write, |a| read_u64(mem, a))?;
        for TableRef { gpa, needs_update } in &t.tables {
            push(
                out,
                PageAccess {
                    gpa: *gpa,
                    write: *needs_update,
                },
            );
        }
        self.tlb.insert(paging.cr3, va, t.gpa, t.page_size);
        Ok(t.gpa)
    }

    /// Adds the accesses for `[va, va + len)`, translated page by page.
    fn add_linear(
        &mut self,
        cpu: &CpuState<'_>,
        mem: &impl PhysReader,
        va: u64,
        len: u64,
        write: bool,
        out: &mut Vec<PageAccess>,
    ) -> Result<(), WalkError> {
        let last = va.wrapping_add(len.max(1) - 1);
        let mut page = va & !(PAGE - 1);
        loop {
            let gpa = self.translate(cpu, mem, page.max(va), write, out)?;
            push(out, PageAccess { gpa, write });
            if page >= (last & !(PAGE - 1)) {
                return Ok(());
            }
            page += PAGE;
        }
    }

    /// The pages the instruction at RIP fetches, reads and writes, including
    /// the page-table pages walked (for translations not remembered).
    /// Operands whose linear address the guest does not map are left out
    /// (the CPU raises #PF for those itself).
    pub fn instruction_accesses(
        &mut self,
        cpu: &CpuState<'_>,
        mem: &impl PhysReader,
    ) -> Result<Vec<PageAccess>, DecodeError> {
        let mut out = Vec::new();
        let rip = cpu.regs.rip;
        let linear_ip = if cpu.bitness() == 64 {
            rip
        } else {
            cpu.sregs.cs.base.wrapping_add(rip)
        };
        // Fetch up to 15 bytes, stopping at the first page that cannot be
        // read.
        let mut bytes = [0u8; 15];
        let mut got = 0usize;
        while got < bytes.len() {
            let va = linear_ip.wrapping_add(got as u64);
            let n = ((PAGE - va % PAGE) as usize).min(bytes.len() - got);
            let gpa = match self.translate(cpu, mem, va, false, &mut out) {
                Ok(gpa) => gpa,
                Err(source) if got == 0 => return Err(DecodeError::Fetch { rip, source }),
                Err(_) => break,
            };
            push(&mut out, PageAccess { gpa, write: false });
            if !mem.read_phys(gpa, &mut bytes[got..got + n]) {
                break;
            }
            got += n;
        }
        let mut decoder = Decoder::with_ip(cpu.bitness(), &bytes[..got], rip, DecoderOptions::NONE);
        let insn = decoder.decode();
        if insn.is_invalid() {
            return Err(DecodeError::Invalid(rip));
        }
        let used: Vec<_> = self.info.info(&insn).used_memory().to_vec();
        for used in used {
            let write = match used.access() {
                OpAccess::Read | OpAccess::CondRead => false,
                OpAccess::Write
                | OpAccess::CondWrite
                | OpAccess::ReadWrite
                | OpAccess::ReadCondWrite => true,
                _ => continue,
            };
            let Some(va) = used.virtual_address(0, |r, _, _| cpu.reg(r)) else {
                continue;
            };
            let len = match used.memory_size().size() {
                0 => PAGE,
                n => n as u64,
            };
            match self.add_linear(cpu, mem, va, len, write, &mut out) {
                Ok(()) | Err(WalkError::NotPresent(_)) => {}
                Err(e) => log::debug!("operand at {va:#x}: {e}"),
            }
        }
        Ok(out)
    }
}

fn push(out: &mut Vec<PageAccess>, a: PageAccess) {
    let a = PageAccess {
        gpa: a.gpa & !(PAGE - 1),
        ..a
    };
    if let Some(same) = out.iter_mut().find(|b| b.gpa == a.gpa) {
        same.write |= a.write;
    } else {
        out.push(a);
    }
}

/// Pages the CPU may touch on its own for the instruction at RIP besides
/// its operands: the descriptor tables, the TSS and the stack an exception
/// would switch to. Used when decoding explained nothing.
pub fn implicit_accesses(cpu: &CpuState<'_>, mem: &impl PhysReader) -> Vec<PageAccess> {
    let s = cpu.sregs;
    let mut walk = FaultDecoder::default();
    let mut out = Vec::new();
    let tss_rsp0 = {
        let mut b = [0u8; 8];
        let gpa = translate(&cpu.paging(), s.tr.base + 4, false, |a| read_u64(mem, a))
            .ok()
            .map(|t| t.gpa);
        gpa.filter(|g| mem.read_phys(*g, &mut b))
            .map(|_| u64::from_le_bytes(b))
    };
    let regions = [
        (s.gdt.base, u64::from(s.gdt.limit) + 1, false),
        (s.idt.base, u64::from(s.idt.limit) + 1, false),
        (s.tr.base, u64::from(s.tr.limit) + 1, false),
    ];
    for (va, len, write) in regions {
        let _ = walk.add_linear(cpu, mem, va, len.min(16 * PAGE), write, &mut out);
    }
    if let Some(rsp0) = tss_rsp0 {
        let _ = walk.add_linear(cpu, mem, rsp0.wrapping_sub(64), 64, true, &mut out);
    }
    let _ = walk.add_linear(cpu, mem, cpu.regs.rsp.wrapping_sub(64), 64, true, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_segment;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// 64-bit state with an identity map of the first 1 GiB (2 MiB pages,
    /// tables at 0x1000..0x3fff), sparse guest memory.
    struct Guest {
        regs: kvm_regs,
        sregs: kvm_sregs,
        mem: RefCell<HashMap<u64, u8>>,
    }

    impl Guest {
        fn new(code: &[u8]) -> Self {
            let mut g = Guest {
                regs: kvm_regs::default(),
                sregs: kvm_sregs::default(),
                mem: RefCell::new(HashMap::new()),
            };
            g.sregs.cr0 = (1 << 31) | 1;
            g.sregs.cr3 = 0x1000;
            g.sregs.cr4 = 1 << 5;
            g.sregs.efer = (1 << 10) | (1 << 8);
            g.sregs.cs = kvm_segment {
                l: 1,
                ..Default::default()
            };
            g.put64(0x1000, 0x2000 | 0x23);
            g.put64(0x2000, 0x3000 | 0x23);
            for i in 0..512u64 {
                g.put64(0x3000 + i * 8, (i << 21) | 0xe3);
            }
            g.regs.rip = 0x40_0ffe;
            for (i, b) in code.iter().enumerate() {
                g.mem.borrow_mut().insert(g.regs.rip + i as u64, *b);
            }
            g
        }

        fn put64(&mut self, a: u64, v: u64) {
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                self.mem.get_mut().insert(a + i as u64, *b);
            }
        }

        /// Reads sparse guest memory (absent bytes read 0); RAM is the
        /// first GiB.
        fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
            let m = self.mem.borrow();
            for (i, b) in buf.iter_mut().enumerate() {
                *b = *m.get(&(gpa + i as u64)).unwrap_or(&0);
            }
            gpa < 1 << 30
        }

        fn accesses(&self) -> Vec<PageAccess> {
            let mem = |gpa: u64, buf: &mut [u8]| self.read(gpa, buf);
            let cpu = CpuState {
                regs: &self.regs,
                sregs: &self.sregs,
            };
            FaultDecoder::default()
                .instruction_accesses(&cpu, &mem)
                .unwrap()
        }
    }

    fn has(a: &[PageAccess], gpa: u64, write: bool) -> bool {
        a.contains(&PageAccess {
            gpa: gpa & !0xfff,
            write,
        })
    }

    #[test]
    fn store_through_register_spanning_the_code_page() {
        // mov %rax, 0x10(%rbx), straddling two code pages.
        let mut g = Guest::new(&[0x48, 0x89, 0x43, 0x10]);
        g.regs.rbx = 0x80_0ff8;
        let a = g.accesses();
        assert!(
            has(&a, 0x40_0000, false) && has(&a, 0x40_1000, false),
            "{a:x?}"
        );
        assert!(has(&a, 0x80_1000, true), "{a:x?}");
        assert!(has(&a, 0x3000, false), "{a:x?}");
    }

    #[test]
    fn remembered_translations_skip_the_walk_until_flushed() {
        // mov %rax, (%rbx) with rbx in the second 2 MiB page.
        let mut g = Guest::new(&[0x48, 0x89, 0x03]);
        g.regs.rbx = 0x20_0010;
        let mem = |gpa: u64, buf: &mut [u8]| g.read(gpa, buf);
        let cpu = CpuState {
            regs: &g.regs,
            sregs: &g.sregs,
        };
        let mut d = FaultDecoder::default();
        let first = d.instruction_accesses(&cpu, &mem).unwrap();
        assert!(
            has(&first, 0x20_0000, true) && has(&first, 0x3000, false),
            "{first:x?}"
        );
        // A second decode uses the remembered translations: no table pages.
        let again = d.instruction_accesses(&cpu, &mem).unwrap();
        assert!(
            has(&again, 0x20_0000, true) && !has(&again, 0x3000, false),
            "{again:x?}"
        );
        // The guest remaps the page: stale until flushed.
        g.mem.borrow_mut().insert(0x3008 + 2, 0x60); // PD[1] now maps 0x60_0000
        let stale = d.instruction_accesses(&cpu, &mem).unwrap();
        assert!(has(&stale, 0x20_0000, true), "{stale:x?}");
        d.flush();
        let fresh = d.instruction_accesses(&cpu, &mem).unwrap();
        assert!(has(&fresh, 0x60_0000, true), "{fresh:x?}");
    }

    #[test]
    fn a_large_page_is_remembered_whole() {
        // mov %rax, (%rbx): the code and the operand sit in 2 MiB pages.
        let mut g = Guest::new(&[0x48, 0x89, 0x03]);
        let mut d = FaultDecoder::default();
        let mut decode = |rbx: u64| {
            g.regs.rbx = rbx;
            let mem = |gpa: u64, buf: &mut [u8]| g.read(gpa, buf);
            let cpu = CpuState {
                regs: &g.regs,
                sregs: &g.sregs,
            };
            d.instruction_accesses(&cpu, &mem).unwrap()
        };
        let first = decode(0x20_0010);
        assert!(has(&first, 0x3000, false), "{first:x?}");
        // Elsewhere in the same 2 MiB page: no walk, the right page.
        let same = decode(0x3f_f008);
        assert!(
            has(&same, 0x3f_f000, true) && !has(&same, 0x3000, false),
            "{same:x?}"
        );
        // Another 2 MiB page is walked.
        let other = decode(0x60_0010);
        assert!(
            has(&other, 0x60_0000, true) && has(&other, 0x3000, false),
            "{other:x?}"
        );
    }

    #[test]
    fn push_writes_below_rsp() {
        let mut g = Guest::new(&[0x50]); // push %rax
        g.regs.rsp = 0x90_0000;
        let a = g.accesses();
        assert!(has(&a, 0x8f_f000, true), "{a:x?}");
    }

    #[test]
    fn rep_movsb_reads_rsi_writes_rdi() {
        let mut g = Guest::new(&[0xf3, 0xa4]);
        g.regs.rsi = 0x50_0000;
        g.regs.rdi = 0x60_0000;
        g.regs.rcx = 100;
        let a = g.accesses();
        assert!(
            has(&a, 0x50_0000, false) && has(&a, 0x60_0000, true),
            "{a:x?}"
        );
    }

    #[test]
    fn sse_store_and_fs_relative_load() {
        let mut g = Guest::new(&[0xf3, 0x0f, 0x7f, 0x07]); // movdqu %xmm0, (%rdi)
        g.regs.rdi = 0x70_0ff8; // 16 bytes, crossing a page
        let a = g.accesses();
        assert!(
            has(&a, 0x70_0000, true) && has(&a, 0x70_1000, true),
            "{a:x?}"
        );
        let mut g = Guest::new(&[0x64, 0x48, 0x8b, 0x04, 0x25, 0x08, 0, 0, 0]); // mov %fs:8, %rax
        g.sregs.fs.base = 0x12_3000;
        let a = g.accesses();
        assert!(has(&a, 0x12_3008, false), "{a:x?}");
    }

    #[test]
    fn lock_cmpxchg_is_a_write() {
        let mut g = Guest::new(&[0xf0, 0x48, 0x0f, 0xb1, 0x0e]); // lock cmpxchg %rcx,(%rsi)
        g.regs.rsi = 0x33_0000;
        assert!(has(&g.accesses(), 0x33_0000, true));
    }

    #[test]
    fn invalid_bytes_are_reported() {
        let g = Guest::new(&[0x06]); // push %es: invalid in 64-bit mode
        let mem = |gpa: u64, buf: &mut [u8]| g.read(gpa, buf);
        let cpu = CpuState {
            regs: &g.regs,
            sregs: &g.sregs,
        };
        assert!(matches!(
            FaultDecoder::default().instruction_accesses(&cpu, &mem),
            Err(DecodeError::Invalid(0x40_0ffe))
        ));
    }
}
