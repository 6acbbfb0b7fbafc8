//! Random sequences of guest and device operations over several VMs,
//! against a reference model of what each VM and each pin must read.
//!
//! The model knows nothing of sharing: a fork copies every value, a pin
//! names a cell that the pinning VM keeps seeing until it discards the page
//! or ends. The implementation shares frames copy-on-write, swaps them out,
//! migrates and compacts them; none of that may change what anyone reads.
//! After every step it must read exactly what the model reads, each frame
//! must carry the pins the model says, listener protection must be where
//! the model says, and `memory::audit` must find every invariant intact
//! (R1, R4, exact counts, swap slot references and counters).
//!
//! Listener write-protect is modelled by its contract: the first write to
//! a protected page (by the VMM or through a new write pin) is reported
//! once, before it lands, and lifts the protection; protecting a page a
//! device may write through a pin reports it at once and leaves it
//! unprotected; protection survives swap-out, migration, compaction and
//! discard; a forked child does not inherit it. Half of the cases use a
//! synchronous listener (which also sees the byte before the write), the
//! other half the asynchronous record.

use std::sync::{Arc, Mutex};

use memory::{
    Config, Context, Entry, FrameInfo, Layout, Pin, PinFlags, StatsSnapshot, VmMemory,
    WriteListener, audit,
};
use proptest::prelude::*;

/// Pages the operations touch: both sides of a leaf boundary.
const PAGES: [u64; 6] = [0, 1, 2, 511, 512, 513];
const MAX_VMS: usize = 5;
const MAX_PINS: usize = 8;
const PAGE_SIZE: u64 = 4096;
/// Where in its page each cell lives.
const OFF: u64 = 0x80;

/// One step. `Protect`/`Unprotect` are `mprotect`-like (read-only, no
/// listener involved); `ListenerProtect`/`ListenerUnprotect` arm and lift
/// write protection for the VM's listener; `Compact` compacts every VM,
/// one page each or (`all`) everything there is.
#[derive(Clone, Debug)]
enum Op {
    Write { vm: usize, page: usize, val: u8 },
    Read { vm: usize, page: usize },
    Fork { vm: usize },
    Exit { vm: usize },
    Pin { vm: usize, page: usize, write: bool },
    Unpin { pin: usize },
    PinRead { pin: usize },
    PinWrite { pin: usize, val: u8 },
    Discard { vm: usize, page: usize },
    Unshare { vm: usize, page: usize },
    Protect { vm: usize, page: usize },
    Unprotect { vm: usize, page: usize },
    SwapOut { vm: usize, page: usize },
    Migrate { vm: usize, page: usize },
    Compact { all: bool },
    ListenerProtect { vm: usize, page: usize },
    ListenerUnprotect { vm: usize, page: usize },
}

/// An operation on one page of one VM.
fn at(f: fn(usize, usize) -> Op) -> impl Strategy<Value = Op> {
    (0..MAX_VMS, 0..PAGES.len()).prop_map(move |(vm, page)| f(vm, page))
}

fn op() -> impl Strategy<Value = Op> {
    let vm = 0..MAX_VMS;
    let page = 0..PAGES.len();
    let pin = 0..MAX_PINS;
    prop_oneof![
        4 => (vm.clone(), page.clone(), 1..=255u8).prop_map(|(vm, page, val)| Op::Write { vm, page, val }),
        2 => at(|vm, page| Op::Read { vm, page }),
        2 => vm.clone().prop_map(|vm| Op::Fork { vm }),
        1 => vm.clone().prop_map(|vm| Op::Exit { vm }),
        2 => (vm, page, any::<bool>()).prop_map(|(vm, page, write)| Op::Pin { vm, page, write }),
        1 => pin.clone().prop_map(|pin| Op::Unpin { pin }),
        2 => pin.clone().prop_map(|pin| Op::PinRead { pin }),
        1 => (pin, 1..=255u8).prop_map(|(pin, val)| Op::PinWrite { pin, val }),
        1 => at(|vm, page| Op::Discard { vm, page }),
        1 => at(|vm, page| Op::Unshare { vm, page }),
        1 => at(|vm, page| Op::Protect { vm, page }),
        1 => at(|vm, page| Op::Unprotect { vm, page }),
        2 => at(|vm, page| Op::SwapOut { vm, page }),
        2 => at(|vm, page| Op::Migrate { vm, page }),
        1 => any::<bool>().prop_map(|all| Op::Compact { all }),
        2 => at(|vm, page| Op::ListenerProtect { vm, page }),
        1 => at(|vm, page| Op::ListenerUnprotect { vm, page }),
    ]
}

/// A listener event: (VM id, page address, the byte at `OFF` before the
/// write).
type Heard = (u64, u64, u8);

/// One page of a VM in the model.
#[derive(Clone, Copy, Debug)]
struct Page {
    cell: usize,
    /// Write-protected for the listener.
    watched: bool,
}

struct ModelVm {
    id: u64,
    pages: Vec<Page>,
}

/// The reference: cells of bytes; a VM maps each page to a cell.
struct Model {
    cells: Vec<u8>,
    vms: Vec<ModelVm>,
    /// (cell, write pin)
    pins: Vec<(usize, bool)>,
    /// What the listeners must hear of during the current step.
    heard: Vec<Heard>,
}

impl Model {
    fn cell(&mut self, val: u8) -> usize {
        self.cells.push(val);
        self.cells.len() - 1
    }

    fn add_vm(&mut self, id: u64, values: &[u8]) {
        let pages = values
            .iter()
            .map(|&v| Page {
                cell: self.cell(v),
                watched: false,
            })
            .collect();
        self.vms.push(ModelVm { id, pages });
    }

    fn page(&self, vm: usize, page: usize) -> Page {
        self.vms[vm].pages[page]
    }

    fn page_mut(&mut self, vm: usize, page: usize) -> &mut Page {
        &mut self.vms[vm].pages[page]
    }

    fn value(&self, vm: usize, page: usize) -> u8 {
        self.cells[self.page(vm, page).cell]
    }

    fn values(&self, vm: usize) -> Vec<u8> {
        (0..PAGES.len()).map(|p| self.value(vm, p)).collect()
    }

    /// Pins on the frame the VM maps at `page`.
    fn pins_on(&self, vm: usize, page: usize) -> u32 {
        let cell = self.page(vm, page).cell;
        self.pins.iter().filter(|p| p.0 == cell).count() as u32
    }

    fn write_pinned(&self, vm: usize, page: usize) -> bool {
        let cell = self.page(vm, page).cell;
        self.pins.iter().any(|&(c, write)| write && c == cell)
    }

    /// The listener hears of the page as it is now.
    fn hear(&mut self, vm: usize, page: usize) {
        let event = (
            self.vms[vm].id,
            PAGES[page] * PAGE_SIZE,
            self.value(vm, page),
        );
        self.heard.push(event);
    }

    /// A write is about to reach `page`: the first one after protection
    /// is reported and lifts it.
    fn before_write(&mut self, vm: usize, page: usize) {
        if self.page(vm, page).watched {
            self.hear(vm, page);
            self.page_mut(vm, page).watched = false;
        }
    }
}

/// A synchronous listener that notes what each page held before its write.
#[derive(Default)]
struct Recorder {
    heard: Mutex<Vec<Heard>>,
}

impl WriteListener for Recorder {
    fn before_write(&self, vm: &VmMemory, gpa: u64) {
        let mut b = [0u8];
        vm.read(gpa + OFF, &mut b).unwrap();
        self.heard.lock().unwrap().push((vm.id(), gpa, b[0]));
    }
}

struct Real {
    ctx: Arc<Context>,
    vms: Vec<Arc<VmMemory>>,
    pins: Vec<Pin>,
    /// The synchronous listener every VM has; none: writes are recorded.
    listener: Option<Arc<Recorder>>,
}

impl Real {
    fn add_vm(&mut self, vm: Arc<VmMemory>) {
        if let Some(l) = &self.listener {
            vm.set_write_listener(Some(l.clone()));
        }
        self.vms.push(vm);
    }

    fn vm_by_id(&self, id: u64) -> &VmMemory {
        self.vms.iter().find(|v| v.id() == id).expect("a live VM")
    }

    /// What the listeners heard since the last call; the byte before the
    /// write only from the synchronous one.
    fn heard(&self) -> Vec<(u64, u64, Option<u8>)> {
        match &self.listener {
            Some(l) => std::mem::take(&mut *l.heard.lock().unwrap())
                .into_iter()
                .map(|(id, gpa, b)| (id, gpa, Some(b)))
                .collect(),
            None => self
                .vms
                .iter()
                .flat_map(|vm| {
                    let id = vm.id();
                    let events = vm.take_write_events(usize::MAX);
                    events.into_iter().map(move |gpa| (id, gpa, None))
                })
                .collect(),
        }
    }
}

fn page_gpa(page: usize) -> u64 {
    PAGES[page] * PAGE_SIZE
}

fn gpa(page: usize) -> u64 {
    page_gpa(page) + OFF
}

fn read(vm: &VmMemory, page: usize) -> u8 {
    let mut b = [0u8];
    vm.read(gpa(page), &mut b).unwrap();
    b[0]
}

fn entry(vm: &VmMemory, page: usize) -> Entry {
    vm.entry(gpa(page)).expect("RAM")
}

/// A page's entry and frame, before an operation that may move it.
#[derive(Debug)]
struct Seen {
    entry: Entry,
    frame: Option<FrameInfo>,
    /// Ids of the VMs mapping the same frame, sorted.
    mappers: Vec<u64>,
}

impl Seen {
    fn of(vm: &VmMemory, page: usize) -> Self {
        let mut mappers: Vec<u64> = vm
            .frame_mappers(gpa(page))
            .into_iter()
            .map(|m| m.0)
            .collect();
        mappers.sort_unstable();
        Self {
            entry: entry(vm, page),
            frame: vm.frame_info(gpa(page)),
            mappers,
        }
    }

    /// What swap-out or migration of the page must do: (moved, skipped as
    /// pinned). Only a present frame moves, and only if no pin holds it.
    fn expected_move(&self, m: &Model, vm: usize, page: usize) -> (u64, u64) {
        match self.entry {
            Entry::Present { .. } if m.pins_on(vm, page) > 0 => (0, 1),
            Entry::Present { .. } => (1, 0),
            _ => (0, 0),
        }
    }

    /// A page that did not move is exactly as it was.
    fn unchanged(&self, vm: &VmMemory, page: usize, how: Move) {
        let now = Self::of(vm, page);
        assert_eq!(
            (now.entry, now.frame),
            (self.entry, self.frame),
            "{how:?} changed a page it did not move"
        );
    }
}

/// Swap-out or migration of one page, for [`move_page`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Move {
    SwapOut,
    Migrate,
}

impl Move {
    /// Acts on the page at `gpa`: (pages moved, pages skipped as pinned).
    fn act(self, v: &VmMemory, gpa: u64) -> (u64, u64) {
        match self {
            Move::SwapOut => {
                let r = v.swap_out(gpa, PAGE_SIZE).unwrap();
                (r.swapped, r.pinned)
            }
            Move::Migrate => {
                let r = v.migrate(gpa, PAGE_SIZE).unwrap();
                (r.moved, r.pinned)
            }
        }
    }

    /// The counter of pages moved.
    fn counter(self, s: &StatsSnapshot) -> u64 {
        match self {
            Move::SwapOut => s.swapped,
            Move::Migrate => s.migrated,
        }
    }

    /// Frames a moved page frees.
    fn frees(self) -> u64 {
        u64::from(self == Move::SwapOut)
    }
}

/// Swaps out or migrates one page and checks the report and counters
/// against the model. Returns what the page was before if it moved; if
/// it did not, it must be exactly as it was.
fn move_page(m: &Model, r: &Real, vm: usize, page: usize, how: Move) -> Option<Seen> {
    let v = &r.vms[vm];
    let seen = Seen::of(v, page);
    let before = r.ctx.stats();
    let (moved, pinned) = how.act(v, page_gpa(page));
    let expected = seen.expected_move(m, vm, page);
    assert_eq!((moved, pinned), expected, "{how:?}: {seen:?}");
    let after = r.ctx.stats();
    // A shared frame goes to one slot, whatever the number of VMs.
    assert_eq!(how.counter(&after), how.counter(&before) + moved);
    assert_eq!(after.resident, before.resident - moved * how.frees());
    if moved == 0 {
        seen.unchanged(v, page, how);
        return None;
    }
    Some(seen)
}

fn swap_out(m: &Model, r: &Real, vm: usize, page: usize) {
    let Some(seen) = move_page(m, r, vm, page, Move::SwapOut) else {
        return;
    };
    let v = &r.vms[vm];
    let Entry::Swap {
        slot, exclusive, ..
    } = entry(v, page)
    else {
        panic!("swapped out, but {:?}", entry(v, page));
    };
    let frame = seen.frame.expect("a present page has a frame");
    assert_eq!(exclusive, frame.exclusive, "R13: the entry records AE");
    for &id in &seen.mappers {
        let e = entry(r.vm_by_id(id), page);
        assert!(
            matches!(e, Entry::Swap { slot: s, .. } if s == slot),
            "VM {id} mapped the frame and now has {e:?}, not slot {slot}"
        );
    }
}

fn migrate(m: &Model, r: &Real, vm: usize, page: usize) {
    let Some(seen) = move_page(m, r, vm, page, Move::Migrate) else {
        return;
    };
    let now = Seen::of(&r.vms[vm], page);
    let (
        Entry::Present {
            store: old,
            writable: was_writable,
            wp: was_wp,
            ..
        },
        Entry::Present {
            store: new,
            writable,
            wp,
            ..
        },
    ) = (seen.entry, now.entry)
    else {
        panic!("migrated {:?} into {:?}", seen.entry, now.entry);
    };
    assert_ne!(old, new, "the frame did not move");
    assert_eq!((writable, wp), (was_writable, was_wp), "R15");
    // The same counts and AE, in the same VMs.
    assert_eq!((now.frame, now.mappers), (seen.frame, seen.mappers));
}

fn compact(r: &Real, all: bool) {
    let budget = if all { u64::MAX } else { 1 };
    let before = r.ctx.stats();
    let moved = r.ctx.compact_all(budget);
    let after = r.ctx.stats();
    assert!(moved <= budget.saturating_mul(r.vms.len() as u64));
    assert_eq!(after.migrated, before.migrated + moved);
    assert_eq!(
        after.resident, before.resident,
        "a frame leaked or vanished"
    );
    if all {
        // Another VM's pass may free home frames this VM's pass found
        // taken, so the context-wide pass need not be done; one VM's is.
        for (vm, v) in r.vms.iter().enumerate() {
            v.compact(u64::MAX).unwrap();
            assert_eq!(
                v.compact(u64::MAX).unwrap(),
                0,
                "VM {vm}: compaction left work"
            );
        }
    }
}

fn listener_protect(m: &mut Model, r: &Real, vm: usize, page: usize) {
    let changed = if m.page(vm, page).watched {
        0
    } else if m.write_pinned(vm, page) {
        // A device may write it without a fault: written now.
        m.hear(vm, page);
        0
    } else {
        m.page_mut(vm, page).watched = true;
        1
    };
    let v = &r.vms[vm];
    assert_eq!(
        v.protect_for_listener(page_gpa(page), PAGE_SIZE, true)
            .unwrap(),
        changed
    );
}

fn listener_unprotect(m: &mut Model, r: &Real, vm: usize, page: usize) {
    let changed = u64::from(std::mem::take(&mut m.page_mut(vm, page).watched));
    let v = &r.vms[vm];
    assert_eq!(
        v.protect_for_listener(page_gpa(page), PAGE_SIZE, false)
            .unwrap(),
        changed
    );
}

fn fork(m: &mut Model, r: &mut Real, vm: usize) {
    if r.vms.len() == MAX_VMS {
        return;
    }
    let child = r.vms[vm].fork().unwrap();
    m.add_vm(child.id(), &m.values(vm));
    r.add_vm(child);
}

fn pin(m: &mut Model, r: &mut Real, vm: usize, page: usize, write: bool) {
    if r.pins.len() == MAX_PINS {
        return;
    }
    if write {
        m.before_write(vm, page);
    }
    let flags = PinFlags {
        write,
        longterm: write,
    };
    r.pins.push(r.vms[vm].pin(gpa(page), 1, flags).unwrap());
    m.pins.push((m.page(vm, page).cell, write));
}

/// A device's access through pin `pin` (modulo the pins held), or its
/// unpinning.
fn device(m: &mut Model, r: &mut Real, op: &Op) {
    if r.pins.is_empty() {
        return;
    }
    match *op {
        Op::Unpin { pin } => {
            let pin = pin % r.pins.len();
            r.pins.remove(pin);
            m.pins.remove(pin);
        }
        Op::PinRead { pin } => {
            let pin = pin % r.pins.len();
            let mut b = [0u8];
            r.pins[pin].read(0, &mut b).unwrap();
            assert_eq!(b[0], m.cells[m.pins[pin].0], "pin {pin}");
        }
        Op::PinWrite { pin, val } => {
            let pin = pin % r.pins.len();
            let (cell, write) = m.pins[pin];
            assert_eq!(r.pins[pin].write(0, &[val]).is_ok(), write);
            if write {
                m.cells[cell] = val;
            }
        }
        _ => unreachable!("not a device access: {op:?}"),
    }
}

fn step(m: &mut Model, r: &mut Real, op: &Op) {
    let nvm = r.vms.len();
    match *op {
        Op::Write { vm, page, val } => {
            let vm = vm % nvm;
            m.before_write(vm, page);
            r.vms[vm].write(gpa(page), &[val]).unwrap();
            let c = m.page(vm, page).cell;
            m.cells[c] = val;
        }
        Op::Read { vm, page } => {
            let vm = vm % nvm;
            assert_eq!(
                read(&r.vms[vm], page),
                m.value(vm, page),
                "VM {vm} page {page}"
            );
        }
        Op::Fork { vm } => fork(m, r, vm % nvm),
        Op::Exit { vm } => {
            if nvm > 1 {
                r.vms.remove(vm % nvm);
                m.vms.remove(vm % nvm);
            }
        }
        Op::Pin { vm, page, write } => pin(m, r, vm % nvm, page, write),
        Op::Unpin { .. } | Op::PinRead { .. } | Op::PinWrite { .. } => device(m, r, op),
        Op::Discard { vm, page } => {
            let vm = vm % nvm;
            r.vms[vm].discard(page_gpa(page), PAGE_SIZE).unwrap();
            m.page_mut(vm, page).cell = m.cell(0);
        }
        Op::Unshare { vm, page } => {
            drop(
                r.vms[vm % nvm]
                    .pin(gpa(page), 1, PinFlags::default())
                    .unwrap(),
            );
        }
        Op::Protect { vm, page } => {
            r.vms[vm % nvm].write_protect(gpa(page), 1).unwrap();
        }
        Op::Unprotect { vm, page } => {
            r.vms[vm % nvm].unprotect(gpa(page), 1).unwrap();
        }
        Op::SwapOut { vm, page } => swap_out(m, r, vm % nvm, page),
        Op::Migrate { vm, page } => migrate(m, r, vm % nvm, page),
        Op::Compact { all } => compact(r, all),
        Op::ListenerProtect { vm, page } => listener_protect(m, r, vm % nvm, page),
        Op::ListenerUnprotect { vm, page } => listener_unprotect(m, r, vm % nvm, page),
    }
}

/// Runs one step and checks that the listeners heard exactly what the
/// model says, and the counter of events agrees.
fn step_and_check(m: &mut Model, r: &mut Real, op: &Op) {
    let before = r.ctx.stats();
    step(m, r, op);
    let sync = r.listener.is_some();
    let expected: Vec<_> = m
        .heard
        .drain(..)
        .map(|(id, gpa, b)| (id, gpa, sync.then_some(b)))
        .collect();
    assert_eq!(r.heard(), expected, "listener events of {op:?}");
    let events = r.ctx.stats().wp_events - before.wp_events;
    assert_eq!(events, expected.len() as u64, "counted listener events");
    check_all(m, r);
}

/// One page of one VM: its listener protection, the pins on its frame,
/// and (unless it is in swap, where reading would bring it back) what it
/// reads.
fn check_page(m: &Model, r: &Real, vm: usize, page: usize) {
    let v = &r.vms[vm];
    let (e, want) = (entry(v, page), m.page(vm, page));
    assert_eq!(
        e.wp(),
        want.watched,
        "VM {vm} page {page}: protection, {e:?}"
    );
    let pins = v.frame_info(gpa(page)).map_or(0, |f| f.pincount);
    assert_eq!(pins, m.pins_on(vm, page), "VM {vm} page {page}: pins");
    if !matches!(e, Entry::Swap { .. }) {
        assert_eq!(read(v, page), m.value(vm, page), "VM {vm} page {page}");
    }
}

fn check_pins(m: &Model, r: &Real) {
    for (i, pin) in r.pins.iter().enumerate() {
        let mut b = [0u8];
        pin.read(0, &mut b).unwrap();
        assert_eq!(b[0], m.cells[m.pins[i].0], "pin {i}");
    }
}

fn check_audit(r: &Real) {
    let vms: Vec<&VmMemory> = r.vms.iter().map(|v| &**v).collect();
    if let Err(e) = audit(&r.ctx, &vms) {
        panic!("invariant broken: {e}");
    }
}

fn check_all(m: &Model, r: &Real) {
    for vm in 0..r.vms.len() {
        for page in 0..PAGES.len() {
            check_page(m, r, vm, page);
        }
    }
    check_pins(m, r);
    check_audit(r);
}

/// Reads every page of every VM, swapping in what is in swap.
fn read_back(m: &Model, r: &Real) {
    for (vm, v) in r.vms.iter().enumerate() {
        for page in 0..PAGES.len() {
            assert_eq!(
                read(v, page),
                m.value(vm, page),
                "VM {vm} page {page} (swept)"
            );
        }
    }
    check_all(m, r);
}

/// Runs `ops` against the model. At the end, every page is read back
/// (with `sweep`; otherwise what is in swap stays there until the VMs
/// end), pins outlive their VMs, and nothing leaks: with the VMs gone only
/// the pinned frames remain, and with the pins gone no frame, store or
/// swap slot.
fn run(ops: &[Op], around: u64, sync: bool, sweep: bool) {
    let ctx = Context::new(Config {
        fault_around: around,
        ..Config::default()
    });
    let layout = Layout::new(&[(0, 4 << 20)]).unwrap();
    let listener = sync.then(|| Arc::new(Recorder::default()));
    let mut r = Real {
        vms: Vec::new(),
        pins: Vec::new(),
        ctx: ctx.clone(),
        listener,
    };
    let mut m = Model {
        cells: Vec::new(),
        vms: Vec::new(),
        pins: Vec::new(),
        heard: Vec::new(),
    };
    let first = VmMemory::new(&ctx, layout).unwrap();
    m.add_vm(first.id(), &[0; PAGES.len()]);
    r.add_vm(first);
    for op in ops {
        step_and_check(&mut m, &mut r, op);
    }
    if sweep {
        read_back(&m, &r);
    }
    r.vms.clear();
    m.vms.clear();
    check_pins(&m, &r);
    check_audit(&r);
    let mut pinned: Vec<usize> = m.pins.iter().map(|p| p.0).collect();
    pinned.sort_unstable();
    pinned.dedup();
    let s = ctx.stats();
    assert_eq!(
        (s.resident, s.shared, s.swapped),
        (pinned.len() as u64, 0, 0),
        "left behind by the VMs"
    );
    r.pins.clear();
    let s = ctx.stats();
    assert_eq!(
        (s.resident, s.shared, s.pins, s.stores, s.swapped),
        (0, 0, 0, 0, 0),
        "left behind"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn memory_matches_the_model(
        ops in prop::collection::vec(op(), 1..100),
        around in prop::sample::select(vec![1u64, 16]),
        sync in any::<bool>(),
        sweep in any::<bool>(),
    ) {
        run(&ops, around, sync, sweep);
    }
}

/// A read pin of a protected page whose frame a fork shared takes an
/// unshare fault, which copies the frame: the copy must stay protected,
/// so the next write is still reported (R10, seed 001).
#[test]
fn an_unshare_fault_keeps_listener_protection() {
    let ops = [
        Op::Write {
            vm: 0,
            page: 0,
            val: 1,
        },
        Op::ListenerProtect { vm: 0, page: 0 },
        Op::Fork { vm: 0 },
        Op::Unshare { vm: 0, page: 0 },
        Op::Write {
            vm: 0,
            page: 0,
            val: 2,
        },
    ];
    for sync in [false, true] {
        run(&ops, 1, sync, true);
    }
}
