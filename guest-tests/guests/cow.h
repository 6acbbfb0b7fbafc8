/* Helpers for the fork-and-pins scenario guests (cow_*.c). */
#ifndef COW_H
#define COW_H
#include "guest.h"

#define PIN_WRITE_FLAG 1ul
#define PIN_LONGTERM 2ul

static inline void fill(volatile u8 *p, u8 v, u64 n) { for (u64 i = 0; i < n; i++) p[i] = v; }
static inline int all(const volatile u8 *p, u8 v, u64 n) {
    for (u64 i = 0; i < n; i++) if (p[i] != v) return 0;
    return 1;
}
/* Busy-waits long enough for another VM to get some work done. */
static inline void spin(u64 n) { for (volatile u64 i = 0; i < n; i++) asm volatile("pause"); }
static inline i64 fork_vm(void) { return hc(HC_FORK, 0, 0, 0); }
static inline i64 wait_vm(i64 child) { return hc(HC_WAIT, (u64)child, 0, 0); }
static inline i64 pin(void *p, u64 len, u64 flags) { return hc(HC_PIN, (u64)p, len, flags); }
static inline i64 pin_read(i64 h, void *dst) { return hc(HC_PIN_READ, (u64)h, (u64)dst, 0); }
static inline i64 pin_write(i64 h, void *src) { return hc(HC_PIN_WRITE, (u64)h, (u64)src, 0); }
static inline i64 unpin(i64 h) { return hc(HC_UNPIN, (u64)h, 0, 0); }
static inline i64 discard(void *p, u64 len) { return hc(HC_DISCARD, (u64)p, len, 0); }

/* A child that fails exits with its line number, so the parent can say
   which check failed. */
#define CHILD_CHECK(cond) do { if (!(cond)) g_exit(__LINE__); } while (0)
#define WAIT_OK(c) do { i64 st_ = wait_vm(c); if (st_ != 0) { g_puts("FAIL: child failed at line "); g_putu((u64)st_); g_puts("\n"); g_exit(1); } } while (0)
#endif
