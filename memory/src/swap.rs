//! The swap file: where reclaimed frames wait until their next access.
//!
//! # On-disk layout
//! Slot `s` is the 4 KiB at offset `s * 4096` of the file; there is no
//! header. The file belongs to this process alone: by default it is an
//! unlinked temporary file; a file named by the user must be new or empty,
//! and is emptied again when the process is done with it.
//!
//! ```text
//!   offset 0      4K     8K     12K
//!         [slot 0][slot 1][ hole ][slot 3]...   freed slots are punched
//! ```
//!
//! # Slot states
//! A slot is *free* (in the free list, or past `next`) or *used*: it holds
//! a page and counts the swap entries naming it, in any VM (`refs` ≥ 1; a
//! page shared by VMs is written once and named by each). The metadata
//! lives in memory: the reference count and a CRC-32 of the contents,
//! checked on every read, so a slot changed behind our back is caught
//! instead of handed to the guest. Dropping the last reference frees the
//! slot and punches its hole.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::OnceLock;

use thiserror::Error;

use crate::layout::PAGE_SIZE;
use crate::lock::{Rank, RankedMutex};
use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Slots per metadata chunk.
const CHUNK: u32 = 4096;
/// Most slots a swap file holds (1 TiB of pages).
pub const MAX_SLOTS: u32 = 1 << 28;

/// One page of bytes.
pub(crate) type PageBuf = [u8; PAGE_SIZE as usize];

/// Errors of the swap file.
#[derive(Debug, Error)]
pub enum SwapError {
    /// The swap file could not be created or opened.
    #[error("cannot open swap file {path}")]
    Open {
        /// Where.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file named as swap holds data.
    #[error("swap file {0} exists and is not empty; name a new or empty file")]
    NotEmpty(String),
    /// Every slot is in use.
    #[error("the swap file is full ({MAX_SLOTS} slots)")]
    Full,
    /// Reading or writing a slot failed.
    #[error("I/O on swap slot {slot} of {path}")]
    Io {
        /// The slot.
        slot: u32,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A slot's contents do not match the checksum written with them.
    #[error(
        "swap slot {slot} of {path} fails its checksum: the file was changed or the disk failed"
    )]
    Corrupt {
        /// The slot.
        slot: u32,
        /// The file.
        path: String,
    },
    /// A run of a snapshot memory file does not match its checksum.
    #[error(
        "run {run} of the snapshot memory file {path} (guest {gpa:#x}, {pages} pages) fails its \
         checksum: the file changed after the snapshot, or the disk failed"
    )]
    ImageCorrupt {
        /// The run's position in the file's index.
        run: usize,
        /// Its first guest-physical address.
        gpa: u64,
        /// Its pages.
        pages: u32,
        /// The file.
        path: String,
    },
    /// Reading a snapshot memory file failed.
    #[error("cannot read the snapshot memory file {path} at offset {offset:#x}")]
    ImageIo {
        /// The file.
        path: String,
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An image entry names a page its image does not hold.
    #[error("an entry names page {page:#x} of snapshot image area {area}, which does not hold it")]
    ImageSlot {
        /// The area.
        area: usize,
        /// The page number.
        page: u64,
    },
}

#[derive(Debug, Default)]
struct SlotMeta {
    refs: AtomicU32,
    crc: AtomicU32,
}

#[derive(Debug, Default)]
struct Alloc {
    free: Vec<u32>,
    next: u32,
}

/// The process's swap file.
#[derive(Debug)]
pub(crate) struct Swap {
    file: File,
    /// For messages: the path, or where the unlinked file lives.
    name: String,
    /// A named file, truncated when the swap is dropped.
    named: bool,
    alloc: RankedMutex<Alloc>,
    meta: Box<[OnceLock<Box<[SlotMeta]>>]>,
    used: AtomicU64,
}

impl Swap {
    /// Opens the swap file: `path`, which must be new or empty, or an
    /// unlinked file in the temporary directory.
    pub(crate) fn open(path: Option<&Path>) -> Result<Self, SwapError> {
        let (file, name, named) = match path {
            Some(p) => (open_named(p)?, p.display().to_string(), true),
            None => {
                let dir = std::env::temp_dir();
                let name = format!("(unlinked, in {})", dir.display());
                let file = open_unlinked(&dir).map_err(|source| SwapError::Open {
                    path: name.clone(),
                    source,
                })?;
                (file, name, false)
            }
        };
        Ok(Self {
            file,
            name,
            named,
            alloc: RankedMutex::new(Rank::SwapSlots, Alloc::default()),
            meta: (0..MAX_SLOTS / CHUNK).map(|_| OnceLock::new()).collect(),
            used: AtomicU64::new(0),
        })
    }

    fn meta(&self, slot: u32) -> &SlotMeta {
        let chunk = self.meta[(slot / CHUNK) as usize]
            .get_or_init(|| (0..CHUNK).map(|_| SlotMeta::default()).collect());
        &chunk[(slot % CHUNK) as usize]
    }

    /// Slots in use.
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Writes `page` to a free slot and returns it, holding one reference.
    pub(crate) fn store(&self, page: &PageBuf) -> Result<u32, SwapError> {
        let slot = {
            let mut a = self.alloc.lock();
            match a.free.pop() {
                Some(s) => s,
                None if a.next < MAX_SLOTS => {
                    a.next += 1;
                    a.next - 1
                }
                None => return Err(SwapError::Full),
            }
        };
        if let Err(source) = self.file.write_all_at(page, offset(slot)) {
            self.alloc.lock().free.push(slot);
            return Err(self.io_error(slot, source));
        }
        let m = self.meta(slot);
        m.crc.store(crc32fast::hash(page), Ordering::Relaxed);
        m.refs.store(1, Ordering::Release);
        self.used.fetch_add(1, Ordering::Relaxed);
        Ok(slot)
    }

    /// Reads a used slot into `page`, checking its checksum.
    pub(crate) fn load(&self, slot: u32, page: &mut PageBuf) -> Result<(), SwapError> {
        debug_assert!(self.refs(slot) > 0, "reading free swap slot {slot}");
        self.file
            .read_exact_at(page, offset(slot))
            .map_err(|source| self.io_error(slot, source))?;
        if crc32fast::hash(page) != self.meta(slot).crc.load(Ordering::Acquire) {
            return Err(SwapError::Corrupt {
                slot,
                path: self.name.clone(),
            });
        }
        Ok(())
    }

    /// Counts one more entry naming `slot` (a fork copied it, or another
    /// VM's mapping of the same frame was swapped out with it).
    pub(crate) fn dup(&self, slot: u32) {
        let old = self.meta(slot).refs.fetch_add(1, Ordering::AcqRel);
        debug_assert!(old > 0, "dup of free swap slot {slot}");
    }

    /// Drops one reference to `slot`, freeing it after the last.
    pub(crate) fn put(&self, slot: u32) {
        let old = self.meta(slot).refs.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(old > 0, "put of free swap slot {slot}");
        if old != 1 {
            return;
        }
        if let Err(e) = crate::sys::punch_hole(self.file.as_fd(), offset(slot), PAGE_SIZE) {
            // The slot is rewritten before it is read again; only the disk
            // space stays in use.
            log::warn!("freeing swap slot {slot} of {}: {e}", self.name);
        }
        self.alloc.lock().free.push(slot);
        self.used.fetch_sub(1, Ordering::Relaxed);
    }

    /// Entries naming `slot`.
    pub(crate) fn refs(&self, slot: u32) -> u32 {
        self.meta(slot).refs.load(Ordering::Acquire)
    }

    /// Every used slot with its reference count (for audits).
    pub(crate) fn used_slots(&self) -> Vec<(u32, u32)> {
        let next = self.alloc.lock().next;
        (0..next)
            .map(|s| (s, self.refs(s)))
            .filter(|&(_, r)| r > 0)
            .collect()
    }

    fn io_error(&self, slot: u32, source: io::Error) -> SwapError {
        SwapError::Io {
            slot,
            path: self.name.clone(),
            source,
        }
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        if self.named {
            if let Err(e) = self.file.set_len(0) {
                log::warn!("emptying swap file {}: {e}", self.name);
            }
        }
    }
}

fn offset(slot: u32) -> u64 {
    u64::from(slot) * PAGE_SIZE
}

fn open_named(p: &Path) -> Result<File, SwapError> {
    let err = |source| SwapError::Open {
        path: p.display().to_string(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(p)
        .map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if !meta.file_type().is_file() {
        return Err(err(io::Error::other("not a regular file")));
    }
    if meta.len() != 0 {
        return Err(SwapError::NotEmpty(p.display().to_string()));
    }
    Ok(file)
}

/// Opens a new file in `dir` that has no name (`O_TMPFILE`, or a name
/// removed at once where the file system lacks it): gone when closed,
/// whatever happens to the process. Swap files and snapshot images in the
/// temporary directory are made with it.
pub fn open_unlinked(dir: &Path) -> io::Result<File> {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir)
    {
        Ok(f) => Ok(f),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            // No O_TMPFILE here: create a private name and unlink it.
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = dir.join(format!("vmm-unlinked-{}-{n}", std::process::id()));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            std::fs::remove_file(&path)?;
            Ok(f)
        }
        Err(e) => Err(e),
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_and_checked() {
        let swap = Swap::open(None).unwrap();
        let a = swap.store(&[1; 4096]).unwrap();
        let b = swap.store(&[2; 4096]).unwrap();
        assert_ne!(a, b);
        assert_eq!(swap.used(), 2);
        swap.dup(a);
        swap.put(a);
        let mut buf = [0; 4096];
        swap.load(a, &mut buf).unwrap();
        assert_eq!(buf, [1; 4096]);
        swap.put(a);
        assert_eq!(swap.used(), 1);
        let c = swap.store(&[3; 4096]).unwrap();
        assert_eq!(c, a, "a freed slot was not reused");
        swap.load(b, &mut buf).unwrap();
        assert_eq!(buf, [2; 4096]);
        assert_eq!(swap.used_slots(), vec![(a, 1), (b, 1)]);
    }

    #[test]
    fn a_damaged_slot_is_caught() {
        let swap = Swap::open(None).unwrap();
        let s = swap.store(&[7; 4096]).unwrap();
        swap.file.write_all_at(&[8], offset(s) + 100).unwrap();
        let mut buf = [0; 4096];
        assert!(matches!(
            swap.load(s, &mut buf),
            Err(SwapError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_named_file_must_be_new_or_empty_and_is_emptied_after() {
        let dir = std::env::temp_dir().join(format!("swap-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("swap");
        std::fs::write(&p, b"precious").unwrap();
        assert!(matches!(Swap::open(Some(&p)), Err(SwapError::NotEmpty(_))));
        assert_eq!(std::fs::read(&p).unwrap(), b"precious", "data was lost");
        std::fs::remove_file(&p).unwrap();
        {
            let swap = Swap::open(Some(&p)).unwrap();
            swap.store(&[1; 4096]).unwrap();
            assert_eq!(std::fs::metadata(&p).unwrap().len(), 4096);
        }
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
        assert!(matches!(
            Swap::open(Some(&dir)),
            Err(SwapError::Open { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
