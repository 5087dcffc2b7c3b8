/*
 * multiboot_hello.S - a Multiboot (v1) test kernel: it prints what its boot
 * loader handed it on COM1, then ends the VM through a debug-exit port.
 *
 * Built by kasou/guestkit/multiboot.py with `as --32` and `ld -m elf_i386`
 * (multiboot_hello.ld): one PT_LOAD at 1 MiB whose file bytes equal its memory
 * bytes. Assembled with `--defsym AOUT_KLUDGE=1` the Multiboot header carries
 * the address fields (Multiboot 0.6.96 section 3.1.3, flag 16); without it the
 * loader must read the ELF program headers.
 *
 * Entered as section 3.2 says: 32-bit protected mode, paging off, flat
 * segments, EAX = 0x2BADB002, EBX = the Multiboot information (section 3.3).
 * It prints, one line each, '\n'-terminated:
 *
 *   hello from multiboot
 *   cmdline: <the command line>              ("cmdline: none" without flag 2)
 *   modules: <count>                         ("modules: none" without flag 3)
 *   module <i>: <string> size=0x<8 hex> bytes=<the first 16 bytes, hex>
 *                                            (" unaligned" added if mod_start
 *                                             is not on a 4 KiB page)
 *   loader: <boot_loader_name>               (only with flag 9)
 *
 * and writes the byte N of the first `exit=N` word (decimal, default 0) in
 * its command line to port 0xf4, where a debug-exit device (QEMU's
 * isa-debug-exit, kasou's --debug-exit) ends the VM with status
 * (N << 1) | 1. Without EAX = 0x2BADB002 it prints "fail: bad magic 0x..."
 * and writes 0x7f. Then it halts with interrupts off.
 *
 * Every byte goes out through COM1's THR after LSR bit 5 (THR empty) reads 1.
 * Only plain integer instructions: no SSE, no int, nothing PVM's emulator
 * refuses (shared/ENVIRONMENT.md).
 */

	.set	MB_MAGIC, 0x1BADB002
	.set	MB_PAGE_ALIGN, 1 << 0		/* modules on 4 KiB pages */
	.set	MB_MEMORY_INFO, 1 << 1		/* mem_lower/upper, the mmap */
	.set	MB_ADDRESS_FIELDS, 1 << 16	/* the a.out kludge */
	.set	BOOTLOADER_MAGIC, 0x2BADB002

	.ifdef	AOUT_KLUDGE
	.set	MB_FLAGS, MB_PAGE_ALIGN | MB_MEMORY_INFO | MB_ADDRESS_FIELDS
	.else
	.set	MB_FLAGS, MB_PAGE_ALIGN | MB_MEMORY_INFO
	.endif

	/* Multiboot information (section 3.3): offsets and flag bits. */
	.set	MBI_FLAGS, 0
	.set	MBI_CMDLINE, 16
	.set	MBI_MODS_COUNT, 20
	.set	MBI_MODS_ADDR, 24
	.set	MBI_LOADER_NAME, 64
	.set	MBI_HAS_CMDLINE, 1 << 2
	.set	MBI_HAS_MODS, 1 << 3
	.set	MBI_HAS_LOADER_NAME, 1 << 9
	.set	MOD_SIZE, 16			/* mod_start, mod_end, string, reserved */

	.set	COM1, 0x3F8
	.set	COM1_LSR, COM1 + 5
	.set	LSR_THR_EMPTY, 0x20
	.set	DEBUG_EXIT_PORT, 0xF4
	.set	SHOWN_BYTES, 16

/* The header (section 3.1.1), first in the image and so in the first 8 KiB. */
	.section .multiboot, "a"
	.align	4
mb_header:
	.long	MB_MAGIC
	.long	MB_FLAGS
	.long	-(MB_MAGIC + MB_FLAGS)
	.ifdef	AOUT_KLUDGE
	.long	mb_header			/* header_addr */
	.long	__load_start			/* load_addr */
	.long	__load_end			/* load_end_addr */
	.long	__bss_end			/* bss_end_addr */
	.long	_start				/* entry_addr */
	.endif

	.text
	.code32
	.globl	_start
_start:
	cli
	cld
	mov	$stack_top, %esp
	cmp	$BOOTLOADER_MAGIC, %eax
	jne	bad_magic
	mov	%ebx, %esi			/* %esi: the information, kept */

	mov	$msg_hello, %eax
	call	puts

	/* The command line, and the exit value in it. */
	mov	$msg_cmdline, %eax
	call	puts
	testl	$MBI_HAS_CMDLINE, MBI_FLAGS(%esi)
	jz	1f
	mov	MBI_CMDLINE(%esi), %eax
	call	puts
	call	newline
	mov	MBI_CMDLINE(%esi), %eax
	call	parse_exit
	movb	%al, exit_value
	jmp	2f
1:	mov	$msg_none, %eax
	call	puts
2:
	/* The modules. */
	mov	$msg_modules, %eax
	call	puts
	testl	$MBI_HAS_MODS, MBI_FLAGS(%esi)
	jz	no_modules
	mov	MBI_MODS_COUNT(%esi), %eax
	call	dec32
	call	newline
	mov	MBI_MODS_ADDR(%esi), %edi	/* %edi: this module's entry */
	xor	%ebp, %ebp			/* %ebp: its index */
module_loop:
	cmp	MBI_MODS_COUNT(%esi), %ebp
	jae	modules_done
	call	show_module
	add	$MOD_SIZE, %edi
	inc	%ebp
	jmp	module_loop
no_modules:
	mov	$msg_none, %eax
	call	puts
modules_done:

	/* The boot loader's name. */
	testl	$MBI_HAS_LOADER_NAME, MBI_FLAGS(%esi)
	jz	1f
	mov	$msg_loader, %eax
	call	puts
	mov	MBI_LOADER_NAME(%esi), %eax
	call	puts
	call	newline
1:
	movb	exit_value, %al
	jmp	finish

bad_magic:
	mov	%eax, %ebx
	mov	$msg_bad_magic, %eax
	call	puts
	mov	%ebx, %eax
	call	hex32
	call	newline
	mov	$0x7F, %al

/* Write %al to the debug-exit port; stay halted if nothing ends the VM. */
finish:
	outb	%al, $DEBUG_EXIT_PORT
1:	cli
	hlt
	jmp	1b

/* One "module <i>: <string> size=0x<size> bytes=<hex>" line for the entry at
 * %edi, index %ebp. */
show_module:
	mov	$msg_module, %eax
	call	puts
	mov	%ebp, %eax
	call	dec32
	mov	$msg_colon, %eax
	call	puts
	mov	8(%edi), %eax			/* string */
	call	puts
	mov	$msg_size, %eax
	call	puts
	mov	4(%edi), %ecx			/* mod_end */
	mov	(%edi), %ebx			/* mod_start */
	sub	%ebx, %ecx
	mov	%ecx, %eax
	call	hex32
	mov	$msg_bytes, %eax
	call	puts
	cmp	$SHOWN_BYTES, %ecx
	jbe	1f
	mov	$SHOWN_BYTES, %ecx
1:	test	%ecx, %ecx
	jz	2f
	movb	(%ebx), %al
	call	hex8
	inc	%ebx
	dec	%ecx
	jmp	1b
2:	testl	$0xFFF, (%edi)
	jz	3f
	mov	$msg_unaligned, %eax
	call	puts
3:	jmp	newline

/* %eax = the value of the first "exit=N" word of the string at %eax (N in
 * decimal, the digits up to the first non-digit), 0 without one. */
parse_exit:
	push	%esi
	push	%ebx
	push	%ecx
	mov	%eax, %esi
	mov	$1, %ecx			/* at the start of a word */
1:	movb	(%esi), %al
	test	%al, %al
	jz	4f
	cmp	$' ', %al
	jne	2f
	mov	$1, %ecx
	inc	%esi
	jmp	1b
2:	test	%ecx, %ecx
	jz	3f
	xor	%ecx, %ecx
	cmpl	$0x74697865, (%esi)		/* "exit" */
	jne	3f
	cmpb	$'=', 4(%esi)
	jne	3f
	add	$5, %esi
	xor	%ebx, %ebx
5:	movzbl	(%esi), %eax
	sub	$'0', %eax
	cmp	$9, %eax
	ja	6f
	imul	$10, %ebx, %ebx
	add	%eax, %ebx
	inc	%esi
	jmp	5b
6:	mov	%ebx, %eax
	jmp	7f
3:	inc	%esi
	jmp	1b
4:	xor	%eax, %eax
7:	pop	%ecx
	pop	%ebx
	pop	%esi
	ret

/* Print the NUL-terminated string at %eax. */
puts:
	push	%esi
	mov	%eax, %esi
1:	movb	(%esi), %al
	test	%al, %al
	jz	2f
	call	putc
	inc	%esi
	jmp	1b
2:	pop	%esi
	ret

newline:
	mov	$'\n', %al
	/* fall through */

/* Print the byte in %al: wait for THR empty (LSR bit 5), then write THR. */
putc:
	push	%edx
	push	%eax
	mov	$COM1_LSR, %dx
1:	inb	%dx, %al
	test	$LSR_THR_EMPTY, %al
	jz	1b
	pop	%eax
	mov	$COM1, %dx
	outb	%al, %dx
	pop	%edx
	ret

/* Print %eax as 8 hex digits, most significant first; %eax is kept. */
hex32:
	push	%ecx
	mov	$4, %ecx
1:	rol	$8, %eax
	call	hex8
	dec	%ecx
	jnz	1b
	pop	%ecx
	ret

/* Print %al as 2 hex digits; %eax is kept. */
hex8:
	push	%eax
	shr	$4, %al
	call	hex_digit
	mov	(%esp), %eax
	and	$0x0F, %al
	call	hex_digit
	pop	%eax
	ret

hex_digit:
	cmp	$10, %al
	jb	1f
	add	$('a' - '0' - 10), %al
1:	add	$'0', %al
	jmp	putc

/* Print %eax in decimal. */
dec32:
	push	%ebx
	push	%ecx
	push	%edx
	mov	$10, %ebx
	xor	%ecx, %ecx
1:	xor	%edx, %edx
	div	%ebx
	push	%edx
	inc	%ecx
	test	%eax, %eax
	jnz	1b
2:	pop	%eax
	add	$'0', %al
	call	putc
	dec	%ecx
	jnz	2b
	pop	%edx
	pop	%ecx
	pop	%ebx
	ret

	.section .rodata
msg_hello:	.asciz	"hello from multiboot\n"
msg_cmdline:	.asciz	"cmdline: "
msg_modules:	.asciz	"modules: "
msg_module:	.asciz	"module "
msg_colon:	.asciz	": "
msg_size:	.asciz	" size=0x"
msg_bytes:	.asciz	" bytes="
msg_unaligned:	.asciz	" unaligned"
msg_loader:	.asciz	"loader: "
msg_none:	.asciz	"none\n"
msg_bad_magic:	.asciz	"fail: bad magic 0x"

	.bss
	.align	16
exit_value:
	.skip	4
	.align	16
stack:
	.skip	4096
stack_top:
