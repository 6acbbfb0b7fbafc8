//! virtio-blk in real VMs: a program-mode guest drives the device with its
//! own driver (guests/virtio.h) and the host checks the disk files.
use devices::virtio::blk::BlockConfig;
use guest_tests::{MIB, Options, Running, Scratch, assert_exit, guest};
use vmm::virtio::DeviceConfig;

fn blk(s: &Scratch, read_only: bool) -> DeviceConfig {
    DeviceConfig::Blk(BlockConfig {
        read_only,
        ..BlockConfig::new(s.0.clone())
    })
}

#[test]
fn blk_reads_writes_flushes_and_the_file_keeps_the_data() {
    reads_writes_flushes(None);
}

/// The same I/O while reclaim keeps swapping the guest's pages out: the
/// device's pins bring them back in, and pinned pages are never evicted.
#[test]
fn blk_io_is_right_under_a_64k_memory_limit() {
    reads_writes_flushes(Some(64 << 10));
}

fn reads_writes_flushes(mem_limit: Option<u64>) {
    let mut img = vec![0u8; 512 << 10];
    for (i, b) in img[..4096].iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    img[32 * 512..48 * 512].fill(0xff);
    let tag = mem_limit.map_or(String::new(), |l| format!("-{l}"));
    let disk = Scratch::new(&format!("virtio-blk{tag}.img"), &img);
    let ro = Scratch::new(&format!("virtio-blk-ro{tag}.img"), &[0x42; 4096]);
    let opts = Options {
        mem_limit,
        devices: vec![blk(&disk, false), blk(&ro, true)],
        ..Options::new(64 * MIB, 1)
    };
    let vm = Running::start_opts(guest("virtio_blk"), &opts);
    let ctx = vm.memory.context().clone();
    let (outcome, console) = vm.finish();
    assert_exit(&outcome, &console, 0);
    assert!(console.contains("VIRTIO-BLK-OK"), "{console}");
    if mem_limit.is_some() {
        let stats = ctx.stats();
        assert!(
            stats.swap_ins > 0,
            "the limit never sent a page to swap and back: {stats:?}"
        );
    }
    let after = disk.read();
    assert_eq!(after.len(), 512 << 10, "the file keeps its size");
    for i in 0..4096 {
        assert_eq!(
            after[16 * 512 + i],
            (i ^ 0x5a) as u8,
            "byte {i} of the write"
        );
    }
    assert!(after[32 * 512..48 * 512].iter().all(|b| *b == 0), "zeroed");
    assert_eq!(
        ro.read(),
        vec![0x42; 4096],
        "the read-only file is unchanged"
    );
}

#[test]
fn hostile_drivers_get_errors_or_a_reset_and_the_device_recovers() {
    let disk = Scratch::new("virtio-hostile.img", &[0x42; 64 << 10]);
    let vm = Running::start_with(
        guest("virtio_hostile"),
        64 * MIB,
        1,
        vec![blk(&disk, false)],
    );
    let (outcome, console) = vm.finish();
    assert_exit(&outcome, &console, 0);
    assert!(console.contains("VIRTIO-HOSTILE-OK"), "{console}");
}
