/*
 * kasou-agent: the guest side of kasou's guest agent.
 *
 * Modes:
 *
 *   kasou-agent                serve kasou's requests on the second serial port (/dev/ttyS1,
 *                              COM2: I/O 0x2f8, IRQ 3) and on virtio-vsock port 1024
 *                              (KASOU_AGENT_PORT) where the kernel has vsock; either may be
 *                              missing. COM1 stays the user's console. Started by init
 *                              (/etc/inittab), which restarts it if it dies.
 *   kasou-agent --serial TTY   COM2's service on another tty only (kasou's tests use a pty).
 *   kasou-agent --unix PATH    vsock's service on a Unix socket at PATH only, no COM2 (kasou's
 *                              tests run the agent on the host this way).
 *   kasou-agent poweroff       ask kasou to end the VM (init's last shutdown step, after sync
 *                              and unmount): write SLP_EN to kasou's power-off register, port
 *                              0x604. Only in kasou's guest (/etc/kasou-guest exists).
 *
 * The wire protocol is documented in kasou/agent/protocol.py, next to the host's codec:
 * frames of  u32 length (big endian, of type + payload) | u8 type | payload.  COM2 is one frame
 * stream; each connection accepted on vsock (or the Unix socket) is another, with its own
 * READY, its own command ids and its own commands, which are killed when it closes.  The agent
 * answers EXEC and SPAWN by running the command with fork/exec, its stdio on pipes or on a
 * pseudo-terminal, and relays STDIN/STDOUT/STDERR/EXIT; several commands may run at once.
 *
 * One poll() loop multiplexes the line(s), a signalfd for SIGCHLD and the commands' pipes.
 * Nothing in it blocks: frames for the host are queued per connection and written as the
 * connection takes them.  A connection whose queue is over TX_HIGH is not read, and neither
 * are its commands' pipes, so a host that stops reading stops the commands' output (they
 * block writing) instead of making the agent buffer it.
 *
 * Everything that arrives on a line is untrusted: lengths are capped, payloads are parsed with
 * bounds checks, and a malformed frame is dropped with an ERROR frame in reply.  The agent
 * never exits on bad input.
 *
 * Build: gcc -static -O2 -Wall -Wextra -o kasou-agent agent.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define AGENT_VERSION "kasou-agent 2"
#define SERIAL_PATH "/dev/ttyS1"
#define GUEST_MARK "/etc/kasou-guest"
#define KASOU_AGENT_PORT 1024 /* the vsock port: KASOU_AGENT_PORT in protocol.py */

/* Frame types: keep in step with FrameType in kasou/agent/protocol.py. */
enum frame_type {
	T_READY = 1,      /* guest->host  version string */
	T_EXEC = 2,       /* host->guest  u32 id, argv as NUL-terminated strings */
	T_STDIN = 3,      /* host->guest  u32 id, data */
	T_STDIN_EOF = 4,  /* host->guest  u32 id */
	T_STDOUT = 5,     /* guest->host  u32 id, data (<= the line's chunk) */
	T_STDERR = 6,     /* guest->host  u32 id, data (<= the line's chunk) */
	T_EXIT = 7,       /* guest->host  u32 id, i32 status */
	T_ERROR = 8,      /* guest->host  u32 id (0: not about a command), UTF-8 message */
	T_PING = 9,       /* host->guest  any bytes, echoed in PONG */
	T_PONG = 10,      /* guest->host  the PING's bytes */
	T_SIGNAL = 11,    /* host->guest  u32 id, u32 signal number: sent to the command's group */
	T_SPAWN = 12,     /* host->guest  u32 id, u32 flags, u16 rows, u16 cols, u32 argc, strings */
	T_RESIZE = 13,    /* host->guest  u32 id, u16 rows, u16 cols: the terminal's new size */
	T_STDIN_ACK = 14, /* guest->host  u32 id, u32 count: STDIN bytes written (SPAWN only) */
};

#define SPAWN_TTY 1u                  /* SPAWN flag: run the command on a pseudo-terminal */
#define SPAWN_HEAD 16                 /* SPAWN's fixed part: id, flags, rows, cols, argc */

#define MAX_FRAME (1u << 20)          /* largest length field accepted: type + payload */
#define CHUNK 4096                    /* largest STDOUT/STDERR data per frame on COM2 */
#define STREAM_CHUNK 65536            /* the same on vsock and Unix socket connections */
#define MAX_COMMANDS 64               /* commands running at once, all lines together */
#define MAX_CONNS 16                  /* vsock (or Unix socket) connections at once */
#define MAX_ARGS 4096                 /* argv (and environment) entries per EXEC or SPAWN */
#define MAX_STDIN_QUEUE (4u << 20)    /* bytes of STDIN held for a command not reading */
#define TX_HIGH (256u << 10)          /* queued output over which a line's reading stops */
#define FINISH_CHUNKS 32              /* chunks read from an exited command's pipes, at most */
#define TTY_LINGER_MS 200             /* an exited command's terminal: time to drain it */
#define KASOU_POWEROFF_PORT 0x604     /* kasou's power-off register (16 bit) */
#define KASOU_POWEROFF_SLP_EN 0x2000  /* as ACPI PM1a_CNT: SLP_EN is bit 13 */

/* One frame stream: COM2, or one accepted connection. */
struct conn {
	int fd;               /* -1: free slot */
	int serial;           /* COM2: its errors are fatal (init restarts the agent) */
	int closing;          /* the peer left or the stream broke: dropped at the end of the turn */
	size_t chunk;         /* largest STDOUT/STDERR data per frame */
	unsigned char *rx;    /* 4 + MAX_FRAME bytes: frames not yet complete */
	size_t rx_len;
	unsigned char *tx;    /* frames for the host, tx[tx_off..tx_len) not written yet */
	size_t tx_off, tx_len, tx_cap;
};

struct command {
	uint32_t id;          /* 0: free slot */
	struct conn *conn;    /* the line that started it: its frames go there */
	pid_t pid;            /* 0 once reaped */
	int status;           /* wait status, valid once reaped */
	long long reaped_ms;  /* CLOCK_MONOTONIC when reaped */
	int in_fd, out_fd, err_fd;  /* our ends of its pipes; -1 once closed */
	int tty;              /* on a terminal: out_fd is the master, in_fd a dup of it, no err_fd */
	int tty_closed;       /* every process closed the terminal (the master reads EIO) */
	int acks;             /* started by SPAWN: STDIN_ACK tells the host what was written */
	unsigned char *inq;   /* STDIN waiting for the command to read it */
	size_t inq_len, inq_cap;
	int in_eof;           /* STDIN_EOF seen: close stdin once inq is written */
	unsigned char last_in; /* the last byte written to a terminal (EOF needs a fresh line) */
};

static struct conn conns[1 + MAX_CONNS]; /* [0]: COM2, [1..]: accepted connections */
static struct command commands[MAX_COMMANDS];

static void die(const char *what)
{
	fprintf(stderr, "kasou-agent: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void put_u32(unsigned char *p, uint32_t v)
{
	p[0] = (unsigned char)(v >> 24);
	p[1] = (unsigned char)(v >> 16);
	p[2] = (unsigned char)(v >> 8);
	p[3] = (unsigned char)v;
}

static uint32_t get_u32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static unsigned get_u16(const unsigned char *p)
{
	return (unsigned)p[0] << 8 | p[1];
}

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int set_nonblock(int fd)
{
	int flags = fcntl(fd, F_GETFL);
	return flags < 0 ? -1 : fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

static void close_fd(int *fd)
{
	if (*fd >= 0) {
		close(*fd);
		*fd = -1;
	}
}

/* --- output queues ------------------------------------------------------------------------ */

static int tx_full(const struct conn *c)
{
	return c->tx_len - c->tx_off >= TX_HIGH;
}

static void conn_broken(struct conn *c, const char *what)
{
	if (c->serial)
		die(what); /* init starts a fresh agent on a fresh line */
	c->closing = 1;
}

/* Room for `need` more bytes at tx + tx_len, or NULL (the line is going away). */
static unsigned char *tx_reserve(struct conn *c, size_t need)
{
	if (c->closing)
		return NULL;
	if (c->tx_cap - c->tx_len < need && c->tx_off > 0) {
		memmove(c->tx, c->tx + c->tx_off, c->tx_len - c->tx_off);
		c->tx_len -= c->tx_off;
		c->tx_off = 0;
	}
	if (c->tx_cap - c->tx_len < need) {
		size_t cap = 2 * (c->tx_len + need);
		unsigned char *grown = realloc(c->tx, cap);
		if (grown == NULL) {
			errno = ENOMEM;
			conn_broken(c, "queueing a frame");
			return NULL;
		}
		c->tx = grown;
		c->tx_cap = cap;
	}
	return c->tx + c->tx_len;
}

/* Write what the line takes now; the rest waits for POLLOUT. */
static void flush_tx(struct conn *c)
{
	while (!c->closing && c->tx_off < c->tx_len) {
		ssize_t n = write(c->fd, c->tx + c->tx_off, c->tx_len - c->tx_off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				conn_broken(c, "writing to the host");
			return;
		}
		c->tx_off += (size_t)n;
	}
	if (c->tx_off == c->tx_len) {
		c->tx_off = c->tx_len = 0;
		if (c->tx_cap > 4 * TX_HIGH) { /* a burst is over: give its memory back */
			free(c->tx);
			c->tx = NULL;
			c->tx_cap = 0;
		}
	}
}

/* Queue one frame: type, an optional u32 id (has_id), then data. */
static void send_frame(struct conn *c, int type, int has_id, uint32_t id, const void *data,
		       size_t len)
{
	size_t head = 5 + (has_id ? 4 : 0);
	unsigned char *p = tx_reserve(c, head + len);
	if (p == NULL)
		return;
	put_u32(p, (uint32_t)(head - 4 + len));
	p[4] = (unsigned char)type;
	if (has_id)
		put_u32(p + 5, id);
	if (len > 0)
		memcpy(p + head, data, len);
	c->tx_len += head + len;
	flush_tx(c);
}

static void send_u32(struct conn *c, int type, uint32_t id, uint32_t value)
{
	unsigned char payload[4];
	put_u32(payload, value);
	send_frame(c, type, 1, id, payload, sizeof(payload));
}

static void send_error(struct conn *c, uint32_t id, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void send_error(struct conn *c, uint32_t id, const char *fmt, ...)
{
	char msg[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n >= sizeof(msg))
		n = sizeof(msg) - 1;
	send_frame(c, T_ERROR, 1, id, msg, (size_t)n);
}

/* --- commands ----------------------------------------------------------------------------- */

static struct command *find_command(const struct conn *conn, uint32_t id)
{
	for (int i = 0; i < MAX_COMMANDS; i++)
		if (id != 0 && commands[i].id == id && commands[i].conn == conn)
			return &commands[i];
	return NULL;
}

static void free_command(struct command *c)
{
	free(c->inq);
	*c = (struct command){ .id = 0, .in_fd = -1, .out_fd = -1, .err_fd = -1 };
}

/* STDIN_ACK for `count` bytes of a SPAWN command's stdin written (or dropped). */
static void ack_stdin(struct command *c, size_t count)
{
	if (c->acks && count > 0)
		send_u32(c->conn, T_STDIN_ACK, c->id, (uint32_t)count);
}

static void close_stdin(struct command *c)
{
	ack_stdin(c, c->inq_len); /* what nobody will read is acknowledged as gone */
	close_fd(&c->in_fd);
	free(c->inq);
	c->inq = NULL;
	c->inq_len = c->inq_cap = 0;
}

/* STDIN_EOF, once everything before it is written. */
static void end_stdin(struct command *c)
{
	if (c->tty && c->in_fd >= 0) {
		/* A terminal has no EOF to close: in canonical mode its EOF character (^D) ends a
		 * read, and a second one ends a line that was not finished (termios(3), VEOF). */
		struct termios tio;
		if (tcgetattr(c->in_fd, &tio) == 0 && (tio.c_lflag & ICANON)) {
			unsigned char eof[2] = { tio.c_cc[VEOF], tio.c_cc[VEOF] };
			ssize_t ignored = write(c->in_fd, eof, c->last_in == '\n' ? 1 : 2);
			(void)ignored;
		}
	}
	close_stdin(c);
}

/* In the child, between fork and exec: only async-signal-safe calls. */
static void run_child(char **argv, char **envp, int in_fd, int out_fd, int err_fd, int tty,
		      int status_fd)
{
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	signal(SIGPIPE, SIG_DFL);
	setsid();
	/* A new session leader takes the terminal as its controlling tty (tty_ioctl(4)). */
	if (tty && ioctl(in_fd, TIOCSCTTY, 0) < 0)
		goto fail;
	if (dup2(in_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(err_fd, 2) < 0 || chdir("/") < 0)
		goto fail;
	environ = envp;
	execvp(argv[0], argv);
fail:;
	int err = errno;
	ssize_t ignored = write(status_fd, &err, sizeof(err));
	(void)ignored;
	_exit(127);
}

static void close_fds(int *fds, int count)
{
	for (int i = 0; i < count; i++)
		close_fd(&fds[i]);
}

/* Fork and exec argv with envp, on pipes or on a new terminal of rows x cols (0: unset). */
static void start_command(struct conn *conn, uint32_t id, char **argv, char **envp, int tty,
			  unsigned rows, unsigned cols, int acks)
{
	struct command *c = NULL;
	for (int i = 0; i < MAX_COMMANDS && c == NULL; i++)
		if (commands[i].id == 0)
			c = &commands[i];
	if (c == NULL) {
		send_error(conn, id, "%d commands are running already", MAX_COMMANDS);
		return;
	}
	/* fds: the status pipe, then stdin, stdout, stderr pipes or the terminal's two ends. */
	enum { ST_R, ST_W, IN_R, IN_W, OUT_R, OUT_W, ERR_R, ERR_W, FDS };
	enum { MASTER = IN_W, SLAVE = IN_R };
	int fds[FDS];
	for (int i = 0; i < FDS; i++)
		fds[i] = -1;
	const char *setting_up = tty ? "a terminal" : "pipes";
	if (pipe2(&fds[ST_R], O_CLOEXEC) < 0)
		goto fail;
	if (tty) {
		char name[64];
		int err;
		fds[MASTER] = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (fds[MASTER] < 0 || grantpt(fds[MASTER]) < 0 || unlockpt(fds[MASTER]) < 0)
			goto fail;
		if ((err = ptsname_r(fds[MASTER], name, sizeof(name))) != 0) {
			errno = err;
			goto fail;
		}
		fds[SLAVE] = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (fds[SLAVE] < 0)
			goto fail;
		struct winsize size = { .ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols };
		if (rows > 0 && cols > 0 && ioctl(fds[MASTER], TIOCSWINSZ, &size) < 0)
			goto fail;
	} else if (pipe2(&fds[IN_R], O_CLOEXEC) < 0 || pipe2(&fds[OUT_R], O_CLOEXEC) < 0 ||
		   pipe2(&fds[ERR_R], O_CLOEXEC) < 0) {
		goto fail;
	}
	pid_t pid = fork();
	if (pid == 0) {
		if (tty)
			run_child(argv, envp, fds[SLAVE], fds[SLAVE], fds[SLAVE], 1, fds[ST_W]);
		run_child(argv, envp, fds[IN_R], fds[OUT_W], fds[ERR_W], 0, fds[ST_W]);
	}
	int fork_errno = errno;
	close_fd(&fds[ST_W]);
	close_fd(&fds[IN_R]); /* the slave, for a terminal */
	close_fd(&fds[OUT_W]);
	close_fd(&fds[ERR_W]);
	if (pid < 0) {
		errno = fork_errno;
		setting_up = "a process";
		goto fail;
	}
	/* The status pipe closes on a successful exec (O_CLOEXEC), or carries errno. */
	int child_errno = 0;
	ssize_t n;
	do
		n = read(fds[ST_R], &child_errno, sizeof(child_errno));
	while (n < 0 && errno == EINTR);
	close_fd(&fds[ST_R]);
	if (n == (ssize_t)sizeof(child_errno)) {
		while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
			;
		send_error(conn, id, "cannot run %s: %s", argv[0], strerror(child_errno));
		close_fds(fds, FDS);
		return;
	}
	*c = (struct command){
		.id = id, .conn = conn, .pid = pid, .tty = tty, .acks = acks, .last_in = '\n',
		.in_fd = fds[IN_W], .out_fd = tty ? -1 : fds[OUT_R], .err_fd = fds[ERR_R],
	};
	if (tty) {
		/* Two fds for the master: stdin's can close (EOF) while output is still read. */
		c->out_fd = fcntl(fds[MASTER], F_DUPFD_CLOEXEC, 0);
		if (c->out_fd < 0) {
			/* Unlikely (out of fds): run it without output rather than leave it blind. */
			send_error(conn, id, "dup of the terminal: %s", strerror(errno));
		}
	}
	set_nonblock(c->in_fd);
	if (c->out_fd >= 0)
		set_nonblock(c->out_fd);
	if (c->err_fd >= 0)
		set_nonblock(c->err_fd);
	return;
fail:;
	int saved = errno;
	close_fds(fds, FDS);
	send_error(conn, id, "cannot set up %s: %s", setting_up, strerror(saved));
}

/* Cut NUL-terminated strings (the payload's last byte is a NUL) into list[at..]; returns the
 * new count, or -1 when there are more than `max`. The strings stay in `p`. */
static int split_strings(char *p, size_t len, char **list, int at, int max)
{
	for (size_t off = 0; off < len; off += strlen(p + off) + 1) {
		if (at == max)
			return -1;
		list[at++] = p + off;
	}
	return at;
}

/* A command's environment: the agent's own (PATH, HOME, TERM), then `extra` (NAME=VALUE
 * entries, which replace those of the same name). */
static void make_env(char **envp, char **extra, int n_extra, int tty)
{
	static char *const base[] = {
		"PATH=/bin:/sbin:/usr/bin:/usr/sbin", "HOME=/root", "TERM=dumb",
	};
	int count = 0;
	for (size_t b = 0; b < sizeof(base) / sizeof(base[0]); b++) {
		const char *entry = base[b];
		if (tty && strncmp(entry, "TERM=", 5) == 0)
			entry = "TERM=xterm"; /* a terminal that understands ANSI escapes */
		size_t name = (size_t)(strchr(entry, '=') - entry) + 1;
		int replaced = 0;
		for (int e = 0; e < n_extra && !replaced; e++)
			replaced = strncmp(extra[e], entry, name) == 0;
		if (!replaced)
			envp[count++] = (char *)entry;
	}
	for (int e = 0; e < n_extra; e++)
		envp[count++] = extra[e];
	envp[count] = NULL;
}

/* Shared by EXEC and SPAWN: a fresh, nonzero id and a program name. */
static int check_new_id(struct conn *conn, uint32_t id, const char *what)
{
	if (id == 0) {
		send_error(conn, 0, "%s with id 0 (reserved)", what);
		return 0;
	}
	if (find_command(conn, id) != NULL) {
		send_error(conn, id, "%s id %u is already running", what, id);
		return 0;
	}
	return 1;
}

static char *argv_store[MAX_ARGS + 1];
static char *env_store[MAX_ARGS + 4];
static char string_store[MAX_FRAME];

/* EXEC: u32 id, then argv as NUL-terminated strings (at least one, the last ends the payload). */
static void handle_exec(struct conn *conn, const unsigned char *p, size_t len)
{
	if (len < 4) {
		send_error(conn, 0, "EXEC without an id");
		return;
	}
	uint32_t id = get_u32(p);
	if (!check_new_id(conn, id, "EXEC"))
		return;
	p += 4;
	len -= 4;
	if (len == 0 || p[len - 1] != '\0') {
		send_error(conn, id, "EXEC argv must be NUL-terminated strings");
		return;
	}
	memcpy(string_store, p, len);
	int argc = split_strings(string_store, len, argv_store, 0, MAX_ARGS);
	if (argc < 0) {
		send_error(conn, id, "EXEC has more than %d arguments", MAX_ARGS);
		return;
	}
	argv_store[argc] = NULL;
	if (argv_store[0][0] == '\0') {
		send_error(conn, id, "EXEC with an empty program name");
		return;
	}
	make_env(env_store, NULL, 0, 0);
	start_command(conn, id, argv_store, env_store, 0, 0, 0, 0);
}

/* SPAWN: u32 id, u32 flags, u16 rows, u16 cols, u32 argc, then argc argv strings and any number
 * of NAME=VALUE environment strings, all NUL-terminated. */
static void handle_spawn(struct conn *conn, const unsigned char *p, size_t len)
{
	if (len < SPAWN_HEAD) {
		send_error(conn, len >= 4 ? get_u32(p) : 0,
			   "SPAWN payload of %u bytes: it needs at least %d", (unsigned)len, SPAWN_HEAD);
		return;
	}
	uint32_t id = get_u32(p), flags = get_u32(p + 4), argc = get_u32(p + 12);
	unsigned rows = get_u16(p + 8), cols = get_u16(p + 10);
	if (!check_new_id(conn, id, "SPAWN"))
		return;
	if (flags & ~SPAWN_TTY) {
		send_error(conn, id, "SPAWN with unknown flags 0x%x", flags);
		return;
	}
	if (argc == 0 || argc > MAX_ARGS) {
		send_error(conn, id, "SPAWN argc %u is not in 1..%d", argc, MAX_ARGS);
		return;
	}
	p += SPAWN_HEAD;
	len -= SPAWN_HEAD;
	if (len == 0 || p[len - 1] != '\0') {
		send_error(conn, id, "SPAWN strings must be NUL-terminated");
		return;
	}
	memcpy(string_store, p, len);
	static char *strings[MAX_ARGS + 1];
	int count = split_strings(string_store, len, strings, 0, MAX_ARGS);
	if (count < 0) {
		send_error(conn, id, "SPAWN has more than %d strings", MAX_ARGS);
		return;
	}
	if ((uint32_t)count < argc) {
		send_error(conn, id, "SPAWN has %d strings, fewer than argc %u", count, argc);
		return;
	}
	if (strings[0][0] == '\0') {
		send_error(conn, id, "SPAWN with an empty program name");
		return;
	}
	for (int e = (int)argc; e < count; e++) {
		char *eq = strchr(strings[e], '=');
		if (eq == NULL || eq == strings[e]) {
			send_error(conn, id, "SPAWN environment entry \"%.64s\" is not NAME=VALUE",
				   strings[e]);
			return;
		}
	}
	memcpy(argv_store, strings, argc * sizeof(strings[0]));
	argv_store[argc] = NULL;
	make_env(env_store, strings + argc, count - (int)argc, flags & SPAWN_TTY);
	start_command(conn, id, argv_store, env_store, flags & SPAWN_TTY, rows, cols, 1);
}

static void handle_stdin(struct conn *conn, const unsigned char *p, size_t len, int eof)
{
	if (len < 4) {
		send_error(conn, 0, "%s without an id", eof ? "STDIN_EOF" : "STDIN");
		return;
	}
	uint32_t id = get_u32(p);
	struct command *c = find_command(conn, id);
	if (c == NULL) {
		send_error(conn, id, "no command %u is running", id);
		return;
	}
	size_t add = len - 4;
	if (c->in_fd < 0 || c->in_eof) {
		/* The command closed its stdin, or EOF was sent: nothing reads it. */
		if (!eof)
			ack_stdin(c, add);
		return;
	}
	if (eof) {
		c->in_eof = 1;
		if (c->inq_len == 0)
			end_stdin(c);
		return;
	}
	if (c->inq_len + add > MAX_STDIN_QUEUE) {
		send_error(conn, id, "stdin dropped: %u bytes are queued already", (unsigned)c->inq_len);
		ack_stdin(c, add);
		return;
	}
	if (c->inq_len + add > c->inq_cap) {
		size_t cap = (c->inq_len + add) * 2;
		unsigned char *grown = realloc(c->inq, cap);
		if (grown == NULL) {
			send_error(conn, id, "stdin dropped: out of memory");
			ack_stdin(c, add);
			return;
		}
		c->inq = grown;
		c->inq_cap = cap;
	}
	memcpy(c->inq + c->inq_len, p + 4, add);
	c->inq_len += add;
}

static void handle_signal(struct conn *conn, const unsigned char *p, size_t len)
{
	if (len != 8) {
		send_error(conn, 0, "SIGNAL payload must be 8 bytes, not %u", (unsigned)len);
		return;
	}
	uint32_t id = get_u32(p), sig = get_u32(p + 4);
	struct command *c = find_command(conn, id);
	if (c == NULL || c->pid == 0) {
		send_error(conn, id, "no command %u is running", id);
		return;
	}
	if (sig == 0 || sig >= (uint32_t)NSIG) {
		send_error(conn, id, "no signal %u", sig);
		return;
	}
	/* The command leads its own process group (setsid in run_child). */
	if (kill(-c->pid, (int)sig) < 0 && kill(c->pid, (int)sig) < 0)
		send_error(conn, id, "kill: %s", strerror(errno));
}

static void handle_resize(struct conn *conn, const unsigned char *p, size_t len)
{
	if (len != 8) {
		send_error(conn, 0, "RESIZE payload must be 8 bytes, not %u", (unsigned)len);
		return;
	}
	uint32_t id = get_u32(p);
	struct command *c = find_command(conn, id);
	if (c == NULL) {
		send_error(conn, id, "no command %u is running", id);
		return;
	}
	if (!c->tty) {
		send_error(conn, id, "command %u has no terminal to resize", id);
		return;
	}
	int fd = c->out_fd >= 0 ? c->out_fd : c->in_fd;
	if (fd < 0)
		return; /* the terminal is gone: nobody to tell */
	/* The kernel sends SIGWINCH to the terminal's foreground process group (tty_ioctl(4)). */
	struct winsize size = { .ws_row = (unsigned short)get_u16(p + 4),
				.ws_col = (unsigned short)get_u16(p + 6) };
	if (ioctl(fd, TIOCSWINSZ, &size) < 0)
		send_error(conn, id, "TIOCSWINSZ: %s", strerror(errno));
}

static void handle_frame(struct conn *conn, int type, const unsigned char *p, size_t len)
{
	switch (type) {
	case T_EXEC:
		handle_exec(conn, p, len);
		break;
	case T_SPAWN:
		handle_spawn(conn, p, len);
		break;
	case T_STDIN:
		handle_stdin(conn, p, len, 0);
		break;
	case T_STDIN_EOF:
		handle_stdin(conn, p, len, 1);
		break;
	case T_SIGNAL:
		handle_signal(conn, p, len);
		break;
	case T_RESIZE:
		handle_resize(conn, p, len);
		break;
	case T_PING:
		send_frame(conn, T_PONG, 0, 0, p, len);
		break;
	default:
		send_error(conn, 0, "unexpected frame type %d", type);
	}
}

static void read_conn(struct conn *c)
{
	ssize_t n = read(c->fd, c->rx + c->rx_len, 4 + MAX_FRAME - c->rx_len);
	if (n < 0) {
		if (errno != EINTR && errno != EAGAIN)
			conn_broken(c, "reading from the host");
		return;
	}
	if (n == 0) {
		if (!c->serial)
			c->closing = 1; /* the host closed the connection */
		return;
	}
	c->rx_len += (size_t)n;
	size_t at = 0;
	while (c->rx_len - at >= 4 && !c->closing) {
		uint32_t len = get_u32(c->rx + at);
		if (len == 0 || len > MAX_FRAME) {
			/* No way to find the next frame boundary: drop what is buffered. */
			send_error(c, 0, "dropped %u bytes: bad frame length %u",
				   (unsigned)(c->rx_len - at), len);
			at = c->rx_len;
			break;
		}
		if (c->rx_len - at < 4 + (size_t)len)
			break;
		handle_frame(c, c->rx[at + 4], c->rx + at + 5, len - 1);
		at += 4 + (size_t)len;
	}
	memmove(c->rx, c->rx + at, c->rx_len - at);
	c->rx_len -= at;
}

/* Relay one chunk of what a command wrote to one of its pipes (or its terminal) straight into
 * the line's queue; returns 0 at EOF, error or nothing to read, else 1. */
static int relay_output(struct command *c, int *fd, int type)
{
	struct conn *conn = c->conn;
	unsigned char *p = tx_reserve(conn, 9 + conn->chunk);
	if (p == NULL)
		return 0;
	ssize_t n = read(*fd, p + 9, conn->chunk);
	if (n > 0) {
		put_u32(p, (uint32_t)(5 + n));
		p[4] = (unsigned char)type;
		put_u32(p + 5, c->id);
		conn->tx_len += 9 + (size_t)n;
		flush_tx(conn);
		return 1;
	}
	if (n < 0 && (errno == EINTR || errno == EAGAIN))
		return 0;
	if (c->tty) {
		/* EIO: every process closed the terminal. The master stays open until the command
		 * is reaped: closing it hangs the terminal up (SIGHUP to the session), and the
		 * command may still be on its way out (cat closes its stdio before exit). */
		c->tty_closed = 1;
		close_stdin(c);
		return 0;
	}
	close_fd(fd); /* EOF */
	return 0;
}

static void feed_stdin(struct command *c)
{
	ssize_t n = write(c->in_fd, c->inq, c->inq_len);
	if (n < 0) {
		if (errno != EINTR && errno != EAGAIN)
			close_stdin(c); /* EPIPE: the command closed its stdin */
		return;
	}
	if (n > 0)
		c->last_in = c->inq[n - 1];
	memmove(c->inq, c->inq + n, c->inq_len - (size_t)n);
	c->inq_len -= (size_t)n;
	ack_stdin(c, (size_t)n);
	if (c->inq_len == 0 && c->in_eof)
		end_stdin(c);
}

static void reap(void)
{
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		for (int i = 0; i < MAX_COMMANDS; i++) {
			if (commands[i].id != 0 && commands[i].pid == pid) {
				commands[i].pid = 0;
				commands[i].status = status;
				commands[i].reaped_ms = now_ms();
			}
		}
	}
}

/* A reaped command: send what is left in its pipes (whatever it wrote before exiting is
 * there), then EXIT. A descendant still holding the pipes open loses later output. */
static void finish(struct command *c)
{
	for (int i = 0; i < FINISH_CHUNKS && c->out_fd >= 0 && !c->tty_closed; i++)
		if (!relay_output(c, &c->out_fd, T_STDOUT))
			break;
	for (int i = 0; i < FINISH_CHUNKS && c->err_fd >= 0; i++)
		if (!relay_output(c, &c->err_fd, T_STDERR))
			break;
	close_fd(&c->out_fd);
	close_fd(&c->err_fd);
	close_stdin(c);
	int code = WIFSIGNALED(c->status) ? 128 + WTERMSIG(c->status) : WEXITSTATUS(c->status);
	send_u32(c->conn, T_EXIT, c->id, (uint32_t)code);
	free_command(c);
}

/* Whether a reaped command can be finished now; else how long to wait (ms) in *wait. */
static int ready_to_finish(const struct command *c, long long now, long long *wait)
{
	if (tx_full(c->conn))
		return 0; /* its output is behind: POLLOUT on the line wakes the loop */
	/* A terminal passes output on asynchronously: the master reads EIO only once all of it
	 * was read. Wait for that, but not for long: a descendant may keep the terminal open. */
	if (c->tty && c->out_fd >= 0 && !c->tty_closed) {
		long long left = c->reaped_ms + TTY_LINGER_MS - now;
		if (left > 0) {
			if (*wait < 0 || left < *wait)
				*wait = left;
			return 0;
		}
	}
	return 1;
}

/* --- lines -------------------------------------------------------------------------------- */

static void open_conn(struct conn *c, int fd, int serial)
{
	*c = (struct conn){ .fd = fd, .serial = serial, .chunk = serial ? CHUNK : STREAM_CHUNK };
	c->rx = malloc(4 + MAX_FRAME); /* pages are touched only as frames arrive */
	if (c->rx == NULL)
		die("allocating a receive buffer");
	send_frame(c, T_READY, 0, 0, AGENT_VERSION, strlen(AGENT_VERSION));
}

/* The host closed the connection: its commands go with it (SIGKILL to each process group). */
static void drop_conn(struct conn *c)
{
	for (int i = 0; i < MAX_COMMANDS; i++) {
		struct command *cmd = &commands[i];
		if (cmd->id == 0 || cmd->conn != c)
			continue;
		if (cmd->pid != 0 && kill(-cmd->pid, SIGKILL) < 0)
			kill(cmd->pid, SIGKILL);
		close_fd(&cmd->in_fd);
		close_fd(&cmd->out_fd);
		close_fd(&cmd->err_fd);
		free_command(cmd); /* reap() collects the process without a slot */
	}
	close(c->fd);
	free(c->rx);
	free(c->tx);
	*c = (struct conn){ .fd = -1 };
}

static void accept_conn(int listen_fd)
{
	int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0)
		return; /* EAGAIN, or the peer left already */
	for (int i = 1; i <= MAX_CONNS; i++) {
		if (conns[i].fd < 0) {
			open_conn(&conns[i], fd, 0);
			return;
		}
	}
	/* Full: say why in one frame (a fresh socket has room for it), then hang up. */
	unsigned char frame[9 + 64];
	int n = snprintf((char *)frame + 9, 64, "%d connections are open already", MAX_CONNS);
	put_u32(frame, (uint32_t)(5 + n));
	frame[4] = T_ERROR;
	put_u32(frame + 5, 0);
	ssize_t ignored = write(fd, frame, 9 + (size_t)n);
	(void)ignored;
	close(fd);
}

static int open_serial(const char *path)
{
	const char *what = "open";
	int fd = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
	if (fd >= 0) {
		struct termios tio;
		what = "tcgetattr";
		if (tcgetattr(fd, &tio) == 0) {
			cfmakeraw(&tio); /* 8 bits, no echo, no line editing, no CR/LF translation */
			tio.c_cflag |= CLOCAL | CREAD;
			tio.c_cc[VMIN] = 1;
			tio.c_cc[VTIME] = 0;
			cfsetspeed(&tio, B115200);
			what = "tcsetattr";
			if (tcsetattr(fd, TCSANOW, &tio) == 0) {
				tcflush(fd, TCIOFLUSH);
				return fd;
			}
		}
	}
	/* Without the port (a VMM that gives the guest no COM2: the 8250 driver still makes
	 * /dev/ttyS1, but it fails with EIO) there is nothing to serve on it. */
	fprintf(stderr, "kasou-agent: %s: %s: %s\n", path, what, strerror(errno));
	if (fd >= 0)
		close(fd);
	return -1;
}

/* Listen on vsock port KASOU_AGENT_PORT of any local CID; -1 where the kernel has no vsock. */
static int listen_vsock(void)
{
	int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		if (errno != EAFNOSUPPORT && errno != ENODEV)
			fprintf(stderr, "kasou-agent: vsock socket: %s\n", strerror(errno));
		return -1;
	}
	struct sockaddr_vm addr = {
		.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = KASOU_AGENT_PORT,
	};
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(fd, MAX_CONNS) < 0) {
		fprintf(stderr, "kasou-agent: vsock port %d: %s\n", KASOU_AGENT_PORT, strerror(errno));
		close(fd);
		return -1;
	}
	return fd;
}

static int listen_unix(const char *path)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(addr.sun_path)) {
		fprintf(stderr, "kasou-agent: %s: a socket path has at most %d bytes\n", path,
			(int)sizeof(addr.sun_path) - 1);
		exit(2);
	}
	strcpy(addr.sun_path, path);
	struct stat st;
	if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
		unlink(path); /* a previous agent's; anything else makes bind fail */
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket");
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		die(path);
	if (listen(fd, MAX_CONNS) < 0)
		die("listen");
	fprintf(stderr, "kasou-agent: listening on %s\n", path);
	return fd;
}

/* --- the loop ----------------------------------------------------------------------------- */

enum { W_LISTEN, W_SIGNAL, W_CONN, W_OUT, W_ERR, W_IN };

static void serve(int serial_fd, int listen_fd) __attribute__((noreturn));
static void serve(int serial_fd, int listen_fd)
{
	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	if (sigprocmask(SIG_BLOCK, &chld, NULL) < 0)
		die("sigprocmask");
	int sig_fd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sig_fd < 0)
		die("signalfd");
	signal(SIGPIPE, SIG_IGN);
	for (int i = 0; i < MAX_COMMANDS; i++)
		free_command(&commands[i]);
	for (int i = 0; i <= MAX_CONNS; i++)
		conns[i] = (struct conn){ .fd = -1 };
	if (serial_fd >= 0)
		open_conn(&conns[0], serial_fd, 1);

	enum { MAX_FDS = 2 + 1 + MAX_CONNS + 3 * MAX_COMMANDS };
	struct pollfd fds[MAX_FDS];
	struct { int what; void *of; } owner[MAX_FDS];
	long long wait_ms = -1;
	for (;;) {
		nfds_t nfds = 0;
#define WATCH(fd_, events_, what_, of_)                                                     \
	do {                                                                                \
		owner[nfds].what = (what_);                                                 \
		owner[nfds].of = (of_);                                                     \
		fds[nfds++] = (struct pollfd){ .fd = (fd_), .events = (short)(events_) };   \
	} while (0)
		WATCH(sig_fd, POLLIN, W_SIGNAL, NULL);
		if (listen_fd >= 0)
			WATCH(listen_fd, POLLIN, W_LISTEN, NULL);
		for (int i = 0; i <= MAX_CONNS; i++) {
			struct conn *c = &conns[i];
			if (c->fd < 0)
				continue;
			int events = (tx_full(c) ? 0 : POLLIN) | (c->tx_off < c->tx_len ? POLLOUT : 0);
			WATCH(c->fd, events, W_CONN, c);
		}
		for (int i = 0; i < MAX_COMMANDS; i++) {
			struct command *c = &commands[i];
			if (c->id == 0)
				continue;
			if (!tx_full(c->conn)) { /* back-pressure: its line is behind */
				if (c->out_fd >= 0 && !c->tty_closed)
					WATCH(c->out_fd, POLLIN, W_OUT, c);
				if (c->err_fd >= 0)
					WATCH(c->err_fd, POLLIN, W_ERR, c);
			}
			if (c->in_fd >= 0 && c->inq_len > 0)
				WATCH(c->in_fd, POLLOUT, W_IN, c);
		}
#undef WATCH
		if (poll(fds, nfds, (int)wait_ms) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		int incoming = 0;
		for (nfds_t k = 0; k < nfds; k++) {
			short got = fds[k].revents;
			if (got == 0)
				continue;
			struct conn *conn = owner[k].of;
			struct command *c = owner[k].of;
			switch (owner[k].what) {
			case W_SIGNAL: {
				struct signalfd_siginfo info;
				while (read(sig_fd, &info, sizeof(info)) == (ssize_t)sizeof(info))
					;
				reap();
				break;
			}
			case W_LISTEN:
				incoming = 1; /* after the closed connections are dropped, below */
				break;
			case W_CONN:
				if (got & POLLOUT)
					flush_tx(conn);
				if ((got & POLLIN) || (conn->serial && (got & (POLLERR | POLLHUP))))
					read_conn(conn); /* a broken COM2 shows as a read error */
				else if (got & (POLLERR | POLLHUP))
					conn->closing = 1;
				break;
			/* The fd checks: an earlier handler this turn may have closed it. */
			case W_OUT:
				if (fds[k].fd == c->out_fd && !tx_full(c->conn))
					relay_output(c, &c->out_fd, T_STDOUT);
				break;
			case W_ERR:
				if (fds[k].fd == c->err_fd && !tx_full(c->conn))
					relay_output(c, &c->err_fd, T_STDERR);
				break;
			case W_IN:
				if (fds[k].fd == c->in_fd && c->inq_len > 0)
					feed_stdin(c);
				break;
			}
		}
		for (int i = 1; i <= MAX_CONNS; i++)
			if (conns[i].fd >= 0 && conns[i].closing)
				drop_conn(&conns[i]);
		/* A host that closed a connection before opening the next finds the place free. */
		if (incoming)
			accept_conn(listen_fd);
		long long now = now_ms();
		wait_ms = -1;
		for (int i = 0; i < MAX_COMMANDS; i++)
			if (commands[i].id != 0 && commands[i].pid == 0 &&
			    ready_to_finish(&commands[i], now, &wait_ms))
				finish(&commands[i]);
	}
}

static void serve_off(void) __attribute__((noreturn));
static void serve_off(void)
{
	/* Nothing to serve: sleep rather than exit and be respawned by init over and over. */
	fprintf(stderr, "kasou-agent: no line to the host; the agent is off\n");
	for (;;)
		pause();
}

static int poweroff(void)
{
	/* Port 0x604 means something else on other machines, and halting is not undoable: act
	 * only in kasou's guest, which has this file (a host never should). */
	if (access(GUEST_MARK, F_OK) != 0) {
		fprintf(stderr, "kasou-agent: %s is missing: this is not kasou's guest, refusing to "
			"power off\n", GUEST_MARK);
		return 1;
	}
	sync();
	if (ioperm(KASOU_POWEROFF_PORT, 2, 1) == 0)
		outw(KASOU_POWEROFF_SLP_EN, KASOU_POWEROFF_PORT);
	else
		fprintf(stderr, "kasou-agent: ioperm(0x%x): %s\n", KASOU_POWEROFF_PORT,
			strerror(errno));
	/* Still here: the VMM has no power-off register there. Halt the CPUs instead. */
	fprintf(stderr, "kasou-agent: the VMM did not power off; halting\n");
	reboot(RB_HALT_SYSTEM);
	fprintf(stderr, "kasou-agent: reboot(RB_HALT_SYSTEM): %s\n", strerror(errno));
	return 1;
}

int main(int argc, char **argv)
{
	if (argc == 2 && strcmp(argv[1], "poweroff") == 0)
		return poweroff();
	if (argc == 3 && strcmp(argv[1], "--serial") == 0) {
		int serial_fd = open_serial(argv[2]); /* kasou's tests run the agent on a pty */
		if (serial_fd < 0)
			serve_off();
		serve(serial_fd, -1);
	}
	if (argc == 3 && strcmp(argv[1], "--unix") == 0)
		serve(-1, listen_unix(argv[2]));
	if (argc != 1) {
		fprintf(stderr, "usage: kasou-agent [--serial TTY | --unix PATH | poweroff]\n");
		return 2;
	}
	int serial_fd = open_serial(SERIAL_PATH);
	int listen_fd = listen_vsock();
	if (serial_fd < 0 && listen_fd < 0)
		serve_off();
	serve(serial_fd, listen_fd);
}
