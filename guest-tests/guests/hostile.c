/* Hypercalls with bad arguments get errors and the program goes on; none of
   them prints anything. Run with one vCPU. */
#include "test.h"

static u8 __attribute__((aligned(4096))) page[2 * 4096];
static u64 canary = 0x1122334455667788ul;

void gmain(u64 ram) {
    static const char msg[] = "must not be printed\n";
    u64 end = t_ram_end(ram);

    T_EQ(hc(HC_WRITE, 1ul << 40, 4, 0), -E_FAULT, "WRITE from 1 TiB");
    T_EQ(hc(HC_WRITE, 0xd0000000ul, 16, 0), -E_FAULT, "WRITE from the MMIO window");
    T_EQ(hc(HC_WRITE, end - 4, 8, 0), -E_FAULT, "WRITE crossing the end of RAM");
    T_EQ(hc(HC_WRITE, (u64)msg, ~0ul, 0), -E_FAULT, "WRITE of 2^64-1 bytes");
    T_EQ(hc(HC_WRITE, (u64)msg, 1ul << 40, 0), -E_FAULT, "WRITE of 1 TiB");
    T_EQ(hc(HC_WRITE, (u64)msg, ram, 0), -E_FAULT, "WRITE of the RAM size from the program");
    T_EQ(hc(HC_WRITE, ~0ul - 3, 8, 0), -E_FAULT, "WRITE wrapping around");

    T_EQ(hc(19, 0, 0, 0), -E_NOSYS, "function 19");
    T_EQ(hc(1000, 1, 2, 3), -E_NOSYS, "function 1000");
    T_EQ(hc(0xffffffff, 0, 0, 0), -E_NOSYS, "function 0xffffffff");

    page[0] = 7;
    T_EQ(hc(HC_DISCARD, (u64)page + 1, PAGE, 0), -E_INVAL, "DISCARD unaligned");
    T_EQ(hc(HC_DISCARD, 1ul << 40, PAGE, 0), -E_FAULT, "DISCARD at 1 TiB");
    T_EQ(hc(HC_DISCARD, end - PAGE, 2 * PAGE, 0), -E_FAULT, "DISCARD crossing the end of RAM");
    T_EQ(hc(HC_DISCARD, (u64)page, ~0ul, 0), -E_FAULT, "DISCARD of 2^64-1 bytes");
    T_EQ(hc(HC_DISCARD, ~0ul & ~(PAGE - 1), PAGE, 0), -E_FAULT, "DISCARD of the last page of the address space");
    T_EQ(hc(HC_DISCARD, 0x1000, PAGE, 0), -E_INVAL, "DISCARD below 1 MiB");
    T_EQ(hc(HC_DISCARD, 0, 1ul << 20, 0), -E_INVAL, "DISCARD of the first MiB");
    T_EQ(page[0], 7, "the program's page after refused DISCARDs");

    u64 rip = (u64)&gmain, rsp = (u64)page + PAGE;
    T_EQ(hc(HC_VCPU_START, 1, rip, rsp), -E_INVAL, "VCPU_START 1 with one vCPU");
    T_EQ(hc(HC_VCPU_START, 0, rip, rsp), -E_INVAL, "VCPU_START 0");
    T_EQ(hc(HC_VCPU_START, ~0ul, ~0ul, ~0ul), -E_INVAL, "VCPU_START 2^64-1");
    T_EQ(hc(HC_VCPU_START, (1ul << 32) | 1, rip, rsp), -E_INVAL, "VCPU_START 2^32+1");

    u64 st[2] = {0xabababababababab, 0xcdcdcdcdcdcdcdcd};
    T_EQ(hc(HC_STATS, (u64)st, 0, 0), 0, "STATS with cap 0");
    T_EQ(st[0], 0xabababababababab, "STATS with cap 0 wrote nothing");
    T_TRUE(hc(HC_STATS, (u64)page, ~0ul, 0) >= 8, "STATS with cap 2^64-1");

    T_EQ(canary, 0x1122334455667788ul, "program data");
    g_puts("hostile: survived\n");
    g_exit(0);
}
