//! A KVM hypervisor whose guest memory behaves like Linux anonymous memory.
//!
//! The library runs VMs ([`vm::Vm`]) whose RAM is managed by the `memory`
//! crate. Two kinds of guest run: static ELF programs entered directly in
//! ring 3 (program mode, with the hypercall ABI of [`abi`]) and Linux
//! kernels.

pub mod abi;
mod ahead;
pub mod api;
pub mod bench;
pub mod console;
mod dirty;
pub mod elf;
mod fork;
pub mod fuzz;
mod hypercall;
pub mod kvm;
pub mod linux;
mod machine;
mod pins;
mod restore;
mod retire;
pub mod snapfile;
pub mod snapshot;
mod vcpu;
pub mod virtio;
pub mod vm;
pub mod x86;

pub use console::Sink;

/// Guest programs built into the binary (resources/guests).
pub mod guests {
    /// The demo `vmm run` runs without a guest.
    pub const DEMO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.elf"));
    /// The benchmark guest.
    pub const BENCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bench.elf"));
    /// One line and exit 0.
    pub const HELLO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hello.elf"));
    /// The fuzzing benchmark's target: each run dirties N pages.
    pub const FUZZ_BENCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fuzz_bench.elf"));
    /// A fuzzing target with a planted bug (the input "FUZZ!" fails,
    /// "FUZZ?" crashes, "HANG" hangs), for examples, tests and benchmarks.
    pub const FUZZ_PLANTED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fuzz_planted.elf"));
}

pub use devices::error_chain;
pub use kvm::Hypervisor;
pub use vm::{Boot, Exit, Outcome, StopHandle, Vm, VmConfig, VmmError};
