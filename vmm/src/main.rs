//! `vmm`: the command line.

mod fuzz_cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use vmm::linux::LinuxBoot;
use vmm::virtio::DeviceConfig;
use vmm::{Boot, Exit, Hypervisor, Sink, Vm, VmConfig, error_chain};

#[derive(Parser, Debug)]
#[command(
    name = "vmm",
    version,
    about = "A KVM hypervisor whose guest memory behaves like Linux anonymous memory",
    long_about = "A KVM hypervisor whose guest memory behaves like Linux anonymous memory: \
                  allocated on first touch, copy-on-write between clones, and pinned \
                  reliably for devices.\n\n\
                  Start with `vmm run` (a built-in demo), then `vmm run --program P.elf` \
                  for your own static x86-64 program or `vmm run --kernel vmlinux` for Linux."
)]
struct Cli {
    /// Log level for VMM diagnostics on stderr: error, warn, info, debug, trace.
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL", value_parser = parse_level)]
    log_level: log::LevelFilter,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a VM: a static ELF program, a Linux kernel, or (with neither) the built-in demo.
    #[command(after_long_help = RUN_HELP)]
    Run(Box<RunArgs>),
    /// Measure the figures the VMM is held to (exit costs, fork, copy-on-write, pins), each
    /// next to its baseline, in one run.
    Bench(BenchArgs),
    /// Snapshot a running VM's memory while it runs, through its API socket.
    #[command(after_long_help = SNAPSHOT_HELP)]
    Snapshot(SnapshotArgs),
    /// Run a VM again from the files `vmm snapshot --state` wrote, from the instant of the
    /// snapshot; its memory is read from the memory file as the guest touches it.
    #[command(after_long_help = RESTORE_HELP)]
    Restore(RestoreArgs),
    /// Fuzz a program from its SNAPSHOT reset point: coverage-guided, one VM per job.
    #[command(after_long_help = fuzz_cli::FUZZ_HELP)]
    Fuzz(Box<fuzz_cli::FuzzArgs>),
    /// Serve afl-fuzz (AFL++'s forkserver protocol) with a program's VM, or run one input.
    #[command(after_long_help = fuzz_cli::FUZZ_TARGET_HELP)]
    FuzzTarget(fuzz_cli::FuzzTargetArgs),
}

const SNAPSHOT_HELP: &str = "\
The VM must have been started with --api-sock. The guest is paused only while its vCPUs save \
their state and its pages are write-protected; then it runs on while each page is copied out \
before its first write and the others in the background. Pages a device may write through a \
pin are copied at the start, so a VM with busy virtio devices snapshots consistently too.

The image is a sparse file: guest-physical byte A at offset A, holes for pages that were never \
touched or hold zeros. The file must not exist yet.

With --state FILE the VM's state at that instant (its vCPUs' registers, the UART, and an index of \
the image's pages with a checksum per run of pages) goes to FILE too, a new file: the two files \
are what `vmm restore` runs the VM again from. Program-mode VMs without virtio devices only, for \
now.

Example:
  vmm run --program server.elf --api-sock /tmp/vm.sock &
  vmm snapshot --api-sock /tmp/vm.sock --live --out /tmp/vm.mem --state /tmp/vm.state
  vmm restore --state /tmp/vm.state --mem-file /tmp/vm.mem";

const RESTORE_HELP: &str = "\
The state file is checked whole first (magic, version, length, CRC-64) and refused with a message \
if anything is wrong. The memory file is not read ahead: each page is read on the guest's (or a \
device's) first access to it, and the first access to a run of pages checks the run's checksum; \
a page that fails it ends the VM with an error naming the run and the file, never with wrong \
data. The memory file must not change while the restored VM runs. Exit status as for `vmm run`.";

#[derive(Args, Debug)]
struct SnapshotArgs {
    /// The API socket of the running VM (`vmm run --api-sock PATH`).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,

    /// Snapshot while the guest runs (the only kind so far; required).
    #[arg(long)]
    live: bool,

    /// The memory image to write: a new file.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,

    /// Also write the VM's state at the snapshot's instant to FILE, a new file (what
    /// `vmm restore` needs besides the memory image).
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct RestoreArgs {
    /// The state file `vmm snapshot --state` wrote.
    #[arg(long, value_name = "FILE")]
    state: PathBuf,

    /// The memory image `vmm snapshot --out` wrote with it.
    #[arg(long, value_name = "FILE")]
    mem_file: PathBuf,

    /// Print memory counters when the VM ends.
    #[arg(long)]
    stats: bool,

    /// Swap file for pages swapped out, as for `vmm run`.
    #[arg(long, value_name = "FILE")]
    swap: Option<PathBuf>,

    /// Listen on the Unix socket PATH (which must not exist) for `vmm snapshot`.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,

    /// Map guest RAM with 2 MiB pages, as `vmm run --huge` does: blocks the snapshot left
    /// empty get a 2 MiB frame on their first touch; blocks holding pages of the memory
    /// file stay on 4 KiB pages (COLLAPSE, or --collapse, merges them once read).
    #[arg(long)]
    huge: bool,

    /// With --huge: collapse in the background, as `vmm run --collapse` does.
    #[arg(long, requires = "huge")]
    collapse: bool,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Small sizes and few repetitions: checks that every benchmark runs, measures little.
    #[arg(long)]
    quick: bool,

    /// Run only these groups of figures (comma-separated): startup, hypercall, cow, pin,
    /// fork, virtio, swap, migration, snapshot, fuzz, restore, huge.
    #[arg(long, value_name = "GROUP[,GROUP...]", value_delimiter = ',')]
    only: Vec<String>,
}

const RUN_HELP: &str = "\
Program mode (--program): the file must be a static, non-PIE ELF64 x86-64 executable whose
PT_LOAD segments lie in RAM at or above 1 MiB. It starts in ring 3 with all RAM identity-mapped,
RSP at the top of low RAM and RDI = RAM size. It talks to the VMM through hypercalls
(`out dx, eax` with dx = 0x510, see the README) and serial port 0x3f8.

Exit status: the guest's EXIT code (low 8 bits); 3 if the guest faulted or stopped its CPU;
1 for a VMM error (bad arguments, bad files: nothing is started then).

Virtio devices (--blk, --net, --vsock, --balloon) are virtio-mmio version 2 devices in the window
[0xd0000000, 0xd0020000): slot i at 0xd0000000 + i * 0x1000, filled in the order the flags appear.
A kernel gets interrupt 5 + i for slot i and a `virtio_mmio.device=4K@ADDR:IRQ` entry per device
on its command line; a program drives them by polling the used rings. A fork's clone writes its
block devices copy-on-write (an in-memory overlay; the file keeps the root VM's writes only).

Examples:
  vmm run                                   the built-in demo
  vmm run --program hello.elf --mem 64M
  vmm run --program smp.elf --vcpus 2
  vmm run --program io.elf --blk disk.img --blk seed.img,ro --balloon
  vmm run --kernel vmlinux --cmdline 'console=ttyS0' --mem 512M --net tap=tap0";

#[derive(Args, Debug)]
struct RunArgs {
    /// Static x86-64 ELF program to run in program mode.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "initrd", "cmdline"])]
    program: Option<PathBuf>,

    /// Linux kernel to boot: a bzImage or an uncompressed ELF vmlinux (PVH entry preferred).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,

    /// Initial ramdisk for the kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STRING", requires = "kernel")]
    cmdline: Option<String>,

    /// Guest RAM: a multiple of 2 MiB, with a K, M, G or T suffix (binary units).
    #[arg(long, default_value = "256M", value_name = "SIZE", value_parser = parse_size)]
    mem: u64,

    /// Number of vCPUs. In program mode vCPU 0 runs the program and the others wait for
    /// the VCPU_START hypercall; a kernel starts them itself.
    #[arg(long, default_value_t = 1, value_name = "N")]
    vcpus: u32,

    /// Print memory counters (frames resident, shared, copied, pinned...) when the VM ends.
    #[arg(long)]
    stats: bool,

    /// A virtio block device on the file PATH (its size, in whole 512-byte sectors, is the
    /// disk's); `,ro` refuses writes. Repeatable.
    #[arg(long, value_name = "PATH[,ro]", value_parser = DeviceConfig::parse_blk)]
    blk: Vec<DeviceConfig>,

    /// A virtio network device on the existing TAP device NAME (the guest's MAC address is
    /// 52:54:00:12:34:56 unless given). Repeatable.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]", value_parser = DeviceConfig::parse_net)]
    net: Vec<DeviceConfig>,

    /// A virtio socket device for guest context id N (3 or more). The host connects to the Unix
    /// socket PATH and writes `CONNECT <port>\n` to reach guest port <port>; the guest's
    /// connections to host port <port> reach the Unix socket PATH_<port>.
    #[arg(long, value_name = "cid=N,uds=PATH", value_parser = DeviceConfig::parse_vsock)]
    vsock: Option<DeviceConfig>,

    /// A virtio memory balloon: pages the guest gives it are discarded (they read as zeros
    /// when touched again).
    #[arg(long)]
    balloon: bool,

    /// Pages made present together on a first touch (1 to 512, a power of two).
    #[arg(long, default_value_t = 16, value_name = "PAGES", value_parser = clap::value_parser!(u64).range(1..=512))]
    fault_around: u64,

    /// Swap file for pages swapped out (SWAP_OUT, --mem-limit): a new or empty file, emptied
    /// again at exit. Default: an unlinked file in the temporary directory ($TMPDIR or /tmp).
    #[arg(long, value_name = "FILE")]
    swap: Option<PathBuf>,

    /// Most guest RAM each VM keeps resident (K, M, G suffixes); colder pages go to swap.
    /// Pinned pages, the VMM's own first MiB in program mode and the few pages the faulting
    /// instruction needs are never taken, so a VM can exceed a tiny limit by those.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    mem_limit: Option<u64>,

    /// Map guest RAM with 2 MiB pages: the first touch of an empty 2 MiB-aligned block maps
    /// it whole with one 2 MiB frame (fewer faults, fewer entries to copy at fork); a block
    /// is split into 4 KiB pages where one page must go its own way (a copy-on-write, a
    /// discard, a write-protect, a swap-out). Needs 2 MiB pages for shared memory on the host
    /// (/sys/kernel/mm/transparent_hugepage/shmem_enabled set to advise); refused otherwise.
    #[arg(long, conflicts_with = "mem_limit")]
    huge: bool,

    /// Listen on the Unix socket PATH (which must not exist; removed at exit) for requests
    /// from other processes, such as `vmm snapshot --live`.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,

    /// Move guest frames in the background (every 100 ms, up to 256 pages per VM) so that
    /// pages scattered by copy-on-write merge back into fewer host mappings.
    #[arg(long)]
    compact: bool,

    /// With --huge: collapse in the background (every 100 ms, up to 16 blocks per VM) each
    /// 2 MiB block whose 512 pages are all present, exclusive, unpinned and unprotected into
    /// one 2 MiB frame, as Linux's khugepaged does (blocks split by a discard, a swap-out or
    /// a copy-on-write the other VM has since dropped). The guest's COLLAPSE call works
    /// without it.
    #[arg(long, requires = "huge")]
    collapse: bool,

    /// The input the fuzzing hypercall SNAPSHOT hands the program (default: an empty input),
    /// to replay a crash or hang a fuzzer saved. DONE(status) then ends the VM with exit code
    /// `status`, as EXIT does.
    #[arg(long, value_name = "FILE", requires = "program")]
    input: Option<PathBuf>,
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not one of off, error, warn, info, debug, trace"))
}

/// Parses "256M", "1G", "4096", "512KiB".
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 256M or 1G"))?;
    n.checked_mul(1u64 << shift)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("`{s}` is zero or too large"))
}

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "vmm: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

fn read_file(what: &str, path: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// The device flags of `run` in the order they appear on the command line.
fn devices_in_order(args: &RunArgs, matches: Option<&ArgMatches>) -> Vec<DeviceConfig> {
    in_flag_order(
        vec![
            ("blk", args.blk.clone()),
            ("net", args.net.clone()),
            ("vsock", args.vsock.clone().into_iter().collect()),
        ],
        args.balloon,
        matches,
    )
}

/// Devices given by the flags `flags` (id, values) and `--balloon`, in the
/// order the flags appear in `matches` (the subcommand's); without
/// matches, in the order given.
pub(crate) fn in_flag_order(
    flags: Vec<(&str, Vec<DeviceConfig>)>,
    balloon: bool,
    matches: Option<&ArgMatches>,
) -> Vec<DeviceConfig> {
    let mut found: Vec<(usize, DeviceConfig)> = Vec::new();
    let mut add = |id: &str, values: Vec<DeviceConfig>| {
        let indices: Vec<usize> = matches
            .and_then(|m| m.indices_of(id))
            .map(Iterator::collect)
            .unwrap_or_default();
        for (i, v) in values.into_iter().enumerate() {
            found.push((indices.get(i).copied().unwrap_or(usize::MAX), v));
        }
    };
    for (id, values) in flags {
        add(id, values);
    }
    let balloon = balloon
        && matches.is_none_or(|m| m.value_source("balloon") == Some(ValueSource::CommandLine));
    if balloon {
        add("balloon", vec![DeviceConfig::Balloon]);
    }
    found.sort_by_key(|(i, _)| *i);
    found.into_iter().map(|(_, d)| d).collect()
}

fn run(args: RunArgs, matches: Option<&ArgMatches>) -> Result<ExitCode, String> {
    let devices = devices_in_order(&args, matches);
    let boot = match (&args.program, &args.kernel) {
        (Some(p), _) => Boot::Program(read_file("program", p)?),
        (None, Some(k)) => Boot::Linux(LinuxBoot {
            kernel: read_file("kernel", k)?,
            initrd: args
                .initrd
                .as_ref()
                .map(|i| read_file("initrd", i))
                .transpose()?,
            cmdline: args
                .cmdline
                .clone()
                .unwrap_or_else(|| vmm::linux::DEFAULT_CMDLINE.into()),
        }),
        (None, None) => Boot::Program(vmm::guests::DEMO.to_vec()),
    };
    let config = VmConfig {
        mem: args.mem,
        vcpus: args.vcpus,
        boot,
        sink: Sink::Stdout,
        memory: memory::Config {
            fault_around: args.fault_around,
            swap_file: args.swap.clone(),
            huge: args.huge,
            ..memory::Config::default()
        },
        mem_limit: args.mem_limit,
        devices,
        input: args
            .input
            .as_ref()
            .map(|i| read_file("input", i))
            .transpose()?,
    };
    // Sizes are checked before the host's limits are weighed against them.
    vmm::vm::ram_layout(args.mem).map_err(|e| error_chain(&e))?;
    if args.huge {
        memory::huge_pages_available()?;
    }
    let hv = Hypervisor::open().map_err(|e| error_chain(&e))?;
    let ctx = memory::Context::new(config.memory.clone());
    if let Some(limit) = memory::max_map_count() {
        // Each island of touched pages may cost a host mapping; refuse
        // sizes the host's mapping limit cannot cover.
        let needed = args.mem / (memory::PAGE_SIZE * ctx.config().fault_around) + 4096;
        if limit < needed {
            return Err(format!(
                "--mem {} may need up to {needed} host memory mappings but vm.max_map_count is {limit}; \
                 raise it with `sysctl -w vm.max_map_count={}`",
                args.mem,
                needed.next_power_of_two()
            ));
        }
    }
    if args.swap.is_some() || args.mem_limit.is_some() {
        ctx.open_swap().map_err(|e| error_chain(&e))?;
    }
    let vm = Vm::new(&hv, &ctx, config).map_err(|e| error_chain(&e))?;
    let _compactor = args
        .compact
        .then(|| memory::Compactor::start(&ctx, std::time::Duration::from_millis(100), 256))
        .transpose()
        .map_err(|e| format!("cannot start the compactor: {e}"))?;
    let _collapser = args
        .collapse
        .then(|| memory::Collapser::start(&ctx, std::time::Duration::from_millis(100), 16))
        .transpose()
        .map_err(|e| format!("cannot start the collapser: {e}"))?;
    serve_and_wait(vm, args.api_sock.as_deref(), args.stats)
}

/// Starts `vm`, serves its API socket if asked, waits for its end and
/// reports it; the process's exit status.
fn serve_and_wait(
    mut vm: Vm,
    api_sock: Option<&std::path::Path>,
    stats: bool,
) -> Result<ExitCode, String> {
    vm.start().map_err(|e| error_chain(&e))?;
    let _api = match api_sock {
        Some(path) => match vmm::api::ApiSocket::serve(path, vm.stop_handle()) {
            Ok(api) => Some(api),
            Err(e) => {
                vm.stop(Exit::Error(e.to_string()));
                let _ = vm.wait();
                return Err(e.to_string());
            }
        },
        None => None,
    };
    let outcome = vm.wait();
    match &outcome.exit {
        Exit::Fault(f) => eprintln!("{f}"),
        Exit::Shutdown(why) => eprintln!("vmm: guest stopped: {why}"),
        Exit::Error(why) => eprintln!("vmm: error: {why}"),
        Exit::Code(_) | Exit::Reset => {}
    }
    if stats {
        let s = outcome.stats;
        eprintln!(
            "memory: frames resident {}, shared {}, copied {}, pinned {}, first-touch faults {}, \
             frames reused on write {}, faults resolved {}, stores {}, pages in swap {}, \
             swap-ins {}, pages migrated {}, write-protect events {}, pages loaded from snapshot \
             files {}, huge mappings made {}, huge mappings split {}, huge mappings collapsed {}",
            s.resident,
            s.shared,
            s.copied,
            s.pins,
            s.first_touch,
            s.reused,
            s.host_faults,
            s.stores,
            s.swapped,
            s.swap_ins,
            s.migrated,
            s.wp_events,
            s.image_loads,
            s.huge_maps,
            s.huge_splits,
            s.collapses
        );
    }
    Ok(ExitCode::from(outcome.exit.status() as u8))
}

/// `vmm snapshot`: asks the VM for a live snapshot, showing its progress.
fn snapshot(args: &SnapshotArgs) -> Result<(), String> {
    if !args.live {
        return Err(
            "only live snapshots are available: add --live (the VM keeps running meanwhile)".into(),
        );
    }
    if args.out.exists() {
        return Err(format!(
            "{} exists; choose a new file for the image",
            args.out.display()
        ));
    }
    let mut shown = 0;
    let progress = |done, total| {
        let pct = done * 100 / u64::max(total, 1);
        if pct >= shown + 10 || done == total {
            shown = pct;
            eprintln!("snapshot: {done}/{total} pages ({pct}%)");
        }
    };
    let summary = match &args.state {
        Some(state) => {
            if state.exists() {
                return Err(format!(
                    "{} exists; choose a new file for the state",
                    state.display()
                ));
            }
            vmm::api::request_snapshot_files(&args.api_sock, &args.out, state, progress)?
        }
        None => vmm::api::request_snapshot_live(&args.api_sock, &args.out, progress)?,
    };
    println!("snapshot {}: {summary}", args.out.display());
    Ok(())
}

/// `vmm restore`: runs a VM again from snapshot files.
fn restore(args: &RestoreArgs) -> Result<ExitCode, String> {
    if args.huge {
        memory::huge_pages_available()?;
    }
    let hv = Hypervisor::open().map_err(|e| error_chain(&e))?;
    let ctx = memory::Context::new(memory::Config {
        swap_file: args.swap.clone(),
        huge: args.huge,
        ..memory::Config::default()
    });
    if args.swap.is_some() {
        ctx.open_swap().map_err(|e| error_chain(&e))?;
    }
    let vm = Vm::restore(&hv, &ctx, &args.state, &args.mem_file, Sink::Stdout)
        .map_err(|e| error_chain(&e))?;
    let _collapser = args
        .collapse
        .then(|| memory::Collapser::start(&ctx, std::time::Duration::from_millis(100), 16))
        .transpose()
        .map_err(|e| format!("cannot start the collapser: {e}"))?;
    serve_and_wait(vm, args.api_sock.as_deref(), args.stats)
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let run_matches = matches.subcommand_matches("run");
    log::set_max_level(cli.log_level);
    let _ = log::set_logger(&StderrLogger);
    match cli.command {
        Command::Run(args) => match run(*args, run_matches) {
            Ok(code) => code,
            Err(msg) => {
                eprintln!("vmm: error: {msg}");
                ExitCode::from(1)
            }
        },
        Command::Snapshot(args) => match snapshot(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(msg) => {
                eprintln!("vmm: error: {msg}");
                ExitCode::from(1)
            }
        },
        Command::Restore(args) => match restore(&args) {
            Ok(code) => code,
            Err(msg) => {
                eprintln!("vmm: error: {msg}");
                ExitCode::from(1)
            }
        },
        Command::Fuzz(args) => fuzz_cli::fuzz(*args, matches.subcommand_matches("fuzz")),
        Command::FuzzTarget(args) => {
            fuzz_cli::fuzz_target(args, matches.subcommand_matches("fuzz-target"))
        }
        Command::Bench(args) => {
            match vmm::bench::run(vmm::bench::BenchOptions {
                quick: args.quick,
                only: args.only,
            }) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vmm: error: {}", error_chain(&e));
                    ExitCode::from(1)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_flags_keep_their_order() {
        let m = Cli::command()
            .try_get_matches_from([
                "vmm",
                "run",
                "--balloon",
                "--blk",
                "a.img",
                "--vsock",
                "cid=3,uds=/x",
                "--blk",
                "b.img,ro",
                "--net",
                "tap=t0",
            ])
            .unwrap();
        let Command::Run(args) = Cli::from_arg_matches(&m).unwrap().command else {
            panic!("not run");
        };
        let d = devices_in_order(&args, m.subcommand_matches("run"));
        assert_eq!(
            d,
            [
                DeviceConfig::Balloon,
                DeviceConfig::parse_blk("a.img").unwrap(),
                DeviceConfig::parse_vsock("cid=3,uds=/x").unwrap(),
                DeviceConfig::parse_blk("b.img,ro").unwrap(),
                DeviceConfig::parse_net("tap=t0").unwrap(),
            ]
        );
        let m = Cli::command()
            .try_get_matches_from(["vmm", "run", "--blk", "a.img"])
            .unwrap();
        let Command::Run(args) = Cli::from_arg_matches(&m).unwrap().command else {
            panic!("not run");
        };
        assert_eq!(
            devices_in_order(&args, m.subcommand_matches("run")).len(),
            1
        );
        assert!(
            Cli::command()
                .try_get_matches_from(["vmm", "run", "--vsock", "cid=1,uds=/x"])
                .is_err()
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
