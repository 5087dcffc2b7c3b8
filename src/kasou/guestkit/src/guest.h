/*
 * guest.h - constants and declarations shared by the kasou test guest's C and
 * assembler sources.
 *
 * The guest is entered either through Linux's 64-bit boot protocol
 * (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol") or as a Multiboot
 * (v1) kernel (Multiboot Specification 0.6.96, section 3). Both paths end in
 * kmain() in 64-bit mode; see head.S.
 */
#ifndef KASOU_GUEST_H
#define KASOU_GUEST_H

#define LOAD_ADDR 0x100000

/* Boot GDT (head.S): used while switching modes, by the BSP and the APs. */
#define BOOT_CS64 0x08
#define BOOT_DS 0x10
#define BOOT_CS32 0x18

/* Runtime GDT (kernel.c). The kernel selectors equal the boot GDT's, so the
 * switch between the two never changes a selector in use. Nothing depends on
 * the selectors the loader entered with: both entries load their own GDT. */
#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_CS (0x18 | 3)
#define USER_DS (0x20 | 3)
#define TSS_SEL 0x28

/* First argument of kmain(): how the guest was entered. */
#define BOOT_LINUX 1
#define BOOT_MULTIBOOT 2

/* Multiboot 0.6.96 section 3.1.1: header magic; flag bit 16 means the
 * address fields (header_addr .. entry_addr) are valid. Section 3.2: the
 * magic the loader leaves in EAX. */
#define MB_HEADER_MAGIC 0x1BADB002
#define MB_HEADER_FLAGS 0x00010000
#define MB_BOOT_MAGIC 0x2BADB002

/* Intel SDM vol. 3A 2.5 (control registers) and 2.2.1 (IA32_EFER). */
#define CR0_PE 0x00000001
#define CR0_PG 0x80000000
#define CR4_PAE 0x00000020
#define CR4_SMEP 0x00100000
#define CR4_SMAP 0x00200000
#define MSR_EFER 0xC0000080
#define EFER_LME 0x00000100

/* Application processors: each gets a 4 KiB stack, chosen in head.S. */
#define MAX_CPUS 16
#define AP_STACK_SHIFT 12
/* The real-mode trampoline is copied here; the SIPI vector is its page number. */
#define AP_TRAMPOLINE 0x8000
/* Where the BSP writes the boot GDT's pseudo-descriptor for the trampoline. */
#define AP_TRAMPOLINE_GDTR (AP_TRAMPOLINE + 0xF0)

#ifndef __ASSEMBLER__

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Services ring 3 asks of ring 0 with ud2: number in RAX, arguments in RDI,
 * RSI, RDX, result in RAX. */
enum service {
	SVC_PUTC = 0,  /* rdi = byte */
	SVC_WRITE = 1, /* rdi = buffer, rsi = length */
	SVC_GETC = 2,  /* -> byte */
	SVC_OUTB = 3,  /* rdi = port, rsi = value */
	SVC_INB = 4,   /* rdi = port -> value */
	SVC_OUTW = 5,
	SVC_INW = 6,
	SVC_OUTL = 7,
	SVC_INL = 8,
	SVC_RESET = 9, /* reset through the i8042; does not return */
	SVC_HALT = 10, /* cli; hlt forever; does not return */
	SVC_EXIT = 11, /* rdi = 0 done / 1 fail, rsi = reason; prints, resets */
	SVC_IRQ_ROUTE = 12, /* rdi = IOAPIC base, rsi = pin, rdx = virtio-mmio base
			     * -> interrupt number 0..MAX_VIRTIO_IRQS-1, or -1 */
	SVC_WAIT = 13, /* rdi = volatile u16 *, rsi = its old value: halts with
			* interrupts on until it changes -> 1, or ~2 s pass -> 0 */
};

/* Interrupts SVC_IRQ_ROUTE hands out: vectors VEC_VIRTIO + n, each counted in
 * virtio_irqs[n] (kernel.c), which ring 3 reads directly. */
#define MAX_VIRTIO_IRQS 8
#define VEC_VIRTIO 0x50
extern volatile uint64_t virtio_irqs[MAX_VIRTIO_IRQS];

/* What ring-3 workloads get in RDI. */
struct user_args {
	const char *cmdline;
	volatile uint64_t *ticks;       /* LAPIC timer interrupts taken */
	volatile uint64_t *ticks_ring3; /* ... of those, taken while in ring 3 */
	volatile uint64_t *uart_irqs;   /* COM1 interrupts taken */
};

/* The trap frame isr_common (head.S) builds: general registers, then the
 * vector and error code, then what the CPU pushed (SDM vol. 3A 6.14.2). */
struct trapframe {
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
	uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t vector, error;
	uint64_t rip, cs, rflags, rsp, ss;
};

/* head.S */
extern char isr_stubs[];      /* 256 stubs, 16 bytes apart */
extern char ap_tramp_start[]; /* real-mode AP trampoline, copied to AP_TRAMPOLINE */
extern char ap_tramp_end[];
extern char boot_gdt[];
extern char boot_gdt_end[];
extern char trap_stack_top[];
extern char user_stack_top[];
extern uint32_t ap_cr3;
extern uint32_t ap_next_slot;
__attribute__((noreturn)) void enter_user(uint64_t rip, uint64_t rsp, uint64_t rflags,
					  uint64_t arg);

/* A pointer to a fixed guest-physical address. The empty asm hides the
 * constant from gcc, which otherwise warns that "address 0x40e" points into
 * no object (-Warray-bounds). */
static inline void *phys(uint64_t addr)
{
	void *p;

	__asm__("" : "=r"(p) : "0"(addr));
	return p;
}

/* A ud2 service call from ring 3 (kernel.c, service()). */
static inline uint64_t svc3(uint64_t nr, uint64_t a, uint64_t b, uint64_t c)
{
	__asm__ volatile("ud2" : "+a"(nr) : "D"(a), "S"(b), "d"(c) : "memory");
	return nr;
}

static inline uint64_t svc(uint64_t nr, uint64_t a, uint64_t b)
{
	return svc3(nr, a, b, 0);
}

/* MMIO accesses of exactly the given width, one instruction each (a device
 * sees one exit each); usable from either ring. */
static inline void mmio_w8(uint64_t a, uint8_t v)
{
	__asm__ volatile("movb %0, (%1)" : : "q"(v), "r"(a) : "memory");
}

static inline void mmio_w16(uint64_t a, uint16_t v)
{
	__asm__ volatile("movw %0, (%1)" : : "r"(v), "r"(a) : "memory");
}

static inline void mmio_w32(uint64_t a, uint32_t v)
{
	__asm__ volatile("movl %0, (%1)" : : "r"(v), "r"(a) : "memory");
}

static inline void mmio_w64(uint64_t a, uint64_t v)
{
	__asm__ volatile("movq %0, (%1)" : : "r"(v), "r"(a) : "memory");
}

static inline uint8_t mmio_r8(uint64_t a)
{
	uint8_t v;

	__asm__ volatile("movb (%1), %0" : "=q"(v) : "r"(a) : "memory");
	return v;
}

static inline uint16_t mmio_r16(uint64_t a)
{
	uint16_t v;

	__asm__ volatile("movw (%1), %0" : "=r"(v) : "r"(a) : "memory");
	return v;
}

static inline uint32_t mmio_r32(uint64_t a)
{
	uint32_t v;

	__asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(a) : "memory");
	return v;
}

static inline uint64_t mmio_r64(uint64_t a)
{
	uint64_t v;

	__asm__ volatile("movq (%1), %0" : "=r"(v) : "r"(a) : "memory");
	return v;
}

/* lib.c: pure helpers, no I/O, safe to call from either ring. */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
size_t str_len(const char *s);
bool str_eq(const char *a, const char *b);
int vformat(char *buf, size_t size, const char *fmt, va_list ap);
int format(char *buf, size_t size, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* Finds "key=value" on a command line; copies value into out. */
bool cmdline_get(const char *cmdline, const char *key, char *out, size_t size);
/* Parses a decimal or 0x-prefixed hexadecimal number. */
bool parse_u64(const char *s, uint64_t *out);

/* user.c: helpers for ring-3 code (they reach ring 0 through svc). */
void uwrite(const char *s, size_t n);
void uprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
__attribute__((noreturn)) void udone(void);
__attribute__((noreturn)) void ufail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The number in "key=value" on the command line, or fallback; fails on a bad one. */
uint64_t uarg(const struct user_args *args, const char *key, uint64_t fallback);

/* user.c: ring-3 workloads, entered with enter_user(). */
__attribute__((noreturn)) void user_hello(const struct user_args *args);
__attribute__((noreturn)) void user_echo(const struct user_args *args);
__attribute__((noreturn)) void user_dispatch(const struct user_args *args);
__attribute__((noreturn)) void user_mmio(const struct user_args *args);
__attribute__((noreturn)) void user_irq(const struct user_args *args);
__attribute__((noreturn)) void user_counter(const struct user_args *args);
__attribute__((noreturn)) void user_memcheck(const struct user_args *args);
__attribute__((noreturn)) void user_hostile(const struct user_args *args);

/* vwork.c: the virtio workloads, in ring 3. */
__attribute__((noreturn)) void user_vlist(const struct user_args *args);
__attribute__((noreturn)) void user_vblk(const struct user_args *args);
__attribute__((noreturn)) void user_vblk_bench(const struct user_args *args);
__attribute__((noreturn)) void user_vblk_watch(const struct user_args *args);
__attribute__((noreturn)) void user_vrng(const struct user_args *args);
__attribute__((noreturn)) void user_vnet(const struct user_args *args);
__attribute__((noreturn)) void user_vsock(const struct user_args *args);
__attribute__((noreturn)) void user_vbad(const struct user_args *args);

#endif /* __ASSEMBLER__ */
#endif /* KASOU_GUEST_H */
