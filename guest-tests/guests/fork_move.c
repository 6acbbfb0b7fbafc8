/* Forks of a VM large enough to move (40 MiB written): at each fork the
   VMM moves the parent to a new KVM VM and host mapping (the first fork
   makes them, later forks find them made ahead by the fork before).
   Over several forks, with vCPU 1 counting and checking its own
   pages all along and a page pinned by the pin-test device:
   - each clone sees the memory of its fork's instant, and none of the
     parent's later writes;
   - the parent keeps its memory, its vCPU 1 runs on, its TSC never goes
     back, and the device's writes through its pin still reach it. */
#include "cow.h"

#define BASE (16ul << 20)
#define PAGES (10240ul) /* 40 MiB */
#define ROUNDS 4
#define STRIDE 8 /* pages the parent rewrites after each fork */

static u8 __attribute__((aligned(4096))) stack1[4 * PAGE];
static u8 __attribute__((aligned(4096))) pinned[PAGE];
static u8 __attribute__((aligned(4096))) scratch[PAGE];
static volatile u64 counter, worker_bad;
static volatile u64 own[512] __attribute__((aligned(4096)));

static inline u64 rdtsc(void) {
    u32 lo, hi;
    asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline volatile u64 *page(u64 i) { return (volatile u64 *)(BASE + i * PAGE); }
static inline u64 value(u64 i, u64 gen) { return (i << 8) | gen; }

void worker(u64 index) {
    (void)index;
    for (u64 n = 1;; n++) {
        own[n % 512] = n;
        if (own[n % 512] != n) worker_bad = n;
        counter = n;
        asm volatile("pause");
    }
}

/* Generation each page holds: `gen` for the pages the parent rewrote in
   round `gen`, else that of the last round that rewrote it. */
static u64 gen_of(u64 i, u64 rounds_done) {
    return (i % STRIDE == 0) ? rounds_done : 0;
}

void gmain(u64 ram) {
    (void)ram;
    for (u64 i = 0; i < PAGES; i++) *page(i) = value(i, 0);
    G_CHECK(hc(HC_VCPU_START, 1, (u64)worker, (u64)stack1 + sizeof stack1 - 8) == 0, "VCPU_START failed");
    fill(pinned, 0x11, PAGE);
    i64 h = pin(pinned, PAGE, PIN_WRITE_FLAG | PIN_LONGTERM);
    G_CHECK(h >= 0, "PIN failed");
    for (u64 round = 0; round < ROUNDS; round++) {
        u64 before = rdtsc();
        u8 pin_byte = (u8)(0x20 + round);
        i64 c = fork_vm();
        G_CHECK(c >= 0, "FORK failed");
        if (c == 0) {
            for (u64 i = 0; i < PAGES; i++) CHILD_CHECK(*page(i) == value(i, gen_of(i, round)));
            CHILD_CHECK(all(pinned, round ? (u8)(0x20 + round - 1) : 0x11, PAGE));
            u64 seen = counter;
            spin(2000000);
            CHILD_CHECK(counter > seen); /* the clone's vCPU 1 runs */
            for (u64 i = 0; i < PAGES; i += 64) *page(i) = 0xdead;
            g_exit(0);
        }
        G_CHECK(rdtsc() >= before, "the TSC went back over a fork");
        for (u64 i = 0; i < PAGES; i += STRIDE) *page(i) = value(i, round + 1);
        /* The device writes the pinned page; the guest sees it. */
        fill(scratch, pin_byte, PAGE);
        G_CHECK(pin_write(h, scratch) == PAGE, "PIN_WRITE failed");
        G_CHECK(all(pinned, pin_byte, PAGE), "the device's write did not reach the parent");
        u64 seen = counter;
        WAIT_OK(c);
        for (u64 t = 0; t < 2000000000ul && counter < seen + 1000; t++) asm volatile("pause");
        G_CHECK(counter >= seen + 1000, "the parent's vCPU 1 stopped after a fork");
        for (u64 i = 0; i < PAGES; i++)
            G_CHECK(*page(i) == value(i, gen_of(i, round + 1)), "the parent lost its memory");
        /* Time for the VMM to make the next place to move to. */
        spin(20000000);
    }
    G_CHECK(worker_bad == 0, "vCPU 1 read back a wrong value");
    G_CHECK(unpin(h) == 0, "UNPIN failed");
    g_puts("FORK-MOVE-OK\n");
    g_exit(0);
}
