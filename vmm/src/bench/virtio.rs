//! Benchmarks of the virtio devices, each next to its baseline: block
//! reads from a program-mode guest next to a host thread's `pread` of
//! the same file, the pin + unpin share of a request, the cost devices
//! with requests in flight add to a fork, and frames through a TAP.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use devices::virtio::blk::BlockConfig;
use devices::virtio::buffers::PinCache;
use devices::virtio::{Buffers, Desc};
use memory::{PAGE_SIZE, VmMemory};

use super::{Bench, goal, median};
use crate::virtio::DeviceConfig;
use crate::vm::{Exit, VmmError};

/// The benchmark disk: in the page cache, as the goal says.
const DISK: u64 = 64 << 20;
/// The disk of the uncached runs: large enough that their reads seldom
/// hit what earlier reads brought into the cache.
const COLD_DISK: u64 = 512 << 20;
const SECTOR: u64 = 512;
const VM_MEM: u64 = 64 << 20;

pub(super) fn io(e: std::io::Error) -> VmmError {
    VmmError::Thread(e)
}

/// A scratch file removed on drop.
pub(super) struct Scratch(pub(super) PathBuf);

impl Scratch {
    /// A file of `len` bytes, written and read once so that it is cached.
    fn disk(len: u64) -> Result<Self, VmmError> {
        let path = std::env::temp_dir().join(format!("vmm-bench-{}.img", std::process::id()));
        let chunk: Vec<u8> = (0..1 << 20).map(|i| i as u8).collect();
        let f = std::fs::File::create(&path).map_err(io)?;
        for at in (0..len).step_by(chunk.len()) {
            f.write_all_at(&chunk, at).map_err(io)?;
        }
        let _ = std::fs::read(&path).map_err(io)?;
        Ok(Self(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Random 4 KiB `pread`s per second of a host thread on `path`, and the
/// thread's CPU time per read in nanoseconds.
fn host_pread_iops(path: &PathBuf, n: u64) -> Result<(f64, f64), VmmError> {
    let f = std::fs::File::open(path).map_err(io)?;
    let mut buf = vec![0u8; 4096];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let (t, cpu) = (Instant::now(), thread_cpu_ns());
    for _ in 0..n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let block = x.wrapping_mul(0x2545_f491_4f6c_dd1d) % (DISK / 4096);
        f.read_exact_at(&mut buf, block * 4096).map_err(io)?;
    }
    let cpu = (thread_cpu_ns() - cpu) as f64 / n as f64;
    Ok((n as f64 / t.elapsed().as_secs_f64(), cpu))
}

/// Pin + unpin of a block request's three buffers (16-byte header, 4 KiB
/// of data, the status byte) per request, as the device pins them: through
/// its cache of page pins, 32 requests in flight. With `reused`, each of
/// the 32 slots keeps its header, data page and status byte, as the QD32
/// guest's driver does; otherwise every request reads into a page the
/// cache has not seen (a driver reading into ever new pages).
fn request_pin_cost(n: u32, reused: bool) -> Result<f64, VmmError> {
    let ctx = memory::Context::new(memory::Config::default());
    let mem = VmMemory::new(&ctx, crate::vm::ram_layout(16 << 20)?)?;
    mem.populate(0x10_0000, 0x40_0000, memory::Access::Write)?;
    let desc = |addr, len, write| Desc {
        addr,
        len,
        write,
        indirect: false,
    };
    let mut cache = PinCache::default();
    let mut batch = Vec::with_capacity(32);
    let t = Instant::now();
    for i in 0..u64::from(n) {
        let k = i % 32;
        let data = if reused { k } else { i % 1024 };
        let chain = [
            desc(0x48_0000 + k * 16, 16, false),
            desc(0x10_0000 + data * PAGE_SIZE, 4096, true),
            desc(0x48_1000 + k, 1, true),
        ];
        let bufs = Buffers::pin_with(&mem, &chain, true, 1 << 20, Some(&mut cache))
            .map_err(|e| VmmError::Config(e.to_string()))?;
        batch.push(bufs);
        if batch.len() == 32 {
            batch.clear();
        }
    }
    drop(batch);
    Ok(t.elapsed().as_secs_f64() / f64::from(n))
}

fn blk_device(path: &std::path::Path, latency: Option<Duration>) -> DeviceConfig {
    DeviceConfig::Blk(BlockConfig {
        latency,
        ..BlockConfig::new(path.to_path_buf())
    })
}

/// Drops `path` from the page cache.
fn uncache(path: &std::path::Path) -> Result<(), VmmError> {
    let f = std::fs::File::open(path).map_err(io)?;
    f.sync_all().map_err(io)?;
    // SAFETY: posix_fadvise on a descriptor we own; no memory is involved.
    match unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) } {
        0 => Ok(()),
        e => Err(io(std::io::Error::from_raw_os_error(e))),
    }
}

/// CPU time of this process's threads whose names start with one of
/// `prefixes` (from `/proc/self/task/*/schedstat`), in nanoseconds.
fn threads_cpu_ns(prefixes: &[&str]) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut total = 0;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !prefixes.iter().any(|p| comm.starts_with(p)) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// Runs `f` while a sampler thread records the CPU time the device's
/// threads (its device thread, I/O threads and io_uring workers, all
/// started by `f`) have used; the last sample before `f` returned, in
/// nanoseconds.
fn with_device_cpu<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let (done, last) = (AtomicBool::new(false), AtomicU64::new(0));
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let ns = threads_cpu_ns(&["virtio", "iou-"]);
                last.fetch_max(ns, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let r = f();
        done.store(true, Ordering::Relaxed);
        r
    });
    (r, last.load(Ordering::Relaxed))
}

/// One block run: guest IOPS and device-thread CPU time per request.
struct BlkRun {
    iops: f64,
    device_ns: f64,
}

/// How a block run reads.
#[derive(Clone, Copy)]
struct BlkMode {
    /// Through io_uring (else the thread pool).
    io_uring: bool,
    /// With the image dropped from the page cache first.
    uncached: bool,
}

impl Bench {
    /// Guest IOPS of random 4 KiB reads at queue depth `depth`.
    fn blk_iops(
        &mut self,
        (disk, size): (&Scratch, u64),
        (depth, n): (u64, u64),
        mode: BlkMode,
        tsc: f64,
    ) -> Result<BlkRun, VmmError> {
        let words = [6, n, 0, 0, tsc as u64, depth, size / SECTOR];
        let device = DeviceConfig::Blk(BlockConfig {
            io_uring: mode.io_uring,
            ..BlockConfig::new(disk.0.clone())
        });
        if mode.uncached {
            uncache(&disk.0)?;
        }
        let vm = self.vm_with(VM_MEM, 1, &words, vec![device])?;
        let mem = vm.memory().clone();
        let (r, cpu) = with_device_cpu(|| self.run_to_exit(vm, "virtio-blk"));
        r?;
        Ok(BlkRun {
            iops: n as f64 / (Self::mailbox(&mem, 2) as f64 / tsc),
            device_ns: cpu as f64 / n as f64,
        })
    }

    /// virtio-blk random reads at QD1 and QD32 next to a host thread's
    /// `pread`; reads of an uncached image through io_uring and through
    /// the thread pool; the pin + unpin share of a request.
    pub(super) fn virtio_blk(&mut self, tsc: f64) -> Result<(), VmmError> {
        // Measured first, while no VM's teardown or disk writeback competes
        // for the CPUs; the median of five passes after one to warm up.
        let n = if self.quick { 400 } else { 100_000 };
        let cost = |reused| -> Result<f64, VmmError> {
            request_pin_cost(n, reused)?;
            let runs = (0..5)
                .map(|_| request_pin_cost(n, reused).map(Duration::from_secs_f64))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(median(runs).as_secs_f64())
        };
        let (pin_reused, pin_new) = (cost(true)?, cost(false)?);
        let disk = Scratch::disk(DISK)?;
        let (n1, n32, cold) = if self.quick {
            (500, 2_000, 200)
        } else {
            (20_000, 100_000, 2_000)
        };
        let (host, host_cpu) = host_pread_iops(&disk.0, n32)?;
        self.record(
            "host thread, random 4 KiB pread of a cached file",
            format!("{:.0} IOPS", host),
            format!("baseline; {:.2} us of CPU time per read", host_cpu / 1e3),
        );
        let cached = BlkMode {
            io_uring: true,
            uncached: false,
        };
        let qd1 = self.blk_iops((&disk, DISK), (1, n1), cached, tsc)?;
        let qd32 = self.blk_iops((&disk, DISK), (32, n32), cached, tsc)?;
        self.record(
            "virtio-blk random 4 KiB reads, QD1, guest",
            format!("{:.0} IOPS", qd1.iops),
            format!("{:.2}x the host thread (reported)", qd1.iops / host),
        );
        let ratio = qd32.iops / host;
        self.record(
            "virtio-blk random 4 KiB reads, QD32, guest",
            format!("{:.0} IOPS", qd32.iops),
            goal(
                ratio >= 0.5,
                &format!("{ratio:.2}x the host thread, goal >= 0.5x"),
            ),
        );
        self.record(
            "  device threads' CPU time per request, QD1 / QD32",
            format!(
                "{:.2} / {:.2} us",
                qd1.device_ns / 1e3,
                qd32.device_ns / 1e3
            ),
            "reported".into(),
        );
        let share = pin_reused * qd32.iops;
        self.record(
            "pin + unpin of a request's 3 buffers / QD32 request (buffers reused)",
            format!("{:.0} ns", pin_reused * 1e9),
            goal(
                share <= 0.05,
                &format!("{:.1}% of a request, goal <= 5%", share * 100.0),
            ),
        );
        self.record(
            "  the same, every data page new to the device",
            format!("{:.0} ns", pin_new * 1e9),
            format!(
                "{:.1}% of a request (reported)",
                pin_new * qd32.iops * 100.0
            ),
        );
        drop(disk);
        let cold_disk = Scratch::disk(if self.quick { DISK } else { COLD_DISK })?;
        let size = std::fs::metadata(&cold_disk.0).map_err(io)?.len();
        for io_uring in [true, false] {
            let mode = BlkMode {
                io_uring,
                uncached: true,
            };
            let run = self.blk_iops((&cold_disk, size), (32, cold), mode, tsc)?;
            let how = if io_uring {
                "io_uring"
            } else {
                "2 I/O threads"
            };
            self.record(
                &format!("virtio-blk random 4 KiB reads, uncached, QD32, {how}"),
                format!("{:.0} IOPS", run.iops),
                "reported".into(),
            );
        }
        Ok(())
    }

    /// Fork time of a VM whose block device has `depth` requests in
    /// flight (they take a second each), and the frames the fork copied.
    fn fork_in_flight(&mut self, depth: u64) -> Result<(Duration, u64), VmmError> {
        let disk = Scratch::disk(1 << 20)?;
        let latency = Some(Duration::from_secs(1));
        let words = [7, 0, 0, 0, 0, depth, (1 << 20) / SECTOR];
        let mut vm = self.vm_with(VM_MEM, 1, &words, vec![blk_device(&disk.0, latency)])?;
        let transport = vm.virtio().transport(0).cloned();
        vm.start()?;
        let held = || {
            transport.as_ref().map_or(0, |t| {
                let t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                t.queues()[0].held.len() as u64
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while held() < depth && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
        let ctx = vm.memory().context().clone();
        let (mut times, mut copied) = (Vec::new(), 0);
        for _ in 0..3 {
            let before = ctx.stats().copied;
            let t = Instant::now();
            let child = vm.fork()?;
            times.push(t.elapsed());
            copied = ctx.stats().copied - before;
            child.stop(Exit::Code(0));
            let _ = child.wait();
        }
        let in_flight = held();
        vm.stop(Exit::Code(0));
        let _ = vm.wait();
        if in_flight < depth {
            return Err(VmmError::Config(format!(
                "only {in_flight} of {depth} requests were in flight at the forks"
            )));
        }
        Ok((median(times), copied))
    }

    /// The cost devices with requests in flight add to a fork.
    pub(super) fn fork_with_requests_in_flight(&mut self) -> Result<(), VmmError> {
        let (idle, idle_copied) = self.fork_in_flight(0)?;
        let (busy, busy_copied) = self.fork_in_flight(32)?;
        self.record(
            "VM fork, 64 MiB, virtio-blk idle",
            format!("{:.2} ms", idle.as_secs_f64() * 1e3),
            format!("baseline, {idle_copied} frames copied"),
        );
        let added = busy.saturating_sub(idle);
        self.record(
            "VM fork, 64 MiB, 32 virtio-blk requests in flight",
            format!("{:.2} ms", busy.as_secs_f64() * 1e3),
            format!(
                "+{:.0} us, {} more frames copied (the pinned buffers, R6)",
                added.as_secs_f64() * 1e6,
                busy_copied.saturating_sub(idle_copied)
            ),
        );
        Ok(())
    }

    /// Frames per second guest -> TAP -> a host UDP socket.
    pub(super) fn virtio_net(&mut self, tsc: f64) -> Result<(), VmmError> {
        let ns = match Netns::new() {
            Ok(ns) => ns,
            Err(why) => {
                self.record(
                    "virtio-net guest -> TAP -> host",
                    "not measured".into(),
                    format!("needs root and iproute2: {why}"),
                );
                return Ok(());
            }
        };
        let n = if self.quick { 2_000 } else { 200_000 };
        for size in [64u64, 1514] {
            let (sent_per_s, received) =
                std::thread::scope(|s| s.spawn(|| self.net_run(&ns, size, n, tsc)).join())
                    .map_err(|_| {
                        VmmError::Config("the network benchmark thread panicked".into())
                    })??;
            let bits = sent_per_s * (size * 8) as f64;
            self.record(
                &format!("virtio-net guest -> TAP -> host, {size}-byte frames"),
                format!("{:.0} pkt/s", sent_per_s),
                format!(
                    "{:.2} Gbit/s; the host socket took {:.0}% of them",
                    bits / 1e9,
                    received as f64 * 100.0 / n as f64
                ),
            );
        }
        Ok(())
    }

    /// One network run inside `ns`: frames per second the guest sent, and
    /// how many a host UDP socket received.
    fn net_run(&mut self, ns: &Netns, size: u64, n: u64, tsc: f64) -> Result<(f64, u64), VmmError> {
        ns.enter()?;
        let sock = UdpSocket::bind("10.0.0.1:5000").map_err(io)?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(io)?;
        let net =
            DeviceConfig::parse_net(&format!("tap={}", Netns::TAP)).map_err(VmmError::Config)?;
        let vm = self.vm_with(VM_MEM, 1, &[8, n, 0, 0, tsc as u64, size], vec![net])?;
        let mem = vm.memory().clone();
        let (done, received) = (AtomicBool::new(false), AtomicU64::new(0));
        let outcome = std::thread::scope(|s| {
            s.spawn(|| {
                let mut buf = [0u8; 2048];
                while !done.load(Ordering::Relaxed) {
                    if sock.recv(&mut buf).is_ok() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            let outcome = vm.run();
            std::thread::sleep(Duration::from_millis(100));
            done.store(true, Ordering::Relaxed);
            outcome
        })?;
        if outcome.exit != Exit::Code(0) {
            return Err(VmmError::Config(format!(
                "virtio-net guest ended {:?}: {}",
                outcome.exit,
                self.console_text()
            )));
        }
        let secs = Self::mailbox(&mem, 2) as f64 / tsc;
        Ok((n as f64 / secs, received.load(Ordering::Relaxed)))
    }
}

/// A network namespace with a TAP device at 10.0.0.1, deleted on drop.
struct Netns(String);

impl Netns {
    const TAP: &str = "vmmbench0";

    fn ip(&self, args: &[&str]) -> Result<(), String> {
        let mut full = vec!["netns", "exec", &self.0, "ip"];
        full.extend_from_slice(args);
        run_ip(&full)
    }

    fn new() -> Result<Self, String> {
        let name = format!("vmm-bench-{}", std::process::id());
        run_ip(&["netns", "add", &name])?;
        let ns = Self(name);
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.ip(&["tuntap", "add", "dev", Self::TAP, "mode", "tap", "vnet_hdr"])?;
        ns.ip(&["link", "set", Self::TAP, "address", "02:00:00:00:00:01"])?;
        ns.ip(&["addr", "add", "10.0.0.1/24", "dev", Self::TAP])?;
        ns.ip(&["link", "set", Self::TAP, "up"])?;
        Ok(ns)
    }

    /// Moves the calling thread into the namespace.
    fn enter(&self) -> Result<(), VmmError> {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.0)).map_err(io)?;
        // SAFETY: setns on a namespace descriptor we opened; it changes
        // only this thread's network namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run_ip(&["netns", "del", &self.0]);
    }
}

fn run_ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}
