//! `vmm fuzz` and `vmm fuzz-target`: their arguments, help and handlers.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::{ArgMatches, Args};
use vmm::error_chain;
use vmm::fuzz::campaign::{self, Options, Role};
use vmm::fuzz::forkserver::{self, Outcome};
use vmm::fuzz::{FuzzError, Target, TargetFactory, Verdict, vm_targets};
use vmm::virtio::DeviceConfig;

use crate::parse_size;

pub const FUZZ_HELP: &str = "\
The program runs in a VM up to its SNAPSHOT hypercall, its reset point. From there each run puts
one input into the buffer SNAPSHOT named and lets the program go on until DONE(status): 0 is fine,
anything else is a failure. A guest exception is a crash, a run longer than --timeout a hang. The
program marks the edges it takes in the 64 KiB coverage map at the address COVERAGE_MAP returns;
inputs that reach new edges (or new hit counts) are kept and mutated further (AFL's havoc and
splice). Each job is a VM of its own; all share one queue.

Devices: --blk and --balloon give the program virtio devices, which it sets up before SNAPSHOT.
Each run starts with them as they were there: a disk's writes during a run go to a copy-on-write
overlay that the reset drops (the image file only ever sees the writes made before SNAPSHOT), and
every request still in flight when a run ends is waited for before the reset.

Output, in AFL++'s layout (AFL++'s tools read it), under OUT/NAME (NAME: `default`, or -M/-S):
  queue/         inputs with new coverage: id:NNNNNN,time:0,execs:0,orig:SEED for the seeds,
                 id:NNNNNN,src:NNNNNN,time:MS,execs:N,op:havoc,rep:N[,+cov] for finds,
                 id:NNNNNN,sync:OTHER,src:NNNNNN for imports from other instances
  crashes/       inputs that failed (sig:06) or faulted (sig:11,vec:N for exception vector N), one
                 per new set of edges; README.txt says how to run one again
  hangs/         inputs that ran past --timeout, one per new set of edges
  fuzzer_stats   AFL's `key : value` counters (execs_done, execs_per_sec, corpus_count,
                 saved_crashes, saved_hangs, stability, ...), refreshed every second
  .synced/OTHER  the next id of OTHER's queue to import (with -M/-S)
The seed corpus is never written to. Ctrl-C stops at once: what was found is already on disk.

Several instances, several machines (AFL++'s sync; docs/fuzzing.md has the full recipe): give each
instance the same OUT and a name, -M NAME for one main instance per machine, -S NAME for the
others. Every --sync-every seconds each imports the new entries of its siblings' OUT/*/queue
(a secondary: of the main instances) and keeps those that reach new coverage in its own VM.
Between machines copy the program once, then keep copying every OUT/NAME/queue to the other
machines' OUT (e.g. rsync every few minutes); only new queue entries travel.

Examples:
  vmm fuzz --program parser.elf --corpus seeds --out findings --jobs 2 --max-time 3600
  vmm fuzz --program parser.elf --corpus seeds --out findings --jobs 2 -M main-a
  vmm fuzz --program parser.elf --corpus seeds --out findings -S second-a
  vmm fuzz-target --program parser.elf 'findings/default/crashes/id:000000,sig:06,...'";

pub const FUZZ_TARGET_HELP: &str = "\
For afl-fuzz (AFL++): the program runs in a VM to its SNAPSHOT; then this process answers afl-fuzz's
forkserver protocol and runs each input from that point, in the same VM, without forking:

  afl-fuzz -i seeds -o findings -t 2000 -m none -- vmm fuzz-target --program parser.elf --timeout 1000

Inputs come from afl-fuzz's shared memory (AFL++ offers it, and then ignores @@), else from FILE
(`@@`), else from stdin. A failure (DONE with a non-zero status) is reported to afl-fuzz as SIGABRT
(its crashes/ name says sig:06), a guest exception as SIGSEGV (sig:11). Keep --timeout below
afl-fuzz's -t: a run that reaches it is held until afl-fuzz times it out, so that afl-fuzz counts a
hang. If the VM takes longer to reach SNAPSHOT than afl-fuzz waits (10 times -t), set
AFL_FORKSRV_INIT_TMOUT (milliseconds).

Not started by afl-fuzz, it runs FILE (or stdin) once, prints what happened and exits with 0 (DONE(0)),
3 (guest exception), 4 (failure), 5 (hang), or the guest's code if it called EXIT.

Example, to run a saved crash again:
  vmm fuzz-target --program parser.elf 'findings/default/crashes/id:000000,sig:06,...'";

/// The devices a fuzzing target may have: those whose host side a reset
/// can take back to the snapshot.
#[derive(Args, Debug, Clone)]
pub struct TargetDevices {
    /// A virtio block device on the file PATH (`,ro` refuses writes); repeatable, slots in
    /// the order given. The program's writes before SNAPSHOT reach the file; each run's go to
    /// a copy-on-write overlay that every reset drops.
    #[arg(long, value_name = "PATH[,ro]", value_parser = DeviceConfig::parse_blk)]
    blk: Vec<DeviceConfig>,

    /// A virtio memory balloon; every reset takes it back to its state at SNAPSHOT.
    #[arg(long)]
    balloon: bool,
}

impl TargetDevices {
    /// The devices, in the order their flags appear in `matches`.
    fn in_order(&self, matches: Option<&ArgMatches>) -> Vec<DeviceConfig> {
        crate::in_flag_order(vec![("blk", self.blk.clone())], self.balloon, matches)
    }
}

/// The flags that give a fuzzing target `devices` again.
fn device_flags(devices: &[DeviceConfig]) -> String {
    devices.iter().map(|d| format!(" {}", d.flag())).collect()
}

#[derive(Args, Debug)]
pub struct FuzzArgs {
    /// The target: a static x86-64 ELF program that calls SNAPSHOT, then DONE for each input.
    #[arg(long, value_name = "FILE")]
    program: PathBuf,

    /// The seed corpus: a directory whose every file (below it) is an input; never written to.
    #[arg(long, value_name = "IN")]
    corpus: PathBuf,

    /// The output directory; this instance writes OUT/NAME.
    #[arg(long, value_name = "OUT")]
    out: PathBuf,

    /// Fuzzing threads, each with a VM of its own.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    jobs: u32,

    /// Stop after this many seconds (default: until interrupted).
    #[arg(long, value_name = "SECONDS")]
    max_time: Option<u64>,

    /// Be the main instance NAME of a group sharing OUT (imports from every other instance).
    #[arg(short = 'M', value_name = "NAME", conflicts_with = "secondary")]
    main: Option<String>,

    /// Be the secondary instance NAME of a group sharing OUT (imports from the main instances).
    #[arg(short = 'S', value_name = "NAME")]
    secondary: Option<String>,

    /// With -M or -S: import other instances' new queue entries this often.
    #[arg(long, default_value_t = 60, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    sync_every: u64,

    /// A run longer than this is a hang.
    #[arg(long, default_value_t = 1000, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,

    /// Guest RAM of each VM: a multiple of 2 MiB, with a K, M, G or T suffix.
    #[arg(long, default_value = "256M", value_name = "SIZE", value_parser = parse_size)]
    mem: u64,

    /// Map guest RAM with 2 MiB pages, as `vmm run --huge` does (refused if the host
    /// cannot provide them).
    #[arg(long)]
    huge: bool,

    #[command(flatten)]
    devices: TargetDevices,
}

#[derive(Args, Debug)]
pub struct FuzzTargetArgs {
    /// The target: a static x86-64 ELF program that calls SNAPSHOT, then DONE for each input.
    #[arg(long, value_name = "FILE")]
    program: PathBuf,

    /// Guest RAM: a multiple of 2 MiB, with a K, M, G or T suffix.
    #[arg(long, default_value = "256M", value_name = "SIZE", value_parser = parse_size)]
    mem: u64,

    /// Map guest RAM with 2 MiB pages, as `vmm run --huge` does (refused if the host
    /// cannot provide them).
    #[arg(long)]
    huge: bool,

    /// A run longer than this is a hang; keep it below afl-fuzz's -t.
    #[arg(long, default_value_t = 500, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,

    /// The input file (afl-fuzz's `@@`); stdin when absent.
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,

    #[command(flatten)]
    devices: TargetDevices,
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("vmm: error: {msg}");
    ExitCode::from(1)
}

fn read_program(path: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read program {}: {e}", path.display()))
}

/// `--mem` as it can be given again.
fn size_arg(bytes: u64) -> String {
    match bytes {
        b if b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b => b.to_string(),
    }
}

/// `vmm fuzz`.
pub fn fuzz(args: FuzzArgs, matches: Option<&ArgMatches>) -> ExitCode {
    match run_fuzz(args, matches) {
        Ok(code) => code,
        Err(msg) => fail(&msg),
    }
}

fn run_fuzz(args: FuzzArgs, matches: Option<&ArgMatches>) -> Result<ExitCode, String> {
    let program = read_program(&args.program)?;
    let devices = args.devices.in_order(matches);
    let role = match (args.main, args.secondary) {
        (Some(name), _) => Role::Main(name),
        (None, Some(name)) => Role::Secondary(name),
        (None, None) => Role::Alone,
    };
    let timeout = Duration::from_millis(args.timeout);
    if args.huge {
        memory::huge_pages_available()?;
    }
    let reproduce = format!(
        "vmm fuzz-target --program {} --mem {}{} --timeout {}{} FILE",
        args.program.display(),
        size_arg(args.mem),
        if args.huge { " --huge" } else { "" },
        args.timeout,
        device_flags(&devices),
    );
    let options = Options {
        role,
        jobs: args.jobs as usize,
        max_time: args.max_time.map(Duration::from_secs),
        sync_every: Duration::from_secs(args.sync_every),
        exec_timeout: timeout,
        command_line: std::env::args().collect::<Vec<_>>().join(" "),
        reproduce: reproduce.clone(),
        ..Options::new(&args.corpus, &args.out)
    };
    // The VMs are made once the corpus and output directory are found good.
    let mut factory: Option<TargetFactory> = None;
    let ram = (args.mem, args.huge);
    let mut make = || -> Result<Box<dyn Target>, FuzzError> {
        let f = match &mut factory {
            Some(f) => f,
            None => factory.insert(vm_targets(program.clone(), ram, timeout, devices.clone())?),
        };
        f()
    };
    let summary =
        campaign::run(&options, &mut make, &AtomicBool::new(false)).map_err(|e| error_chain(&e))?;
    eprintln!("vmm fuzz: done: {summary}");
    if summary.crashes > 0 {
        eprintln!(
            "vmm fuzz: crashes are in {}/crashes; run one again with\n  {reproduce}",
            summary.out_dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `vmm fuzz-target`.
pub fn fuzz_target(args: FuzzTargetArgs, matches: Option<&ArgMatches>) -> ExitCode {
    match run_fuzz_target(args, matches) {
        Ok(code) => code,
        Err(msg) => fail(&msg),
    }
}

fn run_fuzz_target(args: FuzzTargetArgs, matches: Option<&ArgMatches>) -> Result<ExitCode, String> {
    let program = read_program(&args.program)?;
    let timeout = Duration::from_millis(args.timeout);
    let devices = args.devices.in_order(matches);
    if args.huge {
        memory::huge_pages_available()?;
    }
    let mut make = vm_targets(program, (args.mem, args.huge), timeout, devices)
        .map_err(|e| error_chain(&e))?;
    let mut target = make().map_err(|e| error_chain(&e))?;
    let outcome =
        forkserver::run(target.as_mut(), args.file.as_deref()).map_err(|e| error_chain(&e))?;
    Ok(match outcome {
        Outcome::Served(_) => ExitCode::SUCCESS,
        Outcome::Ran(verdict) => {
            eprintln!("vmm fuzz-target: {verdict}");
            ExitCode::from(match verdict {
                Verdict::Ok => 0,
                Verdict::Crash(_) => 3,
                Verdict::Fail(_) => 4,
                Verdict::Hang => 5,
                Verdict::Exit(code) => (code & 0xff) as u8,
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_as_they_parse() {
        for s in ["256M", "1G", "6M"] {
            assert_eq!(size_arg(parse_size(s).unwrap()), s);
        }
        assert_eq!(size_arg(4096), "4096");
    }
}
