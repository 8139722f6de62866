/* Says it is up, then runs until the runner is stopped. */
#include "guest.h"

void _start(unsigned long cpu)
{
	(void)cpu;
	put_string("spin: up\n");
	for (;;)
		__asm__ volatile("pause");
}
