//! Where guest RAM lives in guest-physical space.
//!
//! RAM is a list of page-aligned ranges. Inside `memory` every RAM page has a
//! dense index, its *page number*: the ranges laid end to end. The page
//! number is the key of the stage-2 table, the page's offset in the host
//! mapping and the offset of its frame in a store:
//!
//! ```text
//!   guest-physical:  [0 ......... 3G)   hole   [4G ........ 4G+n)
//!   page number:     [0 ... 786432)            [786432 ... 786432+n/4K)
//!   host mapping:    base + page * 4K  (one contiguous reservation)
//! ```

use thiserror::Error;

/// Size of a small guest page and of a frame.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
/// Pages per leaf table and per huge (2 MiB) mapping.
#[cfg(not(loom))]
pub const PAGES_PER_LEAF: u64 = 512;
/// Pages per leaf table: tiny under the loom model checker, whose cost
/// grows with every atomic a walk touches.
#[cfg(loom)]
pub const PAGES_PER_LEAF: u64 = 4;

/// Errors in describing a layout.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    /// No RAM at all.
    #[error("guest RAM is empty")]
    Empty,
    /// A range that does not start or end on a page boundary.
    #[error("RAM range {gpa:#x}+{len:#x} is not 4 KiB aligned")]
    Unaligned {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
    },
    /// Ranges out of order, overlapping, or past the end of the address space.
    #[error("RAM ranges overlap, are unsorted or overflow the address space")]
    Overlap,
}

/// One contiguous range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Page number of the first page.
    pub first_page: u64,
}

impl RamRange {
    fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.len
    }
}

/// The guest RAM ranges of one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    ranges: Vec<RamRange>,
    pages: u64,
}

/// The runs [`Layout::split`] finds: (first page, offset in it, length).
/// A range crosses at most one hole in the common layouts, so two fit
/// without an allocation.
pub type Runs = smallvec::SmallVec<[(u64, u64, u64); 2]>;

impl Layout {
    /// Describes RAM as `(gpa, len)` ranges, sorted and disjoint.
    pub fn new(ranges: &[(u64, u64)]) -> Result<Self, LayoutError> {
        let mut out = Vec::with_capacity(ranges.len());
        let mut pages = 0u64;
        let mut end = 0u64;
        for &(gpa, len) in ranges.iter().filter(|(_, len)| *len > 0) {
            if gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
                return Err(LayoutError::Unaligned { gpa, len });
            }
            let range_end = gpa.checked_add(len).ok_or(LayoutError::Overlap)?;
            if gpa < end {
                return Err(LayoutError::Overlap);
            }
            out.push(RamRange {
                gpa,
                len,
                first_page: pages,
            });
            pages += len / PAGE_SIZE;
            end = range_end;
        }
        if out.is_empty() {
            return Err(LayoutError::Empty);
        }
        Ok(Self { ranges: out, pages })
    }

    /// The RAM ranges.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Number of RAM pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// The page number of the page holding `gpa`, if it is RAM.
    pub fn page_of(&self, gpa: u64) -> Option<u64> {
        self.ranges
            .iter()
            .find(|r| r.contains(gpa))
            .map(|r| r.first_page + (gpa - r.gpa) / PAGE_SIZE)
    }

    /// The guest-physical address of page number `page`.
    pub fn gpa_of(&self, page: u64) -> Option<u64> {
        self.ranges
            .iter()
            .find(|r| page >= r.first_page && page - r.first_page < r.len / PAGE_SIZE)
            .map(|r| r.gpa + (page - r.first_page) * PAGE_SIZE)
    }

    /// Whether `[gpa, gpa + len)` is RAM (it may span ranges only where they
    /// touch). A zero length is RAM if `gpa` is.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.split(gpa, len).is_some()
    }

    /// Splits `[gpa, gpa + len)` into runs of consecutive page numbers, each
    /// as (page number of the first byte, offset in that page, length).
    /// `None` if any byte is not RAM or the range overflows.
    pub fn split(&self, gpa: u64, len: u64) -> Option<Runs> {
        let end = gpa.checked_add(len)?;
        if len == 0 {
            return self
                .page_of(gpa)
                .map(|p| smallvec::smallvec![(p, gpa % PAGE_SIZE, 0)]);
        }
        let mut out = Runs::new();
        let mut at = gpa;
        while at < end {
            let r = self.ranges.iter().find(|r| r.contains(at))?;
            let run_end = end.min(r.gpa + r.len);
            out.push((
                r.first_page + (at - r.gpa) / PAGE_SIZE,
                at % PAGE_SIZE,
                run_end - at,
            ));
            at = run_end;
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> Layout {
        Layout::new(&[(0, 3 << 30), (4 << 30, 1 << 30)]).unwrap()
    }

    #[test]
    fn dense_page_numbers_skip_the_hole() {
        let l = two();
        assert_eq!(l.pages(), (4u64 << 30) / PAGE_SIZE);
        assert_eq!(l.page_of(0x1000), Some(1));
        assert_eq!(l.page_of(3 << 30), None);
        assert_eq!(l.page_of(4 << 30), Some((3u64 << 30) / PAGE_SIZE));
        assert_eq!(l.gpa_of((3u64 << 30) / PAGE_SIZE), Some(4 << 30));
        assert_eq!(l.gpa_of(l.pages()), None);
    }

    #[test]
    fn split_stops_at_holes_and_overflow() {
        let l = two();
        assert_eq!(l.split((3 << 30) - 8, 16), None);
        assert_eq!(l.split(u64::MAX - 2, 8), None);
        assert_eq!(
            l.split(0x1ff8, 16),
            Some(smallvec::smallvec![(1, 0xff8, 16)])
        );
        let touching = Layout::new(&[(0, 0x2000), (0x2000, 0x2000)]).unwrap();
        assert_eq!(
            touching.split(0x1000, 0x2000),
            Some(smallvec::smallvec![(1, 0, 0x1000), (2, 0, 0x1000)])
        );
    }

    #[test]
    fn bad_layouts_are_refused() {
        assert_eq!(Layout::new(&[]), Err(LayoutError::Empty));
        assert_eq!(
            Layout::new(&[(0x10, 0x1000)]),
            Err(LayoutError::Unaligned {
                gpa: 0x10,
                len: 0x1000
            })
        );
        assert_eq!(
            Layout::new(&[(0x2000, 0x1000), (0x1000, 0x2000)]),
            Err(LayoutError::Overlap)
        );
        assert_eq!(
            Layout::new(&[(u64::MAX - 0xfff, 0x2000)]),
            Err(LayoutError::Overlap)
        );
    }
}
