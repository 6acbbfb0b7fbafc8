/* A fuzzing target with a planted bug: the input must start with the
   bytes "FUZZ!" (compared one by one, each match a new edge) for the
   target to report failure with DONE(7); "FUZZ?" takes a ud2 (a crash,
   vector 6); "HANG" never ends (one comparison, no edge to follow).
   Everything else ends with DONE(0). */
#include "fuzz.h"

static u8 input[256];
static const char magic[] = "FUZZ";

void gmain(u64 ram) {
    (void)ram;
    fz_init();
    g_puts("planted: ready\n");
    for (;;) {
        u64 n = fz_snapshot(input, sizeof input);
        EDGE(1);
        if (n >= 4 && input[0] == 'H' && input[1] == 'A' && input[2] == 'N' && input[3] == 'G')
            for (;;) asm volatile("" ::: "memory");
        u64 i = 0;
        while (i < 4 && i < n && input[i] == (u8)magic[i]) {
            EDGE(10 + i);
            i++;
        }
        if (i == 4 && n > 4) {
            EDGE(20);
            if (input[4] == '!') {
                EDGE(21);
                fz_done(7);
            }
            if (input[4] == '?') {
                EDGE(22);
                asm volatile("ud2");
            }
        }
        fz_done(0);
    }
}
