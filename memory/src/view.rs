//! A vm-memory view of a VM's RAM, for rust-vmm crates (linux-loader and
//! friends) that read and write guest memory through `vm_memory` traits.
//!
//! Every slice handed out is first made writable for this VM by a write
//! fault (vm-memory's backend trait does not say whether a slice will be
//! written, so the view assumes it will; the worst outcome is an
//! unnecessary copy). Slices point into the frame stores' direct maps, which
//! are always read-write, so a slice never faults in the VMM. A slice is
//! coherent with the guest only until the next fork of the VM: devices that
//! keep buffers use pins instead.
//!
//! A slice spanning pages whose frames sit in different stores (possible
//! after a fork) is refused with `HostAddressNotAvailable`; callers then
//! access such ranges a page at a time.

use std::io;

use vm_memory::bitmap::BS;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes,
    GuestUsize, MemoryRegionAddress, VolatileSlice,
};

use crate::entry::Entry;
use crate::layout::{PAGE_SIZE, RamRange};
use crate::vm::{Access, VmMemory};
use std::sync::Arc;

/// The RAM of one VM as a `vm_memory::GuestMemoryBackend`.
#[derive(Debug)]
pub struct GuestView {
    regions: Vec<ViewRegion>,
}

impl GuestView {
    /// A view of `vm`'s RAM; it keeps the VM's memory alive.
    pub fn new(vm: &Arc<VmMemory>) -> Self {
        let regions = vm
            .layout()
            .ranges()
            .iter()
            .map(|r| ViewRegion {
                vm: vm.clone(),
                range: *r,
            })
            .collect();
        Self { regions }
    }
}

impl GuestMemoryBackend for GuestView {
    type R = ViewRegion;

    fn iter(&self) -> impl Iterator<Item = &Self::R> {
        self.regions.iter()
    }
}

/// One RAM range of a [`GuestView`].
#[derive(Debug)]
pub struct ViewRegion {
    vm: Arc<VmMemory>,
    range: RamRange,
}

impl GuestMemoryRegionBytes for ViewRegion {}

fn io_err(e: impl std::error::Error + Send + Sync + 'static) -> GuestMemoryError {
    GuestMemoryError::IOError(io::Error::other(e))
}

impl GuestMemoryRegion for ViewRegion {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.range.len
    }

    fn start_addr(&self) -> GuestAddress {
        GuestAddress(self.range.gpa)
    }

    fn bitmap(&self) -> BS<'_, Self::B> {}

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> Result<VolatileSlice<'_, BS<'_, Self::B>>, GuestMemoryError> {
        let start = offset.0;
        let end = start
            .checked_add(count as u64)
            .filter(|e| *e <= self.range.len)
            .ok_or(GuestMemoryError::InvalidBackendAddress)?;
        let first = self.range.first_page + start / PAGE_SIZE;
        let last = self.range.first_page + end.saturating_sub(1).max(start) / PAGE_SIZE;
        let mut store = None;
        for page in first..=last {
            let s = self
                .vm
                .with_page(page, Access::Write, |_| match self.vm.table.get(page) {
                    Entry::Present { store, .. } => store,
                    _ => unreachable!("with_page runs on a present entry"),
                })
                .map_err(io_err)?;
            if *store.get_or_insert(s) != s {
                return Err(GuestMemoryError::HostAddressNotAvailable);
            }
        }
        let store = self.vm.store(store.expect("at least one page"));
        let ptr = store
            .frame_ptr(first)
            .wrapping_add((start % PAGE_SIZE) as usize);
        // SAFETY: `ptr..ptr+count` lies within consecutive frames of one
        // store's direct map (checked above), which stays mapped while the
        // VM's memory, held by `self`, lives: stores are never removed from
        // a live VM's list.
        Ok(unsafe { VolatileSlice::new(ptr, count) })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::{Config, Context, Layout};
    use vm_memory::Bytes;

    #[test]
    fn bytes_roundtrip_across_ranges() {
        let ctx = Context::new(Config::default());
        let layout = Layout::new(&[(0, 0x10000), (0x100000, 0x10000)]).unwrap();
        let vm = VmMemory::new(&ctx, layout).unwrap();
        let view = GuestView::new(&vm);
        view.write_slice(&[7u8; 0x3000], GuestAddress(0xf000 - 0x1000))
            .unwrap_err();
        view.write_slice(&[7u8; 0x2000], GuestAddress(0xe000))
            .unwrap();
        let mut back = [0u8; 0x2000];
        vm.read(0xe000, &mut back).unwrap();
        assert_eq!(back, [7u8; 0x2000]);
        view.write_obj(0x1122_3344u32, GuestAddress(0x100ffc))
            .unwrap();
        assert_eq!(
            view.read_obj::<u32>(GuestAddress(0x100ffc)).unwrap(),
            0x1122_3344
        );
        assert!(view.read_obj::<u64>(GuestAddress(0x10fffc)).is_err());
    }
}
