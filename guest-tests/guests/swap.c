/* SWAP_OUT: pages go to swap and come back intact on the next access,
   for reads and writes, for the program's own code and stack, for pages a
   device reads through a pin, and for pages shared with a clone; pinned
   pages are skipped; write protection survives; STATS counts it all. */
#include "cow.h"
#include "test.h"

#define PAGES 64
static u8 __attribute__((aligned(4096))) area[PAGES * PAGE];
static u8 __attribute__((aligned(4096))) buf[PAGE];
extern char __executable_start[], _end[];

static i64 swap_out(void *p, u64 len) { return hc(HC_SWAP_OUT, (u64)p, len, 0); }
static u8 mark(u64 i) { return (u8)(3 + i * 7); }

void gmain(u64 ram) {
    for (u64 i = 0; i < PAGES; i++) {
        area[i * PAGE] = mark(i);
        area[i * PAGE + PAGE - 1] = mark(i) ^ 0xff;
    }
    u64 res0 = g_stat(ST_RESIDENT), sw0 = g_stat(ST_SWAPPED), in0 = g_stat(ST_SWAP_INS);
    T_EQ(swap_out(area, PAGES * PAGE), PAGES, "SWAP_OUT of the whole area");
    T_EQ(g_stat(ST_SWAPPED), sw0 + PAGES, "STATS pages in swap");
    T_TRUE(g_stat(ST_RESIDENT) + PAGES <= res0, "SWAP_OUT freed frames");
    T_EQ(swap_out(area, PAGES * PAGE), 0, "SWAP_OUT of pages already in swap");
    /* Half come back through reads, half through writes. */
    for (u64 i = 0; i < PAGES; i += 2) T_EQ(area[i * PAGE + PAGE - 1], mark(i) ^ 0xff, "read back");
    for (u64 i = 1; i < PAGES; i += 2) area[i * PAGE + 1] = 1;
    for (u64 i = 0; i < PAGES; i++) T_EQ(area[i * PAGE], mark(i), "the data after swap-in");
    T_EQ(g_stat(ST_SWAP_INS), in0 + PAGES, "STATS swap-ins");
    T_EQ(g_stat(ST_SWAPPED), sw0, "STATS pages in swap after they all came back");

    /* The program's own code, data and stack (the page this code runs on,
       the page tables stay: they are the VMM's). */
    u64 img = (u64)__executable_start & ~(PAGE - 1);
    u64 img_len = (((u64)_end + PAGE - 1) & ~(PAGE - 1)) - img;
    T_TRUE(swap_out((void *)img, img_len) > 0, "SWAP_OUT of the program image");
    u64 sp;
    asm volatile("mov %%rsp, %0" : "=r"(sp));
    T_TRUE(swap_out((void *)((sp & ~(PAGE - 1)) - PAGE), 2 * PAGE) > 0, "SWAP_OUT of the stack");
    T_EQ(area[5 * PAGE], mark(5), "running again after the code went to swap");

    /* A pinned page is skipped; the device still sees the guest's page.
       (The image, area included, went to swap above: touch it first.) */
    for (u64 i = 0; i < 4; i++) T_EQ(area[i * PAGE], mark(i), "area after the image came back");
    i64 h = pin(&area[0], PAGE, PIN_WRITE_FLAG | PIN_LONGTERM);
    T_TRUE(h >= 0, "PIN");
    T_EQ(swap_out(area, 4 * PAGE), 3, "SWAP_OUT skips the pinned page");
    area[0] = 0x42;
    T_EQ(pin_read(h, buf), PAGE, "PIN_READ");
    T_EQ(buf[0], 0x42, "the pin after SWAP_OUT");
    T_EQ(unpin(h), 0, "UNPIN");
    /* A page that is in swap can be pinned: it comes back first. */
    h = pin(&area[PAGE], PAGE, 0);
    T_TRUE(h >= 0, "PIN of a page in swap");
    T_EQ(pin_read(h, buf), PAGE, "PIN_READ of it");
    T_EQ(buf[0], mark(1), "what the pin of a swapped page reads");
    T_EQ(unpin(h), 0, "UNPIN");

    /* Shared with a clone: swapped once, each side keeps its own data. */
    area[10 * PAGE] = 10;
    i64 c = fork_vm();
    if (c == 0) {
        CHILD_CHECK(swap_out(&area[10 * PAGE], PAGE) == 1);
        spin(2000000);
        CHILD_CHECK(area[10 * PAGE] == 10);
        area[10 * PAGE] = 11;
        g_exit(0);
    }
    WAIT_OK(c);
    T_EQ(area[10 * PAGE], 10, "the parent's copy after the clone swapped and wrote");

    /* Write protection survives swap. */
    T_EQ(area[20 * PAGE], mark(20), "page 20 back from swap");
    T_EQ(hc(HC_WP, (u64)&area[20 * PAGE], PAGE, 1), 0, "WP");
    T_EQ(swap_out(&area[20 * PAGE], PAGE), 1, "SWAP_OUT of a protected page");
    area[20 * PAGE] = 1;
    u64 ev[4];
    T_EQ(hc(HC_WP_EVENTS, (u64)ev, sizeof ev, 0), 1, "the write after swap-in was reported");
    T_EQ(ev[0], (u64)&area[20 * PAGE], "the reported page");

    /* Hostile arguments. */
    T_EQ(swap_out(&area[1], PAGE), -E_INVAL, "unaligned");
    T_EQ(swap_out((void *)0x50000, PAGE), -E_INVAL, "the VMM's page tables");
    T_EQ(swap_out((void *)t_ram_end(ram), PAGE), -E_FAULT, "past RAM");
    T_EQ(swap_out(area, ~0ul - 4096), -E_FAULT, "an absurd length");
    T_EQ(swap_out(area, 0), 0, "nothing");
    g_puts("SWAP-OK\n");
    g_exit(0);
}
