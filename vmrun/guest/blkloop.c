/* Writes and reads back the disk for ever: round r writes 8 sectors of a
 * pattern of r at sector 64 + (r % 32) * 8, reads them back, compares,
 * and says "blkloop: round r ok". A request waits for as long as the
 * backend takes, so a backend that restarts only delays the rounds; a
 * wrong byte ends the program with MISMATCH. */
#include "blkdev.h"

static u8 data[4096] __attribute__((aligned(4096)));
static u8 back[4096] __attribute__((aligned(4096)));

void _start(unsigned long cpu)
{
	(void)cpu;
	blk_setup("blkloop");
	for (u64 round = 1;; round++) {
		u64 sector = 64 + (round % 32) * 8;
		for (int i = 0; i < 4096; i++)
			data[i] = (u8)(i * 13 + round * 7 + 1);
		if (submit_within(VIRTIO_BLK_T_OUT, sector, data, 4096, 0) != 0) {
			put_string("blkloop: write failed\n");
			power_off();
		}
		if (submit_within(VIRTIO_BLK_T_IN, sector, back, 4096, 0) != 0) {
			put_string("blkloop: read failed\n");
			power_off();
		}
		for (int i = 0; i < 4096; i++) {
			if (back[i] != data[i]) {
				put_string("blkloop: MISMATCH in round ");
				put_decimal(round);
				put_string("\n");
				power_off();
			}
		}
		put_string("blkloop: round ");
		put_decimal(round);
		put_string(" ok\n");
		/* A breath between rounds (about 50 ms here). */
		for (int i = 0; i < 50000; i++)
			__asm__ volatile("pause");
	}
}
