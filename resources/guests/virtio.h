/* A tiny virtio-mmio driver for program-mode guests, written from the
   virtio 1.2 specification: device initialisation (3.1.1), the MMIO
   transport version 2 (4.2.2, 4.2.3) and split virtqueues (2.7). There are
   no interrupts in program mode: the driver polls the used ring. */
#ifndef VIRTIO_H
#define VIRTIO_H
#include "guest.h"

typedef unsigned short u16;

#define VIRTIO_BASE 0xd0000000ul
#define VIRTIO_SLOT(i) (VIRTIO_BASE + (u64)(i) * 0x1000)

/* Registers (4.2.2). */
enum {
    VM_MAGIC = 0x000, VM_VERSION = 0x004, VM_DEVICE_ID = 0x008, VM_VENDOR_ID = 0x00c,
    VM_DEVICE_FEATURES = 0x010, VM_DEVICE_FEATURES_SEL = 0x014,
    VM_DRIVER_FEATURES = 0x020, VM_DRIVER_FEATURES_SEL = 0x024,
    VM_QUEUE_SEL = 0x030, VM_QUEUE_NUM_MAX = 0x034, VM_QUEUE_NUM = 0x038,
    VM_QUEUE_READY = 0x044, VM_QUEUE_NOTIFY = 0x050,
    VM_INTERRUPT_STATUS = 0x060, VM_INTERRUPT_ACK = 0x064, VM_STATUS = 0x070,
    VM_QUEUE_DESC_LOW = 0x080, VM_QUEUE_DESC_HIGH = 0x084,
    VM_QUEUE_DRIVER_LOW = 0x090, VM_QUEUE_DRIVER_HIGH = 0x094,
    VM_QUEUE_DEVICE_LOW = 0x0a0, VM_QUEUE_DEVICE_HIGH = 0x0a4,
    VM_CONFIG_GENERATION = 0x0fc, VM_CONFIG = 0x100,
};
/* Device status (2.1). */
enum {
    VS_ACKNOWLEDGE = 1, VS_DRIVER = 2, VS_DRIVER_OK = 4, VS_FEATURES_OK = 8,
    VS_NEEDS_RESET = 64, VS_FAILED = 128,
};
#define VIRTIO_F_VERSION_1 (1ul << 32)
/* Descriptor flags (2.7.5). */
enum { VQ_DESC_F_NEXT = 1, VQ_DESC_F_WRITE = 2, VQ_DESC_F_INDIRECT = 4 };

static inline u32 vm_rd(u64 dev, u32 off) { return *(volatile u32 *)(dev + off); }
static inline void vm_wr(u64 dev, u32 off, u32 v) { *(volatile u32 *)(dev + off) = v; }
static inline u8 vm_cfg8(u64 dev, u32 off) { return *(volatile u8 *)(dev + VM_CONFIG + off); }
static inline u32 vm_cfg32(u64 dev, u32 off) { return vm_rd(dev, VM_CONFIG + off); }
static inline u64 vm_cfg64(u64 dev, u32 off) {
    /* 4.2.2: 64-bit fields are read as two 32-bit halves; the generation
       counter tells a torn read apart. */
    u32 gen, lo, hi;
    do {
        gen = vm_rd(dev, VM_CONFIG_GENERATION);
        lo = vm_cfg32(dev, off);
        hi = vm_cfg32(dev, off + 4);
    } while (gen != vm_rd(dev, VM_CONFIG_GENERATION));
    return ((u64)hi << 32) | lo;
}
static inline void vm_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

struct vq_desc { u64 addr; u32 len; u16 flags; u16 next; };

/* A split virtqueue (2.7): descriptor table, available ring (driver
   area) and used ring (device area), each in its own 4 KiB page here. */
struct vq {
    u64 dev;
    u32 index;
    u16 size;
    volatile struct vq_desc *desc;
    volatile u16 *avail;   /* flags, idx, ring[size], used_event */
    volatile u8 *used;     /* flags, idx, ring[size] {u32 id, u32 len}, avail_event */
    u16 avail_idx;
    u16 last_used;
    u16 next_desc;
};

static inline volatile u16 *vq_used_idx(struct vq *q) { return (volatile u16 *)(q->used + 2); }

/* 3.1.1 steps 1-6: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
   Returns the negotiated features, or 0 if the device refused them (or is
   not a virtio-mmio version 2 device of type `id`). */
static inline u64 vdev_begin(u64 dev, u32 id, u64 want) {
    if (vm_rd(dev, VM_MAGIC) != 0x74726976 || vm_rd(dev, VM_VERSION) != 2) return 0;
    if (vm_rd(dev, VM_DEVICE_ID) != id) return 0;
    vm_wr(dev, VM_STATUS, 0);
    while (vm_rd(dev, VM_STATUS) != 0) {}
    vm_wr(dev, VM_STATUS, VS_ACKNOWLEDGE);
    vm_wr(dev, VM_STATUS, VS_ACKNOWLEDGE | VS_DRIVER);
    vm_wr(dev, VM_DEVICE_FEATURES_SEL, 0);
    u64 offered = vm_rd(dev, VM_DEVICE_FEATURES);
    vm_wr(dev, VM_DEVICE_FEATURES_SEL, 1);
    offered |= (u64)vm_rd(dev, VM_DEVICE_FEATURES) << 32;
    u64 f = offered & (want | VIRTIO_F_VERSION_1);
    if (!(f & VIRTIO_F_VERSION_1)) return 0;
    vm_wr(dev, VM_DRIVER_FEATURES_SEL, 0);
    vm_wr(dev, VM_DRIVER_FEATURES, (u32)f);
    vm_wr(dev, VM_DRIVER_FEATURES_SEL, 1);
    vm_wr(dev, VM_DRIVER_FEATURES, (u32)(f >> 32));
    vm_wr(dev, VM_STATUS, VS_ACKNOWLEDGE | VS_DRIVER | VS_FEATURES_OK);
    if (!(vm_rd(dev, VM_STATUS) & VS_FEATURES_OK)) return 0;
    return f;
}

/* 4.2.3.2: sets up virtqueue `index` with `size` entries in the three
   pages at `mem` (zeroed here). Returns 0, or -1 if the queue is in use or
   too small. */
static inline int vq_setup(struct vq *q, u64 dev, u32 index, u16 size, u64 mem) {
    vm_wr(dev, VM_QUEUE_SEL, index);
    if (vm_rd(dev, VM_QUEUE_READY) != 0) return -1;
    u32 max = vm_rd(dev, VM_QUEUE_NUM_MAX);
    if (max == 0 || max < size) return -1;
    for (u64 i = 0; i < 3 * PAGE; i += 8) *(volatile u64 *)(mem + i) = 0;
    q->dev = dev;
    q->index = index;
    q->size = size;
    q->desc = (volatile struct vq_desc *)mem;
    q->avail = (volatile u16 *)(mem + PAGE);
    q->used = (volatile u8 *)(mem + 2 * PAGE);
    q->avail_idx = q->last_used = q->next_desc = 0;
    vm_wr(dev, VM_QUEUE_NUM, size);
    vm_wr(dev, VM_QUEUE_DESC_LOW, (u32)mem);
    vm_wr(dev, VM_QUEUE_DESC_HIGH, (u32)(mem >> 32));
    vm_wr(dev, VM_QUEUE_DRIVER_LOW, (u32)(mem + PAGE));
    vm_wr(dev, VM_QUEUE_DRIVER_HIGH, (u32)((mem + PAGE) >> 32));
    vm_wr(dev, VM_QUEUE_DEVICE_LOW, (u32)(mem + 2 * PAGE));
    vm_wr(dev, VM_QUEUE_DEVICE_HIGH, (u32)((mem + 2 * PAGE) >> 32));
    vm_wr(dev, VM_QUEUE_READY, 1);
    return 0;
}

/* 3.1.1 step 8. Returns the status read back. */
static inline u32 vdev_ready(u64 dev) {
    vm_wr(dev, VM_STATUS, vm_rd(dev, VM_STATUS) | VS_DRIVER_OK);
    return vm_rd(dev, VM_STATUS);
}

struct vbuf { u64 addr; u32 len; int write; };

/* 2.7.13: puts a chain on the descriptor table and the available ring,
   without notifying. Descriptors are used round-robin, which is enough for
   drivers whose requests complete in about the order they were made.
   Returns the head. */
static inline u16 vq_add(struct vq *q, const struct vbuf *b, int n) {
    u16 head = q->next_desc;
    for (int i = 0; i < n; i++) {
        u16 d = (u16)((head + i) % q->size);
        q->desc[d].addr = b[i].addr;
        q->desc[d].len = b[i].len;
        q->desc[d].flags = (u16)((i + 1 < n ? VQ_DESC_F_NEXT : 0) | (b[i].write ? VQ_DESC_F_WRITE : 0));
        q->desc[d].next = (u16)((d + 1) % q->size);
    }
    q->next_desc = (u16)((head + n) % q->size);
    q->avail[2 + q->avail_idx % q->size] = head;
    vm_mb();
    q->avail_idx++;
    q->avail[1] = q->avail_idx;
    vm_mb();
    return head;
}

/* 2.7.13.4 / 4.2.3.3: notifies the device of queue q. */
static inline void vq_kick(struct vq *q) {
    vm_mb();
    vm_wr(q->dev, VM_QUEUE_NOTIFY, q->index);
}

/* Whether a used element is waiting. */
static inline int vq_has_used(struct vq *q) { return *vq_used_idx(q) != q->last_used; }

/* 2.7.14: takes the next used element (polling until there is one, at
   most `spins` polls; 0 = forever). Returns 0 and fills id and len, or -1
   on timeout. */
static inline int vq_poll(struct vq *q, u32 *id, u32 *len, u64 spins) {
    for (u64 i = 0; !vq_has_used(q); i++) {
        if (spins && i >= spins) return -1;
        asm volatile("pause");
    }
    vm_mb();
    volatile u32 *e = (volatile u32 *)(q->used + 4 + (u64)(q->last_used % q->size) * 8);
    *id = e[0];
    *len = e[1];
    q->last_used++;
    return 0;
}

/* Adds a chain, notifies, and waits for it to be used; returns the used
   length, or -1 on timeout. */
static inline i64 vq_run(struct vq *q, const struct vbuf *b, int n) {
    u16 head = vq_add(q, b, n);
    vq_kick(q);
    u32 id, len;
    if (vq_poll(q, &id, &len, 2000000000ul)) return -1;
    if (id != head) return -2;
    return len;
}

/* --- virtio-blk (5.2) --- */
enum { VBLK_T_IN = 0, VBLK_T_OUT = 1, VBLK_T_FLUSH = 4, VBLK_T_GET_ID = 8,
       VBLK_T_DISCARD = 11, VBLK_T_WRITE_ZEROES = 13 };
enum { VBLK_S_OK = 0, VBLK_S_IOERR = 1, VBLK_S_UNSUPP = 2 };
#define VBLK_F_RO (1ul << 5)
#define VBLK_F_FLUSH (1ul << 9)
#define VBLK_F_DISCARD (1ul << 13)
#define VBLK_F_WRITE_ZEROES (1ul << 14)

struct vblk_req { u32 type; u32 reserved; u64 sector; };

/* One block request with a data buffer (or none when len is 0); `req`
   and `status` are driver memory. Returns the status byte, or a negative
   value if the device did not complete it. */
static inline i64 vblk_rw(struct vq *q, struct vblk_req *req, u8 *status, u32 type, u64 sector,
                          u64 data, u32 len, int device_writes) {
    req->type = type;
    req->reserved = 0;
    req->sector = sector;
    *status = 0xee;
    struct vbuf b[3] = {{(u64)req, 16, 0}, {data, len, device_writes}, {(u64)status, 1, 1}};
    struct vbuf nodata[2] = {{(u64)req, 16, 0}, {(u64)status, 1, 1}};
    i64 r = len ? vq_run(q, b, 3) : vq_run(q, nodata, 2);
    if (r < 0) return r;
    return *(volatile u8 *)status;
}
#endif
