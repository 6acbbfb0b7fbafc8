/* A guest whose virtio-blk device (slot 0, the host's file of 0x5a bytes,
   a slow disk) holds a read in flight when a live snapshot is taken:
   it submits one 4 KiB read of sector 0 into `buf` (filled with 0xee),
   prints where the buffer and the used ring are, and spins. The snapshot
   waits for the read first, so the image shows it done: the used index
   at 1 and the buffer holding the disk's bytes. */
#include "test.h"
#include "virtio.h"

static u8 __attribute__((aligned(4096))) rings[3 * 4096];
static u8 __attribute__((aligned(4096))) buf[4096];
static struct vblk_req req;
static u8 status;
static struct vq q;
static volatile u64 spins;

void gmain(u64 ram) {
    (void)ram;
    u64 dev = VIRTIO_SLOT(0);
    T_TRUE(vdev_begin(dev, 2, 0) & VIRTIO_F_VERSION_1, "features negotiated");
    T_EQ(vq_setup(&q, dev, 0, 16, (u64)rings), 0, "queue set up");
    T_EQ(vdev_ready(dev) & (VS_DRIVER_OK | VS_NEEDS_RESET), VS_DRIVER_OK, "driver ok");
    for (u64 i = 0; i < sizeof buf; i++) buf[i] = 0xee;
    req.type = VBLK_T_IN;
    req.reserved = 0;
    req.sector = 0;
    status = 0xee;
    struct vbuf b[3] = {{(u64)&req, 16, 0}, {(u64)buf, sizeof buf, 1}, {(u64)&status, 1, 1}};
    vq_add(&q, b, 3);
    vq_kick(&q);
    g_puts("snap_blk: buf=");
    g_putu((u64)buf);
    g_puts(" used=");
    g_putu((u64)q.used);
    g_puts(" submitted\n");
    for (;;) spins++;
}
