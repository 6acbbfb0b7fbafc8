//! `vmm snapshot --state` and `vmm restore`: a program saved through its
//! API socket runs again from the files in a new process.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use guest_tests::{VmmOutput, guest_path};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn vmm(args: &[&str]) -> VmmOutput {
    let out = guest_tests::run_vmm(Path::new(VMM), args);
    assert!(!out.stderr.contains("panicked"), "vmm panicked:\n{out}");
    out
}

fn dir() -> PathBuf {
    let d =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("restore-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_program_saved_through_its_api_socket_runs_again_from_the_files() {
    let d = dir();
    let (sock, mem, state) = (d.join("api"), d.join("vm.mem"), d.join("vm.state"));
    let mut run = Command::new(VMM)
        .args(["run", "--mem", "64M", "--api-sock"])
        .arg(&sock)
        .arg("--program")
        .arg(guest_path("snap_timed"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(run.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let (s, m, st) = (
        sock.to_str().unwrap(),
        mem.to_str().unwrap(),
        state.to_str().unwrap(),
    );
    let snap = vmm(&[
        "snapshot",
        "--api-sock",
        s,
        "--live",
        "--out",
        m,
        "--state",
        st,
    ]);
    assert_eq!(snap.status, Some(0), "{snap}");
    assert!(snap.stdout.contains("state_pages="), "{snap}");
    let again = vmm(&[
        "snapshot",
        "--api-sock",
        s,
        "--live",
        "--out",
        &format!("{m}2"),
        "--state",
        st,
    ]);
    assert_eq!(again.status, Some(1), "{again}");
    assert!(again.stderr.contains("exists"), "{again}");
    // The original goes on and ends by itself.
    let after = "after: counter 1001, r12 1001, xmm7 1001, data intact\n";
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, after);
    assert_eq!(run.wait().unwrap().code(), Some(42));

    // The restored VM goes on from the spin: it does not print "ready".
    let back = vmm(&["restore", "--state", st, "--mem-file", m, "--stats"]);
    assert_eq!(back.status, Some(42), "{back}");
    assert_eq!(back.stdout, after, "{back}");
    assert!(
        back.stderr.contains("pages loaded from snapshot files"),
        "{back}"
    );
    // And on 2 MiB mappings: blocks holding pages of the file stay small,
    // empty ones may map huge; the guest sees the same.
    let huge = vmm(&["restore", "--state", st, "--mem-file", m, "--huge"]);
    assert_eq!(huge.status, Some(42), "{huge}");
    assert_eq!(huge.stdout, after, "{huge}");

    // Damaged or swapped files are refused before any guest runs.
    let bad = vmm(&["restore", "--state", m, "--mem-file", m]);
    assert_eq!(bad.status, Some(1), "{bad}");
    assert!(bad.stderr.contains("is not a snapshot state file"), "{bad}");
    let mut bytes = std::fs::read(&state).unwrap();
    bytes[40] ^= 1;
    std::fs::write(&state, bytes).unwrap();
    let bad = vmm(&["restore", "--state", st, "--mem-file", m]);
    assert_eq!(bad.status, Some(1), "{bad}");
    assert!(bad.stderr.contains("fails its checksum"), "{bad}");
    assert!(bad.stdout.is_empty(), "{bad}");
    std::fs::write(&state, b"").unwrap();
    let bad = vmm(&["restore", "--state", st, "--mem-file", m]);
    assert!(bad.stderr.contains("is empty"), "{bad}");
    std::fs::remove_dir_all(&d).unwrap();
}
