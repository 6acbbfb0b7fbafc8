//! The CPUID a guest sees.
//!
//! On this host ring-0 guest code is emulated instruction by instruction and
//! some instructions cannot be emulated (XSAVE, POPCNT, CMPXCHG16B,
//! STAC/CLAC, AVX...). A kernel only uses them when CPUID says they exist,
//! so for kernels the VMM hides them. Program-mode code runs natively in
//! ring 3, where all of them work, so programs see what the host offers.
//!
//! Some KVMs do not honour the CPUID the VMM sets: PVM here reports (and
//! the guest's CPUID instruction returns) the host's own leaves 1 and 7
//! whatever `KVM_SET_CPUID2` said. For Linux the same features can be
//! hidden from the kernel's side instead, with `clearcpuid=`:
//! [`linux_clearcpuid`] names those the vCPU still shows.

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
    | (1 << 9)  // SSSE3 (Linux's built-in BLAKE2s uses it)
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

/// A CPUID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Ebx,
    Ecx,
}

/// Hidden features by the name Linux's `clearcpuid=` takes (its
/// `/proc/cpuinfo` name), most important first: the kernel keeps only the
/// first 127 bytes of the option. Clearing `xsave` also clears what
/// depends on it (AVX, AVX2, FMA, AVX-512, PKU), so those are not listed.
const LINUX_NAMES: &[(u32, Reg, u32, &str)] = &[
    (1, Reg::Ecx, 26, "xsave"),
    (1, Reg::Ecx, 23, "popcnt"),
    (1, Reg::Ecx, 13, "cx16"),
    (7, Reg::Ebx, 20, "smap"),
    (7, Reg::Ebx, 7, "smep"),
    (7, Reg::Ecx, 2, "umip"),
    (7, Reg::Ebx, 0, "fsgsbase"),
    (1, Reg::Ecx, 30, "rdrand"),
    (7, Reg::Ebx, 18, "rdseed"),
    (1, Reg::Ecx, 9, "ssse3"),
    (1, Reg::Ecx, 17, "pcid"),
    (7, Reg::Ebx, 10, "invpcid"),
    (7, Reg::Ecx, 16, "la57"),
    (7, Reg::Ebx, 11, "rtm"),
    (1, Reg::Ecx, 22, "movbe"),
    (1, Reg::Ecx, 25, "aes"),
    (7, Reg::Ebx, 29, "sha_ni"),
    (7, Reg::Ecx, 8, "gfni"),
    (7, Reg::Ecx, 9, "vaes"),
    (7, Reg::Ecx, 10, "vpclmulqdq"),
    (1, Reg::Ecx, 29, "f16c"),
    (7, Reg::Ebx, 3, "bmi1"),
    (7, Reg::Ebx, 8, "bmi2"),
    (7, Reg::Ebx, 19, "adx"),
    (0x8000_0001, Reg::Ecx, 5, "abm"),
    (0x8000_0001, Reg::Ecx, 8, "3dnowprefetch"),
    (1, Reg::Ecx, 3, "monitor"),
    (1, Reg::Ecx, 5, "vmx"),
];

/// Hidden bits that need no name: they follow from `xsave` (cleared with
/// it or set by the kernel itself), or Linux has no name for them.
#[cfg(test)]
const LINUX_UNNAMED: &[(u32, Reg, u32)] = &[
    (1, Reg::Ecx, 12), // FMA
    (1, Reg::Ecx, 27), // OSXSAVE
    (1, Reg::Ecx, 28), // AVX
    (7, Reg::Ebx, 5),  // AVX2
    (7, Reg::Ebx, 16), // AVX512F and the AVX-512 bits below
    (7, Reg::Ebx, 17),
    (7, Reg::Ebx, 21),
    (7, Reg::Ebx, 26),
    (7, Reg::Ebx, 27),
    (7, Reg::Ebx, 28),
    (7, Reg::Ebx, 30),
    (7, Reg::Ebx, 31),
    (7, Reg::Ecx, 1),
    (7, Reg::Ecx, 3), // PKU
    (7, Reg::Ecx, 4), // OSPKE
    (7, Reg::Ecx, 6),
    (7, Reg::Ecx, 7), // CET shadow stacks: no name in older kernels
    (7, Reg::Ecx, 11),
    (7, Reg::Ecx, 12),
    (7, Reg::Ecx, 14),
];

/// Longest `clearcpuid=` value Linux reads (its buffer is 128 bytes).
const LINUX_CLEARCPUID_MAX: usize = 127;

fn bit_set(cpuid: &CpuId, function: u32, reg: Reg, bit: u32) -> bool {
    cpuid
        .as_slice()
        .iter()
        .filter(|e| e.function == function && e.index == 0)
        .any(|e| {
            let v = match reg {
                Reg::Ebx => e.ebx,
                Reg::Ecx => e.ecx,
            };
            v & (1 << bit) != 0
        })
}

/// The value for Linux's `clearcpuid=` that hides from a kernel what
/// [`shape`] meant to hide but `effective` (the vCPU's CPUID as KVM reports
/// it after `KVM_SET_CPUID2`) still shows; `None` when nothing shows. The
/// second value lists what did not fit in the kernel's buffer.
pub fn linux_clearcpuid(effective: &CpuId) -> (Option<String>, Vec<&'static str>) {
    let mut value = String::new();
    let mut left_out = Vec::new();
    for &(function, reg, bit, name) in LINUX_NAMES {
        if !bit_set(effective, function, reg, bit) {
            continue;
        }
        let extra = name.len() + usize::from(!value.is_empty());
        if value.len() + extra > LINUX_CLEARCPUID_MAX {
            left_out.push(name);
            continue;
        }
        if !value.is_empty() {
            value.push(',');
        }
        value.push_str(name);
    }
    ((!value.is_empty()).then_some(value), left_out)
}

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

    fn hidden(function: u32, reg: Reg) -> u32 {
        match (function, reg) {
            (1, Reg::Ecx) => LEAF1_ECX_HIDE,
            (7, Reg::Ebx) => LEAF7_EBX_HIDE,
            (7, Reg::Ecx) => LEAF7_ECX_HIDE,
            (0x8000_0001, Reg::Ecx) => EXT1_ECX_HIDE,
            _ => 0,
        }
    }

    #[test]
    fn every_hidden_bit_has_a_linux_name_or_follows_from_one() {
        let mut covered = std::collections::HashMap::new();
        let all = LINUX_NAMES
            .iter()
            .map(|&(f, r, b, _)| (f, r, b))
            .chain(LINUX_UNNAMED.iter().copied());
        for (f, r, b) in all {
            assert_ne!(
                hidden(f, r) & (1 << b),
                0,
                "leaf {f:#x} {r:?} bit {b} is not hidden"
            );
            *covered.entry((f, r as u8)).or_insert(0u32) |= 1 << b;
        }
        for (f, r) in [
            (1, Reg::Ecx),
            (7, Reg::Ebx),
            (7, Reg::Ecx),
            (0x8000_0001, Reg::Ecx),
        ] {
            assert_eq!(covered[&(f, r as u8)], hidden(f, r), "leaf {f:#x} {r:?}");
        }
    }

    #[test]
    fn clearcpuid_names_what_still_shows() {
        let none = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 1,
            ecx: 1 << 31,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(linux_clearcpuid(&none), (None, vec![]));
        let some = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ecx: (1 << 26) | (1 << 28) | (1 << 23),
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: 1 << 20,
                ..Default::default()
            },
        ])
        .unwrap();
        assert_eq!(
            linux_clearcpuid(&some),
            (Some("xsave,popcnt,smap".into()), vec![])
        );
        // Everything at once still fits the kernel's buffer, most
        // important first.
        let (value, left_out) = linux_clearcpuid(&sample());
        let value = value.unwrap();
        assert!(value.len() <= LINUX_CLEARCPUID_MAX, "{value}");
        assert!(
            value.starts_with("xsave,popcnt,cx16,smap,smep,fsgsbase,rdrand"),
            "{value}"
        );
        assert!(!left_out.contains(&"xsave"));
    }

    #[test]
    fn programs_see_the_host() {
        let c = shape(&sample(), 0, Guest::Program);
        assert!(has_avx(&c));
        assert!(c.as_slice().iter().any(|e| e.function == 0xd));
    }
}
