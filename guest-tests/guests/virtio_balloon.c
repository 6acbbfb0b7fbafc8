/* virtio-balloon end to end: the guest touches 256 pages, inflates the
   balloon with them (the frames are dropped: STATS shows fewer resident
   frames), reads them back as zeros, deflates, and reports statistics on
   the stats queue; it tells the device its size in `actual`. */
#include "test.h"
#include "virtio.h"

#define RINGS 0x1000000ul /* three queues, 3 pages each */
#define PFNS ((u32 *)0x1100000ul)
#define STATBUF ((u8 *)0x1101000ul)
#define AREA ((volatile u8 *)0x2000000ul)
#define NPAGES 256
#define F_STATS_VQ (1ul << 1)

void gmain(u64 ram) {
    (void)ram;
    u64 dev = VIRTIO_SLOT(0);
    u64 f = vdev_begin(dev, 5, F_STATS_VQ);
    T_TRUE(f & F_STATS_VQ, "stats queue negotiated");
    struct vq inflate, deflate, stats;
    T_EQ(vq_setup(&inflate, dev, 0, 16, RINGS), 0, "inflate queue");
    T_EQ(vq_setup(&deflate, dev, 1, 16, RINGS + 3 * PAGE), 0, "deflate queue");
    T_EQ(vq_setup(&stats, dev, 2, 16, RINGS + 6 * PAGE), 0, "stats queue");
    T_EQ(vdev_ready(dev) & (VS_DRIVER_OK | VS_NEEDS_RESET), VS_DRIVER_OK, "driver ok");

    /* 5.5.6.3: the driver puts a stats buffer at once. Tag 4 (free
       memory) = 0x1234000. */
    STATBUF[0] = 4; STATBUF[1] = 0;
    *(u64 *)(STATBUF + 2) = 0x1234000ul;
    struct vbuf sb = {(u64)STATBUF, 10, 0};
    vq_add(&stats, &sb, 1);
    vq_kick(&stats);

    for (u64 i = 0; i < NPAGES; i++) AREA[i * PAGE] = (u8)(i + 1);
    for (u64 i = 0; i < NPAGES; i++) PFNS[i] = (u32)(((u64)AREA >> 12) + i);
    u64 before = g_stat(ST_RESIDENT);
    struct vbuf b = {(u64)PFNS, NPAGES * 4, 0};
    T_EQ(vq_run(&inflate, &b, 1), 0, "inflate");
    u64 after = g_stat(ST_RESIDENT);
    T_TRUE(after + NPAGES - 8 <= before, "the inflated pages' frames are gone");
    *(volatile u32 *)(dev + VM_CONFIG + 4) = NPAGES; /* actual */
    for (u64 i = 0; i < NPAGES; i++) T_EQ(AREA[i * PAGE], 0, "an inflated page reads zeros");

    T_EQ(vq_run(&deflate, &b, 1), 0, "deflate");
    *(volatile u32 *)(dev + VM_CONFIG + 4) = 0;
    for (u64 i = 0; i < NPAGES; i++) AREA[i * PAGE] = 0x5a;
    T_TRUE(g_stat(ST_RESIDENT) >= after + NPAGES, "deflated pages are memory again");
    *(volatile u32 *)(dev + VM_CONFIG + 4) = 7;

    /* Pages of the VMM's own (below 1 MiB) and outside RAM are ignored. */
    PFNS[0] = 0x10; PFNS[1] = 0xfffff;
    struct vbuf bad = {(u64)PFNS, 8, 0};
    T_EQ(vq_run(&inflate, &bad, 1), 0, "inflate of pages it may not drop");
    g_puts("VIRTIO-BALLOON-OK\n");
    g_exit(0);
}
