//! KVM's record of the pages a guest wrote, for resets: the dirty ring
//! (one ring per vCPU, read without a system call), or the dirty log
//! bitmap on hosts without the ring.
//!
//! # Dirty ring
//! KVM appends `(slot, offset)` for each page the guest writes after it was
//! write-protected; the VMM reads entries marked DIRTY from its cursor on,
//! marks them RESET, and `KVM_RESET_DIRTY_RINGS` write-protects those pages
//! again and frees the entries:
//!
//! ```text
//!   ring (mmap of the vCPU fd at KVM_DIRTY_LOG_PAGE_OFFSET pages)
//!   [RESET][RESET][DIRTY][DIRTY][ 0 ][ 0 ] ...
//!                   ^ cursor: next entry to read
//! ```
//!
//! Cost grows with the pages a run wrote, never with RAM size.
//!
//! Entries may also be collected without `KVM_RESET_DIRTY_RINGS`
//! ([`Dirty::harvest`] with `rearm` false): their pages then stay writable
//! in KVM, and the guest writes them again without a fault and without a
//! new entry. A fuzzing clone does this for the pages its runs keep
//! writing (restoring such a page every run costs a 4 KiB copy; taking
//! write access back and the next run's fault on it cost much more here),
//! and so must restore all of them after every run.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{Ordering, fence};

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_DIRTY_LOG_PAGE_OFFSET, KVM_MEM_LOG_DIRTY_PAGES, kvm_dirty_gfn,
    kvm_enable_cap,
};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use memory::VmMemory;

use crate::kvm::{Hypervisor, KvmError, add_memslots, ioctl};

/// Entries per vCPU ring: a run that writes more pages makes KVM stop the
/// vCPU (ring full) so the VMM harvests early.
const RING_ENTRIES: u32 = 4096;
const DIRTY: u32 = 1;
const RESET: u32 = 2;

vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);

/// How a VM's writes are tracked.
#[derive(Debug)]
pub(crate) enum Tracking {
    /// Per-vCPU dirty rings of this many bytes.
    Ring(u32),
    /// The dirty log bitmap.
    Log,
}

impl Hypervisor {
    /// Creates a VM over `mem` whose memslots log dirty pages, with dirty
    /// rings where KVM offers them.
    pub(crate) fn create_vm_tracked(&self, mem: &VmMemory) -> Result<(VmFd, Tracking), KvmError> {
        let vm = ioctl("create a VM", self.kvm().create_vm())?;
        let max = vm.check_extension_int(Cap::DirtyLogRing);
        let bytes = RING_ENTRIES * std::mem::size_of::<kvm_dirty_gfn>() as u32;
        let tracking = if max >= bytes as i32 {
            let cap = kvm_enable_cap {
                cap: KVM_CAP_DIRTY_LOG_RING,
                args: [u64::from(bytes), 0, 0, 0],
                ..Default::default()
            };
            ioctl("enable the dirty ring", vm.enable_cap(&cap))?;
            Tracking::Ring(bytes)
        } else {
            Tracking::Log
        };
        add_memslots(&vm, mem, KVM_MEM_LOG_DIRTY_PAGES)?;
        Ok((vm, tracking))
    }
}

/// Where a VM's written pages are read from.
#[derive(Debug)]
pub(crate) enum Dirty {
    /// One vCPU's ring.
    Ring(Ring),
    /// The dirty log of each memslot: (slot, first page, pages).
    Log(Vec<(u32, u64, u64)>),
}

impl Dirty {
    /// The tracker for vCPU `fd` of a VM created by
    /// [`Hypervisor::create_vm_tracked`].
    pub(crate) fn new(fd: &VcpuFd, tracking: &Tracking, mem: &VmMemory) -> io::Result<Self> {
        Ok(match tracking {
            Tracking::Ring(bytes) => Dirty::Ring(Ring::map(fd, *bytes)?),
            Tracking::Log => Dirty::Log(
                mem.layout()
                    .ranges()
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (i as u32, r.first_page, r.len / memory::PAGE_SIZE))
                    .collect(),
            ),
        })
    }

    /// Appends the page numbers written since the last harvest to `out`
    /// (memslot `i` is `mem`'s RAM range `i`). With `rearm`, KVM
    /// write-protects them again, and every page collected unarmed before
    /// them; without, a ring leaves them writable (see the module's
    /// documentation). Returns whether the pages are armed again (the
    /// dirty log always re-arms).
    pub(crate) fn harvest(
        &mut self,
        vm: &VmFd,
        mem: &VmMemory,
        out: &mut Vec<u64>,
        rearm: bool,
    ) -> io::Result<bool> {
        match self {
            Dirty::Ring(ring) => {
                let ranges = mem.layout().ranges();
                let n = ring.collect(|slot, offset| {
                    if let Some(r) = ranges.get(slot as usize) {
                        out.push(r.first_page + offset);
                    }
                });
                ring.unarmed |= n > 0;
                if rearm && ring.unarmed {
                    reset_rings(vm)?;
                    ring.unarmed = false;
                }
                Ok(rearm)
            }
            Dirty::Log(slots) => {
                for &(slot, first, pages) in slots.iter() {
                    let words = vm
                        .get_dirty_log(slot, (pages * memory::PAGE_SIZE) as usize)
                        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
                    for (w, mut bits) in words.into_iter().enumerate() {
                        while bits != 0 {
                            let b = u64::from(bits.trailing_zeros());
                            out.push(first + w as u64 * 64 + b);
                            bits &= bits - 1;
                        }
                    }
                }
                Ok(true)
            }
        }
    }
}

/// Write-protects again the pages of every entry marked RESET.
fn reset_rings(vm: &VmFd) -> io::Result<()> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and touches only
    // KVM's state of this VM, whose fd is open.
    let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS() as _) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One vCPU's dirty ring, mapped from its fd.
#[derive(Debug)]
pub(crate) struct Ring {
    base: *mut kvm_dirty_gfn,
    entries: u32,
    cursor: u32,
    /// Entries were collected since the last `KVM_RESET_DIRTY_RINGS`.
    unarmed: bool,
}

// SAFETY: the ring is a mapping owned by this value; only the thread that
// owns the value reads or writes it (KVM writes it concurrently by design,
// through the flags protocol).
unsafe impl Send for Ring {}

impl Ring {
    fn map(fd: &VcpuFd, bytes: u32) -> io::Result<Self> {
        let page = memory::PAGE_SIZE as libc::off_t;
        // SAFETY: maps a new shared region of the vCPU fd at the offset KVM
        // defines for the dirty ring; no existing mapping is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * page,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            base: p.cast(),
            entries: bytes / std::mem::size_of::<kvm_dirty_gfn>() as u32,
            cursor: 0,
            unarmed: false,
        })
    }

    /// Calls `f(slot, offset)` for each entry KVM published since the last
    /// call and marks it for reset; returns how many.
    fn collect(&mut self, mut f: impl FnMut(u32, u64)) -> usize {
        let mut n = 0;
        loop {
            let e = self
                .base
                .wrapping_add((self.cursor % self.entries) as usize);
            // The entry's fields: flags (u32), slot (u32), offset (u64).
            let flags_ptr = e.cast::<u32>();
            let slot_ptr = flags_ptr.wrapping_add(1);
            let offset_ptr = e.cast::<u64>().wrapping_add(1);
            // SAFETY: `e` lies inside the mapped ring (index modulo its
            // length); KVM publishes an entry by setting its flags last.
            let flags = unsafe { flags_ptr.read_volatile() };
            if flags & DIRTY == 0 {
                return n;
            }
            fence(Ordering::Acquire);
            // SAFETY: as above; a published entry's fields are stable until
            // it is reset.
            let slot = unsafe { slot_ptr.read_volatile() };
            // SAFETY: as above.
            let offset = unsafe { offset_ptr.read_volatile() };
            f(slot, offset);
            fence(Ordering::Release);
            // SAFETY: as above; RESET hands the entry back to KVM.
            unsafe { flags_ptr.write_volatile(RESET) };
            self.cursor = self.cursor.wrapping_add(1);
            n += 1;
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let bytes = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmaps the ring this value mapped and owns; nothing reads
        // it after this.
        unsafe { libc::munmap(self.base.cast(), bytes) };
    }
}
