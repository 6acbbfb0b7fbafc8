//! What all VMs of one process share: configuration and counters.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{OnceLock, Weak};

use crate::lock::{Rank, RankedMutex};
use std::sync::Arc;

use crate::image::{AREAS, Image, ImageError, split_slot};
use crate::store::Store;
use crate::swap::{PageBuf, Swap, SwapError};
use crate::sync::{AtomicU64, Ordering};
use crate::vm::VmMemory;

/// Tunables of the memory system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Pages made present together on a first touch (a power of two, 1 to
    /// 512), within the aligned block around the touched page. Linux
    /// faults file pages around in 64 KiB blocks; doing the same for fresh
    /// guest pages saves exits. Frames stay holes in their store until
    /// written, so an untouched page of a block costs no host memory.
    pub fault_around: u64,
    /// The swap file: a new or empty file, or (`None`) an unlinked file in
    /// the temporary directory. Opened on the first swap-out.
    pub swap_file: Option<PathBuf>,
    /// Huge mappings: a first touch of an empty, 2 MiB-aligned block of
    /// RAM maps it whole with one 2 MiB frame and one huge entry. Check
    /// the host with [`crate::huge_pages_available`] first.
    pub huge: bool,
    /// What a guest write to a 2 MiB block shared after a fork copies
    /// (see [`HugeCow`]).
    pub huge_cow: HugeCow,
}

/// What a guest write to a huge entry shared after a fork copies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HugeCow {
    /// The 4 KiB page written; the entry is split (Linux's choice).
    Page,
    /// The whole 2 MiB block, into a new huge frame.
    Block,
    /// The page written first; when the same VM's next copy-on-write fault
    /// hits the same block, the block is collapsed into a new huge frame
    /// (one 2 MiB copy instead of up to 510 more faults). The default:
    /// `vmm bench --only huge` measures the three.
    #[default]
    Adaptive,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            fault_around: 16,
            swap_file: None,
            huge: false,
            huge_cow: HugeCow::default(),
        }
    }
}

/// Process-wide counters. Each is exact at any quiescent point.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) resident: AtomicU64,
    pub(crate) shared: AtomicU64,
    pub(crate) copied: AtomicU64,
    pub(crate) pins: AtomicU64,
    pub(crate) swap_ins: AtomicU64,
    pub(crate) migrated: AtomicU64,
    pub(crate) wp_events: AtomicU64,
    pub(crate) migration_wait_max_ns: AtomicU64,
    pub(crate) stores: AtomicU64,
    pub(crate) first_touch: AtomicU64,
    pub(crate) reused: AtomicU64,
    pub(crate) host_faults: AtomicU64,
    pub(crate) image_loads: AtomicU64,
    pub(crate) huge_maps: AtomicU64,
    pub(crate) huge_splits: AtomicU64,
    pub(crate) collapses: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Frames allocated and not yet freed.
    pub resident: u64,
    /// Frames mapped by more than one VM.
    pub shared: u64,
    /// Frames copied by write or unshare faults and at fork.
    pub copied: u64,
    /// Pins held.
    pub pins: u64,
    /// Pages in swap.
    pub swapped: u64,
    /// Pages read back from swap.
    pub swap_ins: u64,
    /// Pages moved to new frames.
    pub migrated: u64,
    /// Writes reported to write-protect listeners.
    pub wp_events: u64,
    /// Frame stores open.
    pub stores: u64,
    /// First-touch faults (each may make several pages present).
    pub first_touch: u64,
    /// Write faults that reused the frame instead of copying it.
    pub reused: u64,
    /// Faults resolved for the guest (any kind).
    pub host_faults: u64,
    /// The longest any access waited for a page under migration, in ns.
    pub migration_wait_max_ns: u64,
    /// Pages read from snapshot memory files by restored VMs.
    pub image_loads: u64,
    /// Entries that still name a page of a snapshot memory file.
    pub image_pages: u64,
    /// Huge entries made by first touches.
    pub huge_maps: u64,
    /// Huge entries split into small ones.
    pub huge_splits: u64,
    /// Huge entries made by collapsing small ones.
    pub collapses: u64,
}

impl StatsSnapshot {
    /// The counters in the order of the guest ABI's STATS call: the first
    /// eight are fixed by the ABI, later ones are appended.
    pub fn to_abi(&self) -> [u64; 17] {
        [
            self.resident,
            self.shared,
            self.copied,
            self.pins,
            self.swapped,
            self.swap_ins,
            self.migrated,
            self.wp_events,
            self.stores,
            self.first_touch,
            self.reused,
            self.host_faults,
            self.image_loads,
            self.image_pages,
            self.huge_maps,
            self.huge_splits,
            self.collapses,
        ]
    }
}

/// Shared state of every VM created from it: configuration, counters, and
/// the registry of live VMs that reverse-map walks look VMs up in.
#[derive(Debug)]
pub struct Context {
    pub(crate) config: Config,
    pub(crate) stats: Stats,
    pub(crate) next_store_id: AtomicU64,
    vms: RankedMutex<HashMap<u64, Weak<VmMemory>>>,
    stores: RankedMutex<Vec<Weak<Store>>>,
    swap: OnceLock<Swap>,
    /// Snapshot memory files named by image entries, by area (see
    /// `image.rs`; area 0 is the swap file).
    images: RankedMutex<[Option<Arc<Image>>; AREAS + 1]>,
    /// Entries naming each area, in every VM.
    image_refs: [AtomicU64; AREAS + 1],
    /// Where accesses to pages under migration wait.
    pub(crate) migration: crate::migrate::Migrations,
}

impl Context {
    /// A new context. Values out of range in `config` are clamped.
    pub fn new(mut config: Config) -> Arc<Self> {
        config.fault_around = config.fault_around.clamp(1, 512).next_power_of_two();
        crate::host_reap::start();
        Arc::new(Self {
            config,
            stats: Stats::default(),
            next_store_id: AtomicU64::new(1),
            vms: RankedMutex::new(Rank::Registry, HashMap::new()),
            stores: RankedMutex::new(Rank::Registry, Vec::new()),
            swap: OnceLock::new(),
            images: RankedMutex::new(Rank::Images, Default::default()),
            image_refs: std::array::from_fn(|_| AtomicU64::new(0)),
            migration: crate::migrate::Migrations::new(),
        })
    }

    /// Opens the swap file now rather than at the first swap-out, so a bad
    /// one is reported before any VM runs.
    pub fn open_swap(&self) -> Result<(), SwapError> {
        self.swap_or_open().map(|_| ())
    }

    /// The swap file, if anything was swapped out yet.
    pub(crate) fn swap(&self) -> Option<&Swap> {
        self.swap.get()
    }

    /// The swap file, opened now if it is not open yet.
    pub(crate) fn swap_or_open(&self) -> Result<&Swap, SwapError> {
        if let Some(s) = self.swap.get() {
            return Ok(s);
        }
        let opened = Swap::open(self.config.swap_file.as_deref())?;
        // Another thread may have won the race; its file is used and this
        // one closed.
        let _ = self.swap.set(opened);
        Ok(self.swap.get().expect("set above"))
    }

    /// The slots swap entries name: of the swap file, which must be open
    /// if an entry names one of its slots, or of a snapshot image.
    pub(crate) fn swap_in_use(&self) -> Slots<'_> {
        Slots(self)
    }

    /// Registers `image` as an area (or finds it registered) and counts
    /// `entries` more entries naming it; returns the area.
    pub(crate) fn attach_image(
        &self,
        image: &Arc<Image>,
        entries: u64,
    ) -> Result<usize, ImageError> {
        let mut areas = self.images.lock();
        let found = (1..=AREAS).find(|&a| areas[a].as_ref().is_some_and(|i| Arc::ptr_eq(i, image)));
        let area = match found {
            Some(a) => a,
            None => {
                let free = (1..=AREAS)
                    .find(|&a| areas[a].is_none())
                    .ok_or(ImageError::TooMany)?;
                areas[free] = Some(image.clone());
                free
            }
        };
        self.image_refs[area].fetch_add(entries, Ordering::AcqRel);
        Ok(area)
    }

    /// The image of `area`, which an entry names.
    pub(crate) fn image_of(&self, area: usize) -> Result<Arc<Image>, SwapError> {
        self.images
            .lock()
            .get(area)
            .cloned()
            .flatten()
            .ok_or(SwapError::ImageSlot { area, page: 0 })
    }

    /// Entries naming each registered image area (for audits).
    pub(crate) fn image_areas(&self) -> Vec<(usize, u64)> {
        let areas = self.images.lock();
        (1..=AREAS)
            .filter(|&a| areas[a].is_some())
            .map(|a| (a, self.image_refs[a].load(Ordering::Acquire)))
            .collect()
    }

    /// Remembers a new store (for scans over every frame: audits now,
    /// reclaim later).
    pub(crate) fn add_store(&self, store: &Arc<Store>) {
        let mut stores = self.stores.lock();
        stores.retain(|s| s.strong_count() > 0);
        stores.push(Arc::downgrade(store));
    }

    /// The stores still alive.
    pub(crate) fn live_stores(&self) -> Vec<Arc<Store>> {
        self.stores
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// A process-unique id for a new VM's memory (unique across
    /// contexts too: a device's pin cache tells VMs apart by it).
    pub(crate) fn new_vm_id(&self) -> u64 {
        // Plain std: a counter, not state loom needs to model.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn register(&self, vm: &Arc<VmMemory>) {
        self.vms.lock().insert(vm.id(), Arc::downgrade(vm));
    }

    pub(crate) fn unregister(&self, id: u64) {
        self.vms.lock().remove(&id);
    }

    /// Every live VM.
    pub(crate) fn live_vms(&self) -> Vec<Arc<VmMemory>> {
        self.vms.lock().values().filter_map(Weak::upgrade).collect()
    }

    /// The live VM with memory id `id`.
    pub(crate) fn vm(&self, id: u64) -> Option<Arc<VmMemory>> {
        self.vms.lock().get(&id).and_then(Weak::upgrade)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            resident: l(&s.resident),
            shared: l(&s.shared) + self.huge_shared(),
            copied: l(&s.copied),
            pins: l(&s.pins),
            swapped: self.swap().map_or(0, Swap::used),
            swap_ins: l(&s.swap_ins),
            migrated: l(&s.migrated),
            wp_events: l(&s.wp_events),
            stores: l(&s.stores),
            first_touch: l(&s.first_touch),
            reused: l(&s.reused),
            host_faults: l(&s.host_faults),
            migration_wait_max_ns: l(&s.migration_wait_max_ns),
            image_loads: l(&s.image_loads),
            image_pages: self.image_refs.iter().map(l).sum(),
            huge_maps: l(&s.huge_maps),
            huge_splits: l(&s.huge_splits),
            collapses: l(&s.collapses),
        }
    }

    /// Pages of huge frames mapped more than once that the counter of
    /// small mappings does not count: those a huge entry maps with at
    /// least one other entry, huge or small, but fewer than two small
    /// ones. Counted when asked (one look per 2 MiB of live huge
    /// frames), not kept up to date, because a page's mappings are then
    /// two counts changed under different VMs' locks.
    fn huge_shared(&self) -> u64 {
        // Huge frames come from huge first touches and from collapses.
        if self.stats.huge_maps.load(Ordering::Relaxed) == 0
            && self.stats.collapses.load(Ordering::Relaxed) == 0
        {
            return 0;
        }
        let mut n = 0;
        for store in self.live_stores() {
            for (first, meta) in store.huge_frames() {
                let entire = meta.entire();
                if entire == 0 {
                    continue;
                }
                n += (first..first + crate::layout::PAGES_PER_LEAF)
                    .filter(|&p| {
                        let own = store.slot(p).mapcount();
                        own < 2 && own + entire >= 2
                    })
                    .count() as u64;
            }
        }
        n
    }
}

/// The slots swap entries name, whichever area holds them (see
/// [`Context::swap_in_use`]).
#[derive(Clone, Copy)]
pub(crate) struct Slots<'a>(&'a Context);

impl Slots<'_> {
    fn swap(&self) -> &Swap {
        self.0
            .swap
            .get()
            .expect("a swap entry exists, so the swap file is open")
    }

    /// Whether `slot` names a page of a snapshot image.
    pub(crate) fn is_image(slot: u32) -> bool {
        split_slot(slot).0 != 0
    }

    /// Counts one more entry naming `slot`.
    pub(crate) fn dup(&self, slot: u32) {
        match split_slot(slot) {
            (0, _) => self.swap().dup(slot),
            (area, _) => {
                let old = self.0.image_refs[area].fetch_add(1, Ordering::AcqRel);
                debug_assert!(old > 0, "dup of an entry of unused image area {area}");
            }
        }
    }

    /// Drops one entry naming `slot`: a swap slot is freed after its last;
    /// an image area is released after its last.
    pub(crate) fn put(&self, slot: u32) {
        let area = match split_slot(slot) {
            (0, _) => return self.swap().put(slot),
            (area, _) => area,
        };
        let old = self.0.image_refs[area].fetch_sub(1, Ordering::AcqRel);
        debug_assert!(old > 0, "put of an entry of unused image area {area}");
        if old == 1 {
            let mut areas = self.0.images.lock();
            // A restore of the same image may have counted new entries.
            if self.0.image_refs[area].load(Ordering::Acquire) == 0 {
                areas[area] = None;
            }
        }
    }

    /// Reads the page `slot` names into `page`, checking it.
    pub(crate) fn load(&self, slot: u32, page: &mut PageBuf) -> Result<(), SwapError> {
        match split_slot(slot) {
            (0, _) => self.swap().load(slot, page),
            (area, offset) => self.0.image_of(area)?.load(area, u64::from(offset), page),
        }
    }
}
