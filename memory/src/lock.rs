//! Locks that carry a rank, so the crate's lock order is checked, not just
//! written down.
//!
//! The order (outermost first) is the order of [`Rank`]'s variants. A thread
//! may take a lock only while every lock it already holds has a lower rank;
//! debug builds assert this on every acquisition, release builds compile the
//! check away.

use crate::sync::{self, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::ops::{Deref, DerefMut};

/// Lock ranks, outermost first. See the crate documentation for what each
/// lock protects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Rank {
    /// A VM's memory-map lock (Linux's `mmap_lock`).
    MapLock,
    /// The memory-map lock of the second VM of a two-VM operation, taken
    /// after the first's: the child being created by fork, or the origin a
    /// VM is reset to.
    ChildMapLock,
    /// A stage-2 leaf table lock (Linux's page-table lock).
    Table,
    /// The second VM's leaf table lock (fork's child, reset's origin),
    /// taken after the first's.
    ChildTable,
    /// A VM's list of frame stores.
    Stores,
    /// A store's reverse map: which VMs may map its frames.
    Rmap,
    /// The context's registry of live VMs.
    Registry,
    /// A VM's record of writes to protected pages.
    WpEvents,
    /// The swap file's slot allocator.
    SwapSlots,
    /// The context's table of snapshot image areas.
    Images,
    /// A VM's record of pages the VMM wrote (see `dirty.rs`).
    VmmWrites,
    /// A table's record of changed entries while a live snapshot arms its
    /// protection (see `table.rs`); taken under any other lock, as entries
    /// are set under many.
    Changes,
}

#[cfg(debug_assertions)]
mod held {
    use super::Rank;
    use std::cell::RefCell;

    thread_local! {
        static HELD: RefCell<Vec<Rank>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn acquire(rank: Rank) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(max) = h.iter().max() {
                assert!(
                    *max < rank,
                    "lock order violated: taking {rank:?} while holding {max:?}"
                );
            }
            h.push(rank);
        });
    }

    pub(super) fn release(rank: Rank) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(i) = h.iter().rposition(|r| *r == rank) {
                h.remove(i);
            }
        });
    }

    pub(super) fn holds(rank: Rank) -> bool {
        HELD.with(|h| h.borrow().contains(&rank))
    }
}

#[cfg(not(debug_assertions))]
mod held {
    use super::Rank;
    pub(super) fn acquire(_: Rank) {}
    pub(super) fn release(_: Rank) {}
    pub(super) fn holds(_: Rank) -> bool {
        true
    }
}

/// Asserts (in debug builds) that the calling thread holds a lock of `rank`.
pub(crate) fn assert_held(rank: Rank) {
    debug_assert!(held::holds(rank), "{rank:?} must be held here");
}

/// Asserts (in debug builds) that the calling thread holds a lock of one
/// of `ranks`.
pub(crate) fn assert_held_any(ranks: &[Rank]) {
    debug_assert!(
        ranks.iter().any(|r| held::holds(*r)),
        "one of {ranks:?} must be held here"
    );
}

/// Records one held rank; releases it when dropped.
#[derive(Debug)]
struct Token(Rank);

impl Token {
    fn new(rank: Rank) -> Self {
        held::acquire(rank);
        Token(rank)
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        held::release(self.0);
    }
}

/// A mutex with a rank.
#[derive(Debug)]
pub(crate) struct RankedMutex<T> {
    rank: Rank,
    inner: Mutex<T>,
}

impl<T> RankedMutex<T> {
    pub(crate) fn new(rank: Rank, value: T) -> Self {
        Self {
            rank,
            inner: Mutex::new(value),
        }
    }

    pub(crate) fn lock(&self) -> Guard<MutexGuard<'_, T>> {
        self.lock_as(self.rank)
    }

    /// Locks under another rank: used where one lock type plays two roles
    /// (a parent's and a child's table during fork).
    pub(crate) fn lock_as(&self, rank: Rank) -> Guard<MutexGuard<'_, T>> {
        let token = Token::new(rank);
        Guard {
            inner: sync::lock(&self.inner),
            _token: token,
        }
    }
}

/// A reader-writer lock with a rank.
#[derive(Debug)]
pub(crate) struct RankedRwLock<T> {
    rank: Rank,
    inner: RwLock<T>,
}

impl<T> RankedRwLock<T> {
    pub(crate) fn new(rank: Rank, value: T) -> Self {
        Self {
            rank,
            inner: RwLock::new(value),
        }
    }

    pub(crate) fn read(&self) -> Guard<RwLockReadGuard<'_, T>> {
        self.read_as(self.rank)
    }

    /// Reads under another rank (see [`RankedMutex::lock_as`]).
    pub(crate) fn read_as(&self, rank: Rank) -> Guard<RwLockReadGuard<'_, T>> {
        let token = Token::new(rank);
        Guard {
            inner: sync::read(&self.inner),
            _token: token,
        }
    }

    pub(crate) fn write(&self) -> Guard<RwLockWriteGuard<'_, T>> {
        self.write_as(self.rank)
    }

    pub(crate) fn write_as(&self, rank: Rank) -> Guard<RwLockWriteGuard<'_, T>> {
        let token = Token::new(rank);
        Guard {
            inner: sync::write(&self.inner),
            _token: token,
        }
    }
}

/// A held ranked lock. The rank is released after the lock itself.
#[derive(Debug)]
pub(crate) struct Guard<G> {
    inner: G,
    _token: Token,
}

impl<G: Deref> Deref for Guard<G> {
    type Target = G::Target;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl<G: DerefMut> DerefMut for Guard<G> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

#[cfg(all(test, debug_assertions, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn in_order_is_allowed() {
        let a = RankedRwLock::new(Rank::MapLock, ());
        let b = RankedMutex::new(Rank::Table, ());
        let _a = a.read();
        let _b = b.lock();
        assert_held(Rank::Table);
    }

    #[test]
    #[should_panic(expected = "lock order violated")]
    fn out_of_order_panics() {
        let a = RankedRwLock::new(Rank::MapLock, ());
        let b = RankedMutex::new(Rank::Table, ());
        let _b = b.lock();
        let _a = a.read();
    }

    #[test]
    #[should_panic(expected = "lock order violated")]
    fn same_rank_twice_panics() {
        let a = RankedMutex::new(Rank::Table, ());
        let b = RankedMutex::new(Rank::Table, ());
        let _a = a.lock();
        let _b = b.lock();
    }
}
