/*
 * virtio.h - the test guest's virtio driver: the virtio-mmio transport and
 * split virtqueues, for ring-3 workloads (vwork.c).
 *
 * Only what "Virtual I/O Device (VIRTIO) Version 1.2" (OASIS, 2022) calls
 * the modern interface: virtio-mmio version 2 registers (4.2.2), split
 * virtqueues (2.7), VIRTIO_F_VERSION_1. No legacy devices, no packed rings,
 * no PCI. Everything runs in ring 3: every page of this guest is
 * user-accessible and identity-mapped, so a buffer's address is its
 * guest-physical address, and MMIO from ring 3 is an ordinary exit.
 * Interrupts are optional and go through ring 0 (SVC_IRQ_ROUTE, SVC_WAIT).
 *
 * The device is not trusted: a used entry naming a descriptor that is not
 * the head of a chain in flight, or claiming more bytes than the chain could
 * take, ends the workload with a reason instead of corrupting the driver.
 */
#ifndef KASOU_VIRTIO_H
#define KASOU_VIRTIO_H

#include "guest.h"

/* virtio-mmio registers, version 2 (4.2.2, "MMIO Device Register Layout"). */
#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC 0x74726976 /* "virt" */

/* Device ids (5). */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_VSOCK 19

/* Device status (2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE 0x01
#define VIRTIO_STATUS_DRIVER 0x02
#define VIRTIO_STATUS_DRIVER_OK 0x04
#define VIRTIO_STATUS_FEATURES_OK 0x08
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

/* Reserved feature bits (6). */
#define VIRTIO_F_INDIRECT_DESC (1ULL << 28)
#define VIRTIO_F_EVENT_IDX (1ULL << 29)
#define VIRTIO_F_VERSION_1 (1ULL << 32)

/* Split virtqueue layout (2.7.5, 2.7.6, 2.7.8). */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1

struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};
_Static_assert(sizeof(struct virtq_desc) == 16, "virtq_desc is 16 bytes");

/* Followed by used_event (le16) when VIRTIO_F_EVENT_IDX is negotiated. */
struct virtq_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[];
};

struct virtq_used_elem {
	uint32_t id;
	uint32_t len;
};

/* Followed by avail_event (le16) when VIRTIO_F_EVENT_IDX is negotiated. */
struct virtq_used {
	uint16_t flags;
	uint16_t idx;
	struct virtq_used_elem ring[];
};

/* The largest queue this driver sets up; a device offering more gets this. */
#define VQ_MAX 256

/* A virtio-mmio transport the probe found. */
struct vdev {
	uint64_t base;	   /* the register window */
	uint32_t id;	   /* DeviceID */
	uint32_t vendor;   /* VendorID */
	uint64_t ioapic;   /* the IOAPIC its interrupt arrives at, 0 when unknown */
	uint32_t pin;	   /* ... and the pin */
	uint64_t offered;  /* DeviceFeatures, read by virtio_start */
	uint64_t features; /* what was negotiated */
	int irq;	   /* SVC_IRQ_ROUTE's number, -1 while polling */
};

/* One buffer of a chain: device-readable, or device-writable (write). */
struct vbuf {
	uint64_t addr;
	uint32_t len;
	bool write;
};

enum vq_wait_result {
	VQ_USED = 0,	    /* a used entry came */
	VQ_TIMEOUT = 1,	    /* none within VQ_WAIT_TSC */
	VQ_NEEDS_RESET = 2, /* the device set NEEDS_RESET (2.1.2) */
};

struct vq {
	struct vdev *dev;
	uint16_t index;
	uint16_t num;
	volatile struct virtq_desc *desc;
	volatile struct virtq_avail *avail;
	volatile struct virtq_used *used;
	volatile uint16_t *used_event;	/* in the avail ring, after ring[num] */
	volatile uint16_t *avail_event; /* in the used ring, after ring[num] */
	bool event_idx;
	uint16_t free_head;
	uint16_t num_free;
	uint16_t avail_idx;	 /* the driver's next avail->idx */
	uint16_t kicked_idx;	 /* avail_idx at the last notify decision */
	uint16_t last_used;	 /* used entries consumed so far (mod 2^16) */
	uint64_t notifies;	 /* QueueNotify writes */
	uint16_t snext[VQ_MAX];	 /* the driver's own next links (free list, chains) */
	uint16_t chain_len[VQ_MAX];
	uint32_t chain_in[VQ_MAX]; /* device-writable bytes of the chain */
	uint64_t token[VQ_MAX];
	bool busy[VQ_MAX];
};

/* Guest RAM for rings and buffers: a bump allocator over [4 MiB, 16 MiB),
 * zeroed. The virtio workloads need at least 16 MiB of guest RAM. */
void *dma_alloc(size_t size, size_t align);

/* Finds the virtio-mmio transports: kasou's windows (0xd0000000 + n * 0x1000,
 * n < 64) and QEMU microvm's (0xfeb00000 + n * 0x200, n < 24). A window whose
 * MagicValue, Version (2) or DeviceID (non-zero) do not fit is skipped. The
 * order is kasou's slots upwards, then microvm's downwards: for both, the
 * order the devices were configured in. QEMU's virtio-mmio is modern only
 * with -global virtio-mmio.force-legacy=false. */
int virtio_probe(struct vdev *devs, int max);
/* The nth (from 0) device with this id, or NULL. */
struct vdev *virtio_find(struct vdev *devs, int count, uint32_t id, int nth);

/* Reset, ACKNOWLEDGE, DRIVER, features (VERSION_1 and what of want the
 * device offers), FEATURES_OK and the check that it stuck (3.1.1). Fails the
 * workload when the device refuses. */
void virtio_start(struct vdev *d, uint64_t want);
/* QueueSel .. QueueReady for queue index, at most max entries (4.2.3.2). */
void vq_init(struct vdev *d, struct vq *q, uint16_t index, uint16_t max);
/* DRIVER_OK: the device is live (3.1.1, step 8). */
void virtio_ready(struct vdev *d);
/* Writes 0 to Status and waits for it to read 0 (4.2.3.1). */
void virtio_reset(struct vdev *d);
uint32_t virtio_status(struct vdev *d);
/* Routes the device's interrupt through ring 0; false when it has none. */
bool virtio_use_irq(struct vdev *d);

/* Device-specific configuration (4.2.2.2: each field at its own width; a
 * 64-bit field as two 32-bit reads under one ConfigGeneration). */
uint8_t vcfg8(struct vdev *d, uint32_t offset);
uint16_t vcfg16(struct vdev *d, uint32_t offset);
uint32_t vcfg32(struct vdev *d, uint32_t offset);
uint64_t vcfg64(struct vdev *d, uint32_t offset);

/* Adds a chain of n buffers (readable ones first) and makes it available.
 * Returns its head, or -1 when the queue lacks n free descriptors. */
int vq_add(struct vq *q, const struct vbuf *bufs, int n, uint64_t token);
/* Takes n descriptors off the free list for a chain the caller writes into
 * q->desc itself (index[0] is the head); -1 when there are too few. */
int vq_take(struct vq *q, int n, uint16_t *index);
/* Makes head, taken with vq_take(n), available. */
void vq_publish(struct vq *q, uint16_t head, int n, uint32_t in_bytes, uint64_t token);
/* Notifies the device of new buffers unless it asked not to be (2.7.10). */
bool vq_kick(struct vq *q);
/* Takes one used entry if there is one: its token and the length the device
 * wrote. */
bool vq_pop(struct vq *q, uint64_t *token, uint32_t *len);
/* Waits for a used entry, by polling the ring, or by interrupt once
 * virtio_use_irq() has routed one. */
enum vq_wait_result vq_wait(struct vq *q, uint64_t *token, uint32_t *len);
/* Asks for an interrupt at the next used entry, or for none (2.7.7). */
void vq_want_interrupt(struct vq *q, bool want);

/* CRC-32 as zlib's crc32() computes it (ISO 3309, reflected, 0xedb88320). */
uint32_t crc32(const void *data, size_t n);

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (uint64_t)hi << 32 | lo;
}

/* How long a wait for a device lasts: 2^35 TSC ticks, 10 s at 3.4 GHz. */
#define VQ_WAIT_TSC (1ULL << 35)

#endif /* KASOU_VIRTIO_H */
