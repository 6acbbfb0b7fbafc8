/* Freestanding helpers for program-mode guests (guest ABI v1, see README). */
#ifndef GUEST_H
#define GUEST_H
typedef unsigned long u64;
typedef long i64;
typedef unsigned int u32;
typedef unsigned char u8;

enum {
    HC_EXIT = 0, HC_WRITE = 1, HC_FORK = 2, HC_WAIT = 3, HC_PIN = 4, HC_PIN_READ = 5,
    HC_PIN_WRITE = 6, HC_UNPIN = 7, HC_DISCARD = 8, HC_VCPU_START = 9, HC_SNAPSHOT = 10,
    HC_DONE = 11, HC_SWAP_OUT = 12, HC_MIGRATE = 13, HC_WP = 14, HC_WP_EVENTS = 15,
    HC_COLLAPSE = 16, HC_STATS = 17, HC_COVERAGE_MAP = 18,
};
enum {
    ST_RESIDENT, ST_SHARED, ST_COPIED, ST_PINS, ST_SWAPPED, ST_SWAP_INS, ST_MIGRATED,
    ST_WP_EVENTS,
};
#define PAGE 4096ul

static inline i64 hc(u64 nr, u64 a, u64 b, u64 c) {
    register u64 r10 asm("r10") = c;
    u64 ret;
    asm volatile("out %%eax, %%dx"
                 : "=a"(ret)
                 : "a"(nr), "D"(a), "S"(b), "r"(r10), "d"((unsigned short)0x510)
                 : "memory");
    return (i64)ret;
}
static inline u64 g_strlen(const char *s) { u64 n = 0; while (s[n]) n++; return n; }
static inline void g_puts(const char *s) { hc(HC_WRITE, (u64)s, g_strlen(s), 0); }
static inline void g_exit(u64 code) { hc(HC_EXIT, code, 0, 0); for (;;) {} }
static inline void g_putu(u64 v) {
    char b[24]; int i = 23; b[i] = 0;
    do { b[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    g_puts(&b[i]);
}
static inline u64 g_stat(int which) {
    u64 s[8] = {0};
    hc(HC_STATS, (u64)s, sizeof s, 0);
    return s[which];
}
/* Entry: the VMM starts the program with RSP 16-byte aligned and RDI = RAM
   size; calling gmain gives it the stack alignment the C ABI expects. */
void gmain(u64 ram);
void __attribute__((naked, noreturn)) _start(void) {
    asm volatile("call gmain\n\tud2");
}

#define G_CHECK(cond, msg) do { if (!(cond)) { g_puts("FAIL: " msg "\n"); g_exit(1); } } while (0)
#endif
