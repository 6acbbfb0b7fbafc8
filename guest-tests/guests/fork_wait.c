/* FORK and WAIT semantics: exit codes, faults, reaping, non-children, and
   the clone's console prefix. */
#include "cow.h"

void gmain(u64 ram) {
    (void)ram;
    G_CHECK(wait_vm(77) == -10, "WAIT on a VM that is not a child: not -ECHILD");
    i64 c = fork_vm();
    if (c == 0) { g_puts("hello from the clone\n"); g_exit(7); }
    G_CHECK(c >= 1, "FORK did not return a child id >= 1");
    G_CHECK(wait_vm(c) == 7, "WAIT did not return the child's exit code");
    G_CHECK(wait_vm(c) == -10, "a child was waited for twice");
    i64 f = fork_vm();
    if (f == 0) asm volatile("ud2");
    G_CHECK(f > c, "clone ids are not increasing");
    G_CHECK(wait_vm(f) == 256 + 6, "WAIT of a child that took #UD is not 256 + 6");
    i64 g = fork_vm();
    if (g == 0) {
        i64 gg = fork_vm();
        if (gg == 0) g_exit(5);
        CHILD_CHECK(gg > 0);
        g_exit((u64)(gg << 8) | 1); /* tell the root the grandchild's id */
    }
    i64 st = wait_vm(g);
    G_CHECK((st & 0xff) == 1, "the middle child failed");
    G_CHECK(wait_vm(st >> 8) == -10, "the root waited for its grandchild");
    g_puts("FORK-WAIT-OK\n");
    g_exit(0);
}
