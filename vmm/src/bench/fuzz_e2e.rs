//! End to end: runs per second of the planted-bug target under the
//! built-in fuzzer (`vmm fuzz --jobs 2`) and under AFL++ driving
//! `vmm fuzz-target`, next to AFL++ fuzzing the same logic compiled
//! natively (afl-cc, forkserver mode), each for the same time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::Bench;
use crate::vm::VmmError;

/// The native twin of the planted target.
const NATIVE: &str = include_str!("../../../resources/native/planted.c");

fn io(what: &str) -> impl Fn(std::io::Error) -> VmmError + '_ {
    move |e| VmmError::Config(format!("fuzzing end to end: {what}: {e}"))
}

/// `execs_per_sec` from an AFL-layout `fuzzer_stats` file.
fn execs_per_sec(out: &Path) -> Option<f64> {
    let stats = std::fs::read_to_string(out.join("default/fuzzer_stats")).ok()?;
    stats.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "execs_per_sec").then(|| v.trim().parse().ok())?
    })
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.is_file())
}

/// afl-fuzz for `secs` seconds on `target` (argv), its output in `out`.
fn afl(afl: &Path, seeds: &Path, out: &Path, secs: u64, target: &[&str]) -> Result<(), VmmError> {
    let status = Command::new(afl)
        .args([
            "-i",
            seeds.to_str().unwrap_or(""),
            "-o",
            out.to_str().unwrap_or(""),
        ])
        .args(["-t", "1000", "-m", "none", "-V", &secs.to_string(), "--"])
        .args(target)
        .env("AFL_NO_UI", "1")
        .env("AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES", "1")
        .env("AFL_SKIP_CPUFREQ", "1")
        .env("AFL_NO_AFFINITY", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(io("afl-fuzz"))?;
    if execs_per_sec(out).is_none() {
        return Err(VmmError::Config(format!(
            "afl-fuzz {} ended ({status}) without statistics",
            target.join(" ")
        )));
    }
    Ok(())
}

impl Bench {
    pub(super) fn fuzz_end_to_end(&mut self) -> Result<(), VmmError> {
        let (Some(afl_fuzz), Some(afl_cc)) = (which("afl-fuzz"), which("afl-cc")) else {
            self.record(
                "fuzz end to end (AFL++ not installed)",
                "-".into(),
                "install afl++ to measure".into(),
            );
            return Ok(());
        };
        let secs = if self.quick { 5 } else { 30 };
        let dir = std::env::temp_dir().join(format!("vmm-bench-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let seeds = dir.join("seeds");
        std::fs::create_dir_all(&seeds).map_err(io("seeds"))?;
        std::fs::write(seeds.join("hello"), b"hello").map_err(io("seeds"))?;
        let program = dir.join("planted.elf");
        std::fs::write(&program, crate::guests::FUZZ_PLANTED).map_err(io("target"))?;
        let native_src = dir.join("planted.c");
        std::fs::write(&native_src, NATIVE).map_err(io("native target"))?;
        let native = dir.join("planted-native");
        let built = Command::new(&afl_cc)
            .args(["-O1", "-o"])
            .arg(&native)
            .arg(&native_src)
            .env("AFL_QUIET", "1")
            .output()
            .map_err(io("afl-cc"))?;
        if !built.status.success() {
            return Err(VmmError::Config(format!(
                "afl-cc failed: {}",
                String::from_utf8_lossy(&built.stderr)
            )));
        }
        let exe = std::env::current_exe().map_err(io("vmm"))?;
        let exe = exe.to_str().unwrap_or("vmm");
        let program = program.to_str().unwrap_or("");

        let builtin = dir.join("builtin");
        let status = Command::new(exe)
            .args(["fuzz", "--program", program, "--corpus"])
            .arg(&seeds)
            .arg("--out")
            .arg(&builtin)
            .args(["--jobs", "2", "--max-time", &secs.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(io("vmm fuzz"))?;
        let builtin_rate = execs_per_sec(&builtin).ok_or_else(|| {
            VmmError::Config(format!("vmm fuzz ended ({status}) without statistics"))
        })?;
        let through_afl = dir.join("afl-vmm");
        afl(
            &afl_fuzz,
            &seeds,
            &through_afl,
            secs,
            &[exe, "fuzz-target", "--program", program, "@@"],
        )?;
        let native_out = dir.join("afl-native");
        afl(
            &afl_fuzz,
            &seeds,
            &native_out,
            secs,
            &[native.to_str().unwrap_or(""), "@@"],
        )?;
        let afl_rate = execs_per_sec(&through_afl).unwrap_or(0.0);
        let native_rate = execs_per_sec(&native_out).unwrap_or(0.0);
        let _ = std::fs::remove_dir_all(&dir);
        self.record(
            &format!("fuzz end to end: AFL++ native forkserver ({secs} s)"),
            format!("{native_rate:.0}/s"),
            "baseline".into(),
        );
        self.record(
            &format!("fuzz end to end: AFL++ -> vmm fuzz-target ({secs} s)"),
            format!("{afl_rate:.0}/s"),
            format!("{:.2}x native", afl_rate / native_rate),
        );
        self.record(
            &format!("fuzz end to end: vmm fuzz --jobs 2 ({secs} s)"),
            format!("{builtin_rate:.0}/s"),
            format!("{:.2}x native", builtin_rate / native_rate),
        );
        Ok(())
    }
}
