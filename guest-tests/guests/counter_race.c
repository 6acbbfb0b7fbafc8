/* vCPU 1 increments a counter while vCPU 0 swaps the counter's page out
   and migrates it, again and again: every increment must land exactly
   once (vCPU 1 also counts in a register and reports that at the end). Also migrates pages a pin holds (skipped) and
   checks MIGRATE's arguments. */
#include "cow.h"
#include "test.h"

#define ROUNDS 200
static u8 __attribute__((aligned(4096))) stack1[4 * PAGE];
static volatile u64 __attribute__((aligned(4096))) counter[PAGE / 8];
/* [0] stop (vCPU 0 to 1), [1] done (1 to 0), [2] vCPU 1's own count. */
static volatile u64 __attribute__((aligned(4096))) ctl[PAGE / 8];
static u8 __attribute__((aligned(4096))) area[4 * PAGE];

static i64 swap_out(volatile void *p) { return hc(HC_SWAP_OUT, (u64)p, PAGE, 0); }
static i64 migrate(volatile void *p, u64 len) { return hc(HC_MIGRATE, (u64)p, len, 0); }

void worker(u64 index) {
    (void)index;
    u64 mine = 0;
    while (!ctl[0]) {
        counter[0]++;
        mine++;
    }
    ctl[2] = mine;
    ctl[1] = 1;
    for (;;) asm volatile("pause");
}

void gmain(u64 ram) {
    counter[0] = 0;
    u64 mig0 = g_stat(ST_MIGRATED);
    T_EQ(hc(HC_VCPU_START, 1, (u64)worker, (u64)stack1 + sizeof stack1 - 8), 0, "VCPU_START");
    u64 swaps = 0, moves = 0;
    while (swaps < ROUNDS || moves < ROUNDS) {
        /* Let vCPU 1 count a little in between, and bring the page back
           (a page in swap has no frame to move). */
        for (u64 t = counter[0]; counter[0] < t + 100;) asm volatile("pause");
        i64 m = migrate(counter, PAGE);
        i64 s = swap_out(counter);
        T_TRUE(s >= 0 && m >= 0, "SWAP_OUT and MIGRATE succeed");
        swaps += (u64)s;
        moves += (u64)m;
    }
    ctl[0] = 1;
    while (!ctl[1]) asm volatile("pause");
    T_TRUE(ctl[2] > ROUNDS * 100, "vCPU 1 counted");
    T_EQ(counter[0], ctl[2], "the counter against vCPU 1's own count");
    T_TRUE(g_stat(ST_MIGRATED) >= mig0 + moves, "STATS pages migrated");

    /* A pinned page is skipped; the device and the guest still agree. */
    for (u64 i = 0; i < sizeof area; i += PAGE) area[i] = 1;
    i64 h = pin(area, PAGE, PIN_WRITE_FLAG | PIN_LONGTERM);
    T_TRUE(h >= 0, "PIN");
    T_EQ(migrate(area, sizeof area), 3, "MIGRATE skips the pinned page");
    area[0] = 9;
    u8 b[PAGE];
    T_EQ(pin_read(h, b), PAGE, "PIN_READ");
    T_EQ(b[0], 9, "the pinned page after MIGRATE");
    T_EQ(unpin(h), 0, "UNPIN");
    T_EQ(area[PAGE] + area[2 * PAGE] + area[3 * PAGE], 3, "moved pages keep their data");

    T_EQ(migrate(&area[1], PAGE), -E_INVAL, "unaligned");
    T_EQ(migrate((void *)0x1000, PAGE), -E_INVAL, "the VMM's first MiB");
    T_EQ(migrate((void *)t_ram_end(ram), PAGE), -E_FAULT, "past RAM");
    g_puts("COUNTER-RACE-OK swaps ");
    g_putu(swaps);
    g_puts(" moves ");
    g_putu(moves);
    g_puts("\n");
    g_exit(0);
}
