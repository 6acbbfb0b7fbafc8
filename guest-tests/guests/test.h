/* Helpers for the test guests, on top of guest.h (guest ABI v1). */
#ifndef TEST_H
#define TEST_H
#include "guest.h"

/* Error values the VMM returns (negated), as on Linux x86-64. */
#define E_FAULT 14
#define E_BUSY 16
#define E_INVAL 22
#define E_NOSYS 38

/* Exit code a failed check ends the program with. */
#define T_FAILED 99

static inline void t_putx(u64 v) {
    char b[19];
    b[0] = '0';
    b[1] = 'x';
    for (int i = 0; i < 16; i++) b[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 0xf];
    b[18] = 0;
    g_puts(b);
}

static inline void t_outb(unsigned short port, u8 v) {
    asm volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

/* Ends the program with T_FAILED after printing what was checked, the value
   seen and the value wanted. */
static inline void t_fail(const char *what, u64 got, u64 want) {
    g_puts("FAIL: ");
    g_puts(what);
    g_puts(": got ");
    t_putx(got);
    g_puts(", want ");
    t_putx(want);
    g_puts("\n");
    g_exit(T_FAILED);
}

#define T_EQ(got, want, what) do { \
    u64 t_g_ = (u64)(got), t_w_ = (u64)(want); \
    if (t_g_ != t_w_) t_fail(what, t_g_, t_w_); \
} while (0)

#define T_TRUE(cond, what) do { if (!(cond)) t_fail(what " (" #cond ")", 0, 1); } while (0)

/* Guest RAM: [0, low_end) and, past 3 GiB of RAM, [4 GiB, 4 GiB + rest). */
#define LOW_RAM_MAX (3ul << 30)
#define HIGH_RAM_BASE (4ul << 30)
static inline u64 t_low_end(u64 ram) { return ram < LOW_RAM_MAX ? ram : LOW_RAM_MAX; }
static inline u64 t_ram_end(u64 ram) {
    return ram <= LOW_RAM_MAX ? ram : HIGH_RAM_BASE + (ram - LOW_RAM_MAX);
}

static inline u64 t_rd64(u64 addr) { return *(volatile u64 *)addr; }
static inline void t_wr64(u64 addr, u64 v) { *(volatile u64 *)addr = v; }

/* A busy loop of about `n` iterations the compiler keeps. */
static inline void t_spin(u64 n) {
    for (u64 i = 0; i < n; i++) asm volatile("pause");
}
#endif
