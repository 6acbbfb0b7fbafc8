/* The planted-bug fuzzing target (guest-tests/guests/fuzz_planted.c) as a
   host program, for `vmm bench`'s baseline: AFL++ fuzzing the same logic
   compiled natively (afl-cc) in forkserver mode. Reads the input
   from the file named by argv[1], or stdin. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

static unsigned char input[256];
static const char magic[] = "FUZZ";

int main(int argc, char **argv) {
    FILE *f = argc > 1 ? fopen(argv[1], "rb") : stdin;
    if (!f) return 2;
    size_t n = fread(input, 1, sizeof input, f);
    if (n >= 4 && input[0] == 'H' && input[1] == 'A' && input[2] == 'N' && input[3] == 'G')
        for (;;) {}
    size_t i = 0;
    while (i < 4 && i < n && input[i] == (unsigned char)magic[i]) i++;
    if (i == 4 && n > 4) {
        if (input[4] == '!') abort();
        if (input[4] == '?') raise(SIGSEGV);
    }
    return 0;
}
