/* Scenario 1: basic COW after fork, both directions. */
#include "cow.h"
static u8 __attribute__((aligned(4096))) buf[4 * PAGE];

void gmain(u64 ram) {
    (void)ram;
    fill(buf, 1, sizeof buf);
    u64 copied = g_stat(ST_COPIED);
    i64 c = fork_vm();
    G_CHECK(c >= 0, "FORK failed");
    if (c == 0) {
        /* The parent writes page 0 right after the fork: never seen here. */
        for (int i = 0; i < 200000; i++) CHILD_CHECK(buf[0] == 1 && buf[PAGE - 1] == 1);
        fill(buf + PAGE, 7, PAGE);
        g_exit(0);
    }
    fill(buf, 2, PAGE);
    WAIT_OK(c);
    G_CHECK(all(buf, 2, PAGE), "parent lost its own write");
    G_CHECK(all(buf + PAGE, 1, 3 * PAGE), "parent saw the child's write");
    G_CHECK(g_stat(ST_COPIED) > copied, "no copy-on-write happened");
    g_puts("COW-BASIC-OK\n");
    g_exit(0);
}
