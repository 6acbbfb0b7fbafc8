/* Fork with two running vCPUs: vCPU 1 counts in memory; vCPU 0 forks; in
   the clone both vCPUs go on from the fork (vCPU 1 keeps counting), and the
   two VMs' counters are independent. */
#include "cow.h"
static u8 __attribute__((aligned(4096))) stack1[4 * PAGE];
static volatile u64 counter, stop_counting;

void worker(u64 index) {
    (void)index;
    while (!stop_counting) { counter++; asm volatile("pause"); }
    for (;;) asm volatile("pause");
}

void gmain(u64 ram) {
    (void)ram;
    G_CHECK(hc(HC_VCPU_START, 1, (u64)worker, (u64)stack1 + sizeof stack1 - 8) == 0, "VCPU_START failed");
    while (counter < 1000) asm volatile("pause");
    i64 c = fork_vm();
    G_CHECK(c >= 0, "FORK failed");
    u64 at_fork = counter;
    /* Wait for vCPU 1 to move on (generously: four busy vCPU threads
       share two cores now). */
    for (u64 t = 0; t < 2000000000ul && counter < at_fork + 1000; t++) asm volatile("pause");
    u64 later = counter;
    if (c == 0) {
        CHILD_CHECK(later >= at_fork + 1000); /* the clone's vCPU 1 runs */
        stop_counting = 1;
        g_exit(0);
    }
    G_CHECK(later >= at_fork + 1000, "the parent's vCPU 1 stopped after the fork");
    WAIT_OK(c);
    G_CHECK(stop_counting == 0, "the clone's write reached the parent");
    for (u64 t = 0; t < 2000000000ul && counter < later + 1000; t++) asm volatile("pause");
    G_CHECK(counter >= later + 1000, "the parent's vCPU 1 stopped");
    g_puts("FORK-VCPUS-OK\n");
    g_exit(0);
}
