//! The Intel MultiProcessor table (specification 1.4), which tells a kernel
//! without ACPI how many CPUs there are, where the I/O APIC is and how the
//! ISA interrupts reach it. Without it Linux sees one CPU.
//!
//! Interrupt routing matches KVM's default GSI routing: ISA IRQ `n` drives
//! I/O APIC pin `n` (and the 8259 for `n` < 16), the 8259 reaches the CPUs
//! through LINT0 as ExtINT, and LINT1 carries NMIs.

/// Where the local APICs are.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Where the I/O APIC is.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// I/O APIC pins (KVM's I/O APIC has 24).
pub const IOAPIC_PINS: u8 = 24;
/// The most vCPUs the table describes: APIC ids 0..=253, the I/O APIC
/// takes the next id and 255 means "all".
pub const MAX_CPUS: u32 = 254;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINT: u8 = 4;
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_BUS: u8 = 0;
/// Family 6; FPU and APIC present.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// Size of the config table header.
const HEADER_LEN: usize = 44;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The config table for `cpus` vCPUs (1..=[`MAX_CPUS`]).
pub fn config_table(cpus: u32) -> Vec<u8> {
    assert!(
        (1..=MAX_CPUS).contains(&cpus),
        "vCPU count checked by the caller"
    );
    let ioapic_id = cpus as u8;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id as u8, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[
            ENTRY_IOINT,
            INT_VECTORED,
            0,
            0,
            ISA_BUS,
            pin,
            ioapic_id,
            pin,
        ]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LINT, INT_EXTINT, 0, 0, ISA_BUS, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LINT, INT_NMI, 0, 0, ISA_BUS, 0, 0xff, 1]);
    count += 2;

    let len = HEADER_LEN + entries.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&(len as u16).to_le_bytes());
    t.push(4); // specification 1.4
    t.push(0); // checksum, below
    t.extend_from_slice(b"VMM     ");
    t.extend_from_slice(b"KVM GUEST   ");
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    t.extend_from_slice(&0u16.to_le_bytes());
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&[0; 4]); // no extended table
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);
    t
}

/// The floating pointer structure that points at the config table.
pub fn floating_pointer(config_addr: u32) -> [u8; 16] {
    let mut f = [0u8; 16];
    f[..4].copy_from_slice(b"_MP_");
    f[4..8].copy_from_slice(&config_addr.to_le_bytes());
    f[8] = 1; // length in 16-byte units
    f[9] = 4; // specification 1.4
    f[10] = checksum(&f);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn tables_check_out() {
        let f = floating_pointer(0x8_9000);
        assert_eq!(sum(&f), 0);
        assert_eq!(u32::from_le_bytes(f[4..8].try_into().unwrap()), 0x8_9000);

        let t = config_table(4);
        assert_eq!(sum(&t), 0);
        assert_eq!(&t[..4], b"PCMP");
        assert_eq!(u16::from_le_bytes([t[4], t[5]]) as usize, t.len());
        let count = u16::from_le_bytes([t[34], t[35]]);
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
        // The first processor is the BSP, the others only enabled.
        assert_eq!(&t[HEADER_LEN..HEADER_LEN + 4], &[0, 0, LAPIC_VERSION, 3]);
        assert_eq!(
            &t[HEADER_LEN + 20..HEADER_LEN + 24],
            &[0, 1, LAPIC_VERSION, 1]
        );
        // The I/O APIC takes the id after the last CPU.
        let io = HEADER_LEN + 4 * 20 + 8;
        assert_eq!(&t[io..io + 4], &[ENTRY_IOAPIC, 4, IOAPIC_VERSION, 1]);
        // ISA IRQ 4 (the serial port) goes to pin 4.
        let irq4 = io + 8 + 4 * 8;
        assert_eq!(&t[irq4..irq4 + 8], &[ENTRY_IOINT, 0, 0, 0, 0, 4, 4, 4]);
    }

    #[test]
    fn the_largest_table_fits_its_area() {
        let t = config_table(MAX_CPUS);
        assert_eq!(sum(&t), 0);
        assert!(t.len() as u64 <= super::super::MPTABLE_MAX);
    }
}
