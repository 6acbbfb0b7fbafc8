//! virtio-balloon, and virtio-blk across VM fork, in real VMs.

use std::sync::PoisonError;
use std::time::Duration;

use devices::virtio::balloon::Balloon;
use devices::virtio::blk::BlockConfig;
use guest_tests::{MIB, Running, Scratch, assert_exit, guest};
use vmm::virtio::DeviceConfig;

/// A scratch file that is removed when dropped.
#[test]
fn balloon_inflates_and_deflates_and_reports_statistics() {
    let vm = Running::start_with(
        guest("virtio_balloon"),
        64 * MIB,
        1,
        vec![DeviceConfig::Balloon],
    );
    let device = vm.devices[0].clone();
    let (outcome, console) = vm.finish();
    assert_exit(&outcome, &console, 0);
    assert!(console.contains("VIRTIO-BALLOON-OK"), "{console}");
    let t = device.lock().unwrap_or_else(PoisonError::into_inner);
    let b = t
        .device()
        .as_any()
        .downcast_ref::<Balloon>()
        .expect("slot 0 is the balloon");
    let s = b.state();
    assert_eq!(s.actual, 7, "the driver's last `actual`");
    assert_eq!(s.stats, vec![(4, 0x123_4000)], "statistics");
    assert_eq!(s.inflated, 0, "everything was deflated");
    assert!(s.discarded >= 256 - 8, "frames dropped: {}", s.discarded);
}

#[test]
fn blk_requests_in_flight_and_clone_writes_across_fork() {
    let img: Vec<u8> = (0..1024 * 512).map(|o| ((o / 512) as u8) ^ 0xa5).collect();
    let disk = Scratch::new("virtio-fork.img", &img);
    let config = BlockConfig {
        latency: Some(Duration::from_millis(200)),
        ..BlockConfig::new(disk.0.clone())
    };
    let vm = Running::start_with(
        guest("virtio_fork"),
        64 * MIB,
        1,
        vec![DeviceConfig::Blk(config)],
    );
    let (outcome, console) = vm.finish();
    assert_exit(&outcome, &console, 0);
    assert!(console.contains("VIRTIO-FORK-OK"), "{console}");
    let after = std::fs::read(&disk.0).unwrap();
    assert!(
        after[200 * 512..208 * 512].iter().all(|b| *b == 0xee),
        "the parent's write reached the file"
    );
    assert!(
        after[300 * 512..308 * 512] == img[300 * 512..308 * 512],
        "a clone's write reached the file"
    );
}
