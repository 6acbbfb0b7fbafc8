//! What the kernel reads at boot, built as plain values: the checked
//! kernel image, the e820 map, the command line, where the initrd goes, the
//! zero page (`boot_params`) and the PVH start info. Nothing here touches
//! KVM or guest memory.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::cmdline::Cmdline;
use linux_loader::start_info::{
    XEN_HVM_START_MAGIC_VALUE, hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use memory::{Layout, PAGE_SIZE};

use super::{BOOT_AREA, CMDLINE_ADDR, CMDLINE_MAX, LinuxError};
use crate::elf::Program;
use crate::x86::program::LOW_END;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// `HdrS`, the setup header's magic.
const HDRS: u32 = 0x5372_6448;
/// The boot sector signature.
const BOOT_FLAG: u16 = 0xaa55;
/// `type_of_loader` for a boot loader without an assigned id.
const LOADER_UNDEFINED: u8 = 0xff;
/// Setup header loadflags: the protected-mode code loads at 1 MiB.
const LOADED_HIGH: u8 = 1;
/// Setup header xloadflags: the kernel has a 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// The oldest boot protocol with a 64-bit entry (2.12).
const MIN_BZIMAGE_VERSION: u16 = 0x020c;
/// Where the setup header starts in a bzImage.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// Command line bytes (with the NUL) an x86 kernel keeps
/// (`COMMAND_LINE_SIZE`); used when the image does not say.
const DEFAULT_CMDLINE_SIZE: usize = 2048;
/// Where the decompressor of a non-relocated bzImage puts the kernel.
const DEFAULT_BZIMAGE_LOAD: u64 = 16 << 20;

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The memory map the guest sees: the VMM's boot area and the legacy
/// region up to 1 MiB reserved, every other byte of RAM usable. Nothing
/// outside RAM is listed, so the virtio-mmio window and the rest of the
/// 32-bit hole above low RAM stay out of the map.
pub fn e820_map(layout: &Layout) -> Vec<E820Entry> {
    let mut map = Vec::new();
    let reserved = BOOT_AREA.start..LOW_END;
    for r in layout.ranges() {
        let (start, end) = (r.gpa, r.gpa + r.len);
        // The part below the reserved area, then the part above it.
        for (s, e) in [
            (start, end.min(reserved.start)),
            (start.max(reserved.end), end),
        ] {
            if s < e {
                map.push(E820Entry {
                    addr: s,
                    size: e - s,
                    kind: E820_RAM,
                });
            }
        }
    }
    map.push(E820Entry {
        addr: reserved.start,
        size: reserved.end - reserved.start,
        kind: E820_RESERVED,
    });
    map.sort_by_key(|e| e.addr);
    map
}

/// A kernel image that passed every check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelImage {
    /// An ELF vmlinux.
    Elf {
        /// The 64-bit entry (`e_entry`, physical).
        entry: u64,
        /// First byte past the highest segment.
        end: u64,
    },
    /// A bzImage.
    BzImage {
        /// Setup bytes before the protected-mode code.
        setup_size: u64,
        /// Where the protected-mode code loads (`code32_start`).
        load: u64,
        /// Bytes of protected-mode code.
        payload: u64,
        /// Highest address the initrd may end at, inclusive.
        initrd_addr_max: u64,
        /// Longest command line, without the NUL.
        cmdline_size: usize,
        /// First byte past what the decompressor uses when not relocating.
        end: u64,
    },
}

impl KernelImage {
    /// Checks `bytes` as a kernel for a VM with RAM `layout`.
    pub fn parse(bytes: &[u8], layout: &Layout) -> Result<Self, LinuxError> {
        if bytes.starts_with(b"\x7fELF") {
            let program = Program::parse(bytes.to_vec(), layout).map_err(LinuxError::Elf)?;
            let end = program
                .segments
                .iter()
                .map(|s| s.paddr + s.memsz)
                .max()
                .unwrap_or(0);
            return Ok(KernelImage::Elf {
                entry: program.entry,
                end,
            });
        }
        Self::parse_bzimage(bytes, layout)
    }

    fn parse_bzimage(bytes: &[u8], layout: &Layout) -> Result<Self, LinuxError> {
        let hdr = read_setup_header(bytes).ok_or(LinuxError::Format)?;
        if { hdr.boot_flag } != BOOT_FLAG || { hdr.header } != HDRS {
            return Err(LinuxError::Format);
        }
        let version = hdr.version;
        if version < MIN_BZIMAGE_VERSION {
            return Err(LinuxError::BzImage(format!(
                "boot protocol {}.{:02} is older than 2.12, which has the 64-bit entry",
                version >> 8,
                version & 0xff
            )));
        }
        if hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(LinuxError::BzImage(
                "the kernel has no 64-bit entry (XLF_KERNEL_64 is clear)".into(),
            ));
        }
        if hdr.loadflags & LOADED_HIGH == 0 {
            return Err(LinuxError::BzImage(
                "the kernel does not load at 1 MiB (LOADED_HIGH is clear)".into(),
            ));
        }
        let sects = match hdr.setup_sects {
            0 => 4,
            n => u64::from(n),
        };
        let setup_size = (sects + 1) * 512;
        let len = bytes.len() as u64;
        if setup_size >= len {
            return Err(LinuxError::BzImage(format!(
                "the setup code ({setup_size} bytes) leaves no kernel in a {len}-byte file"
            )));
        }
        let payload = len - setup_size;
        let load = u64::from(hdr.code32_start);
        if load < LOW_END || !layout.contains(load, payload) {
            return Err(LinuxError::TooBig(format!(
                "the kernel's {payload:#x} bytes at {load:#x}"
            )));
        }
        let (init_start, init_size) = (
            hdr.pref_address.max(DEFAULT_BZIMAGE_LOAD),
            u64::from(hdr.init_size),
        );
        let init_end = init_start.saturating_add(init_size);
        if init_end > low_end(layout) {
            return Err(LinuxError::TooBig(format!(
                "the decompressed kernel's {init_size:#x} bytes at {init_start:#x}"
            )));
        }
        Ok(KernelImage::BzImage {
            setup_size,
            load,
            payload,
            initrd_addr_max: u64::from(hdr.initrd_addr_max),
            cmdline_size: hdr.cmdline_size as usize,
            end: (load + payload).max(init_end),
        })
    }

    /// First byte past what the kernel occupies before it relocates itself.
    pub fn end(&self) -> u64 {
        match *self {
            KernelImage::Elf { end, .. } | KernelImage::BzImage { end, .. } => end,
        }
    }

    /// The longest command line the kernel accepts, without the NUL.
    pub fn max_cmdline(&self) -> usize {
        let n = match *self {
            KernelImage::Elf { .. } => DEFAULT_CMDLINE_SIZE - 1,
            KernelImage::BzImage { cmdline_size, .. } => cmdline_size,
        };
        n.min(CMDLINE_MAX as usize - 1)
    }

    /// The highest address the initrd may end at, inclusive.
    pub fn initrd_addr_max(&self) -> u64 {
        match *self {
            KernelImage::Elf { .. } => u64::from(u32::MAX),
            KernelImage::BzImage {
                initrd_addr_max, ..
            } => initrd_addr_max,
        }
    }
}

/// End of low RAM (RAM that starts at 0).
fn low_end(layout: &Layout) -> u64 {
    layout.ranges()[0].gpa + layout.ranges()[0].len
}

/// Reads the setup header of what may be a bzImage.
pub fn read_setup_header(bytes: &[u8]) -> Option<setup_header> {
    use vm_memory::ByteValued;
    let mut hdr = setup_header::default();
    let raw = bytes.get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size_of::<setup_header>())?;
    hdr.as_mut_slice().copy_from_slice(raw);
    Some(hdr)
}

/// The command line as the kernel will read it, at most `max_len` bytes
/// (without the NUL).
pub fn cmdline(s: &str, max_len: usize) -> Result<Cmdline, LinuxError> {
    if s.len() > max_len {
        return Err(LinuxError::Cmdline(format!(
            "it is {} bytes long; this kernel accepts at most {max_len}",
            s.len()
        )));
    }
    if let Some(c) = s.chars().find(|c| !matches!(c, ' '..='~')) {
        return Err(LinuxError::Cmdline(format!(
            "it contains {c:?}; only printable ASCII is allowed"
        )));
    }
    Cmdline::try_from(s, max_len + 1).map_err(|e| LinuxError::Cmdline(e.to_string()))
}

/// `cmdline` with `param` added to the kernel's own parameters (before a
/// ` -- ` that starts the arguments for init).
pub fn with_param(cmdline: &str, param: &str) -> String {
    let (kernel, init) = match cmdline.find(" -- ") {
        Some(at) => cmdline.split_at(at),
        None => (cmdline, ""),
    };
    let kernel = kernel.trim_end();
    if kernel.is_empty() {
        format!("{param}{init}")
    } else {
        format!("{kernel} {param}{init}")
    }
}

/// Where an initrd of `size` bytes goes: page aligned, as high in low RAM
/// as allowed (below 4 GiB and `addr_max`), above the kernel.
pub fn place_initrd(
    layout: &Layout,
    size: u64,
    kernel_end: u64,
    addr_max: u64,
) -> Result<u64, LinuxError> {
    let top = low_end(layout).min(addr_max.saturating_add(1)).min(1 << 32);
    let floor = kernel_end.next_multiple_of(PAGE_SIZE).max(LOW_END);
    match top.checked_sub(size) {
        Some(start) if start & !(PAGE_SIZE - 1) >= floor => Ok(start & !(PAGE_SIZE - 1)),
        _ => Err(LinuxError::InitrdTooBig {
            size,
            room: top.saturating_sub(floor),
        }),
    }
}

/// The zero page for the 64-bit entry. `hdr` is the bzImage's setup
/// header; an ELF vmlinux has none and gets a minimal one.
pub fn zero_page(
    hdr: Option<setup_header>,
    e820: &[E820Entry],
    initrd: Option<(u64, u64)>,
) -> boot_params {
    let mut p = boot_params {
        hdr: hdr.unwrap_or_else(|| setup_header {
            boot_flag: BOOT_FLAG,
            header: HDRS,
            kernel_alignment: 1 << 24,
            ..Default::default()
        }),
        ..Default::default()
    };
    p.hdr.type_of_loader = LOADER_UNDEFINED;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.ext_cmd_line_ptr = 0;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
        p.ext_ramdisk_image = (addr >> 32) as u32;
        p.ext_ramdisk_size = (size >> 32) as u32;
    }
    for (slot, e) in p.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    p.e820_entries = e820.len().min(p.e820_table.len()) as u8;
    p
}

/// The PVH start info and what it points at: the memory map and, with an
/// initrd, its module entry. `memmap` and `modlist` are the addresses
/// the two tables will be written at.
pub fn start_info(
    e820: &[E820Entry],
    initrd: Option<(u64, u64)>,
    memmap: u64,
    modlist: u64,
) -> (
    hvm_start_info,
    Vec<hvm_memmap_table_entry>,
    Option<hvm_modlist_entry>,
) {
    let map: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let module = initrd.map(|(paddr, size)| hvm_modlist_entry {
        paddr,
        size,
        ..Default::default()
    });
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        nr_modules: u32::from(module.is_some()),
        modlist_paddr: if module.is_some() { modlist } else { 0 },
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: memmap,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    (info, map, module)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::ram_layout;
    use crate::x86::program::{MMIO_BASE, MMIO_SIZE};

    const GIB: u64 = 1 << 30;

    fn ram(map: &[E820Entry]) -> Vec<(u64, u64)> {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| (e.addr, e.addr + e.size))
            .collect()
    }

    #[test]
    fn e820_reserves_the_boot_area_and_follows_ram() {
        let map = e820_map(&ram_layout(256 << 20).unwrap());
        assert_eq!(
            ram(&map),
            [(0, BOOT_AREA.start), (LOW_END, 256 << 20)],
            "{map:x?}"
        );
        assert!(map.contains(&E820Entry {
            addr: BOOT_AREA.start,
            size: LOW_END - BOOT_AREA.start,
            kind: E820_RESERVED
        }));
        assert!(map.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr));
    }

    #[test]
    fn e820_splits_at_3_gib_and_skips_the_mmio_window() {
        let map = e820_map(&ram_layout(5 * GIB).unwrap());
        assert_eq!(
            ram(&map),
            [(0, BOOT_AREA.start), (LOW_END, 3 * GIB), (4 * GIB, 6 * GIB)]
        );
        for e in &map {
            let end = e.addr + e.size;
            assert!(
                end <= MMIO_BASE || e.addr >= MMIO_BASE + MMIO_SIZE,
                "{e:x?} covers the virtio-mmio window"
            );
        }
    }

    #[test]
    fn cmdline_is_checked() {
        let c = cmdline("console=ttyS0 panic=1 -- init_arg", 100).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 panic=1 -- init_arg"
        );
        assert!(cmdline("", 10).is_ok());
        let long = "x".repeat(2048);
        let e = cmdline(&long, 2047).unwrap_err().to_string();
        assert!(e.contains("2048 bytes long") && e.contains("2047"), "{e}");
        assert!(cmdline("a\nb", 10).is_err());
        assert!(cmdline("é", 10).is_err());
    }

    #[test]
    fn parameters_go_before_init_arguments() {
        assert_eq!(with_param("console=ttyS0", "a=b"), "console=ttyS0 a=b");
        assert_eq!(with_param("", "a=b"), "a=b");
        assert_eq!(
            with_param("console=ttyS0 -- single", "a=b"),
            "console=ttyS0 a=b -- single"
        );
    }

    #[test]
    fn elf_kernels_accept_2047_byte_command_lines() {
        let k = KernelImage::Elf {
            entry: 0x100_0000,
            end: 0x200_0000,
        };
        assert_eq!(k.max_cmdline(), 2047);
        assert!(cmdline(&"y".repeat(2047), k.max_cmdline()).is_ok());
    }

    #[test]
    fn initrd_goes_high_page_aligned_and_inside_low_ram() {
        let layout = ram_layout(256 << 20).unwrap();
        let a = place_initrd(&layout, 0x1234, 0x300_0000, u64::MAX).unwrap();
        assert_eq!(a % PAGE_SIZE, 0);
        assert!(a + 0x1234 <= 256 << 20 && a + 0x1234 + PAGE_SIZE > 256 << 20);
        // The kernel's limit wins over the top of RAM.
        let a = place_initrd(&layout, 0x1000, 0x300_0000, 0x7ff_ffff).unwrap();
        assert_eq!(a, 0x800_0000 - 0x1000);
        // Above 3 GiB of RAM it still ends below 3 GiB.
        let layout = ram_layout(8 * GIB).unwrap();
        let a = place_initrd(&layout, 1 << 20, 0x300_0000, u64::MAX).unwrap();
        assert_eq!(a + (1 << 20), 3 * GIB);
    }

    #[test]
    fn an_initrd_too_big_is_refused() {
        let layout = ram_layout(64 << 20).unwrap();
        let e = place_initrd(&layout, 60 << 20, 0x300_0000, u64::MAX).unwrap_err();
        assert!(matches!(e, LinuxError::InitrdTooBig { .. }), "{e}");
        assert!(e.to_string().contains("--mem"), "{e}");
        assert!(place_initrd(&layout, u64::MAX, 0, u64::MAX).is_err());
    }

    #[test]
    fn zero_page_for_a_vmlinux() {
        let map = e820_map(&ram_layout(5 * GIB).unwrap());
        let p = zero_page(None, &map, Some((0x7000_0000, 0x12345)));
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, HDRS);
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr } as u64, CMDLINE_ADDR);
        assert_eq!({ p.hdr.ramdisk_image }, 0x7000_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x12345);
        assert_eq!(p.e820_entries as usize, map.len());
        let last = p.e820_table[map.len() - 1];
        assert_eq!(({ last.addr }, { last.size }), (4 * GIB, 2 * GIB));
        assert_eq!({ last.r#type }, E820_RAM);
        // The layout the kernel reads: e820_entries at 0x1e8, the table at
        // 0x2d0, 20 bytes an entry.
        use vm_memory::ByteValued;
        let bytes = p.as_slice();
        assert_eq!(bytes[0x1e8] as usize, map.len());
        assert_eq!(
            u64::from_le_bytes(bytes[0x2d0 + 20..0x2d0 + 28].try_into().unwrap()),
            map[1].addr
        );
        assert_eq!(&bytes[0x202..0x206], b"HdrS");
    }

    #[test]
    fn zero_page_keeps_a_bzimage_header() {
        let hdr = setup_header {
            version: 0x020f,
            code32_start: 0x10_0000,
            loadflags: LOADED_HIGH,
            ..Default::default()
        };
        let p = zero_page(Some(hdr), &[], None);
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.code32_start }, 0x10_0000);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        assert_eq!(p.hdr.type_of_loader, 0xff);
    }

    #[test]
    fn start_info_points_at_its_tables() {
        let map = e820_map(&ram_layout(256 << 20).unwrap());
        let (info, mm, module) = start_info(&map, Some((0x800_0000, 0x1000)), 0x8_0400, 0x8_0200);
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.memmap_entries as usize, mm.len());
        assert_eq!(
            (info.memmap_paddr, info.modlist_paddr),
            (0x8_0400, 0x8_0200)
        );
        assert_eq!(info.cmdline_paddr, CMDLINE_ADDR);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(module.unwrap().paddr, 0x800_0000);
        let (info, _, module) = start_info(&map, None, 0x8_0400, 0x8_0200);
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
        assert!(module.is_none());
    }

    fn bzimage(setup_sects: u8, version: u16, xloadflags: u16, len: usize) -> Vec<u8> {
        use vm_memory::ByteValued;
        let hdr = setup_header {
            setup_sects,
            boot_flag: BOOT_FLAG,
            header: HDRS,
            version,
            loadflags: LOADED_HIGH,
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7fff_ffff,
            xloadflags,
            cmdline_size: 2047,
            pref_address: 0x100_0000,
            init_size: 0x100_0000,
            ..Default::default()
        };
        let mut b = vec![0u8; len];
        b[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size_of::<setup_header>()]
            .copy_from_slice(hdr.as_slice());
        b
    }

    #[test]
    fn bzimage_headers_are_checked() {
        let layout = ram_layout(256 << 20).unwrap();
        let k = KernelImage::parse(&bzimage(3, 0x020f, 1, 0x10000), &layout).unwrap();
        assert_eq!(
            k,
            KernelImage::BzImage {
                setup_size: 0x800,
                load: 0x10_0000,
                payload: 0x10000 - 0x800,
                initrd_addr_max: 0x7fff_ffff,
                cmdline_size: 2047,
                end: 0x200_0000,
            }
        );
        assert_eq!(k.max_cmdline(), 2047);
        let err = |b: Vec<u8>| KernelImage::parse(&b, &layout).unwrap_err().to_string();
        assert!(err(bzimage(3, 0x020b, 1, 0x10000)).contains("2.11"));
        assert!(err(bzimage(3, 0x020f, 0, 0x10000)).contains("64-bit"));
        assert!(err(bzimage(60, 0x020f, 1, 0x1000)).contains("no kernel"));
        assert!(err(vec![0u8; 100]).contains("neither"));
        assert!(err(vec![]).contains("neither"));
        let small = ram_layout(16 << 20).unwrap();
        let e = KernelImage::parse(&bzimage(3, 0x020f, 1, 0x10000), &small).unwrap_err();
        assert!(e.to_string().contains("--mem"), "{e}");
    }

    #[test]
    fn elf_kernels_are_checked() {
        let layout = ram_layout(64 << 20).unwrap();
        let e = KernelImage::parse(b"\x7fELF\x02\x01", &layout).unwrap_err();
        assert!(matches!(e, LinuxError::Elf(_)), "{e}");
    }
}
