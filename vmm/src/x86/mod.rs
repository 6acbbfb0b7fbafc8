//! x86-64 specifics: program-mode CPU state, CPUID, and the guest page walk
//! and instruction decoding that locate faults KVM reports without an
//! address.

pub mod cpuid;
pub mod decode;
pub mod paging;
pub mod program;
