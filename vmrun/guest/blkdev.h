/* A virtio-blk disk at the first virtio-mmio window (0xd0000000), driven
 * by polling: blk_setup() negotiates VERSION_1 and sets up one 8-entry
 * queue; submit() makes one request and waits for it. */
#ifndef FABRIC_BLKDEV_H
#define FABRIC_BLKDEV_H
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
static volatile u8 status;

/* One request: header, optional data, status; waits for the device, at
 * most about `spins_max` polls (0: for ever). -1 if it never came. */
static int submit_within(u32 type, u64 sector, u8 *buffer, u32 bytes,
			 unsigned long spins_max)
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
		if (++spins == spins_max)
			return -1;
		__asm__ volatile("pause");
	}
	barrier();
	return status;
}

static int submit(u32 type, u64 sector, u8 *buffer, u32 bytes)
{
	return submit_within(type, sector, buffer, bytes, 20000000UL);
}

/* Starts the device; returns its capacity in sectors. `who` prefixes the
 * messages. Powers off if the device is not usable. */
static u64 blk_setup(const char *who)
{
	if (*reg(0x000) != 0x74726976 || *reg(0x004) != 2 || *reg(0x008) != 2) {
		put_string(who);
		put_string(": no virtio-blk device at 0xd0000000\n");
		power_off();
	}
	*reg(0x070) = 0;
	*reg(0x070) = 1 | 2; /* ACKNOWLEDGE | DRIVER */
	*reg(0x014) = 1;     /* DeviceFeaturesSel: high word */
	if (!(*reg(0x010) & 1)) {
		put_string(who);
		put_string(": the device does not offer VERSION_1\n");
		power_off();
	}
	*reg(0x024) = 0;
	*reg(0x020) = 0;
	*reg(0x024) = 1;
	*reg(0x020) = 1; /* VERSION_1 */
	*reg(0x070) = 1 | 2 | 8;
	if (!(*reg(0x070) & 8)) {
		put_string(who);
		put_string(": FEATURES_OK refused\n");
		power_off();
	}
	*reg(0x030) = 0;
	if (*reg(0x034) < QUEUE) {
		put_string(who);
		put_string(": queue too small\n");
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
		put_string(who);
		put_string(": the device needs a reset\n");
		power_off();
	}
	u64 capacity = *(volatile u32 *)(MMIO + 0x100) |
		       ((u64) * (volatile u32 *)(MMIO + 0x104) << 32);
	put_string(who);
	put_string(": capacity ");
	put_decimal(capacity);
	put_string(" sectors\n");
	return capacity;
}
#endif
