//! Builds the built-in demo guest (resources/guests/demo.c) with the host's
//! gcc, as a static non-PIE ELF that `vmm run` embeds.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("..");
    let guests = root.join("resources/guests");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("demo.elf");
    for f in ["demo.c", "guest.h"] {
        println!("cargo:rerun-if-changed={}", guests.join(f).display());
    }
    let status = Command::new("gcc")
        .args([
            "-O2",
            "-ffreestanding",
            "-fno-pic",
            "-no-pie",
            "-nostdlib",
            "-static",
            "-fno-stack-protector",
            "-mno-avx",
            "-fcf-protection=none",
            "-Wl,--build-id=none",
            "-Wall",
            "-Werror",
            "-o",
        ])
        .arg(&out)
        .arg(guests.join("demo.c"))
        .status()
        .expect("building the demo guest needs gcc on PATH");
    assert!(
        status.success(),
        "gcc failed to build resources/guests/demo.c"
    );
}
