//! `vmm run --input FILE`: a fuzzing input replays outside the fuzzer to
//! the same verdict.

use std::path::{Path, PathBuf};

use guest_tests::VmmOutput;

fn replay(input: &[u8]) -> VmmOutput {
    let file: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "replay-{}-{}",
        std::process::id(),
        input.len()
    ));
    std::fs::write(&file, input).unwrap();
    let program = file.with_extension("elf");
    std::fs::write(&program, vmm::guests::FUZZ_PLANTED).unwrap();
    let out = guest_tests::run_vmm(
        Path::new(env!("CARGO_BIN_EXE_vmm")),
        &[
            "run",
            "--program",
            program.to_str().unwrap(),
            "--input",
            file.to_str().unwrap(),
        ],
    );
    assert!(!out.stderr.contains("panicked"), "{out}");
    out
}

#[test]
fn a_saved_input_replays_to_the_same_verdict() {
    let crash = replay(b"FUZZ?");
    assert_eq!(crash.status, Some(3), "{crash}");
    assert!(
        crash.stderr.contains("guest fault: vector 6"),
        "the crash is reported as a guest fault: {crash}"
    );
    let fail = replay(b"FUZZ!");
    assert_eq!(fail.status, Some(7), "DONE(7) is exit code 7: {fail}");
    let ok = replay(b"hello");
    assert_eq!(ok.status, Some(0), "{ok}");
}

#[test]
fn a_fuzz_target_with_a_block_device_runs_from_the_command_line() {
    let disk = guest_tests::Scratch::new("replay-blk.img", &[0x5a; 64 << 10]);
    let input = guest_tests::Scratch::new("replay-blk.input", b"x");
    let program = guest_tests::guest_path("fuzz_blk");
    let vmm = Path::new(env!("CARGO_BIN_EXE_vmm"));
    let args = |with_disk: bool| {
        let mut a = vec!["fuzz-target", "--program", program.to_str().unwrap()];
        a.extend(["--mem", "16M"]);
        if with_disk {
            a.extend(["--blk", disk.0.to_str().unwrap()]);
        }
        a.push(input.0.to_str().unwrap());
        a
    };
    let out = guest_tests::run_vmm(vmm, &args(true));
    assert_eq!(out.status, Some(0), "{out}");
    assert!(out.stderr.contains("ok"), "{out}");
    // Without its disk the program gives up before SNAPSHOT.
    let out = guest_tests::run_vmm(vmm, &args(false));
    assert_eq!(out.status, Some(1), "{out}");
    assert!(out.stderr.contains("SNAPSHOT"), "{out}");
    assert!(!out.stderr.contains("panicked"), "{out}");
}

#[test]
fn fuzz_target_runs_an_input_on_huge_mappings() {
    let input = guest_tests::Scratch::new("replay-huge.input", b"FUZZ?");
    let program = guest_tests::Scratch::new("replay-huge.elf", vmm::guests::FUZZ_PLANTED);
    let vmm = Path::new(env!("CARGO_BIN_EXE_vmm"));
    let run = |extra: &[&str]| {
        let mut a = vec!["fuzz-target", "--program", program.0.to_str().unwrap()];
        a.extend(["--mem", "16M"]);
        a.extend(extra);
        a.push(input.0.to_str().unwrap());
        guest_tests::run_vmm(vmm, &a)
    };
    let huge = run(&["--huge"]);
    assert_eq!(huge.status, Some(3), "a guest exception: {huge}");
    assert!(!huge.stderr.contains("panicked"), "{huge}");
    assert_eq!(
        huge.stderr,
        run(&[]).stderr,
        "the same verdict on small pages"
    );
}
