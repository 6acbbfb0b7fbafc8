//! virtio-net (virtio 1.2, section 5.1) on a TAP device.
//!
//! Queue 0 receives, queue 1 transmits; every frame carries the 12-byte
//! virtio-net header, which the TAP understands as is (`IFF_VNET_HDR`).
//! Transmitted frames go from the pinned guest buffers to the TAP with one
//! `writev`; receive buffers are pinned long-term when the driver posts
//! them, and a frame is read from the TAP straight into one with `readv`.
//!
//! Offloads follow what was negotiated: the TAP hands the guest partial
//! checksums and TSO frames only if the driver accepted them (GUEST_CSUM,
//! GUEST_TSO4), and a transmitted frame that asks for an offload the
//! driver did not negotiate (CSUM, HOST_TSO4) is dropped.
//!
//! A fork's clone gets the same device with its link unplugged: what it
//! transmits is completed and dropped, and it receives nothing (two VMs
//! cannot share one TAP's traffic).

use std::any::Any;
use std::collections::VecDeque;

use vmm_sys_util::epoll::EventSet;

use super::buffers::iovecs;
use super::device::{Ctx, DeviceError, VirtioDevice};
use super::queue::{Chain, QueueError};
use super::tap::{Tap, offload};
use super::worker::HOST_TOKEN_BASE;
use super::{Buffers, id, read_config_bytes};

/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of the virtio-net header (with `num_buffers`, as in virtio 1.x).
pub const HDR_LEN: u64 = 12;
/// Largest frame with its header the device moves.
const MAX_FRAME: u64 = 65562;
const RX: usize = 0;
const TX: usize = 1;
const TAP_TOKEN: u64 = HOST_TOKEN_BASE;

/// Feature bits (section 5.1.3).
pub mod feature {
    /// The device handles partial checksums of transmitted frames.
    pub const CSUM: u64 = 1 << 0;
    /// The driver handles partial checksums of received frames.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// The device has a MAC address.
    pub const MAC: u64 = 1 << 5;
    /// The driver takes TSO frames over IPv4.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// The device segments TSO frames over IPv4.
    pub const HOST_TSO4: u64 = 1 << 11;
}

const HDR_F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;

/// A virtio-net device.
#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
    /// None for a clone: the link is unplugged.
    tap: Option<Tap>,
    /// Receive buffers the driver posted, pinned, oldest first.
    posted: VecDeque<(u16, Buffers)>,
    /// Whether the device thread waits for frames on the TAP.
    polling: bool,
    /// Transmitted frames dropped (a full TAP, an offload not negotiated).
    pub dropped: u64,
}

impl Net {
    /// A device on the TAP device `tap` with MAC address `mac`.
    pub fn new(tap: &str, mac: [u8; 6]) -> Result<Self, DeviceError> {
        let tap = Tap::open(tap, HDR_LEN as i32)
            .map_err(|e| DeviceError::Unsupported(crate::error_chain(&e)))?;
        Ok(Self::with_tap(Some(tap), mac))
    }

    /// A device whose link is unplugged: it drops what it transmits and
    /// receives nothing (a fork's clone, tests).
    pub fn unplugged(mac: [u8; 6]) -> Self {
        Self::with_tap(None, mac)
    }

    fn with_tap(tap: Option<Tap>, mac: [u8; 6]) -> Self {
        Self {
            mac,
            tap,
            posted: VecDeque::new(),
            polling: false,
            dropped: 0,
        }
    }

    /// Waits for frames on the TAP only while buffers are posted.
    fn poll_tap(&mut self, ctx: &Ctx<'_>, on: bool) {
        let Some(tap) = &self.tap else {
            return;
        };
        if on == self.polling {
            return;
        }
        let events = if on { EventSet::IN } else { EventSet::empty() };
        let (fd, poller) = (tap.raw_fd(), ctx.poller);
        let r = poller
            .modify(fd, events, TAP_TOKEN)
            .or_else(|_| poller.add(fd, events, TAP_TOKEN));
        match r {
            Ok(()) => self.polling = on,
            Err(e) => log::warn!("virtio-net: cannot poll the TAP: {e}"),
        }
    }

    /// Pins newly posted receive buffers.
    fn post(&mut self, ctx: &mut Ctx<'_>, heads: Vec<(u16, Result<Chain, QueueError>)>) {
        for (head, chain) in heads {
            let bufs = chain.and_then(|c| {
                let b = Buffers::pin(ctx.mem, &c, true, MAX_FRAME)?;
                match b.readable_len() == 0 && b.writable_len() >= HDR_LEN {
                    true => Ok(b),
                    false => Err(QueueError::Bounds),
                }
            });
            match bufs {
                Ok(b) => self.posted.push_back((head, b)),
                Err(e) => {
                    log::debug!("virtio-net: bad receive buffer: {e}");
                    ctx.complete(RX, head, 0);
                }
            }
        }
    }

    /// Moves frames from the TAP into posted buffers while both last.
    fn receive(&mut self, ctx: &mut Ctx<'_>) {
        let mut any = false;
        while let (Some(tap), Some((head, bufs))) = (&self.tap, self.posted.front()) {
            let read = bufs
                .writable_slices(0, bufs.writable_len())
                .map_err(std::io::Error::other)
                .and_then(|s| tap.readv(&iovecs(&s)));
            let n = match read {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    log::warn!("virtio-net: reading the TAP: {e}");
                    break;
                }
            };
            // Without VIRTIO_NET_F_MRG_RXBUF a frame is in one buffer.
            let _ = bufs.write(10, &1u16.to_le_bytes());
            let head = *head;
            self.posted.pop_front();
            ctx.complete(RX, head, n as u32);
            any = true;
        }
        if any {
            ctx.notify_used(RX);
        }
        let more = !self.posted.is_empty();
        self.poll_tap(ctx, more);
    }

    /// Whether a transmitted frame's header asks only for negotiated
    /// offloads.
    fn allowed(ctx: &Ctx<'_>, hdr: &[u8; HDR_LEN as usize]) -> bool {
        let csum = hdr[0] & HDR_F_NEEDS_CSUM == 0 || ctx.has(feature::CSUM);
        let gso = match hdr[1] {
            GSO_NONE => true,
            GSO_TCPV4 => ctx.has(feature::HOST_TSO4) && ctx.has(feature::CSUM),
            _ => false,
        };
        csum && gso
    }

    fn transmit_one(&mut self, ctx: &Ctx<'_>, chain: Result<Chain, QueueError>) {
        let bufs = match chain.and_then(|c| Buffers::pin(ctx.mem, &c, false, MAX_FRAME)) {
            Ok(b) => b,
            Err(e) => {
                log::debug!("virtio-net: bad transmit buffer: {e}");
                return;
            }
        };
        let mut hdr = [0u8; HDR_LEN as usize];
        if bufs.read(0, &mut hdr).is_err() || !Self::allowed(ctx, &hdr) {
            self.dropped += 1;
            return;
        }
        let Some(tap) = &self.tap else {
            return;
        };
        let sent = bufs
            .readable_slices(0, bufs.readable_len())
            .map_err(std::io::Error::other)
            .and_then(|s| tap.writev(&iovecs(&s)));
        if !matches!(sent, Ok(Some(_))) {
            self.dropped += 1;
        }
    }

    fn transmit(&mut self, ctx: &mut Ctx<'_>) {
        let popped = ctx.pop_all(TX);
        if popped.is_empty() {
            return;
        }
        for (head, chain) in popped {
            self.transmit_one(ctx, chain);
            ctx.complete(TX, head, 0);
        }
        ctx.notify_used(TX);
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        id::NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        feature::CSUM
            | feature::GUEST_CSUM
            | feature::MAC
            | feature::GUEST_TSO4
            | feature::HOST_TSO4
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }

    fn activate(&mut self, ctx: &mut Ctx<'_>) -> Result<(), DeviceError> {
        let Some(tap) = &self.tap else {
            return Ok(());
        };
        let mut flags = 0;
        if ctx.has(feature::GUEST_CSUM) {
            flags |= offload::CSUM;
            if ctx.has(feature::GUEST_TSO4) {
                flags |= offload::TSO4;
            }
        }
        tap.set_offload(flags)
            .map_err(|e| DeviceError::Unsupported(crate::error_chain(&e)))
    }

    fn queue_notify(&mut self, ctx: &mut Ctx<'_>, queue: usize) {
        match queue {
            RX => {
                let heads = ctx.pop_all(RX);
                self.post(ctx, heads);
                self.receive(ctx);
            }
            TX => self.transmit(ctx),
            _ => {}
        }
    }

    fn host_event(&mut self, ctx: &mut Ctx<'_>, token: u64, _events: u32) {
        if token == TAP_TOKEN {
            self.receive(ctx);
        }
    }

    fn reset(&mut self, ctx: &mut Ctx<'_>) {
        self.posted.clear();
        self.poll_tap(ctx, false);
    }

    fn fork(&self) -> Result<Box<dyn VirtioDevice>, DeviceError> {
        Ok(Box::new(Self::unplugged(self.mac)))
    }

    fn resume(&mut self, ctx: &mut Ctx<'_>) {
        // The clone's posted buffers are its copies of its parent's.
        let held: Vec<u16> = ctx.queues[RX].held.iter().copied().collect();
        let heads = held
            .into_iter()
            .map(|h| (h, ctx.queues[RX].chain_of(h)))
            .collect();
        self.post(ctx, heads);
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
