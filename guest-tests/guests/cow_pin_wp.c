/* Scenario 5 and seed 003's io_uring story: a long-term read-write pin,
   then the host maps the page read-only "for some reason"; the guest's next
   write must land in the pinned frame (reused, not copied), so the device
   sees it. Mailbox as in cow_mprotect.c. */
#include "cow.h"
#define MAILBOX ((volatile u64 *)0x200000)
#define BUF ((volatile u8 *)0x230000)
static u8 __attribute__((aligned(4096))) out[PAGE];

void gmain(u64 ram) {
    (void)ram;
    fill(BUF, 0, PAGE);
    i64 h = pin((void *)BUF, PAGE, PIN_WRITE_FLAG | PIN_LONGTERM);
    G_CHECK(h >= 0, "PIN failed");
    u64 copied = g_stat(ST_COPIED);
    MAILBOX[0] = 1;
    while (MAILBOX[2] == 0) asm volatile("pause");
    fill(BUF, 0xff, PAGE);
    G_CHECK(pin_read(h, out) == PAGE, "PIN_READ failed");
    G_CHECK(all(out, 0xff, PAGE), "the device read stale data: the pinned frame was replaced");
    G_CHECK(g_stat(ST_COPIED) == copied, "the pinned frame was copied");
    G_CHECK(unpin(h) == 0, "UNPIN failed");
    g_puts("COW-PIN-WP-OK\n");
    g_exit(0);
}
