//! The `vmm` binary: its exit status, what it prints, and what it refuses.
//! Guest programs come from the guest-tests crate; they run in real VMs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use guest_tests::elf::{self, CORRUPTIONS, Corruption};
use guest_tests::{VmmOutput, guest, guest_path};

fn vmm(args: &[&str]) -> VmmOutput {
    let out = guest_tests::run_vmm(Path::new(env!("CARGO_BIN_EXE_vmm")), args);
    assert!(
        !out.stderr.contains("panicked"),
        "vmm {} panicked:\n{out}",
        args.join(" ")
    );
    out
}

fn run_guest(name: &str, extra: &[&str]) -> VmmOutput {
    let path = guest_path(name);
    let mut args = vec!["run", "--program", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    vmm(&args)
}

/// Writes `bytes` to a new file in this test target's scratch directory.
fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "cli-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, bytes).unwrap();
    path
}

// ---- running programs ----------------------------------------------------------

#[test]
fn the_demo_runs_and_exits_0() {
    let out = vmm(&["run"]);
    assert_eq!(out.status, Some(0), "{out}");
    assert!(
        out.stdout.starts_with("demo: ")
            && out.stdout.contains("demo: done, exiting with status 0\n"),
        "{out}"
    );
}

#[test]
fn serial_and_write_output_go_to_stdout_in_order() {
    let out = run_guest("serial_write", &[]);
    assert_eq!(out.status, Some(0), "{out}");
    assert_eq!(
        out.stdout,
        "1 serial\n2 write\n3 serial\n4 write, then serial on the same line\n"
    );
}

#[test]
fn the_exit_status_is_the_low_8_bits_of_the_exit_code() {
    for (code, status) in [
        (0, 0),
        (7, 7),
        (255, 255),
        (256, 0),
        (0x1_0000_0101, 1),
        (u64::MAX, 255),
    ] {
        let mut program = guest("exit_code");
        elf::set_u64(&mut program, "exit_value", code);
        let file = scratch_file("exit_code.elf", &program);
        let out = vmm(&["run", "--program", file.to_str().unwrap()]);
        assert_eq!(out.status, Some(status), "EXIT {code:#x}: {out}");
        assert_eq!(
            out.stdout,
            format!("exit_code: exiting with {code:#018x}\n")
        );
        std::fs::remove_file(file).unwrap();
    }
}

#[test]
fn guest_faults_are_reported_on_stderr() {
    for (name, vector, mnemonic) in [("fault_ud", 6, "#UD"), ("fault_pf_write", 14, "#PF")] {
        let rip = elf::symbol(&guest(name), "fault_insn");
        let out = run_guest(name, &[]);
        assert_eq!(out.status, Some(3), "{name}: {out}");
        let want = format!("guest fault: vector {vector} ({mnemonic}) at rip {rip:#x}");
        assert!(
            out.stderr.contains(&want),
            "{name}: want `{want}` in:\n{out}"
        );
        assert!(out.stdout.starts_with(&format!("{name}: ")), "{out}");
    }
}

#[test]
fn hypercalls_preserve_registers() {
    let out = run_guest("hc_regs", &[]);
    assert_eq!(out.status, Some(0), "{out}");
}

#[test]
fn memory_above_4_gib_with_3584m() {
    let out = run_guest("mem_layout", &["--mem", "3584M"]);
    assert_eq!(out.status, Some(0), "{out}");
    assert_eq!(
        out.stdout,
        "mem_layout: ram 0x00000000e0000000 ends at 0x0000000120000000\n"
    );
}

#[test]
fn two_vcpus_with_the_flag_and_refusal_without() {
    let out = run_guest("vcpu_start", &["--vcpus", "2"]);
    assert_eq!(out.status, Some(0), "{out}");
    let out = run_guest("vcpu_start", &["--vcpus", "1"]);
    assert_eq!(out.status, Some(99), "VCPU_START 1 with one vCPU: {out}");
    assert!(out.stdout.contains("FAIL: VCPU_START 1:"), "{out}");
}

#[test]
fn stats_flag_prints_memory_counters() {
    let out = run_guest("discard", &["--stats"]);
    assert_eq!(out.status, Some(0), "{out}");
    assert!(out.stderr.contains("memory: frames resident "), "{out}");
    let out = run_guest("discard", &[]);
    assert!(!out.stderr.contains("memory:"), "without --stats: {out}");
}

#[test]
fn a_memory_limit_swaps_and_the_swap_file_is_emptied_after() {
    let swap = scratch_file("swap", b"");
    let out = run_guest(
        "wp",
        &[
            "--mem-limit",
            "64K",
            "--swap",
            swap.to_str().unwrap(),
            "--stats",
        ],
    );
    assert_eq!(out.status, Some(0), "{out}");
    let swap_ins: u64 = out
        .stderr
        .split("swap-ins ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no swap-ins counter: {out}"));
    assert!(swap_ins > 0, "nothing came back from swap: {out}");
    assert_eq!(
        std::fs::metadata(&swap).unwrap().len(),
        0,
        "swap file left full"
    );
}

/// The number a guest printed after `word` on its console.
fn count_after(out: &VmmOutput, word: &str) -> u64 {
    out.stdout
        .split(word)
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count after `{word}`: {out}"))
}

#[test]
fn the_background_compactor_moves_scattered_frames() {
    let moved = |out: &VmmOutput| count_after(out, "moved ");
    let out = run_guest("scatter", &["--compact"]);
    assert_eq!(out.status, Some(0), "{out}");
    assert!(moved(&out) >= 32, "{out}");
    let out = run_guest("scatter", &[]);
    assert_eq!(out.status, Some(0), "{out}");
    assert_eq!(moved(&out), 0, "frames moved without --compact: {out}");
}

#[test]
fn the_background_collapser_maps_a_split_block_whole_again() {
    let collapsed = |out: &VmmOutput| count_after(out, "collapsed ");
    let out = run_guest("collapse_scan", &["--huge", "--collapse"]);
    assert_eq!(out.status, Some(0), "{out}");
    assert!(collapsed(&out) >= 1, "{out}");
    let out = run_guest("collapse_scan", &["--huge"]);
    assert_eq!(out.status, Some(0), "{out}");
    assert_eq!(collapsed(&out), 0, "collapsed without --collapse: {out}");
    let out = run_guest("collapse_scan", &["--collapse"]);
    assert_eq!(out.status, Some(2), "--collapse without --huge: {out}");
    assert!(out.stderr.contains("--huge"), "{out}");
    assert!(out.stdout.is_empty(), "the guest ran:\n{out}");
}

#[test]
fn a_swap_file_holding_data_is_refused_and_kept() {
    let swap = scratch_file("precious", b"do not overwrite");
    let out = run_guest("exit_code", &["--swap", swap.to_str().unwrap()]);
    assert_refused(&out, "a non-empty swap file", "is not empty");
    assert!(out.stdout.is_empty(), "the guest ran:\n{out}");
    assert_eq!(std::fs::read(&swap).unwrap(), b"do not overwrite");
}

// ---- refused before any VM starts ------------------------------------------------

fn assert_refused(out: &VmmOutput, what: &str, message: &str) {
    assert_eq!(out.status, Some(1), "{what}: {out}");
    assert!(
        out.stderr.contains(message),
        "{what}: want `{message}` on stderr:\n{out}"
    );
    assert!(out.stdout.is_empty(), "{what}: the guest ran:\n{out}");
}

#[test]
fn bad_elf_files_are_refused_before_the_vm_starts() {
    let good = guest("exit_code");
    for c in CORRUPTIONS {
        let message = match c {
            Corruption::TruncatedHeader | Corruption::TruncatedSegment => "truncated",
            Corruption::Machine => "ELF machine 40 is not x86-64",
            Corruption::Class32 => "not a 64-bit little-endian ELF file",
            Corruption::Pie => "position-independent executables are not supported",
            Corruption::OutsideRam => "is outside guest RAM",
            Corruption::BelowOneMib => "is below 1 MiB",
            Corruption::Overlap => "overlap",
            Corruption::EntryOutside => "entry point 0x100 is not inside a loadable segment",
            Corruption::Empty => "not an ELF file",
        };
        let file = scratch_file("bad.elf", &elf::corrupt(&good, c));
        let out = vmm(&["run", "--program", file.to_str().unwrap()]);
        assert_refused(&out, &format!("{c:?}"), message);
        assert!(out.stderr.contains("invalid program"), "{c:?}: {out}");
        std::fs::remove_file(file).unwrap();
    }
}

#[test]
fn missing_files_and_directories_are_refused() {
    let dir = env!("CARGO_TARGET_TMPDIR");
    let out = vmm(&["run", "--program", dir]);
    assert_refused(&out, "a directory", "cannot read program");
    let missing = format!("{dir}/no-such-program.elf");
    let out = vmm(&["run", "--program", &missing]);
    assert_refused(&out, "a missing file", "cannot read program");
}

#[test]
fn a_program_too_big_for_small_ram_is_refused() {
    // The program loads at 4 MiB: 2 MiB of RAM cannot hold it.
    let out = run_guest("exit_code", &["--mem", "2M"]);
    assert_refused(&out, "--mem 2M", "is outside guest RAM");
}

#[test]
fn mem_above_the_limit_names_the_limit() {
    let out = run_guest("exit_code", &["--mem", "100T"]);
    assert_refused(&out, "--mem 100T", "at most 1024 GiB");
    assert!(
        !out.stderr.contains("max_map_count"),
        "raising vm.max_map_count would not make 100T work:\n{out}"
    );
}

// ---- command line ------------------------------------------------------------------

#[test]
fn help_mentions_the_commands_and_flags() {
    let out = vmm(&["--help"]);
    assert_eq!(out.status, Some(0), "{out}");
    for word in ["run", "--log-level"] {
        assert!(
            out.stdout.contains(word),
            "`vmm --help` lacks {word}:\n{out}"
        );
    }
    let out = vmm(&["run", "--help"]);
    assert_eq!(out.status, Some(0), "{out}");
    for flag in [
        "--program",
        "--kernel",
        "--initrd",
        "--cmdline",
        "--mem",
        "--vcpus",
        "--stats",
        "--fault-around",
        "--swap",
        "--mem-limit",
        "--compact",
        "--huge",
        "--collapse",
    ] {
        assert!(
            out.stdout.contains(flag),
            "`vmm run --help` lacks {flag}:\n{out}"
        );
    }
}

#[test]
fn bad_sizes_and_counts_are_refused_with_a_message() {
    for args in [
        ["--mem", "0"],
        ["--mem", "3M"],
        ["--mem", "abc"],
        ["--mem", "100T"],
        ["--mem", "99999999999999999999"],
        ["--vcpus", "0"],
        ["--vcpus", "100000"],
        ["--vcpus", "-1"],
        ["--fault-around", "0"],
        ["--mem-limit", "0"],
        ["--mem-limit", "lots"],
    ] {
        let path = guest_path("exit_code");
        let out = vmm(&["run", "--program", path.to_str().unwrap(), args[0], args[1]]);
        assert!(
            matches!(out.status, Some(1 | 2)),
            "{args:?} should be refused with status 1 or 2: {out}"
        );
        assert!(
            out.stderr.contains(args[0]) || out.stderr.contains(args[1]),
            "{args:?}: the message should name the flag or value:\n{out}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: the guest ran:\n{out}");
    }
}

// ---- live snapshots through the API socket ---------------------------------------

#[test]
fn vmm_snapshot_live_writes_an_image_of_a_running_vm() {
    let dir = scratch_file("snapshot-dir", b"");
    std::fs::remove_file(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let sock = dir.join("api.sock");
    let image = dir.join("vm.mem");
    let program = guest_path("generations");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args([
            "run",
            "--program",
            program.to_str().unwrap(),
            "--mem",
            "64M",
        ])
        .arg("--api-sock")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline, "no API socket");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let (s, i) = (sock.to_str().unwrap(), image.to_str().unwrap());
    let out = vmm(&["snapshot", "--api-sock", s, "--out", i]);
    assert_refused(&out, "a snapshot without --live", "--live");
    let out = vmm(&["snapshot", "--api-sock", s, "--live", "--out", i]);
    assert!(out.status == Some(0), "{out}");
    assert!(out.stdout.contains("pause_us="), "{out}");
    assert!(out.stderr.contains("(100%)"), "progress: {out}");
    let len = std::fs::metadata(&image).unwrap().len();
    assert_eq!(len, 64 << 20, "the image is as long as RAM");
    let out = vmm(&["snapshot", "--api-sock", s, "--live", "--out", i]);
    assert_refused(&out, "an existing image", "exists");
    child.kill().unwrap();
    child.wait().unwrap();
    let other = dir.join("other.mem");
    let out = vmm(&[
        "snapshot",
        "--api-sock",
        s,
        "--live",
        "--out",
        other.to_str().unwrap(),
    ]);
    assert_refused(&out, "a VM that is gone", "--api-sock");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_help_names_every_group() {
    let out = vmm(&["bench", "--help"]);
    assert_eq!(out.status, Some(0), "{out}");
    let words: Vec<&str> = out
        .stdout
        .split(|c: char| !c.is_ascii_alphanumeric())
        .collect();
    for group in vmm::bench::GROUPS {
        assert!(
            words.contains(group),
            "`vmm bench --help` does not name the group {group}:\n{out}"
        );
    }
}
