/* A hostile virtio-blk driver: every request the specification forbids
   completes with VIRTIO_BLK_S_IOERR (or nothing written), or puts the
   device into DEVICE_NEEDS_RESET; after a reset the device works again.
   The VMM must not crash, hang or write outside the named buffers (the
   guard page after the data buffer must stay intact). */
#include "test.h"
#include "virtio.h"

#define RINGS 0x1000000ul
#define REQ ((struct vblk_req *)0x1100000ul)
#define STATUS ((u8 *)0x1100100ul)
#define BUF ((u8 *)0x1200000ul)
#define GUARD ((u8 *)0x1201000ul)

static struct vq q;
static u64 dev;

static void setup(u16 size) {
    T_TRUE(vdev_begin(dev, 2, 0) & VIRTIO_F_VERSION_1, "features");
    T_EQ(vq_setup(&q, dev, 0, size, RINGS), 0, "queue");
}

static void wait_needs_reset(const char *what) {
    for (u64 i = 0; i < 200000000ul; i++) {
        if (vm_rd(dev, VM_STATUS) & VS_NEEDS_RESET) return;
        asm volatile("pause");
    }
    t_fail(what, vm_rd(dev, VM_STATUS), VS_NEEDS_RESET);
}

/* Publishes head 0 of a hand-made chain; returns the status byte (0xee if
   the device did not write it), or 0x100 if it was not completed. */
static u32 raw(void) {
    *STATUS = 0xee;
    q.avail[2 + q.avail_idx % q.size] = 0;
    vm_mb();
    q.avail[1] = ++q.avail_idx;
    vq_kick(&q);
    u32 id, len;
    if (vq_poll(&q, &id, &len, 2000000000ul)) return 0x100;
    return *STATUS;
}

static void desc(u16 i, u64 addr, u32 len, u16 flags, u16 next) {
    q.desc[i].addr = addr; q.desc[i].len = len; q.desc[i].flags = flags; q.desc[i].next = next;
}

void gmain(u64 ram) {
    (void)ram;
    dev = VIRTIO_SLOT(0);
    for (u64 i = 0; i < PAGE; i++) GUARD[i] = 0x6b;
    REQ->type = VBLK_T_IN; REQ->reserved = 0; REQ->sector = 0;

    /* A notification before DRIVER_OK. */
    setup(16);
    vm_wr(dev, VM_QUEUE_NOTIFY, 0);
    wait_needs_reset("notified before DRIVER_OK");

    setup(16);
    T_EQ(vdev_ready(dev) & (VS_DRIVER_OK | VS_NEEDS_RESET), VS_DRIVER_OK, "works after a reset");
    /* A loop (a chain longer than the queue). */
    desc(0, (u64)REQ, 16, VQ_DESC_F_NEXT, 1);
    desc(1, (u64)STATUS, 1, VQ_DESC_F_NEXT | VQ_DESC_F_WRITE, 0);
    T_TRUE(raw() != 0x100, "a loop completes");
    /* A buffer outside RAM. */
    desc(0, (u64)REQ, 16, VQ_DESC_F_NEXT, 1);
    desc(1, 1ul << 45, 4096, VQ_DESC_F_NEXT | VQ_DESC_F_WRITE, 2);
    desc(2, (u64)STATUS, 1, VQ_DESC_F_WRITE, 0);
    T_EQ(raw(), VBLK_S_IOERR, "buffer outside RAM");
    /* The wrong direction: the data the device must write is read-only. */
    desc(1, (u64)BUF, 4096, VQ_DESC_F_NEXT, 2);
    T_EQ(raw(), VBLK_S_IOERR, "device-readable data buffer of a read");
    /* An absurd length, and one past the guard page. */
    desc(1, (u64)BUF, 0xfffffff0u, VQ_DESC_F_NEXT | VQ_DESC_F_WRITE, 2);
    T_EQ(raw(), VBLK_S_IOERR, "absurd length");
    desc(1, (u64)BUF, 4096 + 512, VQ_DESC_F_NEXT | VQ_DESC_F_WRITE, 2);
    T_EQ(raw(), VBLK_S_OK, "a read of 9 sectors into 4.5 KiB");
    for (u64 i = 512; i < PAGE; i++) T_EQ(GUARD[i], 0x6b, "nothing written past the buffer");
    /* A head past the queue. */
    q.avail[2 + q.avail_idx % q.size] = 999;
    vm_mb();
    q.avail[1] = ++q.avail_idx;
    vq_kick(&q);
    wait_needs_reset("head past the queue");

    /* A queue size that is not a power of two. */
    setup(16);
    vm_wr(dev, VM_QUEUE_SEL, 0);
    vm_wr(dev, VM_QUEUE_NUM, 3);
    T_TRUE(vdev_ready(dev) & VS_NEEDS_RESET, "queue size 3");

    /* And the device works again. */
    setup(16);
    T_EQ(vdev_ready(dev) & (VS_DRIVER_OK | VS_NEEDS_RESET), VS_DRIVER_OK, "works after a reset");
    T_EQ(vblk_rw(&q, REQ, STATUS, VBLK_T_IN, 0, (u64)BUF, 4096, 1), VBLK_S_OK, "a good read");
    T_EQ(BUF[0], 0x42, "data");
    g_puts("VIRTIO-HOSTILE-OK\n");
    g_exit(0);
}
