//! afl-fuzz (AFL++, Debian's `afl++` package) drives the forkserver of
//! `vmm::fuzz::forkserver` over the simulated target and finds its planted
//! bug and its hang.
//!
//! This binary is both the test and the target: afl-fuzz runs it again
//! with `VMM_TEST_AFL_TARGET` set, and then it serves afl-fuzz exactly as
//! `vmm fuzz-target` does, over `vmm::fuzz::mock::Maze` instead of a VM.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use guest_tests::fuzzing::{afl_command, files, stop};
use vmm::fuzz::mock::{self, Maze};
use vmm::fuzz::{Target, Verdict, forkserver};

const TARGET_ENV: &str = "VMM_TEST_AFL_TARGET";
const TEST: &str = "afl_fuzz_finds_the_planted_bug_and_the_hang";
/// How long afl-fuzz may take to find both.
const LIMIT: Duration = Duration::from_secs(90);

fn main() {
    if std::env::var_os(TARGET_ENV).is_some() {
        let file = std::env::args_os().nth(1).map(PathBuf::from);
        match forkserver::run(&mut Maze::new(), file.as_deref()) {
            Ok(_) => std::process::exit(0),
            Err(e) => {
                eprintln!("forkserver: {}", vmm::error_chain(&e));
                std::process::exit(1);
            }
        }
    }
    // A harness of one test: `--list` and name filters as libtest has them.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{TEST}: test");
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| TEST.contains(f.as_str())) {
        println!("running 0 tests (filtered out: {TEST})");
        return;
    }
    println!("running 1 test");
    afl_fuzz_finds_the_planted_bug_and_the_hang();
    println!("test {TEST} ... ok");
}

fn afl_fuzz_finds_the_planted_bug_and_the_hang() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("afl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (input, out) = (dir.join("in"), dir.join("out"));
    std::fs::create_dir_all(&input).unwrap();
    // Seeds one bit short of the failure ("MAGIC!7") and of the hang
    // ("HANG"), which afl-fuzz's deterministic stage (-D) flips early:
    // this tests the protocol, not afl-fuzz's search (which, from "hello"
    // alone, took minutes here to spell both out).
    std::fs::write(input.join("hello"), b"hello").unwrap();
    std::fs::write(input.join("near-failure"), b"MAGIC!6").unwrap();
    std::fs::write(input.join("near-hang"), b"HANF").unwrap();
    let log = dir.join("afl-fuzz.log");
    let me = std::env::current_exe().unwrap();
    let mut child = afl_command()
        .args(["-i", input.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .args(["-t", "300", "-m", "none", "-V", "120", "-D", "--"])
        .arg(&me)
        .arg("@@")
        .env(TARGET_ENV, "1")
        .env("AFL_FAST_CAL", "1")
        // A hang is kept at -t without a second, longer run.
        .env("AFL_HANG_TMOUT", "300")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::from(
            std::fs::File::options().append(true).open(&log).unwrap(),
        ))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start afl-fuzz: {e}"));

    let (crashes, hangs) = (out.join("default/crashes"), out.join("default/hangs"));
    let start = Instant::now();
    let mut exited = None;
    while start.elapsed() < LIMIT {
        let fail = files(&crashes).iter().any(|n| n.contains(",sig:06,"));
        if fail && !files(&hangs).is_empty() {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = start.elapsed();
    stop(&mut child);
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: String = log
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        exited.is_none(),
        "afl-fuzz stopped by itself ({exited:?}):\n{tail}"
    );

    // The handshake as afl-fuzz saw it.
    assert!(log.contains("fork server is up"), "{tail}");
    assert!(log.contains("Target map size: 65536"), "{tail}");
    assert!(log.contains("SHARED MEMORY FUZZING"), "{tail}");

    // What it found, in {took:?}: the failure as SIGABRT, the hang by its
    // own timeout. Each input does that again.
    let crash_files = files(&crashes);
    let hang_files = files(&hangs);
    assert!(
        crash_files.iter().any(|n| n.contains(",sig:06,")) && !hang_files.is_empty(),
        "afl-fuzz found {crash_files:?} and hangs {hang_files:?} in {took:?}:\n{tail}"
    );
    let mut maze = Maze::new();
    for n in &crash_files {
        let v = maze.run(&std::fs::read(crashes.join(n)).unwrap()).unwrap();
        let sig = match v {
            Verdict::Fail(mock::FAIL_STATUS) => ",sig:06,",
            Verdict::Crash(_) => ",sig:11,",
            other => panic!("{n} gives {other}"),
        };
        assert!(n.contains(sig), "{n} gives {v}");
    }
    for n in &hang_files {
        assert_eq!(
            maze.run(&std::fs::read(hangs.join(n)).unwrap()).unwrap(),
            Verdict::Hang,
            "{n}"
        );
    }
    let stats = std::fs::read_to_string(out.join("default/fuzzer_stats")).unwrap_or_default();
    assert!(stats.contains("execs_done"), "{stats}");
    println!("afl-fuzz found the failure and a hang in {took:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
