/* virtio-blk across VM fork. Slot 0 is a disk whose requests take
   200 ms in the root VM (a clone's device has no such delay); byte o of
   the image is (o / 512) ^ 0xa5.
   1. A read in flight at fork completes into the parent's memory only:
      the clone serves its own copy of the request, then its buffer keeps
      what the clone wrote there while the parent's read lands.
   2. A device write into a page shared copy-on-write breaks the sharing
      for the writing VM only.
   3. A write in flight at fork and the clone's own writes: the clone's
      writes stay in its overlay, the file gets the parent's. */
#include "test.h"
#include "virtio.h"
#include "cow.h"

#define RINGS 0x1000000ul
#define REQ ((struct vblk_req *)0x1100000ul)
#define STATUS ((u8 *)0x1100100ul)
#define BUF ((u8 *)0x1200000ul)
#define SHARED ((u8 *)0x1201000ul)
#define WBUF ((u8 *)0x1202000ul)
#define CHECK ((u8 *)0x1203000ul)

static struct vq q;

static inline u64 rdtsc(void) {
    u32 lo, hi;
    asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
/* At least half a second on any TSC up to 4 GHz. */
static void half_a_second(void) {
    u64 t = rdtsc();
    while (rdtsc() - t < 2000000000ul) asm volatile("pause");
}
static u8 pattern(u64 sector, u64 i) { return (u8)(((sector * 512 + i) / 512) ^ 0xa5); }
static int is_disk(const u8 *p, u64 sector) {
    for (u64 i = 0; i < 4096; i++) if (p[i] != pattern(sector, i)) return 0;
    return 1;
}
/* Starts a 4 KiB request without waiting for it. */
static void start(u32 type, u64 sector, u8 *data) {
    REQ->type = type;
    REQ->reserved = 0;
    REQ->sector = sector;
    *STATUS = 0xee;
    struct vbuf b[3] = {{(u64)REQ, 16, 0}, {(u64)data, 4096, type == VBLK_T_IN}, {(u64)STATUS, 1, 1}};
    vq_add(&q, b, 3);
    vq_kick(&q);
}
static int done(void) {
    u32 id, len;
    return vq_poll(&q, &id, &len, 2000000000ul) == 0 && *STATUS == VBLK_S_OK;
}

void gmain(u64 ram) {
    (void)ram;
    u64 dev = VIRTIO_SLOT(0);
    T_TRUE(vdev_begin(dev, 2, 0) & VIRTIO_F_VERSION_1, "features");
    T_EQ(vq_setup(&q, dev, 0, 64, RINGS), 0, "queue");
    T_EQ(vdev_ready(dev) & (VS_DRIVER_OK | VS_NEEDS_RESET), VS_DRIVER_OK, "driver ok");

    /* 1. A read in flight at fork. */
    fill(BUF, 0x11, 4096);
    start(VBLK_T_IN, 8, BUF);
    i64 c = fork_vm();
    T_TRUE(c >= 0, "FORK");
    if (c == 0) {
        CHILD_CHECK(done());
        CHILD_CHECK(is_disk(BUF, 8));
        fill(BUF, 0x77, 4096);
        half_a_second(); /* the parent's read lands meanwhile */
        CHILD_CHECK(all(BUF, 0x77, 4096));
        g_exit(0);
    }
    T_TRUE(done(), "the parent's read completes");
    T_TRUE(is_disk(BUF, 8), "the parent's buffer has the data");
    WAIT_OK(c);

    /* 2. A device write into a page shared with a clone. */
    fill(SHARED, 0x22, 4096);
    c = fork_vm();
    T_TRUE(c >= 0, "FORK");
    if (c == 0) {
        half_a_second(); /* the parent's device writes the page meanwhile */
        CHILD_CHECK(all(SHARED, 0x22, 4096));
        g_exit(0);
    }
    start(VBLK_T_IN, 16, SHARED);
    T_TRUE(done(), "read into the shared page");
    T_TRUE(is_disk(SHARED, 16), "the parent sees the device's write");
    WAIT_OK(c);

    /* 3. A write in flight at fork; the clone writes on its own. */
    fill(WBUF, 0xee, 4096);
    start(VBLK_T_OUT, 200, WBUF);
    c = fork_vm();
    T_TRUE(c >= 0, "FORK");
    if (c == 0) {
        CHILD_CHECK(done());
        start(VBLK_T_IN, 200, CHECK);
        CHILD_CHECK(done() && all(CHECK, 0xee, 4096));
        fill(WBUF, 0x99, 4096);
        start(VBLK_T_OUT, 200, WBUF);
        CHILD_CHECK(done());
        start(VBLK_T_OUT, 300, WBUF);
        CHILD_CHECK(done());
        start(VBLK_T_IN, 300, CHECK);
        CHILD_CHECK(done() && all(CHECK, 0x99, 4096));
        g_exit(0);
    }
    T_TRUE(done(), "the parent's write completes");
    WAIT_OK(c);
    start(VBLK_T_IN, 200, CHECK);
    T_TRUE(done() && all(CHECK, 0xee, 4096), "the parent reads its own write, not the clone's");
    start(VBLK_T_IN, 300, CHECK);
    T_TRUE(done() && is_disk(CHECK, 300), "the clone's write stayed in its overlay");
    g_puts("VIRTIO-FORK-OK\n");
    g_exit(0);
}
