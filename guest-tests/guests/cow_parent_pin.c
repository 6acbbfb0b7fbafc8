/* Scenario 4: the parent takes a read-only device reference (before, then
   after, the fork) and drops its own mapping; the child writes: the
   parent's reference reads the original. */
#include "cow.h"
static u8 __attribute__((aligned(4096))) a[PAGE], b[PAGE], out[PAGE];

static void run(u8 *buf, int pin_before_fork) {
    fill(buf, 1, PAGE);
    i64 h = -1;
    if (pin_before_fork) { h = pin(buf, PAGE, PIN_LONGTERM); G_CHECK(h >= 0, "PIN failed"); }
    i64 c = fork_vm();
    G_CHECK(c >= 0, "FORK failed");
    if (c == 0) {
        spin(1000000);
        fill(buf, 9, PAGE);
        CHILD_CHECK(all(buf, 9, PAGE));
        g_exit(0);
    }
    if (!pin_before_fork) { h = pin(buf, PAGE, PIN_LONGTERM); G_CHECK(h >= 0, "PIN failed"); }
    G_CHECK(discard(buf, PAGE) == 0, "DISCARD failed");
    WAIT_OK(c);
    G_CHECK(pin_read(h, out) == PAGE, "PIN_READ failed");
    G_CHECK(all(out, 1, PAGE), "the parent's pin saw the child's write");
    G_CHECK(all(buf, 0, PAGE), "discarded page does not read zeros");
    G_CHECK(unpin(h) == 0, "UNPIN failed");
}

void gmain(u64 ram) {
    (void)ram;
    run(a, 1);
    run(b, 0);
    g_puts("COW-PARENT-PIN-OK\n");
    g_exit(0);
}
