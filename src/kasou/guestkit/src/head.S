/*
 * head.S - entry points of the kasou test guest, interrupt stubs, the ring-3
 * entry and the application-processor trampoline.
 *
 * Two ways in, one way on:
 *
 *   linux64_entry  e_entry of the ELF. Linux's 64-bit boot protocol
 *                  (Documentation/arch/x86/boot.rst): long mode, paging on
 *                  with an identity map, interrupts off, RSI = boot_params.
 *   mb_entry32     entry_addr of the Multiboot header (Multiboot 0.6.96
 *                  section 3.2): 32-bit protected mode, paging off,
 *                  EAX = 0x2BADB002, EBX = multiboot information.
 *
 * The 32-bit entry builds a 1 GiB identity map and switches to long mode
 * (SDM vol. 3A 9.8.5, "Initializing IA-32e Mode"). Both paths clear .bss,
 * take the BSP stack and call kmain(boot, arg0, arg1) in kernel.c, which
 * builds the guest's own GDT, IDT, TSS and page tables.
 *
 * Code for each processor mode lives in its own section (.text16, .text32,
 * .text) so that build.py can disassemble each in the right mode when it
 * checks for instructions the PVM emulator refuses. The 64-bit code comes
 * last in this file: gas fills every alignment gap with nops of the mode
 * the file ends in, and 16-bit nops in 64-bit code decode as garbage.
 */
#include "guest.h"

/* ------------------------------------------------------------------------
 * Multiboot header. Kept in its own allocated, non-executable section that
 * the linker script puts first in the loadable segment, inside the first
 * 8192 bytes of the file (Multiboot 0.6.96 section 3.1.1). With flag bit 16
 * the loader copies the file from load_addr to load_end_addr and zeroes up
 * to bss_end_addr; the linker script keeps the file layout equal to the
 * memory layout so that gives the same image as loading the ELF segment.
 */
	.section .multiboot, "a"
	.balign 4
mb_header:
	.long MB_HEADER_MAGIC
	.long MB_HEADER_FLAGS
	.long -(MB_HEADER_MAGIC + MB_HEADER_FLAGS)
	.long mb_header		/* header_addr */
	.long __image_start	/* load_addr */
	.long __load_end	/* load_end_addr */
	.long __image_end	/* bss_end_addr */
	.long mb_entry32	/* entry_addr */

/* ------------------------------------------------------------------------
 * Boot GDT: flat 64-bit code, flat data, flat 32-bit code. In .data because
 * the CPU sets the accessed bit of a descriptor when it loads it.
 */
	.section .data
	.balign 16
	.globl boot_gdt, boot_gdt_end
boot_gdt:
	.quad 0
	.quad 0x00af9a000000ffff	/* BOOT_CS64: L=1, DPL 0, execute/read */
	.quad 0x00cf92000000ffff	/* BOOT_DS: 4 GiB, read/write, B=1 */
	.quad 0x00cf9a000000ffff	/* BOOT_CS32: 4 GiB, D=1, execute/read */
boot_gdt_end:
	.balign 8
	/* A pseudo-descriptor with an 8-byte base; 32-bit lgdt reads 6 bytes. */
boot_gdtr:
	.word boot_gdt_end - boot_gdt - 1
	.quad boot_gdt

/* ------------------------------------------------------------------------
 * AP trampoline: real-mode code, copied to AP_TRAMPOLINE by the BSP before
 * it sends INIT-SIPI-SIPI (Intel MP spec 1.4 appendix B.4). A SIPI with
 * vector AP_TRAMPOLINE >> 12 starts the AP at CS = AP_TRAMPOLINE >> 4,
 * IP = 0. The BSP writes the boot GDT's pseudo-descriptor at
 * AP_TRAMPOLINE_GDTR, so this code holds no data.
 */
	.section .text16, "ax"
	.code16
	.globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
	cli
	cld
	mov	%cs, %ax
	mov	%ax, %ds
	lgdtl	(AP_TRAMPOLINE_GDTR - AP_TRAMPOLINE)
	mov	%cr0, %eax
	or	$CR0_PE, %eax
	mov	%eax, %cr0
	ljmpl	$BOOT_CS32, $ap_entry32
ap_tramp_end:

/* ------------------------------------------------------------------------
 * 32-bit code: the Multiboot entry, the APs' protected-mode step, and the
 * switch to long mode both share.
 */
	.section .text32, "ax"
	.code32
	.globl mb_entry32
mb_entry32:
	cli
	cld
	mov	%eax, %ebp		/* Multiboot magic */
	mov	%ebx, %esi		/* Multiboot information */
	lgdt	boot_gdtr
	ljmp	$BOOT_CS32, $1f
1:	mov	$BOOT_DS, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	%eax, %fs
	mov	%eax, %gs

	/* Multiboot zeroes .bss already; clearing it here keeps both entries
	 * alike (the boot page tables below live in .bss). */
	mov	$__bss_start, %edi
	mov	$__bss_end, %ecx
	sub	%edi, %ecx
	shr	$2, %ecx
	xor	%eax, %eax
	rep stosl

	/* 1 GiB identity map with 2 MiB pages: enough to reach kmain, which
	 * builds the real tables. P | RW, and PS on the leaves. */
	mov	$boot_pdpt, %eax
	or	$0x3, %eax
	mov	%eax, boot_pml4
	mov	$boot_pd, %eax
	or	$0x3, %eax
	mov	%eax, boot_pdpt
	xor	%ecx, %ecx
2:	mov	%ecx, %eax
	shl	$21, %eax
	or	$0x83, %eax
	mov	%eax, boot_pd(,%ecx,8)
	inc	%ecx
	cmp	$512, %ecx
	jne	2b

	mov	$boot_pml4, %eax
	mov	$mb_entry64, %ebx
	jmp	long_mode

	/* The APs arrive here from the trampoline, in protected mode. */
	.globl ap_entry32
ap_entry32:
	mov	$BOOT_DS, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	%eax, %fs
	mov	%eax, %gs
	mov	ap_cr3, %eax
	mov	$ap_entry64, %ebx
	jmp	long_mode

	/* Enters long mode with CR3 = %eax and continues at %ebx (below 4 GiB).
	 * SDM vol. 3A 9.8.5: PAE on, CR3, EFER.LME, then paging on. Keeps %esi
	 * and %ebp. */
long_mode:
	mov	%eax, %cr3
	mov	%cr4, %eax
	or	$CR4_PAE, %eax
	mov	%eax, %cr4
	mov	$MSR_EFER, %ecx
	rdmsr
	or	$EFER_LME, %eax
	wrmsr
	mov	%cr0, %eax
	or	$(CR0_PG | CR0_PE), %eax
	mov	%eax, %cr0
	ljmp	$BOOT_CS64, $long_mode64

/* ------------------------------------------------------------------------
 * 64-bit code.
 */
	.section .text
	.code64
long_mode64:
	mov	$BOOT_DS, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	%eax, %fs
	mov	%eax, %gs
	/* The upper halves of the registers are undefined after the switch
	 * (SDM vol. 3A 9.8.5.4): 32-bit moves zero them. */
	mov	%ebx, %ebx
	jmp	*%rbx

mb_entry64:
	mov	$bsp_stack_top, %esp
	mov	%esi, %edx		/* arg1: Multiboot information */
	mov	%ebp, %esi		/* arg0: Multiboot magic */
	mov	$BOOT_MULTIBOOT, %edi
	call	kmain
	jmp	park

	.globl linux64_entry
linux64_entry:
	cli
	cld
	mov	%rsi, %r12		/* struct boot_params */
	mov	$__bss_start, %edi
	mov	$__bss_end, %ecx
	sub	%edi, %ecx
	shr	$3, %ecx
	xor	%eax, %eax
	rep stosq
	mov	$bsp_stack_top, %esp
	mov	$BOOT_LINUX, %edi
	mov	%r12, %rsi
	xor	%edx, %edx
	call	kmain
	jmp	park

	/* Each AP takes the next stack slot; one past the last slot parks. */
ap_entry64:
	mov	$1, %eax
	lock xadd %eax, ap_next_slot
	cmp	$(MAX_CPUS - 1), %eax
	jae	park
	mov	%eax, %edi		/* arg0: slot */
	inc	%eax
	shl	$AP_STACK_SHIFT, %rax
	add	$ap_stacks, %rax
	mov	%rax, %rsp
	call	ap_main
park:
	cli
	hlt
	jmp	park

/*
 * void enter_user(uint64_t rip, uint64_t rsp, uint64_t rflags, uint64_t arg)
 * Drops to ring 3 at rip with the given stack and flags; arg goes in RDI.
 * iretq to an outer privilege level pops SS:RSP too (SDM vol. 3A 6.14.3).
 */
	.globl enter_user
enter_user:
	push	$USER_DS
	push	%rsi
	push	%rdx
	push	$USER_CS
	push	%rdi
	mov	%rcx, %rdi
	mov	$USER_DS, %eax
	mov	%eax, %ds
	mov	%eax, %es
	iretq

/*
 * Interrupt and exception stubs, one per vector, 16 bytes apart from
 * isr_stubs. Vectors where the CPU pushes an error code (SDM vol. 3A 6.15:
 * 8, 10-14, 17, 21, 29, 30) skip the dummy push, so every frame looks the
 * same to isr_common.
 */
	.macro ISR vec
	.balign 16
	.if (\vec == 8) || ((\vec >= 10) && (\vec <= 14)) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
	.else
	push	$0
	.endif
	push	$\vec
	jmp	isr_common
	.endm

	.balign 16
	.globl isr_stubs
isr_stubs:
	.altmacro
	.set vec, 0
	.rept 256
	ISR %vec
	.set vec, vec + 1
	.endr
	.noaltmacro

	/* Saves the general registers as struct trapframe (guest.h), calls
	 * trap(), restores and returns. The CPU aligned RSP to 16 before its
	 * pushes; 7 + 15 quadwords keep it aligned for the call. */
isr_common:
	push	%rax
	push	%rbx
	push	%rcx
	push	%rdx
	push	%rsi
	push	%rdi
	push	%rbp
	push	%r8
	push	%r9
	push	%r10
	push	%r11
	push	%r12
	push	%r13
	push	%r14
	push	%r15
	cld
	mov	%rsp, %rdi
	call	trap
	pop	%r15
	pop	%r14
	pop	%r13
	pop	%r12
	pop	%r11
	pop	%r10
	pop	%r9
	pop	%r8
	pop	%rbp
	pop	%rdi
	pop	%rsi
	pop	%rdx
	pop	%rcx
	pop	%rbx
	pop	%rax
	add	$16, %rsp
	iretq

/* ------------------------------------------------------------------------
 * Boot page tables (.bss, cleared by the entries) and stacks (.stack, never
 * cleared: the entries run on them).
 */
	.section .bss
	.balign 4096
boot_pml4:
	.skip 4096
boot_pdpt:
	.skip 4096
boot_pd:
	.skip 4096

	.balign 4
	.globl ap_cr3, ap_next_slot
ap_cr3:
	.skip 4
ap_next_slot:
	.skip 4

	.section .stack, "aw", @nobits
	.balign 4096
	.skip 16384
bsp_stack_top:
	.skip 16384
	.globl trap_stack_top
trap_stack_top:			/* TSS.RSP0: traps and interrupts from ring 3 */
	.skip 16384
	.globl user_stack_top
user_stack_top:
	.balign 4096
ap_stacks:
	.skip (MAX_CPUS - 1) << AP_STACK_SHIFT

	.section .note.GNU-stack, "", @progbits
