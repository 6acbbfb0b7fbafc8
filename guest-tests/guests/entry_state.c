/* Reports the CPU state at entry (RDI, RSP, CS, SS, RFLAGS) for the host to
   check, and checks that SSE works in ring 3. */

/* This program has its own entry point: rename guest.h's. */
#define _start guest_h_start_unused
#include "test.h"
#undef _start

u64 entry_rdi, entry_rsp, entry_rflags, entry_cs, entry_ss;

asm(".text\n"
    ".globl _start\n"
    "_start:\n"
    "  mov %rdi, entry_rdi(%rip)\n"
    "  mov %rsp, entry_rsp(%rip)\n"
    "  pushfq\n"
    "  popq entry_rflags(%rip)\n"
    "  mov %cs, %eax\n"
    "  mov %rax, entry_cs(%rip)\n"
    "  mov %ss, %eax\n"
    "  mov %rax, entry_ss(%rip)\n"
    "  call gmain\n"
    "  ud2\n");

static void sse(void) {
    static const u32 a[4] = {1, 2, 3, 0x7fffffff};
    static const u32 b[4] = {10, 20, 30, 1};
    u32 sum[4];
    asm volatile("movdqu %1, %%xmm1\n"
                 "movdqu %2, %%xmm2\n"
                 "paddd %%xmm2, %%xmm1\n"
                 "movdqu %%xmm1, %0"
                 : "=m"(sum) : "m"(a), "m"(b) : "xmm1", "xmm2");
    T_EQ(sum[0], 11, "paddd lane 0");
    T_EQ(sum[1], 22, "paddd lane 1");
    T_EQ(sum[2], 33, "paddd lane 2");
    T_EQ(sum[3], 0x80000000u, "paddd lane 3");

    double x = 2.25, root;
    asm volatile("sqrtsd %1, %0" : "=x"(root) : "x"(x));
    u64 bits;
    __builtin_memcpy(&bits, &root, 8);
    T_EQ(bits, 0x3ff8000000000000ul, "sqrtsd(2.25) == 1.5");

    u32 mxcsr = 0;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    T_EQ(mxcsr & 0x1f80, 0x1f80, "MXCSR exception masks");
}

void gmain(u64 ram) {
    g_puts("entry: rdi=");
    t_putx(entry_rdi);
    g_puts(" rsp=");
    t_putx(entry_rsp);
    g_puts(" cs=");
    t_putx(entry_cs);
    g_puts(" ss=");
    t_putx(entry_ss);
    g_puts(" rflags=");
    t_putx(entry_rflags);
    g_puts("\n");
    sse();
    g_puts("sse: ok\n");
    g_exit(0);
}
