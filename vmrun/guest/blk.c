/* Drives the virtio-blk disk (a vhost-user-blk backend, fabricd): writes
 * 8 sectors of a pattern, reads them back, compares, flushes, and reports
 * on the serial console. */
#include "blkdev.h"

static u8 data[4096] __attribute__((aligned(4096)));
static u8 back[4096] __attribute__((aligned(4096)));

void _start(unsigned long cpu)
{
	(void)cpu;
	u64 capacity = blk_setup("blk");
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
