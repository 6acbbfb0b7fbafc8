/* Prints the code it will exit with, then exits with it. Tests patch
   `exit_value` in the ELF file to choose the code. */
#include "test.h"

volatile u64 exit_value = 42;

void gmain(u64 ram) {
    u64 code = exit_value;
    g_puts("exit_code: exiting with ");
    t_putx(code);
    g_puts("\n");
    g_exit(code);
}
