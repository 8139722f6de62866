/* Says it is up, then asks for a reset through the reset control port
 * (0xcf9): a guest that reboots for ever. */
#include "guest.h"

void _start(unsigned long cpu)
{
	if (cpu == 0) {
		put_string("reboot: up\n");
		outb(0xcf9, 0x06);
	}
	halt();
}
