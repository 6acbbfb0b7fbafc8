//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).
//!
//! One 4 KiB slot per device: the registers below 0x100, the device's
//! configuration space from 0x100. Registers are 32 bits wide and
//! accessed at aligned offsets (other accesses read 0 and are ignored);
//! the configuration space takes any width. The transport and its device
//! live behind one mutex ([`Shared`]): the vCPU thread takes it for a
//! register access, the device thread for a notification, a thread-pool
//! worker for a completion.
//!
//! Status: writing 0 resets the device. FEATURES_OK is accepted only for a
//! subset of the offered features that includes VERSION_1 (the bit reads
//! back clear otherwise). DRIVER_OK pins the rings of every ready queue;
//! a queue that cannot be used (size not a power of two, rings outside
//! RAM, misaligned) sets DEVICE_NEEDS_RESET and raises a configuration
//! interrupt, as does any later error that makes a queue unusable and a
//! notification before DRIVER_OK. Queue registers are ignored once
//! DRIVER_OK is set.

use std::sync::{Arc, Mutex, Weak};

use memory::VmMemory;

use super::device::{Ctx, DeviceError, VirtioDevice};
use super::queue::{DeviceQueue, QueueSnapshot};
use super::worker::Poller;
use super::{INT_CONFIG, Interrupt, features, status};

/// The magic value ("virt").
pub const MAGIC: u32 = 0x7472_6976;
/// The transport version.
pub const VERSION: u32 = 2;
/// Vendor id reported to drivers.
pub const VENDOR: u32 = 0x554d_4551; // "QEMU", as most VMMs report
/// Size of one device slot.
pub const SLOT_SIZE: u64 = 0x1000;
/// Where the configuration space starts.
pub const CONFIG: u64 = 0x100;

/// Register offsets.
pub mod reg {
    #![allow(missing_docs)]
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// The transport's own registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioRegs {
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// DriverFeatures (all 64 bits).
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Status.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
}

/// A saved transport: registers and queues (the device-specific state
/// travels in the device itself, see [`VirtioDevice::fork`]).
#[derive(Clone, Debug)]
pub struct MmioState {
    /// The transport's registers.
    pub regs: MmioRegs,
    /// Each queue.
    pub queues: Vec<QueueSnapshot>,
}

/// A transport and its device, shared by the threads that drive them.
pub type Shared = Arc<Mutex<Transport>>;

/// The virtio-mmio transport of one device.
#[derive(Debug)]
pub struct Transport {
    device: Box<dyn VirtioDevice>,
    queues: Vec<DeviceQueue>,
    mem: Arc<VmMemory>,
    interrupt: Arc<Interrupt>,
    regs: MmioRegs,
    this: Weak<Mutex<Transport>>,
    poller: Arc<Poller>,
}

impl Transport {
    /// A transport for `device` in the VM whose memory is `mem`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<VmMemory>,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<Shared> {
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(DeviceQueue::new)
            .collect::<std::io::Result<Vec<_>>>()?;
        let poller = Arc::new(Poller::new()?);
        Ok(Arc::new_cyclic(|this| {
            Mutex::new(Transport {
                device,
                queues,
                mem,
                interrupt,
                regs: MmioRegs::default(),
                this: this.clone(),
                poller,
            })
        }))
    }

    /// The device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device a fork's clone gets (see [`VirtioDevice::fork`]).
    pub fn fork_device(&self) -> Result<Box<dyn VirtioDevice>, DeviceError> {
        self.device.fork()
    }

    /// The queues.
    pub fn queues(&self) -> &[DeviceQueue] {
        &self.queues
    }

    /// The poller the device thread waits on.
    pub fn poller(&self) -> &Arc<Poller> {
        &self.poller
    }

    /// The interrupt.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// Status.
    pub fn status(&self) -> u32 {
        self.regs.status
    }

    fn offered(&self) -> u64 {
        self.device.features() | features::VERSION_1
    }

    /// Runs `f` with the device and its context, then applies what the
    /// device reported (a failure, a configuration change).
    pub fn with_device<R>(
        &mut self,
        f: impl FnOnce(&mut dyn VirtioDevice, &mut Ctx<'_>) -> R,
    ) -> R {
        let mut ctx = Ctx {
            mem: &self.mem,
            queues: &mut self.queues,
            interrupt: &self.interrupt,
            features: self.regs.driver_features,
            this: &self.this,
            poller: &self.poller,
            broken: None,
            config_changed: false,
        };
        let r = f(self.device.as_mut(), &mut ctx);
        let (broken, changed) = (ctx.broken.take(), ctx.config_changed);
        if let Some(why) = broken {
            self.needs_reset(&why);
        } else if changed {
            self.regs.config_generation = self.regs.config_generation.wrapping_add(1);
            self.interrupt.raise(INT_CONFIG);
        }
        r
    }

    /// Sets DEVICE_NEEDS_RESET: the queues stop (their pins are dropped)
    /// until the driver resets the device.
    pub fn needs_reset(&mut self, why: &str) {
        if self.regs.status & status::NEEDS_RESET == 0 {
            log::warn!(
                "virtio device {}: needs reset: {why}",
                self.device.device_type()
            );
        }
        self.regs.status |= status::NEEDS_RESET;
        for q in &mut self.queues {
            q.deactivate();
        }
        self.interrupt.raise(INT_CONFIG);
    }

    /// Queue `q` was notified: let the device serve it if it is active.
    /// A notification before DRIVER_OK breaks the protocol: the device
    /// then needs a reset.
    pub fn queue_notify(&mut self, q: usize) {
        if self.regs.status & status::NEEDS_RESET != 0 {
            return;
        }
        if self.regs.status & status::DRIVER_OK == 0 {
            self.needs_reset(&format!("queue {q} notified before DRIVER_OK"));
            return;
        }
        if !self.queues.get(q).is_some_and(DeviceQueue::is_active) {
            return;
        }
        self.with_device(|d, ctx| d.queue_notify(ctx, q));
    }

    /// A host descriptor of the device is ready.
    pub fn host_event(&mut self, token: u64, events: u32) {
        self.with_device(|d, ctx| d.host_event(ctx, token, events));
    }

    fn selected(&mut self) -> Option<&mut DeviceQueue> {
        self.queues.get_mut(self.regs.queue_sel as usize)
    }

    /// A read of `data.len()` bytes at `offset` in the slot.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            self.device.read_config(offset - CONFIG, data);
            return;
        }
        let v = if data.len() == 4 && offset % 4 == 0 {
            self.read_reg(offset)
        } else {
            0
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let q = self.queues.get(self.regs.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.regs.device_features_sel {
                0 => self.offered() as u32,
                1 => (self.offered() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.regs.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.regs.status,
            // No shared memory regions: length and base read as all ones.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.regs.config_generation,
            _ => 0,
        }
    }

    /// A write of `data` at `offset` in the slot.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            let off = offset - CONFIG;
            self.with_device(|d, ctx| d.write_config(ctx, off, data));
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset % 4 == 0 {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let live = self.regs.status & status::DRIVER_OK != 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.regs.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.regs.driver_features_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::QUEUE_SEL => self.regs.queue_sel = v,
            reg::QUEUE_NOTIFY => match self.queues.get(v as usize) {
                // Without KVM's ioeventfd the write reaches the transport;
                // the device thread serves it.
                Some(q) => q.kick(),
                None => {
                    self.needs_reset(&format!("notification of queue {v}, which does not exist"))
                }
            },
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            _ if live => {}
            _ => self.write_queue_reg(offset, v),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.regs.status & status::FEATURES_OK != 0 {
            return;
        }
        let f = &mut self.regs.driver_features;
        match self.regs.driver_features_sel {
            0 => *f = (*f & !0xffff_ffff) | u64::from(v),
            1 => *f = (*f & 0xffff_ffff) | (u64::from(v) << 32),
            _ => {}
        }
    }

    /// The registers of the selected queue (before DRIVER_OK).
    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        let Some(q) = self.selected() else {
            return;
        };
        let set_half = |old: &mut u64, high: bool| {
            *old = if high {
                (*old & 0xffff_ffff) | (u64::from(v) << 32)
            } else {
                (*old & !0xffff_ffff) | u64::from(v)
            }
        };
        match offset {
            reg::QUEUE_NUM => q.regs.size = v.min(u32::from(u16::MAX)) as u16,
            reg::QUEUE_READY => q.regs.ready = v == 1,
            reg::QUEUE_DESC_LOW => set_half(&mut q.regs.desc, false),
            reg::QUEUE_DESC_HIGH => set_half(&mut q.regs.desc, true),
            reg::QUEUE_DRIVER_LOW => set_half(&mut q.regs.avail, false),
            reg::QUEUE_DRIVER_HIGH => set_half(&mut q.regs.avail, true),
            reg::QUEUE_DEVICE_LOW => set_half(&mut q.regs.used, false),
            reg::QUEUE_DEVICE_HIGH => set_half(&mut q.regs.used, true),
            _ => {}
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.regs.status;
        // The driver may only add bits; NEEDS_RESET is the device's.
        let mut new = old | (v & !status::NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let f = self.regs.driver_features;
            if f & !self.offered() != 0 || f & features::VERSION_1 == 0 {
                new &= !status::FEATURES_OK;
            }
        }
        let starting = new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0;
        if starting && new & status::FEATURES_OK == 0 {
            new &= !status::DRIVER_OK;
        }
        self.regs.status = new;
        if starting && new & status::DRIVER_OK != 0 && new & status::NEEDS_RESET == 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.regs.driver_features & features::RING_EVENT_IDX != 0;
        for i in 0..self.queues.len() {
            if let Err(e) = self.queues[i].activate(&self.mem, event_idx) {
                self.needs_reset(&format!("queue {i}: {}", chain(&e)));
                return;
            }
        }
        if let Err(e) = self.with_device(|d, ctx| d.activate(ctx)) {
            self.needs_reset(&chain(&e));
            return;
        }
        // Buffers made available before DRIVER_OK are served now.
        for q in &self.queues {
            if q.is_active() {
                q.kick();
            }
        }
    }

    /// Device reset (Status = 0).
    pub fn reset(&mut self) {
        self.with_device(|d, ctx| d.reset(ctx));
        for q in &mut self.queues {
            q.reset();
        }
        self.regs = MmioRegs::default();
        self.interrupt.clear();
    }

    /// Waits until the device's backend holds no request (see
    /// [`VirtioDevice::quiesce`]): nothing writes guest memory or the disk
    /// behind the transport's back while it stays locked.
    pub fn quiesce(&mut self) {
        self.with_device(|d, ctx| d.quiesce(ctx));
    }

    /// Drops the pins the device keeps between requests (see
    /// [`VirtioDevice::drop_cached_pins`]).
    pub fn drop_cached_pins(&mut self) {
        self.device.drop_cached_pins();
    }

    /// The first half of a fuzzing clone's reset to its snapshot: a device
    /// reset (the rings' pins are dropped, completions still on their way
    /// are dropped), then the backend drained and the device's own state
    /// put back as at its fork. The clone's memory is reset next, then
    /// [`Transport::restore`] puts the snapshot's transport state back.
    pub fn rewind(&mut self) -> Result<(), DeviceError> {
        self.reset();
        self.quiesce();
        self.device.rewind()
    }

    /// The state a fork or a snapshot keeps.
    pub fn state(&self) -> MmioState {
        let mut regs = self.regs;
        regs.interrupt_status = self.interrupt.status();
        MmioState {
            regs,
            queues: self.queues.iter().map(DeviceQueue::snapshot).collect(),
        }
    }

    /// Puts the transport into `state`: registers and queues (their rings
    /// pinned again in this VM's memory); then lets the device serve again
    /// the requests its queues hold, and those the driver had made
    /// available but the device had not taken yet.
    pub fn restore(&mut self, state: &MmioState) {
        self.reset();
        self.regs = state.regs;
        if state.regs.interrupt_status != 0 {
            self.interrupt.raise(state.regs.interrupt_status);
        }
        for (i, snap) in state.queues.iter().enumerate() {
            let Some(q) = self.queues.get_mut(i) else {
                break;
            };
            if let Err(e) = q.restore(&self.mem, snap) {
                self.needs_reset(&format!("restoring queue {i}: {}", chain(&e)));
                return;
            }
        }
        let s = self.regs.status;
        if s & status::DRIVER_OK != 0 && s & status::NEEDS_RESET == 0 {
            self.with_device(|d, ctx| d.resume(ctx));
            // A notification the driver sent before the state was saved
            // went to the other VM's device thread: look at each ring once,
            // as if it came here too.
            for q in self.queues.iter().filter(|q| q.is_active()) {
                q.kick();
            }
        }
    }
}

pub(crate) use crate::error_chain as chain;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::balloon::Balloon;
    use crate::virtio::testutil::{Driver, Rings, memory, snapshot};

    /// A chain the driver made available, and notified the *other* VM's
    /// device of, before the state was saved: the restored transport must
    /// look at the ring without waiting for a notification of its own.
    #[test]
    fn a_restored_transport_looks_at_its_rings_once() {
        let mem = memory();
        let d = Driver::new(Box::new(Balloon::new(0)), &mem);
        assert_eq!(d.standard(3, 8) & status::DRIVER_OK, status::DRIVER_OK);
        let rings = Rings::standard(0, 8);
        d.desc(rings, 0, 0x1000, 4, 0, 0);
        d.publish(rings, 0, 0);
        let state = d.lock().state();
        let clone = Driver::new(d.lock().fork_device().unwrap(), &memory());
        clone.mem.write(0, &snapshot(&mem)).unwrap();
        clone.lock().restore(&state);
        let t = clone.lock();
        assert!(
            t.queues()[0].take_notification(),
            "the clone's device thread would never look at the ring"
        );
    }
}
