/* Benchmark guest for `vmm bench`. The host fills the mailbox at 0x200000
   before the VM starts: [0] mode, [1] count, [4] TSC ticks per second;
   results come back in [2] and [3] (TSC ticks).
   mode 1: count hypercalls (WRITE of 0 bytes), timed ([2], per call),
           then EXIT.
   mode 2: touch count pages, FORK; the child times count copy-on-write
           faults and count plain port exits, per operation ([2], [3]),
           while the parent waits, so every write really copies.
   mode 3: count times: FORK, the child writes one page and exits, WAIT.
   mode 4: touch count pages, then spin until the host stops the VM.
   mode 5: EXIT at once (time to the first guest instruction).
   mode 6: virtio-blk in slot 0: count random 4 KiB reads over the first
           [6] sectors with [5] requests in flight ([2] ticks in all).
   mode 7: virtio-blk: [5] random 4 KiB reads in flight, then spin until
           the host stops the VM.
   mode 8: virtio-net in slot 0: count UDP frames of [5] bytes (Ethernet
           header included) to 10.0.0.1:5000 ([2] ticks in all).
   mode 9: touch count pages, SWAP_OUT them ([2] ticks, [5] pages that
           went), then read them back, each read timed on its own (the
           ticks of page i as a u64 right after the area, [3] in all);
           then times plain port exits ([6], ticks per exit).
   mode 10 (two vCPUs): touch count pages, MIGRATE them ([2] ticks), then
           start vCPU 1 writing to the first [5] pages over and over while
           this vCPU MIGRATEs those pages [6] times ([3] ticks, [7] pages
           moved); vCPU 1's slowest write in ticks in [8], its writes in
           [9].
   mode 20: touch count pages, set [3] to 1, then write them over and
           over for ever, counting pages written in [2].
   mode 21: touch count pages, set [3] to 1, then spin until [5] is not
           0 (in a VM restored from a snapshot); if [6] is not 0, read the
           pages back ([2] ticks); then EXIT.
   mode 22: touch count pages ([2] ticks: first touches), then write
           every 64th byte of them 4 times over ([3] ticks); then EXIT.
   mode 23: touch count pages, FORK; the child writes one byte of every
           [5]-th page ([2]: ticks in all, through its exit code) while
           the parent waits, so the pages stay shared. */
#include "guest.h"
#include "virtio.h"
#define MB ((volatile u64 *)0x200000)
#define AREA ((volatile u8 *)0x1000000)
/* Page i of an area that may be larger than low RAM: pages that would
   fall in the hole below 4 GiB continue above it, as RAM does. */
static inline volatile u8 *area_page(u64 i) {
    u64 a = (u64)AREA + i * PAGE;
    return (volatile u8 *)(a >= 0xc0000000ul ? a + 0x40000000ul : a);
}

static inline u64 rdtsc(void) {
    u32 lo, hi;
    asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

#define RINGS 0x1800000ul
#define REQS ((struct vblk_req *)0x1900000ul)
#define STATUSES ((u8 *)0x1901000ul)
#define DATA 0x1a00000ul /* one page per request */
#define QSIZE 128

static u64 rng = 0x9e3779b97f4a7c15ul;
static u64 next_rand(void) {
    rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27;
    return rng * 0x2545f4914f6cdd1dul;
}

/* Request k always uses descriptors 3k..3k+2: completions may come in any
   order. */
static void blk_submit(struct vq *q, u16 k, u64 sectors) {
    REQS[k].type = VBLK_T_IN;
    REQS[k].reserved = 0;
    REQS[k].sector = (next_rand() % (sectors / 8)) * 8;
    u16 d = (u16)(3 * k);
    q->desc[d] = (struct vq_desc){(u64)&REQS[k], 16, VQ_DESC_F_NEXT, (u16)(d + 1)};
    q->desc[d + 1] = (struct vq_desc){DATA + (u64)k * PAGE, 4096, VQ_DESC_F_NEXT | VQ_DESC_F_WRITE, (u16)(d + 2)};
    q->desc[d + 2] = (struct vq_desc){(u64)&STATUSES[k], 1, VQ_DESC_F_WRITE, 0};
    q->avail[2 + q->avail_idx % q->size] = d;
    q->avail_idx++;
}

/* Publishes what was added and notifies unless the device said it is
   busy with the queue (VIRTQ_USED_F_NO_NOTIFY). */
static void publish(struct vq *q) {
    vm_mb();
    q->avail[1] = q->avail_idx;
    vm_mb();
    if (!(*(volatile u16 *)q->used & 1)) vm_wr(q->dev, VM_QUEUE_NOTIFY, q->index);
}

static void blk_start(struct vq *q, u64 depth, u64 sectors) {
    u64 dev = VIRTIO_SLOT(0);
    G_CHECK(vdev_begin(dev, 2, 0) & VIRTIO_F_VERSION_1, "virtio-blk features");
    G_CHECK(vq_setup(q, dev, 0, QSIZE, RINGS) == 0, "virtio-blk queue");
    G_CHECK(vdev_ready(dev) & VS_DRIVER_OK, "virtio-blk DRIVER_OK");
    for (u16 k = 0; k < depth; k++) blk_submit(q, k, sectors);
    publish(q);
}

static void blk_bench(u64 n, u64 depth, u64 sectors) {
    struct vq q;
    u64 t0 = rdtsc();
    blk_start(&q, depth, sectors);
    for (u64 done = 0; done < n;) {
        u32 id, len;
        G_CHECK(vq_poll(&q, &id, &len, 0) == 0, "virtio-blk poll");
        G_CHECK(len == 4097 && STATUSES[id / 3] == VBLK_S_OK, "virtio-blk read failed");
        done++;
        if (done + depth <= n) blk_submit(&q, (u16)(id / 3), sectors);
        if (!vq_has_used(&q)) publish(&q);
    }
    MB[2] = rdtsc() - t0;
}

static void swap_bench(u64 n) {
    volatile u64 *times = (volatile u64 *)(AREA + n * PAGE);
    for (u64 i = 0; i < n; i++) { AREA[i * PAGE] = (u8)(i + 1); times[i] = 0; }
    u64 t0 = rdtsc();
    i64 went = hc(HC_SWAP_OUT, (u64)AREA, n * PAGE, 0);
    MB[2] = rdtsc() - t0;
    G_CHECK(went >= 0, "SWAP_OUT failed");
    MB[5] = (u64)went;
    u64 sum = 0;
    t0 = rdtsc();
    for (u64 i = 0; i < n; i++) {
        u64 t = rdtsc();
        sum += AREA[i * PAGE];
        times[i] = rdtsc() - t;
    }
    MB[3] = rdtsc() - t0;
    u64 want = 0;
    for (u64 i = 0; i < n; i++) want += (u8)(i + 1);
    G_CHECK(sum == want, "pages came back from swap changed");
    t0 = rdtsc();
    for (u64 i = 0; i < 256; i++) asm volatile("outb %%al, $0x80" ::"a"(0));
    MB[6] = (rdtsc() - t0) / 256;
}

static volatile u64 ap_running, ap_stop, ap_done;
static u8 __attribute__((aligned(16))) ap_stack[16384];

/* vCPU 1 of mode 10: writes the first MB[5] pages round and round, timing
   each write, until told to stop. */
void ap_main(u64 index) {
    (void)index;
    u64 w = MB[5], slowest = 0, writes = 0;
    __atomic_store_n(&ap_running, 1, __ATOMIC_SEQ_CST);
    while (!__atomic_load_n(&ap_stop, __ATOMIC_SEQ_CST)) {
        for (u64 i = 0; i < w; i++) {
            u64 t = rdtsc();
            AREA[i * PAGE] = (u8)writes;
            t = rdtsc() - t;
            if (t > slowest) slowest = t;
            writes++;
        }
    }
    MB[8] = slowest;
    MB[9] = writes;
    __atomic_store_n(&ap_done, 1, __ATOMIC_SEQ_CST);
    for (;;) asm volatile("pause");
}
void ap_entry(void);
asm(".text\n.globl ap_entry\nap_entry:\n  call ap_main\n  ud2\n");

/* Spins until *flag is set, failing after ten seconds. */
static void await_flag(volatile u64 *flag, const char *what) {
    u64 start = rdtsc();
    while (!__atomic_load_n(flag, __ATOMIC_SEQ_CST)) {
        if (rdtsc() - start > 10 * MB[4]) { g_puts(what); g_exit(1); }
        asm volatile("pause");
    }
}

static void migrate_bench(u64 n, u64 w, u64 rounds) {
    for (u64 i = 0; i < n; i++) AREA[i * PAGE] = 1;
    u64 t0 = rdtsc();
    i64 moved = hc(HC_MIGRATE, (u64)AREA, n * PAGE, 0);
    MB[2] = rdtsc() - t0;
    G_CHECK(moved == (i64)n, "MIGRATE did not move every page");
    G_CHECK(hc(HC_VCPU_START, 1, (u64)&ap_entry, (u64)ap_stack + sizeof ap_stack) == 0,
            "VCPU_START failed");
    await_flag(&ap_running, "FAIL: vCPU 1 did not start\n");
    u64 total = 0;
    t0 = rdtsc();
    for (u64 r = 0; r < rounds; r++) {
        moved = hc(HC_MIGRATE, (u64)AREA, w * PAGE, 0);
        G_CHECK(moved >= 0, "MIGRATE failed");
        total += (u64)moved;
    }
    MB[3] = rdtsc() - t0;
    MB[7] = total;
    __atomic_store_n(&ap_stop, 1, __ATOMIC_SEQ_CST);
    await_flag(&ap_done, "FAIL: vCPU 1 did not stop\n");
}

static u16 be16(u16 v) { return (u16)((v >> 8) | (v << 8)); }

/* UDP frames of `size` bytes to 10.0.0.1:5000 from 10.0.0.2:6000. */
static void net_bench(u64 n, u64 size) {
    u64 dev = VIRTIO_SLOT(0);
    struct vq rx, tx;
    G_CHECK(vdev_begin(dev, 1, 1ul << 5) & VIRTIO_F_VERSION_1, "virtio-net features");
    G_CHECK(vq_setup(&rx, dev, 0, 16, RINGS) == 0, "rx queue");
    G_CHECK(vq_setup(&tx, dev, 1, 256, RINGS + 0x10000) == 0, "tx queue");
    G_CHECK(vdev_ready(dev) & VS_DRIVER_OK, "virtio-net DRIVER_OK");
    u8 *f = (u8 *)DATA;
    for (u64 i = 0; i < 12 + size; i++) f[i] = 0;
    u8 *e = f + 12;
    const u8 hdr[14] = {2, 0, 0, 0, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 8, 0};
    for (int i = 0; i < 14; i++) e[i] = hdr[i];
    u8 *ip = e + 14;
    u32 total = (u32)(size - 14);
    const u8 iph[20] = {0x45, 0, (u8)(total >> 8), (u8)total, 0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1};
    for (int i = 0; i < 20; i++) ip[i] = iph[i];
    u32 s = 0;
    for (int i = 0; i < 20; i += 2) s += (u32)((ip[i] << 8) | ip[i + 1]);
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    ip[10] = (u8)(~s >> 8); ip[11] = (u8)~s;
    u16 *udp = (u16 *)(ip + 20);
    udp[0] = be16(6000); udp[1] = be16(5000); udp[2] = be16((u16)(total - 20)); udp[3] = 0;
    for (u16 d = 0; d < 256; d++) tx.desc[d] = (struct vq_desc){(u64)f, (u32)(12 + size), 0, 0};
    u64 t0 = rdtsc(), sent = 0, done = 0;
    while (done < n) {
        while (sent < n && sent - done < 256) {
            tx.avail[2 + tx.avail_idx % 256] = (u16)(tx.avail_idx % 256);
            tx.avail_idx++;
            sent++;
        }
        publish(&tx);
        while (done < sent && (vq_has_used(&tx) || sent - done == 256)) {
            u32 id, len;
            vq_poll(&tx, &id, &len, 0);
            done++;
        }
    }
    MB[2] = rdtsc() - t0;
}

void gmain(u64 ram) {
    (void)ram;
    u64 mode = MB[0], n = MB[1];
    if (mode == 6) { blk_bench(n, MB[5], MB[6]); g_exit(0); }
    if (mode == 7) {
        struct vq q;
        blk_start(&q, MB[5], MB[6]);
        for (;;) asm volatile("pause");
    }
    if (mode == 8) { net_bench(n, MB[5]); g_exit(0); }
    if (mode == 9) { swap_bench(n); g_exit(0); }
    if (mode == 10) { migrate_bench(n, MB[5], MB[6]); g_exit(0); }
    if (mode == 5) g_exit(0);
    if (mode == 20) {
        for (u64 i = 0; i < n; i++) AREA[i * PAGE] = 1;
        MB[3] = 1;
        for (u8 gen = 2;; gen++)
            for (u64 i = 0; i < n; i++) {
                AREA[i * PAGE] = gen;
                MB[2]++;
            }
    }
    if (mode == 21) {
        for (u64 i = 0; i < n; i++) AREA[i * PAGE] = 1;
        MB[3] = 1;
        while (!MB[5]) asm volatile("pause");
        if (MB[6]) {
            u64 t0 = rdtsc(), sum = 0;
            for (u64 i = 0; i < n; i++) sum += AREA[i * PAGE];
            MB[2] = rdtsc() - t0;
            G_CHECK(sum == n, "restored pages read back wrong");
        }
        g_exit(0);
    }
    if (mode == 22) {
        u64 t0 = rdtsc();
        for (u64 i = 0; i < n; i++) AREA[i * PAGE] = 1;
        u64 t1 = rdtsc();
        for (u64 pass = 0; pass < 4; pass++)
            for (u64 off = 0; off < n * PAGE; off += 64)
                *(volatile u64 *)(AREA + off) = off + pass;
        MB[2] = t1 - t0;
        MB[3] = rdtsc() - t1;
        g_exit(0);
    }
    if (mode == 1) {
        static char none;
        u64 t0 = rdtsc();
        for (u64 i = 0; i < n; i++) hc(HC_WRITE, (u64)&none, 0, 0);
        MB[2] = (rdtsc() - t0) / n;
        g_exit(0);
    }
    if (mode == 2 || mode == 4) {
        for (u64 i = 0; i < n; i++) *area_page(i) = 1;
    }
    if (mode == 4) for (;;) asm volatile("pause");
    if (mode == 2) {
        /* The child measures while the parent waits (no CPU used), so the
           pages stay shared and every child write copies. The child's
           exit code carries its per-operation averages, in ticks. */
        i64 c = hc(HC_FORK, 0, 0, 0);
        if (c == 0) {
            u64 t0 = rdtsc();
            for (u64 i = 0; i < n; i++) *area_page(i) = 2;
            u64 t1 = rdtsc();
            for (u64 i = 0; i < n; i++) asm volatile("outb %%al, $0x80" ::"a"(0));
            u64 t2 = rdtsc();
            g_exit((((t1 - t0) / n) << 32) | ((t2 - t1) / n));
        }
        G_CHECK(c > 0, "FORK failed");
        u64 st = (u64)hc(HC_WAIT, (u64)c, 0, 0);
        MB[2] = st >> 32;
        MB[3] = st & 0xffffffff;
        g_exit(0);
    }
    if (mode == 23) {
        for (u64 i = 0; i < n; i++) *area_page(i) = 1;
        u64 stride = MB[5];
        i64 c = hc(HC_FORK, 0, 0, 0);
        if (c == 0) {
            u64 t0 = rdtsc();
            for (u64 i = 0; i < n; i += stride) *area_page(i) = 2;
            g_exit(rdtsc() - t0);
        }
        G_CHECK(c > 0, "FORK failed");
        MB[2] = (u64)hc(HC_WAIT, (u64)c, 0, 0);
        g_exit(0);
    }
    if (mode == 3) {
        for (u64 i = 0; i < n; i++) {
            i64 c = hc(HC_FORK, 0, 0, 0);
            if (c == 0) { MB[8] = i; g_exit(0); }
            G_CHECK(c > 0, "FORK failed");
            G_CHECK(hc(HC_WAIT, (u64)c, 0, 0) == 0, "WAIT failed");
        }
        g_exit(0);
    }
    g_exit(99);
}
