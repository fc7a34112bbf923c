/*
 * tree_producer -- the head of a pipeline: numbered lines at a steady pace.
 *
 *   tree_producer [USEC]
 *
 * Writes "line N\n" (N = 1, 2, 3, ...) to stdout with one write(2) each
 * (unbuffered, atomic on a pipe), sleeping USEC microseconds (default 1000)
 * between lines, until killed or until stdout is closed (EPIPE: exit 0).
 * Prints nothing else; its downstream decides what is checked.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int write_all(const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(1, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

int main(int argc, char **argv)
{
	long usec = argc > 1 ? atol(argv[1]) : 1000;
	signal(SIGPIPE, SIG_IGN);
	struct timespec ts = { usec / 1000000, (usec % 1000000) * 1000 };
	for (unsigned long n = 1;; n++) {
		char buf[64];
		int len = snprintf(buf, sizeof(buf), "line %lu\n", n);
		if (write_all(buf, (size_t)len) < 0)
			return errno == EPIPE ? 0 : 1;
		if (usec > 0)
			while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
				;
		ts.tv_sec = usec / 1000000;
		ts.tv_nsec = (usec % 1000000) * 1000;
	}
}
