/* Scenario 10 (COLLAPSE, ABI 16): a 2 MiB block collapsed before a fork,
   after one (half shared: the parent copied every other page away first),
   and in the child: the parent's writes never reach the child, nor the
   child's the parent. COLLAPSE is refused while a page is pinned or
   write-protected, and for bad addresses. */
#include "cow.h"

#define BLOCK (2ul << 20)
#define PAGES (BLOCK / PAGE)
#define EBUSY 16
#define EINVAL 22
#define EFAULT 14

static u8 __attribute__((aligned(BLOCK))) blk[BLOCK];

static i64 collapse(void *p) { return hc(HC_COLLAPSE, (u64)p, 0, 0); }
/* STATS counter 16: huge mappings made by collapses. */
static u64 collapses(void) {
    u64 s[17] = {0};
    hc(HC_STATS, (u64)s, sizeof s, 0);
    return s[16];
}
static u8 tag(u64 i, u8 gen) { return (u8)(i * 7 + gen); }
/* One byte at each end of every page. */
static void mark(u64 from, u64 step, u8 gen) {
    for (u64 i = from; i < PAGES; i += step) {
        blk[i * PAGE] = tag(i, gen);
        blk[i * PAGE + PAGE - 1] = tag(i, gen);
    }
}
static int marked(u64 from, u64 step, u8 gen) {
    for (u64 i = from; i < PAGES; i += step)
        if (blk[i * PAGE] != tag(i, gen) || blk[i * PAGE + PAGE - 1] != tag(i, gen)) return 0;
    return 1;
}

static void refusals(void) {
    u64 s = collapses();
    G_CHECK(collapse(blk + PAGE) == -EINVAL, "an unaligned COLLAPSE was not refused");
    G_CHECK(collapse((void *)(1ul << 46)) == -EFAULT, "COLLAPSE outside RAM was not refused");
    discard(blk, BLOCK);
    mark(0, 1, 9);
    i64 h = pin(blk + 300 * PAGE, 8, PIN_LONGTERM);
    G_CHECK(h >= 0, "PIN failed");
    G_CHECK(collapse(blk) == -EBUSY, "COLLAPSE of a pinned page was not refused");
    unpin(h);
    G_CHECK(hc(HC_WP, (u64)(blk + 5 * PAGE), PAGE, 1) == 0, "WP failed");
    G_CHECK(collapse(blk) == -EBUSY, "COLLAPSE of a write-protected page was not refused");
    G_CHECK(hc(HC_WP, (u64)(blk + 5 * PAGE), PAGE, 0) == 0, "WP off failed");
    G_CHECK(collapses() == s, "a refused COLLAPSE counted");
    G_CHECK(collapse(blk) == 0, "COLLAPSE after unpin and WP off failed");
    G_CHECK(marked(0, 1, 9), "COLLAPSE lost data");
}

void gmain(u64 ram) {
    (void)ram;
    u64 s0 = collapses();
    mark(0, 1, 1);
    G_CHECK(collapse(blk) == 0, "COLLAPSE failed");
    G_CHECK(marked(0, 1, 1), "COLLAPSE lost data");
    G_CHECK(collapse(blk) == 0, "COLLAPSE of a huge block failed");

    /* Before the fork: the parent writes every page, the child sees none. */
    i64 c = fork_vm();
    G_CHECK(c >= 0, "FORK failed");
    if (c == 0) {
        for (int r = 0; r < 50; r++) CHILD_CHECK(marked(0, 1, 1));
        g_exit(0);
    }
    mark(0, 1, 2);
    WAIT_OK(c);
    G_CHECK(marked(0, 1, 2), "parent lost its writes");

    /* After a fork, half shared: the parent copies the even pages away,
       collapses, then writes the odd ones; the child collapses its own
       block and writes it. Neither sees the other. */
    c = fork_vm();
    G_CHECK(c >= 0, "FORK failed");
    if (c == 0) {
        for (int r = 0; r < 20; r++) CHILD_CHECK(marked(0, 1, 2));
        CHILD_CHECK(collapse(blk) == 0);
        CHILD_CHECK(marked(0, 1, 2));
        mark(0, 1, 5);
        for (int r = 0; r < 20; r++) CHILD_CHECK(marked(0, 1, 5));
        g_exit(0);
    }
    mark(0, 2, 3);
    G_CHECK(collapse(blk) == 0, "COLLAPSE of a half-shared block failed");
    G_CHECK(marked(0, 2, 3) && marked(1, 2, 2), "COLLAPSE lost data");
    mark(1, 2, 4);
    WAIT_OK(c);
    G_CHECK(marked(0, 2, 3) && marked(1, 2, 4), "parent saw the child's writes");
    /* The parent's and the child's collapses after the fork always copy
       (the first one finds the block huge already on --huge mappings). */
    G_CHECK(collapses() >= s0 + 2, "collapses not counted");

    refusals();
    g_puts("COW-COLLAPSE-OK\n");
    g_exit(0);
}
