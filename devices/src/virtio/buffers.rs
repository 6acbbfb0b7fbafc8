//! The pinned buffers of one request.
//!
//! Each descriptor of a chain is pinned when the request is taken: a
//! device-readable one with a read pin (which unshares a page shared
//! copy-on-write with another VM, R9), a device-writable one with a write
//! pin (which breaks copy-on-write for this VM only). Requests served at
//! once pin short-term; requests that wait (a block request in the thread
//! pool, a posted receive buffer) pin long-term. A device that takes a
//! batch of requests may let their small buffers share pins of the pages
//! that hold them ([`PinCache`]). Dropping the [`Buffers`] unpins (or lets
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

/// Descriptors at most this long that lie in one page may share a pin of
/// that page with the other requests of a batch ([`PinCache`]): request
/// headers and status bytes, which drivers keep side by side.
const SHARED_MAX: u32 = 512;

/// Pins of whole pages that the requests of one batch share, so that a
/// batch of requests whose small buffers lie in a few pages takes a few
/// pins for them rather than one per buffer. Each request still reaches
/// only the bytes its descriptors name (see [`Buffers`]); a page stays
/// pinned while the cache or a request holds its pin.
#[derive(Debug, Default)]
pub struct PinCache {
    pages: Vec<(u64, bool, Arc<Pin>)>,
}

impl PinCache {
    /// Forgets the pins (requests still holding one keep it).
    pub fn clear(&mut self) {
        self.pages.clear();
    }

    /// A pin of the page at `page` (a page-aligned address), shared.
    /// A read may use a write pin of the page; a write needs one.
    fn get(&mut self, mem: &VmMemory, page: u64, flags: PinFlags) -> Result<Arc<Pin>, QueueError> {
        let found = self
            .pages
            .iter()
            .find(|(p, write, _)| *p == page && (*write || !flags.write));
        if let Some((_, _, pin)) = found {
            return Ok(pin.clone());
        }
        let pin = Arc::new(
            mem.pin(page, PAGE_SIZE, flags)
                .map_err(QueueError::Buffer)?,
        );
        self.pages.push((page, flags.write, pin.clone()));
        Ok(pin)
    }
}

/// A pin of a buffer, or of the page that holds it.
#[derive(Debug)]
enum Held {
    Own(Pin),
    Shared(Arc<Pin>),
}

/// One buffer: `len` bytes at `off` in a pin.
#[derive(Debug)]
struct Piece {
    pin: Held,
    off: u64,
    len: u64,
}

impl Piece {
    fn pin(&self) -> &Pin {
        match &self.pin {
            Held::Own(p) => p,
            Held::Shared(p) => p,
        }
    }
}

/// The pinned buffers of one request: the device-readable ones, then the
/// device-writable ones, each a pin (or a part of a page pin shared with
/// the other requests of a batch).
#[derive(Debug, Default)]
pub struct Buffers {
    /// The readable pieces, then the writable ones (a block request's
    /// three fit without an allocation).
    pieces: smallvec::SmallVec<[Piece; 3]>,
    /// Where the writable pieces start.
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

    /// [`Buffers::pin`], with small buffers pinned through `cache`.
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
        let mut b = Buffers {
            pieces: smallvec::SmallVec::with_capacity(chain.len()),
            ..Buffers::default()
        };
        for d in chain {
            if d.indirect {
                return Err(QueueError::Indirect);
            }
            let writable_seen = b.split < b.pieces.len();
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
            let piece = match cache.as_deref_mut() {
                Some(c) if d.len <= SHARED_MAX && in_one_page => Piece {
                    pin: Held::Shared(c.get(mem, page, flags)?),
                    off: d.addr - page,
                    len,
                },
                _ => Piece {
                    pin: Held::Own(mem.pin(d.addr, len, flags).map_err(QueueError::Buffer)?),
                    off: 0,
                    len,
                },
            };
            b.pieces.push(piece);
            if d.write {
                b.wlen += len;
            } else {
                b.rlen += len;
                b.split = b.pieces.len();
            }
        }
        Ok(b)
    }

    fn readable(&self) -> &[Piece] {
        &self.pieces[..self.split]
    }

    fn writable(&self) -> &[Piece] {
        &self.pieces[self.split..]
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
    /// `[off, off + len)` of the concatenated `pieces`.
    fn parts<'p>(
        pieces: &'p [Piece],
        mut off: u64,
        mut len: u64,
        mut f: impl FnMut(&'p Pin, u64, u64, u64),
    ) {
        let mut done = 0;
        for p in pieces {
            if len == 0 {
                break;
            }
            if off >= p.len {
                off -= p.len;
                continue;
            }
            let n = (p.len - off).min(len);
            f(p.pin(), p.off + off, n, done);
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

    fn slices_of(pieces: &[Piece], off: u64, len: u64) -> HostSlices<'_> {
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
        assert_eq!(mem.context().stats().pins, 2, "b still holds the pages");
        drop(b);
        assert_eq!(mem.context().stats().pins, 0);
    }
}
