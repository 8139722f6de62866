/* Runs in 64-bit mode from its entry: prints a line and powers off. */
#include "guest.h"

void _start(unsigned long cpu)
{
	put_string("hello from a 64-bit guest on vCPU ");
	put_decimal(cpu);
	put_string("\n");
	power_off();
}
