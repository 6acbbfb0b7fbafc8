//! The pinned buffers of one request.
//!
//! Each descriptor of a chain is pinned when the request is taken: a
//! device-readable one with a read pin (which unshares a page shared
//! copy-on-write with another VM, R9), a device-writable one with a write
//! pin (which breaks copy-on-write for this VM only). Requests served at
//! once pin short-term; requests that wait (a block request in the thread
//! pool, a posted receive buffer) pin long-term. A device may keep pins of
//! the pages its requests' buffers lie in across requests and let the
//! requests share them ([`PinCache`]). Dropping the [`Buffers`] unpins (or lets
//! go of its share). Nothing outside the bytes the descriptors name is
//! reachable through it, so a device can never write outside the buffers
//! the driver named.

use std::sync::Arc;

use memory::{PAGE_SIZE, Pin, PinFlags, VmMemory};
use vm_memory::VolatileSlice;

use super::queue::{Desc, QueueError};

/// A request's buffers as host slices, for zero-copy I/O: a few slices
/// need no allocation.
pub type HostSlices<'a> = smallvec::SmallVec<[VolatileSlice<'a>; 4]>;

/// Sets of a [`PinCache`], each of [`WAYS`] pages: a device's cache
/// holds 128 pages (512 KiB of guest memory) pinned at most.
const SETS: usize = 64;
const WAYS: usize = 2;

/// Pins of whole pages kept across requests, so that a driver that reuses
/// its buffers (request headers, status bytes, data pages: most do) pays
/// for pinning a page once rather than on every request, as io_uring's
/// registered buffers do. Each request still reaches only the bytes its
/// descriptors name (see [`Buffers`]); a page stays pinned while the
/// cache or a request holds its pin.
///
/// A cached pin is used only while the VM's
/// [`VmMemory::discard_generation`] reads as when it was taken: a discard
/// is the one change that makes a pinned page map another frame, so a
/// request made after the guest discarded a buffer page never reaches the
/// old frame. The cache pins only pages the device was given, holds
/// `SETS * WAYS` of them at most (set-associative by page number: a new
/// page takes the place of an older one of its set), and is emptied by
/// [`PinCache::clear`], which a device calls at its reset and before a
/// fork or a snapshot, so that neither copies pages only the cache holds.
#[derive(Debug)]
pub struct PinCache {
    sets: Box<[Set]>,
    /// The VM whose pages the cache holds ([`VmMemory::id`]).
    vm: u64,
    /// Its discard generation when the pins were taken.
    generation: u64,
    /// Whether pins are kept (not under a resident limit).
    keep: bool,
}

#[derive(Debug, Default)]
struct Set {
    ways: [Option<Cached>; WAYS],
    /// The way a new page takes when both are full.
    victim: usize,
}

#[derive(Debug)]
struct Cached {
    page: u64,
    write: bool,
    pin: Arc<Pin>,
}

impl Default for PinCache {
    fn default() -> Self {
        Self {
            sets: (0..SETS).map(|_| Set::default()).collect(),
            vm: u64::MAX,
            generation: 0,
            keep: true,
        }
    }
}

impl PinCache {
    /// Drops the cache's pins (requests still holding one keep it).
    pub fn clear(&mut self) {
        for set in self.sets.iter_mut() {
            set.ways = Default::default();
        }
    }

    /// Pages the cache holds pinned.
    pub fn len(&self) -> usize {
        self.sets
            .iter()
            .flat_map(|s| s.ways.iter().flatten())
            .count()
    }

    /// Whether the cache holds no pin.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Empties the cache unless its pins are of `mem` and still good (see
    /// the type's documentation), or if `mem` has a resident limit: pinned
    /// pages stay resident, and a device that is idle should not hold a
    /// VM above its limit. Called before taking pins from it.
    fn validate(&mut self, mem: &VmMemory) {
        let generation = mem.discard_generation();
        self.keep = mem.resident_limit().is_none();
        if self.vm != mem.id() || self.generation != generation || !self.keep {
            self.clear();
            self.vm = mem.id();
            self.generation = generation;
        }
    }

    /// A pin of the page at `page` (a page-aligned address), shared, and
    /// long-term since the cache may keep it. A read may use a write pin
    /// of the page; a write needs one.
    fn get(&mut self, mem: &VmMemory, page: u64, write: bool) -> Result<Arc<Pin>, QueueError> {
        match self.hit(page, write) {
            Some(pin) => Ok(pin),
            None => self.fill(mem, page, write),
        }
    }

    /// The cached pin of `page`, if it serves a `write` (or a read).
    #[inline]
    fn hit(&self, page: u64, write: bool) -> Option<Arc<Pin>> {
        self.sets[Self::set_of(page)]
            .ways
            .iter()
            .flatten()
            .find(|c| c.page == page && (c.write || !write))
            .map(|c| c.pin.clone())
    }

    fn set_of(page: u64) -> usize {
        (page / PAGE_SIZE) as usize % SETS
    }

    /// Pins `page` into the cache, in place of its read pin if a write is
    /// wanted, else of an empty way or of the set's victim.
    #[cold]
    fn fill(&mut self, mem: &VmMemory, page: u64, write: bool) -> Result<Arc<Pin>, QueueError> {
        let set = &mut self.sets[Self::set_of(page)];
        let mut way = None;
        for (i, c) in set.ways.iter().enumerate() {
            match c {
                Some(c) if c.page == page => way = Some(i),
                None => way = way.or(Some(i)),
                Some(_) => {}
            }
        }
        let way = way.unwrap_or_else(|| {
            set.victim = (set.victim + 1) % WAYS;
            set.victim
        });
        // The old pin goes first: it may be this page's read pin.
        set.ways[way] = None;
        let flags = PinFlags {
            write,
            longterm: true,
        };
        let pin = Arc::new(
            mem.pin(page, PAGE_SIZE, flags)
                .map_err(QueueError::Buffer)?,
        );
        if !self.keep {
            // The buffer's alone: dropped with its request.
            return Ok(pin);
        }
        set.ways[way] = Some(Cached {
            page,
            write,
            pin: pin.clone(),
        });
        Ok(pin)
    }
}

/// Where one buffer lies in its pin: `len` bytes at `off`, packed into
/// one word (`off` is below a page, `len` a descriptor's 32-bit length).
#[derive(Clone, Copy, Debug)]
struct Span(u64);

impl Span {
    fn new(off: u64, len: u32) -> Self {
        debug_assert!(off < PAGE_SIZE);
        Self((off << 32) | u64::from(len))
    }

    fn off(self) -> u64 {
        self.0 >> 32
    }

    fn len(self) -> u64 {
        self.0 & u64::from(u32::MAX)
    }
}

/// Some of a request's buffers: their pins and where they lie in them.
type Pieces<'a> = (&'a [Arc<Pin>], &'a [Span]);

/// The pinned buffers of one request: the device-readable ones, then the
/// device-writable ones, each a pin of its own or a part of a page pin the
/// device keeps and shares between requests ([`PinCache`]).
#[derive(Debug, Default)]
pub struct Buffers {
    /// One per buffer, the readable ones first: a pin of its own or a
    /// cached pin of the page that holds it (a block request's three fit
    /// without an allocation).
    pins: smallvec::SmallVec<[Arc<Pin>; 3]>,
    /// Where each buffer lies in its pin. (Two arrays of plain words: a
    /// buffer is added with no struct put together in memory first.)
    spans: smallvec::SmallVec<[Span; 3]>,
    /// Where the writable buffers start.
    split: usize,
    rlen: u64,
    wlen: u64,
}

impl Buffers {
    /// Pins the buffers of `chain`; `limit` caps the total length.
    pub fn pin(
        mem: &VmMemory,
        chain: &[Desc],
        longterm: bool,
        limit: u64,
    ) -> Result<Self, QueueError> {
        Self::pin_with(mem, chain, longterm, limit, None)
    }

    /// [`Buffers::pin`], with the buffers that lie in one page pinned
    /// through `cache`.
    pub fn pin_with(
        mem: &VmMemory,
        chain: &[Desc],
        longterm: bool,
        limit: u64,
        mut cache: Option<&mut PinCache>,
    ) -> Result<Self, QueueError> {
        let total: u64 = chain.iter().map(|d| u64::from(d.len)).sum();
        if total > limit {
            return Err(QueueError::TooLarge(total));
        }
        let mut b = Buffers::default();
        if let Some(c) = cache.as_deref_mut() {
            c.validate(mem);
        }
        for d in chain {
            if d.indirect {
                return Err(QueueError::Indirect);
            }
            let writable_seen = b.split < b.pins.len();
            if !d.write && writable_seen {
                return Err(QueueError::WrongOrder);
            }
            if d.len == 0 {
                continue;
            }
            let flags = PinFlags {
                write: d.write,
                longterm,
            };
            let len = u64::from(d.len);
            let page = d.addr - d.addr % PAGE_SIZE;
            let in_one_page = d.addr % PAGE_SIZE + len <= PAGE_SIZE;
            let (pin, off) = match cache.as_deref_mut() {
                Some(c) if in_one_page => (c.get(mem, page, d.write)?, d.addr - page),
                _ => (
                    Arc::new(mem.pin(d.addr, len, flags).map_err(QueueError::Buffer)?),
                    0,
                ),
            };
            b.pins.push(pin);
            b.spans.push(Span::new(off, d.len));
            if d.write {
                b.wlen += len;
            } else {
                b.rlen += len;
                b.split = b.pins.len();
            }
        }
        Ok(b)
    }

    fn readable(&self) -> Pieces<'_> {
        (&self.pins[..self.split], &self.spans[..self.split])
    }

    fn writable(&self) -> Pieces<'_> {
        (&self.pins[self.split..], &self.spans[self.split..])
    }

    /// Device-readable bytes.
    pub fn readable_len(&self) -> u64 {
        self.rlen
    }

    /// Device-writable bytes.
    pub fn writable_len(&self) -> u64 {
        self.wlen
    }

    /// Calls `f(pin, offset in pin, length, bytes done)` for each part of
    /// `[off, off + len)` of the concatenated buffers `pieces`.
    fn parts<'p>(
        (pins, spans): Pieces<'p>,
        mut off: u64,
        mut len: u64,
        mut f: impl FnMut(&'p Pin, u64, u64, u64),
    ) {
        let mut done = 0;
        for (pin, span) in pins.iter().zip(spans) {
            if len == 0 {
                break;
            }
            if off >= span.len() {
                off -= span.len();
                continue;
            }
            let n = (span.len() - off).min(len);
            f(pin, span.off() + off, n, done);
            done += n;
            len -= n;
            off = 0;
        }
    }

    fn check(off: u64, len: u64, have: u64) -> Result<(), QueueError> {
        match off.checked_add(len) {
            Some(end) if end <= have => Ok(()),
            _ => Err(QueueError::Bounds),
        }
    }

    /// Reads device-readable bytes at `off`.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), QueueError> {
        Self::check(off, buf.len() as u64, self.rlen)?;
        let mut r = Ok(());
        Self::parts(self.readable(), off, buf.len() as u64, |p, at, n, done| {
            let dst = &mut buf[done as usize..(done + n) as usize];
            if p.read(at, dst).is_err() {
                r = Err(QueueError::Bounds);
            }
        });
        r
    }

    /// Writes device-writable bytes at `off`.
    pub fn write(&self, off: u64, data: &[u8]) -> Result<(), QueueError> {
        Self::check(off, data.len() as u64, self.wlen)?;
        let mut r = Ok(());
        Self::parts(self.writable(), off, data.len() as u64, |p, at, n, done| {
            if p.write(at, &data[done as usize..(done + n) as usize])
                .is_err()
            {
                r = Err(QueueError::Bounds);
            }
        });
        r
    }

    fn slices_of(pieces: Pieces<'_>, off: u64, len: u64) -> HostSlices<'_> {
        let mut out = HostSlices::new();
        Self::parts(pieces, off, len, |p, at, n, _| {
            let (mut skip, mut want) = (at, n);
            for s in p.slices() {
                if want == 0 {
                    break;
                }
                let sl = s.len() as u64;
                if skip >= sl {
                    skip -= sl;
                    continue;
                }
                let take = (sl - skip).min(want);
                if let Ok(sub) = s.subslice(skip as usize, take as usize) {
                    out.push(sub);
                }
                want -= take;
                skip = 0;
            }
        });
        out
    }

    /// The device-readable bytes `[off, off + len)` as host slices (for
    /// `writev`-style I/O).
    pub fn readable_slices(&self, off: u64, len: u64) -> Result<HostSlices<'_>, QueueError> {
        Self::check(off, len, self.rlen)?;
        Ok(Self::slices_of(self.readable(), off, len))
    }

    /// The device-writable bytes `[off, off + len)` as host slices (for
    /// `readv`-style I/O); only write pins are behind them.
    pub fn writable_slices(&self, off: u64, len: u64) -> Result<HostSlices<'_>, QueueError> {
        Self::check(off, len, self.wlen)?;
        Ok(Self::slices_of(self.writable(), off, len))
    }
}

/// `slices` as an iovec array for `readv`/`writev`/`preadv`/`pwritev`.
/// The iovecs point into the slices: use them while the slices (and so the
/// pins behind them) live.
pub fn iovecs(slices: &[VolatileSlice<'_>]) -> Vec<libc::iovec> {
    iovecs_of(slices).collect()
}

/// [`iovecs`], one at a time (for callers that keep them on the stack).
pub fn iovecs_of<'a>(slices: &'a [VolatileSlice<'_>]) -> impl Iterator<Item = libc::iovec> + 'a {
    slices.iter().map(|s| libc::iovec {
        iov_base: s.ptr_guard_mut().as_ptr().cast(),
        iov_len: s.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testutil::memory;

    fn desc(addr: u64, len: u32, write: bool) -> Desc {
        Desc {
            addr,
            len,
            write,
            indirect: false,
        }
    }

    #[test]
    fn cached_page_pins_serve_later_requests_until_a_discard() {
        let mem = memory();
        let mut cache = PinCache::default();
        let chain = [
            desc(0x2000, 16, false),
            desc(0x3000, 4096, true),
            desc(0x2010, 1, true),
        ];
        let pin = |cache: &mut PinCache| {
            Buffers::pin_with(&mem, &chain, true, 1 << 20, Some(cache)).unwrap()
        };
        for _ in 0..3 {
            drop(pin(&mut cache));
        }
        assert_eq!(cache.len(), 2, "the header/status page and the data page");
        assert_eq!(mem.context().stats().pins, 2, "kept by the cache");
        // The guest drops the data page: the next request reaches the
        // page's new frame, not the one the cache held.
        mem.discard(0x3000, 4096).unwrap();
        let b = pin(&mut cache);
        b.write(0, &[0xab]).unwrap();
        let mut got = [0u8];
        mem.read(0x3000, &mut got).unwrap();
        assert_eq!(got, [0xab], "the guest sees the device's write");
        drop(b);
        cache.clear();
        assert_eq!(mem.context().stats().pins, 0, "cleared");
    }

    #[test]
    fn under_a_resident_limit_no_pin_outlives_its_request() {
        let mem = memory();
        let mut cache = PinCache::default();
        let chain = [desc(0x2000, 16, false), desc(0x3000, 4096, true)];
        drop(Buffers::pin_with(&mem, &chain, true, 1 << 20, Some(&mut cache)).unwrap());
        assert_eq!(mem.context().stats().pins, 2, "kept without a limit");
        mem.set_resident_limit(Some(16));
        let b = Buffers::pin_with(&mem, &chain, true, 1 << 20, Some(&mut cache)).unwrap();
        assert!(cache.is_empty(), "the kept pins were dropped");
        assert_eq!(mem.context().stats().pins, 2, "the request's own");
        drop(b);
        assert_eq!(mem.context().stats().pins, 0, "none outlives the request");
    }

    #[test]
    fn a_full_set_gives_way_and_another_vm_empties_the_cache() {
        let ctx = memory::Context::new(memory::Config::default());
        let layout = memory::Layout::new(&[(0, 4 << 20)]).unwrap();
        let mem = VmMemory::new(&ctx, layout).unwrap();
        let mut cache = PinCache::default();
        // Three pages of one set: the third takes an older one's place.
        let stride = (SETS as u64) * PAGE_SIZE;
        for i in 0..3 {
            let chain = [desc(0x1000 + i * stride, 64, true)];
            drop(Buffers::pin_with(&mem, &chain, true, 1 << 20, Some(&mut cache)).unwrap());
        }
        assert_eq!(cache.len(), WAYS);
        assert_eq!(mem.context().stats().pins, WAYS as u64);
        let other = memory();
        let chain = [desc(0x1000, 64, true)];
        drop(Buffers::pin_with(&other, &chain, true, 1 << 20, Some(&mut cache)).unwrap());
        assert_eq!(cache.len(), 1, "only the other VM's page");
        assert_eq!(
            mem.context().stats().pins,
            0,
            "the first VM's pins are gone"
        );
    }

    #[test]
    fn requests_sharing_page_pins_reach_only_their_own_bytes() {
        let mem = memory();
        let mut cache = PinCache::default();
        let mut pin = |status| {
            let chain = [desc(0x1000, 16, false), desc(status, 1, true)];
            Buffers::pin_with(&mem, &chain, true, 1 << 20, Some(&mut cache)).unwrap()
        };
        let (a, b) = (pin(0x1010), pin(0x1011));
        assert_eq!(mem.context().stats().pins, 2, "one read and one write pin");
        a.write(0, &[7]).unwrap();
        b.write(0, &[9]).unwrap();
        assert!(a.write(1, &[1]).is_err(), "past a's status byte");
        assert!(a.read(16, &mut [0]).is_err(), "past a's header");
        let mut got = [0u8; 3];
        mem.read(0x1010, &mut got).unwrap();
        assert_eq!(got, [7, 9, 0]);
        cache.clear();
        drop(a);
        assert_eq!(
            mem.context().stats().pins,
            1,
            "b still holds the page's write pin (its header shares it)"
        );
        drop(b);
        assert_eq!(mem.context().stats().pins, 0);
    }
}
