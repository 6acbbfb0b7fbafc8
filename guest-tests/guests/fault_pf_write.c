/* Writes far outside RAM (1 TiB): a page fault, which ends the VM. */
#include "test.h"

void gmain(u64 ram) {
    g_puts("fault_pf_write: writing at 1 TiB\n");
    asm volatile(".globl fault_insn\nfault_insn: movq $1, (%0)" : : "r"((1ul << 40) + 0x123) : "memory");
    g_puts("FAIL: no fault\n");
    g_exit(T_FAILED);
}
