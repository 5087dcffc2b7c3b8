/*
 * virtio.c - the test guest's virtio-mmio transport and split virtqueues,
 * run from ring 3 (see virtio.h for the scope).
 *
 * Ordering. The device is another thread of the host. x86 keeps stores in
 * program order and loads in program order (SDM vol. 3A 9.2.2), so making a
 * chain available (ring entry, then idx) and reading a used entry (idx, then
 * the entry) need only compiler barriers. The one store-then-load that must
 * not be reordered, publishing avail->idx and then reading the device's
 * notification suppression (2.7.10), takes a locked instruction as the full
 * barrier: mfence is among what build.py keeps out of the image.
 */
#include "virtio.h"

#define HEAP_START 0x400000UL
#define HEAP_END 0x1000000UL

#define KASOU_WINDOWS 0xd0000000UL
#define KASOU_WINDOW_SIZE 0x1000
#define KASOU_SLOTS 64
#define MICROVM_WINDOWS 0xfeb00000UL
#define MICROVM_WINDOW_SIZE 0x200
#define MICROVM_SLOTS 24
#define IOAPIC 0xfec00000UL
#define IOAPIC2 0xfec10000UL

/* How often a wait reads Status for NEEDS_RESET: every 2^22 TSC ticks. */
#define STATUS_CHECK_TSC (1ULL << 22)

/* kasou's interrupt lines for virtio-mmio slots 0, 1, ...: the IOAPIC pins
 * 5..23 less the RTC's 8, the ACPI SCI's 9 and the PS/2 mouse's 12
 * (kasou.arch.x86_64.layout.VIRTIO_IRQS, each line its own pin). */
static const uint8_t kasou_virtio_pins[] = { 5,	 6,  7,  10, 11, 13, 14, 15,
					     16, 17, 18, 19, 20, 21, 22, 23 };

static inline void barrier(void)
{
	__asm__ volatile("" : : : "memory");
}

static inline void full_barrier(void)
{
	__asm__ volatile("lock; addl $0, (%%rsp)" : : : "memory", "cc");
}

static inline void cpu_pause(void)
{
	__asm__ volatile("pause" : : : "memory");
}

static uint64_t heap_next = HEAP_START;

void *dma_alloc(size_t size, size_t align)
{
	uint64_t at = (heap_next + align - 1) & ~(uint64_t)(align - 1);

	if (at + size > HEAP_END || at + size < at)
		ufail("out of guest memory for virtio buffers: %lu bytes wanted, %lu left",
		      (uint64_t)size, HEAP_END - heap_next);
	heap_next = at + size;
	memset((void *)at, 0, size);
	return (void *)at;
}

static uint32_t reg_read(struct vdev *d, uint32_t reg)
{
	return mmio_r32(d->base + reg);
}

static void reg_write(struct vdev *d, uint32_t reg, uint32_t v)
{
	mmio_w32(d->base + reg, v);
}

/* --------------------------------------------------------------- probe */

/* An IOAPIC answers its version register (82093AA 3.2.2: version in bits
 * 0-7, highest redirection entry in 16-23); nothing at all reads 0 or ~0. */
static bool ioapic_present(uint64_t base)
{
	uint32_t v;

	mmio_w32(base, 0x01);
	v = mmio_r32(base + 0x10);
	return v != 0 && v != 0xffffffffU && (v & 0xff) != 0xff && ((v >> 16) & 0xff) >= 0x17;
}

static bool probe_one(struct vdev *d, uint64_t base)
{
	d->base = base;
	if (reg_read(d, VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC)
		return false;
	if (reg_read(d, VIRTIO_MMIO_VERSION) != 2)
		return false; /* a legacy (version 1) transport: not driven here */
	d->id = reg_read(d, VIRTIO_MMIO_DEVICE_ID);
	if (d->id == 0)
		return false; /* a placeholder without a device (4.2.3.1.1) */
	d->vendor = reg_read(d, VIRTIO_MMIO_VENDOR_ID);
	d->ioapic = 0;
	d->pin = 0;
	d->offered = 0;
	d->features = 0;
	d->irq = -1;
	return true;
}

int virtio_probe(struct vdev *devs, int max)
{
	int count = 0;
	int microvm_first;

	for (uint32_t n = 0; n < KASOU_SLOTS && count < max; n++) {
		if (!probe_one(&devs[count], KASOU_WINDOWS + n * KASOU_WINDOW_SIZE))
			continue;
		if (n < sizeof(kasou_virtio_pins)) {
			devs[count].ioapic = IOAPIC;
			devs[count].pin = kasou_virtio_pins[n];
		}
		count++;
	}
	microvm_first = count;
	/* QEMU gives the first -device the last transport, the next one the one
	 * below, and so on: scanning down finds them in command-line order. */
	for (uint32_t n = MICROVM_SLOTS; n-- > 0 && count < max;) {
		if (!probe_one(&devs[count], MICROVM_WINDOWS + n * MICROVM_WINDOW_SIZE))
			continue;
		devs[count].pin = n; /* resolved below */
		count++;
	}
	if (count > microvm_first) {
		/* QEMU 7.2's microvm: with its second IOAPIC (the default) transport
		 * n interrupts on that IOAPIC's pin n, else on the first one's pin
		 * 5 + n for the first 8 transports (hw/i386/microvm.c). */
		bool second = ioapic_present(IOAPIC2);

		for (int i = microvm_first; i < count; i++) {
			if (second) {
				devs[i].ioapic = IOAPIC2;
			} else if (devs[i].pin < 8) {
				devs[i].ioapic = IOAPIC;
				devs[i].pin += 5;
			}
		}
	}
	return count;
}

struct vdev *virtio_find(struct vdev *devs, int count, uint32_t id, int nth)
{
	for (int i = 0; i < count; i++)
		if (devs[i].id == id && nth-- == 0)
			return &devs[i];
	return NULL;
}

/* ----------------------------------------------------- initialisation */

uint32_t virtio_status(struct vdev *d)
{
	return reg_read(d, VIRTIO_MMIO_STATUS);
}

void virtio_reset(struct vdev *d)
{
	uint64_t start = rdtsc();

	reg_write(d, VIRTIO_MMIO_STATUS, 0);
	while (reg_read(d, VIRTIO_MMIO_STATUS) != 0) {
		if (rdtsc() - start > VQ_WAIT_TSC)
			ufail("virtio device at 0x%lx does not finish its reset", d->base);
		cpu_pause();
	}
}

void virtio_start(struct vdev *d, uint64_t want)
{
	uint32_t status = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER;
	uint64_t accept;

	/* 3.1.1, steps 1-6. */
	virtio_reset(d);
	reg_write(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
	reg_write(d, VIRTIO_MMIO_STATUS, status);
	reg_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	d->offered = (uint64_t)reg_read(d, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	reg_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	d->offered |= reg_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
	if (!(d->offered & VIRTIO_F_VERSION_1))
		ufail("virtio device %u at 0x%lx does not offer VIRTIO_F_VERSION_1", d->id,
		      d->base);
	accept = d->offered & (want | VIRTIO_F_VERSION_1);
	reg_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	reg_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(accept >> 32));
	reg_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	reg_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)accept);
	status |= VIRTIO_STATUS_FEATURES_OK;
	reg_write(d, VIRTIO_MMIO_STATUS, status);
	if (!(reg_read(d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
		reg_write(d, VIRTIO_MMIO_STATUS, status | VIRTIO_STATUS_FAILED);
		ufail("virtio device %u at 0x%lx refused features 0x%lx", d->id, d->base, accept);
	}
	d->features = accept;
}

bool virtio_use_irq(struct vdev *d)
{
	int64_t n;

	if (!d->ioapic)
		return false;
	n = (int64_t)svc3(SVC_IRQ_ROUTE, d->ioapic, d->pin, d->base);
	if (n < 0)
		return false;
	d->irq = (int)n;
	return true;
}

void vq_init(struct vdev *d, struct vq *q, uint16_t index, uint16_t max)
{
	uint32_t num_max;
	uint16_t num;
	uint64_t desc, avail, used;

	reg_write(d, VIRTIO_MMIO_QUEUE_SEL, index);
	if (reg_read(d, VIRTIO_MMIO_QUEUE_READY) != 0)
		ufail("virtio device %u at 0x%lx: queue %u is ready before set-up", d->id, d->base,
		      index);
	num_max = reg_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (num_max == 0)
		ufail("virtio device %u at 0x%lx has no queue %u", d->id, d->base, index);
	num = (uint16_t)(num_max < max ? num_max : max);
	if (num > VQ_MAX)
		num = VQ_MAX;
	/* 2.7: a split queue's size is a power of 2 at most 32768 (for
	 * version 1 devices any size is allowed; keep to powers of 2 anyway). */
	while (num & (num - 1))
		num &= (uint16_t)(num - 1);

	memset(q, 0, sizeof(*q));
	q->dev = d;
	q->index = index;
	q->num = num;
	q->event_idx = (d->features & VIRTIO_F_EVENT_IDX) != 0;
	/* 2.7, "Virtqueue Part Alignment": 16, 2 and 4 bytes; a page each. */
	q->desc = dma_alloc(16 * (size_t)num, 4096);
	q->avail = dma_alloc(6 + 2 * (size_t)num, 4096);
	q->used = dma_alloc(6 + 8 * (size_t)num, 4096);
	q->used_event = &q->avail->ring[num];
	q->avail_event = (volatile uint16_t *)&q->used->ring[num];
	for (uint16_t i = 0; i < num; i++)
		q->snext[i] = (uint16_t)(i + 1);
	q->free_head = 0;
	q->num_free = num;
	vq_want_interrupt(q, d->irq >= 0);

	desc = (uint64_t)q->desc;
	avail = (uint64_t)q->avail;
	used = (uint64_t)q->used;
	reg_write(d, VIRTIO_MMIO_QUEUE_NUM, num);
	reg_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)desc);
	reg_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
	reg_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)avail);
	reg_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
	reg_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)used);
	reg_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
	reg_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
}

void virtio_ready(struct vdev *d)
{
	reg_write(d, VIRTIO_MMIO_STATUS,
		  VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK |
			  VIRTIO_STATUS_DRIVER_OK);
}

/* -------------------------------------------------------------- config */

uint8_t vcfg8(struct vdev *d, uint32_t offset)
{
	return mmio_r8(d->base + VIRTIO_MMIO_CONFIG + offset);
}

uint16_t vcfg16(struct vdev *d, uint32_t offset)
{
	return mmio_r16(d->base + VIRTIO_MMIO_CONFIG + offset);
}

uint32_t vcfg32(struct vdev *d, uint32_t offset)
{
	return mmio_r32(d->base + VIRTIO_MMIO_CONFIG + offset);
}

uint64_t vcfg64(struct vdev *d, uint32_t offset)
{
	uint32_t generation, lo, hi;
	int tries = 0;

	/* 2.5.1: read again while ConfigGeneration moves under the read. */
	do {
		if (++tries > 100)
			ufail("virtio device %u at 0x%lx: config generation never settles", d->id,
			      d->base);
		generation = reg_read(d, VIRTIO_MMIO_CONFIG_GENERATION);
		lo = vcfg32(d, offset);
		hi = vcfg32(d, offset + 4);
	} while (generation != reg_read(d, VIRTIO_MMIO_CONFIG_GENERATION));
	return (uint64_t)hi << 32 | lo;
}

/* -------------------------------------------------------------- queues */

int vq_take(struct vq *q, int n, uint16_t *index)
{
	uint16_t at;

	if (n <= 0 || n > q->num_free)
		return -1;
	at = q->free_head;
	for (int i = 0; i < n; i++) {
		index[i] = at;
		at = q->snext[at];
	}
	/* The chain's own links, for vq_pop to give the descriptors back. */
	for (int i = 0; i + 1 < n; i++)
		q->snext[index[i]] = index[i + 1];
	q->free_head = at;
	q->num_free = (uint16_t)(q->num_free - n);
	return index[0];
}

void vq_publish(struct vq *q, uint16_t head, int n, uint32_t in_bytes, uint64_t token)
{
	q->chain_len[head] = (uint16_t)n;
	q->chain_in[head] = in_bytes;
	q->token[head] = token;
	q->busy[head] = true;
	/* 2.7.13: the ring entry, then (after it is visible) the index. */
	q->avail->ring[q->avail_idx % q->num] = head;
	barrier();
	q->avail_idx++;
	q->avail->idx = q->avail_idx;
}

int vq_add(struct vq *q, const struct vbuf *bufs, int n, uint64_t token)
{
	uint16_t index[VQ_MAX];
	uint32_t in_bytes = 0;
	int head;

	head = vq_take(q, n, index);
	if (head < 0)
		return -1;
	for (int i = 0; i < n; i++) {
		volatile struct virtq_desc *desc = &q->desc[index[i]];

		desc->addr = bufs[i].addr;
		desc->len = bufs[i].len;
		desc->flags = (uint16_t)((bufs[i].write ? VIRTQ_DESC_F_WRITE : 0) |
					 (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
		desc->next = i + 1 < n ? index[i + 1] : 0;
		if (bufs[i].write)
			in_bytes += bufs[i].len;
	}
	vq_publish(q, (uint16_t)head, n, in_bytes, token);
	return head;
}

bool vq_kick(struct vq *q)
{
	uint16_t old = q->kicked_idx;
	uint16_t new = q->avail_idx;
	bool need;

	if (old == new)
		return false;
	full_barrier();
	if (q->event_idx) {
		/* 2.7.10: notify when avail_event lies in [old, new). */
		uint16_t event = *q->avail_event;

		need = (uint16_t)(new - event - 1) < (uint16_t)(new - old);
	} else {
		need = !(q->used->flags & VIRTQ_USED_F_NO_NOTIFY);
	}
	q->kicked_idx = new;
	if (need) {
		mmio_w32(q->dev->base + VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
		q->notifies++;
	}
	return need;
}

void vq_want_interrupt(struct vq *q, bool want)
{
	if (q->event_idx) {
		/* 2.7.7.2: interrupt once used->idx passes used_event; one behind
		 * the driver means not before the index wraps. */
		*q->used_event = want ? q->last_used : (uint16_t)(q->last_used - 1);
	}
	q->avail->flags = want ? 0 : VIRTQ_AVAIL_F_NO_INTERRUPT;
}

bool vq_pop(struct vq *q, uint64_t *token, uint32_t *len)
{
	uint16_t used_idx = q->used->idx;
	uint32_t id, written;
	uint16_t at;

	if (used_idx == q->last_used)
		return false;
	if ((uint16_t)(used_idx - q->last_used) > q->num)
		ufail("virtio device %u queue %u: used idx %u is more than %u ahead of %u",
		      q->dev->id, q->index, used_idx, q->num, q->last_used);
	barrier();
	id = q->used->ring[q->last_used % q->num].id;
	written = q->used->ring[q->last_used % q->num].len;
	if (id >= q->num || !q->busy[id])
		ufail("virtio device %u queue %u: used id %u is not a chain in flight", q->dev->id,
		      q->index, id);
	if (written > q->chain_in[id])
		ufail("virtio device %u queue %u: used len %u, but the chain takes only %u",
		      q->dev->id, q->index, written, q->chain_in[id]);
	q->last_used++;
	if (q->dev->irq >= 0 && q->event_idx)
		*q->used_event = q->last_used;

	/* The chain's descriptors go back on the free list, by the driver's own
	 * links (the shared table may say anything by now). */
	q->busy[id] = false;
	at = (uint16_t)id;
	for (int i = 1; i < q->chain_len[id]; i++)
		at = q->snext[at];
	q->snext[at] = q->free_head;
	q->free_head = (uint16_t)id;
	q->num_free = (uint16_t)(q->num_free + q->chain_len[id]);
	if (token)
		*token = q->token[id];
	if (len)
		*len = written;
	return true;
}

enum vq_wait_result vq_wait(struct vq *q, uint64_t *token, uint32_t *len)
{
	uint64_t start = rdtsc();
	uint64_t checked = start;

	for (;;) {
		uint64_t now;

		if (vq_pop(q, token, len))
			return VQ_USED;
		if (q->dev->irq >= 0) {
			vq_want_interrupt(q, true);
			full_barrier();
			if (vq_pop(q, token, len))
				return VQ_USED;
			svc(SVC_WAIT, (uint64_t)&q->used->idx, q->last_used);
		} else {
			cpu_pause();
		}
		now = rdtsc();
		if (now - checked > STATUS_CHECK_TSC) {
			checked = now;
			if (virtio_status(q->dev) & VIRTIO_STATUS_NEEDS_RESET)
				return VQ_NEEDS_RESET;
		}
		if (now - start > VQ_WAIT_TSC)
			return VQ_TIMEOUT;
	}
}

/* ---------------------------------------------------------------- CRC */

uint32_t crc32(const void *data, size_t n)
{
	const uint8_t *p = data;
	uint32_t crc = 0xffffffffU;

	while (n--) {
		crc ^= *p++;
		for (int bit = 0; bit < 8; bit++)
			crc = (crc >> 1) ^ (0xedb88320U & (0U - (crc & 1)));
	}
	return ~crc;
}
