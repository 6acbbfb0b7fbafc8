//! The crate's edge to the host kernel: memfds, mappings, protection, hole
//! punching and raw frame copies. Everything `unsafe` in `memory` is here.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use crate::layout::PAGE_SIZE;

/// The reach of one last-level page table (x86-64: 2 MiB).
const PMD_SIZE: usize = 2 << 20;

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Creates an empty, close-on-exec memfd of `len` bytes (all holes).
pub(crate) fn memfd(name: &CStr, len: u64) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; the call has no other
    // memory-safety preconditions.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by no one else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: ftruncate on an fd we own; no memory is touched.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })?;
    Ok(fd)
}

/// Frees the frames backing `[offset, offset + len)` of a memfd; the range
/// reads zeros afterwards.
pub(crate) fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid fd; it touches no memory of ours.
    check(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
}

/// The first offset at or after `offset` that holds data in a sparse file
/// (`SEEK_DATA`), or `None` past the last data.
pub(crate) fn seek_data(fd: BorrowedFd<'_>, offset: u64) -> io::Result<Option<u64>> {
    seek(fd, offset, libc::SEEK_DATA)
}

/// The first hole at or after `offset` (`SEEK_HOLE`; the end of the file
/// counts as one), or `None` if `offset` is past the end.
pub(crate) fn seek_hole(fd: BorrowedFd<'_>, offset: u64) -> io::Result<Option<u64>> {
    seek(fd, offset, libc::SEEK_HOLE)
}

fn seek(fd: BorrowedFd<'_>, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: lseek on a valid fd touches no memory of ours. It moves the
    // file offset, which no one here relies on (all I/O is positioned).
    let at = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if at >= 0 {
        return Ok(Some(at as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// A range of host virtual memory owned by this process: unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    base: NonNull<u8>,
    len: usize,
    /// Every piece mapped into the range asks for 2 MiB host pages.
    huge: bool,
}

// SAFETY: a `Mapping` is an address range; it is only dereferenced through
// raw pointers by code that holds the locks documented at each use.
unsafe impl Send for Mapping {}
// SAFETY: as above; sharing the range's address is harmless.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Reserves `len` bytes of address space, inaccessible and unbacked.
    pub(crate) fn reserve(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping at an address of the kernel's
        // choosing cannot alias any existing Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        Self::from_mmap(p, len)
    }

    /// Reserves `len` bytes like [`Mapping::reserve`], starting on a 2 MiB
    /// boundary and asking for 2 MiB host pages in everything mapped into
    /// it later (the host can only map a 2 MiB page at an address and a
    /// file offset that are both 2 MiB aligned).
    pub(crate) fn reserve_huge(len: usize) -> io::Result<Self> {
        let mut outer = Self::reserve(len + PMD_SIZE)?;
        let start = outer.base.as_ptr() as usize;
        let head = start.next_multiple_of(PMD_SIZE) - start;
        let tail = PMD_SIZE - head;
        let at = |off: usize| outer.base.as_ptr().wrapping_add(off).cast::<libc::c_void>();
        if head > 0 {
            // SAFETY: the piece lies inside `outer`, a fresh reservation
            // that no Rust object occupies.
            check(unsafe { libc::munmap(at(0), head) })?;
        }
        if tail > 0 {
            // SAFETY: as above; what remains is `len` aligned bytes.
            check(unsafe { libc::munmap(at(head + len), tail) })?;
        }
        let base = NonNull::new(outer.base.as_ptr().wrapping_add(head))
            .ok_or_else(|| io::Error::other("aligned reservation at NULL"))?;
        outer.len = 0;
        std::mem::forget(outer);
        let mut m = Self {
            base,
            len,
            huge: false,
        };
        m.advise_huge()?;
        Ok(m)
    }

    /// Maps all of `fd` (`len` bytes) shared and read-write.
    pub(crate) fn shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        // SAFETY: as in `reserve`, a fresh mapping at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        Self::from_mmap(p, len)
    }

    /// Maps all of `fd` (`len` bytes) shared and read-write, 2 MiB aligned
    /// and asking for 2 MiB host pages.
    pub(crate) fn shared_huge(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        let m = Self::reserve_huge(len)?;
        m.map_file(0, (len as u64).div_ceil(PAGE_SIZE), fd, true)?;
        Ok(m)
    }

    fn from_mmap(p: *mut libc::c_void, len: usize) -> io::Result<Self> {
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Self {
            base,
            len,
            huge: false,
        })
    }

    /// Asks for 2 MiB host pages in the range, now and in every piece
    /// mapped into it later.
    fn advise_huge(&mut self) -> io::Result<()> {
        self.huge = true;
        self.advise_huge_span(self.base.as_ptr().cast(), self.len)
    }

    fn advise_huge_span(&self, addr: *mut libc::c_void, len: usize) -> io::Result<()> {
        if !self.huge {
            return Ok(());
        }
        // SAFETY: an advice on a range of our own reservation; it changes
        // how the host backs the pages, never their contents.
        check(unsafe { libc::madvise(addr, len, libc::MADV_HUGEPAGE) })
    }

    /// Address of page `page` of the range.
    pub(crate) fn page_ptr(&self, page: u64) -> *mut u8 {
        let off = page * PAGE_SIZE;
        assert!(off < self.len as u64, "page {page} outside mapping");
        self.base.as_ptr().wrapping_add(off as usize)
    }

    fn span(&self, page: u64, pages: u64) -> (*mut libc::c_void, usize) {
        let end = (page + pages) * PAGE_SIZE;
        assert!(
            end <= self.len as u64,
            "pages {page}+{pages} outside mapping"
        );
        (self.page_ptr(page).cast(), (pages * PAGE_SIZE) as usize)
    }

    /// Maps `pages` pages of `fd` at file offset `page * 4K` over the same
    /// pages of this range.
    pub(crate) fn map_file(
        &self,
        page: u64,
        pages: u64,
        fd: BorrowedFd<'_>,
        writable: bool,
    ) -> io::Result<()> {
        let (addr, len) = self.span(page, pages);
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: the target lies inside this reservation, which no Rust
        // object occupies; MAP_FIXED replaces only our own pages there.
        let p = unsafe {
            libc::mmap(
                addr,
                len,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                (page * PAGE_SIZE) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.advise_huge_span(addr, len)
    }

    /// Makes `pages` pages inaccessible and drops their backing mapping.
    pub(crate) fn unmap(&self, page: u64, pages: u64) -> io::Result<()> {
        let (addr, len) = self.span(page, pages);
        // SAFETY: as in `map_file`: our own reservation, no Rust objects.
        let p = unsafe {
            libc::mmap(
                addr,
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // The same advice as its neighbours, so that the areas merge.
        self.advise_huge_span(addr, len)
    }

    /// Empties `pages` pages at `page` of their host page table entries,
    /// leaving their mappings as they are (same backing, same protection):
    /// the next access faults the page in again. The entries are moved,
    /// whole page tables at a time, into a new range that this returns and
    /// that nothing else knows of; they go away when it is dropped.
    ///
    /// Moving costs per page table, where changing or dropping entries in
    /// place (`mprotect`, `MADV_DONTNEED`) costs per entry.
    pub(crate) fn move_entries_out(&self, page: u64, pages: u64) -> io::Result<Mapping> {
        let (addr, len) = self.span(page, pages);
        // Page tables move whole only between addresses equal modulo their
        // reach: place the target so.
        let scratch = Mapping::reserve(len + PMD_SIZE)?;
        let skew = (addr as usize).wrapping_sub(scratch.base.as_ptr() as usize) % PMD_SIZE;
        let target = scratch.base.as_ptr().wrapping_add(skew);
        // SAFETY: the source lies inside this reservation, which no Rust
        // object occupies, and stays mapped (MREMAP_DONTUNMAP) with the
        // same backing and protection, so what KVM reads through it is
        // unchanged. The target lies inside `scratch`, a reservation of our
        // own that nothing else uses.
        let p = unsafe {
            libc::mremap(
                addr,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
                target.cast::<libc::c_void>(),
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(scratch)
    }

    /// Moves the range out into the returned mapping, leaving this one
    /// empty (it unmaps nothing): for an owner being dropped that hands
    /// its range on (see `host_reap.rs`).
    pub(crate) fn take(&mut self) -> Mapping {
        let len = std::mem::take(&mut self.len);
        let base = std::mem::replace(&mut self.base, NonNull::dangling());
        Mapping {
            base,
            len,
            huge: self.huge,
        }
    }

    /// Unmaps the range `chunk` pages at a time, so that no one call holds
    /// the process's mapping lock for long (an `mmap` or `mprotect` of
    /// another thread waits for the whole of a call).
    pub(crate) fn release_gradually(self, chunk: u64) {
        let chunk = (chunk * PAGE_SIZE) as usize;
        let mut off = 0;
        while off < self.len {
            let n = chunk.min(self.len - off);
            // SAFETY: the piece lies inside this range, which we own and
            // which nothing refers into once its owner gives it up.
            let ret = unsafe { libc::munmap(self.base.as_ptr().wrapping_add(off).cast(), n) };
            if ret != 0 {
                log::error!("munmap failed: {}", io::Error::last_os_error());
            }
            off += n;
        }
        std::mem::forget(self);
    }

    /// Changes the protection of `pages` pages.
    pub(crate) fn protect(&self, page: u64, pages: u64, writable: bool) -> io::Result<()> {
        let (addr, len) = self.span(page, pages);
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: changes protection inside our own reservation only.
        check(unsafe { libc::mprotect(addr, len, prot) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: the range was mapped by us and nothing refers into it once
        // its owner is dropped.
        let ret = unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
        if ret != 0 {
            log::error!("munmap failed: {}", io::Error::last_os_error());
        }
    }
}

/// Fills the page at `offset` of the memfd `fd` with the page at `src`.
///
/// A write through the store's mapping would first take a host page fault
/// that allocates and zeroes the page; `pwrite` allocates it and fills it
/// in one step.
///
/// # Safety
/// `src` addresses a whole page of a live mapping that stays mapped for the
/// call.
pub(crate) unsafe fn write_file_page(
    fd: BorrowedFd<'_>,
    offset: u64,
    src: *const u8,
) -> io::Result<()> {
    // SAFETY: guaranteed by the caller: the kernel reads PAGE_SIZE bytes at
    // `src`, which are mapped.
    let n = unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            src.cast(),
            PAGE_SIZE as usize,
            offset as libc::off_t,
        )
    };
    match n {
        n if n == PAGE_SIZE as isize => Ok(()),
        n if n < 0 => Err(io::Error::last_os_error()),
        _ => Err(io::Error::other("short write to a frame store")),
    }
}

/// Copies `len` bytes out of a frame.
///
/// # Safety
/// `src..src+len` lies inside a live mapping of one frame that the caller
/// keeps alive and mapped for the duration.
pub(crate) unsafe fn read_frame(src: *const u8, out: &mut [u8]) {
    // SAFETY: guaranteed by the caller; `out` is a distinct Rust buffer.
    unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) }
}

/// Copies bytes into a frame.
///
/// # Safety
/// As for [`read_frame`], and the frame is exclusive to the caller's VM.
pub(crate) unsafe fn write_frame(dst: *mut u8, data: &[u8]) {
    // SAFETY: guaranteed by the caller.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) }
}

/// Copies one whole page.
///
/// # Safety
/// `src` and `dst` each address a whole page of a live mapping that stays
/// mapped for the call; the pages do not overlap, and no one else writes
/// `dst` meanwhile.
pub(crate) unsafe fn copy_page(src: *const u8, dst: *mut u8) {
    // SAFETY: guaranteed by the caller.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, PAGE_SIZE as usize) }
}

/// Fills one whole page with zeros.
///
/// # Safety
/// `dst` addresses a whole page of a live mapping that stays mapped for the
/// call, and no one else writes it meanwhile.
pub(crate) unsafe fn zero_page(dst: *mut u8) {
    // SAFETY: guaranteed by the caller.
    unsafe { std::ptr::write_bytes(dst, 0, PAGE_SIZE as usize) }
}
