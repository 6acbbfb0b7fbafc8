/* Run with several vCPUs and no VCPU_START: only vCPU 0 ever runs. A second
   vCPU entering the program exits 77; one running from anywhere else faults. */
#include "test.h"

static volatile u64 entries;

static u64 rdtsc(void) {
    u32 lo, hi;
    asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

void gmain(u64 ram) {
    if (__atomic_add_fetch(&entries, 1, __ATOMIC_SEQ_CST) != 1) g_exit(77);
    u64 start = rdtsc();
    while (rdtsc() - start < 200000000ul) asm volatile("pause");
    T_EQ(entries, 1, "program entries");
    g_puts("vcpu_idle: only vCPU 0 ran\n");
    g_exit(0);
}
