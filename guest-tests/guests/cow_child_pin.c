/* Scenario 3 and seed 003's vmsplice story: the child takes a read-only
   device reference after fork and drops its mapping; the parent then
   writes a secret: the child's reference still reads the old data. */
#include "cow.h"
static char __attribute__((aligned(4096))) mem[PAGE];
static char __attribute__((aligned(4096))) out[PAGE];

static int same(const volatile char *a, const char *b) {
    for (u64 i = 0; b[i]; i++) if (a[i] != b[i]) return 0;
    return 1;
}

void gmain(u64 ram) {
    (void)ram;
    const char *boring = "Boring Data", *secret = "Secret Data";
    for (u64 i = 0; boring[i]; i++) mem[i] = boring[i];
    i64 c = fork_vm();
    G_CHECK(c >= 0, "FORK failed");
    if (c == 0) {
        CHILD_CHECK(same(mem, boring));
        i64 h = pin(mem, PAGE, PIN_LONGTERM);
        CHILD_CHECK(h >= 0);
        CHILD_CHECK(discard(mem, PAGE) == 0);
        spin(3000000); /* the parent writes its secret meanwhile */
        CHILD_CHECK(pin_read(h, out) == PAGE);
        CHILD_CHECK(same(out, boring));
        CHILD_CHECK(!same(out, secret));
        CHILD_CHECK(unpin(h) == 0);
        g_exit(0);
    }
    for (u64 i = 0; secret[i]; i++) mem[i] = secret[i];
    WAIT_OK(c);
    G_CHECK(same(mem, secret), "parent lost its write");
    g_puts("COW-CHILD-PIN-OK\n");
    g_exit(0);
}
