//! virtio-balloon (virtio 1.2, section 5.5): inflate, deflate and the
//! statistics queue.
//!
//! Inflating a page discards it through `memory` (`VmMemory::discard`):
//! the VM's mapping is dropped and the frame freed unless something else
//! holds it (another VM sharing it copy-on-write, a pin); a write-protect
//! marker on the page is kept by `memory`. The next touch of the page
//! reads zeros. Deflating gives the pages back: nothing to do but count
//! them, since a discarded page comes back on first touch.
//!
//! The statistics buffer is held by the device (as the specification
//! says) until the host asks for fresh statistics
//! ([`Balloon::request_stats`]); its contents are read when it arrives.

use std::any::Any;

use memory::PAGE_SIZE;

use super::device::{Ctx, DeviceError, VirtioDevice};
use super::queue::{Chain, Desc, QueueError};
use super::{Buffers, id, read_config_bytes};

/// Entries per queue.
pub const QUEUE_SIZE: u16 = 128;
/// Feature: the statistics queue.
pub const F_STATS_VQ: u64 = 1 << 1;
/// Balloon pages are always 4 KiB.
const PFN_SHIFT: u32 = 12;
/// Largest inflate or deflate buffer accepted (in PFNs: 1 GiB of pages).
const MAX_PFNS: u64 = 1 << 18;
/// Largest statistics buffer accepted (entries of 10 bytes).
const MAX_STATS: u64 = 64;

const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const STATS: usize = 2;

/// What the balloon knows, as the VMM reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonState {
    /// `num_pages`: the target the host set.
    pub target: u32,
    /// `actual`: what the driver reports.
    pub actual: u32,
    /// Pages inflated (and not deflated) so far.
    pub inflated: u64,
    /// Frames the inflations dropped.
    pub discarded: u64,
    /// The last statistics: (tag, value).
    pub stats: Vec<(u16, u64)>,
}

/// A virtio-balloon device.
#[derive(Debug)]
pub struct Balloon {
    state: BalloonState,
    /// The state when [`VirtioDevice::fork`] made this device, which a
    /// rewind goes back to.
    at_fork: BalloonState,
    /// The statistics buffer the device holds.
    stats_head: Option<u16>,
    /// Pages below this address are never discarded (the VMM's own
    /// structures of program mode).
    protect_below: u64,
}

impl Balloon {
    /// A balloon that never discards guest-physical pages below
    /// `protect_below`.
    pub fn new(protect_below: u64) -> Self {
        Self {
            state: BalloonState::default(),
            at_fork: BalloonState::default(),
            stats_head: None,
            protect_below,
        }
    }

    /// The state (target, actual, inflated pages, statistics).
    pub fn state(&self) -> &BalloonState {
        &self.state
    }

    /// Sets the target size in pages and tells the driver.
    pub fn set_target(&mut self, ctx: &mut Ctx<'_>, pages: u32) {
        self.state.target = pages;
        ctx.config_changed();
    }

    /// Returns the statistics buffer so that the driver refills it; false
    /// if the device holds none.
    pub fn request_stats(&mut self, ctx: &mut Ctx<'_>) -> bool {
        let Some(head) = self.stats_head.take() else {
            return false;
        };
        ctx.complete(STATS, head, 0);
        ctx.notify_used(STATS);
        !ctx.is_broken()
    }

    fn config(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[0..4].copy_from_slice(&self.state.target.to_le_bytes());
        c[4..8].copy_from_slice(&self.state.actual.to_le_bytes());
        c
    }

    fn pfns(ctx: &Ctx<'_>, chain: &[Desc]) -> Result<Vec<u32>, QueueError> {
        let bufs = Buffers::pin(ctx.mem, chain, false, MAX_PFNS * 4)?;
        let mut raw = vec![0u8; (bufs.readable_len() / 4 * 4) as usize];
        bufs.read(0, &mut raw)?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }

    fn inflate(&mut self, ctx: &Ctx<'_>, pfns: &[u32]) {
        for &pfn in pfns {
            let gpa = u64::from(pfn) << PFN_SHIFT;
            if gpa < self.protect_below || !ctx.mem.layout().contains(gpa, PAGE_SIZE) {
                continue;
            }
            match ctx.mem.discard(gpa, PAGE_SIZE) {
                Ok(n) => {
                    self.state.discarded += n;
                    self.state.inflated += 1;
                }
                Err(e) => log::debug!("virtio-balloon: page {gpa:#x}: {e}"),
            }
        }
    }

    fn serve(&mut self, ctx: &mut Ctx<'_>, q: usize) {
        for (head, chain) in ctx.pop_all(q) {
            if q == STATS {
                self.read_stats(ctx, chain);
                if let Some(old) = self.stats_head.replace(head) {
                    // A second buffer: give the older one back.
                    ctx.complete(q, old, 0);
                }
                continue;
            }
            match chain.and_then(|c| Self::pfns(ctx, &c)) {
                Ok(pfns) if q == INFLATE => self.inflate(ctx, &pfns),
                Ok(pfns) => {
                    let n = pfns.len() as u64;
                    self.state.inflated = self.state.inflated.saturating_sub(n);
                }
                Err(e) => log::debug!("virtio-balloon: {}", super::mmio::chain(&e)),
            }
            ctx.complete(q, head, 0);
        }
        ctx.notify_used(q);
    }

    fn read_stats(&mut self, ctx: &Ctx<'_>, chain: Result<Chain, QueueError>) {
        let read = chain
            .and_then(|c| Buffers::pin(ctx.mem, &c, false, MAX_STATS * 10))
            .and_then(|b| {
                let mut raw = vec![0u8; (b.readable_len() / 10 * 10) as usize];
                b.read(0, &mut raw).map(|()| raw)
            });
        match read {
            Ok(raw) => {
                self.state.stats = raw
                    .chunks_exact(10)
                    .map(|c| {
                        let tag = u16::from_le_bytes([c[0], c[1]]);
                        (
                            tag,
                            u64::from_le_bytes(c[2..10].try_into().expect("8 bytes")),
                        )
                    })
                    .collect();
            }
            Err(e) => log::debug!("virtio-balloon: statistics: {}", super::mmio::chain(&e)),
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        id::BALLOON
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        F_STATS_VQ
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, _ctx: &mut Ctx<'_>, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        let mut c = self.config();
        for (i, b) in data.iter().enumerate() {
            let at = offset.checked_add(i as u64);
            if let Some(at @ 4..8) = at {
                c[at as usize] = *b;
            }
        }
        self.state.actual = u32::from_le_bytes(c[4..8].try_into().expect("4 bytes"));
    }

    fn queue_notify(&mut self, ctx: &mut Ctx<'_>, queue: usize) {
        if queue == STATS && !ctx.has(F_STATS_VQ) {
            return;
        }
        if matches!(queue, INFLATE | DEFLATE | STATS) {
            self.serve(ctx, queue);
        }
    }

    fn reset(&mut self, _ctx: &mut Ctx<'_>) {
        self.stats_head = None;
        self.state.actual = 0;
    }

    fn fork(&self) -> Result<Box<dyn VirtioDevice>, DeviceError> {
        Ok(Box::new(Balloon {
            state: self.state.clone(),
            at_fork: self.state.clone(),
            stats_head: None,
            protect_below: self.protect_below,
        }))
    }

    /// The inflated pages were discarded through `memory`, which the
    /// clone's memory reset puts back; the counters go back here.
    fn rewind(&mut self) -> Result<(), DeviceError> {
        self.state = self.at_fork.clone();
        self.stats_head = None;
        Ok(())
    }

    fn resume(&mut self, ctx: &mut Ctx<'_>) {
        // The clone holds the statistics buffer its parent held; inflate
        // and deflate requests are served at once, so none is in flight.
        self.stats_head = ctx
            .queues
            .get(STATS)
            .and_then(|q| q.held.iter().next().copied());
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
