/* snap_counter, whose spin also ends by itself after a second or so, for
   snapshots through the command line (which cannot set the flag). */
#define SPIN_LIMIT (1ul << 25)
#include "snap_counter.c"
