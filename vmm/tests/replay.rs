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
