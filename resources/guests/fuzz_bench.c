/* The fuzzing benchmark's target: each run writes one byte into each of
   the first N pages of its area (N: the input, a little-endian u32, at most
   the area's pages) and ends with DONE(0). */
#include "fuzz.h"

#define PAGES 1024
static volatile u8 __attribute__((aligned(4096))) area[PAGES * 4096];
static u8 input[8];

void gmain(u64 ram) {
    (void)ram;
    fz_init();
    /* Touch every page before the snapshot, so runs only overwrite. */
    for (u64 i = 0; i < PAGES; i++) area[i * 4096] = 1;
    for (;;) {
        u64 n = fz_snapshot(input, sizeof input);
        u64 pages = 0;
        for (u64 i = 0; i < 4 && i < n; i++) pages |= (u64)input[i] << (8 * i);
        if (pages > PAGES) pages = PAGES;
        for (u64 i = 0; i < pages; i++) area[i * 4096] = (u8)(i + 2);
        fz_done(0);
    }
}
