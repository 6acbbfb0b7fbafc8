/* Counts at 0x200000 forever; used by host-driven fork tests. */
#include "guest.h"

void gmain(u64 ram) {
    (void)ram;
    volatile u64 *counter = (volatile u64 *)0x200000;
    for (;;) { (*counter)++; asm volatile("pause"); }
}
