//! Booting Linux kernels.
//!
//! The kernel is loaded with `linux-loader` through a vm-memory view of the
//! VM's RAM ([`memory::GuestView`]), so every byte goes through the
//! `memory` crate. Two images and two entries are supported:
//!
//! - an ELF vmlinux with a PVH note: entered at the PVH entry in 32-bit
//!   protected mode with EBX = `hvm_start_info` (preferred: no
//!   decompressor runs, which matters where ring-0 code is emulated);
//! - an ELF vmlinux without one, or a bzImage: entered at the 64-bit entry
//!   with RSI = the zero page (`boot_params`).
//!
//! The VM gets an in-kernel irqchip (8259s, I/O APIC, local APICs) and PIT;
//! COM1 raises IRQ 4 through an irqfd; an MP table describes the vCPUs and
//! the I/O APIC. Writing 0xfe to the i8042's command port (or setting the
//! reset bit of port 0xcf9) resets the machine, which ends the VM with
//! [`Exit::Reset`](crate::vm::Exit::Reset).
//!
//! Guest-physical layout of what the VMM writes below 1 MiB; the e820 map
//! marks `[0x80000, 1 MiB)` reserved and the rest of RAM usable:
//!
//! ```text
//!  0x80000 GDT
//!  0x80100 hvm_start_info, 0x80200 its module list, 0x80400 its memory map
//!  0x81000 zero page (boot_params)
//!  0x82000 PML4, 0x83000 PDPT, 0x84000-0x87fff page directories (4 GiB)
//!  0x88000 boot stack (top at 0x89000)
//!  0x89000 MP configuration table (up to 24 KiB)
//!  0x90000 command line (up to 60 KiB)
//!  0x9fc00 MP floating pointer (in the last KiB of base memory)
//! ```
//!
//! The kernel image loads at its own addresses (1 MiB for a bzImage's
//! protected-mode code, the ELF physical addresses for a vmlinux); the
//! initrd goes as high in low RAM as the kernel allows, page aligned.

mod cpu;
mod emulate;
mod mptable;
mod params;

use std::io::Cursor;
use std::ops::Range;
use std::sync::Arc;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{VcpuFd, VmFd};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::{
    BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability, load_cmdline,
};
use memory::{GuestView, MemError, VmMemory};
use thiserror::Error;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::elf::ElfError;
use crate::kvm::ioctl;
use crate::vm::VmmError;
use crate::x86::cpuid;
use crate::x86::program::LOW_END;
use cpu::Entry;
use devices::serial::Irq;
pub(crate) use emulate::emulation_failure;
use params::KernelImage;

pub use params::{E820_RAM, E820_RESERVED, E820Entry, e820_map};

/// The command line used when none is given: the console on COM1 from
/// the first message on (`earlycon`; the ttyS0 driver registers late, which
/// takes minutes where ring 0 is emulated), reboot through the i8042, and
/// a reboot one second after a panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlycon=uart8250,io,0x3f8 reboot=k panic=1";

/// The GSI (ISA IRQ) of COM1.
pub const SERIAL_GSI: u32 = 4;

/// The range below 1 MiB that the VMM's boot data occupies; the e820 map
/// reserves it together with the legacy area up to 1 MiB.
pub const BOOT_AREA: Range<u64> = 0x8_0000..0xa_0000;
const GDT_ADDR: u64 = 0x8_0000;
const START_INFO_ADDR: u64 = 0x8_0100;
const MODLIST_ADDR: u64 = 0x8_0200;
const MEMMAP_ADDR: u64 = 0x8_0400;
const ZERO_PAGE_ADDR: u64 = 0x8_1000;
const PML4_ADDR: u64 = 0x8_2000;
const PDPT_ADDR: u64 = 0x8_3000;
const PD_ADDR: u64 = 0x8_4000;
const STACK_TOP: u64 = 0x8_9000;
const MPTABLE_ADDR: u64 = 0x8_9000;
const MPTABLE_MAX: u64 = 0x6000;
const CMDLINE_ADDR: u64 = 0x9_0000;
const CMDLINE_MAX: u64 = 0xf000;
const MP_FLOATING_ADDR: u64 = 0x9_fc00;
/// Where KVM may put the TSS it needs for real-mode emulation on VMX:
/// three pages in the 32-bit hole, below the BIOS area.
const KVM_TSS_ADDR: usize = 0xfffb_d000;

const _: () = {
    assert!(GDT_ADDR >= BOOT_AREA.start);
    assert!(START_INFO_ADDR + 56 <= MODLIST_ADDR);
    assert!(MODLIST_ADDR + 32 <= MEMMAP_ADDR);
    // The memory map has at most four entries of 24 bytes.
    assert!(MEMMAP_ADDR + 4 * 24 <= ZERO_PAGE_ADDR);
    assert!(ZERO_PAGE_ADDR + 4096 <= PML4_ADDR);
    assert!(PD_ADDR + 4 * 4096 < STACK_TOP);
    assert!(MPTABLE_ADDR + MPTABLE_MAX <= CMDLINE_ADDR);
    assert!(CMDLINE_ADDR + CMDLINE_MAX <= MP_FLOATING_ADDR);
    assert!(MP_FLOATING_ADDR + 16 <= BOOT_AREA.end);
    assert!(BOOT_AREA.end <= LOW_END);
};

/// The i8042's data port.
const I8042_DATA: u16 = 0x60;
/// The i8042's status (read) and command (write) port.
const I8042_COMMAND: u16 = 0x64;
/// The i8042 command that pulses the CPU's reset line.
const I8042_RESET: u8 = 0xfe;
/// The status the i8042 reports: output buffer full, input buffer empty.
/// Linux's probe drains the "full" buffer, finds it never empties and
/// decides there is no controller (no keyboard, quickly); its reboot code
/// sees an empty input buffer and sends the reset command at once.
const I8042_STATUS: u8 = 0x01;
/// The reset control register.
const RESET_CONTROL: u16 = 0xcf9;
/// Its "reset CPU" bit.
const RESET_CPU: u8 = 0x04;

/// Why a kernel could not be booted.
#[derive(Debug, Error)]
pub enum LinuxError {
    /// Not a kernel image at all.
    #[error("the kernel is neither a bzImage nor an ELF vmlinux")]
    Format,
    /// The ELF vmlinux was refused.
    #[error("invalid ELF kernel")]
    Elf(#[source] ElfError),
    /// The bzImage was refused.
    #[error("invalid bzImage: {0}")]
    BzImage(String),
    /// The kernel does not fit in RAM.
    #[error("{0} do not fit in guest RAM; give the VM more with --mem")]
    TooBig(String),
    /// The command line was refused.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// The initrd does not fit.
    #[error(
        "the initrd ({size} bytes) does not fit in the {room} bytes of low RAM above the kernel; \
         give the VM more with --mem"
    )]
    InitrdTooBig {
        /// Its size.
        size: u64,
        /// The room there is.
        room: u64,
    },
    /// More vCPUs than the MP table can describe.
    #[error("--vcpus {0}: a kernel can be given 1 to {max} vCPUs", max = mptable::MAX_CPUS)]
    Vcpus(usize),
    /// linux-loader failed after the checks passed.
    #[error("cannot load the kernel: {0}")]
    Load(String),
    /// Writing boot data failed.
    #[error("cannot write the {what}")]
    Memory {
        /// What was being written.
        what: &'static str,
        /// Why.
        #[source]
        source: MemError,
    },
    /// No eventfd for the serial interrupt.
    #[error("cannot create the serial port's interrupt eventfd")]
    EventFd(#[source] std::io::Error),
}

impl From<LinuxError> for VmmError {
    fn from(e: LinuxError) -> Self {
        VmmError::Boot(crate::error_chain(&e))
    }
}

/// The innermost message of a linux-loader error (its outer layers repeat
/// it with prefixes).
fn loader_message(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(s) = cur.source() {
        cur = s;
    }
    cur.to_string()
}

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

/// Sets up what a kernel's VM needs before its vCPUs exist: the in-kernel
/// irqchip and PIT, and COM1's interrupt (an irqfd on GSI 4), which it
/// returns for the serial device.
pub(crate) fn serial_irq(vm: &VmFd) -> Result<Irq, VmmError> {
    if let Err(e) = vm.set_tss_address(KVM_TSS_ADDR) {
        // Only VMX without unrestricted guest needs it.
        log::debug!("KVM_SET_TSS_ADDR: {e}");
    }
    ioctl("create the interrupt controllers", vm.create_irq_chip())?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    ioctl("create the PIT", vm.create_pit2(pit))?;
    let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(LinuxError::EventFd)?;
    ioctl(
        "route the serial interrupt",
        vm.register_irqfd(&fd, SERIAL_GSI),
    )?;
    Ok(Irq::EventFd(fd))
}

fn mem_err(what: &'static str) -> impl FnOnce(MemError) -> LinuxError {
    move |source| LinuxError::Memory { what, source }
}

/// Loads the kernel, its initrd and command line into `mem` and sets every
/// vCPU's entry state. Every check of the input happens before anything is
/// written.
pub(crate) fn boot(
    linux: &LinuxBoot,
    mem: &Arc<VmMemory>,
    _vm: &VmFd,
    vcpus: &[VcpuFd],
    virtio: &[String],
) -> Result<(), VmmError> {
    let layout = mem.layout();
    if vcpus.is_empty() || vcpus.len() > mptable::MAX_CPUS as usize {
        return Err(LinuxError::Vcpus(vcpus.len()).into());
    }
    let image = KernelImage::parse(&linux.kernel, layout)?;
    // The user's command line is checked alone first, so that an error
    // speaks of what the user wrote.
    params::cmdline(&linux.cmdline, image.max_cmdline())?;
    let (full, added) = kernel_cmdline(linux, &vcpus[0], virtio)?;
    let cmdline = params::cmdline(&full, image.max_cmdline()).map_err(|_| {
        LinuxError::Cmdline(format!(
            "with the `{}` the VMM adds it is {} bytes long; this kernel accepts at most {}",
            added.as_deref().unwrap_or_default(),
            full.len(),
            image.max_cmdline()
        ))
    })?;
    let initrd = match &linux.initrd {
        Some(bytes) if !bytes.is_empty() => {
            let size = bytes.len() as u64;
            let at = params::place_initrd(layout, size, image.end(), image.initrd_addr_max())?;
            Some((at, size))
        }
        _ => None,
    };
    let e820 = params::e820_map(layout);

    let view = GuestView::new(mem);
    let loaded = load_kernel(&view, &linux.kernel, &image)?;
    load_cmdline(&view, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| LinuxError::Load(loader_message(&e)))?;
    if let (Some((at, _)), Some(bytes)) = (initrd, &linux.initrd) {
        mem.write(at, bytes).map_err(mem_err("initrd"))?;
    }

    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(rip) => {
            let (info, map, module) = params::start_info(&e820, initrd, MEMMAP_ADDR, MODLIST_ADDR);
            let mut p = BootParams::new(&info, GuestAddress(START_INFO_ADDR));
            p.set_sections(&map, GuestAddress(MEMMAP_ADDR));
            if let Some(m) = module {
                p.set_modules(&[m], GuestAddress(MODLIST_ADDR));
            }
            PvhBootConfigurator::write_bootparams(&p, &view)
                .map_err(|e| LinuxError::Load(loader_message(&e)))?;
            log::debug!("PVH entry at {:#x}", rip.0);
            Entry::Pvh {
                rip: rip.0,
                start_info: START_INFO_ADDR,
            }
        }
        _ => {
            let rip = match image {
                // The 64-bit entry of a bzImage is 0x200 past its start.
                KernelImage::BzImage { .. } => loaded.kernel_load.0 + 0x200,
                KernelImage::Elf { entry, .. } => entry,
            };
            let zero_page = params::zero_page(loaded.setup_header, &e820, initrd);
            LinuxBootConfigurator::write_bootparams(
                &BootParams::new(&zero_page, GuestAddress(ZERO_PAGE_ADDR)),
                &view,
            )
            .map_err(|e| LinuxError::Load(loader_message(&e)))?;
            log::debug!("64-bit entry at {rip:#x}");
            Entry::Long {
                rip,
                zero_page: ZERO_PAGE_ADDR,
            }
        }
    };

    let table = mptable::config_table(vcpus.len() as u32);
    mem.write(MPTABLE_ADDR, &table)
        .map_err(mem_err("MP table"))?;
    mem.write(
        MP_FLOATING_ADDR,
        &mptable::floating_pointer(MPTABLE_ADDR as u32),
    )
    .map_err(mem_err("MP table"))?;
    cpu::write_tables(mem, entry).map_err(mem_err("descriptor and page tables"))?;
    for (index, vcpu) in vcpus.iter().enumerate() {
        cpu::setup_vcpu(vcpu, (index == 0).then_some(entry))?;
    }
    Ok(())
}

/// The command line the kernel gets: the user's, plus a `clearcpuid=` for
/// the features the VMM hides from kernels if this KVM still shows them
/// (it may not honour `KVM_SET_CPUID2`), plus the `virtio` device entries.
/// A `clearcpuid=` of the user's own is left alone.
fn kernel_cmdline(
    linux: &LinuxBoot,
    vcpu: &VcpuFd,
    virtio: &[String],
) -> Result<(String, Option<String>), VmmError> {
    let (line, added) = cpuid_cmdline(linux, vcpu)?;
    Ok(with_virtio(line, added, virtio))
}

/// Appends the virtio-mmio device entries to a command line.
fn with_virtio(
    mut line: String,
    mut added: Option<String>,
    virtio: &[String],
) -> (String, Option<String>) {
    for entry in virtio {
        line = params::with_param(&line, entry);
        added = Some(match added {
            Some(a) => format!("{a} {entry}"),
            None => entry.clone(),
        });
    }
    (line, added)
}

fn cpuid_cmdline(linux: &LinuxBoot, vcpu: &VcpuFd) -> Result<(String, Option<String>), VmmError> {
    let effective = ioctl(
        "report the vCPU's CPUID",
        vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES),
    )?;
    let (clear, left_out) = cpuid::linux_clearcpuid(&effective);
    if !left_out.is_empty() {
        log::warn!(
            "the kernel may use {} (its clearcpuid= has no room for them)",
            left_out.join(", ")
        );
    }
    let Some(clear) = clear else {
        return Ok((linux.cmdline.clone(), None));
    };
    if linux.cmdline.contains("clearcpuid=") {
        log::warn!(
            "KVM shows the kernel CPU features it cannot emulate in ring 0; \
             the command line's own clearcpuid= should name {clear}"
        );
        return Ok((linux.cmdline.clone(), None));
    }
    log::info!("KVM ignores the CPUID the VMM sets; adding clearcpuid={clear}");
    let param = format!("clearcpuid={clear}");
    Ok((params::with_param(&linux.cmdline, &param), Some(param)))
}

/// Loads the checked `image` with linux-loader.
fn load_kernel(
    view: &GuestView,
    bytes: &[u8],
    image: &KernelImage,
) -> Result<KernelLoaderResult, LinuxError> {
    let mut file = Cursor::new(bytes);
    let highmem = Some(GuestAddress(LOW_END));
    let r = match image {
        KernelImage::Elf { .. } => Elf::load(view, None, &mut file, highmem),
        KernelImage::BzImage { .. } => BzImage::load(view, None, &mut file, highmem),
    };
    r.map_err(|e| LinuxError::Load(loader_message(&e)))
}

/// A kernel's read of a port the VMM emulates here (the i8042).
pub(crate) fn pio_in(port: u16) -> Option<u8> {
    match port {
        I8042_DATA => Some(0),
        I8042_COMMAND => Some(I8042_STATUS),
        _ => None,
    }
}

/// Whether a kernel's write to `port` resets the machine.
pub(crate) fn pio_out_resets(port: u16, data: &[u8]) -> bool {
    match (port, data.first()) {
        (I8042_COMMAND, Some(&I8042_RESET)) => true,
        (RESET_CONTROL, Some(v)) => v & RESET_CPU != 0,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_devices_are_on_the_command_line() {
        let entries = crate::virtio::cmdline_entries(2);
        let (line, added) = with_virtio("console=ttyS0 -- init".into(), None, &entries);
        assert_eq!(
            line,
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 \
             virtio_mmio.device=4K@0xd0001000:6 -- init"
        );
        assert_eq!(
            added.as_deref(),
            Some("virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6")
        );
        assert_eq!(with_virtio("x".into(), None, &[]), ("x".into(), None));
    }

    #[test]
    fn i8042_reset_and_probe() {
        assert!(pio_out_resets(0x64, &[0xfe]));
        assert!(!pio_out_resets(0x64, &[0xaa]));
        assert!(!pio_out_resets(0x60, &[0xfe]));
        assert!(pio_out_resets(0xcf9, &[0x06]));
        assert!(!pio_out_resets(0xcf9, &[0x02]));
        assert!(!pio_out_resets(0x64, &[]));
        // Input buffer empty (bit 1) so a reboot does not wait.
        assert_eq!(pio_in(0x64).map(|s| s & 2), Some(0));
        assert_eq!(pio_in(0x3f8), None);
    }
}
