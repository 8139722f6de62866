/* What the guest programs share: port I/O, the serial console, power-off.
 * Freestanding: no libc, no SSE (built with -mgeneral-regs-only). */
#ifndef FABRIC_GUEST_H
#define FABRIC_GUEST_H

#define SERIAL 0x3f8
#define POWER 0x604
#define SLP_EN 0x2000

static inline void outb(unsigned short port, unsigned char value)
{
	__asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline void outw(unsigned short port, unsigned short value)
{
	__asm__ volatile("outw %0, %1" : : "a"(value), "Nd"(port));
}

static inline unsigned char inb(unsigned short port)
{
	unsigned char value;
	__asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static void put_char(char c)
{
	/* Wait for the transmitter holding register to be empty. */
	while (!(inb(SERIAL + 5) & 0x20))
		;
	outb(SERIAL, (unsigned char)c);
}

static void put_string(const char *s)
{
	while (*s)
		put_char(*s++);
}

static void put_decimal(unsigned long n)
{
	char digits[20];
	int i = 0;
	do {
		digits[i++] = (char)('0' + n % 10);
		n /= 10;
	} while (n);
	while (i)
		put_char(digits[--i]);
}

static __attribute__((noreturn)) void power_off(void)
{
	outw(POWER, SLP_EN);
	for (;;)
		__asm__ volatile("cli; hlt");
}

static __attribute__((noreturn)) void halt(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

#endif
