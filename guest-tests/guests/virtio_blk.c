/* virtio-blk end to end: slot 0 is a writable disk whose first 8 sectors
   the host filled with a pattern (byte i = i * 7 + 3) and sectors 32..47
   with 0xff; slot 1 is a read-only disk. Reads, writes, flush, get-id,
   write-zeroes and discard through the device; the host checks the files
   after the run. */
#include "test.h"
#include "virtio.h"

#define RINGS0 0x1000000ul
#define RINGS1 0x1010000ul
#define REQ ((struct vblk_req *)0x1100000ul)
#define STATUS ((u8 *)0x1100100ul)
#define BUF ((u8 *)0x1200000ul)
#define BUF2 ((u8 *)0x1208000ul)

static void setup(struct vq *q, u64 dev, u64 rings, u64 want) {
    u64 f = vdev_begin(dev, 2, want);
    T_TRUE(f & VIRTIO_F_VERSION_1, "features negotiated");
    T_EQ(vq_setup(q, dev, 0, 64, rings), 0, "queue set up");
    T_EQ(vdev_ready(dev) & (VS_DRIVER_OK | VS_NEEDS_RESET), VS_DRIVER_OK, "driver ok");
}

void gmain(u64 ram) {
    (void)ram;
    struct vq q, ro;
    u64 dev = VIRTIO_SLOT(0), rodev = VIRTIO_SLOT(1);
    setup(&q, dev, RINGS0, VBLK_F_FLUSH | VBLK_F_DISCARD | VBLK_F_WRITE_ZEROES);
    u64 cap = vm_cfg64(dev, 0);
    T_EQ(cap, 1024, "capacity in sectors (512 KiB)");

    /* The host's pattern. */
    T_EQ(vblk_rw(&q, REQ, STATUS, VBLK_T_IN, 0, (u64)BUF, 4096, 1), VBLK_S_OK, "read");
    for (u64 i = 0; i < 4096; i++) T_EQ(BUF[i], (u8)(i * 7 + 3), "host pattern");

    /* Write sectors 16..23, read them back elsewhere. */
    for (u64 i = 0; i < 4096; i++) BUF[i] = (u8)(i ^ 0x5a);
    T_EQ(vblk_rw(&q, REQ, STATUS, VBLK_T_OUT, 16, (u64)BUF, 4096, 0), VBLK_S_OK, "write");
    T_EQ(vblk_rw(&q, REQ, STATUS, VBLK_T_IN, 16, (u64)BUF2, 4096, 1), VBLK_S_OK, "read back");
    for (u64 i = 0; i < 4096; i++) T_EQ(BUF2[i], (u8)(i ^ 0x5a), "written data");
    T_EQ(vblk_rw(&q, REQ, STATUS, VBLK_T_FLUSH, 0, 0, 0, 0), VBLK_S_OK, "flush");

    /* Get-id: the file's name. */
    for (int i = 0; i < 20; i++) BUF[i] = 0;
    T_EQ(vblk_rw(&q, REQ, STATUS, VBLK_T_GET_ID, 0, (u64)BUF, 20, 1), VBLK_S_OK, "get id");
    T_EQ(BUF[0], 'v', "id");
    T_EQ(BUF[2], 'm', "id");

    /* Write-zeroes sectors 32..39, discard 40..47. */
    u64 *seg = (u64 *)BUF;
    seg[0] = 32;
    seg[1] = 8;
    T_EQ(vblk_rw(&q, REQ, STATUS, VBLK_T_WRITE_ZEROES, 0, (u64)BUF, 16, 0), VBLK_S_OK, "write zeroes");
    seg[0] = 40;
    T_EQ(vblk_rw(&q, REQ, STATUS, VBLK_T_DISCARD, 0, (u64)BUF, 16, 0), VBLK_S_OK, "discard");
    T_EQ(vblk_rw(&q, REQ, STATUS, VBLK_T_IN, 32, (u64)BUF2, 8192, 1), VBLK_S_OK, "read zeroes");
    for (u64 i = 0; i < 8192; i++) T_EQ(BUF2[i], 0, "zeroed");

    /* Past the end, and a length that is not whole sectors. */
    T_EQ(vblk_rw(&q, REQ, STATUS, VBLK_T_IN, 1023, (u64)BUF, 1024, 1), VBLK_S_IOERR, "past the end");
    T_EQ(vblk_rw(&q, REQ, STATUS, VBLK_T_IN, 0, (u64)BUF, 100, 1), VBLK_S_IOERR, "partial sector");

    /* The read-only disk: reads work, writes are refused. */
    setup(&ro, rodev, RINGS1, VBLK_F_FLUSH | VBLK_F_RO);
    vm_wr(rodev, VM_DEVICE_FEATURES_SEL, 0);
    T_TRUE(vm_rd(rodev, VM_DEVICE_FEATURES) & VBLK_F_RO, "read-only offered");
    T_EQ(vblk_rw(&ro, REQ, STATUS, VBLK_T_IN, 0, (u64)BUF, 512, 1), VBLK_S_OK, "ro read");
    T_EQ(BUF[0], 0x42, "ro data");
    T_EQ(vblk_rw(&ro, REQ, STATUS, VBLK_T_OUT, 0, (u64)BUF, 512, 0), VBLK_S_IOERR, "ro write");

    /* Many requests in flight at once (the device thread and its pool). */
    for (int i = 0; i < 8; i++) {
        REQ[i].type = VBLK_T_IN;
        REQ[i].reserved = 0;
        REQ[i].sector = (u64)i;
        STATUS[i] = 0xee;
        struct vbuf b[3] = {{(u64)&REQ[i], 16, 0}, {(u64)BUF + i * 512ul, 512, 1}, {(u64)&STATUS[i], 1, 1}};
        vq_add(&q, b, 3);
    }
    vq_kick(&q);
    for (int i = 0; i < 8; i++) {
        u32 id, len;
        T_EQ(vq_poll(&q, &id, &len, 2000000000ul), 0, "batch completes");
        T_EQ(len, 513, "batch length");
    }
    for (int i = 0; i < 8; i++) T_EQ(STATUS[i], VBLK_S_OK, "batch status");
    for (u64 i = 0; i < 4096; i++) T_EQ(BUF[i], (u8)(i * 7 + 3), "batch data");

    /* The device keeps pins of the pages it was given across requests;
       the guest must not be able to tell. Buffer pages no request holds
       are not pinned for migration and swap-out (both skip pinned pages). */
    T_EQ(vblk_rw(&q, REQ, STATUS, VBLK_T_IN, 0, (u64)BUF2, 4096, 1), VBLK_S_OK, "read into a page");
    T_EQ(hc(HC_MIGRATE, (u64)BUF2, PAGE, 0), 1, "a used buffer page migrates");
    T_EQ(hc(HC_SWAP_OUT, (u64)BUF2, PAGE, 0), 1, "a used buffer page swaps out");
    T_EQ(BUF2[5], (u8)(5 * 7 + 3), "and comes back");
    /* A buffer page discarded and used again gets the data in its new
       frame. */
    T_EQ(hc(HC_DISCARD, (u64)BUF, PAGE, 0), 0, "discard the buffer");
    T_EQ(BUF[1], 0, "a discarded page reads zeros");
    T_EQ(vblk_rw(&q, REQ, STATUS, VBLK_T_IN, 0, (u64)BUF, 4096, 1), VBLK_S_OK, "read after discard");
    for (u64 i = 0; i < 4096; i++) T_EQ(BUF[i], (u8)(i * 7 + 3), "data after discard");
    g_puts("VIRTIO-BLK-OK\n");
    g_exit(0);
}
