//! Snapshot fuzzing against real VMs: the harness ABI (SNAPSHOT, DONE,
//! COVERAGE_MAP), verdicts, resets that restore everything a run changed,
//! determinism across resets and clones.

use std::sync::Arc;
use std::time::Duration;

use guest_tests::{MIB, Scratch, guest, hypervisor};
use vmm::Sink;
use vmm::fuzz::vm_target::{Limits, Snapshot, VmTarget};
use vmm::fuzz::{Target, Verdict};

fn snapshot(name: &str, mem: u64) -> Arc<Snapshot> {
    snapshot_with(name, mem, Vec::new()).unwrap_or_else(|e| panic!("cannot snapshot {name}: {e}"))
}

/// A snapshot of `name` with `devices`, or why SNAPSHOT refused it.
fn snapshot_with(
    name: &str,
    mem: u64,
    devices: Vec<vmm::virtio::DeviceConfig>,
) -> Result<Arc<Snapshot>, String> {
    snapshot_in(name, mem, devices, memory::Config::default())
}

/// [`snapshot_with`], with memory settings `config`.
fn snapshot_in(
    name: &str,
    mem: u64,
    devices: Vec<vmm::virtio::DeviceConfig>,
    config: memory::Config,
) -> Result<Arc<Snapshot>, String> {
    let program = match name {
        "fuzz_planted" => vmm::guests::FUZZ_PLANTED.to_vec(),
        _ => guest(name),
    };
    let (sink, _) = Sink::capture();
    Snapshot::of_program(&hypervisor(), program, mem, devices, sink, config)
        .map_err(|e| vmm::error_chain(&e))
}

fn target(snap: &Arc<Snapshot>, limits: Limits) -> VmTarget {
    snap.target(limits)
        .unwrap_or_else(|e| panic!("cannot clone the snapshot: {}", vmm::error_chain(&e)))
}

fn run(t: &mut VmTarget, input: &[u8]) -> (Verdict, Vec<u8>) {
    let v = t
        .run(input)
        .unwrap_or_else(|e| panic!("run of {input:?} failed: {}", vmm::error_chain(&e)));
    (v, t.coverage().to_vec())
}

fn edges(map: &[u8]) -> usize {
    map.iter().filter(|&&b| b != 0).count()
}

#[test]
fn verdicts_and_coverage_of_the_planted_target() {
    let snap = snapshot("fuzz_planted", 16 * MIB);
    let mut t = target(&snap, Limits::default());
    let (v, plain) = run(&mut t, b"hello");
    assert_eq!(v, Verdict::Ok);
    let (v, fu) = run(&mut t, b"FUxx");
    assert_eq!(v, Verdict::Ok);
    assert!(
        edges(&fu) > edges(&plain),
        "a matched prefix is new coverage"
    );
    let (v, _) = run(&mut t, b"FUZZ!");
    assert_eq!(v, Verdict::Fail(7));
    let (v, _) = run(&mut t, b"FUZZ?");
    match v {
        Verdict::Crash(c) => assert_eq!(c.vector, 6, "{c:?}"),
        other => panic!("FUZZ? must crash with #UD: {other}"),
    }
    // After a crash, the next run starts clean.
    let (v, again) = run(&mut t, b"hello");
    assert_eq!(v, Verdict::Ok);
    assert_eq!(again, plain, "coverage differs after a crash");
    let (v, empty) = run(&mut t, b"");
    assert_eq!(v, Verdict::Ok);
    assert_eq!(empty, plain);
}

#[test]
fn the_same_input_gives_the_same_result_across_resets_and_clones() {
    let snap = snapshot("fuzz_planted", 16 * MIB);
    let mut a = target(&snap, Limits::default());
    let mut b = target(&snap, Limits::default());
    let inputs: [&[u8]; 3] = [b"FUZ", b"FUZZ!", b"zzz"];
    let want: Vec<_> = inputs.iter().map(|i| run(&mut a, i)).collect();
    for round in 0..1000 {
        for (i, input) in inputs.iter().enumerate() {
            let t = if round % 2 == 0 { &mut a } else { &mut b };
            assert_eq!(run(t, input), want[i], "round {round}, input {input:?}");
        }
    }
}

#[test]
fn a_hang_is_detected_and_the_next_run_starts_clean() {
    let snap = snapshot("fuzz_planted", 16 * MIB);
    let limits = Limits {
        timeout: Duration::from_millis(50),
        ..Limits::default()
    };
    let mut t = target(&snap, limits);
    let (_, plain) = run(&mut t, b"hello");
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let (v, _) = run(&mut t, b"HANG");
        assert_eq!(v, Verdict::Hang);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the hang was not cut short"
        );
        assert_eq!(run(&mut t, b"hello"), (Verdict::Ok, plain.clone()));
    }
    // The exit budget ends runs too.
    let mut t = target(
        &snap,
        Limits {
            exits: 0,
            ..Limits::default()
        },
    );
    assert_eq!(run(&mut t, b"FUZZ!").0, Verdict::Hang);
}

#[test]
fn a_clone_made_anew_after_a_big_run_starts_from_the_snapshot() {
    let snap = snapshot("fuzz_scribble", 16 * MIB);
    let limits = Limits {
        refork_above: Some(100),
        ..Limits::default()
    };
    let ctx = snap.memory().context().clone();
    let baseline = ctx.stats().resident;
    let mut t = target(&snap, limits);
    for round in 0..5u8 {
        assert_eq!(run(&mut t, &[round]).0, Verdict::Ok, "round {round}");
        assert!(t.last_dirty() > 100, "{}", t.last_dirty());
        // The run wrote over 300 pages, but the clone was made anew.
        let held = ctx.stats().resident - baseline;
        assert!(
            held < 100,
            "the clone holds {held} frames after round {round}"
        );
    }
    drop(t);
    assert_eq!(ctx.stats().resident, baseline, "frames leaked");
}

/// Runs inputs `[0]`, `[1]`, ... `[rounds - 1]` on two clones of `snap`
/// (every third on the second), each of which must end in DONE(0); else
/// the verdict means what `codes` says.
fn runs_on_two_clones(snap: &Arc<Snapshot>, rounds: u8, codes: &str) -> (VmTarget, VmTarget) {
    let mut a = target(snap, Limits::default());
    let mut b = target(snap, Limits::default());
    for round in 0..rounds {
        let t = if round % 3 == 0 { &mut b } else { &mut a };
        let (v, _) = run(t, &[round]);
        assert_eq!(v, Verdict::Ok, "round {round}: {codes}");
    }
    (a, b)
}

#[test]
fn a_scribbling_target_is_fully_restored() {
    let snap = snapshot("fuzz_scribble", 16 * MIB);
    let (a, _) = runs_on_two_clones(
        &snap,
        20,
        "not restored: 1 area, 2 fresh pages, 3 XMM, 4 registers",
    );
    assert!(
        a.last_dirty() >= 256,
        "the run wrote its whole area: {}",
        a.last_dirty()
    );
}

/// The same on 2 MiB mappings: the clones share the snapshot's huge
/// frames, runs write into them (copying a page, then the block), and
/// each reset puts back what a run changed.
#[test]
fn a_scribbling_target_on_huge_mappings_is_fully_restored() {
    memory::huge_pages_available().expect("the setup script enables 2 MiB pages");
    let config = memory::Config {
        huge: true,
        ..memory::Config::default()
    };
    let snap = snapshot_in("fuzz_scribble", 16 * MIB, Vec::new(), config)
        .unwrap_or_else(|e| panic!("cannot snapshot: {e}"));
    let ctx = snap.memory().context().clone();
    let baseline = ctx.stats();
    assert!(
        baseline.huge_maps > 0,
        "the snapshot maps huge: {baseline:?}"
    );
    let (a, b) = runs_on_two_clones(
        &snap,
        20,
        "not restored: 1 area, 2 fresh pages, 3 XMM, 4 registers",
    );
    assert!(a.last_dirty() >= 256, "{}", a.last_dirty());
    let after = ctx.stats();
    assert!(
        after.huge_splits > baseline.huge_splits && after.collapses > baseline.collapses,
        "runs wrote into shared huge blocks: {after:?}"
    );
    drop((a, b));
    snap.make_clones_ahead(false);
    assert_eq!(ctx.stats().resident, baseline.resident, "frames leaked");
}

/// Runs that write a few pages, then more than KVM's dirty ring holds,
/// then a few again, on one clone: the pages KVM keeps writable between
/// runs and those of a run that filled the ring are all put back, and the
/// pages kept writable do not pile up.
#[test]
fn runs_of_any_size_are_restored_around_a_full_dirty_ring() {
    let snap = snapshot("fuzz_wide", 64 * MIB);
    let mut t = target(&snap, Limits::default());
    let sizes: [u32; 10] = [16, 16, 16, 6000, 16, 300, 5000, 16, 1, 8192];
    for (i, pages) in sizes.into_iter().enumerate() {
        let mut input = pages.to_le_bytes().to_vec();
        input.push(i as u8 + 1);
        assert_eq!(
            run(&mut t, &input).0,
            Verdict::Ok,
            "run {i}: the previous run ({} pages) was not put back",
            if i > 0 { sizes[i - 1] } else { 0 }
        );
        if i == 7 {
            // After the 5,000-page run KVM tracks every page again: a
            // 16-page run restores its own pages, not 5,000.
            assert!(t.last_dirty() < 100, "{} pages restored", t.last_dirty());
        }
    }
    // The last run's pages are checked by one more.
    assert_eq!(
        run(&mut t, &[0, 0, 0, 0]).0,
        Verdict::Ok,
        "the 8192-page run"
    );
}

#[test]
fn a_clone_takes_a_child_snapshot_resets_to_it_and_drops_it() {
    let snap = snapshot("fuzz_stages", 16 * MIB);
    let ctx = snap.memory().context().clone();
    let baseline = ctx.stats().resident;
    let mut parent = target(&snap, Limits::default());
    // Without a child snapshot, the second SNAPSHOT hands the same input.
    assert_eq!(
        run(&mut parent, b"AA").0,
        Verdict::Fail(0x100 + u64::from(b'A'))
    );
    let child = parent
        .take_child(b"Q")
        .unwrap_or_else(|e| panic!("{}", vmm::error_chain(&e)));
    assert!(Arc::ptr_eq(child.parent().unwrap(), &snap));
    // A child snapshot has clones made ahead only once it is cloned.
    std::thread::sleep(Duration::from_millis(50));
    assert!(!child.spare_ready(), "a clone made ahead of any use");
    let mut c = target(&child, Limits::default());
    wait_for_spare(&child, 1);
    for _ in 0..3 {
        assert_eq!(run(&mut c, b"Qx").0, Verdict::Fail(0x100 + u64::from(b'Q')));
        assert_eq!(run(&mut c, b"zz").0, Verdict::Fail(1));
    }
    // The parent clone still starts at the first SNAPSHOT.
    assert_eq!(
        run(&mut parent, b"BB").0,
        Verdict::Fail(0x100 + u64::from(b'B'))
    );
    // A run that ends before a second SNAPSHOT cannot give a child.
    let mut grandchild_src = target(&child, Limits::default());
    assert!(grandchild_src.take_child(b"Q").is_err());
    assert_eq!(
        run(&mut grandchild_src, b"Q").0,
        Verdict::Fail(0x100 + u64::from(b'Q'))
    );
    drop((c, grandchild_src, child, parent));
    assert_eq!(
        ctx.stats().resident,
        baseline,
        "the child snapshot's frames leaked"
    );
}

#[test]
fn a_triple_fault_is_a_crash_and_the_next_run_starts_clean() {
    let snap = snapshot("fuzz_triple", 16 * MIB);
    let mut t = target(&snap, Limits::default());
    let (v, plain) = run(&mut t, b"x");
    assert_eq!(v, Verdict::Ok);
    for _ in 0..3 {
        match run(&mut t, b"T").0 {
            Verdict::Crash(c) => assert_eq!(c.vector, 8, "{c:?}"),
            other => panic!("a triple fault must be a crash: {other}"),
        }
        assert_eq!(run(&mut t, b"x"), (Verdict::Ok, plain.clone()));
    }
}

fn blk(s: &Scratch) -> vmm::virtio::DeviceConfig {
    vmm::virtio::DeviceConfig::Blk(devices::virtio::blk::BlockConfig::new(s.0.clone()))
}

#[test]
fn a_target_finds_its_block_device_as_at_the_snapshot_every_run() {
    let disk = Scratch::new("fuzz-blk.img", &[0x5a; 64 << 10]);
    let snap = snapshot_with("fuzz_blk", 16 * MIB, vec![blk(&disk)]).unwrap();
    let pattern: Vec<u8> = (0..16 * 512u64).map(|i| (i * 13 + 1) as u8).collect();
    // Inputs 0, 1, 2 (mod 3): overwrite the disk; and leave writes in
    // flight; and reset the device.
    drop(runs_on_two_clones(
        &snap,
        30,
        "not as at the snapshot (1 disk contents, 2 device or queue)",
    ));
    let file = disk.read();
    assert_eq!(&file[..pattern.len()], &pattern[..], "the root's writes");
    assert!(
        file[pattern.len()..].iter().all(|&b| b == 0x5a),
        "a clone's write reached the image file"
    );
}

#[test]
fn a_device_that_cannot_go_back_is_refused_at_snapshot() {
    let disk = Scratch::new("fuzz-blk-refused.img", &[0x5a; 64 << 10]);
    let uds = std::env::temp_dir().join(format!("vmm-{}-fuzz-vsock.sock", std::process::id()));
    let vsock = vmm::virtio::DeviceConfig::Vsock {
        cid: 3,
        uds: uds.clone(),
    };
    let e = snapshot_with("fuzz_blk", 16 * MIB, vec![blk(&disk), vsock]).unwrap_err();
    let _ = std::fs::remove_file(&uds);
    assert!(
        e.contains("virtio-vsock device in slot 1 cannot be part of a fuzzing target"),
        "{e}"
    );
}

/// Waits until `snap` has its next clone's KVM VM made ahead.
fn wait_for_spare(snap: &Snapshot, round: usize) {
    let start = std::time::Instant::now();
    while !snap.spare_ready() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no clone made ahead before clone {round}"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Every clone taken finds the next one's KVM VM and vCPU made ahead in
/// time (none is lost to a race between taking and refilling), a clone
/// made from them runs as one made from scratch, turning it off still
/// gives clones, and the snapshot's end leaves no frame behind.
#[test]
fn clones_are_made_ahead_one_after_another() {
    let snap = snapshot("fuzz_planted", 16 * MIB);
    let ctx = snap.memory().context().clone();
    let baseline = ctx.stats().resident;
    for round in 0..300 {
        wait_for_spare(&snap, round);
        let mut t = target(&snap, Limits::default());
        if round % 50 == 0 {
            assert_eq!(run(&mut t, b"FUZZ!").0, Verdict::Fail(7), "round {round}");
            assert_eq!(run(&mut t, b"hello").0, Verdict::Ok, "round {round}");
        }
    }
    snap.make_clones_ahead(false);
    let mut t = target(&snap, Limits::default());
    assert_eq!(run(&mut t, b"FUZZ!").0, Verdict::Fail(7));
    assert!(!snap.spare_ready(), "a clone made ahead while turned off");
    drop(t);
    snap.make_clones_ahead(true);
    wait_for_spare(&snap, 301);
    assert_eq!(
        ctx.stats().resident,
        baseline,
        "a clone made ahead holds frames"
    );
    drop(snap);
    assert_eq!(ctx.stats().resident, 0, "frames left after the snapshot");
}
