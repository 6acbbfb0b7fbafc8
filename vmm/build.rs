//! Builds the guests the `vmm` binary embeds (resources/guests: the demo,
//! the benchmark guest, hello) with the host's gcc, as static non-PIE ELFs.

use std::path::PathBuf;
use std::process::Command;

include!("../resources/guests/cflags.rs");

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("..");
    let guests = root.join("resources/guests");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for shared in ["guest.h", "virtio.h", "fuzz.h", "cflags.rs"] {
        println!("cargo:rerun-if-changed={}", guests.join(shared).display());
    }
    for name in ["demo", "bench", "hello", "fuzz_bench", "fuzz_planted"] {
        let src = guests.join(format!("{name}.c"));
        println!("cargo:rerun-if-changed={}", src.display());
        build(&src, &out_dir.join(format!("{name}.elf")));
    }
}

fn build(src: &std::path::Path, out: &std::path::Path) {
    let status = Command::new("gcc")
        .args(GUEST_CFLAGS)
        .arg("-o")
        .arg(out)
        .arg(src)
        .status()
        .expect("building the embedded guests needs gcc on PATH");
    assert!(status.success(), "gcc failed to build {}", src.display());
}
