/* STATS: the number of counters written follows the cap (whole u64s), bytes
   past them are untouched, and a buffer outside RAM is -EFAULT. */
#include "test.h"

#define CANARY 0xcccccccccccccccc
#define WORDS 64
static u64 buf[WORDS + 1];

static void fill(void) {
    for (int i = 0; i <= WORDS; i++) buf[i] = CANARY;
}

static void capped(u64 cap, u64 want) {
    fill();
    T_EQ(hc(HC_STATS, (u64)buf, cap, 0), want, "STATS count for a small cap");
    for (u64 i = 0; i < want; i++) T_TRUE(buf[i] != CANARY, "counter written");
    T_EQ(buf[want], CANARY, "word past the counters untouched");
}

void gmain(u64 ram) {
    capped(0, 0);
    capped(7, 0);
    capped(8, 1);
    capped(20, 2);
    capped(64, 8);

    fill();
    i64 all = hc(HC_STATS, (u64)buf, WORDS * 8, 0);
    T_TRUE(all >= 8 && all < WORDS, "STATS fills at least the 8 ABI counters");
    T_EQ(buf[all], CANARY, "word past all counters untouched");
    T_TRUE(buf[0] > 0 && buf[0] < ram / PAGE, "resident frames");

    fill();
    T_EQ(hc(HC_STATS, (u64)buf, ~0ul, 0), all, "STATS with a huge cap");
    T_EQ(buf[all], CANARY, "word past all counters untouched (huge cap)");

    u64 end = t_ram_end(ram);
    T_EQ(hc(HC_STATS, 1ul << 40, 64, 0), -E_FAULT, "STATS into a buffer at 1 TiB");
    T_EQ(hc(HC_STATS, 0xd0000000ul, 64, 0), -E_FAULT, "STATS into the MMIO window");
    T_EQ(hc(HC_STATS, end - 8, 16, 0), -E_FAULT, "STATS crossing the end of RAM");
    T_EQ(hc(HC_STATS, ~0ul - 7, 16, 0), -E_FAULT, "STATS into a wrapping buffer");

    g_puts("stats: ");
    g_putu(all);
    g_puts(" counters\n");
    g_exit(0);
}
