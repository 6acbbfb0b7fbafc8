/* virtio-vsock end to end with the Unix-socket host side (guest cid 3):
   A. the host connects to the socket and asks for guest port 1234; the
      guest accepts, reads "hello" and answers "HELLO";
   B. the guest connects to host port 4321 (the host's socket PATH_4321),
      sends "from-guest", reads "ack", shuts the connection down and gets
      the device's RST. */
#include "test.h"
#include "virtio.h"

#define RINGS_RX 0x1000000ul
#define RINGS_TX 0x1010000ul
#define RINGS_EV 0x1020000ul
#define RXBUF 0x1100000ul /* 8 buffers of 4 KiB */
#define TXBUF ((u8 *)0x1200000ul)
#define NRX 8
#define RXLEN 4096u
#define HDR 44

enum { OP_REQUEST = 1, OP_RESPONSE = 2, OP_RST = 3, OP_SHUTDOWN = 4, OP_RW = 5,
       OP_CREDIT_UPDATE = 6, OP_CREDIT_REQUEST = 7 };

struct vs_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

static struct vq rx, tx;
/* Payload bytes consumed, per connection (by guest port). */
static u32 fwd_a, fwd_b;
static u32 *fwd(u32 port) { return port == 1234 ? &fwd_a : &fwd_b; }

static void post(u64 addr) {
    struct vbuf b = {addr, RXLEN, 1};
    vq_add(&rx, &b, 1);
    vq_kick(&rx);
}

static void send(u16 op, u32 src, u32 dst, u32 flags, const char *data) {
    struct vs_hdr *h = (struct vs_hdr *)TXBUF;
    u32 len = data ? (u32)g_strlen(data) : 0;
    h->src_cid = 3; h->dst_cid = 2; h->src_port = src; h->dst_port = dst;
    h->len = len; h->type = 1; h->op = op; h->flags = flags;
    h->buf_alloc = 65536; h->fwd_cnt = *fwd(src);
    for (u32 i = 0; i < len; i++) TXBUF[HDR + i] = (u8)data[i];
    struct vbuf b[2] = {{(u64)TXBUF, HDR, 0}, {(u64)TXBUF + HDR, len, 0}};
    T_EQ(vq_run(&tx, b, len ? 2 : 1), 0, "packet sent");
}

/* Receives packets until one with operation `op` for guest port `port`
   arrives; copies its header and payload (NUL-terminated) out. */
static void expect(u16 op, u32 port, struct vs_hdr *out, char *data) {
    for (int n = 0; n < 32; n++) {
        u32 id, len;
        T_EQ(vq_poll(&rx, &id, &len, 2000000000ul), 0, "a packet arrives");
        T_TRUE(id < 16 && len >= HDR && len <= RXLEN, "used element in range");
        u64 addr = rx.desc[id].addr;
        struct vs_hdr h = *(volatile struct vs_hdr *)addr;
        T_EQ(h.src_cid, 2, "from the host");
        T_EQ(h.dst_cid, 3, "to this guest");
        T_EQ(len, HDR + h.len, "used length");
        if (h.op == op && h.dst_port == port) {
            *out = h;
            for (u32 i = 0; i < h.len && data; i++) data[i] = *(volatile char *)(addr + HDR + i);
            if (data) data[h.len] = 0;
            if (h.op == OP_RW) *fwd(port) += h.len;
            post(addr);
            return;
        }
        post(addr);
    }
    t_fail("expected packet never came", op, port);
}

static int same(const char *a, const char *b) {
    while (*a && *a == *b) { a++; b++; }
    return *a == *b;
}

void gmain(u64 ram) {
    (void)ram;
    u64 dev = VIRTIO_SLOT(0);
    T_TRUE(vdev_begin(dev, 19, 0) & VIRTIO_F_VERSION_1, "features");
    T_EQ(vq_setup(&rx, dev, 0, 16, RINGS_RX), 0, "rx queue");
    T_EQ(vq_setup(&tx, dev, 1, 16, RINGS_TX), 0, "tx queue");
    struct vq ev;
    T_EQ(vq_setup(&ev, dev, 2, 16, RINGS_EV), 0, "event queue");
    T_EQ(vdev_ready(dev) & (VS_DRIVER_OK | VS_NEEDS_RESET), VS_DRIVER_OK, "driver ok");
    T_EQ(vm_cfg64(dev, 0), 3, "guest cid");
    for (int i = 0; i < NRX; i++) post(RXBUF + (u64)i * RXLEN);

    struct vs_hdr h;
    static char data[RXLEN];
    /* A: host to guest. */
    expect(OP_REQUEST, 1234, &h, 0);
    u32 hp = h.src_port;
    send(OP_RESPONSE, 1234, hp, 0, 0);
    expect(OP_RW, 1234, &h, data);
    T_TRUE(same(data, "hello"), "host data");
    send(OP_RW, 1234, hp, 0, "HELLO");

    /* B: guest to host. */
    send(OP_REQUEST, 5000, 4321, 0, 0);
    expect(OP_RESPONSE, 5000, &h, 0);
    T_EQ(h.src_port, 4321, "response from the host port");
    send(OP_RW, 5000, 4321, 0, "from-guest");
    expect(OP_RW, 5000, &h, data);
    T_TRUE(same(data, "ack"), "host answer");
    send(OP_SHUTDOWN, 5000, 4321, 3, 0);
    expect(OP_RST, 5000, &h, 0);
    g_puts("VIRTIO-VSOCK-OK\n");
    g_exit(0);
}
