/* WP and WP_EVENTS (the built-in asynchronous listener): every protected
   page written shows up exactly once until it is protected again; reads
   report nothing; protection waits on untouched pages and survives
   DISCARD; a forked child does not inherit it; bad arguments are errors. */
#include "cow.h"
#include "test.h"

#define PAGES 8
static u8 __attribute__((aligned(4096))) area[PAGES * PAGE];
static u8 __attribute__((aligned(4096))) fresh[2 * PAGE];
static u64 ev[16];

static i64 wp(void *p, u64 len, u64 on) { return hc(HC_WP, (u64)p, len, on); }
static i64 events(u64 cap) { return hc(HC_WP_EVENTS, (u64)ev, cap, 0); }
static u64 page(int i) { return (u64)area + (u64)i * PAGE; }

void gmain(u64 ram) {
    u64 st0 = g_stat(ST_WP_EVENTS);
    for (int i = 0; i < PAGES; i++) area[i * PAGE] = (u8)i;

    /* Pages 1..4 protected; 1 written twice, 3 once, 2 only read. */
    T_EQ(wp(&area[PAGE], 4 * PAGE, 1), 0, "WP on four pages");
    T_EQ(events(sizeof ev), 0, "events before any write");
    area[PAGE + 5] = 1;
    area[PAGE + 6] = 2;
    T_EQ(area[2 * PAGE], 2, "a read of a protected page");
    area[3 * PAGE + 100] = 3;
    area[6 * PAGE] = 6; /* not protected */
    T_EQ(events(sizeof ev), 2, "events after writes to two protected pages");
    T_EQ(ev[0], page(1), "first event");
    T_EQ(ev[1], page(3), "second event");
    T_EQ(events(sizeof ev), 0, "events drained twice");
    T_EQ(area[PAGE + 5] + area[PAGE + 6] + area[3 * PAGE + 100], 6, "the writes landed");

    /* Protected again: the next write shows again; WP off drops it. */
    T_EQ(wp(&area[PAGE], PAGE, 1), 0, "WP page 1 again");
    T_EQ(wp(&area[4 * PAGE], PAGE, 0), 0, "WP off on page 4");
    area[PAGE] = 9;
    area[4 * PAGE] = 9;
    T_EQ(events(sizeof ev), 1, "events after re-protecting");
    T_EQ(ev[0], page(1), "the re-protected page");

    /* A small buffer takes what fits; the rest waits. */
    T_EQ(wp(area, PAGES * PAGE, 1), 0, "WP on the whole area");
    for (int i = 0; i < PAGES; i++) area[i * PAGE + 1] = 1;
    T_EQ(events(3 * 8 + 7), 3, "a buffer for three and a bit");
    T_EQ(ev[2], page(2), "third event");
    T_EQ(events(sizeof ev), PAGES - 3, "the rest");
    T_EQ(ev[0], page(3), "the rest starts where the first call stopped");

    /* Untouched memory: the protection waits for the first touch. */
    T_EQ(wp(fresh, 2 * PAGE, 1), 0, "WP on untouched pages");
    T_EQ(fresh[0], 0, "an untouched protected page reads zero");
    fresh[PAGE] = 1;
    fresh[0] = 1;
    T_EQ(events(sizeof ev), 2, "writes to pages protected before their first touch");
    T_EQ(ev[0], (u64)&fresh[PAGE], "first touch by a write");
    T_EQ(ev[1], (u64)fresh, "first touch by a read, then a write");

    /* DISCARD keeps the protection. */
    T_EQ(wp(area, PAGE, 1), 0, "WP page 0");
    T_EQ(discard(area, PAGE), 0, "DISCARD page 0");
    area[0] = 5;
    T_EQ(events(sizeof ev), 1, "a write after DISCARD of a protected page");

    /* A forked child does not inherit protection. */
    T_EQ(wp(area, 2 * PAGE, 1), 0, "WP before fork");
    i64 c = fork_vm();
    if (c == 0) {
        area[0] = 7;
        area[PAGE] = 7;
        CHILD_CHECK(events(sizeof ev) == 0);
        g_exit(0);
    }
    WAIT_OK(c);
    T_EQ(events(sizeof ev), 0, "the child's writes reached the parent's record");
    T_EQ(area[0], 5, "the child's write reached the parent");
    area[PAGE] = 8;
    T_EQ(events(sizeof ev), 1, "the parent kept its protection across fork");

    /* Hostile arguments. */
    T_EQ(wp(area, PAGE, 2), -E_INVAL, "on = 2");
    T_EQ(wp(&area[1], PAGE, 1), -E_INVAL, "an unaligned address");
    T_EQ(wp((void *)0x1000, PAGE, 1), -E_INVAL, "the VMM's first MiB");
    T_EQ(wp((void *)t_ram_end(ram), PAGE, 1), -E_FAULT, "past the end of RAM");
    T_EQ(wp((void *)(t_ram_end(ram) - PAGE), 2 * PAGE, 1), -E_FAULT, "across the end of RAM");
    T_EQ(wp(area, ~0ul, 1), -E_FAULT, "an absurd length");
    T_EQ(wp(area, 0, 1), 0, "an empty range");
    T_EQ(hc(HC_WP_EVENTS, t_ram_end(ram) - 8, 16, 0), -E_FAULT, "events into a buffer past RAM");
    T_EQ(events(7), 0, "a buffer too small for one event");

    u64 st = g_stat(ST_WP_EVENTS) - st0;
    T_EQ(st, 2 + 1 + PAGES + 2 + 1 + 1, "STATS write-protect events");
    g_puts("WP-OK\n");
    g_exit(0);
}
