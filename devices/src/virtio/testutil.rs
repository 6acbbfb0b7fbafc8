//! A driver for unit tests: guest memory of its own, a transport driven
//! synchronously (no device thread: notifications are served on the
//! test's thread), and a small random generator. The hostile-driver
//! harness in `fuzz` is built on it, so it is also built with the
//! `fuzzing` feature.

use std::sync::{Arc, MutexGuard, PoisonError};

use memory::{Config, Context, Layout, VmMemory};

use super::mmio::reg;
use super::{Interrupt, Shared, Transport, VirtioDevice, features, status};

/// Guest RAM of a test VM.
pub const MEM: u64 = 512 << 10;
/// Buffers live below this address, rings above (one 32 KiB window per
/// queue), so that no device-written buffer can overlap a ring.
pub const DATA_END: u64 = 384 << 10;
/// The ring window of each queue.
pub const RING_WINDOW: u64 = 32 << 10;

/// Where a random case's choices come from: a xorshift64* generator
/// seeded by the test, or a tape of bytes (a fuzzer's input) handed out a
/// few at a time, each choice taking only the bytes its range needs, so
/// that a coverage-guided fuzzer steers every choice. Once the tape runs
/// out the choices go on from a generator seeded by its length.
#[derive(Debug)]
pub struct Rng<'a> {
    state: u64,
    tape: &'a [u8],
}

impl Rng<'static> {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed | 1,
            tape: &[],
        }
    }
}

impl<'a> Rng<'a> {
    /// Choices read off `tape`.
    pub fn from_bytes(tape: &'a [u8]) -> Self {
        Self {
            state: (tape.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            tape,
        }
    }

    /// The next `width` bytes of the tape (little-endian), or the next
    /// generated value once it is used up.
    fn take(&mut self, width: usize) -> u64 {
        if self.tape.is_empty() {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            return self.state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        }
        let (now, rest) = self.tape.split_at(width.min(self.tape.len()));
        self.tape = rest;
        let mut b = [0u8; 8];
        b[..now.len()].copy_from_slice(now);
        u64::from_le_bytes(b)
    }

    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.take(8)
    }

    /// A value below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        let bits = 64 - (n - 1).leading_zeros() as usize;
        self.take(bits.div_ceil(8).max(1)) % n
    }

    /// True `pct` percent of the time.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

/// Memory of a test VM, every page present.
pub fn memory() -> Arc<VmMemory> {
    let ctx = Context::new(Config::default());
    let mem = VmMemory::new(&ctx, Layout::new(&[(0, MEM)]).unwrap()).unwrap();
    mem.write(0, &vec![0u8; MEM as usize]).unwrap();
    mem
}

/// All of guest memory.
pub fn snapshot(mem: &VmMemory) -> Vec<u8> {
    let mut b = vec![0u8; MEM as usize];
    mem.read(0, &mut b).unwrap();
    b
}

/// Where a test queue's rings are.
#[derive(Clone, Copy, Debug)]
pub struct Rings {
    /// QueueNum.
    pub size: u16,
    /// The descriptor table.
    pub desc: u64,
    /// The available ring.
    pub avail: u64,
    /// The used ring.
    pub used: u64,
}

impl Rings {
    /// Well-formed rings of `size` entries in queue `q`'s window.
    pub fn standard(q: usize, size: u16) -> Self {
        let base = DATA_END + q as u64 * RING_WINDOW;
        Self {
            size,
            desc: base,
            avail: base + (16 << 10),
            used: base + (24 << 10),
        }
    }
}

/// A test driver of one transport.
#[derive(Debug)]
pub struct Driver {
    /// The transport.
    pub t: Shared,
    /// Its memory.
    pub mem: Arc<VmMemory>,
}

impl Driver {
    /// A transport for `device` over `mem`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: &Arc<VmMemory>) -> Self {
        let t = Transport::new(device, mem.clone(), Arc::new(Interrupt::polled())).unwrap();
        Self {
            t,
            mem: mem.clone(),
        }
    }

    /// The transport, locked.
    pub fn lock(&self) -> MutexGuard<'_, Transport> {
        self.t.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A register write.
    pub fn w(&self, off: u64, v: u32) {
        self.lock().write(off, &v.to_le_bytes());
    }

    /// A register read.
    pub fn r(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.lock().read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// The features the device offers.
    pub fn offered(&self) -> u64 {
        self.w(reg::DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(self.r(reg::DEVICE_FEATURES));
        self.w(reg::DEVICE_FEATURES_SEL, 1);
        lo | u64::from(self.r(reg::DEVICE_FEATURES)) << 32
    }

    /// Reset, ACKNOWLEDGE, DRIVER, `features`, FEATURES_OK; whether the
    /// device accepted the features.
    pub fn begin(&self, features: u64) -> bool {
        self.w(reg::STATUS, 0);
        self.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(reg::DRIVER_FEATURES, features as u32);
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, (features >> 32) as u32);
        self.w(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        self.r(reg::STATUS) & status::FEATURES_OK != 0
    }

    /// Sets up queue `q` on `rings`.
    pub fn queue(&self, q: u32, rings: Rings, ready: bool) {
        self.w(reg::QUEUE_SEL, q);
        self.w(reg::QUEUE_NUM, u32::from(rings.size));
        for (lo, v) in [
            (reg::QUEUE_DESC_LOW, rings.desc),
            (reg::QUEUE_DRIVER_LOW, rings.avail),
            (reg::QUEUE_DEVICE_LOW, rings.used),
        ] {
            self.w(lo, v as u32);
            self.w(lo + 4, (v >> 32) as u32);
        }
        self.w(reg::QUEUE_READY, u32::from(ready));
    }

    /// DRIVER_OK; the status read back.
    pub fn ready(&self) -> u32 {
        let s = self.r(reg::STATUS);
        self.w(reg::STATUS, s | status::DRIVER_OK);
        self.r(reg::STATUS)
    }

    /// A notification of queue `q`, served at once.
    pub fn notify(&self, q: usize) {
        self.lock().queue_notify(q);
    }

    /// Writes descriptor `i` of a table.
    pub fn desc(&self, rings: Rings, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write(rings.desc + u64::from(i) * 16, &d).unwrap();
    }

    /// Makes `head` available as entry `at` and sets the index to `at + 1`.
    pub fn publish(&self, rings: Rings, at: u16, head: u16) {
        let slot = rings.avail + 4 + u64::from(at % rings.size) * 2;
        self.mem.write(slot, &head.to_le_bytes()).unwrap();
        self.mem
            .write(rings.avail + 2, &at.wrapping_add(1).to_le_bytes())
            .unwrap();
    }

    /// The used ring's index.
    pub fn used_idx(&self, rings: Rings) -> u16 {
        let mut b = [0u8; 2];
        self.mem.read(rings.used + 2, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    /// A full setup with fresh standard rings of `size` entries for
    /// `queues` queues; the status after DRIVER_OK.
    pub fn standard(&self, queues: usize, size: u16) -> u32 {
        let zeros = vec![0u8; queues * RING_WINDOW as usize];
        self.mem.write(DATA_END, &zeros).unwrap();
        self.begin(features::VERSION_1);
        for q in 0..queues {
            self.queue(q as u32, Rings::standard(q, size), true);
        }
        self.ready()
    }
}
