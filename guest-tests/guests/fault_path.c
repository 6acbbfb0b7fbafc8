/* The host keeps write-protecting the page at 0x220000 while this program
   writes to it with different instruction shapes; every store must land
   exactly once. The mailbox at 0x200000: [0] = 1 once started (set by the
   guest), [2] = 1 when the host is done protecting, [1] = 1 when the guest
   finished. Exits 0 when every count is exact. */
#include "guest.h"
#define MAILBOX ((volatile u64 *)0x200000)
#define TARGET ((volatile u64 *)0x220000)

void gmain(u64 ram) {
    (void)ram;
    for (int i = 0; i < 8; i++) TARGET[i] = 0;
    MAILBOX[0] = 1;
    u64 rounds = 0;
    for (u64 r = 1; MAILBOX[2] == 0 || r < 1000; r++) {
        rounds = r;
        TARGET[0] = TARGET[0] + 1;                                   /* load, add, store */
        asm volatile("lock incq %0" : "+m"(TARGET[1]));                /* atomic RMW */
        asm volatile("addq $2, %0" : "+m"(TARGET[2]));                 /* RMW */
        u64 v = r;
        asm volatile("movq %0, %%xmm0; movdqu %%xmm0, %1" :: "r"(v), "m"(TARGET[4]) : "xmm0", "memory"); /* SSE store */
        u64 *dst = (u64 *)&TARGET[6];
        u64 cnt = 1, val = r;
        asm volatile("rep stosq" : "+D"(dst), "+c"(cnt) : "a"(val) : "memory"); /* string store */
        for (volatile int k = 0; k < 50; k++) {}
    }
    MAILBOX[1] = 1;
    if (TARGET[0] != rounds) { g_puts("FAIL: plain store count\n"); g_exit(1); }
    if (TARGET[1] != rounds) { g_puts("FAIL: lock inc count\n"); g_exit(2); }
    if (TARGET[2] != 2 * rounds) { g_puts("FAIL: add count\n"); g_exit(3); }
    if (TARGET[4] != rounds) { g_puts("FAIL: SSE store\n"); g_exit(4); }
    if (TARGET[6] != rounds) { g_puts("FAIL: rep stos\n"); g_exit(5); }
    g_puts("FAULT-PATH-OK\n");
    g_exit(0);
}
