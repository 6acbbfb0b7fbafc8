/* A hypercall changes RAX only: every other general-purpose register, the
   flags, RSP and XMM0-15 are what they were before `out`. */
#include "test.h"

/* in:  [0] rbx [1] rcx [2] rsi [3] rbp [4..11] r8-r15 [12] rdi; xmm0-15 at
        byte 0x80.
   out: [0] rax [1] rbx [2] rcx [3] rdx [4] rsi [5] rbp [6..13] r8-r15
        [14] rdi [15] rflags before [16] rflags after [17] rsp after pushing
        the out pointer [18] rsp after the second pushfq; xmm0-15 at 0xa0. */
enum { IN_WORDS = 0x180 / 8, OUT_WORDS = 0x1a0 / 8 };
void hc_all_regs(const u64 *in, u64 *out, u64 nr);
asm(".text\n"
    ".globl hc_all_regs\n"
    "hc_all_regs:\n"
    "  push %rbx\n  push %rbp\n  push %r12\n  push %r13\n  push %r14\n  push %r15\n"
    "  push %rsi\n"
    "  mov %rsp, 136(%rsi)\n"
    "  mov %rdx, %rax\n"
    "  movdqu 0x080(%rdi), %xmm0\n  movdqu 0x090(%rdi), %xmm1\n"
    "  movdqu 0x0a0(%rdi), %xmm2\n  movdqu 0x0b0(%rdi), %xmm3\n"
    "  movdqu 0x0c0(%rdi), %xmm4\n  movdqu 0x0d0(%rdi), %xmm5\n"
    "  movdqu 0x0e0(%rdi), %xmm6\n  movdqu 0x0f0(%rdi), %xmm7\n"
    "  movdqu 0x100(%rdi), %xmm8\n  movdqu 0x110(%rdi), %xmm9\n"
    "  movdqu 0x120(%rdi), %xmm10\n movdqu 0x130(%rdi), %xmm11\n"
    "  movdqu 0x140(%rdi), %xmm12\n movdqu 0x150(%rdi), %xmm13\n"
    "  movdqu 0x160(%rdi), %xmm14\n movdqu 0x170(%rdi), %xmm15\n"
    "  mov 0(%rdi), %rbx\n  mov 8(%rdi), %rcx\n  mov 16(%rdi), %rsi\n  mov 24(%rdi), %rbp\n"
    "  mov 32(%rdi), %r8\n  mov 40(%rdi), %r9\n  mov 48(%rdi), %r10\n  mov 56(%rdi), %r11\n"
    "  mov 64(%rdi), %r12\n  mov 72(%rdi), %r13\n  mov 80(%rdi), %r14\n  mov 88(%rdi), %r15\n"
    "  mov 96(%rdi), %rdi\n"
    "  mov $0x510, %edx\n"
    "  stc\n  std\n"
    "  pushfq\n"
    "  out %eax, %dx\n"
    "  pushfq\n"
    "  cld\n"
    "  xchg %rdi, 16(%rsp)\n"
    "  mov %rax, 0(%rdi)\n  mov %rbx, 8(%rdi)\n  mov %rcx, 16(%rdi)\n  mov %rdx, 24(%rdi)\n"
    "  mov %rsi, 32(%rdi)\n  mov %rbp, 40(%rdi)\n  mov %r8, 48(%rdi)\n  mov %r9, 56(%rdi)\n"
    "  mov %r10, 64(%rdi)\n  mov %r11, 72(%rdi)\n  mov %r12, 80(%rdi)\n  mov %r13, 88(%rdi)\n"
    "  mov %r14, 96(%rdi)\n  mov %r15, 104(%rdi)\n"
    "  mov %rsp, 144(%rdi)\n"
    "  pop %rax\n  mov %rax, 128(%rdi)\n"
    "  pop %rax\n  mov %rax, 120(%rdi)\n"
    "  pop %rax\n  mov %rax, 112(%rdi)\n"
    "  movdqu %xmm0, 0x0a0(%rdi)\n  movdqu %xmm1, 0x0b0(%rdi)\n"
    "  movdqu %xmm2, 0x0c0(%rdi)\n  movdqu %xmm3, 0x0d0(%rdi)\n"
    "  movdqu %xmm4, 0x0e0(%rdi)\n  movdqu %xmm5, 0x0f0(%rdi)\n"
    "  movdqu %xmm6, 0x100(%rdi)\n  movdqu %xmm7, 0x110(%rdi)\n"
    "  movdqu %xmm8, 0x120(%rdi)\n  movdqu %xmm9, 0x130(%rdi)\n"
    "  movdqu %xmm10, 0x140(%rdi)\n movdqu %xmm11, 0x150(%rdi)\n"
    "  movdqu %xmm12, 0x160(%rdi)\n movdqu %xmm13, 0x170(%rdi)\n"
    "  movdqu %xmm14, 0x180(%rdi)\n movdqu %xmm15, 0x190(%rdi)\n"
    "  pop %r15\n  pop %r14\n  pop %r13\n  pop %r12\n  pop %rbp\n  pop %rbx\n"
    "  ret\n");

static const char *const GPR_NAMES[] = {
    "rbx", "rcx", "rdx", "rsi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi",
};

static u8 __attribute__((aligned(4096))) scratch[2 * 4096];
static u64 stats_buf[4];

/* Calls function `nr` with RDI, RSI, R10 = a, b, c and every other register
   set from `seed`; checks the result and that nothing else changed. */
static void check(const char *what, u64 nr, u64 a, u64 b, u64 c, i64 want_rax, u64 seed) {
    u64 in[IN_WORDS], out[OUT_WORDS];
    for (int i = 0; i < IN_WORDS; i++) in[i] = seed * 0x0101010101010101ul + (u64)i * 0x1111111111111111ul;
    in[2] = b;  /* rsi */
    in[6] = c;  /* r10 */
    in[12] = a; /* rdi */
    for (int i = 0; i < OUT_WORDS; i++) out[i] = 0;
    hc_all_regs(in, out, nr);

    g_puts(what);
    g_puts(": ");
    T_EQ(out[0], (u64)want_rax, "rax (the result)");
    /* Expected value of out[1..14], in the order GPR_NAMES lists them. */
    u64 want[14] = {in[0], in[1], 0x510, in[2], in[3], in[4], in[5], in[6], in[7], in[8], in[9], in[10], in[11], in[12]};
    for (int i = 0; i < 14; i++) T_EQ(out[1 + i], want[i], GPR_NAMES[i]);
    T_EQ(out[16], out[15], "rflags");
    T_EQ(out[16] & 0x401, 0x401, "CF and DF set before the call");
    T_EQ(out[18] + 8, out[17] - 8, "rsp");
    for (int i = 0; i < 32; i++) T_EQ(out[20 + i], in[16 + i], "xmm0-15 (word index in the failure)");
    g_puts("preserved\n");
}

void gmain(u64 ram) {
    static const char msg[] = "hc_regs: WRITE with every register set\n";
    check("unknown", 1000, 0x1234, 0x5678, 0x9abc, -E_NOSYS, 1);
    check("WRITE", HC_WRITE, (u64)msg, sizeof msg - 1, 0xdead, sizeof msg - 1, 2);
    check("STATS", HC_STATS, (u64)stats_buf, 16, 0xbeef, 2, 3);
    scratch[4096] = 1;
    check("DISCARD", HC_DISCARD, (u64)scratch + 4096, 4096, 0x77, 0, 4);
    check("VCPU_START", HC_VCPU_START, 5, 0x400000, 0x800000, -E_INVAL, 5);
    check("WRITE outside RAM", HC_WRITE, 1ul << 40, 8, 0, -E_FAULT, 6);
    g_exit(0);
}
