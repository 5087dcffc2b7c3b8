/*
 * vwork.c - the test guest's virtio workloads (vlist, vblk, vblk-bench,
 * vblk-watch, vrng, vnet, vsock, vbad), in ring 3 over the driver in virtio.c.
 *
 * Each prints lines a host test reads (documented in kasou.guestkit's
 * docstring) and ends with "kasou-guest: done" or "kasou-guest: fail ...".
 * A key=value argument "irq=1" makes a workload wait for its device's
 * interrupt (halting in ring 0) instead of polling the used ring.
 */
#include "virtio.h"

#define MAX_DEVICES 32
#define SECTOR 512

static struct vdev devices[MAX_DEVICES];
static int device_count;

static void probe(void)
{
	device_count = virtio_probe(devices, MAX_DEVICES);
}

static struct vdev *need_device(uint32_t id, int nth, const char *what)
{
	struct vdev *d = virtio_find(devices, device_count, id, nth);

	if (!d)
		ufail("no %s (virtio device id %u, number %d) among %d virtio devices", what, id,
		      nth + 1, device_count);
	return d;
}

/* irq=1: route the device's interrupt before its queues are set up. */
static void maybe_irq(const struct user_args *args, struct vdev *d)
{
	if (uarg(args, "irq", 0) && !virtio_use_irq(d))
		ufail("irq=1, but the device at 0x%lx has no known interrupt line", d->base);
}

static const char *wait_name(enum vq_wait_result r)
{
	return r == VQ_TIMEOUT ? "timeout" : r == VQ_NEEDS_RESET ? "needs-reset" : "used";
}

/* Copies a printable version of n bytes of src into out: other bytes as '.',
 * stopping at a NUL. */
static void printable(char *out, size_t size, const uint8_t *src, size_t n)
{
	size_t i;

	for (i = 0; i < n && i + 1 < size && src[i]; i++)
		out[i] = src[i] >= 0x20 && src[i] < 0x7f ? (char)src[i] : '.';
	out[i] = '\0';
}

static bool same_bytes(const uint8_t *a, const uint8_t *b, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (a[i] != b[i])
			return false;
	return true;
}

/* ---------------------------------------------------------------- vlist */

/* vlist: every virtio-mmio device the probe finds, one line each. */
void user_vlist(const struct user_args *args)
{
	(void)args;
	probe();
	for (int i = 0; i < device_count; i++)
		uprintf("virtio id=%u base=0x%lx vendor=0x%x ioapic=0x%lx pin=%u\n",
			devices[i].id, devices[i].base, devices[i].vendor, devices[i].ioapic,
			devices[i].pin);
	uprintf("virtio devices=%d\n", device_count);
	udone();
}

/* ---------------------------------------------------------------- block */

/* virtio 1.2 5.2: feature bits, config layout, request types, status. */
#define VIRTIO_BLK_F_RO (1ULL << 5)
#define VIRTIO_BLK_F_BLK_SIZE (1ULL << 6)
#define VIRTIO_BLK_F_FLUSH (1ULL << 9)
#define BLK_CFG_CAPACITY 0
#define BLK_CFG_BLK_SIZE 20
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_ID_BYTES 20
#define BLK_CHUNK (64 * 1024) /* the most one vblk request carries */

struct virtio_blk_req {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};
_Static_assert(sizeof(struct virtio_blk_req) == 16, "virtio_blk_req header is 16 bytes");

/* A request's header and status byte, device-visible. */
struct blk_slot {
	struct virtio_blk_req hdr;
	uint8_t status;
};

struct blk {
	struct vdev *dev;
	struct vq q;
	uint64_t capacity; /* 512-byte sectors */
	uint32_t blk_size;
	bool ro;
	bool flush;
	struct blk_slot *slot; /* for the one-at-a-time requests */
};

static struct blk blk_a, blk_b;

/* Results of blk_io besides a status byte. */
#define BLK_TIMEOUT (-1)
#define BLK_NEEDS_RESET (-2)

static void blk_start(const struct user_args *args, struct blk *b, struct vdev *d, uint64_t extra)
{
	b->dev = d;
	virtio_start(d, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH | extra);
	if (d->irq < 0)
		maybe_irq(args, d);
	vq_init(d, &b->q, 0, VQ_MAX);
	virtio_ready(d);
	b->capacity = vcfg64(d, BLK_CFG_CAPACITY);
	b->blk_size = d->features & VIRTIO_BLK_F_BLK_SIZE ? vcfg32(d, BLK_CFG_BLK_SIZE) : SECTOR;
	b->ro = (d->features & VIRTIO_BLK_F_RO) != 0;
	b->flush = (d->features & VIRTIO_BLK_F_FLUSH) != 0;
	if (!b->slot)
		b->slot = dma_alloc(sizeof(*b->slot), 64);
}

/* One request, waited for: its status byte, BLK_TIMEOUT or BLK_NEEDS_RESET. */
static int blk_io(struct blk *b, uint32_t type, uint64_t sector, void *buf, uint32_t len)
{
	struct vbuf bufs[3];
	int n = 0;
	enum vq_wait_result r;

	b->slot->hdr.type = type;
	b->slot->hdr.reserved = 0;
	b->slot->hdr.sector = sector;
	b->slot->status = 0xff;
	bufs[n++] = (struct vbuf){ (uint64_t)&b->slot->hdr, sizeof(b->slot->hdr), false };
	if (len)
		bufs[n++] = (struct vbuf){ (uint64_t)buf, len, type != VIRTIO_BLK_T_OUT };
	bufs[n++] = (struct vbuf){ (uint64_t)&b->slot->status, 1, true };
	if (vq_add(&b->q, bufs, n, 0) < 0)
		ufail("virtio-blk queue full with nothing in flight");
	vq_kick(&b->q);
	r = vq_wait(&b->q, NULL, NULL);
	if (r == VQ_TIMEOUT)
		return BLK_TIMEOUT;
	if (r == VQ_NEEDS_RESET)
		return BLK_NEEDS_RESET;
	return b->slot->status;
}

/* Whole sectors in requests of at most BLK_CHUNK bytes; the first status
 * that is not OK. */
static int blk_rw(struct blk *b, uint32_t type, uint64_t sector, uint8_t *buf, uint64_t count)
{
	while (count) {
		uint64_t n = count < BLK_CHUNK / SECTOR ? count : BLK_CHUNK / SECTOR;
		int status = blk_io(b, type, sector, buf, (uint32_t)(n * SECTOR));

		if (status != VIRTIO_BLK_S_OK)
			return status;
		sector += n;
		buf += n * SECTOR;
		count -= n;
	}
	return VIRTIO_BLK_S_OK;
}

/* The pattern vblk writes: little-endian 32-bit word j of sector s is
 * s * 0x9e3779b1 + j, modulo 2^32. */
static void fill_pattern(uint8_t *buf, uint64_t sector, uint64_t count)
{
	for (uint64_t s = 0; s < count; s++) {
		uint32_t *words = (uint32_t *)(buf + s * SECTOR);

		for (uint32_t j = 0; j < SECTOR / 4; j++)
			words[j] = (uint32_t)(sector + s) * 0x9e3779b1U + j;
	}
}

static void blk_check(const char *what, int status)
{
	if (status == BLK_TIMEOUT)
		ufail("vblk %s: no answer from the device", what);
	if (status == BLK_NEEDS_RESET)
		ufail("vblk %s: the device set NEEDS_RESET", what);
	if (status != VIRTIO_BLK_S_OK)
		ufail("vblk %s: status %d", what, status);
}

/*
 * vblk sector=S count=N: the first block device's geometry and serial, a
 * CRC-32 of sector 0, then (writable disk) a pattern written to sectors
 * S..S+N-1, flushed, read back and compared, or (read-only disk) a write
 * that must fail with VIRTIO_BLK_S_IOERR.
 */
void user_vblk(const struct user_args *args)
{
	uint64_t sector = uarg(args, "sector", 1);
	uint64_t count = uarg(args, "count", 8);
	struct blk *b = &blk_a;
	uint8_t *id, *wbuf, *rbuf;
	char serial[VIRTIO_BLK_ID_BYTES + 1];
	int status;

	probe();
	blk_start(args, b, need_device(VIRTIO_ID_BLOCK, 0, "block device"), 0);
	uprintf("vblk capacity=%lu blk_size=%u ro=%d\n", b->capacity, b->blk_size, b->ro);

	/* 5.2.6: GET_ID writes up to 20 bytes, NUL-terminated if shorter. */
	id = dma_alloc(VIRTIO_BLK_ID_BYTES, 64);
	status = blk_io(b, VIRTIO_BLK_T_GET_ID, 0, id, VIRTIO_BLK_ID_BYTES);
	if (status == VIRTIO_BLK_S_OK) {
		printable(serial, sizeof(serial), id, VIRTIO_BLK_ID_BYTES);
		uprintf("vblk serial=%s\n", serial);
	} else {
		uprintf("vblk serial status=%d\n", status);
	}

	rbuf = dma_alloc(SECTOR, 4096);
	blk_check("read of sector 0", blk_io(b, VIRTIO_BLK_T_IN, 0, rbuf, SECTOR));
	uprintf("vblk sector0 crc=0x%08x\n", crc32(rbuf, SECTOR));

	if (b->ro) {
		/* 5.2.6.2: a write to a read-only device fails with IOERR. */
		wbuf = dma_alloc(SECTOR, 4096);
		fill_pattern(wbuf, sector, 1);
		status = blk_io(b, VIRTIO_BLK_T_OUT, sector, wbuf, SECTOR);
		uprintf("vblk ro-write status=%d\n", status);
		if (status != VIRTIO_BLK_S_IOERR)
			ufail("a write to the read-only disk came back with status %d, not 1",
			      status);
		uprintf("vblk ok\n");
		udone();
	}

	if (count == 0 || count > (4U << 20) / SECTOR)
		ufail("count=%lu: give 1 to %u sectors", count, (4U << 20) / SECTOR);
	if (sector >= b->capacity || count > b->capacity - sector)
		ufail("sectors %lu..%lu lie past the disk's %lu", sector, sector + count - 1,
		      b->capacity);
	wbuf = dma_alloc(count * SECTOR, 4096);
	rbuf = dma_alloc(count * SECTOR, 4096);
	fill_pattern(wbuf, sector, count);
	blk_check("write", blk_rw(b, VIRTIO_BLK_T_OUT, sector, wbuf, count));
	uprintf("vblk write sector=%lu count=%lu status=0\n", sector, count);
	if (b->flush) {
		status = blk_io(b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0);
		uprintf("vblk flush status=%d\n", status);
		blk_check("flush", status);
	} else {
		uprintf("vblk flush unsupported\n");
	}
	blk_check("read back", blk_rw(b, VIRTIO_BLK_T_IN, sector, rbuf, count));
	for (uint64_t i = 0; i < count * SECTOR; i++)
		if (wbuf[i] != rbuf[i])
			ufail("read back differs at byte %lu of sector %lu: 0x%02x, wrote 0x%02x",
			      i % SECTOR, sector + i / SECTOR, rbuf[i], wbuf[i]);
	uprintf("vblk verify sector=%lu count=%lu ok\n", sector, count);
	uprintf("vblk ok\n");
	udone();
}

/* ------------------------------------------------------------ vblk-watch */

/*
 * vblk-watch sector=S every=N: reads sector S of the first block device
 * again and again, forever, and prints the CRC-32 of what it read every Nth
 * read. A VM restored from a snapshot goes on reading from the disk it was
 * restored with: the lines after the restore tell which content that has.
 */
void user_vblk_watch(const struct user_args *args)
{
	uint64_t sector = uarg(args, "sector", 0);
	uint64_t every = uarg(args, "every", 64);
	struct blk *b = &blk_a;
	uint8_t *rbuf;

	probe();
	blk_start(args, b, need_device(VIRTIO_ID_BLOCK, 0, "block device"), 0);
	if (sector >= b->capacity)
		ufail("sector=%lu lies past the disk's %lu sectors", sector, b->capacity);
	if (every == 0)
		every = 1;
	rbuf = dma_alloc(SECTOR, 4096);
	uprintf("vblk-watch sector=%lu every=%lu\n", sector, every);
	for (uint64_t reads = 1;; reads++) {
		blk_check("watch read", blk_io(b, VIRTIO_BLK_T_IN, sector, rbuf, SECTOR));
		if (reads % every == 0)
			uprintf("vblk-watch read=%lu crc=0x%08x\n", reads, crc32(rbuf, SECTOR));
	}
}

/* ------------------------------------------------------------ vblk-bench */

enum bench_mode { BENCH_READ, BENCH_WRITE, BENCH_RANDREAD };

/*
 * vblk-bench mode=read|write|randread size=BYTES count=N depth=D: N requests
 * of size bytes, D in flight, sequential from sector=S (0) wrapping within
 * span=SECTORS (the disk), or random size-aligned blocks in that span.
 * Prints a start and an end line; the host times between them.
 */
void user_vblk_bench(const struct user_args *args)
{
	char mode_name[16] = "read";
	uint64_t size = uarg(args, "size", 65536);
	uint64_t count = uarg(args, "count", 1000);
	uint64_t depth = uarg(args, "depth", 1);
	uint64_t base = uarg(args, "sector", 0);
	uint64_t span, blocks, spr, issued = 0, done = 0, rng = 0x853c49e6748fea9bULL;
	enum bench_mode mode;
	struct blk *b = &blk_a;
	struct blk_slot *slots;
	uint64_t *free_slots, nfree;
	uint8_t *data;

	cmdline_get(args->cmdline, "mode", mode_name, sizeof(mode_name));
	if (str_eq(mode_name, "read"))
		mode = BENCH_READ;
	else if (str_eq(mode_name, "write"))
		mode = BENCH_WRITE;
	else if (str_eq(mode_name, "randread"))
		mode = BENCH_RANDREAD;
	else
		ufail("mode=%s: give read, write or randread", mode_name);

	probe();
	blk_start(args, b, need_device(VIRTIO_ID_BLOCK, 0, "block device"), VIRTIO_F_EVENT_IDX);
	if (size == 0 || size % SECTOR || size > (1U << 20))
		ufail("size=%lu: give a multiple of 512 up to 1 MiB", size);
	if (depth == 0 || depth > b->q.num / 3 || depth * size > (8U << 20))
		ufail("depth=%lu: give 1 to %u, and depth * size at most 8 MiB", depth,
		      b->q.num / 3);
	if (mode == BENCH_WRITE && b->ro)
		ufail("mode=write on a read-only disk");
	spr = size / SECTOR;
	span = uarg(args, "span", b->capacity > base ? b->capacity - base : 0);
	if (base + span > b->capacity || span < spr)
		ufail("sector=%lu span=%lu: the disk has %lu sectors", base, span, b->capacity);
	blocks = span / spr;

	slots = dma_alloc(depth * sizeof(*slots), 64);
	data = dma_alloc(depth * size, 4096);
	/* Requests complete in any order: a slot is reused only once its own
	 * request is back. */
	free_slots = dma_alloc(depth * sizeof(*free_slots), 8);
	for (nfree = 0; nfree < depth; nfree++)
		free_slots[nfree] = depth - 1 - nfree;
	if (mode == BENCH_WRITE)
		fill_pattern(data, 0, depth * spr);

	uprintf("vblk-bench start mode=%s size=%lu count=%lu depth=%lu bytes=%lu\n", mode_name,
		size, count, depth, size * count);
	while (done < count) {
		uint64_t token;
		enum vq_wait_result r;

		/* Fill every free slot, then one notify for the lot. */
		while (issued < count && nfree > 0) {
			uint64_t i = free_slots[--nfree], block;
			struct vbuf bufs[3];

			if (mode == BENCH_RANDREAD) {
				rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
				block = (rng >> 33) % blocks;
			} else {
				block = issued % blocks;
			}
			slots[i].hdr.type = mode == BENCH_WRITE ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
			slots[i].hdr.reserved = 0;
			slots[i].hdr.sector = base + block * spr;
			slots[i].status = 0xff;
			bufs[0] = (struct vbuf){ (uint64_t)&slots[i].hdr, sizeof(slots[i].hdr), false };
			bufs[1] = (struct vbuf){ (uint64_t)(data + i * size), (uint32_t)size,
						 mode != BENCH_WRITE };
			bufs[2] = (struct vbuf){ (uint64_t)&slots[i].status, 1, true };
			if (vq_add(&b->q, bufs, 3, i) < 0)
				ufail("vblk-bench: queue full at depth %lu", issued - done);
			issued++;
		}
		vq_kick(&b->q);
		r = vq_wait(&b->q, &token, NULL);
		if (r != VQ_USED)
			ufail("vblk-bench: %s after %lu of %lu requests", wait_name(r), done, count);
		do {
			if (slots[token].status != VIRTIO_BLK_S_OK)
				ufail("vblk-bench: request %lu came back with status %u", done,
				      slots[token].status);
			free_slots[nfree++] = token;
			done++;
		} while (vq_pop(&b->q, &token, NULL));
	}
	uprintf("vblk-bench end bytes=%lu notifies=%lu irqs=%lu\n", size * count, b->q.notifies,
		b->dev->irq >= 0 ? virtio_irqs[b->dev->irq] : 0);
	udone();
}

/* ------------------------------------------------------------------ rng */

#define RNG_BYTES 64

static void rng_read(struct vq *q, uint8_t *buf)
{
	uint32_t got = 0;

	/* 5.4.6: the device may fill less than the buffer; ask again. */
	while (got < RNG_BYTES) {
		struct vbuf part = { (uint64_t)(buf + got), RNG_BYTES - got, true };
		uint32_t len;
		enum vq_wait_result r;

		if (vq_add(q, &part, 1, 0) < 0)
			ufail("virtio-rng queue full with nothing in flight");
		vq_kick(q);
		r = vq_wait(q, NULL, &len);
		if (r != VQ_USED)
			ufail("vrng: %s waiting for entropy", wait_name(r));
		got += len;
	}
}

static void print_hex(const char *label, const uint8_t *p, size_t n)
{
	char line[2 * RNG_BYTES + 1];
	static const char digits[] = "0123456789abcdef";

	for (size_t i = 0; i < n && i < RNG_BYTES; i++) {
		line[2 * i] = digits[p[i] >> 4];
		line[2 * i + 1] = digits[p[i] & 15];
	}
	line[2 * (n < RNG_BYTES ? n : RNG_BYTES)] = '\0';
	uprintf("%s%s\n", label, line);
}

/* vrng: 64 bytes from virtio-rng, twice; they may be neither all zero nor equal. */
void user_vrng(const struct user_args *args)
{
	static struct vq q;
	struct vdev *d;
	uint8_t *first, *second;
	bool zero = true;

	probe();
	d = need_device(VIRTIO_ID_RNG, 0, "entropy device");
	virtio_start(d, 0);
	maybe_irq(args, d);
	vq_init(d, &q, 0, VQ_MAX);
	virtio_ready(d);
	first = dma_alloc(RNG_BYTES, 64);
	second = dma_alloc(RNG_BYTES, 64);
	rng_read(&q, first);
	rng_read(&q, second);
	print_hex("vrng 1 ", first, RNG_BYTES);
	print_hex("vrng 2 ", second, RNG_BYTES);
	for (int i = 0; i < RNG_BYTES; i++)
		if (first[i] || second[i])
			zero = false;
	if (zero)
		ufail("virtio-rng gave only zero bytes");
	if (same_bytes(first, second, RNG_BYTES))
		ufail("virtio-rng gave the same 64 bytes twice");
	uprintf("vrng ok\n");
	udone();
}

/* ------------------------------------------------------------------ net */

/* virtio 1.2 5.1: feature bits, config, the header of every packet. */
#define VIRTIO_NET_F_MAC (1ULL << 5)
#define NET_CFG_MAC 0
#define NET_RX_BUFFERS 16
#define NET_BUFFER 2048 /* a header and a 1514-byte frame, without offloads */
#define ETH_HEADER 14
#define ETH_MIN_FRAME 60 /* without the FCS */
#define VNET_ETHERTYPE 0x88b5 /* IEEE 802 local experimental ethertype 1 */

struct virtio_net_hdr_v1 {
	uint8_t flags;
	uint8_t gso_type;
	uint16_t hdr_len;
	uint16_t gso_size;
	uint16_t csum_start;
	uint16_t csum_offset;
	uint16_t num_buffers;
};
_Static_assert(sizeof(struct virtio_net_hdr_v1) == 12, "virtio_net_hdr_v1 is 12 bytes");

static void net_post_rx(struct vq *rx, uint8_t *buffers, uint64_t i)
{
	struct vbuf buf = { (uint64_t)(buffers + i * NET_BUFFER), NET_BUFFER, true };

	if (vq_add(rx, &buf, 1, i) < 0)
		ufail("virtio-net receive queue full");
}

/*
 * vnet payload=TEXT: the MAC from config space; one broadcast frame of
 * ethertype 0x88b5 carrying TEXT; then the first received frame of that
 * ethertype (others are counted and skipped).
 */
void user_vnet(const struct user_args *args)
{
	static struct vq rx, tx;
	char payload[128] = "kasou";
	char text[64];
	uint8_t mac[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
	struct vdev *d;
	uint8_t *buffers, *frame;
	struct vbuf out;
	size_t plen, flen;
	uint64_t token, skipped = 0, count;
	uint32_t len;
	enum vq_wait_result r;

	cmdline_get(args->cmdline, "payload", payload, sizeof(payload));
	plen = str_len(payload);
	probe();
	d = need_device(VIRTIO_ID_NET, 0, "network device");
	virtio_start(d, VIRTIO_NET_F_MAC);
	maybe_irq(args, d);
	vq_init(d, &rx, 0, VQ_MAX);
	vq_init(d, &tx, 1, VQ_MAX);
	virtio_ready(d);
	if (d->features & VIRTIO_NET_F_MAC)
		for (int i = 0; i < 6; i++)
			mac[i] = vcfg8(d, NET_CFG_MAC + (uint32_t)i);
	uprintf("vnet mac=%02x:%02x:%02x:%02x:%02x:%02x\n", mac[0], mac[1], mac[2], mac[3],
		mac[4], mac[5]);

	/* Receive buffers first, so an answer to the frame has somewhere to go. */
	buffers = dma_alloc(NET_RX_BUFFERS * NET_BUFFER, 4096);
	for (uint64_t i = 0; i < NET_RX_BUFFERS; i++)
		net_post_rx(&rx, buffers, i);
	vq_kick(&rx);

	/* 5.1.6.2: a zeroed header (no checksum, no GSO; num_buffers 0), then the
	 * frame, in one buffer (VERSION_1 allows any layout, 2.6.4). */
	flen = ETH_HEADER + plen < ETH_MIN_FRAME ? ETH_MIN_FRAME : ETH_HEADER + plen;
	frame = dma_alloc(sizeof(struct virtio_net_hdr_v1) + flen, 64);
	memset(frame + sizeof(struct virtio_net_hdr_v1), 0xff, 6);
	memcpy(frame + sizeof(struct virtio_net_hdr_v1) + 6, mac, 6);
	frame[sizeof(struct virtio_net_hdr_v1) + 12] = VNET_ETHERTYPE >> 8;
	frame[sizeof(struct virtio_net_hdr_v1) + 13] = VNET_ETHERTYPE & 0xff;
	memcpy(frame + sizeof(struct virtio_net_hdr_v1) + ETH_HEADER, payload, plen);
	out = (struct vbuf){ (uint64_t)frame, (uint32_t)(sizeof(struct virtio_net_hdr_v1) + flen),
			     false };
	/* count=N: the frame N times, one in flight (a transmit rate to measure). */
	count = uarg(args, "count", 1);
	if (count > 1)
		uprintf("vnet tx start count=%lu\n", count);
	for (uint64_t sent = 0; sent < count; sent++) {
		if (vq_add(&tx, &out, 1, 0) < 0)
			ufail("virtio-net transmit queue full with nothing in flight");
		vq_kick(&tx);
		r = vq_wait(&tx, NULL, NULL);
		if (r != VQ_USED)
			ufail("vnet: %s waiting for the transmit queue", wait_name(r));
	}
	if (count > 1)
		uprintf("vnet tx len=%lu count=%lu\n", (uint64_t)flen, count);
	else
		uprintf("vnet tx len=%lu\n", (uint64_t)flen);

	for (;;) {
		uint8_t *got;
		uint32_t ethertype;

		r = vq_wait(&rx, &token, &len);
		if (r != VQ_USED)
			ufail("vnet: %s waiting for a frame of ethertype 0x%04x (%lu others seen)",
			      wait_name(r), VNET_ETHERTYPE, skipped);
		got = buffers + token * NET_BUFFER;
		if (len >= sizeof(struct virtio_net_hdr_v1) + ETH_HEADER) {
			uint8_t *eth = got + sizeof(struct virtio_net_hdr_v1);
			size_t elen = len - sizeof(struct virtio_net_hdr_v1);

			ethertype = (uint32_t)eth[12] << 8 | eth[13];
			if (ethertype == VNET_ETHERTYPE) {
				printable(text, sizeof(text), eth + ETH_HEADER, elen - ETH_HEADER);
				uprintf("vnet rx len=%lu src=%02x:%02x:%02x:%02x:%02x:%02x "
					"payload=%s\n",
					(uint64_t)elen, eth[6], eth[7], eth[8], eth[9], eth[10],
					eth[11], text);
				break;
			}
		}
		skipped++;
		net_post_rx(&rx, buffers, token);
		vq_kick(&rx);
	}
	uprintf("vnet skipped=%lu\n", skipped);
	uprintf("vnet ok\n");
	udone();
}

/* ---------------------------------------------------------------- vsock */

/* virtio 1.2 5.10: the packet header, its types and operations. */
#define VSOCK_CFG_GUEST_CID 0
#define VSOCK_HOST_CID 2
#define VSOCK_TYPE_STREAM 1
#define VSOCK_OP_REQUEST 1
#define VSOCK_OP_RESPONSE 2
#define VSOCK_OP_RST 3
#define VSOCK_OP_SHUTDOWN 4
#define VSOCK_OP_RW 5
#define VSOCK_OP_CREDIT_UPDATE 6
#define VSOCK_OP_CREDIT_REQUEST 7
#define VSOCK_SHUTDOWN_BOTH 3 /* VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE | _F_SEND */
#define VSOCK_RX_BUFFERS 8
#define VSOCK_RX_DATA 4096
#define VSOCK_EVENT_BUFFERS 4
#define VSOCK_BUF_ALLOC 65536 /* the receive space this driver promises */

struct virtio_vsock_hdr {
	uint64_t src_cid;
	uint64_t dst_cid;
	uint32_t src_port;
	uint32_t dst_port;
	uint32_t len;
	uint16_t type;
	uint16_t op;
	uint32_t flags;
	uint32_t buf_alloc;
	uint32_t fwd_cnt;
} __attribute__((packed));
_Static_assert(sizeof(struct virtio_vsock_hdr) == 44, "virtio_vsock_hdr is 44 bytes");

struct vsock {
	struct vq rx, tx, event;
	uint64_t cid;
	uint32_t port, lport;
	uint32_t peer_buf_alloc, peer_fwd_cnt; /* the peer's credit (5.10.6.3) */
	uint32_t tx_cnt, fwd_cnt;
	struct virtio_vsock_hdr *rx_hdr; /* VSOCK_RX_BUFFERS headers */
	uint8_t *rx_data;		 /* ... and their payload buffers */
	struct virtio_vsock_hdr *tx_hdr;
	uint8_t *tx_data;
	uint64_t skipped;
};

static struct vsock vs;

static void vsock_post_rx(uint64_t i)
{
	/* Header and payload in separate buffers: any layout is allowed (2.6.4),
	 * and this one suits devices that read the header alone first. */
	struct vbuf bufs[2] = {
		{ (uint64_t)&vs.rx_hdr[i], sizeof(struct virtio_vsock_hdr), true },
		{ (uint64_t)(vs.rx_data + i * VSOCK_RX_DATA), VSOCK_RX_DATA, true },
	};

	if (vq_add(&vs.rx, bufs, 2, i) < 0)
		ufail("virtio-vsock receive queue full");
}

static void vsock_send(uint16_t op, uint32_t flags, const void *data, uint32_t len)
{
	struct vbuf bufs[2];
	enum vq_wait_result r;

	vs.tx_hdr->src_cid = vs.cid;
	vs.tx_hdr->dst_cid = VSOCK_HOST_CID;
	vs.tx_hdr->src_port = vs.lport;
	vs.tx_hdr->dst_port = vs.port;
	vs.tx_hdr->len = len;
	vs.tx_hdr->type = VSOCK_TYPE_STREAM;
	vs.tx_hdr->op = op;
	vs.tx_hdr->flags = flags;
	vs.tx_hdr->buf_alloc = VSOCK_BUF_ALLOC;
	vs.tx_hdr->fwd_cnt = vs.fwd_cnt;
	bufs[0] = (struct vbuf){ (uint64_t)vs.tx_hdr, sizeof(*vs.tx_hdr), false };
	if (len) {
		memcpy(vs.tx_data, data, len);
		bufs[1] = (struct vbuf){ (uint64_t)vs.tx_data, len, false };
	}
	if (vq_add(&vs.tx, bufs, len ? 2 : 1, 0) < 0)
		ufail("virtio-vsock transmit queue full with nothing in flight");
	vq_kick(&vs.tx);
	r = vq_wait(&vs.tx, NULL, NULL);
	if (r != VQ_USED)
		ufail("vsock: %s waiting for the transmit queue (op %u)", wait_name(r), op);
	if (op == VSOCK_OP_RW)
		vs.tx_cnt += len;
}

/* The next packet of this connection: its header is copied to *hdr and up to
 * size payload bytes to data. Packets for other ports are counted and
 * dropped. False on a timeout. */
static bool vsock_recv(struct virtio_vsock_hdr *hdr, uint8_t *data, uint32_t size)
{
	for (;;) {
		uint64_t i;
		uint32_t len, plen;
		enum vq_wait_result r = vq_wait(&vs.rx, &i, &len);

		if (r == VQ_TIMEOUT)
			return false;
		if (r != VQ_USED)
			ufail("vsock: %s waiting for a packet", wait_name(r));
		memcpy(hdr, &vs.rx_hdr[i], sizeof(*hdr));
		/* The device's header is checked against what it said it wrote. */
		if (len < sizeof(*hdr) || hdr->len > VSOCK_RX_DATA ||
		    hdr->len > len - sizeof(*hdr))
			ufail("vsock: a packet of %u bytes claims a payload of %u", len, hdr->len);
		plen = hdr->len < size ? hdr->len : size;
		memcpy(data, vs.rx_data + i * VSOCK_RX_DATA, plen);
		vsock_post_rx(i);
		vq_kick(&vs.rx);
		if (hdr->src_cid != VSOCK_HOST_CID || hdr->dst_cid != vs.cid ||
		    hdr->src_port != vs.port || hdr->dst_port != vs.lport ||
		    hdr->type != VSOCK_TYPE_STREAM) {
			vs.skipped++;
			continue;
		}
		vs.peer_buf_alloc = hdr->buf_alloc;
		vs.peer_fwd_cnt = hdr->fwd_cnt;
		if (hdr->op == VSOCK_OP_CREDIT_REQUEST) {
			vsock_send(VSOCK_OP_CREDIT_UPDATE, 0, NULL, 0);
			continue;
		}
		if (hdr->op == VSOCK_OP_CREDIT_UPDATE)
			continue;
		return true;
	}
}

/*
 * vsock port=P lport=L payload=TEXT: connects from guest port L (49152) to
 * the host (CID 2) port P (1234), sends TEXT, reads the same number of bytes
 * back, shuts the connection down and waits for the host's RST.
 */
void user_vsock(const struct user_args *args)
{
	char payload[128] = "kasou-vsock";
	char text[129];
	uint8_t echo[128];
	static uint8_t data[VSOCK_RX_DATA];
	struct virtio_vsock_hdr hdr;
	struct vdev *d;
	uint32_t plen, got = 0;
	uint32_t *events;

	cmdline_get(args->cmdline, "payload", payload, sizeof(payload));
	plen = (uint32_t)str_len(payload);
	vs.port = (uint32_t)uarg(args, "port", 1234);
	vs.lport = (uint32_t)uarg(args, "lport", 49152);
	probe();
	d = need_device(VIRTIO_ID_VSOCK, 0, "socket device");
	virtio_start(d, 0);
	maybe_irq(args, d);
	/* 5.10.2: rx, tx, event. */
	vq_init(d, &vs.rx, 0, 64);
	vq_init(d, &vs.tx, 1, 64);
	vq_init(d, &vs.event, 2, 16);
	virtio_ready(d);
	vs.cid = vcfg64(d, VSOCK_CFG_GUEST_CID);
	uprintf("vsock guest_cid=%lu\n", vs.cid);

	vs.rx_hdr = dma_alloc(VSOCK_RX_BUFFERS * sizeof(struct virtio_vsock_hdr), 64);
	vs.rx_data = dma_alloc(VSOCK_RX_BUFFERS * VSOCK_RX_DATA, 4096);
	vs.tx_hdr = dma_alloc(sizeof(struct virtio_vsock_hdr), 64);
	vs.tx_data = dma_alloc(VSOCK_RX_DATA, 4096);
	for (uint64_t i = 0; i < VSOCK_RX_BUFFERS; i++)
		vsock_post_rx(i);
	vq_kick(&vs.rx);
	/* 5.10.6.1: the event queue gets buffers too (struct virtio_vsock_event,
	 * le32 id); nothing here waits on it. */
	events = dma_alloc(VSOCK_EVENT_BUFFERS * sizeof(uint32_t), 64);
	for (int i = 0; i < VSOCK_EVENT_BUFFERS; i++) {
		struct vbuf ev = { (uint64_t)&events[i], sizeof(uint32_t), true };

		if (vq_add(&vs.event, &ev, 1, (uint64_t)i) < 0)
			ufail("virtio-vsock event queue has fewer than %d entries",
			      VSOCK_EVENT_BUFFERS);
	}
	vq_kick(&vs.event);

	/* 5.10.6.4: REQUEST, answered by RESPONSE (or RST: nobody listens). */
	vsock_send(VSOCK_OP_REQUEST, 0, NULL, 0);
	if (!vsock_recv(&hdr, data, sizeof(data)))
		ufail("vsock: no answer to the connection request to port %u", vs.port);
	if (hdr.op == VSOCK_OP_RST)
		ufail("vsock: the host refused port %u (RST)", vs.port);
	if (hdr.op != VSOCK_OP_RESPONSE)
		ufail("vsock: op %u in answer to REQUEST, not RESPONSE", hdr.op);
	uprintf("vsock connected port=%u lport=%u peer_buf_alloc=%u\n", vs.port, vs.lport,
		vs.peer_buf_alloc);

	/* 5.10.6.3: send only what the peer has room for. */
	if (vs.peer_buf_alloc - (vs.tx_cnt - vs.peer_fwd_cnt) < plen)
		ufail("vsock: the host gives %u bytes of credit, %u needed",
		      vs.peer_buf_alloc - (vs.tx_cnt - vs.peer_fwd_cnt), plen);
	vsock_send(VSOCK_OP_RW, 0, payload, plen);
	uprintf("vsock tx len=%u\n", plen);

	while (got < plen) {
		uint32_t n;

		if (!vsock_recv(&hdr, data, sizeof(data)))
			ufail("vsock: %u of %u bytes came back", got, plen);
		if (hdr.op == VSOCK_OP_RST || hdr.op == VSOCK_OP_SHUTDOWN)
			ufail("vsock: the host closed the connection (op %u) after %u bytes",
			      hdr.op, got);
		if (hdr.op != VSOCK_OP_RW)
			continue;
		n = hdr.len < plen - got ? hdr.len : plen - got;
		memcpy(echo + got, data, n);
		got += n;
		vs.fwd_cnt += hdr.len;
	}
	printable(text, sizeof(text), echo, got);
	uprintf("vsock rx len=%u data=%s\n", got, text);

	/* 5.10.6.5: SHUTDOWN with both flags; the peer ends it with RST. */
	vsock_send(VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_BOTH, NULL, 0);
	for (;;) {
		if (!vsock_recv(&hdr, data, sizeof(data))) {
			vsock_send(VSOCK_OP_RST, 0, NULL, 0);
			uprintf("vsock closed by=guest\n");
			break;
		}
		if (hdr.op == VSOCK_OP_RST) {
			uprintf("vsock closed by=host\n");
			break;
		}
	}
	uprintf("vsock skipped=%lu\n", vs.skipped);
	uprintf("vsock ok\n");
	udone();
}

/* ----------------------------------------------------------------- vbad */

/* Far outside any RAM or device a test VM has: 256 GiB. */
#define OUTSIDE_RAM 0x4000000000ULL

struct bad_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	int next; /* the index in this chain the descriptor links to, -1: none */
};

/* Writes a chain exactly as given into the ring and makes it available. */
static void submit_raw(struct vq *q, const struct bad_desc *chain, int n, uint32_t in_bytes)
{
	uint16_t index[VQ_MAX];

	if (vq_take(q, n, index) < 0)
		ufail("vbad: no %d free descriptors", n);
	for (int i = 0; i < n; i++) {
		q->desc[index[i]].addr = chain[i].addr;
		q->desc[index[i]].len = chain[i].len;
		q->desc[index[i]].flags = chain[i].flags;
		q->desc[index[i]].next = chain[i].next >= 0 ? index[chain[i].next] : 0;
	}
	vq_publish(q, index[0], n, in_bytes, 0);
	vq_kick(q);
}

/* One malformed request and what came of it; true when the device refused
 * it (used length 0, an error status, or NEEDS_RESET), after which the device
 * is ready for the next one. */
static bool bad_case(const struct user_args *args, const char *name, const struct bad_desc *chain,
		     int n, uint32_t in_bytes)
{
	struct blk *b = &blk_a;
	uint32_t len;
	uint8_t status;
	enum vq_wait_result r;

	b->slot->status = 0xff;
	submit_raw(&b->q, chain, n, in_bytes);
	r = vq_wait(&b->q, NULL, &len);
	if (r == VQ_NEEDS_RESET) {
		uprintf("vbad %s needs-reset\n", name);
		blk_start(args, b, b->dev, VIRTIO_F_INDIRECT_DESC);
		return true;
	}
	if (r == VQ_TIMEOUT) {
		uprintf("vbad %s no-answer status=0x%x\n", name, virtio_status(b->dev));
		return false;
	}
	status = b->slot->status;
	if (len == 0 || status == VIRTIO_BLK_S_IOERR || status == 2 /* UNSUPP */) {
		uprintf("vbad %s used len=%u status=%u\n", name, len, status);
		return true;
	}
	uprintf("vbad %s accepted len=%u status=%u\n", name, len, status);
	return false;
}

/*
 * vbad sector=S: malformed chains on the first block device, each of which
 * must be refused; then both block devices must still work (the second
 * serves a write and a read of sector S).
 */
void user_vbad(const struct user_args *args)
{
	uint64_t sector = uarg(args, "sector", 1);
	struct blk *a = &blk_a, *second = &blk_b;
	uint8_t *data, *wbuf, *rbuf;
	uint64_t hdr, status;
	uint16_t num;
	int refused = 0, cases = 0;
	const uint16_t R = VIRTQ_DESC_F_NEXT, W = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE;

	probe();
	blk_start(args, second, need_device(VIRTIO_ID_BLOCK, 1, "second block device"), 0);
	if (second->ro || sector >= second->capacity)
		ufail("vbad: the second disk must be writable and hold sector %lu", sector);
	wbuf = dma_alloc(SECTOR, 4096);
	rbuf = dma_alloc(SECTOR, 4096);
	blk_check("second device before", blk_io(second, VIRTIO_BLK_T_IN, sector, rbuf, SECTOR));

	blk_start(args, a, need_device(VIRTIO_ID_BLOCK, 0, "block device"), VIRTIO_F_INDIRECT_DESC);
	num = a->q.num;
	data = dma_alloc(SECTOR, 4096);
	hdr = (uint64_t)&a->slot->hdr;
	status = (uint64_t)&a->slot->status;
	a->slot->hdr = (struct virtio_blk_req){ VIRTIO_BLK_T_IN, 0, 0 };
	uprintf("vbad queue=%u indirect=%d\n", num, (a->dev->features & VIRTIO_F_INDIRECT_DESC) != 0);

	{
		/* The data buffer lies outside guest RAM. */
		struct bad_desc c[] = {
			{ hdr, 16, R, 1 }, { OUTSIDE_RAM, SECTOR, W, 2 }, { status, 1, VIRTQ_DESC_F_WRITE, -1 }
		};
		cases++;
		refused += bad_case(args, "outside-ram", c, 3, SECTOR + 1);
	}
	{
		/* The status descriptor links back to the data one: a loop, in
		 * order otherwise (readable, then writable). */
		struct bad_desc c[] = { { hdr, 16, R, 1 },
					{ (uint64_t)data, SECTOR, W, 2 },
					{ status, 1, W, 1 } };
		cases++;
		refused += bad_case(args, "loop", c, 3, SECTOR + 1);
	}
	{
		/* Every descriptor device-readable: nowhere to write the data or
		 * the status byte of a read. */
		struct bad_desc c[] = {
			{ hdr, 16, R, 1 }, { (uint64_t)data, SECTOR, R, 2 }, { status, 1, 0, -1 }
		};
		cases++;
		refused += bad_case(args, "readonly-status", c, 3, 0);
	}
	{
		/* Every descriptor of the queue in one chain whose last links back
		 * to its second: longer than the queue (2.7.5.3.1) and without end. */
		struct bad_desc *c = (struct bad_desc *)dma_alloc(num * sizeof(*c), 16);

		c[0] = (struct bad_desc){ hdr, 16, R, 1 };
		for (int i = 1; i < num; i++)
			c[i] = (struct bad_desc){ (uint64_t)data, SECTOR, W, i + 1 < num ? i + 1 : 1 };
		cases++;
		refused += bad_case(args, "longer-than-queue", c, num, (num - 1) * SECTOR);
	}
	if (a->dev->features & VIRTIO_F_INDIRECT_DESC) {
		/* An indirect table whose length is no multiple of 16 (2.7.5.3.1). */
		struct virtq_desc *table = dma_alloc(3 * sizeof(*table), 16);
		struct bad_desc c[] = { { (uint64_t)table, 3 * sizeof(*table) + 4,
					  VIRTQ_DESC_F_INDIRECT, -1 } };

		table[0] = (struct virtq_desc){ hdr, 16, R, 1 };
		table[1] = (struct virtq_desc){ (uint64_t)data, SECTOR, W, 2 };
		table[2] = (struct virtq_desc){ status, 1, VIRTQ_DESC_F_WRITE, 0 };
		cases++;
		refused += bad_case(args, "indirect-length", c, 1, SECTOR + 1);
	} else {
		uprintf("vbad indirect-length skipped\n");
	}

	/* The first device, reset if it had to be, serves again. */
	blk_check("first device after", blk_io(a, VIRTIO_BLK_T_IN, 0, rbuf, SECTOR));
	uprintf("vbad first-device ok\n");
	fill_pattern(wbuf, sector, 1);
	blk_check("second device write", blk_io(second, VIRTIO_BLK_T_OUT, sector, wbuf, SECTOR));
	blk_check("second device read", blk_io(second, VIRTIO_BLK_T_IN, sector, rbuf, SECTOR));
	if (!same_bytes(wbuf, rbuf, SECTOR))
		ufail("vbad: the second device read back other bytes than it wrote");
	uprintf("vbad second-device ok\n");
	if (refused != cases)
		ufail("vbad: %d of %d malformed chains were not refused", cases - refused, cases);
	uprintf("vbad ok\n");
	udone();
}
