//! Helpers for tests that run fuzzers: AFL++'s `afl-fuzz`, and the files a
//! campaign leaves in AFL's output layout.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The `afl-fuzz` on PATH, or the test fails saying how to install it.
pub fn afl_fuzz() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("afl-fuzz"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "afl-fuzz is missing: install AFL++ (`apt-get install afl++`, as scripts/setup does)"
        )
    })
}

/// `afl-fuzz` with the environment it needs on any test host: no tty for
/// its screen, perhaps a core_pattern that pipes to a crash handler (which
/// it refuses), no cpufreq control, cores shared with other work.
pub fn afl_command() -> Command {
    let mut cmd = Command::new(afl_fuzz());
    cmd.env("AFL_NO_UI", "1")
        .env("AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES", "1")
        .env("AFL_SKIP_CPUFREQ", "1")
        .env("AFL_NO_AFFINITY", "1");
    cmd
}

/// The names of the saved inputs (`id:...`) in `dir`, sorted.
pub fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("id:"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Stops a fuzzer the way Ctrl-C does (afl-fuzz then removes its shared
/// memory), killing it if it does not stop within 10 s.
pub fn stop(child: &mut Child) {
    // SAFETY: kill has no memory effects; the pid is our unreaped child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}
