/* An emulated store into RAM: `rep insb` reads serial port registers into
   the page at 0x220000, which the host keeps write-protecting. KVM's
   emulator performs these stores, so they reach the VMM as MMIO exits that
   it must complete itself, exactly once. The scratch-register port 0x3ff
   echoes what was written to it. Runs until the host sets mailbox[2]. */
#include "guest.h"
#define MAILBOX ((volatile u64 *)0x200000)
#define TARGET ((volatile u8 *)0x220000)
#define ROUNDS 2000

void gmain(u64 ram) {
    (void)ram;
    MAILBOX[0] = 1;
    u64 sum = 0;
    for (u64 r = 0; MAILBOX[2] == 0 || r < ROUNDS; r++) {
        u8 want = (u8)(r * 7 + 1);
        asm volatile("outb %0, %1" :: "a"(want), "Nd"((unsigned short)0x3ff));
        u8 *dst = (u8 *)&TARGET[r % 64];
        u64 cnt = 1;
        asm volatile("rep insb" : "+D"(dst), "+c"(cnt) : "d"((unsigned short)0x3ff) : "memory");
        if (TARGET[r % 64] != want) { g_puts("FAIL: insb did not land\n"); g_exit(1); }
        sum += TARGET[r % 64];
    }
    MAILBOX[1] = 1;
    (void)sum;
    g_puts("FAULT-PATH-PIO-OK\n");
    g_exit(0);
}
