//! The pin-test device: the analogue of Linux's `gup_test` module.
//!
//! A guest asks it (through hypercalls) to pin a range of its memory, and
//! to move data through such a pin, exactly as a DMA-capable device would,
//! with the same pin API that virtio devices use. It exists so that guest
//! programs can test the anon-exclusive protocol end to end.
//!
//! Handles are small integers that are never reused within a VM, so a
//! stale handle never names another pin. Pins belong to the device instance
//! that took them: a forked VM's pin-test device starts with none.

use std::collections::BTreeMap;

use memory::{MemError, Pin, PinError, PinFlags, VmMemory};
use thiserror::Error;

/// Pins one VM may hold at once.
pub const MAX_PINS: usize = 4096;
/// Flag bit: the device will write through the pin.
pub const FLAG_WRITE: u64 = 1;
/// Flag bit: a long-term pin.
pub const FLAG_LONGTERM: u64 = 2;

/// Bytes moved per step of PIN_READ / PIN_WRITE.
const CHUNK: u64 = 64 << 10;

/// What a request to the device can get wrong.
#[derive(Debug, Error)]
pub enum PinTestError {
    /// No pin has this handle.
    #[error("no pin with handle {0}")]
    BadHandle(u64),
    /// Unknown flag bits, or an empty range.
    #[error("invalid pin request")]
    Invalid,
    /// Too many pins held.
    #[error("at most {MAX_PINS} pins may be held")]
    TooMany,
    /// Writing through a read-only pin.
    #[error("the pin is read-only")]
    ReadOnly,
    /// Guest memory refused the request (a range outside RAM, ...).
    #[error("guest memory")]
    Memory(#[from] MemError),
    /// A device access outside the pin (a bug in this device).
    #[error("pin access")]
    Pin(#[from] PinError),
}

/// The device state of one VM.
#[derive(Debug, Default)]
pub struct PinTest {
    pins: BTreeMap<u64, Pin>,
    next: u64,
}

impl PinTest {
    /// A device holding no pins.
    pub fn new() -> Self {
        Self::default()
    }

    /// Pins held.
    pub fn len(&self) -> usize {
        self.pins.len()
    }

    /// Whether no pin is held.
    pub fn is_empty(&self) -> bool {
        self.pins.is_empty()
    }

    /// PIN: pins `[addr, addr + len)`; returns the handle.
    pub fn pin(
        &mut self,
        mem: &VmMemory,
        addr: u64,
        len: u64,
        flags: u64,
    ) -> Result<u64, PinTestError> {
        if flags & !(FLAG_WRITE | FLAG_LONGTERM) != 0 || len == 0 {
            return Err(PinTestError::Invalid);
        }
        if self.pins.len() >= MAX_PINS {
            return Err(PinTestError::TooMany);
        }
        let pin = mem.pin(
            addr,
            len,
            PinFlags {
                write: flags & FLAG_WRITE != 0,
                longterm: flags & FLAG_LONGTERM != 0,
            },
        )?;
        let handle = self.next;
        self.next += 1;
        self.pins.insert(handle, pin);
        Ok(handle)
    }

    fn get(&self, handle: u64) -> Result<&Pin, PinTestError> {
        self.pins
            .get(&handle)
            .ok_or(PinTestError::BadHandle(handle))
    }

    /// PIN_READ: copies what the device sees through pin `handle` into
    /// `[dst, dst + len)`, writing `dst` the way a device writes guest
    /// memory: through a short-term write pin of its own. Returns the bytes
    /// moved.
    pub fn read(&self, mem: &VmMemory, handle: u64, dst: u64) -> Result<u64, PinTestError> {
        let pin = self.get(handle)?;
        let out = mem.pin(
            dst,
            pin.len(),
            PinFlags {
                write: true,
                longterm: false,
            },
        )?;
        copy(pin, &out)
    }

    /// PIN_WRITE: copies `[src, src + len)` (read through a short-term read
    /// pin) into the range pinned by `handle`. Returns the bytes moved.
    pub fn write(&self, mem: &VmMemory, handle: u64, src: u64) -> Result<u64, PinTestError> {
        let pin = self.get(handle)?;
        if !pin.flags().write {
            return Err(PinTestError::ReadOnly);
        }
        let input = mem.pin(src, pin.len(), PinFlags::default())?;
        copy(&input, pin)
    }

    /// UNPIN: drops pin `handle`.
    pub fn unpin(&mut self, handle: u64) -> Result<(), PinTestError> {
        self.pins
            .remove(&handle)
            .map(drop)
            .ok_or(PinTestError::BadHandle(handle))
    }
}

/// Moves `from`'s bytes into `to` (of the same length) as a device would,
/// through a bounce buffer; returns the bytes moved.
fn copy(from: &Pin, to: &Pin) -> Result<u64, PinTestError> {
    let mut buf = vec![0u8; from.len().min(CHUNK) as usize];
    let mut done = 0;
    while done < from.len() {
        let n = (from.len() - done).min(CHUNK) as usize;
        from.read(done, &mut buf[..n])?;
        to.write(done, &buf[..n])?;
        done += n as u64;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use memory::{Config, Context, Layout};

    #[test]
    fn pin_move_unpin() {
        let ctx = Context::new(Config::default());
        let mem = VmMemory::new(&ctx, Layout::new(&[(0, 4 << 20)]).unwrap()).unwrap();
        mem.write(0x1000, &[7; 100]).unwrap();
        let mut dev = PinTest::new();
        let h = dev.pin(&mem, 0x1000, 100, FLAG_WRITE).unwrap();
        assert_eq!(dev.read(&mem, h, 0x8000).unwrap(), 100);
        let mut b = [0u8; 100];
        mem.read(0x8000, &mut b).unwrap();
        assert_eq!(b, [7; 100]);
        mem.write(0x9000, &[3; 100]).unwrap();
        assert_eq!(dev.write(&mem, h, 0x9000).unwrap(), 100);
        mem.read(0x1000, &mut b).unwrap();
        assert_eq!(b, [3; 100]);
        dev.unpin(h).unwrap();
        assert!(matches!(dev.unpin(h), Err(PinTestError::BadHandle(_))));
        let h2 = dev.pin(&mem, 0x1000, 1, 0).unwrap();
        assert_ne!(h, h2, "handle reused");
        assert!(matches!(
            dev.write(&mem, h2, 0x9000),
            Err(PinTestError::ReadOnly)
        ));
        assert!(matches!(dev.pin(&mem, 0, 1, 4), Err(PinTestError::Invalid)));
        assert!(matches!(dev.pin(&mem, 0, 0, 0), Err(PinTestError::Invalid)));
        assert!(matches!(
            dev.pin(&mem, 4 << 20, 1, 0),
            Err(PinTestError::Memory(_))
        ));
        assert!(matches!(
            dev.read(&mem, h2, 4 << 20),
            Err(PinTestError::Memory(_))
        ));
    }
}
