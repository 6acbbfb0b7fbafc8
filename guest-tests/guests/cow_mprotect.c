/* Scenario 2: basic COW after fork, but the host makes the parent's page
   read-only and then writable again before the parent writes (like
   mprotect(PROT_READ) then mprotect(PROT_READ|PROT_WRITE)): a frame shared
   with the child must not become writable on the way. Mailbox at 0x200000:
   [0] = 1 from the guest when ready, [2] = 1 from the host when done. */
#include "cow.h"
#define MAILBOX ((volatile u64 *)0x200000)
#define BUF ((volatile u8 *)0x230000)

void gmain(u64 ram) {
    (void)ram;
    fill(BUF, 1, PAGE);
    i64 c = fork_vm();
    G_CHECK(c >= 0, "FORK failed");
    if (c == 0) {
        for (int i = 0; i < 3000; i++) { CHILD_CHECK(all(BUF, 1, PAGE)); spin(1000); }
        g_exit(0);
    }
    MAILBOX[0] = 1;
    while (MAILBOX[2] == 0) asm volatile("pause");
    fill(BUF, 2, PAGE);
    WAIT_OK(c);
    G_CHECK(all(BUF, 2, PAGE), "parent lost its write");
    g_puts("COW-MPROTECT-OK\n");
    g_exit(0);
}
