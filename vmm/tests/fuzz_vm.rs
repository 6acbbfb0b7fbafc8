//! Both front ends on a real VM: the built-in fuzzer and AFL++'s afl-fuzz
//! find the planted bug of `vmm::guests::FUZZ_PLANTED` (the input must
//! spell "FUZZ" byte by byte, then "!" fails and "?" crashes) from the seed
//! "hello" within a bounded time, and what they save replays to the same
//! verdict with `vmm fuzz-target` and `vmm run --input`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use guest_tests::fuzzing::{afl_command, files, stop};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");
/// How long a fuzzer may take to find both bugs. The built-in fuzzer takes
/// 1-16 s (it took up to minutes while it kept its finds untrimmed: a
/// 14 KiB entry spelling "FUZZ" whose fifth byte its mutants rarely hit).
/// AFL++ needs 3-50 s here, with a long tail: the last byte comes only
/// from havoc rounds on the one queue entry that spells "FUZZ", which get
/// a few percent of its executions (one run in eighteen took over 120 s;
/// one, its tests sharing the cores, missed 300 s). The bound leaves room
/// for that tail: a test stops as soon as both are found.
const LIMIT: Duration = Duration::from_secs(600);

/// Held by each test while its fuzzer runs. Run side by side on two cores,
/// the built-in fuzzer's two jobs slow afl-fuzz's timing of its inputs
/// (1.3 ms against 0.1 ms measured for the entry that spells "FUZZ", in a
/// run that missed the bound), and afl-fuzz then gives that entry half its
/// executions per havoc round for the rest of its run.
static ONE_FUZZER: Mutex<()> = Mutex::new(());

fn one_fuzzer() -> MutexGuard<'static, ()> {
    ONE_FUZZER.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A fresh directory with the planted program and a seed corpus.
fn workdir(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let seeds = dir.join("seeds");
    std::fs::create_dir_all(&seeds).unwrap();
    std::fs::write(seeds.join("hello"), b"hello").unwrap();
    let program = dir.join("planted.elf");
    std::fs::write(&program, vmm::guests::FUZZ_PLANTED).unwrap();
    (dir, seeds, program)
}

/// Waits until `crashes` holds a failure (sig:06) and a #UD crash
/// (sig:11, vector 6), or the fuzzer ends, or LIMIT passes; then stops it.
fn wait_for_both(child: &mut Child, crashes: &Path, log: &Path) -> (String, String) {
    let start = Instant::now();
    let found = loop {
        let names = files(crashes);
        let fail = names.iter().find(|n| n.contains(",sig:06,")).cloned();
        let crash = names.iter().find(|n| n.contains(",sig:11,")).cloned();
        if let (Some(f), Some(c)) = (fail, crash) {
            break Some((f, c));
        }
        if start.elapsed() > LIMIT || matches!(child.try_wait(), Ok(Some(_))) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    stop(child);
    found.unwrap_or_else(|| {
        panic!(
            "not both bugs within {LIMIT:?}: {:?}\n{}",
            files(crashes),
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })
}

/// Runs a saved input again both ways; returns the two exit statuses.
fn replay(program: &Path, input: &Path) -> (Option<i32>, Option<i32>) {
    let target = Command::new(VMM)
        .args(["fuzz-target", "--program"])
        .arg(program)
        .arg(input)
        .output()
        .unwrap();
    let run = Command::new(VMM)
        .args(["run", "--program"])
        .arg(program)
        .arg("--input")
        .arg(input)
        .output()
        .unwrap();
    (target.status.code(), run.status.code())
}

fn check_replays(program: &Path, crashes: &Path, (fail, crash): (String, String)) {
    // fuzz-target: 4 for a failure, 3 for a guest exception; vmm run:
    // DONE(7) exits 7, a guest fault exits 3.
    assert_eq!(
        replay(program, &crashes.join(&fail)),
        (Some(4), Some(7)),
        "{fail}"
    );
    assert_eq!(
        replay(program, &crashes.join(&crash)),
        (Some(3), Some(3)),
        "{crash}"
    );
}

#[test]
fn the_built_in_fuzzer_finds_the_planted_bug() {
    let _alone = one_fuzzer();
    let (dir, seeds, program) = workdir("fuzz-builtin");
    let out = dir.join("out");
    let log = dir.join("log");
    let mut child = Command::new(VMM)
        .args(["fuzz", "--program"])
        .arg(&program)
        .arg("--corpus")
        .arg(&seeds)
        .arg("--out")
        .arg(&out)
        .args(["--jobs", "2", "--max-time", &LIMIT.as_secs().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let crashes = out.join("default/crashes");
    let found = wait_for_both(&mut child, &crashes, &log);
    assert!(
        found.1.contains(",vec:06,"),
        "the crash names its vector: {}",
        found.1
    );
    check_replays(&program, &crashes, found);
}

#[test]
fn afl_fuzz_finds_the_planted_bug_in_a_vm() {
    let _alone = one_fuzzer();
    let (dir, seeds, program) = workdir("fuzz-afl");
    let out = dir.join("out");
    let log = dir.join("log");
    let mut child = afl_command()
        .args(["-i", seeds.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .args([
            "-t",
            "1000",
            "-m",
            "none",
            "-V",
            &LIMIT.as_secs().to_string(),
            "--",
        ])
        .args([
            VMM,
            "fuzz-target",
            "--program",
            program.to_str().unwrap(),
            "@@",
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let crashes = out.join("default/crashes");
    let found = wait_for_both(&mut child, &crashes, &log);
    check_replays(&program, &crashes, found);
}
