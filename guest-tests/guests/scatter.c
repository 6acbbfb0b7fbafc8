/* Scatters its pages over stores (copy-on-write copies while a clone
   shares the originals), then waits up to about a second for a background
   compactor to move them back, checking its data meanwhile. Prints how
   many pages moved. */
#include "cow.h"
#include "test.h"

#define PAGES 64
static u8 __attribute__((aligned(4096))) area[PAGES * PAGE];

void gmain(u64 ram) {
    (void)ram;
    u64 m0 = g_stat(ST_MIGRATED);
    for (u64 i = 0; i < PAGES; i++) area[i * PAGE] = 1;
    i64 c = fork_vm();
    if (c == 0) {
        spin(3000000);
        g_exit(0);
    }
    for (u64 i = 0; i < PAGES; i += 2) area[i * PAGE] = 2;
    WAIT_OK(c);
    u64 m = g_stat(ST_MIGRATED);
    for (int t = 0; t < 30000 && m < m0 + PAGES / 2; t++) {
        for (u64 i = 0; i < PAGES; i++) T_EQ(area[i * PAGE], i % 2 ? 1 : 2, "data while compacting");
        m = g_stat(ST_MIGRATED);
    }
    g_puts("SCATTER-OK moved ");
    g_putu(m - m0);
    g_puts("\n");
    g_exit(0);
}
