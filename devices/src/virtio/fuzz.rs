//! Hostile drivers against every device: random queues over guest memory
//! of random contents, and the cases the specification's rules name one
//! by one.
//!
//! Each random case checks that the device neither panics nor hangs, that
//! every byte it changed lies in a used ring or in a buffer some
//! descriptor marked device-writable, and that after a reset the device
//! works again. A case is [`run`] from a string of bytes that makes every
//! choice: `cargo test` runs a bounded number of random ones, and with the
//! `fuzzing` feature the `cargo fuzz` targets in `fuzz/` run it on their
//! coverage-guided inputs.

use std::path::PathBuf;
use std::sync::OnceLock;

use super::balloon::Balloon;
use super::blk::{Block, BlockConfig};
use super::mmio::reg;
use super::net::Net;
use super::testutil::{DATA_END, Driver, MEM, RING_WINDOW, Rings, Rng, memory, snapshot};
use super::vsock::Vsock;
use super::{VirtioDevice, features, status};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// The device a case drives.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// virtio-blk on a 64 KiB image of its own, requests served inline.
    Blk,
    /// virtio-net with its link unplugged.
    Net,
    /// virtio-vsock without a host side.
    Vsock,
    /// The balloon.
    Balloon,
}

/// One hostile case against `kind`, every choice read off `data` (a few
/// bytes each, then a generator once `data` runs out); panics if the
/// device panics, writes a byte outside the used rings and the
/// device-writable buffers, or does not work again after a reset.
pub fn run(kind: Kind, data: &[u8]) {
    hostile_case(kind, Rng::from_bytes(data));
}

/// A disk image removed on drop.
struct Image(PathBuf);

impl Image {
    fn new() -> Self {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("vmm-fuzz-{}-{n}.img", std::process::id()));
        std::fs::write(&p, vec![0x5a; 64 << 10]).unwrap();
        Self(p)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn device(kind: Kind, image: &Image) -> (Box<dyn VirtioDevice>, usize) {
    match kind {
        Kind::Blk => {
            let config = BlockConfig {
                threaded: false,
                ..BlockConfig::new(image.0.clone())
            };
            (Box::new(Block::new(config).unwrap()), 1)
        }
        Kind::Net => (Box::new(Net::unplugged([2, 0, 0, 0, 0, 9])), 2),
        Kind::Vsock => (Box::new(Vsock::unplugged(3)), 3),
        // Nothing may be discarded: the check below compares memory.
        Kind::Balloon => (Box::new(Balloon::new(MEM)), 3),
    }
}

fn random_rings(rng: &mut Rng<'_>, q: usize) -> Rings {
    let mut r = Rings::standard(q, 16);
    r.size = if rng.chance(70) {
        1 << rng.below(9)
    } else {
        rng.below(301) as u16
    };
    if rng.chance(10) {
        r.desc += rng.below(16);
    }
    if rng.chance(10) {
        r.avail += 1;
    }
    if rng.chance(10) {
        r.used += 2;
    }
    r
}

/// Random descriptors and available entries; buffers mostly in RAM below
/// the rings, some anywhere, some of absurd length. Half the
/// device-readable buffers in RAM start with bytes of the case's own (a
/// request or packet header, page numbers) rather than the memory's, so
/// that a fuzzer steers what the device parses.
fn fill_queue(d: &Driver, rng: &mut Rng<'_>, r: Rings) {
    let size = u64::from(r.size.min(512));
    for i in 0..size {
        let addr = match rng.below(10) {
            0 => rng.next(),
            1 => MEM - rng.below(8192),
            _ => rng.below(DATA_END),
        };
        let len = match rng.below(10) {
            0 => rng.next() as u32,
            1 | 2 => rng.below(64 << 10) as u32,
            _ => rng.below(4097) as u32,
        };
        let mut flags = rng.below(4) as u16;
        if rng.chance(3) {
            flags |= F_INDIRECT;
        }
        // A writable buffer never reaches the rings (see `testutil`).
        let len = match flags & F_WRITE != 0 && addr < DATA_END {
            true => len.min((DATA_END - addr) as u32),
            false => len,
        };
        let next = match rng.chance(80) {
            true => rng.below(size.max(1)) as u16,
            false => rng.next() as u16,
        };
        d.desc(r, i as u16, addr, len, flags, next);
        if flags & F_WRITE == 0 && addr < DATA_END && rng.chance(50) {
            let n = rng.below(49).min(u64::from(len)).min(DATA_END - addr);
            let head: Vec<u8> = (0..n).map(|_| rng.below(256) as u8).collect();
            d.mem.write(addr, &head).unwrap();
        }
    }
    for i in 0..size {
        let head = match rng.chance(95) {
            true => rng.below(size.max(1)) as u16,
            false => rng.next() as u16,
        };
        let slot = r.avail + 4 + i * 2;
        if slot + 2 <= DATA_END + 3 * RING_WINDOW {
            d.mem.write(slot, &head.to_le_bytes()).unwrap();
        }
    }
    let idx = match rng.chance(90) {
        true => rng.below(size + 1) as u16,
        false => rng.next() as u16,
    };
    d.mem.write(r.avail + 2, &idx.to_le_bytes()).unwrap();
}

/// The bytes a device may change: used rings and device-writable buffers.
fn allowed(mem: &[u8], rings: &[Rings]) -> Vec<bool> {
    let mut ok = vec![false; mem.len()];
    let mut mark = |from: u64, len: u64| {
        let end = from.saturating_add(len).min(MEM);
        if from < end {
            ok[from as usize..end as usize].fill(true);
        }
    };
    for r in rings {
        let n = u64::from(r.size);
        mark(r.used, 6 + 8 * n);
        for i in 0..n.min(512) {
            let at = (r.desc + i * 16) as usize;
            let Some(d) = mem.get(at..at + 16) else {
                continue;
            };
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
            let len = u64::from(u32::from_le_bytes(d[8..12].try_into().unwrap()));
            if u16::from_le_bytes([d[12], d[13]]) & F_WRITE != 0 {
                mark(addr, len);
            }
        }
    }
    ok
}

/// Random bytes, twice the size of guest memory: a case's memory is a
/// window of them. Made once, as a loop over every byte of memory in each
/// case would be slow under a fuzzer's instrumentation.
fn junk() -> &'static [u8] {
    static JUNK: OnceLock<Vec<u8>> = OnceLock::new();
    JUNK.get_or_init(|| {
        let mut rng = Rng::new(0x6a75_6e6b);
        (0..2 * MEM).map(|_| rng.next() as u8).collect()
    })
}

/// One random case against `kind`.
fn hostile_case(kind: Kind, mut rng: Rng<'_>) {
    let image = Image::new();
    let mem = memory();
    let at = rng.below(MEM) as usize;
    mem.write(0, &junk()[at..at + MEM as usize]).unwrap();
    let (dev, queues) = device(kind, &image);
    let d = Driver::new(dev, &mem);
    let wanted = d.offered() & rng.next();
    let version = if rng.chance(90) {
        features::VERSION_1
    } else {
        0
    };
    d.begin(wanted | version);
    let rings: Vec<Rings> = (0..queues).map(|q| random_rings(&mut rng, q)).collect();
    for (q, r) in rings.iter().enumerate() {
        d.queue(q as u32, *r, rng.chance(90));
        fill_queue(&d, &mut rng, *r);
    }
    if rng.chance(10) {
        d.notify(rng.below(queues as u64) as usize);
        assert_ne!(
            d.r(reg::STATUS) & status::NEEDS_RESET,
            0,
            "notified before DRIVER_OK"
        );
    }
    d.ready();
    let before = snapshot(&mem);
    for _ in 0..1 + rng.below(3) {
        for q in 0..queues {
            d.notify(q);
        }
    }
    let after = snapshot(&mem);
    let ok = allowed(&before, &rings);
    // Unchanged blocks are skipped whole: a loop over every byte is slow
    // under a fuzzer's instrumentation.
    const BLOCK: usize = 256;
    let stray = (0..MEM as usize)
        .step_by(BLOCK)
        .filter(|&at| before[at..at + BLOCK] != after[at..at + BLOCK])
        .flat_map(|at| at..at + BLOCK)
        .find(|&i| before[i] != after[i] && !ok[i]);
    if let Some(i) = stray {
        panic!("{kind:?}: the device wrote {i:#x}, outside every writable buffer");
    }
    d.w(reg::STATUS, 0);
    assert_eq!(d.r(reg::STATUS), 0, "reset");
    works_after_reset(kind, &d);
}

/// After a reset the device serves a well-formed driver again.
fn works_after_reset(kind: Kind, d: &Driver) {
    let queues = device_queues(kind);
    let s = d.standard(queues, 16);
    assert_eq!(
        s & (status::DRIVER_OK | status::NEEDS_RESET),
        status::DRIVER_OK
    );
    if let Kind::Blk = kind {
        assert_eq!(read_sector(d, 0), Some(0));
    }
    for q in 0..queues {
        d.notify(q);
    }
    assert_eq!(d.r(reg::STATUS) & status::NEEDS_RESET, 0);
}

fn device_queues(kind: Kind) -> usize {
    match kind {
        Kind::Blk => 1,
        Kind::Net => 2,
        Kind::Vsock | Kind::Balloon => 3,
    }
}

/// A 512-byte read of `sector` through standard rings (head 0, entry 0);
/// the status byte, None if the request was not completed.
fn read_sector(d: &Driver, sector: u64) -> Option<u8> {
    let r = Rings::standard(0, 16);
    let mut hdr = [0u8; 16];
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    d.mem.write(0x1000, &hdr).unwrap();
    d.mem.write(0x3000, &[0xee]).unwrap();
    d.desc(r, 0, 0x1000, 16, F_NEXT, 1);
    d.desc(r, 1, 0x2000, 512, F_NEXT | F_WRITE, 2);
    d.desc(r, 2, 0x3000, 1, F_WRITE, 0);
    let used = d.used_idx(r);
    d.publish(r, used, 0);
    d.notify(0);
    if d.used_idx(r) == used {
        return None;
    }
    let mut s = [0u8];
    d.mem.read(0x3000, &mut s).unwrap();
    Some(s[0])
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    /// One proptest per device: 64 random cases of [`run`], each on up to
    /// 4 KiB of bytes (as the fuzz targets' inputs).
    macro_rules! survive_random_queues {
        ($($name:ident: $kind:ident),* $(,)?) => {
            proptest! {
                #![proptest_config(ProptestConfig {
                    cases: 64,
                    failure_persistence: None,
                    ..ProptestConfig::default()
                })]
                $(
                    #[test]
                    fn $name(data in vec(any::<u8>(), 0..4096)) {
                        run(Kind::$kind, &data);
                    }
                )*
            }
        };
    }

    survive_random_queues! {
        blk_survives_random_queues: Blk,
        net_survives_random_queues: Net,
        vsock_survives_random_queues: Vsock,
        balloon_survives_random_queues: Balloon,
    }

    /// A block device with standard rings, ready.
    fn blk() -> (Image, Driver) {
        let image = Image::new();
        let (dev, _) = device(Kind::Blk, &image);
        let d = Driver::new(dev, &memory());
        assert_eq!(d.standard(1, 16) & status::NEEDS_RESET, 0);
        (image, d)
    }

    /// Runs the chain at `head` (entry `at`); the used length and the status
    /// byte at 0x3000.
    fn run_chain(d: &Driver, head: u16) -> (u16, u8) {
        let r = Rings::standard(0, 16);
        d.mem.write(0x3000, &[0xee]).unwrap();
        let at = d.used_idx(r);
        d.publish(r, at, head);
        d.notify(0);
        let mut s = [0u8];
        d.mem.read(0x3000, &mut s).unwrap();
        (d.used_idx(r).wrapping_sub(at), s[0])
    }

    #[test]
    fn malformed_requests_complete_with_an_error() {
        let (_image, d) = blk();
        let r = Rings::standard(0, 16);
        d.mem.write(0x1000, &[0u8; 16]).unwrap();
        // A loop: 0 -> 1 -> 0 (and so a chain longer than the queue).
        d.desc(r, 0, 0x1000, 16, F_NEXT, 1);
        d.desc(r, 1, 0x3000, 1, F_NEXT | F_WRITE, 0);
        assert_eq!(run_chain(&d, 0).0, 1, "a loop completes");
        // A data buffer outside RAM.
        d.desc(r, 0, 0x1000, 16, F_NEXT, 1);
        d.desc(r, 1, 1 << 40, 512, F_NEXT | F_WRITE, 2);
        d.desc(r, 2, 0x3000, 1, F_WRITE, 0);
        assert_eq!(run_chain(&d, 0), (1, 1), "IOERR for a buffer outside RAM");
        // A device-readable buffer after a device-writable one.
        d.desc(r, 0, 0x1000, 16, F_NEXT | F_WRITE, 1);
        d.desc(r, 1, 0x2000, 512, F_NEXT, 2);
        assert_eq!(run_chain(&d, 0), (1, 1), "IOERR for the wrong direction");
        // A status buffer that wraps past the end of the address space:
        // its last byte is not 0x3000, where the addition wraps to.
        d.desc(r, 0, u64::MAX - 0xff, 0x3101, F_WRITE, 0);
        assert_eq!(
            run_chain(&d, 0),
            (1, 0xee),
            "no status for a wrapping buffer"
        );
        // An absurd length.
        d.desc(r, 0, 0x1000, 16, F_NEXT, 1);
        d.desc(r, 1, 0x2000, u32::MAX, F_NEXT | F_WRITE, 2);
        assert_eq!(run_chain(&d, 0), (1, 1), "IOERR for an absurd length");
        // An indirect descriptor (not offered).
        d.desc(r, 1, 0x2000, 512, F_NEXT | F_WRITE | F_INDIRECT, 2);
        assert_eq!(run_chain(&d, 0), (1, 1), "IOERR for an indirect descriptor");
        // The device still works.
        assert_eq!(read_sector(&d, 3), Some(0));
        assert_eq!(d.r(reg::STATUS) & status::NEEDS_RESET, 0);
    }

    #[test]
    fn broken_queues_need_a_reset_and_then_work() {
        let (_image, d) = blk();
        // A head past the queue.
        let r = Rings::standard(0, 16);
        d.publish(r, d.used_idx(r), 40);
        d.notify(0);
        assert_ne!(
            d.r(reg::STATUS) & status::NEEDS_RESET,
            0,
            "head past the queue"
        );
        assert_eq!(
            d.standard(1, 16) & status::NEEDS_RESET,
            0,
            "reset clears it"
        );
        assert_eq!(read_sector(&d, 0), Some(0));
        // A queue size that is not a power of two.
        d.begin(features::VERSION_1);
        d.queue(0, Rings::standard(0, 3), true);
        assert_ne!(d.ready() & status::NEEDS_RESET, 0, "size 3");
        // A notification before DRIVER_OK.
        d.begin(features::VERSION_1);
        d.queue(0, Rings::standard(0, 16), true);
        d.notify(0);
        assert_ne!(d.r(reg::STATUS) & status::NEEDS_RESET, 0, "notified early");
        // Rings outside RAM.
        d.begin(features::VERSION_1);
        let mut far = Rings::standard(0, 16);
        far.used = MEM;
        d.queue(0, far, true);
        assert_ne!(d.ready() & status::NEEDS_RESET, 0, "used ring outside RAM");
        // Without VERSION_1 FEATURES_OK does not stick.
        assert!(!d.begin(0));
        assert_eq!(d.standard(1, 16) & status::NEEDS_RESET, 0);
        assert_eq!(read_sector(&d, 1), Some(0));
    }
}
