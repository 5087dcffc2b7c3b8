/*
 * kasou-iobench: random-read IOPS of a block device, for kasou's benchmarks (bench/).
 *
 *   kasou-iobench [-n COUNT] [-t THREADS] [-b BYTES] [-s SEED] DEVICE
 *   kasou-iobench -c
 *
 * Reads COUNT blocks of BYTES (default 1000 of 4096) at random block-aligned offsets of DEVICE
 * (a block device, or a regular file), opened O_DIRECT so that every read reaches the device
 * rather than the guest's page cache.  Each of THREADS threads (default 1) issues one pread at
 * a time, so THREADS is the queue depth the device sees.  When done it prints one line:
 *
 *   kasou-iobench reads=N bytes=B threads=T seconds=S iops=I mbps=M
 *
 * timed with CLOCK_MONOTONIC from the moment every thread is ready to the last read's return
 * (mbps is 10^6 bytes per second).  Exit status 0 on success, 1 when the device cannot be read,
 * 2 for a bad command line.  What it does not do: write, verify data, or use asynchronous I/O
 * (busybox's guest has no fio, and Debian's needs libraries the default guest lacks).
 *
 * With -c it prints the guest's CLOCK_MONOTONIC in nanoseconds ("clock NS") and exits: the
 * benchmarks time busybox commands with it, since busybox's date has no %N.
 *
 * Build: gcc -static -O2 -Wall -Wextra -pthread -o kasou-iobench iobench.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define ALIGN 4096                    /* buffer alignment: O_DIRECT wants the logical block size */
#define MAX_BYTES (1u << 20)          /* largest read */
#define MAX_THREADS 64
#define MAX_COUNT 1000000000ULL

struct worker {
	pthread_t thread;
	int fd;
	uint64_t blocks;   /* whole blocks of `bytes` on the device */
	uint32_t bytes;
	uint64_t count;    /* reads this worker does */
	uint64_t state;    /* xorshift64 state, never 0 */
	pthread_barrier_t *start;
	int error;         /* errno of a failed read, or -1 for a short one; 0 if all went well */
	uint64_t failed_at;
};

static void usage(void)
{
	fprintf(stderr, "usage: kasou-iobench [-n COUNT] [-t THREADS] [-b BYTES] [-s SEED] DEVICE\n"
			"       kasou-iobench -c\n");
	exit(2);
}

/* A decimal number in [min, max], or the usage message. */
static uint64_t number(const char *text, const char *what, uint64_t min, uint64_t max)
{
	char *end;
	errno = 0;
	unsigned long long value = strtoull(text, &end, 10);
	if (errno != 0 || end == text || *end != '\0' || text[0] == '-' || value < min || value > max) {
		fprintf(stderr, "kasou-iobench: %s %s: give a number from %" PRIu64 " to %" PRIu64 "\n",
			what, text, min, max);
		usage();
	}
	return value;
}

/* xorshift64 (Marsaglia, "Xorshift RNGs", 2003): spread enough for picking offsets. */
static uint64_t next_random(uint64_t *state)
{
	uint64_t x = *state;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*state = x;
	return x;
}

static void *run_worker(void *arg)
{
	struct worker *w = arg;
	void *buffer;
	int err = posix_memalign(&buffer, ALIGN, w->bytes);
	pthread_barrier_wait(w->start);
	if (err != 0) {
		w->error = err;
		return NULL;
	}
	for (uint64_t i = 0; i < w->count; i++) {
		uint64_t offset = next_random(&w->state) % w->blocks * w->bytes;
		ssize_t got = pread(w->fd, buffer, w->bytes, (off_t)offset);
		if (got != (ssize_t)w->bytes) {
			w->error = got < 0 ? errno : -1;
			w->failed_at = offset;
			break;
		}
	}
	free(buffer);
	return NULL;
}

/* The size in bytes of a block device (BLKGETSIZE64) or a regular file; 0 if unknown. */
static uint64_t device_size(int fd)
{
	struct stat st;
	uint64_t size = 0;
	if (fstat(fd, &st) != 0)
		return 0;
	if (S_ISBLK(st.st_mode))
		return ioctl(fd, BLKGETSIZE64, &size) == 0 ? size : 0;
	return S_ISREG(st.st_mode) ? (uint64_t)st.st_size : 0;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	uint64_t count = 1000, threads = 1, bytes = 4096, seed = 1;
	int opt;
	if (argc == 2 && strcmp(argv[1], "-c") == 0) {
		printf("clock %" PRIu64 "\n", now_ns());
		return 0;
	}
	while ((opt = getopt(argc, argv, "n:t:b:s:")) != -1) {
		switch (opt) {
		case 'n': count = number(optarg, "-n", 1, MAX_COUNT); break;
		case 't': threads = number(optarg, "-t", 1, MAX_THREADS); break;
		case 'b': bytes = number(optarg, "-b", 512, MAX_BYTES); break;
		case 's': seed = number(optarg, "-s", 0, UINT64_MAX); break;
		default: usage();
		}
	}
	if (optind != argc - 1)
		usage();
	if (bytes % 512 != 0) {
		fprintf(stderr, "kasou-iobench: -b %" PRIu64 ": O_DIRECT reads are whole sectors: "
			"give a multiple of 512\n", bytes);
		return 2;
	}
	const char *path = argv[optind];
	int fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
	if (fd < 0) {
		fprintf(stderr, "kasou-iobench: cannot open %s with O_DIRECT: %s\n", path, strerror(errno));
		return 1;
	}
	uint64_t size = device_size(fd);
	if (size < bytes) {
		fprintf(stderr, "kasou-iobench: %s: its size (%" PRIu64 " bytes) is unknown or smaller "
			"than one read of %" PRIu64 "\n", path, size, bytes);
		return 1;
	}

	pthread_barrier_t start;
	pthread_barrier_init(&start, NULL, (unsigned)threads + 1);
	struct worker workers[MAX_THREADS];
	memset(workers, 0, sizeof(workers));
	for (uint64_t i = 0; i < threads; i++) {
		struct worker *w = &workers[i];
		w->fd = fd;
		w->blocks = size / bytes;
		w->bytes = (uint32_t)bytes;
		w->count = count / threads + (i < count % threads ? 1 : 0);
		/* A distinct nonzero state per thread (the odd constant is 2^64 / golden ratio). */
		w->state = (seed + i) * 0x9E3779B97F4A7C15ULL | 1;
		w->start = &start;
		int err = pthread_create(&w->thread, NULL, run_worker, w);
		if (err != 0) {
			fprintf(stderr, "kasou-iobench: cannot start thread %" PRIu64 ": %s\n", i,
				strerror(err));
			return 1;
		}
	}
	pthread_barrier_wait(&start);
	uint64_t began = now_ns();
	int failed = 0;
	for (uint64_t i = 0; i < threads; i++) {
		pthread_join(workers[i].thread, NULL);
		if (workers[i].error > 0)
			fprintf(stderr, "kasou-iobench: %s: read at %" PRIu64 " failed: %s\n", path,
				workers[i].failed_at, strerror(workers[i].error));
		else if (workers[i].error < 0)
			fprintf(stderr, "kasou-iobench: %s: short read at %" PRIu64 "\n", path,
				workers[i].failed_at);
		failed |= workers[i].error != 0;
	}
	double seconds = (double)(now_ns() - began) / 1e9;
	close(fd);
	if (failed)
		return 1;
	if (seconds <= 0)
		seconds = 1e-9;
	printf("kasou-iobench reads=%" PRIu64 " bytes=%" PRIu64 " threads=%" PRIu64
	       " seconds=%.6f iops=%.0f mbps=%.2f\n",
	       count, bytes, threads, seconds, (double)count / seconds,
	       (double)count * (double)bytes / seconds / 1e6);
	return 0;
}
