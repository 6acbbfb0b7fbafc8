//! A block device's disk: the image file, and for a fork's clone a
//! copy-on-write overlay in memory.
//!
//! The VM that opened the image reads and writes the file directly, into
//! and out of pinned guest memory (`preadv`/`pwritev`). A clone sees the
//! disk as it was at the fork and writes into its own overlay; the file
//! never sees a clone's write. Since the parent keeps writing the file, a
//! clone's overlay is registered with the file as a *dependent*: before a
//! write changes a block, the block's old contents are preserved into
//! every dependent overlay that has not preserved it yet (the origin of an LVM
//! snapshot works the same way).
//!
//! An overlay holds two maps of 4 KiB blocks: `preserved` (the disk as the
//! clone saw it at the fork, copied before the file changed) and `written`
//! (the clone's own writes). A read takes `written`, then `preserved`, then
//! the file. [`Disk::reset`] drops `written`: the clone's disk is as it was
//! at the fork again.
//!
//! # Lock order
//! The file's dependents lock (read for I/O that must not interleave with
//! a preservation, write to preserve or to register a clone), then an
//! overlay's map lock.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

use vm_memory::VolatileSlice;

use crate::virtio::buffers::{iovecs, iovecs_of};

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// Bytes per overlay block.
const BLOCK: u64 = 4096;
/// Bytes an overlay moves through a bounce buffer at once.
const CHUNK: u64 = 1 << 20;

type Block = Arc<[u8]>;

#[derive(Clone, Debug, Default)]
struct Maps {
    preserved: BTreeMap<u64, Block>,
    written: BTreeMap<u64, Block>,
}

impl Maps {
    fn get(&self, block: u64) -> Option<&Block> {
        self.written
            .get(&block)
            .or_else(|| self.preserved.get(&block))
    }

    /// Everything this view of the disk holds, as a clone's `preserved`.
    fn flattened(&self) -> Maps {
        let mut preserved = self.preserved.clone();
        preserved.extend(self.written.iter().map(|(k, v)| (*k, v.clone())));
        Maps {
            preserved,
            written: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Default)]
struct Overlay {
    maps: Mutex<Maps>,
}

impl Overlay {
    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug)]
struct Backing {
    file: File,
    sectors: u64,
    read_only: bool,
    dependents: RwLock<Vec<Weak<Overlay>>>,
}

impl Backing {
    fn read_block(&self, block: u64) -> io::Result<Block> {
        let mut b = vec![0u8; BLOCK as usize];
        read_at_zero_filled(&self.file, &mut b, block * BLOCK)?;
        Ok(b.into())
    }
}

/// One VM's view of a disk image.
#[derive(Debug)]
pub struct Disk {
    backing: Arc<Backing>,
    overlay: Option<Arc<Overlay>>,
}

impl Disk {
    /// Opens the image at `path`. Reads leave the file's access time alone where the caller may ask
    /// for that (`O_NOATIME`: its owner, or root): the kernel then skips
    /// the access-time check of every read.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(!read_only);
        let file = options
            .clone()
            .custom_flags(libc::O_NOATIME)
            .open(path)
            .or_else(|_| options.open(path))?;
        let len = file.metadata()?.len();
        Ok(Self {
            backing: Arc::new(Backing {
                file,
                sectors: len / SECTOR,
                read_only,
                dependents: RwLock::new(Vec::new()),
            }),
            overlay: None,
        })
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.backing.sectors
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.backing.read_only
    }

    /// Whether this view writes into an overlay (a clone's disk).
    pub fn is_overlay(&self) -> bool {
        self.overlay.is_some()
    }

    /// The image file's descriptor, for reads that go around this view
    /// (io_uring); None for a clone's view, whose reads must see its
    /// overlay.
    pub fn direct_fd(&self) -> Option<std::os::fd::RawFd> {
        self.overlay
            .is_none()
            .then(|| self.backing.file.as_raw_fd())
    }

    /// Reads `[off, off + len of slices)` into `slices`.
    pub fn read(&self, off: u64, slices: &[VolatileSlice<'_>]) -> io::Result<()> {
        let Some(overlay) = &self.overlay else {
            return with_iovecs(slices, |iov| preadv_all(&self.backing.file, iov, off));
        };
        let _deps = self.read_dependents();
        let mut at = off;
        for s in slices {
            let mut buf = vec![0u8; s.len()];
            read_at_zero_filled(&self.backing.file, &mut buf, at)?;
            patch_from(&overlay.lock(), at, &mut buf);
            s.copy_from(&buf);
            at += s.len() as u64;
        }
        Ok(())
    }

    /// Reads like [`Disk::read`], but only what the page cache holds
    /// (`preadv2` with `RWF_NOWAIT`): false, with the slices partly
    /// filled, when the read would have to wait for the disk. A clone's
    /// view always says false.
    pub fn read_cached(&self, off: u64, slices: &[VolatileSlice<'_>]) -> io::Result<bool> {
        if self.overlay.is_some() {
            return Ok(false);
        }
        let fd = self.backing.file.as_raw_fd();
        let r = with_iovecs(slices, |iov| {
            vectored_all(iov, off, |iov, count, at| {
                // SAFETY: as in `preadv_all`: the iovecs point into pinned
                // guest buffers the caller's slices keep alive.
                unsafe { libc::preadv2(fd, iov, count, at, libc::RWF_NOWAIT) }
            })
        });
        match r {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Writes `slices` at `off`.
    pub fn write(&self, off: u64, slices: &[VolatileSlice<'_>]) -> io::Result<()> {
        let len: u64 = slices.iter().map(|s| s.len() as u64).sum();
        if self.overlay.is_none() {
            return self.preserve_then(off, len, || {
                with_iovecs(slices, |iov| pwritev_all(&self.backing.file, iov, off))
            });
        }
        let mut at = off;
        for s in slices {
            let mut buf = vec![0u8; s.len()];
            s.copy_to(&mut buf);
            self.overlay_write(at, &buf)?;
            at += s.len() as u64;
        }
        Ok(())
    }

    /// Makes `[off, off + len)` read as zeros (discard and write-zeroes).
    pub fn zero(&self, off: u64, len: u64) -> io::Result<()> {
        if self.overlay.is_none() {
            return self.preserve_then(off, len, || punch_hole(&self.backing.file, off, len));
        }
        let zeros = vec![0u8; len.min(CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.overlay_write(off + done, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// Makes written data durable (the file's; an overlay lives in memory).
    pub fn flush(&self) -> io::Result<()> {
        if self.overlay.is_some() {
            return Ok(());
        }
        self.backing.file.sync_data()
    }

    /// The disk a fork's clone gets: this view as it is now, copy-on-write.
    pub fn fork(&self) -> Self {
        let mut deps = self
            .backing
            .dependents
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let maps = self
            .overlay
            .as_ref()
            .map(|o| o.lock().flattened())
            .unwrap_or_default();
        let overlay = Arc::new(Overlay {
            maps: Mutex::new(maps),
        });
        deps.retain(|d| d.strong_count() > 0);
        deps.push(Arc::downgrade(&overlay));
        Self {
            backing: self.backing.clone(),
            overlay: Some(overlay),
        }
    }

    /// Drops this clone's own writes: the disk reads as at the fork again.
    /// A disk that writes its file directly has nothing to drop.
    pub fn reset(&self) {
        if let Some(o) = &self.overlay {
            o.lock().written.clear();
        }
    }

    /// Blocks this clone wrote itself (for tests and diagnostics).
    pub fn overlay_blocks(&self) -> usize {
        self.overlay.as_ref().map_or(0, |o| o.lock().written.len())
    }

    fn read_dependents(&self) -> std::sync::RwLockReadGuard<'_, Vec<Weak<Overlay>>> {
        self.backing
            .dependents
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `write` (a change of the file's `[off, off + len)`) after the
    /// old contents were preserved for every clone that depends on them.
    fn preserve_then(
        &self,
        off: u64,
        len: u64,
        write: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        {
            let deps = self.read_dependents();
            if deps.iter().all(|d| d.strong_count() == 0) {
                return write();
            }
        }
        let mut deps = self
            .backing
            .dependents
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        deps.retain(|d| d.strong_count() > 0);
        let live: Vec<Arc<Overlay>> = deps.iter().filter_map(Weak::upgrade).collect();
        for block in blocks(off, len) {
            let mut old = None;
            for o in &live {
                let mut m = o.lock();
                // Kept even where the clone wrote the block itself: a
                // reset goes back to it.
                if let Entry::Vacant(slot) = m.preserved.entry(block) {
                    let data = match &old {
                        Some(d) => Block::clone(d),
                        None => old.insert(self.backing.read_block(block)?).clone(),
                    };
                    slot.insert(data);
                }
            }
        }
        write()
    }

    /// A clone's write of `data` at `off` into its overlay.
    fn overlay_write(&self, off: u64, data: &[u8]) -> io::Result<()> {
        let Some(overlay) = &self.overlay else {
            return Ok(());
        };
        let _deps = self.read_dependents();
        let mut m = overlay.lock();
        for block in blocks(off, data.len() as u64) {
            let mut b = match m.get(block) {
                Some(b) => b.to_vec(),
                None => self.backing.read_block(block)?.to_vec(),
            };
            let start = (block * BLOCK).max(off);
            let end = ((block + 1) * BLOCK).min(off + data.len() as u64);
            b[(start - block * BLOCK) as usize..(end - block * BLOCK) as usize]
                .copy_from_slice(&data[(start - off) as usize..(end - off) as usize]);
            m.written.insert(block, b.into());
        }
        Ok(())
    }
}

/// The blocks `[off, off + len)` touches.
fn blocks(off: u64, len: u64) -> std::ops::Range<u64> {
    if len == 0 {
        return 0..0;
    }
    off / BLOCK..(off + len).div_ceil(BLOCK)
}

/// Overwrites the parts of `buf` (the disk at `off`) that `maps` holds.
fn patch_from(maps: &Maps, off: u64, buf: &mut [u8]) {
    for block in blocks(off, buf.len() as u64) {
        let Some(b) = maps.get(block) else {
            continue;
        };
        let start = (block * BLOCK).max(off);
        let end = ((block + 1) * BLOCK).min(off + buf.len() as u64);
        buf[(start - off) as usize..(end - off) as usize]
            .copy_from_slice(&b[(start - block * BLOCK) as usize..(end - block * BLOCK) as usize]);
    }
}

/// Reads `buf.len()` bytes at `off`; what lies past the end of the file
/// reads as zeros.
fn read_at_zero_filled(file: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Drops the first `n` bytes of `iov`: the iovecs left.
fn advance(iov: &mut [libc::iovec], mut n: usize) -> &mut [libc::iovec] {
    let mut done = 0;
    while done < iov.len() && n >= iov[done].iov_len {
        n -= iov[done].iov_len;
        done += 1;
    }
    let rest = &mut iov[done..];
    if let Some(first) = rest.first_mut() {
        first.iov_base = first.iov_base.cast::<u8>().wrapping_add(n).cast();
        first.iov_len -= n;
    }
    rest
}

/// Calls `f` with `slices` as iovecs, on the stack when they are few (a
/// request's data usually is one or two runs of frames).
fn with_iovecs<R>(slices: &[VolatileSlice<'_>], f: impl FnOnce(&mut [libc::iovec]) -> R) -> R {
    const FEW: usize = 8;
    if slices.len() > FEW {
        return f(&mut iovecs(slices));
    }
    let empty = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let mut iov = [empty; FEW];
    for (v, one) in iov.iter_mut().zip(iovecs_of(slices)) {
        *v = one;
    }
    f(&mut iov[..slices.len()])
}

/// Runs `op` (a `preadv`-like call: iovecs, count, offset) until every
/// byte moved.
fn vectored_all(
    mut iov: &mut [libc::iovec],
    mut off: u64,
    op: impl Fn(*const libc::iovec, i32, libc::off_t) -> isize,
) -> io::Result<()> {
    while !iov.is_empty() {
        let count = iov.len().min(1024) as i32;
        let n = op(iov.as_ptr(), count, off as libc::off_t);
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image is shorter than its capacity",
            ));
        }
        iov = advance(iov, n as usize);
        off += n as u64;
    }
    Ok(())
}

fn preadv_all(file: &File, iov: &mut [libc::iovec], off: u64) -> io::Result<()> {
    let fd = file.as_raw_fd();
    vectored_all(iov, off, |iov, count, at| {
        // SAFETY: every iovec points into a pinned guest buffer that the
        // caller's slices keep alive (see `iovecs`), within its length.
        unsafe { libc::preadv(fd, iov, count, at) }
    })
}

fn pwritev_all(file: &File, iov: &mut [libc::iovec], off: u64) -> io::Result<()> {
    let fd = file.as_raw_fd();
    vectored_all(iov, off, |iov, count, at| {
        // SAFETY: as in `preadv_all`; pwritev only reads the buffers.
        unsafe { libc::pwritev(fd, iov, count, at) }
    })
}

/// Zeroes a range of the file: a hole where the file system has them,
/// written zeros otherwise.
fn punch_hole(file: &File, off: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor we own; no memory is involved.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off as i64, len as i64) };
    if r == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; len.min(CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        file.write_all_at(&zeros[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(bytes: &[u8]) -> (tempfile_path::TempPath, Disk) {
        let p = tempfile_path::TempPath::new("disk");
        std::fs::write(&p.0, bytes).unwrap();
        let d = Disk::open(&p.0, false).unwrap();
        (p, d)
    }

    fn read(d: &Disk, off: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let s = VolatileSlice::from(&mut buf[..]);
        d.read(off, &[s]).unwrap();
        buf
    }

    fn write(d: &Disk, off: u64, data: &[u8]) {
        let mut v = data.to_vec();
        let s = VolatileSlice::from(&mut v[..]);
        d.write(off, &[s]).unwrap();
    }

    mod tempfile_path {
        /// A file path removed on drop.
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn new(tag: &str) -> Self {
                static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Self(std::env::temp_dir().join(format!("vmm-{tag}-{}-{n}", std::process::id())))
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn advance_drops_whole_iovecs_then_a_part() {
        let mut buf = [0u8; 8];
        let base = buf.as_mut_ptr();
        let iov = |at: usize, len| libc::iovec {
            iov_base: base.wrapping_add(at).cast(),
            iov_len: len,
        };
        let mut v = [iov(0, 4), iov(4, 4)];
        let rest = advance(&mut v, 6);
        assert_eq!(rest.len(), 1);
        assert_eq!((rest[0].iov_base, rest[0].iov_len), (iov(6, 2).iov_base, 2));
        assert!(advance(rest, 2).is_empty());
    }

    #[test]
    fn clones_are_copy_on_write_both_ways() {
        let (p, root) = image(&[1u8; 16384]);
        let child = root.fork();
        write(&root, 4096, &[2u8; 100]);
        assert_eq!(
            read(&child, 4096, 100),
            vec![1u8; 100],
            "parent write seen by the clone"
        );
        write(&child, 0, &[3u8; 5000]);
        assert!(
            read(&root, 0, 4096) == vec![1u8; 4096],
            "clone write reached the parent"
        );
        assert_eq!(&std::fs::read(&p.0).unwrap()[..4096], &[1u8; 4096][..]);
        let grandchild = child.fork();
        write(&root, 0, &[4u8; 16384]);
        assert!(read(&grandchild, 0, 5000) == vec![3u8; 5000]);
        assert_eq!(read(&grandchild, 8192, 10), vec![1u8; 10]);
        assert_eq!(read(&child, 8192, 10), vec![1u8; 10]);
        child.reset();
        assert_eq!(
            read(&child, 0, 10),
            vec![1u8; 10],
            "reset keeps the fork-time view"
        );
        child.zero(0, 4096).unwrap();
        assert_eq!(read(&child, 0, 4096), vec![0u8; 4096]);
        assert_eq!(read(&root, 0, 10), vec![4u8; 10]);
    }
}
