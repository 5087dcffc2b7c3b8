/*
 * kernel.c - the ring-0 half of the kasou test guest.
 *
 * Owns the machine once head.S has reached 64-bit mode: the COM1 console,
 * the GDT (with ring-3 segments), TSS, IDT and page tables, the services
 * ring 3 asks for with ud2, the local APIC, IOAPIC and 8259 PICs, the MP
 * table and AP start-up, and the workloads that run in ring 0. The ring-3
 * workloads are in user.c.
 *
 * Everything here must run under PVM's instruction emulator, which refuses
 * SSE, int3, popcnt and a few others (build.py checks the disassembly): plain
 * integer C compiled with -mgeneral-regs-only.
 */
#include "guest.h"

#define COM1 0x3f8
#define I8042_STATUS 0x64
#define I8042_CMD_RESET 0xfe

#define LAPIC_BASE 0xfee00000UL
#define IOAPIC_BASE 0xfec00000UL
#define TEST_MMIO_BASE 0xd0000000UL

/* Local APIC registers (SDM vol. 3A 11.4.1, table 11-1). */
#define LAPIC_ID 0x020
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CUR 0x390
#define LAPIC_TIMER_DIV 0x3e0
#define LVT_MASKED (1u << 16)
#define LVT_PERIODIC (1u << 17)
#define ICR_BUSY (1u << 12)

/* Vectors above the exceptions and the PICs' remapped range 0x20-0x2f. */
#define VEC_TIMER 0x40
#define VEC_UART 0x41
#define VEC_SPURIOUS 0xff

/* Page-table entry bits (SDM vol. 3A 4.5, tables 4-15 and 4-17). */
#define PTE_P 0x001ULL
#define PTE_W 0x002ULL
#define PTE_U 0x004ULL
#define PTE_PWT 0x008ULL
#define PTE_PCD 0x010ULL
#define PTE_PS 0x080ULL

void kmain(uint64_t boot, uint64_t arg0, uint64_t arg1);
void ap_main(uint32_t slot);
void trap(struct trapframe *tf);

/* ---------------------------------------------------------------- I/O */

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;

	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void outw(uint16_t port, uint16_t v)
{
	__asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint16_t inw(uint16_t port)
{
	uint16_t v;

	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void outl(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint32_t inl(uint16_t port)
{
	uint32_t v;

	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void mmio_write32(uint64_t addr, uint32_t v)
{
	*(volatile uint32_t *)addr = v;
}

static inline uint32_t mmio_read32(uint64_t addr)
{
	return *(volatile uint32_t *)addr;
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" : : : "memory");
}

static __attribute__((noreturn)) void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt" : : : "memory");
}

/* ------------------------------------------------------------ console */

static volatile uint32_t console_lock;

static void spin_lock(volatile uint32_t *lock)
{
	while (__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE))
		while (*lock)
			cpu_relax();
}

static void spin_unlock(volatile uint32_t *lock)
{
	__atomic_store_n(lock, 0, __ATOMIC_RELEASE);
}

/* 8250/16550 registers at COM1 (PC16550D datasheet, table 2). */
static void serial_init(void)
{
	outb(COM1 + 1, 0x00); /* IER: no interrupts */
	outb(COM1 + 3, 0x80); /* LCR: DLAB to reach the divisor */
	outb(COM1 + 0, 0x01); /* DLL: 115200 baud */
	outb(COM1 + 1, 0x00); /* DLM */
	outb(COM1 + 3, 0x03); /* LCR: 8 data bits, no parity, 1 stop bit */
	outb(COM1 + 4, 0x0b); /* MCR: DTR, RTS, OUT2 (gates the IRQ on a PC) */
	/* FCR is left alone: enabling the FIFOs flushes input already received. */
}

static void serial_putc(char c)
{
	while (!(inb(COM1 + 5) & 0x20)) /* LSR.THRE */
		cpu_relax();
	outb(COM1, (uint8_t)c);
}

static uint8_t serial_getc(void)
{
	while (!(inb(COM1 + 5) & 0x01)) /* LSR.DR */
		cpu_relax();
	return inb(COM1);
}

static void console_write(const char *s, size_t n)
{
	spin_lock(&console_lock);
	while (n--)
		serial_putc(*s++);
	spin_unlock(&console_lock);
}

static __attribute__((format(printf, 1, 2))) void kprintf(const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vformat(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	console_write(buf, n < (int)sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
}

/* ------------------------------------------------------- reset, failure */

/* The i8042's pulse-reset command (8042 datasheet; what Linux's reboot=k
 * does): wait for an empty input buffer, then write 0xfe to the command
 * port. kasou runs these guests with "exit on reboot", QEMU with -no-reboot. */
static __attribute__((noreturn)) void machine_reset(void)
{
	/* An empty IDT's pseudo-descriptor (SDM vol. 3A 3.5.1). */
	struct {
		uint16_t limit;
		uint64_t base;
	} __attribute__((packed)) none = { 0, 0 };

	/* A machine without an i8042 (QEMU's microvm) reads the port as all
	 * ones: end it with a triple fault instead, which a VMM told not to
	 * reboot also takes as the end (SDM vol. 3A 6.15, interrupt 8). */
	if (inb(I8042_STATUS) != 0xff) {
		for (int i = 0; i < 1000 && (inb(I8042_STATUS) & 0x02); i++)
			cpu_relax();
		outb(I8042_STATUS, I8042_CMD_RESET);
		halt_forever();
	}
	__asm__ volatile("lidt %0\n\t"
			 "movq (%1), %%rax"
			 :
			 : "m"(none), "r"(0x8000000000000000ULL)
			 : "rax", "memory");
	halt_forever();
}

static __attribute__((noreturn)) void finish_done(void)
{
	kprintf("kasou-guest: done\n");
	machine_reset();
}

static __attribute__((noreturn, format(printf, 1, 2))) void fail(const char *fmt, ...)
{
	char buf[200];
	va_list ap;

	va_start(ap, fmt);
	vformat(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	kprintf("kasou-guest: fail %s\n", buf);
	machine_reset();
}

/* --------------------------------------------------- command line, args */

static char cmdline[1024];

static uint64_t arg_u64(const char *key, uint64_t fallback)
{
	char value[32];
	uint64_t v;

	if (!cmdline_get(cmdline, key, value, sizeof(value)))
		return fallback;
	if (!parse_u64(value, &v))
		fail("bad value %s=%s: give a decimal or 0x-prefixed number", key, value);
	return v;
}

/* Copies the NUL-terminated string at guest-physical addr (identity-mapped)
 * into cmdline, cut to fit. */
static void copy_cmdline(uint64_t addr)
{
	const char *src = (const char *)addr;
	size_t n = 0;

	if (!addr)
		return;
	while (src[n] && n + 1 < sizeof(cmdline)) {
		cmdline[n] = src[n];
		n++;
	}
	cmdline[n] = '\0';
}

/* ------------------------------------------- GDT, TSS, IDT, page tables */

/* struct tss_struct of the 64-bit TSS (SDM vol. 3A 8.7, figure 8-11). */
struct tss64 {
	uint32_t reserved0;
	uint64_t rsp[3];
	uint64_t reserved1;
	uint64_t ist[7];
	uint64_t reserved2;
	uint16_t reserved3;
	uint16_t iomap_base;
} __attribute__((packed));
_Static_assert(sizeof(struct tss64) == 104, "64-bit TSS is 104 bytes");

/* 64-bit interrupt gate (SDM vol. 3A 6.14.1, figure 6-8). */
struct idt_gate {
	uint16_t offset0;
	uint16_t selector;
	uint8_t ist;
	uint8_t type;
	uint16_t offset1;
	uint32_t offset2;
	uint32_t reserved;
} __attribute__((packed));
_Static_assert(sizeof(struct idt_gate) == 16, "64-bit IDT gate is 16 bytes");

/* The operand of lgdt/lidt in 64-bit mode (SDM vol. 3A 3.5.1). */
struct table_register {
	uint16_t limit;
	uint64_t base;
} __attribute__((packed));

static uint64_t gdt[7] __attribute__((aligned(16)));
static struct tss64 tss __attribute__((aligned(16)));
static struct idt_gate idt[256] __attribute__((aligned(16)));

/* Identity map of the first 4 GiB in 2 MiB pages, user-accessible so that
 * ring 3 reaches RAM and MMIO. The top GiB (MMIO: test device, IOAPIC,
 * LAPIC) is uncached. */
static uint64_t pml4[512] __attribute__((aligned(4096)));
static uint64_t pdpt[512] __attribute__((aligned(4096)));
static uint64_t pd[4][512] __attribute__((aligned(4096)));

static void gdt_build(void)
{
	uint64_t base = (uint64_t)&tss;
	uint64_t limit = sizeof(tss) - 1;

	/* Segment descriptors (SDM vol. 3A 3.4.5): flat, present; L=1 on code. */
	gdt[0] = 0;
	gdt[1] = 0x00af9a000000ffffULL; /* KERNEL_CS: 64-bit code, DPL 0 */
	gdt[2] = 0x00cf92000000ffffULL; /* KERNEL_DS: data, DPL 0 */
	gdt[3] = 0x00affa000000ffffULL; /* USER_CS: 64-bit code, DPL 3 */
	gdt[4] = 0x00cff2000000ffffULL; /* USER_DS: data, DPL 3 */
	/* 16-byte TSS descriptor, type 9 (available 64-bit TSS), SDM 8.2.3. */
	gdt[5] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ULL << 40) |
		 (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
	gdt[6] = base >> 32;

	tss.rsp[0] = (uint64_t)trap_stack_top;
	/* An I/O bitmap offset past the limit: ring 3 has no port access. */
	tss.iomap_base = sizeof(tss);
}

static void gdt_load(void)
{
	struct table_register gdtr = { sizeof(gdt) - 1, (uint64_t)gdt };

	__asm__ volatile("lgdt %0" : : "m"(gdtr) : "memory");
	/* Reload CS with a far return, then the data segments. */
	__asm__ volatile("pushq %[cs]\n\t"
			 "leaq 1f(%%rip), %%rax\n\t"
			 "pushq %%rax\n\t"
			 "lretq\n"
			 "1:\n\t"
			 "movl %[ds], %%eax\n\t"
			 "movl %%eax, %%ds\n\t"
			 "movl %%eax, %%es\n\t"
			 "movl %%eax, %%ss\n\t"
			 "xorl %%eax, %%eax\n\t"
			 "movl %%eax, %%fs\n\t"
			 "movl %%eax, %%gs"
			 :
			 : [cs] "i"(KERNEL_CS), [ds] "i"(KERNEL_DS)
			 : "rax", "memory");
}

static void idt_build(void)
{
	for (int v = 0; v < 256; v++) {
		uint64_t addr = (uint64_t)isr_stubs + 16 * (uint64_t)v;

		idt[v].offset0 = (uint16_t)addr;
		idt[v].selector = KERNEL_CS;
		idt[v].ist = 0;
		idt[v].type = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
		idt[v].offset1 = (uint16_t)(addr >> 16);
		idt[v].offset2 = (uint32_t)(addr >> 32);
		idt[v].reserved = 0;
	}
}

static void idt_load(void)
{
	struct table_register idtr = { sizeof(idt) - 1, (uint64_t)idt };

	__asm__ volatile("lidt %0" : : "m"(idtr) : "memory");
}

static void paging_build(void)
{
	pml4[0] = (uint64_t)pdpt | PTE_P | PTE_W | PTE_U;
	for (uint64_t i = 0; i < 4; i++) {
		pdpt[i] = (uint64_t)pd[i] | PTE_P | PTE_W | PTE_U;
		for (uint64_t j = 0; j < 512; j++) {
			uint64_t flags = PTE_P | PTE_W | PTE_U | PTE_PS;

			if (i == 3)
				flags |= PTE_PCD | PTE_PWT;
			pd[i][j] = ((i * 512 + j) << 21) | flags;
		}
	}
}

static void paging_load(void)
{
	uint64_t cr4;

	/* With every page user-accessible, SMEP would stop ring 0 fetching
	 * code and SMAP would stop it reading ring 3's buffers. */
	__asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
	if (cr4 & (CR4_SMEP | CR4_SMAP))
		__asm__ volatile("mov %0, %%cr4" : : "r"(cr4 & ~(uint64_t)(CR4_SMEP | CR4_SMAP)));
	__asm__ volatile("mov %0, %%cr3" : : "r"((uint64_t)pml4) : "memory");
}

/* ------------------------------------------------- PIC, LAPIC, IOAPIC */

/* Remaps both 8259As to vectors 0x20-0x2f, away from the exceptions, and
 * masks every line (8259A datasheet, ICW1-ICW4 then OCW1). A BIOS may have
 * left IRQ0 (the PIT) unmasked on vector 8, where it would look like #DF. */
static void pic_disable(void)
{
	outb(0x20, 0x11);
	outb(0xa0, 0x11);
	outb(0x21, 0x20);
	outb(0xa1, 0x28);
	outb(0x21, 0x04);
	outb(0xa1, 0x02);
	outb(0x21, 0x01);
	outb(0xa1, 0x01);
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
}

static uint32_t lapic_read(uint32_t reg)
{
	return mmio_read32(LAPIC_BASE + reg);
}

static void lapic_write(uint32_t reg, uint32_t v)
{
	mmio_write32(LAPIC_BASE + reg, v);
}

static uint32_t lapic_id(void)
{
	return lapic_read(LAPIC_ID) >> 24;
}

static void lapic_eoi(void)
{
	lapic_write(LAPIC_EOI, 0);
}

/* Software-enables the local APIC (SVR bit 8, SDM vol. 3A 11.9) and masks
 * LINT0, the 8259's way in. */
static void lapic_enable(void)
{
	lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
	lapic_write(LAPIC_TPR, 0);
	lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
}

/*
 * Busy-waits about us microseconds on the APIC timer, masked and one-shot.
 * KVM's and QEMU's APIC timers count at 1 GHz before the divider. The loop
 * is bounded too: each poll takes well over a nanosecond, so a timer that
 * never counts down ends the wait late rather than never.
 */
static void lapic_delay_us(uint32_t us)
{
	uint64_t polls = (uint64_t)us * 1000;

	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_TIMER);
	lapic_write(LAPIC_TIMER_DIV, 0xb); /* divide by 1 */
	lapic_write(LAPIC_TIMER_INIT, us * 1000);
	while (lapic_read(LAPIC_TIMER_CUR) != 0 && polls--)
		cpu_relax();
	lapic_write(LAPIC_TIMER_INIT, 0);
}

/* IOAPIC: IOREGSEL at +0, IOWIN at +0x10; redirection entry n at registers
 * 0x10 + 2n (low) and 0x11 + 2n (high) (82093AA datasheet, 3.2). */
static void ioapic_write_at(uint64_t base, uint32_t reg, uint32_t v)
{
	mmio_write32(base, reg);
	mmio_write32(base + 0x10, v);
}

static void ioapic_write(uint32_t reg, uint32_t v)
{
	ioapic_write_at(IOAPIC_BASE, reg, v);
}

/* Routes an ISA interrupt: fixed delivery, physical destination, active
 * high, edge-triggered (the ISA conventions, MP spec 1.4 table 4-10),
 * unmasked. The high half (destination) is written first so the entry is
 * never live with a stale destination. */
static void ioapic_route(uint32_t pin, uint32_t vector, uint32_t apic_id)
{
	ioapic_write(0x11 + 2 * pin, apic_id << 24);
	ioapic_write(0x10 + 2 * pin, vector);
}

/* ----------------------------------------------------------- MP table */

/* MP floating pointer structure (MP spec 1.4, 4.1, figure 4-2). */
struct mp_floating {
	char signature[4];
	uint32_t config;
	uint8_t length;
	uint8_t revision;
	uint8_t checksum;
	uint8_t features[5];
} __attribute__((packed));
_Static_assert(sizeof(struct mp_floating) == 16, "MP floating pointer is 16 bytes");

/* MP configuration table header (MP spec 1.4, 4.2, figure 4-3). */
struct mp_config {
	char signature[4];
	uint16_t length;
	uint8_t revision;
	uint8_t checksum;
	char oem[8];
	char product[12];
	uint32_t oem_table;
	uint16_t oem_size;
	uint16_t entries;
	uint32_t lapic;
	uint16_t ext_length;
	uint8_t ext_checksum;
	uint8_t reserved;
} __attribute__((packed));
_Static_assert(sizeof(struct mp_config) == 44, "MP configuration header is 44 bytes");

/* Entry types and sizes (MP spec 1.4, table 4-3). */
#define MP_PROCESSOR 0
#define MP_BUS 1
#define MP_IOAPIC 2
#define MP_IO_INTERRUPT 3
#define MP_LOCAL_INTERRUPT 4

struct mp_cpus {
	uint32_t count;
	uint8_t apic_id[MAX_CPUS];
	bool is_bsp[MAX_CPUS];
};

static uint8_t checksum(const void *p, size_t n)
{
	const uint8_t *b = p;
	uint8_t sum = 0;

	while (n--)
		sum = (uint8_t)(sum + *b++);
	return sum;
}

static bool has_signature(const char *p, const char *sig)
{
	return p[0] == sig[0] && p[1] == sig[1] && p[2] == sig[2] && p[3] == sig[3];
}

static const struct mp_floating *mp_scan(uint64_t start, uint64_t length)
{
	for (uint64_t a = start; a + 16 <= start + length; a += 16) {
		const struct mp_floating *f = (const struct mp_floating *)a;

		if (has_signature(f->signature, "_MP_") && f->length == 1 &&
		    checksum(f, 16) == 0)
			return f;
	}
	return NULL;
}

/*
 * Finds the MP configuration table where MP spec 1.4 section 4 says to look:
 * the first KiB of the EBDA (segment at 0x40e in the BIOS data area), the
 * last KiB of base memory, the BIOS ROM at 0xf0000-0xfffff. Returns NULL
 * without one, or with only a default configuration (feature byte 1).
 */
static const struct mp_config *mp_find(void)
{
	uint64_t ebda = (uint64_t)*(volatile uint16_t *)phys(0x40e) << 4;
	const struct mp_floating *f = NULL;
	const struct mp_config *c;

	if (ebda >= 0x80000 && ebda < 0xa0000)
		f = mp_scan(ebda, 1024);
	if (!f)
		f = mp_scan(0x9fc00, 1024);
	if (!f)
		f = mp_scan(0xf0000, 0x10000);
	if (!f || !f->config)
		return NULL;
	c = (const struct mp_config *)(uint64_t)f->config;
	if (!has_signature(c->signature, "PCMP") || c->length < sizeof(*c) ||
	    checksum(c, c->length) != 0)
		return NULL;
	return c;
}

/* Calls fn on each entry; stops at the end of the table or at an entry
 * that does not fit (the table is the VMM's data: bounds come from it). */
static void mp_entries(const struct mp_config *c, void (*fn)(const uint8_t *e, void *ctx),
		       void *ctx)
{
	const uint8_t *p = (const uint8_t *)(c + 1);
	const uint8_t *end = (const uint8_t *)c + c->length;

	for (uint32_t i = 0; i < c->entries && p < end; i++) {
		size_t size = p[0] == MP_PROCESSOR ? 20 : 8;

		if (p[0] > MP_LOCAL_INTERRUPT || p + size > end)
			return;
		fn(p, ctx);
		p += size;
	}
}

/* Processor entry: type, LAPIC ID, LAPIC version, flags (bit 0 enabled,
 * bit 1 bootstrap processor), ... (MP spec 1.4, 4.3.1). */
static void mp_count_cpu(const uint8_t *e, void *ctx)
{
	struct mp_cpus *cpus = ctx;

	if (e[0] != MP_PROCESSOR || !(e[3] & 0x01) || cpus->count >= MAX_CPUS)
		return;
	cpus->apic_id[cpus->count] = e[1];
	cpus->is_bsp[cpus->count] = e[3] & 0x02;
	cpus->count++;
}

struct isa_lookup {
	int isa_bus;
	uint32_t irq;
	int pin;
};

/* Bus entry: type, bus ID, 6-byte type string (MP spec 1.4, 4.3.2). */
static void mp_find_isa_bus(const uint8_t *e, void *ctx)
{
	struct isa_lookup *l = ctx;

	if (e[0] == MP_BUS && has_signature((const char *)e + 2, "ISA "))
		l->isa_bus = e[1];
}

/* I/O interrupt entry: type, interrupt type, flags (2 bytes), source bus,
 * source IRQ, destination IOAPIC, destination INTIN (MP spec 1.4, 4.3.4). */
static void mp_find_isa_pin(const uint8_t *e, void *ctx)
{
	struct isa_lookup *l = ctx;

	if (e[0] == MP_IO_INTERRUPT && e[1] == 0 && e[4] == l->isa_bus && e[5] == l->irq)
		l->pin = e[7];
}

/* The IOAPIC pin an ISA IRQ arrives on: from the MP table when it says,
 * else the identity that QEMU and KVM's default GSI routing use for all
 * but IRQ 0. */
static uint32_t isa_irq_pin(uint32_t irq)
{
	const struct mp_config *c = mp_find();
	struct isa_lookup l = { -1, irq, -1 };

	if (c) {
		mp_entries(c, mp_find_isa_bus, &l);
		if (l.isa_bus >= 0)
			mp_entries(c, mp_find_isa_pin, &l);
	}
	return l.pin >= 0 && l.pin < 24 ? (uint32_t)l.pin : irq;
}

/* --------------------------------------------------- traps and services */

volatile uint64_t irq_ticks;
volatile uint64_t irq_ticks_ring3;
volatile uint64_t uart_irqs;

/* ------------------------------------------------ virtio interrupts */

/* The virtio workloads (vwork.c) may wait for a device's interrupt: ring 3
 * asks for its IOAPIC pin to be routed (SVC_IRQ_ROUTE) and halts in ring 0
 * until the used ring moves (SVC_WAIT). The handler acknowledges the device
 * (virtio 1.2 4.2.2: InterruptStatus at 0x60, InterruptACK at 0x64) and
 * counts. A 10 ms LAPIC timer runs from the first route on, so a wait whose
 * interrupt never comes ends instead of halting forever. */
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define WAIT_TICKS 200 /* 2 s of 10 ms ticks */

volatile uint64_t virtio_irqs[MAX_VIRTIO_IRQS];
static uint64_t virtio_irq_base[MAX_VIRTIO_IRQS];
static uint32_t virtio_irq_count;
static bool watchdog_running;

/* Routes IOAPIC pin (at ioapic) to the next VEC_VIRTIO vector: fixed
 * delivery to this CPU, edge-triggered, active high, unmasked (82093AA 3.2.4).
 * Edge, because kasou raises virtio interrupts as pulses (irqfd); QEMU's
 * level line works too since the handler acknowledges until it drops. */
static int64_t virtio_irq_route(uint64_t ioapic, uint64_t pin, uint64_t device)
{
	uint32_t n = virtio_irq_count;

	if (n >= MAX_VIRTIO_IRQS || pin >= 24 || (ioapic != IOAPIC_BASE && ioapic != 0xfec10000UL))
		return -1;
	virtio_irq_base[n] = device;
	virtio_irq_count = n + 1;
	if (!watchdog_running) {
		lapic_enable();
		/* 10 ms period: 625000 counts at 1 GHz / 16 (SDM vol. 3A 11.5.4). */
		lapic_write(LAPIC_TIMER_DIV, 0x3);
		lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | VEC_TIMER);
		lapic_write(LAPIC_TIMER_INIT, 625000);
		watchdog_running = true;
	}
	ioapic_write_at(ioapic, 0x11 + 2 * (uint32_t)pin, lapic_id() << 24);
	ioapic_write_at(ioapic, 0x10 + 2 * (uint32_t)pin, VEC_VIRTIO + n);
	return n;
}

static void virtio_interrupt(uint32_t n)
{
	uint64_t base = virtio_irq_base[n];

	/* Acknowledge what is pending until nothing is, at most a few rounds:
	 * a level line that stayed up would never give another edge. */
	for (int i = 0; i < 4; i++) {
		uint32_t pending = mmio_read32(base + VIRTIO_MMIO_INTERRUPT_STATUS) & 3;

		if (!pending)
			break;
		mmio_write32(base + VIRTIO_MMIO_INTERRUPT_ACK, pending);
	}
	virtio_irqs[n]++;
}

/* Halts with interrupts on until *p differs from old (1), or WAIT_TICKS
 * timer ticks pass (0). Entered from the ud2 trap with interrupts off; sti's
 * one-instruction shadow keeps an interrupt from slipping in between the
 * check and the hlt (SDM vol. 2B, STI). p is ring 3's pointer into its own
 * ring, which this guest's identity map makes readable here. */
static uint64_t wait_change(const volatile uint16_t *p, uint16_t old)
{
	uint64_t start = irq_ticks;

	if (!watchdog_running)
		return *p != old;
	while (*p == old) {
		if (irq_ticks - start >= WAIT_TICKS)
			return 0;
		__asm__ volatile("sti; hlt; cli" : : : "memory");
	}
	return 1;
}

/* SDM vol. 3A 6.3.1, table 6-1. */
static const char *const exception_names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "coprocessor overrun",
	"#TS", "#NP", "#SS", "#GP", "#PF", "reserved 15", "#MF", "#AC", "#MC", "#XM", "#VE",
	"#CP",
};

static bool is_ud2(uint64_t rip)
{
	const volatile uint8_t *p = (const volatile uint8_t *)rip;

	return p[0] == 0x0f && p[1] == 0x0b;
}

static __attribute__((noreturn)) void service_exit(uint64_t failed, const char *reason)
{
	char buf[160];
	size_t n = 0;

	if (!failed)
		finish_done();
	/* reason is ring 3's string: copy a bounded prefix. */
	while (reason && reason[n] && n + 1 < sizeof(buf)) {
		buf[n] = reason[n];
		n++;
	}
	buf[n] = '\0';
	fail("%s", buf);
}

/* ud2 services for ring 3 (guest.h, enum service). The caller is this
 * guest's own ring-3 code, so its pointers are trusted; lengths are capped. */
static void service(struct trapframe *tf)
{
	uint16_t port = (uint16_t)tf->rdi;

	switch (tf->rax) {
	case SVC_PUTC:
		console_write((const char *)&tf->rdi, 1);
		break;
	case SVC_WRITE:
		console_write((const char *)tf->rdi, tf->rsi < 4096 ? tf->rsi : 4096);
		break;
	case SVC_GETC:
		tf->rax = serial_getc();
		break;
	case SVC_OUTB:
		outb(port, (uint8_t)tf->rsi);
		break;
	case SVC_INB:
		tf->rax = inb(port);
		break;
	case SVC_OUTW:
		outw(port, (uint16_t)tf->rsi);
		break;
	case SVC_INW:
		tf->rax = inw(port);
		break;
	case SVC_OUTL:
		outl(port, (uint32_t)tf->rsi);
		break;
	case SVC_INL:
		tf->rax = inl(port);
		break;
	case SVC_RESET:
		machine_reset();
	case SVC_HALT:
		halt_forever();
	case SVC_EXIT:
		service_exit(tf->rdi, (const char *)tf->rsi);
	case SVC_IRQ_ROUTE:
		tf->rax = (uint64_t)virtio_irq_route(tf->rdi, tf->rsi, tf->rdx);
		break;
	case SVC_WAIT:
		tf->rax = wait_change((const volatile uint16_t *)tf->rdi, (uint16_t)tf->rsi);
		break;
	default:
		fail("unknown service %lu at rip=0x%lx", tf->rax, tf->rip);
	}
}

/* The 16550 raised its THR-empty interrupt: reading IIR clears it
 * (PC16550D table 4); disabling IER keeps it from coming back. */
static void uart_interrupt(void)
{
	(void)inb(COM1 + 2);
	outb(COM1 + 1, 0x00);
	uart_irqs++;
}

void trap(struct trapframe *tf)
{
	bool from_user = (tf->cs & 3) == 3;
	const char *what = "exception";
	uint64_t cr2;

	switch (tf->vector) {
	case 6:
		if (from_user && is_ud2(tf->rip)) {
			service(tf);
			tf->rip += 2;
			return;
		}
		break;
	case VEC_TIMER:
		irq_ticks++;
		if (from_user)
			irq_ticks_ring3++;
		lapic_eoi();
		return;
	case VEC_UART:
		uart_interrupt();
		lapic_eoi();
		return;
	case VEC_VIRTIO ... VEC_VIRTIO + MAX_VIRTIO_IRQS - 1:
		if (tf->vector - VEC_VIRTIO < virtio_irq_count) {
			virtio_interrupt((uint32_t)(tf->vector - VEC_VIRTIO));
			lapic_eoi();
			return;
		}
		break;
	case VEC_SPURIOUS: /* no EOI for the spurious vector (SDM 11.9) */
	case 0x27:         /* spurious IRQ 7 / 15 of the 8259s */
	case 0x2f:
		return;
	default:
		break;
	}
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	if (tf->vector >= 32)
		what = "interrupt";
	else if (exception_names[tf->vector])
		what = exception_names[tf->vector];
	fail("%s vector %lu in ring %lu at rip=0x%lx err=0x%lx cr2=0x%lx rsp=0x%lx", what,
	     tf->vector, tf->cs & 3, tf->rip, tf->error, cr2, tf->rsp);
}

/* ---------------------------------------------------- ring-0 workloads */

static struct user_args user_args;

static __attribute__((noreturn)) void run_user(void (*fn)(const struct user_args *))
{
	user_args.cmdline = cmdline;
	user_args.ticks = &irq_ticks;
	user_args.ticks_ring3 = &irq_ticks_ring3;
	user_args.uart_irqs = &uart_irqs;
	/* As if called: RSP + 8 is 16-byte aligned at a function's entry.
	 * RFLAGS: IF set, IOPL 0 (no port access from ring 3). */
	enter_user((uint64_t)fn, (uint64_t)user_stack_top - 8, 0x202,
		   (uint64_t)&user_args);
}

/* pio count=N port=P: N byte writes to port P from ring 0. */
static __attribute__((noreturn)) void work_pio(void)
{
	uint64_t count = arg_u64("count", 1000);
	uint64_t port = arg_u64("port", 0x80);
	uint64_t n = count;

	if (port > 0xffff)
		fail("port=0x%lx is not a port: give 0..0xffff", port);
	if (n)
		__asm__ volatile("1: outb %%al, %%dx\n\t"
				 "dec %%rcx\n\t"
				 "jnz 1b"
				 : "+c"(n)
				 : "a"(0), "d"(port)
				 : "memory");
	kprintf("count=%lu\n", count);
	finish_done();
}

/* mmio count=N addr=A ring=0|3: N 32-bit writes to A. */
static __attribute__((noreturn)) void work_mmio(void)
{
	uint64_t count = arg_u64("count", 1000);
	uint64_t addr = arg_u64("addr", TEST_MMIO_BASE);
	uint64_t ring = arg_u64("ring", 0);
	uint64_t n = count;

	if (addr > 0xfffffffcULL || (addr & 3))
		fail("addr=0x%lx: give a 4-byte aligned address below 4 GiB", addr);
	if (ring == 3)
		run_user(user_mmio);
	if (ring != 0)
		fail("ring=%lu: give 0 or 3", ring);
	if (n)
		__asm__ volatile("1: movl %%eax, (%%rdx)\n\t"
				 "dec %%rcx\n\t"
				 "jnz 1b"
				 : "+c"(n)
				 : "a"(0), "d"(addr)
				 : "memory");
	kprintf("count=%lu\n", count);
	finish_done();
}

/* irq: a periodic LAPIC timer and COM1's interrupt through the IOAPIC;
 * ring 3 (user_irq) waits for both with interrupts on. */
static __attribute__((noreturn)) void work_irq(void)
{
	uint32_t pin = isa_irq_pin(4);

	lapic_enable();
	ioapic_route(pin, VEC_UART, lapic_id());
	kprintf("uart_irq_pin=%u\n", pin);
	/* 1 ms period: 62500 counts at 1 GHz / 16 (SDM vol. 3A 11.5.4). */
	lapic_write(LAPIC_TIMER_DIV, 0x3);
	lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | VEC_TIMER);
	lapic_write(LAPIC_TIMER_INIT, 62500);
	run_user(user_irq);
}

/* memcheck rate=R: a 1 ms LAPIC timer paces ring 3 (user_memcheck), which
 * waits for its ticks with SVC_WAIT; without a rate no interrupt comes. */
static __attribute__((noreturn)) void work_memcheck(void)
{
	if (arg_u64("rate", 0)) {
		lapic_enable();
		/* 1 ms period: 62500 counts at 1 GHz / 16 (SDM vol. 3A 11.5.4). */
		lapic_write(LAPIC_TIMER_DIV, 0x3);
		lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | VEC_TIMER);
		lapic_write(LAPIC_TIMER_INIT, 62500);
		watchdog_running = true; /* SVC_WAIT may halt: a tick always comes */
	}
	run_user(user_memcheck);
}

static volatile uint32_t cpus_up;

/* Sends an IPI and waits for the ICR's delivery status to clear. */
static void lapic_ipi(uint32_t apic_id, uint32_t icr)
{
	lapic_write(LAPIC_ICR_HI, apic_id << 24);
	lapic_write(LAPIC_ICR_LO, icr);
	for (int i = 0; i < 100000 && (lapic_read(LAPIC_ICR_LO) & ICR_BUSY); i++)
		cpu_relax();
}

/*
 * smp: counts the MP table's processors and starts each AP with
 * INIT-SIPI-SIPI (MP spec 1.4, appendix B.4; SDM vol. 3A 9.4.4). Each AP
 * runs the trampoline at AP_TRAMPOLINE, then head.S, then ap_main().
 */
static __attribute__((noreturn)) void work_smp(void)
{
	const struct mp_config *c = mp_find();
	struct mp_cpus cpus = { 0 };
	uint32_t bsp, expected = 0;
	size_t tramp_size = (size_t)(ap_tramp_end - ap_tramp_start);
	uint8_t *gdtr = phys(AP_TRAMPOLINE_GDTR);
	uint32_t gdt_base = (uint32_t)(uint64_t)boot_gdt;
	uint16_t gdt_limit = (uint16_t)(boot_gdt_end - boot_gdt - 1);

	if (!c)
		fail("no MP table in the EBDA or the BIOS area");
	mp_entries(c, mp_count_cpu, &cpus);
	kprintf("mp_cpus=%u\n", cpus.count);

	lapic_enable();
	bsp = lapic_id();
	memcpy(phys(AP_TRAMPOLINE), ap_tramp_start, tramp_size);
	memcpy(gdtr, &gdt_limit, 2);
	memcpy(gdtr + 2, &gdt_base, 4);
	ap_cr3 = (uint32_t)(uint64_t)pml4;

	for (uint32_t i = 0; i < cpus.count; i++) {
		uint32_t id = cpus.apic_id[i];

		if (id == bsp)
			continue;
		expected++;
		lapic_ipi(id, 0x00004500); /* INIT, level assert */
		lapic_delay_us(10000);
		lapic_ipi(id, 0x00004600 | (AP_TRAMPOLINE >> 12)); /* SIPI */
		lapic_delay_us(200);
		lapic_ipi(id, 0x00004600 | (AP_TRAMPOLINE >> 12));
		lapic_delay_us(200);
	}
	for (int ms = 0; ms < 2000 && cpus_up < expected; ms++)
		lapic_delay_us(1000);
	kprintf("cpus=%u\n", 1 + cpus_up);
	if (cpus_up != expected)
		fail("%u of %u application processors came up", cpus_up, expected);
	finish_done();
}

void ap_main(uint32_t slot)
{
	(void)slot;
	gdt_load();
	idt_load();
	kprintf("cpu %u up\n", lapic_id());
	__atomic_fetch_add(&cpus_up, 1, __ATOMIC_RELEASE);
	halt_forever();
}

/* triple: an exception with no IDT to deliver it through, nor the #GP nor
 * the #DF that follow: the CPU shuts down (SDM vol. 3A 6.15, interrupt 8). */
static __attribute__((noreturn)) void work_triple(void)
{
	struct table_register empty = { 0, 0 };

	kprintf("triple fault next\n");
	__asm__ volatile("lidt %0" : : "m"(empty));
	/* A non-canonical address: #GP. */
	__asm__ volatile("movq (%0), %%rax" : : "r"(0x8000000000000000ULL) : "rax", "memory");
	halt_forever();
}

static __attribute__((noreturn)) void work_reset(void)
{
	kprintf("resetting\n");
	machine_reset();
}

static __attribute__((noreturn)) void work_wait(void)
{
	kprintf("ready\n");
	halt_forever();
}

static const struct {
	const char *name;
	void (*run)(void);
	void (*user)(const struct user_args *args); /* instead of run: a ring-3 workload */
} workloads[] = {
	{ "hello", NULL, user_hello },
	{ "echo", NULL, user_echo },
	{ "dispatch", NULL, user_dispatch },
	{ "pio", work_pio, NULL },
	{ "mmio", work_mmio, NULL },
	{ "irq", work_irq, NULL },
	{ "smp", work_smp, NULL },
	{ "counter", NULL, user_counter },
	{ "memcheck", work_memcheck, NULL },
	{ "triple", work_triple, NULL },
	{ "reset", work_reset, NULL },
	{ "wait", work_wait, NULL },
	{ "vlist", NULL, user_vlist },
	{ "vblk", NULL, user_vblk },
	{ "vblk-bench", NULL, user_vblk_bench },
	{ "vblk-watch", NULL, user_vblk_watch },
	{ "vrng", NULL, user_vrng },
	{ "vnet", NULL, user_vnet },
	{ "vsock", NULL, user_vsock },
	{ "vbad", NULL, user_vbad },
	{ "hostile", NULL, user_hostile },
};

/* ------------------------------------------------------------- entry */

/* Linux boot protocol: struct boot_params (the zero page) fields
 * (Documentation/arch/x86/zero-page.rst, boot.rst). */
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_CMD_LINE_PTR 0x228
/* Multiboot information (Multiboot 0.6.96, 3.3): flags, cmdline at +16. */
#define MBI_FLAG_CMDLINE 0x04

void kmain(uint64_t boot, uint64_t arg0, uint64_t arg1)
{
	const char *protocol = "linux";
	char test[32];

	serial_init();
	if (boot == BOOT_LINUX) {
		const uint8_t *bp = (const uint8_t *)arg0;

		if (bp)
			copy_cmdline(*(const uint32_t *)(bp + BP_CMD_LINE_PTR) |
				     (uint64_t)*(const uint32_t *)(bp + BP_EXT_CMD_LINE_PTR) << 32);
	} else {
		const uint32_t *mbi = (const uint32_t *)arg1;

		protocol = "multiboot";
		if (arg0 != MB_BOOT_MAGIC)
			fail("multiboot entry with EAX=0x%lx, not 0x2badb002", arg0);
		if (mbi[0] & MBI_FLAG_CMDLINE)
			copy_cmdline(mbi[4]);
	}

	gdt_build();
	gdt_load();
	__asm__ volatile("ltr %w0" : : "r"(TSS_SEL));
	idt_build();
	idt_load();
	paging_build();
	paging_load();
	pic_disable();

	if (!cmdline_get(cmdline, "kasou.test", test, sizeof(test)))
		fail("no kasou.test=NAME on the command line \"%s\"", cmdline);
	kprintf("kasou-guest: boot=%s test=%s\n", protocol, test);
	for (size_t i = 0; i < sizeof(workloads) / sizeof(workloads[0]); i++)
		if (str_eq(workloads[i].name, test)) {
			if (workloads[i].user)
				run_user(workloads[i].user);
			workloads[i].run();
		}
	fail("unknown test %s", test);
}
