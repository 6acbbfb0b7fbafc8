//! Snapshot files and restore: a program snapshotted while it runs goes on
//! in a new VM with the same memory and registers, its memory read lazily;
//! damaged or foreign files are refused with clear errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use guest_tests::{MIB, Running, assert_exit, guest, hypervisor};
use vmm::{Exit, Sink, Vm, VmmError};

const FLAG: u64 = 0x30_0000;

/// A fresh directory for one test's files.
fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("restore-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs snap_counter until it spins, saves it to `mem` and `state`, and
/// stops it.
fn save(mem: &Path, state: &Path) {
    let vm = Running::start(guest("snap_counter"), 64 * MIB, 2);
    vm.wait_until("the guest is ready", |v| v.console().contains("ready"));
    let image = std::fs::File::create_new(mem).unwrap();
    let report = vm
        .handle()
        .snapshot_to_files(image, state, true, |_, _| {})
        .unwrap_or_else(|e| panic!("snapshot: {}", vmm::error_chain(&e)));
    assert!(report.pages >= 256, "{report:?}");
    vm.handle().stop(Exit::Code(0));
    let (_, console) = vm.finish();
    assert_eq!(console, "ready\n");
}

fn restore(ctx: &Arc<memory::Context>, mem: &Path, state: &Path) -> Result<Vm, VmmError> {
    Vm::restore(&hypervisor(), ctx, state, mem, Sink::Stdout)
}

/// A restored VM (its context and console) and the directory of its files.
struct Restored {
    dir: PathBuf,
    ctx: Arc<memory::Context>,
    vm: Vm,
    console: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Restored {
    fn new(name: &str) -> Self {
        let dir = dir(name);
        let (mem, state) = (dir.join("vm.mem"), dir.join("vm.state"));
        save(&mem, &state);
        let ctx = memory::Context::new(memory::Config::default());
        let (sink, console) = Sink::capture();
        let vm = Vm::restore(&hypervisor(), &ctx, &state, &mem, sink)
            .unwrap_or_else(|e| panic!("restore: {}", vmm::error_chain(&e)));
        Self {
            dir,
            ctx,
            vm,
            console,
        }
    }

    fn console(console: &std::sync::Mutex<Vec<u8>>) -> String {
        String::from_utf8_lossy(&console.lock().unwrap()).into_owned()
    }
}

#[test]
fn a_restored_program_goes_on_with_its_memory_and_registers() {
    let r = Restored::new("counter");
    // Lazy: the first MiB and the ring-0 stacks were brought in, nothing
    // else of the 1 MiB of data and the program.
    let s = r.ctx.stats();
    assert!(s.image_pages >= 256, "{s:?}");
    assert!(s.image_loads < 64, "restore read pages eagerly: {s:?}");
    r.vm.memory().write(FLAG, &1u64.to_le_bytes()).unwrap();
    let outcome = r.vm.run().unwrap();
    let console = Restored::console(&r.console);
    assert_exit(&outcome, &console, 42);
    assert_eq!(
        console,
        "after: counter 1001, r12 1001, xmm7 1001, data intact\n"
    );
    assert!(outcome.stats.image_loads >= 256, "{:?}", outcome.stats);
    std::fs::remove_dir_all(&r.dir).unwrap();
}

#[test]
fn a_restored_vm_forks_and_its_clone_sees_the_same_memory() {
    let mut r = Restored::new("fork");
    r.vm.start().unwrap();
    let clone = r.vm.fork().unwrap();
    clone.memory().write(FLAG, &1u64.to_le_bytes()).unwrap();
    let out = clone.wait();
    assert_eq!(out.exit, Exit::Code(42));
    r.vm.memory().write(FLAG, &1u64.to_le_bytes()).unwrap();
    let outcome = r.vm.wait();
    let console = Restored::console(&r.console);
    assert_exit(&outcome, &console, 42);
    let line = "after: counter 1001, r12 1001, xmm7 1001, data intact\n";
    assert!(console.ends_with(&format!("[1] {line}{line}")), "{console}");
    std::fs::remove_dir_all(&r.dir).unwrap();
}

#[test]
fn damaged_and_mismatched_files_are_refused() {
    let d = dir("damaged");
    let (mem, state) = (d.join("vm.mem"), d.join("vm.state"));
    save(&mem, &state);
    let ctx = memory::Context::new(memory::Config::default());
    let refused = |mem: &Path, state: &Path| match restore(&ctx, mem, state) {
        Ok(_) => panic!("restored from {} and {}", state.display(), mem.display()),
        Err(e) => vmm::error_chain(&e),
    };
    // The memory file given as the state file.
    let e = refused(&mem, &mem);
    assert!(e.contains("is not a snapshot state file"), "{e}");
    // A truncated memory file.
    let short = d.join("short.mem");
    std::fs::copy(&mem, &short).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&short)
        .unwrap()
        .set_len(0x40_0000)
        .unwrap();
    let e = refused(&short, &state);
    assert!(e.contains("is truncated or not the one saved"), "{e}");
    // A damaged data page: the VM ends with an error naming the file.
    let bad = d.join("bad.mem");
    std::fs::copy(&mem, &bad).unwrap();
    let f = std::fs::File::options().write(true).open(&bad).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xff; 8], 0x108_0000).unwrap();
    let vm = restore(&ctx, &bad, &state).unwrap();
    vm.memory().write(FLAG, &1u64.to_le_bytes()).unwrap();
    let outcome = vm.run().unwrap();
    match &outcome.exit {
        Exit::Error(e) => {
            assert!(e.contains("fails its checksum"), "{e}");
            assert!(e.contains(&bad.display().to_string()), "{e}");
        }
        other => panic!("a damaged page was handed to the guest: {other:?}"),
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn snapshot_files_of_a_vm_with_virtio_devices_are_refused() {
    let d = dir("virtio");
    let vm = Running::start_with(
        guest("snap_counter"),
        64 * MIB,
        1,
        vec![vmm::virtio::DeviceConfig::Balloon],
    );
    vm.wait_until("the guest is ready", |v| v.console().contains("ready"));
    let image = std::fs::File::create_new(d.join("vm.mem")).unwrap();
    let e = vm
        .handle()
        .snapshot_to_files(image, &d.join("vm.state"), true, |_, _| {})
        .expect_err("a VM with a balloon was saved");
    let e = vmm::error_chain(&e);
    assert!(e.contains("without virtio devices only"), "{e}");
    assert!(!d.join("vm.state").exists());
    vm.handle().stop(Exit::Code(0));
    let _ = vm.finish();
    std::fs::remove_dir_all(&d).unwrap();
}
