/* A privileged instruction in ring 3 (reading CR0): #GP, which ends the VM. */
#include "test.h"

void gmain(u64 ram) {
    u64 cr0;
    g_puts("fault_gp: reading cr0 in ring 3\n");
    asm volatile(".globl fault_insn\nfault_insn: mov %%cr0, %0" : "=r"(cr0));
    g_puts("FAIL: no fault, cr0 ");
    t_putx(cr0);
    g_puts("\n");
    g_exit(T_FAILED);
}
