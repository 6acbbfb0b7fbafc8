//! A VM's list of stores: the slots its entries name.
//!
//! A present entry names a store by slot index. Each slot counts the VM's
//! uses of it: entries naming it, plus frames claimed in it that are about
//! to become entries. A slot whose count falls to zero is emptied (unless it
//! is the VM's home slot) and its index reused, so a VM that forks and
//! writes for a long time keeps only the stores it really uses, not one per
//! fork.
//!
//! Counts change under the read lock (they are atomics); emptying or
//! filling a slot takes the write lock, so a reader holding the read lock
//! sees a slot's store stay put.

use std::sync::Arc;

use crate::store::Store;
use crate::sync::{AtomicU64, Ordering};

#[derive(Debug)]
struct Slot {
    store: Option<Arc<Store>>,
    uses: AtomicU64,
}

/// The stores of one VM, by slot.
#[derive(Debug, Default)]
pub(crate) struct StoreList {
    slots: Vec<Slot>,
}

impl StoreList {
    /// The store in slot `idx`.
    pub(crate) fn get(&self, idx: u32) -> Option<&Arc<Store>> {
        self.slots.get(idx as usize).and_then(|s| s.store.as_ref())
    }

    /// Slot indices, newest first.
    pub(crate) fn indices(&self) -> impl Iterator<Item = u32> + use<> {
        (0..self.slots.len() as u32).rev()
    }

    /// The filled slots.
    pub(crate) fn stores(&self) -> impl Iterator<Item = (u32, &Arc<Store>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.store.as_ref().map(|st| (i as u32, st)))
    }

    /// Claims a frame of the store in slot `idx` with `claim` (a 4 KiB or
    /// a huge one), counting a use for the entry that will map it.
    pub(crate) fn try_claim(&self, idx: u32, claim: impl FnOnce(&Store) -> bool) -> bool {
        let Some(slot) = self.slots.get(idx as usize) else {
            return false;
        };
        match &slot.store {
            Some(s) if claim(s) => {
                slot.uses.fetch_add(1, Ordering::AcqRel);
                true
            }
            _ => false,
        }
    }

    /// Counts `n` more uses of slot `idx` (entries copied by fork).
    pub(crate) fn hold_many(&self, idx: u32, n: u64) {
        self.slots[idx as usize].uses.fetch_add(n, Ordering::AcqRel);
    }

    /// Counts one use fewer; true if the slot is now unused.
    pub(crate) fn release(&self, idx: u32) -> bool {
        let old = self.slots[idx as usize].uses.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(old > 0, "slot {idx} released more than held");
        old == 1
    }

    /// Uses of slot `idx`.
    pub(crate) fn uses(&self, idx: u32) -> u64 {
        self.slots[idx as usize].uses.load(Ordering::Acquire)
    }

    /// The slot holding `store`, if one does.
    pub(crate) fn find(&self, store: &Arc<Store>) -> Option<u32> {
        self.stores()
            .find(|(_, s)| Arc::ptr_eq(s, store))
            .map(|(i, _)| i)
    }

    /// Puts `store` in an empty slot (or a new one); returns its index.
    pub(crate) fn insert(&mut self, store: Arc<Store>) -> u32 {
        let slot = Slot {
            store: Some(store),
            uses: AtomicU64::new(0),
        };
        match self.slots.iter().position(|s| s.store.is_none()) {
            Some(i) => {
                self.slots[i] = slot;
                i as u32
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Empties slot `idx` if nothing uses it and it is not `home`; returns
    /// the store it held.
    pub(crate) fn take_if_unused(&mut self, idx: u32, home: u32) -> Option<Arc<Store>> {
        let slot = self.slots.get_mut(idx as usize)?;
        if idx == home || slot.uses.load(Ordering::Acquire) != 0 {
            return None;
        }
        slot.store.take()
    }

    /// The same stores in the same slots, with no uses yet (for a child).
    pub(crate) fn share(&self) -> StoreList {
        StoreList {
            slots: self
                .slots
                .iter()
                .map(|s| Slot {
                    store: s.store.clone(),
                    uses: AtomicU64::new(0),
                })
                .collect(),
        }
    }

    /// Empties the list, returning the stores it held by slot.
    pub(crate) fn take_all(&mut self) -> Vec<Option<Arc<Store>>> {
        std::mem::take(&mut self.slots)
            .into_iter()
            .map(|s| s.store)
            .collect()
    }
}
