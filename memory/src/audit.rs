//! A full check of the memory model's invariants, for tests and debugging.
//!
//! Call it only when nothing else runs on the VMs involved: counts are
//! exact only at rest (a fault or pin in flight holds a transient
//! reference).

use std::collections::HashMap;
use std::sync::Arc;

use crate::Context;
use crate::entry::Entry;
use crate::layout::PAGES_PER_LEAF;
use crate::vm::VmMemory;

/// Checks, over every live store of `ctx` and the tables of `vms` (which
/// must be every live VM of `ctx`):
/// - R1: a present, writable entry maps an exclusive frame;
/// - R4: a pinned frame is exclusive;
/// - each frame's mapcount equals the entries mapping it, and its
///   refcount equals mapcount + pincount; for a huge frame, each page's
///   mapcount counts the small entries mapping that page, the head's
///   count of huge entries the huge ones, and the frame's refcount equals
///   all of those plus its pincount; a writable or pinned huge entry's
///   frame is exclusive;
/// - each used swap slot's reference count equals the entries naming it,
///   and no entry names a free slot;
/// - each snapshot image area counts the entries naming it, and no entry
///   names an area that is not registered;
/// - the context's counters (resident, shared, pins, swapped) match.
///
/// Returns a description of the first violation found.
pub fn audit(ctx: &Context, vms: &[&VmMemory]) -> Result<(), String> {
    // (store address, page) -> entries mapping it.
    let mut mapped: HashMap<(usize, u64), u32> = HashMap::new();
    // (store address, head page) -> huge entries mapping it.
    let mut huge: HashMap<(usize, u64), u32> = HashMap::new();
    // swap slot -> entries naming it.
    let mut slots: HashMap<u32, u32> = HashMap::new();
    // snapshot image area -> entries naming it.
    let mut images: HashMap<usize, u64> = HashMap::new();
    for vm in vms {
        let stores = vm.stores.read();
        let mut uses: HashMap<u32, u64> = HashMap::new();
        // The store an entry (`what`, for messages) names, counting a use
        // of its slot; and R1 for a writable entry.
        let mut named = |store: u32, what: &dyn Fn() -> String| {
            let s = stores.get(store).ok_or_else(|| {
                format!(
                    "vm {}: {} names slot {store}, which is empty",
                    vm.id(),
                    what()
                )
            })?;
            *uses.entry(store).or_default() += 1;
            Ok::<_, String>(s)
        };
        let r1 = |exclusive: bool, what: &dyn Fn() -> String| {
            if exclusive {
                return Ok(());
            }
            Err(format!(
                "R1: vm {} {} writable but not exclusive",
                vm.id(),
                what()
            ))
        };
        for (first, leaf) in vm.table.leaves() {
            if let Some(Entry::Present {
                store, writable, ..
            }) = leaf.huge()
            {
                let what = || format!("huge entry {first:#x}");
                let s = named(store, &what)?;
                let head = s.slot(first);
                if !head.is_head() {
                    return Err(format!(
                        "vm {}: huge entry {first:#x} maps a frame that is not huge",
                        vm.id()
                    ));
                }
                if writable {
                    r1(head.exclusive(), &what)?;
                }
                *huge.entry((Arc::as_ptr(s) as usize, first)).or_default() += 1;
                continue;
            }
            for p in first..(first + PAGES_PER_LEAF).min(vm.table.pages()) {
                let (store, writable) = match leaf.peek(p) {
                    Entry::Present {
                        store, writable, ..
                    } => (store, writable),
                    // It keeps the old frame mapped until it is restored.
                    Entry::Migration { store, .. } => (store, false),
                    Entry::Swap { slot, .. } => match crate::image::split_slot(slot) {
                        (0, _) => {
                            *slots.entry(slot).or_default() += 1;
                            continue;
                        }
                        (area, _) => {
                            *images.entry(area).or_default() += 1;
                            continue;
                        }
                    },
                    _ => continue,
                };
                let what = || format!("page {p:#x}");
                let s = named(store, &what)?;
                if writable {
                    r1(s.meta(p).exclusive(), &what)?;
                }
                *mapped.entry((Arc::as_ptr(s) as usize, p)).or_default() += 1;
            }
        }
        for (idx, _) in stores.stores() {
            let (counted, entries) = (stores.uses(idx), uses.get(&idx).copied().unwrap_or(0));
            if counted != entries {
                return Err(format!(
                    "vm {}: slot {idx} counts {counted} uses, {entries} entries name it",
                    vm.id()
                ));
            }
        }
    }
    let (mut resident, mut shared, mut pins) = (0u64, 0u64, 0u64);
    for store in ctx.live_stores() {
        for (p, meta) in store.frames() {
            if meta.is_head() {
                let (r, s, n) = audit_huge(&store, p, &mut mapped, &mut huge)?;
                resident += PAGES_PER_LEAF;
                shared += s;
                pins += u64::from(n);
                debug_assert!(r > 0);
                continue;
            }
            let key = (Arc::as_ptr(&store) as usize, p);
            let entries = mapped.remove(&key).unwrap_or(0);
            let (r, m, n) = (meta.refcount(), meta.mapcount(), meta.pincount());
            if m != entries {
                return Err(format!(
                    "frame {p:#x}: mapcount {m}, but {entries} entries map it"
                ));
            }
            if r != m + n {
                return Err(format!(
                    "frame {p:#x}: refcount {r} != mapcount {m} + pincount {n}"
                ));
            }
            if n > 0 && !meta.exclusive() {
                return Err(format!("R4: frame {p:#x} pinned but not exclusive"));
            }
            resident += 1;
            shared += u64::from(m >= 2);
            pins += u64::from(n);
        }
    }
    if let Some(((_, p), n)) = huge.into_iter().next() {
        return Err(format!(
            "{n} huge entries map page {p:#x} of a free frame or a dead store"
        ));
    }
    if let Some(((_, p), n)) = mapped.into_iter().next() {
        return Err(format!(
            "{n} entries map page {p:#x} of a free frame or a dead store"
        ));
    }
    let used = ctx.swap().map(|s| s.used_slots()).unwrap_or_default();
    for &(slot, refs) in &used {
        let entries = slots.remove(&slot).unwrap_or(0);
        if refs != entries {
            return Err(format!(
                "swap slot {slot}: {refs} references, {entries} entries name it"
            ));
        }
    }
    if let Some((slot, n)) = slots.into_iter().next() {
        return Err(format!("{n} entries name free swap slot {slot}"));
    }
    for (area, refs) in ctx.image_areas() {
        let entries = images.remove(&area).unwrap_or(0);
        if refs != entries {
            return Err(format!(
                "image area {area}: {refs} references, {entries} entries name it"
            ));
        }
    }
    if let Some((area, n)) = images.into_iter().next() {
        return Err(format!("{n} entries name unregistered image area {area}"));
    }
    let s = ctx.stats();
    if s.swapped != used.len() as u64 {
        return Err(format!(
            "counter swapped {}, but {} slots are used",
            s.swapped,
            used.len()
        ));
    }
    if (s.resident, s.shared, s.pins) != (resident, shared, pins) {
        return Err(format!(
            "counters resident {}, shared {}, pins {}; frames say {resident}, {shared}, {pins}",
            s.resident, s.shared, s.pins
        ));
    }
    Ok(())
}

type Counts = HashMap<(usize, u64), u32>;

/// Checks the huge frame at `first`, consuming the entries found mapping
/// it; returns its refcount, its pages mapped more than once, and its
/// pincount.
fn audit_huge(
    store: &Arc<crate::store::Store>,
    first: u64,
    mapped: &mut Counts,
    huge: &mut Counts,
) -> Result<(u32, u64, u32), String> {
    let at = Arc::as_ptr(store) as usize;
    let head = store.slot(first);
    let entire = huge.remove(&(at, first)).unwrap_or(0);
    if head.entire() != entire {
        return Err(format!(
            "huge frame {first:#x}: {} huge mappings counted, {entire} entries",
            head.entire()
        ));
    }
    let (mut small, mut shared) = (0u32, 0u64);
    for p in first..first + PAGES_PER_LEAF {
        let own = store.slot(p);
        if p != first && !own.is_tail() {
            return Err(format!(
                "huge frame {first:#x}: page {p:#x} is not its tail"
            ));
        }
        let entries = mapped.remove(&(at, p)).unwrap_or(0);
        if own.mapcount() != entries {
            return Err(format!(
                "huge frame {first:#x}: page {p:#x} mapcount {}, but {entries} entries map it",
                own.mapcount()
            ));
        }
        small += entries;
        shared += u64::from(entries + entire >= 2);
    }
    let (r, n) = (head.refcount(), head.pincount());
    if r != small + entire + n {
        return Err(format!(
            "huge frame {first:#x}: refcount {r} != {small} small + {entire} huge mappings \
             + pincount {n}"
        ));
    }
    if n > 0 && entire > 0 && !head.exclusive() {
        return Err(format!(
            "R4: huge frame {first:#x} pinned but not exclusive"
        ));
    }
    Ok((r, shared, n))
}
