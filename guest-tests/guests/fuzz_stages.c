/* A fuzzing target in two stages, for child snapshots: SNAPSHOT, then the
   first input picks a mode (its first byte, kept in memory and in rbx's
   stead a global), then SNAPSHOT again; the second input is checked
   against the mode: DONE(0x100 + mode) if the second input starts with
   the mode byte, DONE(1) otherwise. A global written in stage one must
   still hold the mode in every run from the second SNAPSHOT. */
#include "fuzz.h"

static u8 first[16], second[16];
static volatile u64 mode;
static volatile u64 stage_one_runs;

void gmain(u64 ram) {
    (void)ram;
    fz_init();
    u64 n = fz_snapshot(first, sizeof first);
    mode = n ? first[0] : 0;
    stage_one_runs++;
    u64 m = fz_snapshot(second, sizeof second);
    EDGE(mode);
    if (stage_one_runs != 1) fz_done(2);
    if (m > 0 && second[0] == (u8)mode) fz_done(0x100 + mode);
    fz_done(1);
}
