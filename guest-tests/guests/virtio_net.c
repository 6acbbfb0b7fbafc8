/* virtio-net end to end through a TAP device the test set up in its own
   network namespace: the TAP is 10.0.0.1 with MAC 02:00:00:00:00:01, the
   guest is 10.0.0.2 with the device's MAC. The guest sends a UDP datagram
   that asks for a checksum offload it did not negotiate (the device must
   drop it), then "ping" to 10.0.0.1:5000; the host answers "pong" to
   10.0.0.2:6000, which arrives in one of the posted receive buffers. */
#include "test.h"
#include "virtio.h"

#define RINGS_RX 0x1000000ul
#define RINGS_TX 0x1010000ul
#define RXBUF 0x1100000ul /* 8 buffers of 2 KiB */
#define TXBUF ((u8 *)0x1200000ul)
#define NRX 8
#define RXLEN 2048u
#define NET_F_MAC (1ul << 5)

static u8 mac[6];
static const u8 host_mac[6] = {2, 0, 0, 0, 0, 1};

static u16 be16(u16 v) { return (u16)((v >> 8) | (v << 8)); }

static u16 ip_csum(const u8 *p, int n) {
    u32 s = 0;
    for (int i = 0; i < n; i += 2) s += (u32)((p[i] << 8) | p[i + 1]);
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    return (u16)~s;
}

/* A UDP datagram 10.0.0.2:6000 -> 10.0.0.1:5000 after a 12-byte virtio-net
   header; returns the length with the header. */
static u32 udp_frame(u8 *f, const char *payload, u8 hdr_flags) {
    for (int i = 0; i < 12; i++) f[i] = 0;
    f[0] = hdr_flags;
    u8 *e = f + 12;
    for (int i = 0; i < 6; i++) { e[i] = host_mac[i]; e[6 + i] = mac[i]; }
    e[12] = 0x08; e[13] = 0x00;
    u8 *ip = e + 14;
    u32 plen = (u32)g_strlen(payload);
    u32 total = 20 + 8 + plen;
    const u8 hdr[20] = {0x45, 0, (u8)(total >> 8), (u8)total, 0, 1, 0, 0, 64, 17, 0, 0,
                        10, 0, 0, 2, 10, 0, 0, 1};
    for (int i = 0; i < 20; i++) ip[i] = hdr[i];
    u16 c = ip_csum(ip, 20);
    ip[10] = (u8)(c >> 8); ip[11] = (u8)c;
    u8 *udp = ip + 20;
    *(u16 *)(udp + 0) = be16(6000);
    *(u16 *)(udp + 2) = be16(5000);
    *(u16 *)(udp + 4) = be16((u16)(8 + plen));
    *(u16 *)(udp + 6) = 0;
    for (u32 i = 0; i < plen; i++) udp[8 + i] = (u8)payload[i];
    return 12 + 14 + total;
}

static void post(struct vq *rx, int i) {
    struct vbuf b = {RXBUF + (u64)i * RXLEN, RXLEN, 1};
    vq_add(rx, &b, 1);
}

/* Whether a received frame is UDP to port 6000 carrying "pong". */
static int is_pong(const u8 *f, u32 len) {
    if (len < 12 + 14 + 20 + 8 + 4) return 0;
    const u8 *e = f + 12, *ip = e + 14, *udp = ip + 20;
    if (e[12] != 0x08 || e[13] != 0x00 || ip[9] != 17) return 0;
    if (be16(*(const u16 *)(udp + 2)) != 6000) return 0;
    return udp[8] == 'p' && udp[9] == 'o' && udp[10] == 'n' && udp[11] == 'g';
}

void gmain(u64 ram) {
    (void)ram;
    u64 dev = VIRTIO_SLOT(0);
    u64 f = vdev_begin(dev, 1, NET_F_MAC);
    T_TRUE(f & NET_F_MAC, "MAC negotiated, no offloads");
    struct vq rx, tx;
    T_EQ(vq_setup(&rx, dev, 0, 16, RINGS_RX), 0, "rx queue");
    T_EQ(vq_setup(&tx, dev, 1, 16, RINGS_TX), 0, "tx queue");
    T_EQ(vdev_ready(dev) & (VS_DRIVER_OK | VS_NEEDS_RESET), VS_DRIVER_OK, "driver ok");
    for (int i = 0; i < 6; i++) mac[i] = vm_cfg8(dev, (u32)i);
    for (int i = 0; i < NRX; i++) post(&rx, i);
    vq_kick(&rx);

    u32 n = udp_frame(TXBUF, "bad", 1 /* NEEDS_CSUM without VIRTIO_NET_F_CSUM */);
    struct vbuf bad = {(u64)TXBUF, n, 0};
    T_EQ(vq_run(&tx, &bad, 1), 0, "transmit (dropped)");
    n = udp_frame(TXBUF, "ping", 0);
    struct vbuf hdr_and_frame[2] = {{(u64)TXBUF, 12, 0}, {(u64)TXBUF + 12, n - 12, 0}};
    T_EQ(vq_run(&tx, hdr_and_frame, 2), 0, "transmit");

    for (int seen = 0; seen < 64; seen++) {
        u32 id, len;
        T_EQ(vq_poll(&rx, &id, &len, 2000000000ul), 0, "a frame arrives");
        T_TRUE(id < 16 && len <= RXLEN, "used element in range");
        const u8 *frame = (const u8 *)rx.desc[id].addr;
        u64 slot = ((u64)frame - RXBUF) / RXLEN;
        T_EQ(*(const u16 *)(frame + 10), 1, "num_buffers");
        if (is_pong(frame, len)) {
            g_puts("VIRTIO-NET-OK\n");
            g_exit(0);
        }
        post(&rx, (int)slot);
        vq_kick(&rx);
    }
    t_fail("no pong among 64 frames", 0, 1);
}
