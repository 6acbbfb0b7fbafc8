// gcc flags for program-mode guests: static, non-PIE, freestanding ELF64
// programs with no stack protector, no AVX and no CET notes. Included by
// the build scripts of `vmm` and `guest-tests`.
const GUEST_CFLAGS: &[&str] = &[
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
];
