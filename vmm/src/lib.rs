//! A KVM hypervisor whose guest memory behaves like Linux anonymous memory.
//!
//! The library runs VMs ([`vm::Vm`]) whose RAM is managed by the `memory`
//! crate. Two kinds of guest run: static ELF programs entered directly in
//! ring 3 (program mode, with the hypercall ABI of [`abi`]) and Linux
//! kernels.

pub mod abi;
pub mod api;
pub mod bench;
pub mod console;
pub mod elf;
mod fork;
pub mod fuzz;
mod hypercall;
pub mod kvm;
pub mod linux;
mod machine;
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
}

pub use devices::error_chain;
pub use kvm::Hypervisor;
pub use vm::{Boot, Exit, Outcome, StopHandle, Vm, VmConfig, VmmError};
