/* Reads in the hole between 3 and 4 GiB, where nothing is mapped: a page
   fault, which ends the VM. */
#include "test.h"

void gmain(u64 ram) {
    u64 v;
    g_puts("fault_pf_read: reading at 3 GiB + 0x48\n");
    asm volatile(".globl fault_insn\nfault_insn: movq (%1), %0" : "=r"(v) : "r"(0xc0000048ul) : "memory");
    g_puts("FAIL: no fault, read ");
    t_putx(v);
    g_puts("\n");
    g_exit(T_FAILED);
}
