/* DISCARD: discarded pages read zeros and their frames are freed (STATS [0]
   goes down); neighbours keep their data; the pages work again afterwards. */
#include "test.h"

#define AREA (2ul << 20)
#define PAGES (AREA / PAGE)
static u8 __attribute__((aligned(2 << 20))) area[AREA];

static u8 mark(u64 i) { return (u8)(1 + (i % 251)); }

void gmain(u64 ram) {
    u64 s0 = g_stat(ST_RESIDENT);
    for (u64 i = 0; i < PAGES; i++) {
        area[i * PAGE] = mark(i);
        area[i * PAGE + PAGE - 1] = mark(i);
    }
    u64 s1 = g_stat(ST_RESIDENT);
    T_TRUE(s1 >= s0 + PAGES, "writing 512 pages made frames resident");

    T_EQ(hc(HC_DISCARD, (u64)area, AREA, 0), 0, "DISCARD of the whole area");
    u64 s2 = g_stat(ST_RESIDENT);
    if (s2 + PAGES > s1) t_fail("resident frames after DISCARD (before it: see want + 512)", s2, s1 - PAGES);
    for (u64 i = 0; i < PAGES; i++) {
        T_EQ(area[i * PAGE], 0, "first byte of a discarded page");
        T_EQ(area[i * PAGE + PAGE - 1], 0, "last byte of a discarded page");
    }

    /* Written again, then one page in the middle discarded. */
    for (u64 i = 0; i < PAGES; i++) area[i * PAGE + 8] = mark(i);
    T_EQ(hc(HC_DISCARD, (u64)area + 100 * PAGE, PAGE, 0), 0, "DISCARD of one page");
    for (u64 i = 0; i < PAGES; i++) T_EQ(area[i * PAGE + 8], i == 100 ? 0 : mark(i), "after discarding page 100");

    g_puts("discard: resident ");
    g_putu(s0);
    g_puts(" -> ");
    g_putu(s1);
    g_puts(" -> ");
    g_putu(s2);
    g_puts("\n");
    g_exit(0);
}
