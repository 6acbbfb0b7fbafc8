/* A fuzzing target that checks, at the start of every run, that all a run
   changed was restored, then changes all of it again:
   - its data area (a pattern written before SNAPSHOT; runs overwrite all
     of it and discard one page), and a page runs discard without writing
     it (a discard is a change the reset must undo too),
   - pages first touched by a run (they must read zeros again),
   - general registers rbx, r12-r15 and all 16 XMM registers (set before
     SNAPSHOT, trashed by runs).
   DONE(0) if all was restored, else DONE(code): 1 area, 2 fresh pages,
   3 XMM, 4 general registers. */
#include "fuzz.h"

#define AREA 256
#define FRESH 64
static u8 __attribute__((aligned(4096))) area[AREA * 4096];
static u8 __attribute__((aligned(4096))) fresh[FRESH * 4096];
static u64 __attribute__((aligned(4096))) kept[512];
static u64 __attribute__((aligned(16))) pattern[32];
static u64 __attribute__((aligned(16))) seen[32];
static u64 gpr_seen[5];
static u8 input[64];

static u64 mix(u64 x) { x ^= x >> 31; x *= 0x9e3779b97f4a7c15ul; return x ^ (x >> 29); }

/* SNAPSHOT with known values in rbx, r12-r15 and xmm0-15; what they hold
   when it returns (at every run's start) goes to gpr_seen and seen. */
static u64 snapshot_with_registers(void) {
    u64 ret;
    register u64 r10 asm("r10") = 0;
    asm volatile(
        "movdqa 0(%[p]), %%xmm0\n\t movdqa 16(%[p]), %%xmm1\n\t"
        "movdqa 32(%[p]), %%xmm2\n\t movdqa 48(%[p]), %%xmm3\n\t"
        "movdqa 64(%[p]), %%xmm4\n\t movdqa 80(%[p]), %%xmm5\n\t"
        "movdqa 96(%[p]), %%xmm6\n\t movdqa 112(%[p]), %%xmm7\n\t"
        "movdqa 128(%[p]), %%xmm8\n\t movdqa 144(%[p]), %%xmm9\n\t"
        "movdqa 160(%[p]), %%xmm10\n\t movdqa 176(%[p]), %%xmm11\n\t"
        "movdqa 192(%[p]), %%xmm12\n\t movdqa 208(%[p]), %%xmm13\n\t"
        "movdqa 224(%[p]), %%xmm14\n\t movdqa 240(%[p]), %%xmm15\n\t"
        "movabs $0x1111111111111111, %%rbx\n\t movabs $0x1212121212121212, %%r12\n\t"
        "movabs $0x1313131313131313, %%r13\n\t movabs $0x1414141414141414, %%r14\n\t"
        "movabs $0x1515151515151515, %%r15\n\t"
        "out %%eax, %%dx\n\t"
        "movdqa %%xmm0, 0(%[s])\n\t movdqa %%xmm1, 16(%[s])\n\t"
        "movdqa %%xmm2, 32(%[s])\n\t movdqa %%xmm3, 48(%[s])\n\t"
        "movdqa %%xmm4, 64(%[s])\n\t movdqa %%xmm5, 80(%[s])\n\t"
        "movdqa %%xmm6, 96(%[s])\n\t movdqa %%xmm7, 112(%[s])\n\t"
        "movdqa %%xmm8, 128(%[s])\n\t movdqa %%xmm9, 144(%[s])\n\t"
        "movdqa %%xmm10, 160(%[s])\n\t movdqa %%xmm11, 176(%[s])\n\t"
        "movdqa %%xmm12, 192(%[s])\n\t movdqa %%xmm13, 208(%[s])\n\t"
        "movdqa %%xmm14, 224(%[s])\n\t movdqa %%xmm15, 240(%[s])\n\t"
        "mov %%rbx, 0(%[g])\n\t mov %%r12, 8(%[g])\n\t mov %%r13, 16(%[g])\n\t"
        "mov %%r14, 24(%[g])\n\t mov %%r15, 32(%[g])\n\t"
        : "=a"(ret)
        : "a"((u64)HC_SNAPSHOT), "D"(input), "S"(sizeof input), "r"(r10),
          "d"((unsigned short)0x510), [p] "r"(pattern), [s] "r"(seen), [g] "r"(gpr_seen)
        : "memory", "rbx", "r12", "r13", "r14", "r15", "xmm0", "xmm1", "xmm2", "xmm3",
          "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
          "xmm13", "xmm14", "xmm15");
    return ret;
}

static void trash_registers(u64 seed) {
    u64 junk[2] __attribute__((aligned(16))) = {seed, ~seed};
    asm volatile(
        "movdqa (%0), %%xmm0\n\t movdqa %%xmm0, %%xmm1\n\t movdqa %%xmm0, %%xmm2\n\t"
        "movdqa %%xmm0, %%xmm3\n\t movdqa %%xmm0, %%xmm4\n\t movdqa %%xmm0, %%xmm5\n\t"
        "movdqa %%xmm0, %%xmm6\n\t movdqa %%xmm0, %%xmm7\n\t movdqa %%xmm0, %%xmm8\n\t"
        "movdqa %%xmm0, %%xmm9\n\t movdqa %%xmm0, %%xmm10\n\t movdqa %%xmm0, %%xmm11\n\t"
        "movdqa %%xmm0, %%xmm12\n\t movdqa %%xmm0, %%xmm13\n\t movdqa %%xmm0, %%xmm14\n\t"
        "movdqa %%xmm0, %%xmm15\n\t"
        "mov %1, %%rbx\n\t mov %1, %%r12\n\t mov %1, %%r13\n\t mov %1, %%r14\n\t mov %1, %%r15\n\t"
        :
        : "r"(junk), "r"(seed)
        : "memory", "rbx", "r12", "r13", "r14", "r15", "xmm0", "xmm1", "xmm2", "xmm3",
          "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
          "xmm13", "xmm14", "xmm15");
}

static u64 check(void) {
    for (u64 i = 0; i < AREA * 4096 / 8; i++)
        if (((u64 *)area)[i] != mix(i)) return 1;
    for (u64 i = 0; i < 512; i++)
        if (kept[i] != mix(i + 7)) return 1;
    for (u64 i = 0; i < FRESH * 4096 / 8; i++)
        if (((u64 *)fresh)[i] != 0) return 2;
    for (int i = 0; i < 32; i++)
        if (seen[i] != pattern[i]) return 3;
    static const u64 gpr_want[5] = {0x1111111111111111ul, 0x1212121212121212ul,
                                    0x1313131313131313ul, 0x1414141414141414ul,
                                    0x1515151515151515ul};
    for (int i = 0; i < 5; i++)
        if (gpr_seen[i] != gpr_want[i]) return 4;
    return 0;
}

void gmain(u64 ram) {
    (void)ram;
    fz_init();
    for (u64 i = 0; i < AREA * 4096 / 8; i++) ((u64 *)area)[i] = mix(i);
    for (int i = 0; i < 32; i++) pattern[i] = mix(1000 + i);
    for (u64 i = 0; i < 512; i++) kept[i] = mix(i + 7);
    g_puts("scribble: ready\n");
    u64 n = snapshot_with_registers();
    u64 bad = check();
    u64 seed = n ? input[0] + 1 : 1;
    EDGE(bad + 1);
    for (u64 i = 0; i < AREA * 4096 / 8; i++) ((u64 *)area)[i] = seed * i;
    for (u64 i = 0; i < FRESH; i++) fresh[i * 4096 + seed % 4096] = (u8)seed;
    hc(HC_DISCARD, (u64)&area[7 * 4096], 4096, 0);
    hc(HC_DISCARD, (u64)kept, 4096, 0);
    trash_registers(seed * 0x0101010101010101ul);
    fz_done(bad);
    g_exit(0);
}
