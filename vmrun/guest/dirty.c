/* Writes one byte into each of three pages (guest page numbers 0x600,
 * 0x605 and 0x64d, i.e. 6 MiB + 0, 5 and 77 pages), then into each of the
 * MANY (5000) pages from 0x800 (more than a vCPU's dirty ring holds,
 * 4096), and powers off: the runner's dirty log must name those pages and
 * not their neighbours. Needs 32 MiB of RAM (16 MiB with MANY 0). */
#include "guest.h"

#ifndef MANY
#define MANY 5000
#endif

void _start(unsigned long cpu)
{
	(void)cpu;
	static const unsigned long pages[] = {0x600, 0x605, 0x64d};
	for (unsigned i = 0; i < sizeof(pages) / sizeof(pages[0]); i++)
		*(volatile unsigned char *)(pages[i] << 12) = 0x5a;
	for (unsigned long page = 0x800; page < 0x800 + MANY; page++)
		*(volatile unsigned char *)(page << 12) = 0xa5;
	put_string("dirty: wrote the pages\n");
	power_off();
}
