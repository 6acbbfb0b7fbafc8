//! Snapshot memory files as read-only swap areas: a VM restored from a
//! snapshot starts with every saved page still in the file, and reads each
//! one on its first access, the way a swapped-out page comes back.
//!
//! # The memory file and its index
//! The memory file is a live snapshot's image (see `snapshot.rs`):
//! guest-physical byte `gpa` at file offset `gpa`, holes for pages that
//! were absent or held zeros. Its *index* (kept elsewhere, in the VMM's
//! state file) lists the pages with contents as *runs*: up to
//! [`MAX_RUN_PAGES`] consecutive pages of one RAM range, each run with the
//! CRC-32 of its bytes. A page no run lists reads as zeros.
//!
//! # Image entries
//! A restored page is an [`Entry::Swap`] whose slot names an *image area*
//! instead of a slot of the swap file, like Linux's swap entry type and
//! offset: the top four bits of the slot are the area (0 is the swap file,
//! whose slots stay below [`MAX_SLOTS`]), the rest the page number. So
//! everything swap entries already do holds: the first access reads the
//! page (with the rest of its run, see `restore.rs`) into a fresh
//! exclusive frame (R14), fork copies the entry without its exclusive bit
//! (R6), write protection is kept in it, DISCARD drops it. An area is registered with the [`Context`] while entries name it;
//! entries are counted per area (`dup` and `put` count, nothing is ever
//! freed or punched in the file).
//!
//! # Verification
//! The first load of any page of a run reads the whole run once and checks
//! its CRC-32 against the index; a mismatch fails the access with an error
//! naming the run and the file (the VM ends with it, never with wrong
//! data). A verified run keeps the CRC-32 of each of its pages, so later
//! loads read one page and check it alone: a file changed after the check
//! is still caught. The file must not change while VMs restored from it
//! run.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

use thiserror::Error;

use crate::layout::{Layout, PAGE_SIZE};
use crate::swap::{MAX_SLOTS, PageBuf, SwapError};
use crate::vm::MemError;

/// Most pages one run of the index covers: verifying a run costs one read
/// of at most this many pages (256 KiB) on the first access to any of them.
pub const MAX_RUN_PAGES: u32 = 64;
/// Image areas a context can have at once: slot areas 1 to 14 (area 15 is
/// left unused, so `u32::MAX`, a placeholder slot during swap-out, never
/// names one).
pub(crate) const AREAS: usize = 14;
const AREA_SHIFT: u32 = MAX_SLOTS.trailing_zeros();
const _: () = assert!(1u64 << (32 - AREA_SHIFT) > AREAS as u64 + 1);

/// The slot of an image entry for page `page` of area `area`.
pub(crate) fn image_slot(area: usize, page: u64) -> u32 {
    debug_assert!((1..=AREAS).contains(&area) && page < u64::from(MAX_SLOTS));
    ((area as u32) << AREA_SHIFT) | page as u32
}

/// The area (0: the swap file) and the rest of a swap entry's slot.
pub(crate) fn split_slot(slot: u32) -> (usize, u32) {
    ((slot >> AREA_SHIFT) as usize, slot & (MAX_SLOTS - 1))
}

/// One run of a memory file's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageRun {
    /// Guest-physical address of the first page (also its file offset).
    pub gpa: u64,
    /// Pages in the run, 1 to [`MAX_RUN_PAGES`].
    pub pages: u32,
    /// CRC-32 (IEEE, as `crc32fast` computes it) of the run's bytes.
    pub crc: u32,
}

/// Why a memory file cannot be used for a restore.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The file could not be read or measured.
    #[error("cannot read the memory file {path}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is shorter than its index says.
    #[error(
        "the memory file {path} is {len} bytes, but its index lists pages up to byte {needed}: \
         the file is truncated or not the one saved with this state"
    )]
    Short {
        /// The file.
        path: String,
        /// Its length.
        len: u64,
        /// The end of the last page the index lists.
        needed: u64,
    },
    /// A run of the index is malformed.
    #[error("run {index} of the index of {path} ({gpa:#x}, {pages} pages) {why}")]
    BadRun {
        /// The file.
        path: String,
        /// The run's position in the index.
        index: usize,
        /// Its first address.
        gpa: u64,
        /// Its pages.
        pages: u32,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The guest RAM is larger than image entries can name.
    #[error("guest RAM of {pages} pages is too large to restore lazily (at most {MAX_SLOTS})")]
    TooLarge {
        /// Pages of RAM.
        pages: u64,
    },
    /// Every image area of the context is in use.
    #[error(
        "{AREAS} snapshot memory files are in use by this process's VMs; \
         end a restored VM (and its clones) before restoring another"
    )]
    TooMany,
    /// The restored VM's memory could not be created.
    #[error("guest memory")]
    Memory(#[from] MemError),
}

#[derive(Debug)]
struct Run {
    /// Page number of the first page.
    first: u64,
    pages: u32,
    gpa: u64,
    crc: u32,
    /// Once the run passed its check: the CRC-32 of each page.
    verified: OnceLock<Box<[u32]>>,
}

/// A memory file opened for lazy restores.
#[derive(Debug)]
pub struct Image {
    file: File,
    name: String,
    layout: Layout,
    /// Sorted by page number, disjoint.
    runs: Box<[Run]>,
    pages: u64,
}

/// One run of an image, as restore lays out its entries.
pub(crate) struct RunPages {
    /// Page number of the first page.
    pub(crate) first: u64,
    /// Pages.
    pub(crate) pages: u64,
}

impl Image {
    /// Opens `file` (named `name` in messages) with its index `runs`, for
    /// VMs with RAM `layout`. Runs must be sorted, disjoint, page-aligned,
    /// of 1 to [`MAX_RUN_PAGES`] pages inside one RAM range, and inside
    /// the file. Nothing of the file is read yet.
    pub fn open(
        file: File,
        name: impl Into<String>,
        layout: Layout,
        runs: &[ImageRun],
    ) -> Result<Arc<Self>, ImageError> {
        let name = name.into();
        if layout.pages() > u64::from(MAX_SLOTS) {
            return Err(ImageError::TooLarge {
                pages: layout.pages(),
            });
        }
        let len = file
            .metadata()
            .map_err(|source| ImageError::Io {
                path: name.clone(),
                source,
            })?
            .len();
        let mut out = Vec::with_capacity(runs.len());
        let mut needed = 0u64;
        let mut next_page = 0u64;
        for (index, r) in runs.iter().enumerate() {
            let bad = |why| ImageError::BadRun {
                path: name.clone(),
                index,
                gpa: r.gpa,
                pages: r.pages,
                why,
            };
            if r.pages == 0 || r.pages > MAX_RUN_PAGES {
                return Err(bad("has not 1 to 64 pages"));
            }
            if r.gpa % PAGE_SIZE != 0 {
                return Err(bad("is not page-aligned"));
            }
            let bytes = u64::from(r.pages) * PAGE_SIZE;
            let first = match layout.split(r.gpa, bytes).as_deref() {
                Some([(first, _, _)]) => *first,
                _ => return Err(bad("is not inside one RAM range")),
            };
            if first < next_page {
                return Err(bad("overlaps or precedes the run before it"));
            }
            next_page = first + u64::from(r.pages);
            needed = needed.max(r.gpa + bytes);
            out.push(Run {
                first,
                pages: r.pages,
                gpa: r.gpa,
                crc: r.crc,
                verified: OnceLock::new(),
            });
        }
        if len < needed {
            return Err(ImageError::Short {
                path: name,
                len,
                needed,
            });
        }
        let pages = out.iter().map(|r| u64::from(r.pages)).sum();
        Ok(Arc::new(Self {
            file,
            name,
            layout,
            runs: out.into(),
            pages,
        }))
    }

    /// The RAM layout of the VMs this image restores.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Pages the index lists.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The file's name in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The runs, by page number.
    pub(crate) fn runs(&self) -> impl Iterator<Item = RunPages> + '_ {
        self.runs.iter().map(|r| RunPages {
            first: r.first,
            pages: u64::from(r.pages),
        })
    }

    fn run_of(&self, page: u64) -> Option<(usize, &Run)> {
        let i = self
            .runs
            .partition_point(|r| r.first <= page)
            .checked_sub(1)?;
        let r = &self.runs[i];
        (page < r.first + u64::from(r.pages)).then_some((i, r))
    }

    /// Reads page number `page` into `out`, checking it (see the module
    /// documentation).
    pub(crate) fn load(&self, area: usize, page: u64, out: &mut PageBuf) -> Result<(), SwapError> {
        let (index, run) = self
            .run_of(page)
            .ok_or(SwapError::ImageSlot { area, page })?;
        let k = (page - run.first) as usize;
        if let Some(crcs) = run.verified.get() {
            self.read_at(out, run.gpa + k as u64 * PAGE_SIZE)?;
            if crc32fast::hash(out) != crcs[k] {
                return Err(self.corrupt(index, run));
            }
            return Ok(());
        }
        let (_, bytes) = self.load_run(area, page)?;
        out.copy_from_slice(&bytes[k * PAGE_SIZE as usize..(k + 1) * PAGE_SIZE as usize]);
        Ok(())
    }

    /// Reads the whole run holding page number `page`, checking it;
    /// returns its first page number and its bytes.
    pub(crate) fn load_run(&self, area: usize, page: u64) -> Result<(u64, Vec<u8>), SwapError> {
        let (index, run) = self
            .run_of(page)
            .ok_or(SwapError::ImageSlot { area, page })?;
        let mut bytes = vec![0u8; run.pages as usize * PAGE_SIZE as usize];
        self.read_at(&mut bytes, run.gpa)?;
        let pages = bytes.chunks_exact(PAGE_SIZE as usize);
        if let Some(crcs) = run.verified.get() {
            if pages
                .zip(crcs.iter())
                .any(|(p, c)| crc32fast::hash(p) != *c)
            {
                return Err(self.corrupt(index, run));
            }
            return Ok((run.first, bytes));
        }
        let mut whole = crc32fast::Hasher::new();
        let mut crcs = Vec::with_capacity(run.pages as usize);
        for chunk in pages {
            let mut one = crc32fast::Hasher::new();
            one.update(chunk);
            crcs.push(one.clone().finalize());
            whole.combine(&one);
        }
        if whole.finalize() != run.crc {
            return Err(self.corrupt(index, run));
        }
        // Another thread may have verified it meanwhile: same values.
        let _ = run.verified.set(crcs.into());
        Ok((run.first, bytes))
    }

    fn corrupt(&self, index: usize, run: &Run) -> SwapError {
        SwapError::ImageCorrupt {
            run: index,
            gpa: run.gpa,
            pages: run.pages,
            path: self.name.clone(),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SwapError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| SwapError::ImageIo {
                path: self.name.clone(),
                offset,
                source,
            })
    }
}

/// Lists the pages with contents of a memory file written for RAM
/// `layout` (guest-physical byte `gpa` at offset `gpa`) as runs with their
/// checksums: its index. Holes are skipped without reading them, and pages
/// of zeros are left out (they read as zeros anyway).
pub fn index_image(file: &File, layout: &Layout) -> io::Result<Vec<ImageRun>> {
    let fd = file.as_fd();
    let mut runs = Vec::new();
    let mut buf = vec![0u8; MAX_RUN_PAGES as usize * PAGE_SIZE as usize];
    for range in layout.ranges() {
        let end = range.gpa + range.len;
        let mut at = range.gpa;
        while at < end {
            let Some(data) = crate::sys::seek_data(fd, at)? else {
                break;
            };
            let data = data / PAGE_SIZE * PAGE_SIZE;
            if data >= end {
                break;
            }
            let hole = crate::sys::seek_hole(fd, data)?
                .unwrap_or(end)
                .min(end)
                .div_ceil(PAGE_SIZE)
                * PAGE_SIZE;
            let mut chunk = data.max(at);
            while chunk < hole.min(end) {
                let n = (hole.min(end) - chunk).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], chunk)?;
                add_pages(&mut runs, range.gpa, chunk, &buf[..n]);
                chunk += n as u64;
            }
            at = hole.max(data + PAGE_SIZE);
        }
    }
    Ok(runs)
}

/// Adds the non-zero pages of `bytes` (read at `gpa`, in the RAM range
/// that starts at `range`) to `runs`, extending the last run where the
/// pages follow it in the same range.
fn add_pages(runs: &mut Vec<ImageRun>, range: u64, gpa: u64, bytes: &[u8]) {
    for (i, page) in bytes.chunks_exact(PAGE_SIZE as usize).enumerate() {
        if page.iter().all(|b| *b == 0) {
            continue;
        }
        let at = gpa + i as u64 * PAGE_SIZE;
        match runs.last_mut() {
            Some(r)
                if r.gpa >= range
                    && r.gpa + u64::from(r.pages) * PAGE_SIZE == at
                    && r.pages < MAX_RUN_PAGES =>
            {
                let mut h =
                    crc32fast::Hasher::new_with_initial_len(r.crc, u64::from(r.pages) * PAGE_SIZE);
                h.update(page);
                r.crc = h.finalize();
                r.pages += 1;
            }
            _ => runs.push(ImageRun {
                gpa: at,
                pages: 1,
                crc: crc32fast::hash(page),
            }),
        }
    }
}
