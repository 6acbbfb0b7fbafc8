//! Booting Linux kernels.

use kvm_ioctls::{VcpuFd, VmFd};
use memory::VmMemory;

use crate::vm::VmmError;
use devices::serial::Irq;

/// The command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// A kernel to boot.
#[derive(Debug)]
pub struct LinuxBoot {
    /// The kernel image (bzImage or ELF vmlinux).
    pub kernel: Vec<u8>,
    /// An initial ramdisk.
    pub initrd: Option<Vec<u8>>,
    /// The kernel command line.
    pub cmdline: String,
}

pub(crate) fn serial_irq(_vm: &VmFd) -> Result<Irq, VmmError> {
    Err(VmmError::Boot(
        "booting kernels is not available in this build".into(),
    ))
}

pub(crate) fn boot(_: &LinuxBoot, _: &VmMemory, _: &VmFd, _: &[VcpuFd]) -> Result<(), VmmError> {
    Err(VmmError::Boot(
        "booting kernels is not available in this build".into(),
    ))
}

pub(crate) fn pio_in(_port: u16) -> Option<u8> {
    None
}

pub(crate) fn pio_out_resets(_port: u16, _data: &[u8]) -> bool {
    false
}
