/* The split virtqueue layout and the virtio-mmio window the guest
 * programs drive, by polling (no interrupts). */
#ifndef FABRIC_VIRTIO_H
#define FABRIC_VIRTIO_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

/* The first virtio-mmio device's window. */
#define MMIO 0xd0000000UL
/* Entries per queue. */
#define QUEUE 8
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2

struct desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};
struct avail {
	u16 flags;
	u16 idx;
	u16 ring[QUEUE];
	u16 used_event;
};
struct used_elem {
	u32 id;
	u32 len;
};
struct used {
	u16 flags;
	u16 idx;
	struct used_elem ring[QUEUE];
	u16 avail_event;
};

static volatile u32 *reg(u32 offset)
{
	return (volatile u32 *)(MMIO + offset);
}

static void barrier(void)
{
	__asm__ volatile("mfence" : : : "memory");
}

#endif
