/* A fuzzing target with a virtio-blk disk in slot 0. Every run must find
   the disk, the device and its queue exactly as they were at SNAPSHOT;
   then it scribbles over all three.

   Before SNAPSHOT it sets the device up and writes a pattern over sectors
   0..15 through it (the root VM writes the image file itself); the host
   filled the rest of the file with 0x5a.

   Each run checks that the device is live (DRIVER_OK, nothing pending in
   the used ring), that a read of sectors 0..31 completes as the next used
   element with the pattern and the host's bytes, then, by input[0] % 3:
   0: overwrites sectors 0..31 and waits for it,
   1: the same, then leaves 8 more writes in flight at DONE,
   2: the same, then resets the device (status 0).
   DONE(0) if all was as at the snapshot, else 1 disk contents, 2 device
   or queue. */
#include "fuzz.h"
#include "virtio.h"

#define SECTORS 32
#define BYTES (SECTORS * 512)
static u8 __attribute__((aligned(4096))) rings[3 * 4096];
static u8 __attribute__((aligned(4096))) buf[BYTES];
static u8 __attribute__((aligned(4096))) junk[BYTES];
static struct vblk_req reqs[16];
static u8 status[16];
static struct vq q;
static u8 input[16];

static u8 want(u64 i) { return i < 16 * 512 ? (u8)(i * 13 + 1) : 0x5a; }

static u64 check(u64 dev) {
    u32 live = VS_ACKNOWLEDGE | VS_DRIVER | VS_FEATURES_OK | VS_DRIVER_OK;
    if (vm_rd(dev, VM_STATUS) != live) return 2;
    if (*vq_used_idx(&q) != q.last_used) return 2;
    for (u64 i = 0; i < BYTES; i++) buf[i] = 0;
    if (vblk_rw(&q, &reqs[0], &status[0], VBLK_T_IN, 0, (u64)buf, BYTES, 1) != VBLK_S_OK) return 2;
    for (u64 i = 0; i < BYTES; i++)
        if (buf[i] != want(i)) return 1;
    return 0;
}

void gmain(u64 ram) {
    (void)ram;
    fz_init();
    u64 dev = VIRTIO_SLOT(0);
    if (!(vdev_begin(dev, 2, 0) & VIRTIO_F_VERSION_1)) g_exit(10);
    if (vq_setup(&q, dev, 0, 64, (u64)rings)) g_exit(11);
    if ((vdev_ready(dev) & (VS_DRIVER_OK | VS_NEEDS_RESET)) != VS_DRIVER_OK) g_exit(12);
    for (u64 i = 0; i < 16 * 512; i++) buf[i] = want(i);
    if (vblk_rw(&q, &reqs[0], &status[0], VBLK_T_OUT, 0, (u64)buf, 16 * 512, 0) != VBLK_S_OK)
        g_exit(13);
    g_puts("fuzz_blk: ready\n");

    u64 n = fz_snapshot(input, sizeof input);
    u64 bad = check(dev);
    EDGE(bad + 1);
    u8 how = n ? input[0] % 3 : 0;
    for (u64 i = 0; i < BYTES; i++) junk[i] = (u8)(i + n + how + 0x33);
    vblk_rw(&q, &reqs[1], &status[1], VBLK_T_OUT, 0, (u64)junk, BYTES, 0);
    if (how == 1) {
        for (int i = 2; i < 10; i++) {
            reqs[i].type = VBLK_T_OUT;
            reqs[i].reserved = 0;
            reqs[i].sector = (u64)(i - 2) * 4;
            struct vbuf b[3] = {{(u64)&reqs[i], 16, 0}, {(u64)junk, 2048, 0}, {(u64)&status[i], 1, 1}};
            vq_add(&q, b, 3);
        }
        vq_kick(&q);
    } else if (how == 2) {
        vm_wr(dev, VM_STATUS, 0);
    }
    fz_done(bad);
    g_exit(0);
}
