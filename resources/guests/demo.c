/* The built-in demo: what `vmm run` with no guest shows. */
#include "guest.h"

static u8 __attribute__((aligned(4096))) area[4 << 20];

void gmain(u64 ram) {
    g_puts("demo: a static program running in ring 3 of a 64-bit guest (program mode)\n");
    g_puts("demo: RAM "); g_putu(ram >> 20); g_puts(" MiB; guest memory is allocated on first touch\n");
    u64 before = g_stat(ST_RESIDENT);
    g_puts("demo: frames in use now: "); g_putu(before); g_puts("\n");
    for (u64 i = 0; i < sizeof area; i += PAGE) area[i] = (u8)i;
    u64 after = g_stat(ST_RESIDENT);
    g_puts("demo: after writing 4 MiB: "); g_putu(after); g_puts(" frames (");
    g_putu(after - before); g_puts(" new)\n");
    G_CHECK(after >= before + (sizeof area) / PAGE, "first touch did not allocate frames");
    G_CHECK(hc(HC_DISCARD, (u64)area, sizeof area, 0) == 0, "DISCARD failed");
    u64 freed = g_stat(ST_RESIDENT);
    g_puts("demo: after discarding it: "); g_putu(freed); g_puts(" frames; it reads zeros again: ");
    G_CHECK(area[PAGE] == 0 && area[5 * PAGE] == 0, "discarded memory is not zero");
    g_puts("yes\n");
    G_CHECK(hc(4242, 0, 0, 0) < 0, "unknown hypercall accepted");
    g_puts("demo: done, exiting with status 0\n");
    g_exit(0);
}
