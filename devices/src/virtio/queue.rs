//! Virtqueues on pinned guest memory.
//!
//! The rings of a queue are pinned long-term when the driver sets
//! DRIVER_OK: the descriptor table and the available ring for reading
//! (the pins unshare them, so the device keeps seeing what the guest
//! writes), the used ring for writing (the pin breaks copy-on-write for
//! this VM first). virtio-queue's [`Queue`] reads and writes them through a
//! [`RingView`], a `vm_memory::GuestMemoryBackend` whose regions are the
//! pinned frames: nothing else of guest RAM is reachable through it, so a
//! ring access can never land outside the rings.
//!
//! Descriptor chains are walked here rather than with virtio-queue's
//! `DescriptorChain` iterator, which ends a chain silently on any error: a
//! hostile driver's chain must be told apart from a short one. Indirect
//! descriptors are not offered, so one seen is an error (when the
//! request's buffers are pinned).
//!
//! Heads taken off the available ring and not yet returned are *held*
//! (`DeviceQueue::held`): they are part of the device state a fork copies,
//! so a clone can serve again the requests that were in flight.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use memory::{MemError, Pin, PinFlags, VmMemory};
use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::bitmap::BS;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    GuestMemoryRegionBytes, GuestUsize, MemoryRegionAddress, VolatileSlice,
};
use vmm_sys_util::eventfd::EventFd;

/// What can be wrong with a queue or a descriptor chain.
#[derive(Debug, Error)]
pub enum QueueError {
    /// The driver's queue configuration is invalid.
    #[error("queue configuration: {0}")]
    Config(&'static str),
    /// The rings are not RAM.
    #[error("cannot pin the rings")]
    Rings(#[source] MemError),
    /// virtio-queue refused an operation on the rings.
    #[error("ring access: {0}")]
    Ring(String),
    /// A descriptor index past the queue.
    #[error("descriptor index {0} is outside the queue")]
    BadIndex(u16),
    /// A chain with more descriptors than the queue has (a loop).
    #[error("descriptor chain longer than the queue")]
    TooLong,
    /// An indirect descriptor (the feature is not offered).
    #[error("indirect descriptor without VIRTIO_F_INDIRECT_DESC")]
    Indirect,
    /// A device-readable descriptor after a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    WrongOrder,
    /// More bytes than the device accepts in one request.
    #[error("request of {0} bytes is larger than the device accepts")]
    TooLarge(u64),
    /// A buffer that is not RAM.
    #[error("cannot pin a buffer")]
    Buffer(#[source] MemError),
    /// An access past the buffers of a request.
    #[error("access past the request's buffers")]
    Bounds,
    /// The queue is not active.
    #[error("the queue is not active")]
    Inactive,
}

fn ring_err(e: virtio_queue::Error) -> QueueError {
    QueueError::Ring(e.to_string())
}

/// One region of a [`RingView`]: a run of pinned frames.
#[derive(Debug)]
pub struct SliceRegion<'a> {
    start: GuestAddress,
    slice: VolatileSlice<'a>,
}

impl GuestMemoryRegionBytes for SliceRegion<'_> {}

impl GuestMemoryRegion for SliceRegion<'_> {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.slice.len() as GuestUsize
    }

    fn start_addr(&self) -> GuestAddress {
        self.start
    }

    fn bitmap(&self) -> BS<'_, Self::B> {}

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> Result<VolatileSlice<'_, BS<'_, Self::B>>, GuestMemoryError> {
        let offset =
            usize::try_from(offset.0).map_err(|_| GuestMemoryError::InvalidBackendAddress)?;
        self.slice
            .subslice(offset, count)
            .map_err(|_| GuestMemoryError::InvalidBackendAddress)
    }
}

/// The pinned rings of one queue as guest memory for virtio-queue. Built
/// for one pass over the queue; it borrows the pins.
#[derive(Debug)]
pub struct RingView<'a> {
    regions: Vec<SliceRegion<'a>>,
}

impl<'a> GuestMemoryBackend for RingView<'a> {
    type R = SliceRegion<'a>;

    fn iter(&self) -> impl Iterator<Item = &Self::R> {
        self.regions.iter()
    }
}

/// Where the available ring's pin is in [`Rings::pins`].
const AVAIL: usize = 2;

/// The long-term pins of one queue's rings.
#[derive(Debug)]
struct Rings {
    /// Used ring first, so that an address another ring's region also
    /// covers (overlapping rings) resolves to the write pin.
    pins: [Pin; 3],
}

impl Rings {
    fn view(&self) -> RingView<'_> {
        let mut regions = Vec::with_capacity(6);
        for pin in &self.pins {
            let mut gpa = pin.gpa();
            for slice in pin.slices() {
                let len = slice.len() as u64;
                regions.push(SliceRegion {
                    start: GuestAddress(gpa),
                    slice,
                });
                gpa += len;
            }
        }
        RingView { regions }
    }
}

/// What the driver wrote into a queue's registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueRegs {
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc.
    pub desc: u64,
    /// QueueDriver (the available ring).
    pub avail: u64,
    /// QueueDevice (the used ring).
    pub used: u64,
}

/// One descriptor of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
    /// Marked indirect (a feature never offered): unusable, but the chain
    /// still names its other buffers (a status byte to report the error).
    pub indirect: bool,
}

/// A chain taken off the available ring: its head, and its descriptors or
/// what is wrong with them.
pub type Popped = (u16, Result<Chain, QueueError>);

/// A descriptor chain: most have at most four descriptors (a block
/// request has three), which need no allocation.
pub type Chain = smallvec::SmallVec<[Desc; 4]>;

/// The saved state of one queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueSnapshot {
    /// The driver's registers.
    pub regs: QueueRegs,
    /// virtio-queue's state (indices), when the queue was active.
    pub active: Option<QueueState>,
    /// Heads taken and not returned.
    pub held: BTreeSet<u16>,
}

/// A virtqueue of a device: the driver's registers, and once active, the
/// queue itself on its pinned rings.
#[derive(Debug)]
pub struct DeviceQueue {
    max_size: u16,
    /// The driver's registers.
    pub regs: QueueRegs,
    queue: Option<Queue>,
    rings: Option<Rings>,
    /// Heads taken off the available ring and not yet returned.
    pub held: BTreeSet<u16>,
    /// Bumped on every deactivation: completions of older requests are
    /// dropped.
    generation: u64,
    /// Signalled for every notification of this queue.
    notify: EventFd,
}

impl DeviceQueue {
    /// A queue offering at most `max_size` entries (a power of two).
    pub fn new(max_size: u16) -> std::io::Result<Self> {
        Ok(Self {
            max_size,
            regs: QueueRegs::default(),
            queue: None,
            rings: None,
            held: BTreeSet::new(),
            generation: 0,
            notify: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// QueueNumMax.
    pub fn max_size(&self) -> u16 {
        self.max_size
    }

    /// The notification eventfd (for KVM's ioeventfd and the device thread).
    pub fn notify_fd(&self) -> &EventFd {
        &self.notify
    }

    /// Signals a notification of this queue to the device thread.
    pub fn kick(&self) {
        if let Err(e) = self.notify.write(1) {
            log::warn!("virtio: cannot signal a queue notification: {e}");
        }
    }

    /// Consumes a pending notification; false if there was none.
    pub fn take_notification(&self) -> bool {
        self.notify.read().is_ok()
    }

    /// Whether the queue is active (its rings pinned).
    pub fn is_active(&self) -> bool {
        self.queue.is_some()
    }

    /// The current generation: it changes with every reset, so a request
    /// completed asynchronously after one is recognised and dropped.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The active queue's size.
    pub fn size(&self) -> u16 {
        self.queue.as_ref().map_or(0, QueueT::size)
    }

    /// Validates the registers and pins the rings; on success the queue is
    /// active. A queue the driver did not make ready stays inactive.
    pub fn activate(&mut self, mem: &VmMemory, event_idx: bool) -> Result<(), QueueError> {
        self.deactivate();
        if !self.regs.ready {
            return Ok(());
        }
        let r = self.regs;
        if r.size == 0 || r.size > self.max_size || !r.size.is_power_of_two() {
            return Err(QueueError::Config(
                "size is not a power of two up to QueueNumMax",
            ));
        }
        let mut q = Queue::new(self.max_size).map_err(ring_err)?;
        q.try_set_size(r.size).map_err(ring_err)?;
        q.try_set_desc_table_address(GuestAddress(r.desc))
            .map_err(ring_err)?;
        q.try_set_avail_ring_address(GuestAddress(r.avail))
            .map_err(ring_err)?;
        q.try_set_used_ring_address(GuestAddress(r.used))
            .map_err(ring_err)?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        let n = u64::from(r.size);
        let lt = |write| PinFlags {
            write,
            longterm: true,
        };
        // Each ring ends with the u16 that EVENT_IDX uses.
        let used = mem
            .pin(r.used, 6 + 8 * n, lt(true))
            .map_err(QueueError::Rings)?;
        let desc = mem
            .pin(r.desc, 16 * n, lt(false))
            .map_err(QueueError::Rings)?;
        let avail = mem
            .pin(r.avail, 6 + 2 * n, lt(false))
            .map_err(QueueError::Rings)?;
        self.rings = Some(Rings {
            pins: [used, desc, avail],
        });
        self.queue = Some(q);
        Ok(())
    }

    /// Restores an active queue from a snapshot (a fork's clone): pins the
    /// rings in `mem` and sets the indices.
    pub fn restore(&mut self, mem: &VmMemory, snap: &QueueSnapshot) -> Result<(), QueueError> {
        self.regs = snap.regs;
        if let Some(state) = snap.active {
            self.activate(mem, state.event_idx_enabled)?;
            if let Some(q) = &mut self.queue {
                q.set_next_avail(state.next_avail);
                q.set_next_used(state.next_used);
            }
        }
        self.held = snap.held.clone();
        Ok(())
    }

    /// The state a fork copies.
    pub fn snapshot(&self) -> QueueSnapshot {
        QueueSnapshot {
            regs: self.regs,
            active: self.queue.as_ref().map(Queue::state),
            held: self.held.clone(),
        }
    }

    /// Drops the rings' pins; the registers stay.
    pub fn deactivate(&mut self) {
        self.queue = None;
        self.rings = None;
        self.held.clear();
        self.generation += 1;
    }

    /// Device reset: registers cleared, pins dropped, pending
    /// notifications forgotten.
    pub fn reset(&mut self) {
        self.deactivate();
        self.regs = QueueRegs::default();
        let _ = self.notify.read();
    }

    /// Takes the next available chain: its head and descriptors. The head
    /// is held until it is completed. `Ok(None)` when the ring is empty.
    /// An `Err` means the ring itself is broken (the device needs a reset);
    /// a bad chain is returned as the inner error, its head held, so that
    /// the device completes it with an error status.
    pub fn pop(&mut self) -> Result<Option<Popped>, QueueError> {
        Ok(self.pop_batch(1)?.pop())
    }

    /// Takes up to `max` available chains at once (one pass over the
    /// rings); see [`DeviceQueue::pop`].
    pub fn pop_batch(&mut self, max: usize) -> Result<Vec<Popped>, QueueError> {
        let (Some(q), Some(rings)) = (&mut self.queue, &self.rings) else {
            return Err(QueueError::Inactive);
        };
        let view = rings.view();
        let (table, size) = (q.desc_table(), q.size());
        let heads: Vec<u16> = q
            .iter(&view)
            .map_err(ring_err)?
            .take(max)
            .map(|c| c.head_index())
            .collect();
        let mut out = Vec::with_capacity(heads.len());
        for head in heads {
            if head >= size {
                // There is no descriptor to return: the ring itself is bad.
                return Err(QueueError::BadIndex(head));
            }
            if !self.held.insert(head) {
                return Err(QueueError::Ring(format!(
                    "head {head} made available while in use"
                )));
            }
            out.push((head, walk(&view, table, size, head)));
        }
        Ok(out)
    }

    /// Whether a chain is waiting on the available ring. Cheap enough to
    /// poll: it reads the ring's index through its pin, building no view.
    pub fn has_available(&self) -> Result<bool, QueueError> {
        let (Some(q), Some(rings)) = (&self.queue, &self.rings) else {
            return Ok(false);
        };
        let mut idx = [0u8; 2];
        rings.pins[AVAIL]
            .read(2, &mut idx)
            .map_err(|_| QueueError::Bounds)?;
        // What the driver wrote before it published the index is read after.
        std::sync::atomic::fence(Ordering::Acquire);
        Ok(u16::from_le_bytes(idx) != q.next_avail())
    }

    /// Returns a held head to the driver with `len` bytes written.
    pub fn complete(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        self.complete_batch(&[(head, len)])
    }

    /// Returns several held heads at once (one pass over the rings).
    pub fn complete_batch(&mut self, done: &[(u16, u32)]) -> Result<(), QueueError> {
        let (Some(q), Some(rings)) = (&mut self.queue, &self.rings) else {
            return Err(QueueError::Inactive);
        };
        let view = rings.view();
        for &(head, len) in done {
            if !self.held.remove(&head) {
                return Err(QueueError::Ring(format!("head {head} is not held")));
            }
            q.add_used(&view, head, len).map_err(ring_err)?;
        }
        Ok(())
    }

    /// Asks the driver not to notify while the device is busy with the
    /// queue (VIRTQ_USED_F_NO_NOTIFY, or the avail event with EVENT_IDX).
    pub fn disable_notification(&mut self) {
        if let (Some(q), Some(rings)) = (&mut self.queue, &self.rings) {
            let _ = q.disable_notification(&rings.view());
        }
    }

    /// Asks the driver to notify again; true if chains arrived meanwhile
    /// (the device must look at the ring once more).
    pub fn enable_notification(&mut self) -> Result<bool, QueueError> {
        let (Some(q), Some(rings)) = (&mut self.queue, &self.rings) else {
            return Ok(false);
        };
        q.enable_notification(&rings.view()).map_err(ring_err)
    }

    /// Whether the driver wants an interrupt for what was completed.
    pub fn needs_notification(&mut self) -> bool {
        let (Some(q), Some(rings)) = (&mut self.queue, &self.rings) else {
            return false;
        };
        q.needs_notification(&rings.view()).unwrap_or(true)
    }

    /// Reads the descriptors of a held head again (a fork's clone serving
    /// the requests its parent had in flight).
    pub fn chain_of(&self, head: u16) -> Result<Chain, QueueError> {
        let (Some(q), Some(rings)) = (&self.queue, &self.rings) else {
            return Err(QueueError::Inactive);
        };
        walk(&rings.view(), q.desc_table(), q.size(), head)
    }
}

/// Walks the chain starting at `head`.
fn walk(view: &RingView<'_>, table: u64, size: u16, head: u16) -> Result<Chain, QueueError> {
    let mut out = Chain::new();
    let mut idx = head;
    loop {
        if idx >= size {
            return Err(QueueError::BadIndex(idx));
        }
        if out.len() >= usize::from(size) {
            return Err(QueueError::TooLong);
        }
        let at = table + u64::from(idx) * 16;
        let d: Descriptor = view
            .read_obj(GuestAddress(at))
            .map_err(|e| QueueError::Ring(e.to_string()))?;
        out.push(Desc {
            addr: d.addr().0,
            len: d.len(),
            write: d.is_write_only(),
            indirect: d.refers_to_indirect_table(),
        });
        if !d.has_next() {
            return Ok(out);
        }
        idx = d.next();
    }
}
