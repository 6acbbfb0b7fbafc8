//! `vmm fuzz` and `vmm fuzz-target` on the command line: their help, and
//! what they refuse before any VM starts.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vmm(args: &[&str]) -> (Option<i32>, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .output()
        .expect("vmm runs");
    let (out, err) = (
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    );
    assert!(!err.contains("panicked"), "vmm {args:?} panicked:\n{err}");
    (status.code(), out, err)
}

fn scratch(tag: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fuzz-cli-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn help_teaches_an_example_the_output_and_the_sync() {
    let (code, out, _) = vmm(&["fuzz", "--help"]);
    assert_eq!(code, Some(0));
    for needle in [
        "vmm fuzz --program parser.elf --corpus seeds --out findings",
        "queue/",
        "crashes/",
        "sig:06",
        "sig:11,vec:N",
        "hangs/",
        "fuzzer_stats",
        "-M NAME",
        "-S NAME",
        "rsync",
        "docs/fuzzing.md",
    ] {
        assert!(
            out.contains(needle),
            "`{needle}` is not in vmm fuzz --help:\n{out}"
        );
    }
    let (code, out, _) = vmm(&["fuzz-target", "--help"]);
    assert_eq!(code, Some(0));
    for needle in [
        "afl-fuzz -i seeds -o findings",
        "@@",
        "SIGABRT",
        "SIGSEGV",
        "AFL_FORKSRV_INIT_TMOUT",
    ] {
        assert!(
            out.contains(needle),
            "`{needle}` is not in vmm fuzz-target --help:\n{out}"
        );
    }
    let (_, out, _) = vmm(&["--help"]);
    assert!(out.contains("fuzz-target"), "{out}");
}

#[test]
fn bad_corpus_program_and_roles_are_refused_with_a_reason() {
    let d = scratch("refused");
    let program = d.join("t.elf");
    std::fs::write(&program, b"not yet read").unwrap();
    let (p, out) = (program.to_str().unwrap(), d.join("out"));
    let out = out.to_str().unwrap();
    let fuzz = |extra: &[&str]| {
        let mut args = vec!["fuzz", "--out", out];
        args.extend_from_slice(extra);
        vmm(&args)
    };

    let missing = d.join("missing");
    let (code, _, err) = fuzz(&["--program", p, "--corpus", missing.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("cannot read the seed corpus") && err.contains("missing"),
        "{err}"
    );

    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, _, err) = fuzz(&["--program", p, "--corpus", empty.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("holds no files"), "{err}");
    assert!(
        std::fs::read_dir(&empty).unwrap().next().is_none(),
        "the corpus is left alone"
    );

    let (code, _, err) = fuzz(&[
        "--program",
        d.join("none.elf").to_str().unwrap(),
        "--corpus",
        p,
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot read program"), "{err}");

    let e = empty.to_str().unwrap();
    let (code, _, err) = fuzz(&["--program", p, "--corpus", e, "-M", "a", "-S", "b"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = fuzz(&["--program", p, "--corpus", e, "-M", "../up"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not an instance name"), "{err}");
    let (code, _, err) = fuzz(&["--program", p, "--corpus", e, "--jobs", "0"]);
    assert_eq!(code, Some(2), "{err}");

    let (code, _, err) = vmm(&[
        "fuzz-target",
        "--program",
        d.join("none.elf").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot read program"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}
