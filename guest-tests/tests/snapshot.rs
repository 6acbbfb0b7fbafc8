//! Live snapshots of a running guest: the image is one instant of a guest
//! that never stops writing.

use std::fs::File;
use std::os::unix::fs::FileExt;

use guest_tests::{MIB, Running, guest};
use vmm::Exit;

/// An unlinked scratch file.
fn scratch() -> File {
    memory::open_unlinked(&std::env::temp_dir()).unwrap()
}

fn u64_at(f: &File, gpa: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, gpa).unwrap();
    u64::from_le_bytes(b)
}

/// The number after `key=` on the console.
fn field(console: &str, key: &str) -> u64 {
    let at = console
        .find(key)
        .unwrap_or_else(|| panic!("no {key} in {console}"))
        + key.len();
    console[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("bad {key} in {console}"))
}

#[test]
fn a_live_snapshot_is_one_instant_of_a_guest_that_keeps_writing() {
    let vm = Running::start(guest("generations"), 64 * MIB, 1);
    vm.wait_until("the guest printed its layout", |v| {
        v.console()
            .split_once("pages=")
            .is_some_and(|(_, rest)| rest.contains('\n'))
    });
    let console = vm.console();
    let (header, area, pages) = (
        field(&console, "header="),
        field(&console, "area="),
        field(&console, "pages="),
    );
    vm.wait_until("generation 3", |v| v.read_u64(header) >= 3);
    let image = scratch();
    let report = vm
        .handle()
        .snapshot_live(image.try_clone().unwrap(), |_, _| {})
        .unwrap_or_else(|e| panic!("snapshot: {}", vmm::error_chain(&e)));
    let after = (vm.read_u64(header), vm.read_u64(header + 8));
    vm.handle().stop(Exit::Code(0));
    let _ = vm.finish();

    // The pages: generation G up to page j, G - 1 from there on.
    let gens: Vec<u64> = (0..pages)
        .map(|i| u64_at(&image, area + i * 2 * 4096))
        .collect();
    let g = gens[0];
    let j = gens.iter().position(|x| *x != g).unwrap_or(gens.len());
    assert!(
        gens[j..].iter().all(|x| *x + 1 == g),
        "not one instant: generation {g} up to page {j}, then {:?}",
        &gens[j..(j + 8).min(gens.len())]
    );
    // The header names the last page written, or the one before.
    let (hg, hi) = (u64_at(&image, header), u64_at(&image, header + 8));
    let consistent = (hg == g && (hi + 1 == j as u64 || hi + 2 == j as u64))
        || (hg + 1 == g && hi + 1 == pages && j <= 1);
    assert!(
        consistent,
        "header ({hg}, {hi}) against pages: {g} up to page {j}"
    );
    assert_ne!(after, (hg, hi), "the guest did not run after the snapshot");
    assert!(report.memory.pages >= pages, "{report:?}");
    assert!(
        report.pause < report.total,
        "the guest was paused for the whole snapshot: {report:?}"
    );
    eprintln!("{report:?}");
}

/// A block read still on a slow disk when a live snapshot is taken is
/// waited for first: the image holds it done (its data in the buffer, its
/// head in the used ring), never half-written.
#[test]
fn a_live_snapshot_waits_for_the_block_requests_in_flight() {
    let disk = guest_tests::Scratch::new("snap-blk.img", &[0x5a; 64 << 10]);
    let blk = vmm::virtio::DeviceConfig::Blk(devices::virtio::blk::BlockConfig {
        latency: Some(std::time::Duration::from_millis(1000)),
        ..devices::virtio::blk::BlockConfig::new(disk.0.clone())
    });
    let vm = Running::start_with(guest("snap_blk"), 16 * MIB, 1, vec![blk]);
    vm.wait_until("the read was submitted", |v| {
        v.console().contains("submitted")
    });
    // The guest's notification reaches the device's thread a moment after
    // the guest prints; a request the device has not taken yet is not in
    // flight, and the snapshot rightly does not wait for it. Give the
    // device time to take it (the disk then holds it for a second).
    std::thread::sleep(std::time::Duration::from_millis(200));
    let console = vm.console();
    let (buf, used) = (field(&console, "buf="), field(&console, "used="));
    let image = scratch();
    let report = vm
        .handle()
        .snapshot_live(image.try_clone().unwrap(), |_, _| {})
        .unwrap_or_else(|e| panic!("snapshot: {}", vmm::error_chain(&e)));
    vm.handle().stop(Exit::Code(0));
    let _ = vm.finish();
    let mut idx = [0u8; 2];
    image.read_exact_at(&mut idx, used + 2).unwrap();
    assert_eq!(
        u16::from_le_bytes(idx),
        1,
        "the read was not done at the instant ({report:?})"
    );
    let mut data = vec![0u8; 4096];
    image.read_exact_at(&mut data, buf).unwrap();
    assert!(
        data.iter().all(|&b| b == 0x5a),
        "the buffer is not the disk's"
    );
}
