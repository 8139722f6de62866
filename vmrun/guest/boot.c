/* For the startup benchmark: prints one character at once (the harness
 * times its arrival from the runner's start), then stays alive about two
 * seconds of emulated time (the harness reads the runner's memory), then
 * powers off: vmrun's power-off port, then QEMU's isa-debug-exit at 0xf4. */
#include "guest.h"

void _start(unsigned long cpu)
{
	(void)cpu;
	outb(SERIAL, '!');
	for (volatile unsigned long i = 0; i < 400000; i++)
		__asm__ volatile("pause");
	outb(SERIAL, '\n');
	outw(POWER, SLP_EN);
	outb(0xf4, 0);
	halt();
}
