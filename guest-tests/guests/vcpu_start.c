/* VCPU_START (run with two vCPUs): refuses bad indexes, starts vCPU 1 with
   RDI = 1 at the given rip and rsp, refuses to start it again; the two vCPUs
   see each other's writes. */
#include "test.h"

static volatile u64 ap_index = ~0ul, ap_ready, bsp_msg, ap_ack;
static u8 __attribute__((aligned(16))) ap_stack[16384];

void ap_main(u64 index) {
    ap_index = index;
    __atomic_store_n(&ap_ready, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&bsp_msg, __ATOMIC_SEQ_CST) == 0) asm volatile("pause");
    __atomic_store_n(&ap_ack, bsp_msg + 1, __ATOMIC_SEQ_CST);
    for (;;) asm volatile("pause");
}
void ap_entry(void);
asm(".text\n.globl ap_entry\nap_entry:\n  call ap_main\n  ud2\n");

static u64 rdtsc(void) {
    u32 lo, hi;
    asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* Waits (a few seconds at most) until *p == want. */
static void await(volatile u64 *p, u64 want, const char *what) {
    u64 start = rdtsc();
    while (__atomic_load_n(p, __ATOMIC_SEQ_CST) != want) {
        if (rdtsc() - start > 20000000000ul) t_fail(what, *p, want);
        asm volatile("pause");
    }
}

void gmain(u64 ram) {
    u64 rip = (u64)&ap_entry, rsp = (u64)ap_stack + sizeof ap_stack;
    T_EQ(hc(HC_VCPU_START, 0, rip, rsp), -E_INVAL, "VCPU_START 0 (the running vCPU)");
    T_EQ(hc(HC_VCPU_START, 2, rip, rsp), -E_INVAL, "VCPU_START 2 of 2");
    T_EQ(hc(HC_VCPU_START, (1ul << 32) | 1, rip, rsp), -E_INVAL, "VCPU_START 2^32+1");
    T_EQ(hc(HC_VCPU_START, ~0ul, rip, rsp), -E_INVAL, "VCPU_START 2^64-1");
    t_spin(100000);
    T_EQ(ap_ready, 0, "vCPU 1 ran before VCPU_START");

    T_EQ(hc(HC_VCPU_START, 1, rip, rsp), 0, "VCPU_START 1");
    T_EQ(hc(HC_VCPU_START, 1, rip, rsp), -E_BUSY, "VCPU_START 1 again");
    await(&ap_ready, 1, "vCPU 1 signalled it runs");
    T_EQ(ap_index, 1, "RDI of vCPU 1");
    __atomic_store_n(&bsp_msg, 0x1234, __ATOMIC_SEQ_CST);
    await(&ap_ack, 0x1235, "vCPU 1 answered vCPU 0's write");
    T_EQ(hc(HC_VCPU_START, 1, rip, rsp), -E_BUSY, "VCPU_START 1 while it runs");
    g_puts("vcpu_start: vCPU 1 ran with rdi ");
    t_putx(ap_index);
    g_puts(" and answered\n");
    g_exit(0);
}
