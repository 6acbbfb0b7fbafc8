/* An integer division by zero: #DE, which ends the VM. */
#include "test.h"

void gmain(u64 ram) {
    u64 q = 1000, d = 0, r = 0;
    g_puts("fault_de: dividing by zero\n");
    asm volatile(".globl fault_insn\nfault_insn: divq %2" : "+a"(q), "+d"(r) : "r"(d));
    g_puts("FAIL: no fault, quotient ");
    t_putx(q);
    g_puts("\n");
    g_exit(T_FAILED);
}
