/* Checks that RAM reads zero until written at its start, middle and end,
   low and (past 3 GiB of RAM) high, then writes a pattern there that the
   host reads back. The list of places is repeated in the host test. */
#include "test.h"

#define PATTERN(addr) ((addr) ^ 0x5aa5c33c00000000ul)

/* A page that was never written: zeros, then a pattern in its first and
   last word. */
static void fresh_page(u64 page) {
    for (u64 off = 0; off < PAGE; off += 8) {
        u64 v = t_rd64(page + off);
        if (v != 0) {
            g_puts("at ");
            t_putx(page + off);
            g_puts(": ");
            t_fail("fresh RAM is not zero", v, 0);
        }
    }
    t_wr64(page, PATTERN(page));
    t_wr64(page + PAGE - 8, PATTERN(page + PAGE - 8));
    T_EQ(t_rd64(page), PATTERN(page), "read back");
}

void gmain(u64 ram) {
    u64 low = t_low_end(ram), end = t_ram_end(ram);
    fresh_page(1ul << 20);
    fresh_page((low / 2) & ~(PAGE - 1));
    fresh_page(low - (2ul << 20));
    /* The last word of low RAM holds _start's return address: write only. */
    t_wr64(low - 8, PATTERN(low - 8));
    if (end > HIGH_RAM_BASE) {
        fresh_page(HIGH_RAM_BASE);
        fresh_page(HIGH_RAM_BASE + (((end - HIGH_RAM_BASE) / 2) & ~(PAGE - 1)));
        fresh_page(end - PAGE);
    }
    g_puts("mem_layout: ram ");
    t_putx(ram);
    g_puts(" ends at ");
    t_putx(end);
    g_puts("\n");
    g_exit(0);
}
