/* Drives the virtio-blk disk at the first virtio-mmio window (0xd0000000)
 * by polling: negotiates VERSION_1, sets up one 8-entry queue, writes 8
 * sectors of a pattern, reads them back, compares, flushes, and reports on
 * the serial console. The disk is a vhost-user-blk backend (fabricd). */
#include "guest.h"
#include "virtio.h"

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4

struct request {
	u32 type;
	u32 reserved;
	u64 sector;
};

static struct desc descs[QUEUE] __attribute__((aligned(16)));
static struct avail avail __attribute__((aligned(2)));
static struct used used __attribute__((aligned(4)));
static struct request header;
static u8 data[4096] __attribute__((aligned(4096)));
static u8 back[4096] __attribute__((aligned(4096)));
static volatile u8 status;

/* One request: header, optional data, status; waits for the device. */
static int submit(u32 type, u64 sector, u8 *buffer, u32 bytes)
{
	header.type = type;
	header.reserved = 0;
	header.sector = sector;
	status = 0xff;
	int n = 0;
	descs[n].addr = (u64)&header;
	descs[n].len = sizeof(header);
	descs[n].flags = DESC_F_NEXT;
	descs[n].next = 1;
	n++;
	if (bytes) {
		descs[n].addr = (u64)buffer;
		descs[n].len = bytes;
		descs[n].flags = DESC_F_NEXT | (type == VIRTIO_BLK_T_IN ? DESC_F_WRITE : 0);
		descs[n].next = 2;
		n++;
	}
	descs[n].addr = (u64)&status;
	descs[n].len = 1;
	descs[n].flags = DESC_F_WRITE;
	descs[n].next = 0;
	u16 seen = used.idx;
	avail.ring[avail.idx % QUEUE] = 0;
	barrier();
	avail.idx++;
	barrier();
	*reg(0x050) = 0; /* QueueNotify */
	unsigned long spins = 0;
	while (*(volatile u16 *)&used.idx == seen) {
		if (++spins > 20000000UL)
			return -1;
		__asm__ volatile("pause");
	}
	barrier();
	return status;
}

void _start(unsigned long cpu)
{
	(void)cpu;
	if (*reg(0x000) != 0x74726976 || *reg(0x004) != 2 || *reg(0x008) != 2) {
		put_string("blk: no virtio-blk device at 0xd0000000\n");
		power_off();
	}
	*reg(0x070) = 0;
	*reg(0x070) = 1 | 2; /* ACKNOWLEDGE | DRIVER */
	*reg(0x014) = 1;     /* DeviceFeaturesSel: high word */
	if (!(*reg(0x010) & 1)) {
		put_string("blk: the device does not offer VERSION_1\n");
		power_off();
	}
	*reg(0x024) = 0;
	*reg(0x020) = 0;
	*reg(0x024) = 1;
	*reg(0x020) = 1; /* VERSION_1 */
	*reg(0x070) = 1 | 2 | 8;
	if (!(*reg(0x070) & 8)) {
		put_string("blk: FEATURES_OK refused\n");
		power_off();
	}
	*reg(0x030) = 0;
	if (*reg(0x034) < QUEUE) {
		put_string("blk: queue too small\n");
		power_off();
	}
	*reg(0x038) = QUEUE;
	*reg(0x080) = (u32)(u64)descs;
	*reg(0x084) = (u32)((u64)descs >> 32);
	*reg(0x090) = (u32)(u64)&avail;
	*reg(0x094) = (u32)((u64)&avail >> 32);
	*reg(0x0a0) = (u32)(u64)&used;
	*reg(0x0a4) = (u32)((u64)&used >> 32);
	*reg(0x044) = 1;
	*reg(0x070) = 1 | 2 | 8 | 4; /* DRIVER_OK */
	if (*reg(0x070) & 0x40) {
		put_string("blk: the device needs a reset\n");
		power_off();
	}
	u64 capacity = *(volatile u32 *)(MMIO + 0x100) |
		       ((u64) * (volatile u32 *)(MMIO + 0x104) << 32);
	put_string("blk: capacity ");
	put_decimal(capacity);
	put_string(" sectors\n");

	for (int i = 0; i < 4096; i++)
		data[i] = (u8)(i * 7 + 3);
	int s = submit(VIRTIO_BLK_T_OUT, 8, data, 4096);
	if (s != 0) {
		put_string("blk: write failed, status ");
		put_decimal((u64)(s & 0xffff));
		put_string("\n");
		power_off();
	}
	s = submit(VIRTIO_BLK_T_IN, 8, back, 4096);
	if (s != 0) {
		put_string("blk: read failed\n");
		power_off();
	}
	for (int i = 0; i < 4096; i++) {
		if (back[i] != data[i]) {
			put_string("blk: MISMATCH at byte ");
			put_decimal((u64)i);
			put_string("\n");
			power_off();
		}
	}
	s = submit(VIRTIO_BLK_T_FLUSH, 0, 0, 0);
	put_string(s == 0 ? "blk: wrote, read back and flushed 8 sectors: ok\n"
			  : "blk: flush failed\n");
	/* Out of range: the device must refuse it. */
	s = submit(VIRTIO_BLK_T_IN, capacity, back, 4096);
	put_string(s != 0 ? "blk: a read past the end is refused\n"
			  : "blk: a read past the end SUCCEEDED\n");
	power_off();
}
