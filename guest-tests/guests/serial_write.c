/* Interleaves serial output (port 0x3f8) and WRITE hypercalls; the console
   must show them in program order. */
#include "test.h"

static void serial(const char *s) {
    while (*s) t_outb(0x3f8, (u8)*s++);
}

void gmain(u64 ram) {
    static const char w2[] = "2 write\n";
    static const char w4[] = "4 write, ";
    serial("1 serial\n");
    T_EQ(hc(HC_WRITE, (u64)w2, sizeof w2 - 1, 0), sizeof w2 - 1, "WRITE result");
    serial("3 serial\n");
    T_EQ(hc(HC_WRITE, (u64)w4, sizeof w4 - 1, 0), sizeof w4 - 1, "WRITE result");
    T_EQ(hc(HC_WRITE, (u64)w4, 0, 0), 0, "WRITE of 0 bytes");
    serial("then serial on the same line\n");
    g_exit(0);
}
