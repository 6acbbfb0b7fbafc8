/* Snapshot and restore: a counter kept in memory, in r12 and in xmm7, and
   1 MiB of data. The program counts to 1000, prints "ready", then spins
   until the host sets the flag at 0x300000 (or, built as snap_timed,
   until it has spun SPIN_LIMIT times). The host snapshots it while it
   spins and restores it in a new VM, which goes on from the spin: it
   counts once more in each place, checks the three agree and the data is
   intact, prints them and exits 42. */
#include "test.h"

#define FLAG ((volatile u64 *)0x300000)
#define DATA ((volatile u64 *)0x1000000)
#define WORDS ((1ul << 20) / 8)
#ifndef SPIN_LIMIT
#define SPIN_LIMIT (~0ul)
#endif

static volatile u64 counter;

static u64 word(u64 i) { return i * 0x9e3779b97f4a7c15ul ^ 0x5555; }

void gmain(u64 ram) {
    (void)ram;
    for (u64 i = 0; i < WORDS; i++) DATA[i] = word(i);
    for (int i = 0; i < 1000; i++) counter++;
    g_puts("ready\n");
    u64 reg, vec, limit = SPIN_LIMIT;
    asm volatile(
        "mov %[c], %%r12\n"
        "movq %[c], %%xmm7\n"
        "1: pause\n"
        "cmpq $0, (%[flag])\n"
        "jne 2f\n"
        "dec %[limit]\n"
        "jnz 1b\n"
        "2: inc %%r12\n"
        "mov %%r12, %[reg]\n"
        "movq %%xmm7, %[vec]\n"
        : [reg] "=&r"(reg), [vec] "=&r"(vec), [limit] "+r"(limit)
        : [c] "r"((u64)counter), [flag] "r"(FLAG)
        : "r12", "xmm7", "memory", "cc");
    counter++;
    vec++;
    T_EQ(reg, counter, "r12 against the counter in memory");
    T_EQ(vec, counter, "xmm7 against the counter in memory");
    for (u64 i = 0; i < WORDS; i++) T_EQ(DATA[i], word(i), "a data word");
    g_puts("after: counter ");
    g_putu(counter);
    g_puts(", r12 ");
    g_putu(reg);
    g_puts(", xmm7 ");
    g_putu(vec);
    g_puts(", data intact\n");
    g_exit(42);
}
