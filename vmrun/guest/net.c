/* Two guests on one switch segment, each running this program on the
 * virtio-net NIC at the first virtio-mmio window (0xd0000000), by polling.
 * The guest whose MAC ends in 0x0a pings: it sends a "ping" frame to
 * 52:54:00:00:00:0b until a "pong" comes back. The other answers the first
 * ping with a pong to the sender. Frames use the local experimental
 * EtherType 0x88b5. */
#include "guest.h"
#include "virtio.h"

#define RX 0
#define TX 1
#define NET_HDR 12
#define BUFFER 2048

struct queue {
	struct desc descs[QUEUE] __attribute__((aligned(16)));
	struct avail avail __attribute__((aligned(2)));
	struct used used __attribute__((aligned(4)));
	u16 seen;
};

static struct queue queues[2];
static u8 rx_buffers[QUEUE][BUFFER] __attribute__((aligned(4096)));
static u8 tx_buffer[NET_HDR + 64] __attribute__((aligned(64)));
static u8 mac[6];
static const u8 peer[6] = {0x52, 0x54, 0, 0, 0, 0x0b};

static void setup_queue(u32 index)
{
	struct queue *q = &queues[index];
	*reg(0x030) = index;
	*reg(0x038) = QUEUE;
	*reg(0x080) = (u32)(u64)q->descs;
	*reg(0x084) = (u32)((u64)q->descs >> 32);
	*reg(0x090) = (u32)(u64)&q->avail;
	*reg(0x094) = (u32)((u64)&q->avail >> 32);
	*reg(0x0a0) = (u32)(u64)&q->used;
	*reg(0x0a4) = (u32)((u64)&q->used >> 32);
	*reg(0x044) = 1;
}

static void offer(u32 index, u16 head)
{
	struct queue *q = &queues[index];
	q->avail.ring[q->avail.idx % QUEUE] = head;
	barrier();
	q->avail.idx++;
	barrier();
	*reg(0x050) = index;
}

static void send(const u8 *to, const char *text)
{
	u8 *frame = tx_buffer + NET_HDR;
	for (int i = 0; i < NET_HDR + 64; i++)
		tx_buffer[i] = 0;
	for (int i = 0; i < 6; i++) {
		frame[i] = to[i];
		frame[6 + i] = mac[i];
	}
	frame[12] = 0x88;
	frame[13] = 0xb5;
	for (int i = 0; text[i]; i++)
		frame[14 + i] = (u8)text[i];
	struct queue *q = &queues[TX];
	q->descs[0].addr = (u64)tx_buffer;
	q->descs[0].len = NET_HDR + 60;
	q->descs[0].flags = 0;
	offer(TX, 0);
	while (*(volatile u16 *)&q->used.idx == q->seen)
		__asm__ volatile("pause");
	q->seen = q->used.idx;
}

/* Polls the receive queue up to `spins` times; returns the frame, if one
 * with our EtherType came, and gives its buffer back. */
static u8 *receive(unsigned long spins, u8 *copy)
{
	struct queue *q = &queues[RX];
	while (spins--) {
		if (*(volatile u16 *)&q->used.idx == q->seen) {
			__asm__ volatile("pause");
			continue;
		}
		barrier();
		struct used_elem e = q->used.ring[q->seen % QUEUE];
		q->seen++;
		u8 *frame = rx_buffers[e.id] + NET_HDR;
		int ours = e.len >= NET_HDR + 20 && frame[12] == 0x88 && frame[13] == 0xb5;
		for (int i = 0; i < 20; i++)
			copy[i] = frame[i];
		offer(RX, (u16)e.id);
		if (ours)
			return copy;
	}
	return 0;
}

static int same(const u8 *a, const char *b)
{
	for (int i = 0; b[i]; i++)
		if (a[i] != (u8)b[i])
			return 0;
	return 1;
}

static void put_mac(const u8 *m)
{
	const char *hex = "0123456789abcdef";
	for (int i = 0; i < 6; i++) {
		put_char(hex[m[i] >> 4]);
		put_char(hex[m[i] & 15]);
		if (i < 5)
			put_char(':');
	}
}

void _start(unsigned long cpu)
{
	(void)cpu;
	u8 copy[20];
	if (*reg(0x000) != 0x74726976 || *reg(0x008) != 1) {
		put_string("net: no virtio-net device at 0xd0000000\n");
		power_off();
	}
	*reg(0x070) = 0;
	*reg(0x070) = 1 | 2;
	*reg(0x024) = 1;
	*reg(0x020) = 1; /* VERSION_1 */
	*reg(0x070) = 1 | 2 | 8;
	for (int i = 0; i < 6; i++)
		mac[i] = *(volatile u8 *)(MMIO + 0x100 + i);
	setup_queue(RX);
	setup_queue(TX);
	*reg(0x070) = 1 | 2 | 8 | 4;
	if (*reg(0x070) & 0x40) {
		put_string("net: the device needs a reset\n");
		power_off();
	}
	for (u16 i = 0; i < QUEUE; i++) {
		queues[RX].descs[i].addr = (u64)rx_buffers[i];
		queues[RX].descs[i].len = BUFFER;
		queues[RX].descs[i].flags = DESC_F_WRITE;
		offer(RX, i);
	}
	put_string("net: up as ");
	put_mac(mac);
	put_string("\n");

	if (mac[5] == 0x0a) {
		for (int attempt = 0; attempt < 120; attempt++) {
			send(peer, "ping");
			u8 *frame = receive(300000, copy);
			if (frame && same(frame + 14, "pong")) {
				put_string("net: pong from ");
				put_mac(frame + 6);
				put_string("\n");
				power_off();
			}
		}
		put_string("net: no pong\n");
		power_off();
	}
	for (;;) {
		u8 *frame = receive(1UL << 40, copy);
		if (frame && same(frame + 14, "ping")) {
			send(frame + 6, "pong");
			put_string("net: answered a ping from ");
			put_mac(frame + 6);
			put_string("\n");
			power_off();
		}
	}
}
