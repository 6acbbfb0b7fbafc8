/* For `vmm run --huge --collapse`: splits a 2 MiB block into 4 KiB pages
   (a DISCARD of one page, touched again), then waits up to about 3 s
   (polling STATS) for the background collapser to map it whole again.
   Prints "collapsed N" (N: STATS counter 16) and checks its data. */
#include "cow.h"

#define BLOCK (2ul << 20)
#define PAGES (BLOCK / PAGE)

static u8 __attribute__((aligned(BLOCK))) blk[BLOCK];

static u64 collapses(void) {
    u64 s[17] = {0};
    hc(HC_STATS, (u64)s, sizeof s, 0);
    return s[16];
}

void gmain(u64 ram) {
    (void)ram;
    for (u64 i = 0; i < PAGES; i++) blk[i * PAGE] = (u8)(i + 1);
    G_CHECK(discard(blk + 7 * PAGE, PAGE) == 0, "DISCARD failed");
    blk[7 * PAGE] = 8;
    u64 n = 0;
    for (int i = 0; i < 100000 && (n = collapses()) == 0; i++) {}
    for (u64 i = 0; i < PAGES; i++) G_CHECK(blk[i * PAGE] == (u8)(i + 1), "data lost");
    g_puts("collapsed ");
    g_putu(n);
    g_puts("\n");
    g_exit(0);
}
