//! Serving hypercalls. Arguments come from a guest that may be hostile:
//! every address and length is checked against guest RAM, and nothing a
//! guest passes can make the VMM panic or read or write outside the VM.

use std::sync::PoisonError;

use devices::pin_test::{PinTest, PinTestError};
use memory::{Collapse, CollapseRefusal, MemError, PAGE_SIZE, VmMemory};

use crate::abi::{Hypercall, errno};
use crate::vm::{Exit, Mode, VmShared};
use crate::x86::program::LOW_END;

/// Console output is copied out of guest memory in pieces of this size.
const WRITE_CHUNK: u64 = 64 << 10;

/// Serves hypercall `nr`: the value for RAX, or how the VM ends.
pub(crate) fn dispatch(shared: &VmShared, nr: u64, args: [u64; 3]) -> Result<i64, Exit> {
    let Some(call) = Hypercall::from_nr(nr) else {
        return Ok(-errno::ENOSYS);
    };
    let [a, b, c] = args;
    Ok(match call {
        Hypercall::Exit => return Err(Exit::Code(a)),
        Hypercall::Write => write(shared, a, b),
        Hypercall::VcpuStart => crate::vcpu::start_vcpu(shared, a, b, c),
        Hypercall::Discard => discard(shared, a, b),
        Hypercall::Pin => pin_test(shared, |dev, mem| dev.pin(mem, a, b, c).map(|h| h as i64)),
        Hypercall::PinRead => pin_test(shared, |dev, mem| dev.read(mem, a, b).map(|n| n as i64)),
        Hypercall::PinWrite => pin_test(shared, |dev, mem| dev.write(mem, a, b).map(|n| n as i64)),
        Hypercall::Unpin => pin_test(shared, |dev, _| dev.unpin(a).map(|()| 0)),
        Hypercall::Stats => stats(shared, a, b),
        Hypercall::SwapOut => swap_out(shared, a, b),
        Hypercall::Migrate => migrate(shared, a, b),
        Hypercall::Wp => write_protect(shared, a, b, c),
        Hypercall::WpEvents => wp_events(shared, a, b),
        Hypercall::Collapse => collapse(shared, a),
        Hypercall::CoverageMap if shared.mode == Mode::Program => {
            crate::x86::program::COVERAGE_MAP as i64
        }
        _ => -errno::EOPNOTSUPP,
    })
}

/// PIN, PIN_READ, PIN_WRITE, UNPIN: served by the VM's pin-test device.
fn pin_test(
    shared: &VmShared,
    f: impl FnOnce(&mut PinTest, &VmMemory) -> Result<i64, PinTestError>,
) -> i64 {
    let mut dev = shared.pins.lock().unwrap_or_else(PoisonError::into_inner);
    match f(&mut dev, &shared.mem) {
        Ok(v) => v,
        Err(e) => {
            log::debug!("pin-test device: {}", crate::vcpu::chain(&e));
            -match e {
                PinTestError::BadHandle(_) => errno::EBADF,
                PinTestError::Invalid => errno::EINVAL,
                PinTestError::TooMany => errno::ENOMEM,
                PinTestError::ReadOnly => errno::EACCES,
                PinTestError::Memory(MemError::NotRam { .. }) => errno::EFAULT,
                PinTestError::Memory(_) | PinTestError::Pin(_) => errno::EIO,
            }
        }
    }
}

/// WRITE(ptr, len): prints guest memory; returns `len`.
fn write(shared: &VmShared, ptr: u64, len: u64) -> i64 {
    if !shared.mem.layout().contains(ptr, len) {
        return -errno::EFAULT;
    }
    let mut buf = vec![0u8; len.min(WRITE_CHUNK) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(WRITE_CHUNK) as usize;
        if shared.mem.read(ptr + done, &mut buf[..n]).is_err() {
            return -errno::EFAULT;
        }
        shared.console.write(&buf[..n]);
        done += n as u64;
    }
    len as i64
}

/// Checks the page range of DISCARD, WP, SWAP_OUT and MIGRATE: `addr`
/// page-aligned, the range (rounded up to whole pages) in RAM and clear of
/// the VMM's own first MiB in program mode. Returns the rounded length (0
/// for an empty range) or the error for RAX.
fn page_range(shared: &VmShared, addr: u64, len: u64) -> Result<u64, i64> {
    if addr % PAGE_SIZE != 0 {
        return Err(-errno::EINVAL);
    }
    if len == 0 {
        return Ok(0);
    }
    let Some(len) = len.checked_next_multiple_of(PAGE_SIZE) else {
        return Err(-errno::EFAULT);
    };
    if !shared.mem.layout().contains(addr, len) {
        return Err(-errno::EFAULT);
    }
    if shared.mode == Mode::Program && addr < LOW_END {
        // The VMM's descriptor tables, stubs and page tables live there.
        return Err(-errno::EINVAL);
    }
    Ok(len)
}

/// Runs a memory operation over a checked page range; its errors are
/// logged and reported as EIO.
fn over_pages(
    shared: &VmShared,
    what: &str,
    addr: u64,
    len: u64,
    op: impl FnOnce(&VmMemory, u64) -> Result<i64, MemError>,
) -> i64 {
    let len = match page_range(shared, addr, len) {
        Ok(0) => return 0,
        Ok(len) => len,
        Err(e) => return e,
    };
    op(&shared.mem, len).unwrap_or_else(|e| {
        log::warn!("{what} {addr:#x}+{len:#x}: {}", crate::vcpu::chain(&e));
        match e {
            // A live snapshot holds the VM's write protection.
            MemError::Busy(_) => -errno::EBUSY,
            _ => -errno::EIO,
        }
    })
}

/// DISCARD(addr, len): drops the VM's mapping of whole pages.
fn discard(shared: &VmShared, addr: u64, len: u64) -> i64 {
    over_pages(shared, "DISCARD", addr, len, |mem, len| {
        mem.discard(addr, len).map(|_| 0)
    })
}

/// SWAP_OUT(addr, len): writes the range's present pages to swap now;
/// returns how many went (pinned pages are skipped).
fn swap_out(shared: &VmShared, addr: u64, len: u64) -> i64 {
    shared.virtio.drop_cached_pins();
    over_pages(shared, "SWAP_OUT", addr, len, |mem, len| {
        mem.swap_out(addr, len).map(|r| r.swapped as i64)
    })
}

/// MIGRATE(addr, len): moves the range's present pages to new frames now,
/// while other vCPUs run; returns how many moved (pinned pages are skipped).
fn migrate(shared: &VmShared, addr: u64, len: u64) -> i64 {
    shared.virtio.drop_cached_pins();
    over_pages(shared, "MIGRATE", addr, len, |mem, len| {
        mem.migrate(addr, len).map(|r| r.moved as i64)
    })
}

/// COLLAPSE(addr): maps the 2 MiB-aligned block at addr with one huge
/// frame. -EBUSY if a page is pinned, write-protected or marked (or kept
/// moving to swap), -ENOMEM under a resident limit, -EINVAL if addr is
/// not 2 MiB-aligned (or holds the VMM's first MiB in program mode),
/// -EFAULT if the block is not wholly RAM.
fn collapse(shared: &VmShared, addr: u64) -> i64 {
    if addr % memory::HUGE_SIZE != 0 || (shared.mode == Mode::Program && addr < LOW_END) {
        return -errno::EINVAL;
    }
    shared.virtio.drop_cached_pins();
    match shared.mem.collapse(addr) {
        Ok(Collapse::Done { .. } | Collapse::AlreadyHuge) => 0,
        Ok(Collapse::Refused(CollapseRefusal::ResidentLimit)) => -errno::ENOMEM,
        Ok(Collapse::Refused(CollapseRefusal::KeptSmall)) => -errno::EINVAL,
        Ok(Collapse::Refused(_)) => -errno::EBUSY,
        Err(MemError::NotRam { .. }) => -errno::EFAULT,
        Err(MemError::Unaligned { .. }) => -errno::EINVAL,
        Err(e) => {
            log::warn!("COLLAPSE {addr:#x}: {}", crate::vcpu::chain(&e));
            -errno::EIO
        }
    }
}

/// WP(addr, len, on): arms or lifts write protection for the VM's
/// listener (the built-in one records writes for WP_EVENTS).
fn write_protect(shared: &VmShared, addr: u64, len: u64, on: u64) -> i64 {
    if on > 1 {
        return -errno::EINVAL;
    }
    if on == 1 {
        shared.virtio.drop_cached_pins();
    }
    over_pages(shared, "WP", addr, len, |mem, len| {
        mem.protect_for_listener(addr, len, on == 1).map(|_| 0)
    })
}

/// WP_EVENTS(buf, cap): drains the pages written since they were
/// protected into buf, one u64 guest-physical address each.
fn wp_events(shared: &VmShared, buf: u64, cap: u64) -> i64 {
    let max = cap / 8;
    if max == 0 {
        return 0;
    }
    if !shared.mem.layout().contains(buf, max * 8) {
        return -errno::EFAULT;
    }
    let events = shared.mem.take_write_events(max as usize);
    let bytes: Vec<u8> = events.iter().flat_map(|e| e.to_le_bytes()).collect();
    match shared.mem.write(buf, &bytes) {
        Ok(()) => events.len() as i64,
        Err(e) => {
            // The events are gone from the record: say so loudly.
            log::error!(
                "WP_EVENTS lost {} events writing them to {buf:#x}: {}",
                events.len(),
                crate::vcpu::chain(&e)
            );
            -errno::EFAULT
        }
    }
}

/// STATS(buf, cap): writes the process-wide counters; returns how many.
fn stats(shared: &VmShared, buf: u64, cap: u64) -> i64 {
    let counters = shared.machine.stats().to_abi();
    let n = (cap / 8).min(counters.len() as u64);
    if n == 0 {
        return 0;
    }
    let bytes: Vec<u8> = counters[..n as usize]
        .iter()
        .flat_map(|c| c.to_le_bytes())
        .collect();
    if !shared.mem.layout().contains(buf, bytes.len() as u64) {
        return -errno::EFAULT;
    }
    match shared.mem.write(buf, &bytes) {
        Ok(()) => n as i64,
        Err(_) => -errno::EFAULT,
    }
}
