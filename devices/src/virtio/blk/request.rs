//! One virtio-blk request (virtio 1.2, section 5.2.6): the header the
//! driver wrote, the data, and the status byte the device writes last.
//!
//! Everything the driver wrote is checked before the disk is touched: the
//! request type, the data length (whole sectors), the range (inside the
//! disk), the direction of the buffers, the discard segments. A request
//! that fails a check completes with `VIRTIO_BLK_S_IOERR` (or `UNSUPP` for
//! a type the device does not offer); one with no room for the status byte
//! completes with nothing written.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

use super::disk::{Disk, SECTOR};
use crate::virtio::Buffers;

/// Bytes of the request header.
const HEADER: u64 = 16;
/// Bytes of one discard / write-zeroes segment.
const SEGMENT: u64 = 16;
/// Most segments in one discard or write-zeroes request.
pub const MAX_SEGMENTS: u32 = 16;
/// Most sectors one discard or write-zeroes segment may cover.
pub const MAX_ZERO_SECTORS: u32 = 1 << 16;
/// The write-zeroes flag that allows unmapping.
const WRITE_ZEROES_UNMAP: u32 = 1;
/// Bytes of the id GET_ID returns.
pub const ID_BYTES: usize = 20;

/// What a request needs besides its buffers.
#[derive(Clone, Copy, Debug)]
pub struct Env<'a> {
    /// The disk.
    pub disk: &'a Disk,
    /// The device's id string.
    pub id: &'a [u8; ID_BYTES],
    /// Negotiated features.
    pub features: u64,
}

/// Serves the request in `bufs`; returns the bytes written into the
/// driver's buffers (the status byte included).
pub fn serve(env: Env<'_>, bufs: &Buffers) -> u32 {
    let Some(status_at) = bufs.writable_len().checked_sub(1) else {
        return 0;
    };
    let (status, written) = match run(env, bufs, status_at) {
        Ok(n) => (VIRTIO_BLK_S_OK, n),
        Err(status) => (status, 0),
    };
    if bufs.write(status_at, &[status as u8]).is_err() {
        return 0;
    }
    u32::try_from(written + 1).unwrap_or(u32::MAX)
}

/// A well-formed read: the byte offset in the disk and the bytes to read
/// into the writable buffers (the status byte follows them); None for
/// anything else.
pub fn read_of(env: Env<'_>, bufs: &Buffers) -> Option<(u64, u64)> {
    let len = bufs.writable_len().checked_sub(1)?;
    let (kind, sector) = header(bufs).ok()?;
    if kind != VIRTIO_BLK_T_IN || bufs.readable_len() != HEADER {
        return None;
    }
    Some((range(env.disk, sector, len).ok()?, len))
}

/// Ends a read of `len` bytes (see [`read_of`]): writes the status byte;
/// the bytes written into the driver's buffers.
pub fn end_read(bufs: &Buffers, len: u64, ok: bool) -> u32 {
    let status = if ok {
        VIRTIO_BLK_S_OK
    } else {
        VIRTIO_BLK_S_IOERR
    };
    if bufs.write(len, &[status as u8]).is_err() {
        return 0;
    }
    let data = if ok { len } else { 0 };
    u32::try_from(data + 1).unwrap_or(u32::MAX)
}

/// Serves a read whose data the page cache holds, without waiting: the
/// bytes written, or None when the request must go to an I/O thread
/// (anything but such a read).
pub fn serve_cached(env: Env<'_>, bufs: &Buffers) -> Option<u32> {
    let (off, len) = read_of(env, bufs)?;
    let slices = bufs.writable_slices(0, len).ok()?;
    if !env.disk.read_cached(off, &slices).ok()? {
        return None;
    }
    Some(end_read(bufs, len, true))
}

/// The request's type and sector.
fn header(bufs: &Buffers) -> Result<(u32, u64), u32> {
    let mut hdr = [0u8; HEADER as usize];
    bufs.read(0, &mut hdr).map_err(|_| VIRTIO_BLK_S_IOERR)?;
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
    Ok((kind, sector))
}

/// Runs the request; the data bytes written, or the status to report.
fn run(env: Env<'_>, bufs: &Buffers, status_at: u64) -> Result<u64, u32> {
    let (kind, sector) = header(bufs)?;
    let io = |r: std::io::Result<()>| {
        r.map_err(|e| {
            log::warn!("virtio-blk: {e}");
            VIRTIO_BLK_S_IOERR
        })
    };
    match kind {
        // The data of a read is device-writable, of a write device-readable.
        VIRTIO_BLK_T_IN if bufs.readable_len() != HEADER => Err(VIRTIO_BLK_S_IOERR),
        VIRTIO_BLK_T_OUT if status_at != 0 => Err(VIRTIO_BLK_S_IOERR),
        VIRTIO_BLK_T_IN => {
            let len = status_at;
            let off = range(env.disk, sector, len)?;
            let slices = bufs
                .writable_slices(0, len)
                .map_err(|_| VIRTIO_BLK_S_IOERR)?;
            io(env.disk.read(off, &slices))?;
            Ok(len)
        }
        VIRTIO_BLK_T_OUT => {
            if env.disk.read_only() {
                return Err(VIRTIO_BLK_S_IOERR);
            }
            let len = bufs.readable_len() - HEADER;
            let off = range(env.disk, sector, len)?;
            let slices = bufs
                .readable_slices(HEADER, len)
                .map_err(|_| VIRTIO_BLK_S_IOERR)?;
            io(env.disk.write(off, &slices))?;
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => io(env.disk.flush()).map(|()| 0),
        VIRTIO_BLK_T_GET_ID => {
            let n = status_at.min(ID_BYTES as u64);
            bufs.write(0, &env.id[..n as usize])
                .map_err(|_| VIRTIO_BLK_S_IOERR)?;
            Ok(n)
        }
        VIRTIO_BLK_T_DISCARD if env.features & (1 << VIRTIO_BLK_F_DISCARD) != 0 => {
            zero_segments(env, bufs, 0).map(|()| 0)
        }
        VIRTIO_BLK_T_WRITE_ZEROES if env.features & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0 => {
            zero_segments(env, bufs, WRITE_ZEROES_UNMAP).map(|()| 0)
        }
        _ => Err(VIRTIO_BLK_S_UNSUPP),
    }
}

/// The byte offset of `len` bytes at `sector`, if they are whole sectors
/// inside the disk.
fn range(disk: &Disk, sector: u64, len: u64) -> Result<u64, u32> {
    let end = sector.checked_add(len / SECTOR);
    if len % SECTOR != 0 || end.is_none_or(|e| e > disk.sectors()) {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    Ok(sector * SECTOR)
}

/// DISCARD and WRITE_ZEROES: every segment checked, then each zeroed.
fn zero_segments(env: Env<'_>, bufs: &Buffers, allowed_flags: u32) -> Result<(), u32> {
    if env.disk.read_only() {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    let body = bufs.readable_len() - HEADER;
    let n = body / SEGMENT;
    if body % SEGMENT != 0 || n == 0 || n > u64::from(MAX_SEGMENTS) {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    let mut ranges = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut seg = [0u8; SEGMENT as usize];
        bufs.read(HEADER + i * SEGMENT, &mut seg)
            .map_err(|_| VIRTIO_BLK_S_IOERR)?;
        let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
        let sectors = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
        if flags & !allowed_flags != 0 {
            return Err(VIRTIO_BLK_S_UNSUPP);
        }
        if sectors > MAX_ZERO_SECTORS {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let len = u64::from(sectors) * SECTOR;
        ranges.push((range(env.disk, sector, len)?, len));
    }
    for (off, len) in ranges {
        env.disk.zero(off, len).map_err(|e| {
            log::warn!("virtio-blk: {e}");
            VIRTIO_BLK_S_IOERR
        })?;
    }
    Ok(())
}
