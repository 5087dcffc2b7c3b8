/*
 * kasou-agent: the guest side of kasou's guest agent.
 *
 * Modes:
 *
 *   kasou-agent                serve kasou's requests on the second serial port (/dev/ttyS1,
 *                              COM2: I/O 0x2f8, IRQ 3); COM1 stays the user's console. Started
 *                              by init (/etc/inittab), which restarts it if it dies.
 *   kasou-agent --serial TTY   the same on another tty (kasou's tests run it on a pty).
 *   kasou-agent poweroff       ask kasou to end the VM (init's last shutdown step, after sync
 *                              and unmount): write SLP_EN to kasou's power-off register, port
 *                              0x604. Only in kasou's guest (/etc/kasou-guest exists).
 *
 * The wire protocol is documented in kasou/agent/protocol.py, next to the host's codec:
 * frames of  u32 length (big endian, of type + payload) | u8 type | payload.  The agent
 * answers EXEC by running the command with fork/exec, its stdio on pipes, and relays
 * STDIN/STDOUT/STDERR/EXIT; several commands may run at once.  One poll() loop multiplexes the
 * serial port, a signalfd for SIGCHLD and the commands' pipes.
 *
 * Everything that arrives on the serial port is untrusted: lengths are capped, payloads are
 * parsed with bounds checks, and a malformed frame is dropped with an ERROR frame in reply.
 * The agent never exits on bad input.
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
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define AGENT_VERSION "kasou-agent 1"
#define SERIAL_PATH "/dev/ttyS1"
#define GUEST_MARK "/etc/kasou-guest"

/* Frame types: keep in step with FrameType in kasou/agent/protocol.py. */
enum frame_type {
	T_READY = 1,     /* guest->host  version string */
	T_EXEC = 2,      /* host->guest  u32 id, argv as NUL-terminated strings */
	T_STDIN = 3,     /* host->guest  u32 id, data */
	T_STDIN_EOF = 4, /* host->guest  u32 id */
	T_STDOUT = 5,    /* guest->host  u32 id, data (<= CHUNK bytes) */
	T_STDERR = 6,    /* guest->host  u32 id, data (<= CHUNK bytes) */
	T_EXIT = 7,      /* guest->host  u32 id, i32 status */
	T_ERROR = 8,     /* guest->host  u32 id (0: not about a command), UTF-8 message */
	T_PING = 9,      /* host->guest  any bytes, echoed in PONG */
	T_PONG = 10,     /* guest->host  the PING's bytes */
	T_SIGNAL = 11,   /* host->guest  u32 id, u32 signal number: sent to the command's group */
};

#define MAX_FRAME (1u << 20)          /* largest length field accepted: type + payload */
#define CHUNK 4096                    /* largest STDOUT/STDERR data per frame */
#define MAX_COMMANDS 64               /* commands running at once */
#define MAX_ARGS 4096                 /* argv entries per EXEC */
#define MAX_STDIN_QUEUE (4u << 20)    /* bytes of STDIN held for a command not reading */
#define KASOU_POWEROFF_PORT 0x604     /* kasou's power-off register (16 bit) */
#define KASOU_POWEROFF_SLP_EN 0x2000  /* as ACPI PM1a_CNT: SLP_EN is bit 13 */

struct command {
	uint32_t id;          /* 0: free slot */
	pid_t pid;            /* 0 once reaped */
	int status;           /* wait status, valid once reaped */
	int in_fd, out_fd, err_fd;  /* our ends of its pipes; -1 once closed */
	unsigned char *inq;   /* STDIN waiting for the command to read it */
	size_t inq_len, inq_cap;
	int in_eof;           /* STDIN_EOF seen: close stdin once inq is written */
};

static int serial_fd = -1;
static struct command commands[MAX_COMMANDS];
static unsigned char rx[4 + MAX_FRAME];
static size_t rx_len;
static unsigned char tx[4 + 1 + 4 + CHUNK + 256];

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

static void write_all(int fd, const unsigned char *data, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, data, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) {
				struct pollfd p = { .fd = fd, .events = POLLOUT };
				poll(&p, 1, -1);
				continue;
			}
			die("writing to the serial port");
		}
		data += n;
		len -= (size_t)n;
	}
}

/* Send one frame: type, an optional u32 id (has_id), then data. */
static void send_frame(int type, int has_id, uint32_t id, const void *data, size_t len)
{
	size_t head = 5 + (has_id ? 4 : 0);
	put_u32(tx, (uint32_t)(head - 4 + len));
	tx[4] = (unsigned char)type;
	if (has_id)
		put_u32(tx + 5, id);
	if (head + len <= sizeof(tx)) {
		memcpy(tx + head, data, len);
		write_all(serial_fd, tx, head + len);
	} else {
		write_all(serial_fd, tx, head);
		write_all(serial_fd, data, len);
	}
}

static void send_error(uint32_t id, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void send_error(uint32_t id, const char *fmt, ...)
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
	send_frame(T_ERROR, 1, id, msg, (size_t)n);
}

static struct command *find_command(uint32_t id)
{
	for (int i = 0; i < MAX_COMMANDS; i++)
		if (id != 0 && commands[i].id == id)
			return &commands[i];
	return NULL;
}

static void close_fd(int *fd)
{
	if (*fd >= 0) {
		close(*fd);
		*fd = -1;
	}
}

static void close_stdin(struct command *c)
{
	close_fd(&c->in_fd);
	free(c->inq);
	c->inq = NULL;
	c->inq_len = c->inq_cap = 0;
}

/* In the child, between fork and exec: only async-signal-safe calls. */
static void run_child(char **argv, int in_fd, int out_fd, int err_fd, int status_fd)
{
	static char *const env[] = {
		"PATH=/bin:/sbin:/usr/bin:/usr/sbin", "HOME=/root", "TERM=dumb", NULL,
	};
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	signal(SIGPIPE, SIG_DFL);
	setsid();
	if (dup2(in_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(err_fd, 2) < 0 || chdir("/") < 0)
		goto fail;
	environ = (char **)env;
	execvp(argv[0], argv);
fail:;
	int err = errno;
	ssize_t ignored = write(status_fd, &err, sizeof(err));
	(void)ignored;
	_exit(127);
}

static int set_nonblock(int fd)
{
	int flags = fcntl(fd, F_GETFL);
	return flags < 0 ? -1 : fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

/* EXEC: u32 id, then argv as NUL-terminated strings (at least one, the last ends the payload). */
static void handle_exec(const unsigned char *p, size_t len)
{
	static char *argv[MAX_ARGS + 1];
	static char args[MAX_FRAME];
	if (len < 4) {
		send_error(0, "EXEC without an id");
		return;
	}
	uint32_t id = get_u32(p);
	p += 4;
	len -= 4;
	if (id == 0) {
		send_error(0, "EXEC with id 0 (reserved)");
		return;
	}
	if (find_command(id) != NULL) {
		send_error(id, "EXEC id %u is already running", id);
		return;
	}
	if (len == 0 || p[len - 1] != '\0') {
		send_error(id, "EXEC argv must be NUL-terminated strings");
		return;
	}
	memcpy(args, p, len);
	size_t argc = 0;
	for (size_t at = 0; at < len; at += strlen(args + at) + 1) {
		if (argc == MAX_ARGS) {
			send_error(id, "EXEC has more than %d arguments", MAX_ARGS);
			return;
		}
		argv[argc++] = args + at;
	}
	argv[argc] = NULL;
	if (argv[0][0] == '\0') {
		send_error(id, "EXEC with an empty program name");
		return;
	}
	struct command *c = NULL;
	for (int i = 0; i < MAX_COMMANDS && c == NULL; i++)
		if (commands[i].id == 0)
			c = &commands[i];
	if (c == NULL) {
		send_error(id, "%d commands are running already", MAX_COMMANDS);
		return;
	}
	int in[2], out[2], err[2], status[2];
	int made = 0;
	if (pipe2(in, O_CLOEXEC) == 0 && ++made && pipe2(out, O_CLOEXEC) == 0 && ++made &&
	    pipe2(err, O_CLOEXEC) == 0 && ++made && pipe2(status, O_CLOEXEC) == 0 && ++made) {
		pid_t pid = fork();
		if (pid == 0)
			run_child(argv, in[0], out[1], err[1], status[1]);
		close(in[0]);
		close(out[1]);
		close(err[1]);
		close(status[1]);
		if (pid < 0) {
			send_error(id, "fork: %s", strerror(errno));
			close(in[1]);
			close(out[0]);
			close(err[0]);
			close(status[0]);
			return;
		}
		/* The status pipe closes on a successful exec (O_CLOEXEC), or carries errno. */
		int child_errno = 0;
		ssize_t n;
		do
			n = read(status[0], &child_errno, sizeof(child_errno));
		while (n < 0 && errno == EINTR);
		close(status[0]);
		if (n == (ssize_t)sizeof(child_errno)) {
			while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
				;
			send_error(id, "cannot run %s: %s", argv[0], strerror(child_errno));
			close(in[1]);
			close(out[0]);
			close(err[0]);
			return;
		}
		set_nonblock(in[1]);
		set_nonblock(out[0]);
		set_nonblock(err[0]);
		*c = (struct command){
			.id = id, .pid = pid, .in_fd = in[1], .out_fd = out[0], .err_fd = err[0],
		};
		return;
	}
	int saved = errno;
	if (made > 0) { close(in[0]); close(in[1]); }
	if (made > 1) { close(out[0]); close(out[1]); }
	if (made > 2) { close(err[0]); close(err[1]); }
	send_error(id, "pipe: %s", strerror(saved));
}

static void handle_stdin(const unsigned char *p, size_t len, int eof)
{
	if (len < 4) {
		send_error(0, "%s without an id", eof ? "STDIN_EOF" : "STDIN");
		return;
	}
	uint32_t id = get_u32(p);
	struct command *c = find_command(id);
	if (c == NULL) {
		send_error(id, "no command %u is running", id);
		return;
	}
	if (c->in_fd < 0 || c->in_eof)
		return; /* the command closed its stdin, or EOF was sent: nothing reads it */
	if (eof) {
		c->in_eof = 1;
		if (c->inq_len == 0)
			close_stdin(c);
		return;
	}
	size_t add = len - 4;
	if (c->inq_len + add > MAX_STDIN_QUEUE) {
		send_error(id, "stdin dropped: %u bytes are queued already", (unsigned)c->inq_len);
		return;
	}
	if (c->inq_len + add > c->inq_cap) {
		size_t cap = (c->inq_len + add) * 2;
		unsigned char *grown = realloc(c->inq, cap);
		if (grown == NULL) {
			send_error(id, "stdin dropped: out of memory");
			return;
		}
		c->inq = grown;
		c->inq_cap = cap;
	}
	memcpy(c->inq + c->inq_len, p + 4, add);
	c->inq_len += add;
}

static void handle_signal(const unsigned char *p, size_t len)
{
	if (len != 8) {
		send_error(0, "SIGNAL payload must be 8 bytes, not %u", (unsigned)len);
		return;
	}
	uint32_t id = get_u32(p), sig = get_u32(p + 4);
	struct command *c = find_command(id);
	if (c == NULL || c->pid == 0) {
		send_error(id, "no command %u is running", id);
		return;
	}
	if (sig == 0 || sig >= (uint32_t)NSIG) {
		send_error(id, "no signal %u", sig);
		return;
	}
	/* The command leads its own process group (setsid in run_child). */
	if (kill(-c->pid, (int)sig) < 0 && kill(c->pid, (int)sig) < 0)
		send_error(id, "kill: %s", strerror(errno));
}

static void handle_frame(int type, const unsigned char *p, size_t len)
{
	switch (type) {
	case T_EXEC:
		handle_exec(p, len);
		break;
	case T_STDIN:
		handle_stdin(p, len, 0);
		break;
	case T_STDIN_EOF:
		handle_stdin(p, len, 1);
		break;
	case T_SIGNAL:
		handle_signal(p, len);
		break;
	case T_PING:
		send_frame(T_PONG, 0, 0, p, len);
		break;
	default:
		send_error(0, "unexpected frame type %d", type);
	}
}

static void read_serial(void)
{
	ssize_t n = read(serial_fd, rx + rx_len, sizeof(rx) - rx_len);
	if (n < 0) {
		if (errno == EINTR || errno == EAGAIN)
			return;
		die("reading the serial port");
	}
	rx_len += (size_t)n;
	size_t at = 0;
	while (rx_len - at >= 4) {
		uint32_t len = get_u32(rx + at);
		if (len == 0 || len > MAX_FRAME) {
			/* No way to find the next frame boundary: drop what is buffered. */
			send_error(0, "dropped %u bytes: bad frame length %u", (unsigned)(rx_len - at),
				   len);
			at = rx_len;
			break;
		}
		if (rx_len - at < 4 + (size_t)len)
			break;
		handle_frame(rx[at + 4], rx + at + 5, len - 1);
		at += 4 + (size_t)len;
	}
	memmove(rx, rx + at, rx_len - at);
	rx_len -= at;
}

/* Relay what a command wrote to one of its pipes; returns 0 at EOF or error, else 1. */
static int relay_output(struct command *c, int *fd, int type)
{
	unsigned char buf[CHUNK];
	ssize_t n = read(*fd, buf, sizeof(buf));
	if (n > 0) {
		send_frame(type, 1, c->id, buf, (size_t)n);
		return 1;
	}
	if (n < 0 && (errno == EINTR || errno == EAGAIN))
		return 0;
	close_fd(fd);
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
	memmove(c->inq, c->inq + n, c->inq_len - (size_t)n);
	c->inq_len -= (size_t)n;
	if (c->inq_len == 0 && c->in_eof)
		close_stdin(c);
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
			}
		}
	}
}

/* A reaped command: send what is left in its pipes (whatever it wrote before exiting is
 * there), then EXIT. A descendant still holding the pipes open loses later output. */
static void finish(struct command *c)
{
	while (c->out_fd >= 0 && relay_output(c, &c->out_fd, T_STDOUT))
		;
	while (c->err_fd >= 0 && relay_output(c, &c->err_fd, T_STDERR))
		;
	close_fd(&c->out_fd);
	close_fd(&c->err_fd);
	close_stdin(c);
	int code = WIFSIGNALED(c->status) ? 128 + WTERMSIG(c->status) : WEXITSTATUS(c->status);
	unsigned char payload[4];
	put_u32(payload, (uint32_t)code);
	send_frame(T_EXIT, 1, c->id, payload, sizeof(payload));
	*c = (struct command){ .id = 0, .in_fd = -1, .out_fd = -1, .err_fd = -1 };
}

/* Without the port (a VMM that gives the guest no COM2: the 8250 driver still makes
 * /dev/ttyS1, but it fails with EIO) there is nothing to serve: say so once and sleep, rather
 * than exit and be respawned by init over and over. */
static void no_serial(const char *path, const char *what) __attribute__((noreturn));
static void no_serial(const char *path, const char *what)
{
	fprintf(stderr, "kasou-agent: %s: %s: %s; the agent is off\n", path, what, strerror(errno));
	for (;;)
		pause();
}

static int open_serial(const char *path)
{
	int fd = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (fd < 0)
		no_serial(path, "open");
	struct termios tio;
	if (tcgetattr(fd, &tio) < 0)
		no_serial(path, "tcgetattr");
	cfmakeraw(&tio); /* 8 bits, no echo, no line editing, no CR/LF translation */
	tio.c_cflag |= CLOCAL | CREAD;
	tio.c_cc[VMIN] = 1;
	tio.c_cc[VTIME] = 0;
	cfsetspeed(&tio, B115200);
	if (tcsetattr(fd, TCSANOW, &tio) < 0)
		no_serial(path, "tcsetattr");
	tcflush(fd, TCIOFLUSH);
	return fd;
}

static void serve(const char *path) __attribute__((noreturn));
static void serve(const char *path)
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
		commands[i] = (struct command){ .id = 0, .in_fd = -1, .out_fd = -1, .err_fd = -1 };
	serial_fd = open_serial(path);
	send_frame(T_READY, 0, 0, AGENT_VERSION, strlen(AGENT_VERSION));

	struct pollfd fds[2 + 3 * MAX_COMMANDS];
	struct { struct command *c; int which; } owner[2 + 3 * MAX_COMMANDS];
	for (;;) {
		nfds_t nfds = 0;
		fds[nfds++] = (struct pollfd){ .fd = serial_fd, .events = POLLIN };
		fds[nfds++] = (struct pollfd){ .fd = sig_fd, .events = POLLIN };
		for (int i = 0; i < MAX_COMMANDS; i++) {
			struct command *c = &commands[i];
			if (c->id == 0)
				continue;
			int want[3] = { c->out_fd, c->err_fd, c->inq_len > 0 ? c->in_fd : -1 };
			for (int w = 0; w < 3; w++) {
				if (want[w] < 0)
					continue;
				owner[nfds].c = c;
				owner[nfds].which = w;
				fds[nfds++] = (struct pollfd){
					.fd = want[w], .events = w == 2 ? POLLOUT : POLLIN,
				};
			}
		}
		if (poll(fds, nfds, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (fds[0].revents & (POLLIN | POLLERR | POLLHUP))
			read_serial();
		if (fds[1].revents & POLLIN) {
			struct signalfd_siginfo info;
			while (read(sig_fd, &info, sizeof(info)) == (ssize_t)sizeof(info))
				;
			reap();
		}
		for (nfds_t k = 2; k < nfds; k++) {
			struct command *c = owner[k].c;
			if (fds[k].revents == 0 || c->id == 0)
				continue;
			if (owner[k].which == 0 && fds[k].fd == c->out_fd)
				relay_output(c, &c->out_fd, T_STDOUT);
			else if (owner[k].which == 1 && fds[k].fd == c->err_fd)
				relay_output(c, &c->err_fd, T_STDERR);
			else if (owner[k].which == 2 && fds[k].fd == c->in_fd)
				feed_stdin(c);
		}
		for (int i = 0; i < MAX_COMMANDS; i++)
			if (commands[i].id != 0 && commands[i].pid == 0)
				finish(&commands[i]);
	}
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
	if (argc == 3 && strcmp(argv[1], "--serial") == 0)
		serve(argv[2]); /* another tty: kasou's tests run the agent on a pty */
	if (argc != 1) {
		fprintf(stderr, "usage: kasou-agent [--serial TTY | poweroff]\n");
		return 2;
	}
	serve(SERIAL_PATH);
}
