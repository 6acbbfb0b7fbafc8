//! The pinned buffers of one request.
//!
//! Each descriptor of a chain is pinned on its own when the request is
//! taken: a device-readable one with a read pin (which unshares a page
//! shared copy-on-write with another VM, R9), a device-writable one with a
//! write pin (which breaks copy-on-write for this VM only). Requests served
//! at once pin short-term; requests that wait (a block request in the
//! thread pool, a posted receive buffer) pin long-term. Dropping the
//! [`Buffers`] unpins. Nothing outside the pins is reachable through it, so
//! a device can never write outside the buffers the driver named.

use memory::{Pin, PinFlags, VmMemory};
use vm_memory::VolatileSlice;

use super::queue::{Desc, QueueError};

/// The pinned buffers of one request: the device-readable ones, then the
/// device-writable ones, each a pin.
#[derive(Debug, Default)]
pub struct Buffers {
    readable: Vec<Pin>,
    writable: Vec<Pin>,
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
        let total: u64 = chain.iter().map(|d| u64::from(d.len)).sum();
        if total > limit {
            return Err(QueueError::TooLarge(total));
        }
        let mut b = Buffers::default();
        for d in chain {
            if d.indirect {
                return Err(QueueError::Indirect);
            }
            if !d.write && !b.writable.is_empty() {
                return Err(QueueError::WrongOrder);
            }
            if d.len == 0 {
                continue;
            }
            let flags = PinFlags {
                write: d.write,
                longterm,
            };
            let pin = mem
                .pin(d.addr, u64::from(d.len), flags)
                .map_err(QueueError::Buffer)?;
            if d.write {
                b.wlen += pin.len();
                b.writable.push(pin);
            } else {
                b.rlen += pin.len();
                b.readable.push(pin);
            }
        }
        Ok(b)
    }

    /// Device-readable bytes.
    pub fn readable_len(&self) -> u64 {
        self.rlen
    }

    /// Device-writable bytes.
    pub fn writable_len(&self) -> u64 {
        self.wlen
    }

    /// Calls `f(pin, offset in pin, length, bytes done)` for each piece of
    /// `[off, off + len)` of the concatenated `pins`.
    fn pieces<'p>(
        pins: &'p [Pin],
        mut off: u64,
        mut len: u64,
        mut f: impl FnMut(&'p Pin, u64, u64, u64),
    ) {
        let mut done = 0;
        for p in pins {
            if len == 0 {
                break;
            }
            if off >= p.len() {
                off -= p.len();
                continue;
            }
            let n = (p.len() - off).min(len);
            f(p, off, n, done);
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
        Self::pieces(&self.readable, off, buf.len() as u64, |p, at, n, done| {
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
        Self::pieces(&self.writable, off, data.len() as u64, |p, at, n, done| {
            if p.write(at, &data[done as usize..(done + n) as usize])
                .is_err()
            {
                r = Err(QueueError::Bounds);
            }
        });
        r
    }

    fn slices_of(pins: &[Pin], off: u64, len: u64) -> Vec<VolatileSlice<'_>> {
        let mut out = Vec::new();
        Self::pieces(pins, off, len, |p, at, n, _| {
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
    pub fn readable_slices(
        &self,
        off: u64,
        len: u64,
    ) -> Result<Vec<VolatileSlice<'_>>, QueueError> {
        Self::check(off, len, self.rlen)?;
        Ok(Self::slices_of(&self.readable, off, len))
    }

    /// The device-writable bytes `[off, off + len)` as host slices (for
    /// `readv`-style I/O); only write pins are behind them.
    pub fn writable_slices(
        &self,
        off: u64,
        len: u64,
    ) -> Result<Vec<VolatileSlice<'_>>, QueueError> {
        Self::check(off, len, self.wlen)?;
        Ok(Self::slices_of(&self.writable, off, len))
    }
}

/// `slices` as an iovec array for `readv`/`writev`/`preadv`/`pwritev`.
/// The iovecs point into the slices: use them while the slices (and so the
/// pins behind them) live.
pub fn iovecs(slices: &[VolatileSlice<'_>]) -> Vec<libc::iovec> {
    slices
        .iter()
        .map(|s| libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect()
}
