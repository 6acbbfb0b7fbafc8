/* Benchmark guest for `vmm bench`. The host fills the mailbox at 0x200000
   before the VM starts: [0] mode, [1] count, [4] TSC ticks per second;
   results come back in [2] and [3] (TSC ticks).
   mode 1: count hypercalls (WRITE of 0 bytes), timed ([2], per call),
           then EXIT.
   mode 2: touch count pages, FORK; the child times count copy-on-write
           faults and count plain port exits, per operation ([2], [3]),
           while the parent waits, so every write really copies.
   mode 3: count times: FORK, the child writes one page and exits, WAIT.
   mode 4: touch count pages, then spin until the host stops the VM.
   mode 5: EXIT at once (time to the first guest instruction). */
#include "guest.h"
#define MB ((volatile u64 *)0x200000)
#define AREA ((volatile u8 *)0x1000000)

static inline u64 rdtsc(void) {
    u32 lo, hi;
    asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

void gmain(u64 ram) {
    (void)ram;
    u64 mode = MB[0], n = MB[1];
    if (mode == 5) g_exit(0);
    if (mode == 1) {
        static char none;
        u64 t0 = rdtsc();
        for (u64 i = 0; i < n; i++) hc(HC_WRITE, (u64)&none, 0, 0);
        MB[2] = (rdtsc() - t0) / n;
        g_exit(0);
    }
    if (mode == 2 || mode == 4) {
        for (u64 i = 0; i < n; i++) AREA[i * PAGE] = 1;
    }
    if (mode == 4) for (;;) asm volatile("pause");
    if (mode == 2) {
        /* The child measures while the parent waits (no CPU used), so the
           pages stay shared and every child write copies. The child's
           exit code carries its per-operation averages, in ticks. */
        i64 c = hc(HC_FORK, 0, 0, 0);
        if (c == 0) {
            u64 t0 = rdtsc();
            for (u64 i = 0; i < n; i++) AREA[i * PAGE] = 2;
            u64 t1 = rdtsc();
            for (u64 i = 0; i < n; i++) asm volatile("outb %%al, $0x80" ::"a"(0));
            u64 t2 = rdtsc();
            g_exit((((t1 - t0) / n) << 32) | ((t2 - t1) / n));
        }
        G_CHECK(c > 0, "FORK failed");
        u64 st = (u64)hc(HC_WAIT, (u64)c, 0, 0);
        MB[2] = st >> 32;
        MB[3] = st & 0xffffffff;
        g_exit(0);
    }
    if (mode == 3) {
        for (u64 i = 0; i < n; i++) {
            i64 c = hc(HC_FORK, 0, 0, 0);
            if (c == 0) { MB[8] = i; g_exit(0); }
            G_CHECK(c > 0, "FORK failed");
            G_CHECK(hc(HC_WAIT, (u64)c, 0, 0) == 0, "WAIT failed");
        }
        g_exit(0);
    }
    g_exit(99);
}
