/* Runs on every vCPU (its index in rdi): each reports in on the serial
 * console, one line at a time under a lock, and halts. */
#include "guest.h"

static volatile int console_lock;

void _start(unsigned long cpu)
{
	while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
		__asm__ volatile("pause");
	put_string("vcpu ");
	put_decimal(cpu);
	put_string(" reporting in\n");
	__atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
	halt();
}
