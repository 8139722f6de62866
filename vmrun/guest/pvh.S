/* A PVH entry (XEN_ELFNOTE_PHYS32_ENTRY), so that runners that start a
 * guest in 32-bit protected mode (QEMU's -kernel with a PVH ELF) reach the
 * same 64-bit _start that vmrun enters directly: identity-map the first
 * GiB with 2 MiB pages, enable long mode, and call _start(0). */

	.section .note.pvh, "a", @note
	.balign 4
	.long 4			/* name size: "Xen\0" */
	.long 4			/* descriptor size */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.long pvh_start

	.section .text.pvh, "ax"
	.code32
	.global pvh_start
pvh_start:
	cli
	/* PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] -> i * 2 MiB. */
	movl $pvh_pdpt, %eax
	orl $0x3, %eax
	movl %eax, pvh_pml4
	movl $pvh_pd, %eax
	orl $0x3, %eax
	movl %eax, pvh_pdpt
	xorl %ecx, %ecx
1:	movl %ecx, %eax
	shll $21, %eax
	orl $0x83, %eax
	movl %eax, pvh_pd(, %ecx, 8)
	incl %ecx
	cmpl $512, %ecx
	jne 1b
	movl $pvh_pml4, %eax
	movl %eax, %cr3
	movl %cr4, %eax
	orl $0x20, %eax		/* PAE */
	movl %eax, %cr4
	movl $0xc0000080, %ecx	/* EFER */
	rdmsr
	orl $0x100, %eax	/* LME */
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax	/* PG | PE */
	movl %eax, %cr0
	lgdt pvh_gdt_pointer
	ljmp $0x08, $pvh_long

	.code64
pvh_long:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	movq $pvh_stack_top, %rsp
	xorl %edi, %edi
	call _start
2:	hlt
	jmp 2b

	.section .rodata.pvh, "a"
	.balign 8
pvh_gdt:
	.quad 0
	.quad 0x00af9b000000ffff	/* 64-bit code */
	.quad 0x00cf93000000ffff	/* data */
pvh_gdt_pointer:
	.word pvh_gdt_pointer - pvh_gdt - 1
	.long pvh_gdt

	.section .bss.pvh, "aw", @nobits
	.balign 4096
pvh_pml4:
	.skip 4096
pvh_pdpt:
	.skip 4096
pvh_pd:
	.skip 4096
	.skip 16384
pvh_stack_top:
