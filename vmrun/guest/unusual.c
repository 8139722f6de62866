/* Runs instructions an emulated KVM cannot (the runner does them there):
 * popcnt (64- and 32-bit, with ZF) and fwait, and says whether each
 * result is right. (clac/stac are not here: they fault without SMAP.) */
#include "guest.h"

static unsigned long popcnt64(unsigned long value, unsigned char *zero)
{
	unsigned long count;
	__asm__ volatile("popcnt %2, %0; setz %1" : "=r"(count), "=r"(*zero) : "r"(value) : "cc");
	return count;
}

static unsigned int popcnt32(unsigned int value, unsigned char *zero)
{
	unsigned int count;
	__asm__ volatile("popcnt %2, %0; setz %1" : "=r"(count), "=r"(*zero) : "r"(value) : "cc");
	return count;
}

void _start(unsigned long cpu)
{
	(void)cpu;
	unsigned char zero;
	int ok = 1;
	ok &= popcnt64(0xf0f0f0f0f0f0f0f0UL, &zero) == 32 && !zero;
	ok &= popcnt64(0, &zero) == 0 && zero;
	/* 32 bits: the high half of the register is not counted. */
	ok &= popcnt32(0x80000001U, &zero) == 2 && !zero;
	ok &= popcnt64(0xffffffffffffffffUL, &zero) == 64 && !zero;
	put_string(ok ? "popcnt: ok\n" : "popcnt: WRONG\n");

	__asm__ volatile("fwait");
	put_string("fwait: ok\n");
	power_off();
}
