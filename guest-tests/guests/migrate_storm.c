/* vCPU 0 migrates four pages back to back, thousands of times, while vCPU 1
   writes them without pause: vCPU 1's writes keep faulting on pages whose
   move has finished by the time the VMM looks, which must never be taken
   for a fault the VMM cannot resolve. Every write lands (vCPU 1 counts in
   the pages and in a register). */
#include "test.h"

#define ROUNDS 15000
static u8 __attribute__((aligned(4096))) stack1[4 * PAGE];
static volatile u64 __attribute__((aligned(4096))) pages[4 * PAGE / 8];
/* [0] stop (vCPU 0 to 1), [1] done (1 to 0), [2] vCPU 1's own count. */
static volatile u64 __attribute__((aligned(4096))) ctl[PAGE / 8];

void worker(u64 index) {
    (void)index;
    u64 mine = 0;
    while (!ctl[0]) {
        for (u64 p = 0; p < 4; p++) pages[p * PAGE / 8]++;
        mine++;
    }
    ctl[2] = mine;
    ctl[1] = 1;
    for (;;) asm volatile("pause");
}

void gmain(u64 ram) {
    (void)ram;
    for (u64 p = 0; p < 4; p++) pages[p * PAGE / 8] = 0;
    T_EQ(hc(HC_VCPU_START, 1, (u64)worker, (u64)stack1 + sizeof stack1 - 8), 0, "VCPU_START");
    u64 moved = 0;
    for (u64 r = 0; r < ROUNDS; r++) {
        i64 m = hc(HC_MIGRATE, (u64)pages, sizeof pages, 0);
        T_TRUE(m >= 0, "MIGRATE succeeds");
        moved += (u64)m;
    }
    ctl[0] = 1;
    while (!ctl[1]) asm volatile("pause");
    for (u64 p = 0; p < 4; p++) T_EQ(pages[p * PAGE / 8], ctl[2], "each page counted every round");
    T_TRUE(moved >= ROUNDS, "pages moved");
    g_puts("MIGRATE-STORM-OK moved ");
    g_putu(moved);
    g_puts(" rounds ");
    g_putu(ctl[2]);
    g_puts("\n");
    g_exit(0);
}
