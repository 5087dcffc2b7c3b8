/*
 * user.c - the ring-3 workloads of the kasou test guest.
 *
 * Ring 3 reaches devices two ways: MMIO directly (every page is
 * user-accessible), and everything else through ud2, which raises #UD; the
 * ring-0 handler (kernel.c, service()) does the service named in RAX and
 * returns past the ud2. On PVM `int N` and `syscall` from ring 3 are broken,
 * while exceptions raised in ring 3 are delivered through the IDT.
 *
 * Each workload ends with SVC_EXIT, which prints "kasou-guest: done" or
 * "kasou-guest: fail <reason>" and resets the machine.
 */
#include "guest.h"

#define TEST_MMIO_BASE 0xd0000000UL
#define TEST_PIO_BASE 0x500
#define COUNTER_ADDR 0x200000UL
#define COM1 0x3f8

void uwrite(const char *s, size_t n)
{
	svc(SVC_WRITE, (uint64_t)s, n);
}

void uprintf(const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vformat(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	uwrite(buf, n < (int)sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
}

void udone(void)
{
	for (;;)
		svc(SVC_EXIT, 0, 0);
}

void ufail(const char *fmt, ...)
{
	char reason[160];
	va_list ap;

	va_start(ap, fmt);
	vformat(reason, sizeof(reason), fmt, ap);
	va_end(ap);
	for (;;)
		svc(SVC_EXIT, 1, (uint64_t)reason);
}

uint64_t uarg(const struct user_args *args, const char *key, uint64_t fallback)
{
	char value[32];
	uint64_t v;

	if (!cmdline_get(args->cmdline, key, value, sizeof(value)))
		return fallback;
	if (!parse_u64(value, &v))
		ufail("bad value %s=%s: give a decimal or 0x-prefixed number", key, value);
	return v;
}

void user_hello(const struct user_args *args)
{
	(void)args;
	uprintf("hello from ring 3\n");
	udone();
}

/* echo n=N: N bytes in from COM1, each written straight back. */
void user_echo(const struct user_args *args)
{
	uint64_t n = uarg(args, "n", 1);
	uint8_t last = '\n';

	uprintf("echo: ready n=%lu\n", n);
	for (uint64_t i = 0; i < n; i++) {
		last = (uint8_t)svc(SVC_GETC, 0, 0);
		svc(SVC_PUTC, last, 0);
	}
	if (last != '\n')
		uwrite("\n", 1);
	udone();
}

/*
 * dispatch: one access of each kind, in this order, for a test device at
 * TEST_MMIO_BASE and TEST_PIO_BASE. Each value read is printed as key=0x...
 */
void user_dispatch(const struct user_args *args)
{
	const uint64_t m = TEST_MMIO_BASE;

	(void)args;
	mmio_w32(m + 0x00, 0x11223344);
	uprintf("mmio32=0x%08x\n", mmio_r32(m + 0x04));
	mmio_w8(m + 0x08, 0xa5);
	uprintf("mmio8=0x%02x\n", mmio_r8(m + 0x0c));
	mmio_w16(m + 0x10, 0xbeef);
	uprintf("mmio16=0x%04x\n", mmio_r16(m + 0x14));
	mmio_w64(m + 0x18, 0x0102030405060708ULL);
	uprintf("mmio64=0x%016lx\n", mmio_r64(m + 0x20));

	svc(SVC_OUTB, TEST_PIO_BASE, 0x5a);
	uprintf("pio8=0x%02lx\n", svc(SVC_INB, TEST_PIO_BASE, 0));
	svc(SVC_OUTW, TEST_PIO_BASE + 2, 0xbeef);
	uprintf("pio16=0x%04lx\n", svc(SVC_INW, TEST_PIO_BASE + 2, 0));
	svc(SVC_OUTL, TEST_PIO_BASE + 4, 0xcafef00d);
	uprintf("pio32=0x%08lx\n", svc(SVC_INL, TEST_PIO_BASE + 4, 0));
	udone();
}

/* mmio ... ring=3: the MMIO loop of kernel.c's work_mmio, from ring 3. */
void user_mmio(const struct user_args *args)
{
	uint64_t count = uarg(args, "count", 1000);
	uint64_t addr = uarg(args, "addr", TEST_MMIO_BASE);
	uint64_t n = count;

	if (n)
		__asm__ volatile("1: movl %%eax, (%%rdx)\n\t"
				 "dec %%rcx\n\t"
				 "jnz 1b"
				 : "+c"(n)
				 : "a"(0), "d"(addr)
				 : "memory");
	uprintf("count=%lu\n", count);
	udone();
}

/*
 * irq: ring 0 has started a 1 ms LAPIC timer and routed COM1's IRQ 4. This
 * side turns on the UART's THR-empty interrupt (IER bit 1, which fires at
 * once while the transmitter is empty) and spins until it has seen 10 ticks
 * and the UART interrupt. The spin is bounded so a lost interrupt fails
 * instead of hanging.
 */
void user_irq(const struct user_args *args)
{
	uint64_t spins = 0;
	uint64_t ticks, ticks_ring3, uart_irqs;

	svc(SVC_OUTB, COM1 + 1, 0x02);
	while (*args->ticks < 10 || *args->uart_irqs < 1) {
		__asm__ volatile("pause");
		if (++spins == (1ULL << 32))
			break;
	}
	/* One snapshot, so the printed figures agree with each other. */
	ticks_ring3 = *args->ticks_ring3;
	ticks = *args->ticks;
	uart_irqs = *args->uart_irqs;
	uprintf("ticks=%lu\n", ticks);
	uprintf("ticks_ring3=%lu\n", ticks_ring3);
	uprintf("uart_irq=%lu\n", uart_irqs);
	if (ticks < 10)
		ufail("fewer than 10 LAPIC timer interrupts");
	if (uart_irqs < 1)
		ufail("no COM1 interrupt through the IOAPIC");
	udone();
}

/* counter: a 64-bit counter at a fixed guest-physical address, forever. */
void user_counter(const struct user_args *args)
{
	volatile uint64_t *counter = phys(COUNTER_ADDR);

	(void)args;
	*counter = 0;
	uprintf("counter_addr=0x%lx\n", COUNTER_ADDR);
	for (;;)
		(*counter)++;
}

/*
 * memcheck mib=M rate=R report=N (16, 0, 16): proves that guest RAM and the
 * guest's own progress survive a pause, snapshot, restore, clone or
 * migration exactly. Pass p walks the M MiB at MEMCHECK_BASE page by page;
 * in page i it first checks that each 8-byte word w still holds
 * memcheck_mix(key(p - 1, i, w)), what pass p - 1 wrote (pass 0 checks
 * nothing), then writes memcheck_mix(key(p, i, w)). A word that differs ends
 * the run with "memcheck: page I word W pass P: got 0x... want 0x...".
 *
 * key(p, i, w) = p << 32 | i << 9 | w is one-to-one while i < 2^23 (mib is
 * capped at 2048, 2^19 pages), so no two words of the area, and no two passes
 * over one word, are meant to hold the same value. guestkit/memcheck.py
 * mirrors the mix and reads the status block.
 *
 * rate=R allows R pages per tick of the 1 ms LAPIC timer that kernel.c's
 * work_memcheck starts (a budget per tick, not carried over), and waits for
 * the next tick halted in ring 0 (SVC_WAIT). The timer is the clock because
 * its rate is known (1 GHz before the divider under KVM) where the TSC's
 * would have to be calibrated first; rate=0 runs as fast as the vCPU goes.
 */
#define MEMCHECK_STATUS 0x201000UL
#define MEMCHECK_BASE 0x1000000UL
#define MEMCHECK_MAGIC 0x6b636568636d656dULL /* "memcheck", little-endian */
#define MEMCHECK_MAX_MIB 2048
#define PAGE_WORDS 512

/* At MEMCHECK_STATUS, for the host to read while the VM is paused: every
 * field a little-endian u64. The magic is written last, once the rest is
 * valid. done counts pages finished in all passes together, so it only grows;
 * pass is set at the start of each pass, so for a moment after done reaches
 * pass * pages it still names the pass before. */
struct memcheck_status {
	uint64_t magic;
	uint64_t base;
	uint64_t pages; /* pages in the area */
	uint64_t pass;
	uint64_t done;
	uint64_t mismatches;
};

/* splitmix64's output function (Steele, Lea, Flood: "Fast splittable
 * pseudorandom number generators", OOPSLA 2014): two multiplies, three
 * xor-shifts, all plain integer instructions. */
static inline uint64_t memcheck_mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static __attribute__((noreturn, noinline, cold)) void
memcheck_mismatch(volatile struct memcheck_status *st, uint64_t page, uint64_t word, uint64_t pass,
		  uint64_t got, uint64_t want)
{
	st->mismatches++;
	ufail("memcheck: page %lu word %lu pass %lu: got 0x%016lx want 0x%016lx", page, word, pass,
	      got, want);
}

/* Whether addr holds RAM: kasou and QEMU read unclaimed guest-physical
 * addresses as all ones and drop writes there. */
static bool memcheck_is_ram(uint64_t addr)
{
	volatile uint64_t *p = phys(addr);
	const uint64_t probe = 0x5a5a5a5a00000000ULL | (addr >> 12);

	*p = probe;
	return *p == probe;
}

/* Spends one page of the tick's budget, first waiting for the next tick when
 * it is spent. */
static void memcheck_throttle(const struct user_args *args, uint64_t rate, uint64_t *tick,
			      uint64_t *used)
{
	if (*used >= rate) {
		while (*args->ticks == *tick)
			svc(SVC_WAIT, (uint64_t)args->ticks, (uint16_t)*tick);
		*tick = *args->ticks;
		*used = 0;
	}
	(*used)++;
}

void user_memcheck(const struct user_args *args)
{
	uint64_t mib = uarg(args, "mib", 16);
	uint64_t rate = uarg(args, "rate", 0);
	uint64_t report = uarg(args, "report", 16);
	volatile struct memcheck_status *st = phys(MEMCHECK_STATUS);
	uint64_t pages, done = 0, tick, used = 0;

	if (mib < 1 || mib > MEMCHECK_MAX_MIB)
		ufail("memcheck: mib=%lu: give 1 to %d", mib, MEMCHECK_MAX_MIB);
	pages = mib << 8;
	if (!memcheck_is_ram(MEMCHECK_BASE) || !memcheck_is_ram(MEMCHECK_BASE + (mib << 20) - 8))
		ufail("memcheck: no RAM in 0x%lx+%lu MiB: give the VM at least %lu MiB",
		      MEMCHECK_BASE, mib, (MEMCHECK_BASE >> 20) + mib);
	st->base = MEMCHECK_BASE;
	st->pages = pages;
	st->pass = 0;
	st->done = 0;
	st->mismatches = 0;
	st->magic = MEMCHECK_MAGIC;
	uprintf("memcheck: ready base=0x%lx mib=%lu\n", MEMCHECK_BASE, mib);

	tick = *args->ticks;
	for (uint64_t pass = 0;; pass++) {
		if (pass && report && pass % report == 0)
			uprintf("memcheck: pass %lu\n", pass);
		st->pass = pass;
		for (uint64_t i = 0; i < pages; i++) {
			volatile uint64_t *page = phys(MEMCHECK_BASE + (i << 12));
			uint64_t key = pass << 32 | i << 9;

			if (rate)
				memcheck_throttle(args, rate, &tick, &used);
			for (uint64_t w = 0; w < PAGE_WORDS; w++) {
				if (pass) {
					uint64_t want = memcheck_mix((key - (1ULL << 32)) | w);
					uint64_t got = page[w];

					if (got != want)
						memcheck_mismatch(st, i, w, pass, got, want);
				}
				page[w] = memcheck_mix(key | w);
			}
			/* The page's stores before the count: the host takes pages
			 * below done % pages as finished (x86 keeps stores in order). */
			__asm__ volatile("" : : : "memory");
			st->done = ++done;
		}
	}
}

/*
 * hostile count=N seed=S (100000, 1): a guest that attacks its VMM. N times,
 * with a xorshift64 generator seeded by S, it writes a random value of a random
 * width (1, 2 or 4 bytes) to a random I/O port, reads one, or writes or reads a
 * random register of a virtio-mmio window (0xd0000000 + n * 4 KiB, n < 32) or
 * a random address of the MMIO hole below 4 GiB (no RAM there in a small VM):
 * queue addresses, sizes, status bits and notifications the device must treat
 * as untrusted. It leaves alone what would end or silence the guest itself
 * rather than test the VMM: COM1 (its report), the i8042 and port 0x92 and
 * 0xcf9 (resets), the ACPI PM block 0x600-0x60f (power-off), the debug-exit
 * ports 0xf4-0xf7, and the in-kernel PIC, PIT, ELCR, IOAPIC and LAPIC (KVM's,
 * not kasou's, and able to interrupt it). Prints "hostile ops=K" every 2^16
 * operations and "hostile done ops=N".
 */
static uint64_t xorshift(uint64_t *state)
{
	uint64_t x = *state;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*state = x;
	return x;
}

static bool hostile_port_skipped(uint64_t port)
{
	return (port >= COM1 && port <= COM1 + 7) || port == 0x60 || port == 0x64 ||
	       port == 0x92 || (port >= 0xcf8 && port <= 0xcff) ||
	       (port >= 0x600 && port <= 0x60f) || (port >= 0xf4 && port <= 0xf7) ||
	       (port >= 0x20 && port <= 0x21) || (port >= 0xa0 && port <= 0xa1) ||
	       (port >= 0x40 && port <= 0x43) || (port >= 0x4d0 && port <= 0x4d1);
}

static bool hostile_address_skipped(uint64_t addr)
{
	return (addr >= 0xfec00000UL && addr < 0xfec01000UL) ||
	       (addr >= 0xfee00000UL && addr < 0xfee01000UL);
}

void user_hostile(const struct user_args *args)
{
	uint64_t count = uarg(args, "count", 100000);
	uint64_t state = uarg(args, "seed", 1) | 1;
	uint64_t i;

	uprintf("hostile start count=%lu\n", count);
	for (i = 0; i < count; i++) {
		uint64_t r = xorshift(&state);
		uint64_t value = xorshift(&state);
		unsigned int kind = r % 8;

		if (kind < 3) {
			uint64_t port = (r >> 8) & 0xffff;
			unsigned int width = (r >> 24) % 3;

			if (hostile_port_skipped(port))
				continue;
			if (kind == 2)
				svc(SVC_INB + 2 * width, port, 0);
			else
				svc(SVC_OUTB + 2 * width, port, value);
		} else if (kind < 7) {
			uint64_t addr = TEST_MMIO_BASE + ((r >> 8) % 32) * 0x1000 + ((r >> 16) & 0xffc);

			if (kind == 6)
				(void)mmio_r32(addr);
			else
				mmio_w32(addr, (uint32_t)value);
		} else {
			uint64_t addr = 0xc0000000UL + ((r >> 8) & 0x3ffffffcUL);

			if (hostile_address_skipped(addr))
				continue;
			if (r & (1UL << 40))
				(void)mmio_r32(addr);
			else
				mmio_w32(addr, (uint32_t)value);
		}
		if ((i & 0xffff) == 0xffff)
			uprintf("hostile ops=%lu\n", i + 1);
	}
	uprintf("hostile done ops=%lu\n", count);
	udone();
}
