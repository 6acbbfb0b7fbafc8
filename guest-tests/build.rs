//! Builds every guest program in guests/ (`*.c`, `*.S`) with the host's gcc
//! into a static non-PIE ELF64 file, `$OUT_DIR/guests/<name>.elf`, so that
//! `cargo test` always runs the current sources.

use std::path::{Path, PathBuf};
use std::process::Command;

include!("../resources/guests/cflags.rs");

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let sources = manifest.join("guests");
    let shared = manifest.join("../resources/guests");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("guests");
    std::fs::create_dir_all(&out).expect("cannot create $OUT_DIR/guests");

    // The directory itself, so that a new or removed source triggers a rebuild.
    println!("cargo:rerun-if-changed={}", sources.display());
    for file in ["guest.h", "virtio.h", "fuzz.h", "cflags.rs"] {
        println!("cargo:rerun-if-changed={}", shared.join(file).display());
    }

    let mut entries: Vec<PathBuf> = std::fs::read_dir(&sources)
        .expect("cannot list guest-tests/guests")
        .map(|e| e.expect("cannot list guest-tests/guests").path())
        .collect();
    entries.sort();
    let mut built = Vec::new();
    for path in entries {
        println!("cargo:rerun-if-changed={}", path.display());
        let is_source = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("c") | Some("S")
        );
        if !is_source {
            continue;
        }
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        assert!(
            !built.contains(&name),
            "two guest sources are named {name}: one program per name"
        );
        build(&path, &out.join(format!("{name}.elf")), &sources, &shared);
        built.push(name);
    }
    assert!(
        !built.is_empty(),
        "no guest sources in {}",
        sources.display()
    );

    // Programs whose source is gone must not linger.
    for e in std::fs::read_dir(&out).expect("cannot list $OUT_DIR/guests") {
        let path = e.expect("cannot list $OUT_DIR/guests").path();
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if !built.iter().any(|b| b == stem) {
            std::fs::remove_file(&path).expect("cannot remove a stale guest");
        }
    }
}

fn build(src: &Path, elf: &Path, include: &Path, shared: &Path) {
    let output = Command::new("gcc")
        .args(GUEST_CFLAGS)
        .arg("-I")
        .arg(include)
        .arg("-I")
        .arg(shared)
        .arg("-o")
        .arg(elf)
        .arg(src)
        .output()
        .expect("building the test guests needs gcc on PATH");
    assert!(
        output.status.success(),
        "gcc failed to build {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}
