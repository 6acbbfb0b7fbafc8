/* A fuzzing target whose runs write a different number of pages each time,
   up to more than KVM's dirty ring holds: the input is a little-endian u32
   N and a seed byte; the run writes the seed into the first N pages of its
   32 MiB area, after checking that every page reads as it did at SNAPSHOT
   (what all earlier runs wrote was put back). DONE(0), or DONE(1) if a page
   was not restored. */
#include "fuzz.h"

#define PAGES 8192
static volatile u8 __attribute__((aligned(4096))) area[PAGES * 4096];
static u8 input[8];

void gmain(u64 ram) {
    (void)ram;
    fz_init();
    for (u64 i = 0; i < PAGES; i++) area[i * 4096] = (u8)(i * 7 + 1);
    for (;;) {
        u64 n = fz_snapshot(input, sizeof input);
        u64 status = 0;
        for (u64 i = 0; i < PAGES; i++)
            if (area[i * 4096] != (u8)(i * 7 + 1)) status = 1;
        u64 pages = 0;
        for (u64 i = 0; i < 4 && i < n; i++) pages |= (u64)input[i] << (8 * i);
        if (pages > PAGES) pages = PAGES;
        u8 seed = n > 4 ? input[4] : 0xee;
        for (u64 i = 0; i < pages; i++) area[i * 4096] = seed;
        fz_done(status);
    }
}
