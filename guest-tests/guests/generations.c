/* Rewrites its pages for ever, one generation after another: word 0 of
   page i gets the generation, then the header records (generation, i).
   At any instant, the pages hold generation G up to some page and G - 1
   after it, and the header names the last page written (or the one
   before). A host that snapshots the VM checks the image for exactly
   that shape. Only every other page is used: the pages in between stay
   absent, so no two written pages can be protected together, by one host
   call. Prints where the header and the pages are, then runs until it is
   stopped. */
#include "test.h"

#define PAGES 2048
static u8 __attribute__((aligned(4096))) area[PAGES * 2 * 4096];
static volatile u64 header[2];

void gmain(u64 ram) {
    (void)ram;
    g_puts("GEN header=");
    g_putu((u64)header);
    g_puts(" area=");
    g_putu((u64)area);
    g_puts(" pages=");
    g_putu(PAGES);
    g_puts("\n");
    for (u64 gen = 1;; gen++) {
        for (u64 i = 0; i < PAGES; i++) {
            *(volatile u64 *)&area[i * 2 * 4096] = gen;
            header[0] = gen;
            header[1] = i;
        }
    }
}
