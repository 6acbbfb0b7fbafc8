/* A fuzzing target that can destroy its own exception handling: the input
   "T" zeroes the IDT (the VMM's, in the first MiB, which program mode maps
   writable) and then takes #UD, which the CPU can no longer deliver: a
   triple fault. Any other input ends with DONE(0). */
#include "fuzz.h"

static u8 input[16];

void gmain(u64 ram) {
    (void)ram;
    fz_init();
    u64 n = fz_snapshot(input, sizeof input);
    EDGE(1);
    if (n > 0 && input[0] == 'T') {
        volatile u64 *idt = (volatile u64 *)0x2000;
        for (int i = 0; i < 64; i++) idt[i] = 0;
        asm volatile("ud2");
    }
    fz_done(0);
}
