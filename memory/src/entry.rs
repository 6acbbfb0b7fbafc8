//! Stage-2 entries: what one guest page of one VM maps to.
//!
//! An entry packs into a `u64` so a leaf table is an array of atomics that
//! the lockless pin path can read without a lock:
//!
//! ```text
//!  63                32 31       9 8   7 6 5 4 3 2   0
//! +--------------------+----------+-----+-+-+-+-+-----+
//! | store index / slot | reserved | mig |s|x|p|w|kind |
//! +--------------------+----------+-----+-+-+-+-+-----+
//!   kind: 0 none, 1 present, 2 swap, 3 migration, 4 marker
//!   w: writable (present)         p: write-protect armed (all but none)
//!   x: exclusive (swap)           s: soft-dirty (present)
//!   mig: migration kind (0 read, 1 read-exclusive, 2 write)
//! ```
//!
//! A present entry names a *store* by its index in the VM's store list; the
//! frame inside that store is always the one at the entry's own page number
//! (see [`crate::store`]), so no frame number is stored.

/// How a migration entry was made, which decides how it is restored
/// (MEMORY-MODEL.md R15).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationKind {
    /// The frame may be shared: restore read-only, not exclusive.
    Read,
    /// The frame was exclusive but mapped read-only: restore read-only, exclusive.
    ReadExclusive,
    /// The frame was mapped writable (and so exclusive): restore writable.
    Write,
}

/// One stage-2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Entry {
    /// Nothing mapped; the next touch reads zeros.
    #[default]
    None,
    /// A frame is mapped.
    Present {
        /// Index of the frame's store in the VM's store list.
        store: u32,
        /// The guest may write without a fault. Implies the frame is
        /// exclusive (R1).
        writable: bool,
        /// A write listener protects this page (never writable then).
        wp: bool,
        /// Written since soft-dirty tracking last cleared it.
        soft_dirty: bool,
    },
    /// The page is in swap.
    Swap {
        /// Swap slot.
        slot: u32,
        /// The frame was exclusive when it was swapped out (R13).
        exclusive: bool,
        /// A write listener protects this page.
        wp: bool,
    },
    /// The page's frame is being moved to a new one.
    Migration {
        /// Index of the old frame's store.
        store: u32,
        /// How to restore it.
        kind: MigrationKind,
        /// A write listener protects this page.
        wp: bool,
    },
    /// Nothing mapped, but a write listener's protection is kept.
    Marker {
        /// A write listener protects this page.
        wp: bool,
    },
}

const KIND_MASK: u64 = 0b111;
const KIND_PRESENT: u64 = 1;
const KIND_SWAP: u64 = 2;
const KIND_MIGRATION: u64 = 3;
const KIND_MARKER: u64 = 4;
const WRITABLE: u64 = 1 << 3;
const WP: u64 = 1 << 4;
const EXCLUSIVE: u64 = 1 << 5;
const SOFT_DIRTY: u64 = 1 << 6;
const MIG_SHIFT: u32 = 7;
const INDEX_SHIFT: u32 = 32;

fn flag(set: bool, bit: u64) -> u64 {
    if set { bit } else { 0 }
}

impl Entry {
    /// Packs the entry into its table representation.
    pub fn pack(self) -> u64 {
        match self {
            Entry::None => 0,
            Entry::Present {
                store,
                writable,
                wp,
                soft_dirty,
            } => {
                KIND_PRESENT
                    | flag(writable, WRITABLE)
                    | flag(wp, WP)
                    | flag(soft_dirty, SOFT_DIRTY)
                    | (u64::from(store) << INDEX_SHIFT)
            }
            Entry::Swap {
                slot,
                exclusive,
                wp,
            } => {
                KIND_SWAP
                    | flag(exclusive, EXCLUSIVE)
                    | flag(wp, WP)
                    | (u64::from(slot) << INDEX_SHIFT)
            }
            Entry::Migration { store, kind, wp } => {
                let k = match kind {
                    MigrationKind::Read => 0,
                    MigrationKind::ReadExclusive => 1,
                    MigrationKind::Write => 2,
                };
                KIND_MIGRATION | (k << MIG_SHIFT) | flag(wp, WP) | (u64::from(store) << INDEX_SHIFT)
            }
            Entry::Marker { wp } => KIND_MARKER | flag(wp, WP),
        }
    }

    /// Unpacks a table value. Values this module never produces read as
    /// [`Entry::None`]; tables only ever hold packed entries.
    pub fn unpack(raw: u64) -> Self {
        let index = (raw >> INDEX_SHIFT) as u32;
        let wp = raw & WP != 0;
        match raw & KIND_MASK {
            KIND_PRESENT => Entry::Present {
                store: index,
                writable: raw & WRITABLE != 0,
                wp,
                soft_dirty: raw & SOFT_DIRTY != 0,
            },
            KIND_SWAP => Entry::Swap {
                slot: index,
                exclusive: raw & EXCLUSIVE != 0,
                wp,
            },
            KIND_MIGRATION => Entry::Migration {
                store: index,
                kind: match (raw >> MIG_SHIFT) & 0b11 {
                    0 => MigrationKind::Read,
                    1 => MigrationKind::ReadExclusive,
                    _ => MigrationKind::Write,
                },
                wp,
            },
            KIND_MARKER => Entry::Marker { wp },
            _ => Entry::None,
        }
    }

    /// Whether a packed entry is present and writable, without unpacking
    /// it.
    pub(crate) fn raw_is_writable(raw: u64) -> bool {
        raw & (KIND_MASK | WRITABLE) == KIND_PRESENT | WRITABLE
    }

    /// The store of a packed present entry and whether it is writable,
    /// without unpacking it; None if it is not present.
    pub(crate) fn raw_present(raw: u64) -> Option<(u32, bool)> {
        (raw & KIND_MASK == KIND_PRESENT)
            .then_some(((raw >> INDEX_SHIFT) as u32, raw & WRITABLE != 0))
    }

    /// Whether a packed entry is present, without unpacking it.
    pub(crate) fn raw_is_present(raw: u64) -> bool {
        raw & KIND_MASK == KIND_PRESENT
    }

    /// A present, read-only, unprotected entry for a frame of `store`.
    pub fn read_only(store: u32, soft_dirty: bool) -> Self {
        Entry::Present {
            store,
            writable: false,
            wp: false,
            soft_dirty,
        }
    }

    /// A present, writable, unprotected entry for a frame of `store`.
    pub fn writable(store: u32) -> Self {
        Entry::Present {
            store,
            writable: true,
            wp: false,
            soft_dirty: true,
        }
    }

    /// The store index of a present entry.
    pub fn present_store(self) -> Option<u32> {
        match self {
            Entry::Present { store, .. } => Some(store),
            _ => None,
        }
    }

    /// Whether the page has contents: present, in swap or being moved.
    pub(crate) fn has_contents(self) -> bool {
        !matches!(self, Entry::None | Entry::Marker { .. })
    }

    /// The entry with its write-protect bit set to `on`, read-only if
    /// protected; an entry without contents is returned as it is.
    pub(crate) fn with_wp(self, on: bool) -> Entry {
        match self {
            Entry::Present {
                store,
                writable,
                soft_dirty,
                ..
            } => Entry::Present {
                store,
                writable: writable && !on,
                wp: on,
                soft_dirty,
            },
            Entry::Swap {
                slot, exclusive, ..
            } => Entry::Swap {
                slot,
                exclusive,
                wp: on,
            },
            Entry::Migration { store, kind, .. } => Entry::Migration {
                store,
                kind,
                wp: on,
            },
            Entry::None | Entry::Marker { .. } => self,
        }
    }

    /// Whether a write listener protects the page.
    pub fn wp(self) -> bool {
        match self {
            Entry::None => false,
            Entry::Present { wp, .. }
            | Entry::Swap { wp, .. }
            | Entry::Migration { wp, .. }
            | Entry::Marker { wp } => wp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            Just(Entry::None),
            (any::<u32>(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
                |(store, writable, wp, soft_dirty)| Entry::Present {
                    store,
                    writable,
                    wp,
                    soft_dirty
                }
            ),
            (any::<u32>(), any::<bool>(), any::<bool>()).prop_map(|(slot, exclusive, wp)| {
                Entry::Swap {
                    slot,
                    exclusive,
                    wp,
                }
            }),
            (any::<u32>(), 0..3u8, any::<bool>()).prop_map(|(store, k, wp)| Entry::Migration {
                store,
                kind: [
                    MigrationKind::Read,
                    MigrationKind::ReadExclusive,
                    MigrationKind::Write
                ][k as usize],
                wp
            }),
            any::<bool>().prop_map(|wp| Entry::Marker { wp }),
        ]
    }

    proptest! {
        #[test]
        fn pack_roundtrips(e in any_entry()) {
            prop_assert_eq!(Entry::unpack(e.pack()), e);
        }
    }

    #[test]
    fn none_is_zero() {
        assert_eq!(Entry::None.pack(), 0);
        assert_eq!(Entry::unpack(0), Entry::None);
    }
}
