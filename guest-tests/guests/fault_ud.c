/* An undefined instruction (ud2): #UD, which ends the VM. */
#include "test.h"

void gmain(u64 ram) {
    g_puts("fault_ud: executing ud2\n");
    asm volatile(".globl fault_insn\nfault_insn: ud2");
    g_puts("FAIL: no fault\n");
    g_exit(T_FAILED);
}
