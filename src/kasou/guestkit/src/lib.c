/*
 * lib.c - pure helpers for both rings: memory and string functions, a small
 * printf-like formatter and command-line parsing. Nothing here touches a
 * port, a control register or anything outside the buffers it is given, so
 * ring-3 workloads call it as freely as the ring-0 kernel does.
 */
#include "guest.h"

/* gcc may emit calls to memset and memcpy for large initializers and copies
 * even with -ffreestanding (gcc manual, "C Language Options"). */
void *memset(void *dst, int c, size_t n)
{
	unsigned char *d = dst;

	while (n--)
		*d++ = (unsigned char)c;
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	while (n--)
		*d++ = *s++;
	return dst;
}

size_t str_len(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

bool str_eq(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return *a == *b;
}

struct out {
	char *buf;
	size_t size;
	size_t len;
};

static void out_char(struct out *o, char c)
{
	if (o->len + 1 < o->size)
		o->buf[o->len] = c;
	o->len++;
}

static void out_number(struct out *o, uint64_t v, unsigned base, int width, char pad)
{
	static const char digits[] = "0123456789abcdef";
	char tmp[24];
	int n = 0;

	do {
		tmp[n++] = digits[v % base];
		v /= base;
	} while (v);
	while (width-- > n)
		out_char(o, pad);
	while (n)
		out_char(o, tmp[--n]);
}

/*
 * A printf subset: %s %c %d %u %x %% with an optional '0' flag, a width and
 * the 'l' length modifier. Always NUL-terminates (when size > 0) and returns
 * the length the full output would have had.
 */
int vformat(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct out o = { buf, size, 0 };

	for (; *fmt; fmt++) {
		char pad = ' ';
		int width = 0;
		bool is_long = false;
		uint64_t u;
		int64_t s;
		const char *str;

		if (*fmt != '%') {
			out_char(&o, *fmt);
			continue;
		}
		fmt++;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		if (*fmt == 'l') {
			is_long = true;
			fmt++;
		}
		switch (*fmt) {
		case 's':
			str = va_arg(ap, const char *);
			if (!str)
				str = "(null)";
			for (int n = (int)str_len(str); width > n; width--)
				out_char(&o, ' ');
			while (*str)
				out_char(&o, *str++);
			break;
		case 'c':
			out_char(&o, (char)va_arg(ap, int));
			break;
		case 'd':
			s = is_long ? va_arg(ap, int64_t) : va_arg(ap, int);
			if (s < 0) {
				out_char(&o, '-');
				u = (uint64_t)0 - (uint64_t)s;
			} else {
				u = (uint64_t)s;
			}
			out_number(&o, u, 10, width, pad);
			break;
		case 'u':
		case 'x':
			u = is_long ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
			out_number(&o, u, *fmt == 'u' ? 10 : 16, width, pad);
			break;
		case '%':
			out_char(&o, '%');
			break;
		case '\0':
			fmt--;
			break;
		default:
			out_char(&o, '%');
			out_char(&o, *fmt);
			break;
		}
	}
	if (size)
		buf[o.len < size ? o.len : size - 1] = '\0';
	return (int)o.len;
}

int format(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vformat(buf, size, fmt, ap);
	va_end(ap);
	return n;
}

/*
 * Looks for a space-separated word "key=value" and copies the value (cut to
 * size - 1 bytes). Multiboot loaders put the kernel's file name first
 * (QEMU does); it is just another word here.
 */
bool cmdline_get(const char *cmdline, const char *key, char *out, size_t size)
{
	size_t klen = str_len(key);
	const char *p = cmdline;

	while (*p) {
		const char *w;
		size_t i;

		while (*p == ' ')
			p++;
		w = p;
		while (*p && *p != ' ')
			p++;
		for (i = 0; i < klen && w + i < p && w[i] == key[i]; i++)
			;
		if (i == klen && w + klen < p && w[klen] == '=') {
			const char *v = w + klen + 1;
			size_t n = 0;

			while (v < p && n + 1 < size)
				out[n++] = *v++;
			if (size)
				out[n] = '\0';
			return true;
		}
	}
	return false;
}

bool parse_u64(const char *s, uint64_t *out)
{
	uint64_t v = 0;
	unsigned base = 10;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	if (!*s)
		return false;
	for (; *s; s++) {
		unsigned d;

		if (*s >= '0' && *s <= '9')
			d = (unsigned)(*s - '0');
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = (unsigned)(*s - 'a' + 10);
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = (unsigned)(*s - 'A' + 10);
		else
			return false;
		if (v > (UINT64_MAX - d) / base)
			return false;
		v = v * base + d;
	}
	*out = v;
	return true;
}
