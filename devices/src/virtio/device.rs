//! What a virtio device implements, and what it sees of its transport
//! while it works ([`Ctx`]).

use std::any::Any;
use std::sync::{Arc, Mutex, Weak};

use memory::VmMemory;
use thiserror::Error;

use super::mmio::Transport;
use super::queue::{DeviceQueue, QueueError};
use super::worker::Poller;
use super::{INT_VRING, Interrupt};

/// Errors of devices and of their host side.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// A host operation failed.
    #[error("host I/O")]
    Io(#[from] std::io::Error),
    /// A queue is unusable.
    #[error("virtqueue")]
    Queue(#[from] QueueError),
    /// A device cannot do what was asked.
    #[error("{0}")]
    Unsupported(String),
}

/// What a device sees of its transport while it works.
pub struct Ctx<'a> {
    /// The VM's memory.
    pub mem: &'a Arc<VmMemory>,
    /// The device's queues.
    pub queues: &'a mut [DeviceQueue],
    /// The device's interrupt.
    pub interrupt: &'a Arc<Interrupt>,
    /// Negotiated features.
    pub features: u64,
    /// The transport itself, for completions that arrive later.
    pub this: &'a Weak<Mutex<Transport>>,
    /// The device thread's poller (for the device's host descriptors).
    pub poller: &'a Arc<Poller>,
    pub(crate) broken: Option<String>,
    pub(crate) config_changed: bool,
}

impl std::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("features", &self.features)
            .finish()
    }
}

impl Ctx<'_> {
    /// Marks the device DEVICE_NEEDS_RESET (a queue is unusable).
    pub fn fail(&mut self, why: impl std::fmt::Display) {
        if self.broken.is_none() {
            self.broken = Some(why.to_string());
        }
    }

    /// Whether the device was marked broken during this call.
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// Raises a configuration-change interrupt once the device is done.
    pub fn config_changed(&mut self) {
        self.config_changed = true;
    }

    /// Raises a used-buffer interrupt if queue `q` asks for one.
    pub fn notify_used(&mut self, q: usize) {
        if self
            .queues
            .get_mut(q)
            .is_some_and(DeviceQueue::needs_notification)
        {
            self.interrupt.raise(INT_VRING);
        }
    }

    /// Returns `head` of queue `q` to the driver with `len` bytes written;
    /// a ring that cannot take it breaks the device.
    pub fn complete(&mut self, q: usize, head: u16, len: u32) {
        let r = match self.queues.get_mut(q) {
            Some(queue) => queue.complete(head, len),
            None => return,
        };
        if let Err(e) = r {
            self.fail(format!("queue {q}: {}", super::mmio::chain(&e)));
        }
    }

    /// Returns several heads of queue `q` in one pass over the used ring,
    /// then raises the interrupt if the driver asks for one.
    pub fn complete_all(&mut self, q: usize, done: &[(u16, u32)]) {
        if done.is_empty() {
            return;
        }
        let r = match self.queues.get_mut(q) {
            Some(queue) => queue.complete_batch(done),
            None => return,
        };
        match r {
            Ok(()) => self.notify_used(q),
            Err(e) => self.fail(format!("queue {q}: {}", super::mmio::chain(&e))),
        }
    }

    /// Takes every chain available on queue `q`; a broken ring breaks the
    /// device (and yields nothing).
    pub fn pop_all(&mut self, q: usize) -> Vec<super::queue::Popped> {
        let r = match self.queues.get_mut(q) {
            Some(queue) => queue.pop_batch(usize::MAX),
            None => return Vec::new(),
        };
        r.unwrap_or_else(|e| {
            self.fail(format!("queue {q}: {}", super::mmio::chain(&e)));
            Vec::new()
        })
    }

    /// Whether feature `bit` (a mask) was negotiated.
    pub fn has(&self, bit: u64) -> bool {
        self.features & bit != 0
    }
}

/// A virtio device behind the transport.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// The virtio device id.
    fn device_type(&self) -> u32;
    /// QueueNumMax of each queue.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Offered features (VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// A configuration-space read.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A configuration-space write.
    fn write_config(&mut self, _ctx: &mut Ctx<'_>, _offset: u64, _data: &[u8]) {}
    /// DRIVER_OK: the ready queues are active.
    fn activate(&mut self, _ctx: &mut Ctx<'_>) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Queue `queue` was notified (or may have work).
    fn queue_notify(&mut self, ctx: &mut Ctx<'_>, queue: usize);
    /// A host file descriptor the device registered is ready.
    fn host_event(&mut self, _ctx: &mut Ctx<'_>, _token: u64, _events: u32) {}
    /// Device reset: drop every request and buffer; keep the backend.
    fn reset(&mut self, ctx: &mut Ctx<'_>);
    /// Waits until no request of this device is in its backend's hands:
    /// every pin a request in flight held into guest memory is dropped and
    /// everything it wrote (guest memory, the disk) is written. Requests
    /// that end meanwhile complete as usual. Called with the transport
    /// locked, so it must not wait for the transport; a completion that
    /// needs the transport's lock is delivered after it is released (or
    /// dropped, after a reset). Devices that serve every request on the
    /// device thread have nothing to wait for.
    fn quiesce(&mut self, _ctx: &mut Ctx<'_>) {}
    /// Drops the pins the device keeps between requests (a
    /// [`super::buffers::PinCache`]); requests in flight keep theirs.
    /// Called before a fork or a snapshot (which copy pinned pages) and
    /// before the guest asks for something pinned pages are exempt from
    /// (swap-out, migration, collapse, write protection), so that only the
    /// pins of requests count there.
    fn drop_cached_pins(&mut self) {}
    /// Puts the device's own state back to what it was when
    /// [`VirtioDevice::fork`] made it: a fuzzing clone's reset to its
    /// snapshot (a block overlay drops the clone's writes). Called after a
    /// device reset and [`VirtioDevice::quiesce`]. A device whose host side
    /// cannot go back (a network link, host sockets) refuses.
    fn rewind(&mut self) -> Result<(), DeviceError> {
        Err(DeviceError::Unsupported(
            "its host side cannot go back to a snapshot".into(),
        ))
    }
    /// The device a fork's clone gets: the same configuration over the
    /// clone's own host side (a block device's overlay, an unplugged
    /// network link...). Called while the transport is locked, at the
    /// instant memory is snapshotted.
    fn fork(&self) -> Result<Box<dyn VirtioDevice>, DeviceError>;
    /// After a restore (a fork's clone): the queues hold the heads that
    /// were in flight when the state was saved; serve them again from
    /// this VM's memory.
    fn resume(&mut self, ctx: &mut Ctx<'_>);
    /// For typed access by the VMM (balloon statistics, disk overlays).
    fn as_any(&self) -> &dyn Any;
    /// For typed access by the VMM.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}
