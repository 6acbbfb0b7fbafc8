/* Stress: the root forks 7 clones; the 8 VMs then write, check, fork and
   wait on both cores at once. Every VM checks it reads exactly what it
   wrote, every snapshot child checks it sees its parent's state at the
   fork; at the end the root checks that the frame count is back to where
   it was before the first fork. */
#include "cow.h"
#define PAGES 32
#define ROUNDS 24
static volatile u64 __attribute__((aligned(4096))) area[PAGES * 512];

static int check(u64 v) {
    for (u64 p = 0; p < PAGES; p++) if (area[p * 512] != v + p) return 0;
    return 1;
}

static void put(u64 v) {
    for (u64 p = 0; p < PAGES; p++) area[p * 512] = v + p;
}

static u64 work(u64 k) {
    for (u64 r = 1; r <= ROUNDS; r++) {
        u64 v = (k << 32) | (r << 8);
        put(v);
        if (!check(v)) return 1000 + r;
        if (r % 6 == 0) {
            i64 c = fork_vm();
            if (c < 0) return 2000 + r;
            if (c == 0) {
                if (!check(v)) g_exit(3);
                put(~v);
                if (!check(~v)) g_exit(4);
                g_exit(0);
            }
            i64 st = wait_vm(c);
            if (st != 0) return 3000 + (u64)st;
            if (!check(v)) return 4000 + r;
        }
    }
    return 0;
}

void gmain(u64 ram) {
    (void)ram;
    put(0);
    u64 baseline = g_stat(ST_RESIDENT);
    i64 kids[7];
    u64 k = 0;
    for (u64 i = 1; i <= 7; i++) {
        i64 c = fork_vm();
        G_CHECK(c >= 0, "FORK failed");
        if (c == 0) { k = i; break; }
        kids[i - 1] = c;
    }
    u64 res = work(k);
    if (k != 0) g_exit(res);
    G_CHECK(res == 0, "the root lost a write");
    for (int i = 0; i < 7; i++) {
        i64 st = wait_vm(kids[i]);
        if (st != 0) { g_puts("FAIL: clone status "); g_putu((u64)st); g_puts("\n"); g_exit(1); }
    }
    u64 after = g_stat(ST_RESIDENT);
    g_puts("frames before "); g_putu(baseline); g_puts(", after "); g_putu(after); g_puts("\n");
    G_CHECK(after <= baseline + 16, "frames leaked");
    G_CHECK(g_stat(ST_SHARED) == 0, "frames still shared with VMs that are gone");
    g_puts("FORK-STRESS-OK\n");
    g_exit(0);
}
