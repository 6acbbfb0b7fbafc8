//! The VMM side of virtio devices: the device flags, the virtio-mmio
//! window and its slots, KVM's ioeventfds and irqfds, the device threads,
//! and the copy of device state a fork makes.
//!
//! Slot `i` is the 4 KiB at `0xd000_0000 + i * 0x1000`, filled from 0 in
//! the order the device flags appear on the command line; a Linux guest
//! gets its interrupt on GSI `5 + i` (through an irqfd) and finds it
//! through a `virtio_mmio.device=4K@0x...:IRQ` entry on its command line.
//! A write to a slot's QueueNotify register is caught by KVM (an ioeventfd
//! per queue, matching the queue index) and wakes the device thread
//! without an exit to the VMM; every other register access is an MMIO
//! exit served on the vCPU's thread.
//!
//! Fork: [`VirtioBus::freeze`] locks every device (no request completes
//! and no ring changes meanwhile), saves its state and forks its host side
//! (a block device's overlay), for the moment memory is snapshotted; the
//! clone's bus is built from that ([`VirtioBus::restore`]), with its
//! rings pinned again in the clone's memory. Requests in flight at the
//! fork complete into the parent's memory; the clone serves its own copy
//! of them again.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use devices::virtio::balloon::Balloon;
use devices::virtio::blk::{Block, BlockConfig};
use devices::virtio::mmio::{SLOT_SIZE, reg};
use devices::virtio::net::Net;
use devices::virtio::vsock::Vsock;
use devices::virtio::{Interrupt, MmioState, Shared, Transport, VirtioDevice, Worker};
use kvm_ioctls::{IoEventAddress, VmFd};
use memory::VmMemory;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::vm::Mode;
use crate::x86::program::{LOW_END, MMIO_BASE, MMIO_SIZE};

/// Device slots in the window.
pub const SLOTS: usize = (MMIO_SIZE / SLOT_SIZE) as usize;
/// The GSI of slot 0; slot `i` uses `GSI_BASE + i`.
pub const GSI_BASE: u32 = 5;
/// The highest GSI the in-kernel I/O APIC has.
const MAX_GSI: u32 = 23;

/// Errors setting up virtio devices.
#[derive(Debug, Error)]
pub enum VirtioError {
    /// A device flag's value was refused.
    #[error("{0}")]
    Config(String),
    /// More devices than slots (or than interrupts for a kernel).
    #[error("at most {0} virtio devices fit")]
    TooMany(usize),
    /// A device could not be created.
    #[error("cannot create the {what} device")]
    Device {
        /// Which device.
        what: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A host resource (eventfd, thread) could not be had.
    #[error("cannot set up a virtio device")]
    Host(#[from] std::io::Error),
    /// KVM refused an ioeventfd or irqfd.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What was asked.
        what: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A device the VM gets, as the command line names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceConfig {
    /// `--blk PATH[,ro]`.
    Blk(BlockConfig),
    /// `--net tap=NAME[,mac=MAC]`.
    Net {
        /// The TAP device's name.
        tap: String,
        /// The guest's MAC address.
        mac: [u8; 6],
    },
    /// `--vsock cid=N,uds=PATH`.
    Vsock {
        /// The guest's context id.
        cid: u64,
        /// The host side's Unix socket.
        uds: PathBuf,
    },
    /// `--balloon`.
    Balloon,
}

/// The MAC address a `--net` device gets unless told otherwise.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn key_values(s: &str) -> Result<Vec<(&str, &str)>, String> {
    s.split(',')
        .map(|kv| {
            kv.split_once('=')
                .ok_or_else(|| format!("`{kv}` is not KEY=VALUE"))
        })
        .collect()
}

impl DeviceConfig {
    /// Parses the value of `--blk`: `PATH` or `PATH,ro`.
    pub fn parse_blk(s: &str) -> Result<Self, String> {
        let (path, read_only) = match s.rsplit_once(',') {
            Some((p, "ro")) => (p, true),
            Some((p, "rw")) => (p, false),
            _ => (s, false),
        };
        if path.is_empty() {
            return Err("--blk needs a file: PATH[,ro]".into());
        }
        Ok(Self::Blk(BlockConfig {
            read_only,
            ..BlockConfig::new(path.into())
        }))
    }

    /// Parses the value of `--net`: `tap=NAME[,mac=52:54:00:12:34:56]`.
    pub fn parse_net(s: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut mac = DEFAULT_MAC;
        for (k, v) in key_values(s)? {
            match k {
                "tap" if !v.is_empty() && v.len() < 16 => tap = Some(v.to_owned()),
                "tap" => return Err(format!("`{v}` is not a TAP name (1-15 bytes)")),
                "mac" => mac = parse_mac(v)?,
                _ => return Err(format!("--net knows tap= and mac=, not `{k}=`")),
            }
        }
        Ok(Self::Net {
            tap: tap.ok_or("--net needs tap=NAME")?,
            mac,
        })
    }

    /// Parses the value of `--vsock`: `cid=N,uds=PATH`.
    pub fn parse_vsock(s: &str) -> Result<Self, String> {
        let (mut cid, mut uds) = (None, None);
        for (k, v) in key_values(s)? {
            match k {
                "cid" => {
                    let n: u64 = v
                        .parse()
                        .map_err(|_| format!("cid `{v}` is not a number"))?;
                    if !(3..u64::from(u32::MAX)).contains(&n) {
                        return Err(format!("cid {n}: guest context ids are 3 to 4294967294"));
                    }
                    cid = Some(n);
                }
                "uds" if !v.is_empty() => uds = Some(PathBuf::from(v)),
                _ => return Err(format!("--vsock knows cid= and uds=, not `{k}={v}`")),
            }
        }
        Ok(Self::Vsock {
            cid: cid.ok_or("--vsock needs cid=N")?,
            uds: uds.ok_or("--vsock needs uds=PATH")?,
        })
    }

    /// The command-line flag that gives this device.
    pub fn flag(&self) -> String {
        match self {
            Self::Blk(c) if c.read_only => format!("--blk {},ro", c.path.display()),
            Self::Blk(c) => format!("--blk {}", c.path.display()),
            Self::Net { tap, mac } => {
                let mac: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
                format!("--net tap={tap},mac={}", mac.join(":"))
            }
            Self::Vsock { cid, uds } => format!("--vsock cid={cid},uds={}", uds.display()),
            Self::Balloon => "--balloon".into(),
        }
    }

    fn what(&self) -> &'static str {
        type_name(match self {
            Self::Blk(_) => devices::virtio::id::BLOCK,
            Self::Net { .. } => devices::virtio::id::NET,
            Self::Vsock { .. } => devices::virtio::id::VSOCK,
            Self::Balloon => devices::virtio::id::BALLOON,
        })
    }

    fn create(&self, mode: Mode) -> Result<Box<dyn VirtioDevice>, VirtioError> {
        let err = |e: Box<dyn std::error::Error + Send + Sync>| VirtioError::Device {
            what: self.what(),
            source: e,
        };
        Ok(match self {
            Self::Blk(config) => Box::new(Block::new(config.clone()).map_err(|e| err(e.into()))?),
            Self::Net { tap, mac } => Box::new(Net::new(tap, *mac).map_err(|e| err(e.into()))?),
            Self::Vsock { cid, uds } => {
                Box::new(Vsock::new(*cid, uds.clone()).map_err(|e| err(e.into()))?)
            }
            Self::Balloon => Box::new(Balloon::new(match mode {
                Mode::Program => LOW_END,
                Mode::Linux => 0,
            })),
        })
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("`{s}` is not a MAC address like 52:54:00:12:34:56");
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// Guest-physical address of slot `i`.
pub fn slot_addr(i: usize) -> u64 {
    MMIO_BASE + i as u64 * SLOT_SIZE
}

/// The kernel command-line entries for `n` devices in slots 0..n.
pub fn cmdline_entries(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "virtio_mmio.device=4K@{:#x}:{}",
                slot_addr(i),
                GSI_BASE + i as u32
            )
        })
        .collect()
}

#[derive(Debug)]
struct Slot {
    transport: Shared,
    _worker: Worker,
}

/// The devices of one VM and the window they live in.
#[derive(Debug, Default)]
pub struct VirtioBus {
    slots: Vec<Slot>,
}

/// The device state of a VM being forked: what the clone starts from.
#[derive(Debug)]
pub struct Frozen {
    states: Vec<MmioState>,
    devices: Vec<Box<dyn VirtioDevice>>,
}

/// The device state of a fuzzing snapshot: what each of its clones starts
/// from, and what a clone's reset puts back.
#[derive(Debug)]
pub struct Template {
    states: Vec<MmioState>,
    devices: Mutex<Vec<Box<dyn VirtioDevice>>>,
}

impl Template {
    /// The template of `frozen`, whose devices must all be able to go back
    /// to it (a block device's overlay can; a network link cannot).
    pub(crate) fn new(frozen: Frozen) -> Result<Self, String> {
        let Frozen {
            states,
            mut devices,
        } = frozen;
        for (i, d) in devices.iter_mut().enumerate() {
            if let Err(e) = d.rewind() {
                return Err(format!(
                    "the {} device in slot {i} cannot be part of a fuzzing target: {}",
                    type_name(d.device_type()),
                    crate::error_chain(&e)
                ));
            }
        }
        Ok(Self {
            states,
            devices: Mutex::new(devices),
        })
    }

    /// The device state a new clone starts from: the same transport state
    /// over devices forked from the template's.
    pub(crate) fn fork(&self) -> Result<Frozen, VirtioError> {
        let devices = self
            .devices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|d| d.fork())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| VirtioError::Device {
                what: "forked",
                source: e.into(),
            })?;
        Ok(Frozen {
            states: self.states.clone(),
            devices,
        })
    }

    /// The transports' state at the snapshot.
    pub(crate) fn states(&self) -> &[MmioState] {
        &self.states
    }
}

/// The name of a virtio device type, for messages.
fn type_name(device_type: u32) -> &'static str {
    match device_type {
        devices::virtio::id::BLOCK => "virtio-blk",
        devices::virtio::id::NET => "virtio-net",
        devices::virtio::id::VSOCK => "virtio-vsock",
        devices::virtio::id::BALLOON => "virtio-balloon",
        _ => "virtio",
    }
}

/// Keeps the devices of a VM being forked still; dropping it lets them go.
#[derive(Debug)]
pub struct FreezeGuard<'a> {
    _locks: Vec<MutexGuard<'a, Transport>>,
}

impl VirtioBus {
    /// Creates the devices of `configs` in slots 0.., with their
    /// notifications and interrupts wired into `kvm`, and starts their
    /// threads.
    pub fn new(
        configs: &[DeviceConfig],
        mem: &Arc<VmMemory>,
        kvm: &VmFd,
        mode: Mode,
    ) -> Result<Self, VirtioError> {
        check_count(configs.len(), mode)?;
        let mut bus = VirtioBus::default();
        for (i, cfg) in configs.iter().enumerate() {
            let device = cfg.create(mode)?;
            bus.slots.push(Self::plug(i, device, mem, kvm, mode, None)?);
        }
        Ok(bus)
    }

    /// Wires every queue's notification into `kvm` as well: the VM is
    /// moving to that KVM VM (see `fork.rs`). Program mode only, whose
    /// devices raise no interrupts.
    pub(crate) fn wire_notifications(&self, kvm: &VmFd) -> Result<(), VirtioError> {
        for (i, slot) in self.slots.iter().enumerate() {
            wire_queues(i, &slot.transport, kvm)?;
        }
        Ok(())
    }

    fn plug(
        i: usize,
        device: Box<dyn VirtioDevice>,
        mem: &Arc<VmMemory>,
        kvm: &VmFd,
        mode: Mode,
        state: Option<&MmioState>,
    ) -> Result<Slot, VirtioError> {
        let interrupt = match mode {
            Mode::Program => Interrupt::polled(),
            Mode::Linux => {
                let fd = EventFd::new(libc::EFD_NONBLOCK)?;
                kvm.register_irqfd(&fd, GSI_BASE + i as u32)
                    .map_err(|source| VirtioError::Kvm {
                        what: "route a virtio interrupt",
                        source,
                    })?;
                Interrupt::with_irqfd(fd)
            }
        };
        let transport = Transport::new(device, mem.clone(), Arc::new(interrupt))?;
        wire_queues(i, &transport, kvm)?;
        if let Some(state) = state {
            transport
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .restore(state);
        }
        let worker = Worker::spawn(transport.clone(), format!("virtio{i}"))?;
        Ok(Slot {
            transport,
            _worker: worker,
        })
    }

    /// Devices plugged.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The transport in slot `i`.
    pub fn transport(&self, i: usize) -> Option<&Shared> {
        self.slots.get(i).map(|s| &s.transport)
    }

    fn slot_of(&self, gpa: u64, len: usize) -> Option<(&Slot, u64)> {
        let off = gpa.checked_sub(MMIO_BASE)?;
        if off + len as u64 > MMIO_SIZE {
            return None;
        }
        let i = (off / SLOT_SIZE) as usize;
        let in_slot = off % SLOT_SIZE;
        if in_slot + len as u64 > SLOT_SIZE {
            return None;
        }
        self.slots.get(i).map(|s| (s, in_slot))
    }

    /// Whether `gpa` is in the virtio-mmio window.
    pub fn in_window(gpa: u64) -> bool {
        (MMIO_BASE..MMIO_BASE + MMIO_SIZE).contains(&gpa)
    }

    /// A load from the window; an empty slot reads as zeros (a driver
    /// probing it sees no magic value).
    pub fn read(&self, gpa: u64, data: &mut [u8]) {
        match self.slot_of(gpa, data.len()) {
            Some((s, off)) => s
                .transport
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .read(off, data),
            None => data.fill(0),
        }
    }

    /// A store into the window.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        if let Some((s, off)) = self.slot_of(gpa, data.len()) {
            s.transport
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write(off, data);
        }
    }

    /// Stops every device (its lock held) and saves what a clone starts
    /// from: each transport's state and a device over the clone's own
    /// host side. Hold the guard until memory is snapshotted. Requests in
    /// flight go on into this VM's memory; the clone serves its own copy
    /// of them again.
    pub fn freeze(&self) -> Result<(Frozen, FreezeGuard<'_>), VirtioError> {
        self.freeze_with(false)
    }

    /// As [`VirtioBus::freeze`], after waiting for every request in flight
    /// to be done with guest memory and the disk (a snapshot's instant:
    /// no buffer is caught half-written).
    pub fn freeze_drained(&self) -> Result<(Frozen, FreezeGuard<'_>), VirtioError> {
        self.freeze_with(true)
    }

    fn freeze_with(&self, drain: bool) -> Result<(Frozen, FreezeGuard<'_>), VirtioError> {
        let locks = self.lock_all(drain);
        let mut frozen = Frozen {
            states: Vec::with_capacity(locks.len()),
            devices: Vec::with_capacity(locks.len()),
        };
        for t in &locks {
            frozen.states.push(t.state());
            frozen
                .devices
                .push(t.fork_device().map_err(|e| VirtioError::Device {
                    what: "forked",
                    source: e.into(),
                })?);
        }
        Ok((frozen, FreezeGuard { _locks: locks }))
    }

    /// Holds every device still (no request completes, no ring changes)
    /// until the guard is dropped, without forking anything: a snapshot's
    /// instant. The requests in flight are waited for first (what they
    /// finish is returned to the driver), so no buffer or disk block is
    /// caught half-written; a slow disk lengthens the pause by its
    /// slowest request.
    pub fn hold(&self) -> FreezeGuard<'_> {
        FreezeGuard {
            _locks: self.lock_all(true),
        }
    }

    /// Every transport locked, in slot order; with `drain`, each device's
    /// requests in flight finished first (see `Transport::quiesce`). The
    /// pins devices keep between requests are dropped: a fork or a
    /// snapshot copies pinned pages, and should copy only those of
    /// requests.
    fn lock_all(&self, drain: bool) -> Vec<MutexGuard<'_, Transport>> {
        self.slots
            .iter()
            .map(|s| {
                let mut t = s.transport.lock().unwrap_or_else(PoisonError::into_inner);
                if drain {
                    t.quiesce();
                }
                t.drop_cached_pins();
                t
            })
            .collect()
    }

    /// Drops the pins devices keep between requests, one device at a
    /// time: before the guest asks for something pinned pages are exempt
    /// from (swap-out, migration, collapse, write protection), so that a
    /// buffer page the guest is done with is not held back by a device.
    pub(crate) fn drop_cached_pins(&self) {
        for s in &self.slots {
            s.transport
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .drop_cached_pins();
        }
    }

    /// The first half of a fuzzing clone's reset: every device reset,
    /// drained and put back as at its fork (see `Transport::rewind`),
    /// and held still until [`Rewound::restore`] after the clone's memory
    /// was reset.
    pub(crate) fn rewind(&self) -> Result<Rewound<'_>, VirtioError> {
        let mut locks = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let mut t = s.transport.lock().unwrap_or_else(PoisonError::into_inner);
            t.rewind().map_err(|e| VirtioError::Device {
                what: "reset",
                source: e.into(),
            })?;
            locks.push(t);
        }
        Ok(Rewound { locks })
    }

    /// The clone's bus: its devices from `frozen`, their rings pinned in
    /// the clone's memory `mem`, wired into its KVM VM.
    pub fn restore(
        frozen: Frozen,
        mem: &Arc<VmMemory>,
        kvm: &VmFd,
        mode: Mode,
    ) -> Result<Self, VirtioError> {
        let mut bus = VirtioBus::default();
        for (i, (device, state)) in frozen
            .devices
            .into_iter()
            .zip(frozen.states.iter())
            .enumerate()
        {
            bus.slots
                .push(Self::plug(i, device, mem, kvm, mode, Some(state))?);
        }
        Ok(bus)
    }
}

/// A fuzzing clone's devices between their rewind and the memory reset.
#[derive(Debug)]
pub(crate) struct Rewound<'a> {
    locks: Vec<MutexGuard<'a, Transport>>,
}

impl Rewound<'_> {
    /// Puts each transport back into the snapshot's state `states` (its
    /// rings pinned again in the reset memory) and lets the devices go.
    pub(crate) fn restore(mut self, states: &[MmioState]) {
        for (t, state) in self.locks.iter_mut().zip(states) {
            t.restore(state);
        }
    }
}

/// Has KVM signal each queue's notifier of slot `i` when the guest
/// writes the queue's number to its notify register.
fn wire_queues(i: usize, transport: &Shared, kvm: &VmFd) -> Result<(), VirtioError> {
    let t = transport.lock().unwrap_or_else(PoisonError::into_inner);
    let notify = IoEventAddress::Mmio(slot_addr(i) + reg::QUEUE_NOTIFY);
    for (q, queue) in t.queues().iter().enumerate() {
        kvm.register_ioevent(queue.notify_fd(), &notify, q as u32)
            .map_err(|source| VirtioError::Kvm {
                what: "add an ioeventfd for a virtio queue",
                source,
            })?;
    }
    Ok(())
}

fn check_count(n: usize, mode: Mode) -> Result<(), VirtioError> {
    let max = match mode {
        Mode::Program => SLOTS,
        Mode::Linux => (MAX_GSI - GSI_BASE + 1) as usize,
    };
    if n > max {
        return Err(VirtioError::TooMany(max));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        assert_eq!(
            DeviceConfig::parse_blk("/tmp/a.img,ro").unwrap(),
            DeviceConfig::Blk(BlockConfig {
                read_only: true,
                ..BlockConfig::new("/tmp/a.img".into())
            })
        );
        assert_eq!(
            DeviceConfig::parse_blk("/tmp/a,b.img").unwrap(),
            DeviceConfig::Blk(BlockConfig::new("/tmp/a,b.img".into()))
        );
        assert!(DeviceConfig::parse_blk(",ro").is_err());
        assert_eq!(
            DeviceConfig::parse_net("tap=tap0").unwrap(),
            DeviceConfig::Net {
                tap: "tap0".into(),
                mac: DEFAULT_MAC
            }
        );
        assert_eq!(
            DeviceConfig::parse_net("tap=t1,mac=02:00:00:00:00:0a").unwrap(),
            DeviceConfig::Net {
                tap: "t1".into(),
                mac: [2, 0, 0, 0, 0, 10]
            }
        );
        assert!(DeviceConfig::parse_net("mac=02:00:00:00:00:0a").is_err());
        assert!(DeviceConfig::parse_net("tap=x,mac=1:2").is_err());
        assert!(DeviceConfig::parse_net("tap=averyveryverylongname").is_err());
        assert_eq!(
            DeviceConfig::parse_vsock("cid=3,uds=/tmp/v.sock").unwrap(),
            DeviceConfig::Vsock {
                cid: 3,
                uds: "/tmp/v.sock".into()
            }
        );
        assert!(DeviceConfig::parse_vsock("cid=2,uds=/x").is_err());
        assert!(DeviceConfig::parse_vsock("cid=3").is_err());
        assert!(DeviceConfig::parse_vsock("uds=/x,cid=x").is_err());
        for (flag, parse) in [
            ("--blk /tmp/a.img", DeviceConfig::parse_blk as fn(&str) -> _),
            ("--blk /tmp/a.img,ro", DeviceConfig::parse_blk),
            (
                "--net tap=t1,mac=02:00:00:00:00:0a",
                DeviceConfig::parse_net,
            ),
            ("--vsock cid=3,uds=/tmp/v.sock", DeviceConfig::parse_vsock),
        ] {
            let (_, value) = flag.split_once(' ').unwrap();
            assert_eq!(parse(value).unwrap().flag(), flag);
        }
        assert_eq!(DeviceConfig::Balloon.flag(), "--balloon");
    }

    #[test]
    fn kernel_command_line_entries() {
        assert_eq!(
            cmdline_entries(3),
            [
                "virtio_mmio.device=4K@0xd0000000:5",
                "virtio_mmio.device=4K@0xd0001000:6",
                "virtio_mmio.device=4K@0xd0002000:7"
            ]
        );
        assert!(check_count(19, Mode::Linux).is_ok());
        assert!(check_count(20, Mode::Linux).is_err());
        assert!(check_count(32, Mode::Program).is_ok());
        assert!(check_count(33, Mode::Program).is_err());
    }
}
