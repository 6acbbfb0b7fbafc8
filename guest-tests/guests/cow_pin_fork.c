/* Scenario 6: a read-write pin, then fork with the child alive: the
   parent's writes reach the device, the device's writes reach the parent
   only, and the pinned frame is never shared with the child. */
#include "cow.h"
static u8 __attribute__((aligned(4096))) buf[2 * PAGE], out[2 * PAGE], src[2 * PAGE];

void gmain(u64 ram) {
    (void)ram;
    fill(buf, 1, sizeof buf);
    G_CHECK(g_stat(ST_PINS) == 0, "pins counted before any PIN");
    i64 h = pin(buf, sizeof buf, PIN_WRITE_FLAG | PIN_LONGTERM);
    G_CHECK(h >= 0, "PIN failed");
    G_CHECK(g_stat(ST_PINS) == 2, "STATS does not count the two pinned pages");
    u64 shared_before = g_stat(ST_SHARED);
    i64 c = fork_vm();
    G_CHECK(c >= 0, "FORK failed");
    if (c == 0) {
        CHILD_CHECK(all(buf, 1, sizeof buf));
        spin(2000000); /* the parent and the device write meanwhile */
        CHILD_CHECK(all(buf, 1, sizeof buf));
        fill(buf, 5, sizeof buf);
        g_exit(0);
    }
    fill(buf, 3, PAGE);
    G_CHECK(pin_read(h, out) == sizeof buf, "PIN_READ failed");
    G_CHECK(all(out, 3, PAGE) && all(out + PAGE, 1, PAGE), "device does not see the parent's write");
    fill(src, 8, sizeof src);
    G_CHECK(pin_write(h, src) == sizeof buf, "PIN_WRITE failed");
    G_CHECK(all(buf, 8, sizeof buf), "parent does not see the device's write");
    WAIT_OK(c);
    G_CHECK(pin_read(h, out) == sizeof buf && all(out, 8, sizeof out), "the child's write reached the pinned frames");
    G_CHECK(g_stat(ST_SHARED) >= shared_before, "counter went backwards");
    G_CHECK(unpin(h) == 0, "UNPIN failed");
    G_CHECK(g_stat(ST_PINS) == 0, "pins still counted after UNPIN");
    g_puts("COW-PIN-FORK-OK\n");
    g_exit(0);
}
