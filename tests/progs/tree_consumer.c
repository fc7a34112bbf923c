/*
 * tree_consumer -- a slow tail for a pipeline: appends its input to a file.
 *
 *   tree_consumer OUTFILE [CHUNK [USEC]]
 *
 * Opens OUTFILE with O_APPEND (created if missing), then reads at most CHUNK
 * bytes (default 64) from stdin, appends them to OUTFILE, sleeps USEC
 * microseconds (default 1000), and again, until end of input (exit 0).  Reading
 * slower than its upstream writes keeps the pipes before it full.  SIGUSR1:
 * stop sleeping (drain the rest at full speed).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t fast;
static void on_usr1(int sig) { (void)sig; fast = 1; }

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: tree_consumer OUTFILE [CHUNK [USEC]]\n");
		return 2;
	}
	size_t chunk = argc > 2 ? (size_t)atol(argv[2]) : 64;
	long usec = argc > 3 ? atol(argv[3]) : 1000;
	if (chunk < 1 || chunk > 65536)
		chunk = 64;
	int out = open(argv[1], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
	if (out < 0) {
		perror(argv[1]);
		return 1;
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	static char buf[65536];
	for (;;) {
		ssize_t n = read(0, buf, fast ? sizeof(buf) : chunk);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			perror("read");
			return 1;
		}
		if (n == 0)
			return 0;
		for (ssize_t off = 0; off < n;) {
			ssize_t w = write(out, buf + off, (size_t)(n - off));
			if (w < 0 && errno == EINTR)
				continue;
			if (w < 0) {
				perror("write");
				return 1;
			}
			off += w;
		}
		if (usec > 0 && !fast) {
			struct timespec ts = { usec / 1000000, (usec % 1000000) * 1000 };
			while (!fast && nanosleep(&ts, &ts) < 0 && errno == EINTR)
				;
		}
	}
}
