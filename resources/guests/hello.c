/* The smallest useful program: one line, exit 0. */
#include "guest.h"

void gmain(u64 ram) {
    (void)ram;
    g_puts("hello\n");
    g_exit(0);
}
