//! The CPUID a guest sees.
//!
//! On this host ring-0 guest code is emulated instruction by instruction and
//! some instructions cannot be emulated (XSAVE, POPCNT, CMPXCHG16B,
//! STAC/CLAC, AVX...). A kernel only uses them when CPUID says they exist,
//! so for kernels the VMM hides them. Program-mode code runs natively in
//! ring 3, where all of them work, so programs see what the host offers.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// Who will read the CPUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guest {
    /// A ring-3 program (native execution).
    Program,
    /// A kernel whose ring-0 code is emulated.
    Kernel,
}

/// Leaf 1 ECX bits a kernel must not see.
const LEAF1_ECX_HIDE: u32 = (1 << 3) // MONITOR
    | (1 << 5)  // VMX
    | (1 << 12) // FMA
    | (1 << 13) // CMPXCHG16B
    | (1 << 17) // PCID
    | (1 << 22) // MOVBE
    | (1 << 23) // POPCNT
    | (1 << 25) // AES
    | (1 << 26) // XSAVE
    | (1 << 27) // OSXSAVE
    | (1 << 28) // AVX
    | (1 << 29) // F16C
    | (1 << 30); // RDRAND

/// Leaf 7 (subleaf 0) EBX bits a kernel must not see.
const LEAF7_EBX_HIDE: u32 = (1 << 0) // FSGSBASE
    | (1 << 3)  // BMI1
    | (1 << 5)  // AVX2
    | (1 << 7)  // SMEP
    | (1 << 8)  // BMI2
    | (1 << 10) // INVPCID
    | (1 << 11) // RTM
    | (1 << 16) // AVX512F
    | (1 << 17) // AVX512DQ
    | (1 << 18) // RDSEED
    | (1 << 19) // ADX
    | (1 << 20) // SMAP
    | (1 << 21) // AVX512IFMA
    | (1 << 26) // AVX512PF
    | (1 << 27) // AVX512ER
    | (1 << 28) // AVX512CD
    | (1 << 29) // SHA
    | (1 << 30) // AVX512BW
    | (1 << 31); // AVX512VL

/// Leaf 7 (subleaf 0) ECX bits a kernel must not see.
const LEAF7_ECX_HIDE: u32 = (1 << 1) // AVX512VBMI
    | (1 << 2)  // UMIP
    | (1 << 3)  // PKU
    | (1 << 4)  // OSPKE
    | (1 << 6)  // AVX512VBMI2
    | (1 << 7)  // CET_SS
    | (1 << 8)  // GFNI
    | (1 << 9)  // VAES
    | (1 << 10) // VPCLMULQDQ
    | (1 << 11) // AVX512VNNI
    | (1 << 12) // AVX512BITALG
    | (1 << 14) // AVX512VPOPCNTDQ
    | (1 << 16); // LA57

/// Leaf 0x80000001 ECX bits a kernel must not see.
const EXT1_ECX_HIDE: u32 = (1 << 5) // LZCNT/ABM
    | (1 << 8); // PREFETCHW

/// Shapes the host's supported CPUID for vCPU `index`.
pub fn shape(supported: &CpuId, index: u32, guest: Guest) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        shape_entry(e, index, guest);
    }
    if guest == Guest::Kernel {
        // XSAVE state enumeration is meaningless once XSAVE is hidden.
        let kept: Vec<kvm_cpuid_entry2> = cpuid
            .as_slice()
            .iter()
            .filter(|e| e.function != 0xd)
            .copied()
            .collect();
        cpuid = CpuId::from_entries(&kept).unwrap_or(cpuid);
    }
    cpuid
}

fn shape_entry(e: &mut kvm_cpuid_entry2, index: u32, guest: Guest) {
    match e.function {
        1 => {
            // Initial APIC ID and the hypervisor bit.
            e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24);
            e.ecx |= 1 << 31;
            if guest == Guest::Kernel {
                e.ecx &= !LEAF1_ECX_HIDE;
            }
        }
        7 if e.index == 0 && guest == Guest::Kernel => {
            e.ebx &= !LEAF7_EBX_HIDE;
            e.ecx &= !LEAF7_ECX_HIDE;
            e.edx = 0;
        }
        0xb | 0x1f => e.edx = index,
        0x8000_0001 if guest == Guest::Kernel => e.ecx &= !EXT1_ECX_HIDE,
        _ => {}
    }
}

/// Whether the CPUID offers AVX state that a program may enable via XCR0.
pub fn has_avx(cpuid: &CpuId) -> bool {
    cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == 1 && e.ecx & (1 << 26) != 0 && e.ecx & (1 << 28) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0100_0800,
                ecx: 0xffff_ffff,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: 0xffff_ffff,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xd,
                eax: 7,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    #[test]
    fn kernels_do_not_see_unemulatable_features() {
        let c = shape(&sample(), 3, Guest::Kernel);
        let l1 = c.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!(l1.ecx & (1 << 26), 0, "XSAVE visible");
        assert_eq!(l1.ecx & (1 << 23), 0, "POPCNT visible");
        let l7 = c.as_slice().iter().find(|e| e.function == 7).unwrap();
        assert_eq!(l7.ebx & (1 << 20), 0, "SMAP visible");
        assert!(c.as_slice().iter().all(|e| e.function != 0xd));
    }

    #[test]
    fn programs_see_the_host() {
        let c = shape(&sample(), 0, Guest::Program);
        assert!(has_avx(&c));
        assert!(c.as_slice().iter().any(|e| e.function == 0xd));
    }
}
