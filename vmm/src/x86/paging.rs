//! A software walk of the guest's own page tables (x86-64, 4 levels).
//!
//! Used when KVM reports a fault without an address: the VMM finds the
//! guest-physical pages an instruction touches by translating its linear
//! addresses the way the CPU would, noting every table page on the way
//! (the CPU may need to write accessed/dirty bits into them).

use thiserror::Error;

/// Bits of a paging-structure entry.
const P: u64 = 1;
const RW: u64 = 1 << 1;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// CR0.PG, CR4.PAE, EFER.LMA.
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LMA: u64 = 1 << 10;

/// Why a linear address could not be translated.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WalkError {
    /// The guest's tables do not map the address: the CPU raises #PF
    /// itself, so this is not the access the VMM is looking for.
    #[error("linear address {0:#x} is not mapped by the guest")]
    NotPresent(u64),
    /// A table could not be read (it is not RAM).
    #[error("page table at {0:#x} is not readable")]
    TableUnreadable(u64),
    /// 32-bit paging modes are not walked.
    #[error("unsupported paging mode (cr0 {cr0:#x}, cr4 {cr4:#x}, efer {efer:#x})")]
    Mode {
        /// CR0.
        cr0: u64,
        /// CR4.
        cr4: u64,
        /// EFER.
        efer: u64,
    },
}

/// The control registers that select a paging mode.
#[derive(Clone, Copy, Debug)]
pub struct PagingRegs {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}

/// One paging-structure entry read during a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableRef {
    /// Guest-physical address of the entry.
    pub gpa: u64,
    /// Whether the CPU must set the accessed or dirty bit in it.
    pub needs_update: bool,
}

/// The result of translating one linear address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical address.
    pub gpa: u64,
    /// Size of the page that maps it: 4 KiB, 2 MiB or 1 GiB (4 KiB with
    /// paging off).
    pub page_size: u64,
    /// The entries walked, outermost first.
    pub tables: Vec<TableRef>,
}

/// Translates `va` for an access (`write` selects dirty-bit handling),
/// reading tables with `read_u64` (guest-physical address → value).
pub fn translate(
    regs: &PagingRegs,
    va: u64,
    write: bool,
    mut read_u64: impl FnMut(u64) -> Option<u64>,
) -> Result<Translation, WalkError> {
    if regs.cr0 & CR0_PG == 0 {
        return Ok(Translation {
            gpa: va,
            page_size: 1 << 12,
            tables: Vec::new(),
        });
    }
    if regs.cr4 & CR4_PAE == 0 || regs.efer & EFER_LMA == 0 {
        return Err(WalkError::Mode {
            cr0: regs.cr0,
            cr4: regs.cr4,
            efer: regs.efer,
        });
    }
    let mut tables = Vec::with_capacity(4);
    let mut table = regs.cr3 & ADDR;
    // Levels: PML4 (shift 39), PDPT (30), PD (21), PT (12).
    for (level, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
        let gpa = table + ((va >> shift) & 0x1ff) * 8;
        let e = read_u64(gpa).ok_or(WalkError::TableUnreadable(gpa))?;
        if e & P == 0 {
            return Err(WalkError::NotPresent(va));
        }
        let leaf = shift == 12 || (level > 0 && e & PS != 0);
        let needs_update = e & ACCESSED == 0 || (leaf && write && e & DIRTY == 0 && e & RW != 0);
        tables.push(TableRef { gpa, needs_update });
        if leaf {
            let size_mask = (1u64 << shift) - 1;
            let base = e & ADDR & !size_mask;
            return Ok(Translation {
                gpa: base | (va & size_mask),
                page_size: 1 << shift,
                tables,
            });
        }
        table = e & ADDR;
    }
    unreachable!("the PT level is always a leaf")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const LONG: PagingRegs = PagingRegs {
        cr0: CR0_PG | 1,
        cr3: 0x1000,
        cr4: CR4_PAE,
        efer: EFER_LMA | (1 << 8),
    };

    fn tables() -> HashMap<u64, u64> {
        let mut m = HashMap::new();
        m.insert(0x1000, 0x2000 | P | RW | ACCESSED); // PML4[0]
        m.insert(0x2000, 0x3000 | P | RW | ACCESSED); // PDPT[0]
        m.insert(0x3000, P | RW | PS | ACCESSED | DIRTY); // PD[0]: 2 MiB at 0
        m.insert(0x3008, 0x4000 | P | RW); // PD[1]: table, A clear
        m.insert(0x4000 + 5 * 8, 0x7000 | P | RW | ACCESSED); // PT[5], D clear
        m
    }

    #[test]
    fn large_page_translation() {
        let t = tables();
        let r = translate(&LONG, 0x12345, true, |a| t.get(&a).copied()).unwrap();
        assert_eq!(r.gpa, 0x12345);
        assert_eq!(r.page_size, 2 << 20);
        assert_eq!(r.tables.len(), 3);
        assert!(r.tables.iter().all(|t| !t.needs_update));
    }

    #[test]
    fn small_page_notes_ad_updates() {
        let t = tables();
        let va = 0x20_0000 + 5 * 0x1000 + 0x10;
        let r = translate(&LONG, va, true, |a| t.get(&a).copied()).unwrap();
        assert_eq!(r.gpa, 0x7010);
        assert_eq!(r.page_size, 4096);
        assert_eq!(
            r.tables.iter().map(|t| t.needs_update).collect::<Vec<_>>(),
            vec![false, false, true, true]
        );
        let r = translate(&LONG, va, false, |a| t.get(&a).copied()).unwrap();
        assert!(!r.tables[3].needs_update);
    }

    #[test]
    fn absent_and_unreadable() {
        let t = tables();
        assert_eq!(
            translate(&LONG, 0x40_0000, false, |a| t.get(&a).copied().or(Some(0))),
            Err(WalkError::NotPresent(0x40_0000))
        );
        assert_eq!(
            translate(&LONG, 1 << 39, false, |a| t.get(&a).copied()),
            Err(WalkError::TableUnreadable(0x1008))
        );
    }

    #[test]
    fn paging_off_is_identity() {
        let regs = PagingRegs { cr0: 1, ..LONG };
        assert_eq!(
            translate(&regs, 0x1234, false, |_| None).unwrap().gpa,
            0x1234
        );
    }
}
