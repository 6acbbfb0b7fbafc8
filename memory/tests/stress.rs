//! Concurrency stress, bounded in time: VMs forking, writing, pinning and
//! discarding on every core at once. Each VM checks it reads exactly what
//! it wrote; at the end every frame must be gone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use memory::{Config, Context, Layout, PinFlags, VmMemory, audit};

const PAGES: u64 = 64;
const BASE: u64 = 0x10_0000;

fn gpa(page: u64) -> u64 {
    BASE + page * 4096 + 8 * (page % 7)
}

fn read_u64(vm: &VmMemory, gpa: u64) -> u64 {
    let mut b = [0u8; 8];
    vm.read(gpa, &mut b).unwrap();
    u64::from_le_bytes(b)
}

/// A small xorshift generator: the test needs cheap, seedable randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn verify(vm: &VmMemory, expected: &[u64], what: &str) {
    for (p, want) in expected.iter().enumerate() {
        let got = read_u64(vm, gpa(p as u64));
        assert_eq!(
            got, *want,
            "{what}: page {p} reads {got:#x}, wrote {want:#x}"
        );
    }
}

#[test]
fn eight_vms_fork_and_write_concurrently() {
    let ctx = Context::new(Config::default());
    let root = VmMemory::new(&ctx, Layout::new(&[(0, 8 << 20)]).unwrap()).unwrap();
    let mut initial = vec![0u64; PAGES as usize];
    for (p, v) in initial.iter_mut().enumerate() {
        *v = 0x1000 + p as u64;
        root.write(gpa(p as u64), &v.to_le_bytes()).unwrap();
    }
    let start = Arc::new(Barrier::new(8));
    let deadline = Instant::now() + Duration::from_secs(3);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let mut vm = root.fork().unwrap();
            let mut expected = initial.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1));
                start.wait();
                let mut i = 0u64;
                while Instant::now() < deadline {
                    i += 1;
                    let p = rng.next() % PAGES;
                    match rng.next() % 16 {
                        0 => {
                            // Fork: the child is a snapshot; it writes, the
                            // parent must not see it; then one of the two
                            // goes on.
                            let child = vm.fork().unwrap();
                            verify(&child, &expected, "fresh child");
                            child.write(gpa(p), &u64::MAX.to_le_bytes()).unwrap();
                            verify(&vm, &expected, "parent after the child wrote");
                            child
                                .write(gpa(p), &expected[p as usize].to_le_bytes())
                                .unwrap();
                            if rng.next() % 2 == 0 {
                                vm = child;
                            }
                        }
                        1 => {
                            let pin = vm
                                .pin(
                                    gpa(p),
                                    8,
                                    PinFlags {
                                        write: true,
                                        longterm: false,
                                    },
                                )
                                .unwrap();
                            let v = (t << 48) | (i << 8) | 0xaa;
                            pin.write(0, &v.to_le_bytes()).unwrap();
                            expected[p as usize] = v;
                            assert_eq!(
                                read_u64(&vm, gpa(p)),
                                v,
                                "VM does not see the device's write"
                            );
                        }
                        2 => {
                            vm.discard(gpa(p) & !0xfff, 4096).unwrap();
                            expected[p as usize] = 0;
                        }
                        3 => verify(&vm, &expected, "periodic check"),
                        _ => {
                            let v = (t << 48) | (i << 8);
                            vm.write(gpa(p), &v.to_le_bytes()).unwrap();
                            expected[p as usize] = v;
                        }
                    }
                }
                verify(&vm, &expected, "final check");
                i
            })
        })
        .collect();
    let ops: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(ops > 1000, "only {ops} operations ran");
    verify(&root, &initial, "root after its clones wrote");
    audit(&ctx, &[&root]).unwrap();
    drop(root);
    let s = ctx.stats();
    assert_eq!(
        (s.resident, s.shared, s.pins, s.stores),
        (0, 0, 0, 0),
        "leak: {s:?}"
    );
}

#[test]
fn pins_stay_coherent_while_the_vm_forks() {
    // One VM; a thread forks it over and over while others pin its pages
    // (lockless path, racing with fork's write-protect) and write through
    // the pins, and another writes other pages as the guest would. A pin
    // must always reach the frame the VM maps: fork must copy pinned frames
    // for the child, never share them.
    let ctx = Context::new(Config::default());
    let vm = VmMemory::new(&ctx, Layout::new(&[(0, 8 << 20)]).unwrap()).unwrap();
    for p in 0..PAGES {
        vm.write(gpa(p), &[1]).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let forker = {
        let (vm, stop) = (vm.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                drop(vm.fork().unwrap());
                n += 1;
            }
            n
        })
    };
    let pinners: Vec<_> = (0..2u64)
        .map(|t| {
            let (vm, stop) = (vm.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(77 + t);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let p = (rng.next() % (PAGES / 2)) * 2 + t; // disjoint pages per thread
                    let pin = vm
                        .pin(
                            gpa(p),
                            8,
                            PinFlags {
                                write: true,
                                longterm: true,
                            },
                        )
                        .unwrap();
                    n += 1;
                    pin.write(0, &n.to_le_bytes()).unwrap();
                    assert_eq!(read_u64(&vm, gpa(p)), n, "pin and VM disagree on page {p}");
                    vm.write(gpa(p), &(n + 1).to_le_bytes()).unwrap();
                    let mut b = [0u8; 8];
                    pin.read(0, &mut b).unwrap();
                    assert_eq!(
                        u64::from_le_bytes(b),
                        n + 1,
                        "the VM's write missed the pinned frame"
                    );
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let forks = forker.join().unwrap();
    let pins: u64 = pinners.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(
        forks > 10 && pins > 100,
        "too little ran: {forks} forks, {pins} pins"
    );
    audit(&ctx, &[&vm]).unwrap();
    drop(vm);
    assert_eq!(ctx.stats().resident, 0);
}
