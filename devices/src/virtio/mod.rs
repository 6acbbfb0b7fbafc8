//! Virtio devices over the virtio-mmio transport (version 2, virtio 1.x,
//! split virtqueues).
//!
//! Every access a device makes to guest memory goes through a pin from
//! `memory`:
//!
//! - the three rings of each queue are pinned long-term when the driver
//!   sets DRIVER_OK (descriptor table and available ring for reading, used
//!   ring for writing) and released on reset; virtio-queue reads and
//!   writes them through a small `vm_memory::GuestMemoryBackend` whose
//!   regions are the pinned frames ([`queue`]);
//! - each request's buffers are pinned when the request is taken off the
//!   available ring ([`buffers`]): short-term for a request served at once,
//!   long-term for one that waits (a block request in the thread pool, a
//!   posted receive buffer). Zero-copy I/O goes straight into the pinned
//!   host frames (`Pin::slices`).
//!
//! No device keeps a raw host pointer into guest RAM: everything it holds
//! across time is a `Pin`.
//!
//! Notifications arrive on one eventfd per queue (KVM's ioeventfd on the
//! QueueNotify register, or the transport itself when the register write
//! reaches it); a device thread per device ([`worker`]) waits on them and on
//! the device's own host file descriptors. Interrupts raise InterruptStatus
//! and, for Linux guests, an irqfd; program-mode guests poll the used ring.
//!
//! A malformed queue (rings outside RAM, a size that is not a power of two,
//! a head index past the queue, a notification before DRIVER_OK) sets
//! DEVICE_NEEDS_RESET; a malformed request (descriptors outside RAM, loops,
//! chains longer than the queue, wrong directions, absurd lengths) is
//! completed with the device's error status, or with no bytes written when
//! it has no room for one. A device reset makes the device usable again.
//!
//! # Lock order
//! A transport's mutex, then what its device holds inside (a block
//! device's thread-pool queue, a disk's overlay lock, a vsock connection
//! table). Threads that complete requests asynchronously (a block device's
//! I/O threads) never take the transport's lock: they hand completions to
//! the device thread, so a device may wait for them with the lock held.

pub mod balloon;
pub mod blk;
pub mod buffers;
pub mod device;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod tap;
pub mod vsock;
pub mod worker;

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod testutil;

use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

pub use buffers::Buffers;
pub use device::{Ctx, DeviceError, VirtioDevice};
pub use mmio::{MmioState, Shared, Transport};
pub use queue::{Chain, Desc, DeviceQueue, QueueError};
pub use worker::Worker;

/// Device ids (virtio 1.2, section 5).
pub mod id {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Traditional memory balloon.
    pub const BALLOON: u32 = 5;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device met an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u32 = 64;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Feature bits common to every device.
pub mod features {
    /// Virtio 1.x (required).
    pub const VERSION_1: u64 = 1 << 32;
    /// `used_event` / `avail_event` notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
}

/// InterruptStatus bit: a used buffer was added.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration (or the status) changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt: the InterruptStatus register, and for Linux guests
/// an irqfd routed to the device's GSI.
#[derive(Debug, Default)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: Option<EventFd>,
}

impl Interrupt {
    /// An interrupt that only sets InterruptStatus (program mode: guests
    /// poll).
    pub fn polled() -> Self {
        Self::default()
    }

    /// An interrupt that also signals `irqfd`.
    pub fn with_irqfd(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd: Some(irqfd),
        }
    }

    /// Sets `bits` in InterruptStatus and signals the guest.
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Some(fd) = &self.irqfd {
            if let Err(e) = fd.write(1) {
                log::warn!("virtio: cannot signal an interrupt: {e}");
            }
        }
    }

    /// InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears everything (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// Copies the bytes at `offset` of a little-endian structure image into
/// `data` (a configuration-space read); bytes past the end read as zero.
pub fn read_config_bytes(image: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| image.get(at))
            .copied()
            .unwrap_or(0);
    }
}
