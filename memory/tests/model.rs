//! Random sequences of guest and device operations over several VMs,
//! against a reference model of what each VM and each pin must read.
//!
//! The model knows nothing of sharing: a fork copies every value, a pin
//! names a cell that the pinning VM keeps seeing until it discards the page
//! or ends. The implementation shares frames copy-on-write; after every step
//! it must read exactly what the model reads, and `memory::audit` must find
//! every invariant intact (R1, R4, exact counts and counters).

use std::sync::Arc;

use memory::{Config, Context, Layout, Pin, PinFlags, VmMemory, audit};
use proptest::prelude::*;

/// Pages the operations touch: both sides of a leaf boundary.
const PAGES: [u64; 6] = [0, 1, 2, 511, 512, 513];
const MAX_VMS: usize = 5;

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
}

fn op() -> impl Strategy<Value = Op> {
    let vm = 0..MAX_VMS;
    let page = 0..PAGES.len();
    prop_oneof![
        4 => (vm.clone(), page.clone(), 1..=255u8).prop_map(|(vm, page, val)| Op::Write { vm, page, val }),
        2 => (vm.clone(), page.clone()).prop_map(|(vm, page)| Op::Read { vm, page }),
        2 => vm.clone().prop_map(|vm| Op::Fork { vm }),
        1 => vm.clone().prop_map(|vm| Op::Exit { vm }),
        2 => (vm.clone(), page.clone(), any::<bool>()).prop_map(|(vm, page, write)| Op::Pin { vm, page, write }),
        1 => (0..8usize).prop_map(|pin| Op::Unpin { pin }),
        2 => (0..8usize).prop_map(|pin| Op::PinRead { pin }),
        1 => (0..8usize, 1..=255u8).prop_map(|(pin, val)| Op::PinWrite { pin, val }),
        1 => (vm.clone(), page.clone()).prop_map(|(vm, page)| Op::Discard { vm, page }),
        1 => (vm.clone(), page.clone()).prop_map(|(vm, page)| Op::Unshare { vm, page }),
        1 => (vm.clone(), page.clone()).prop_map(|(vm, page)| Op::Protect { vm, page }),
        1 => (vm, page).prop_map(|(vm, page)| Op::Unprotect { vm, page }),
    ]
}

/// The reference: cells of bytes; a VM maps each page to a cell.
struct Model {
    cells: Vec<u8>,
    vms: Vec<Vec<usize>>,
    pins: Vec<(usize, bool)>,
}

impl Model {
    fn cell(&mut self, val: u8) -> usize {
        self.cells.push(val);
        self.cells.len() - 1
    }

    fn new_vm(&mut self) -> Vec<usize> {
        (0..PAGES.len()).map(|_| self.cell(0)).collect()
    }
}

struct Real {
    ctx: Arc<Context>,
    vms: Vec<Arc<VmMemory>>,
    pins: Vec<Pin>,
}

fn gpa(page: usize) -> u64 {
    PAGES[page] * 4096 + 0x80
}

fn read(vm: &VmMemory, page: usize) -> u8 {
    let mut b = [0u8];
    vm.read(gpa(page), &mut b).unwrap();
    b[0]
}

fn step(m: &mut Model, r: &mut Real, op: &Op) {
    let nvm = r.vms.len();
    match *op {
        Op::Write { vm, page, val } => {
            let vm = vm % nvm;
            r.vms[vm].write(gpa(page), &[val]).unwrap();
            let c = m.vms[vm][page];
            m.cells[c] = val;
        }
        Op::Read { vm, page } => {
            let vm = vm % nvm;
            assert_eq!(
                read(&r.vms[vm], page),
                m.cells[m.vms[vm][page]],
                "VM {vm} page {page}"
            );
        }
        Op::Fork { vm } => {
            if nvm == MAX_VMS {
                return;
            }
            let vm = vm % nvm;
            let child = r.vms[vm].fork().unwrap();
            r.vms.push(child);
            let copy: Vec<u8> = m.vms[vm].iter().map(|c| m.cells[*c]).collect();
            let cells = copy.into_iter().map(|v| m.cell(v)).collect();
            m.vms.push(cells);
        }
        Op::Exit { vm } => {
            if nvm == 1 {
                return;
            }
            let vm = vm % nvm;
            r.vms.remove(vm);
            m.vms.remove(vm);
        }
        Op::Pin { vm, page, write } => {
            if r.pins.len() == 8 {
                return;
            }
            let vm = vm % nvm;
            let flags = PinFlags {
                write,
                longterm: write,
            };
            r.pins.push(r.vms[vm].pin(gpa(page), 1, flags).unwrap());
            m.pins.push((m.vms[vm][page], write));
        }
        Op::Unpin { pin } => {
            if !r.pins.is_empty() {
                let pin = pin % r.pins.len();
                r.pins.remove(pin);
                m.pins.remove(pin);
            }
        }
        Op::PinRead { pin } => {
            if !r.pins.is_empty() {
                let pin = pin % r.pins.len();
                let mut b = [0u8];
                r.pins[pin].read(0, &mut b).unwrap();
                assert_eq!(b[0], m.cells[m.pins[pin].0], "pin {pin}");
            }
        }
        Op::PinWrite { pin, val } => {
            if !r.pins.is_empty() {
                let pin = pin % r.pins.len();
                let (cell, write) = m.pins[pin];
                assert_eq!(r.pins[pin].write(0, &[val]).is_ok(), write);
                if write {
                    m.cells[cell] = val;
                }
            }
        }
        Op::Discard { vm, page } => {
            let vm = vm % nvm;
            r.vms[vm].discard(gpa(page) & !0xfff, 4096).unwrap();
            m.vms[vm][page] = m.cell(0);
        }
        Op::Unshare { vm, page } => {
            let vm = vm % nvm;
            drop(r.vms[vm].pin(gpa(page), 1, PinFlags::default()).unwrap());
        }
        Op::Protect { vm, page } => {
            r.vms[vm % nvm].write_protect(gpa(page), 1).unwrap();
        }
        Op::Unprotect { vm, page } => {
            r.vms[vm % nvm].unprotect(gpa(page), 1).unwrap();
        }
    }
}

fn check_all(m: &Model, r: &Real) {
    for (i, vm) in r.vms.iter().enumerate() {
        for page in 0..PAGES.len() {
            assert_eq!(
                read(vm, page),
                m.cells[m.vms[i][page]],
                "VM {i} page {page}"
            );
        }
    }
    for (i, pin) in r.pins.iter().enumerate() {
        let mut b = [0u8];
        pin.read(0, &mut b).unwrap();
        assert_eq!(b[0], m.cells[m.pins[i].0], "pin {i}");
    }
    let vms: Vec<&VmMemory> = r.vms.iter().map(|v| &**v).collect();
    if let Err(e) = audit(&r.ctx, &vms) {
        panic!("invariant broken: {e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn memory_matches_the_model(ops in prop::collection::vec(op(), 1..60), around in prop::sample::select(vec![1u64, 16])) {
        let ctx = Context::new(Config { fault_around: around, ..Config::default() });
        let layout = Layout::new(&[(0, 4 << 20)]).unwrap();
        let mut r = Real { vms: vec![VmMemory::new(&ctx, layout).unwrap()], pins: Vec::new(), ctx: ctx.clone() };
        let mut m = Model { cells: Vec::new(), vms: Vec::new(), pins: Vec::new() };
        let first = m.new_vm();
        m.vms.push(first);
        for op in &ops {
            step(&mut m, &mut r, op);
            check_all(&m, &r);
        }
        // Nothing leaks: with every VM and pin gone, no frame remains.
        r.pins.clear();
        r.vms.clear();
        let s = ctx.stats();
        prop_assert_eq!((s.resident, s.shared, s.pins, s.stores), (0, 0, 0, 0));
    }
}
