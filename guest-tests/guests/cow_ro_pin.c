/* Scenarios 7, 8, 9: a read-only long-term pin stays coherent with the
   guest's later writes:
   7: on a frame shared with a live child (the pin must unshare: a copy);
   8: on a frame whose sharer is gone (unshare reuses it: no copy);
   9: on an exclusive frame (no copy). */
#include "cow.h"
static u8 __attribute__((aligned(4096))) s7[PAGE], s8[PAGE], s9[PAGE], out[PAGE];

static void check_pin_sees_writes(u8 *buf, u64 want_copies, const char *what) {
    u64 before = g_stat(ST_COPIED), swap_ins = g_stat(ST_SWAP_INS);
    i64 h = pin(buf, PAGE, PIN_LONGTERM);
    G_CHECK(h >= 0, "PIN failed");
    u64 copies = g_stat(ST_COPIED) - before;
    /* Under a memory limit the page may have been in swap: bringing it
       back gives this VM a fresh frame, which is not a copy. */
    int swapped = g_stat(ST_SWAP_INS) != swap_ins;
    fill(buf, 4, PAGE);
    G_CHECK(pin_read(h, out) == PAGE, "PIN_READ failed");
    if (!all(out, 4, PAGE)) { g_puts("FAIL: pin does not see the guest's write: "); g_puts(what); g_puts("\n"); g_exit(1); }
    /* The count is the whole VM tree's: a live child's own first write
       (its stack) may land between the two reads, so a copy that is
       wanted must happen, and none may where none is wanted. */
    if (!swapped && (want_copies == 0 ? copies != 0 : copies < want_copies)) {
        g_puts("FAIL: wrong number of copies taking the pin: "); g_puts(what); g_puts(", copies ");
        g_putu(copies); g_puts("\n"); g_exit(1);
    }
    G_CHECK(unpin(h) == 0, "UNPIN failed");
}

void gmain(u64 ram) {
    (void)ram;
    fill(s7, 1, PAGE);
    fill(s8, 1, PAGE);
    fill(s9, 1, PAGE);
    /* 8: share s8 with a child that is gone before the pin. */
    i64 c = fork_vm();
    G_CHECK(c >= 0, "FORK failed");
    if (c == 0) g_exit(0);
    WAIT_OK(c);
    check_pin_sees_writes(s8, 0, "scenario 8 (sharer gone)");
    /* 7: a child that stays alive while the pin is taken and used. */
    c = fork_vm();
    G_CHECK(c >= 0, "FORK failed");
    if (c == 0) {
        spin(3000000);
        CHILD_CHECK(all(s7, 1, PAGE));
        g_exit(0);
    }
    check_pin_sees_writes(s7, 1, "scenario 7 (shared with a live child)");
    WAIT_OK(c);
    /* 9: writing s9 (its sharers are gone) makes it exclusive again. */
    fill(s9, 2, PAGE);
    check_pin_sees_writes(s9, 0, "scenario 9 (exclusive)");
    g_puts("COW-RO-PIN-OK\n");
    g_exit(0);
}
