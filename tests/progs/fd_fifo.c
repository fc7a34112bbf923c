/*
 * fd_fifo -- named pipes (FIFOs) with unread bytes.
 *
 *   fd_fifo DIR          (makes DIR/f1, DIR/f2, DIR/f3 with mkfifo)
 *
 * f1: a reader (O_RDONLY, blocking) and a writer (O_WRONLY|O_NONBLOCK) in
 *     this process; capacity set to 128 KiB; 5 bytes were read of what
 *     was written, the rest (TEXT1 minus 5 bytes, then N1 pattern bytes)
 *     is unread.
 * f2: one O_RDWR description holding TEXT2 unread.
 * f3: a writer only (O_WRONLY), the reader having closed: TEXT3 unread.
 *
 * Each probe checks the link (path), that the fd is the FIFO at that path,
 * access modes and O_NONBLOCK, capacity, the number of unread bytes, then
 * reads them all (in order) and writes them back, so that the next probe
 * finds the same state.  For f3 (no reader) it opens a reader of its own.
 * Prints "READY pid=P"; on SIGUSR1 "PASS fd_fifo pid=P" or
 * "FAIL fd_fifo: <details> (pid=P)".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define NAME "fd_fifo"
#define CAP1 (128 * 1024)
#define N1 70000
#define TEXT1 "hello fifo one\n"
#define TEXT2 "data in an O_RDWR fifo\n"
#define TEXT3 "written, reader gone\n"

#include "probe.h"

static void die(const char *what) { fprintf(stderr, NAME ": %s: %s\n", what, strerror(errno)); exit(1); }

static char p1[PATH_MAX], p2[PATH_MAX], p3[PATH_MAX];
static int r1, w1, rw2, w3;
static unsigned char exp1[sizeof(TEXT1) - 1 - 5 + N1];

static int unread(int fd)
{
	int n = -1;
	if (ioctl(fd, FIONREAD, &n)) return -1;
	return n;
}

static void check_fd(int fd, const char *path, int accmode, int nonblock)
{
	char p[64], l[PATH_MAX];
	struct stat a, b;
	snprintf(p, sizeof(p), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(p, l, sizeof(l) - 1);
	if (n < 0) { fail("readlink fd %d: %s", fd, strerror(errno)); return; }
	l[n] = 0;
	if (strcmp(l, path)) fail("fd %d is %s, expected %s", fd, l, path);
	if (fstat(fd, &a) || stat(path, &b) || !S_ISFIFO(a.st_mode) || a.st_ino != b.st_ino || a.st_dev != b.st_dev)
		fail("fd %d is not the FIFO %s", fd, path);
	int fl = fcntl(fd, F_GETFL);
	if ((fl & O_ACCMODE) != accmode) fail("fd %d (%s) access mode %d, expected %d", fd, path, fl & O_ACCMODE, accmode);
	if (!!(fl & O_NONBLOCK) != nonblock) fail("fd %d (%s) is %sblocking", fd, path, nonblock ? "" : "non-");
}

/* read exactly n bytes (the fd made non-blocking meanwhile), compare, write them back */
static void drain_check(int rfd, int wfd, const unsigned char *want, int n, const char *what)
{
	static unsigned char buf[CAP1 * 2];
	int fl = fcntl(rfd, F_GETFL);
	fcntl(rfd, F_SETFL, fl | O_NONBLOCK);
	int got = 0;
	while (got < n) {
		ssize_t k = read(rfd, buf + got, n - got);
		if (k <= 0) break;
		got += k;
	}
	ssize_t extra = read(rfd, buf + got, 1);
	fcntl(rfd, F_SETFL, fl);
	if (got != n) fail("%s: read %d unread bytes, expected %d", what, got, n);
	else if (memcmp(buf, want, n)) fail("%s: unread bytes differ", what);
	if (extra > 0) fail("%s: more bytes than expected", what);
	int wfl = fcntl(wfd, F_GETFL);
	fcntl(wfd, F_SETFL, wfl | O_NONBLOCK);
	if (got > 0 && write(wfd, buf, got) != got) fail("%s: cannot write the bytes back: %s", what, strerror(errno));
	fcntl(wfd, F_SETFL, wfl);
}

static void verify(void)
{
	fails[0] = 0;
	check_fd(r1, p1, O_RDONLY, 0);
	check_fd(w1, p1, O_WRONLY, 1);
	check_fd(rw2, p2, O_RDWR, 0);
	check_fd(w3, p3, O_WRONLY, 0);
	if (fcntl(w1, F_GETPIPE_SZ) != CAP1) fail("f1 capacity %d, expected %d", fcntl(w1, F_GETPIPE_SZ), CAP1);
	if (unread(r1) != (int)sizeof(exp1)) fail("f1 holds %d bytes, expected %zu", unread(r1), sizeof(exp1));
	if (unread(rw2) != (int)strlen(TEXT2)) fail("f2 holds %d bytes, expected %zu", unread(rw2), strlen(TEXT2));
	if (unread(w3) != (int)strlen(TEXT3)) fail("f3 holds %d bytes, expected %zu", unread(w3), strlen(TEXT3));
	drain_check(r1, w1, exp1, sizeof(exp1), "f1");
	drain_check(rw2, rw2, (const unsigned char *)TEXT2, strlen(TEXT2), "f2");
	int r3 = open(p3, O_RDONLY | O_NONBLOCK);
	if (r3 < 0) fail("open f3 for reading: %s", strerror(errno));
	else {
		drain_check(r3, w3, (const unsigned char *)TEXT3, strlen(TEXT3), "f3");
		close(r3);   /* the bytes stay: w3 holds the FIFO open */
	}
	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 2) { fprintf(stderr, "usage: " NAME " DIR\n"); return 2; }
	snprintf(p1, sizeof(p1), "%s/f1", argv[1]);
	snprintf(p2, sizeof(p2), "%s/f2", argv[1]);
	snprintf(p3, sizeof(p3), "%s/f3", argv[1]);
	unlink(p1); unlink(p2); unlink(p3);
	if (mkfifo(p1, 0600) || mkfifo(p2, 0600) || mkfifo(p3, 0600)) die("mkfifo");

	r1 = open(p1, O_RDONLY | O_NONBLOCK);
	if (r1 < 0) die("open f1 r");
	w1 = open(p1, O_WRONLY | O_NONBLOCK);
	if (w1 < 0) die("open f1 w");
	if (fcntl(w1, F_SETPIPE_SZ, CAP1) < 0) die("F_SETPIPE_SZ");
	fcntl(r1, F_SETFL, fcntl(r1, F_GETFL) & ~O_NONBLOCK);
	static unsigned char all[sizeof(TEXT1) - 1 + N1];
	memcpy(all, TEXT1, sizeof(TEXT1) - 1);
	for (int i = 0; i < N1; i++) all[sizeof(TEXT1) - 1 + i] = (unsigned char)((i * 131 + 7) % 251);
	if (write(w1, all, sizeof(all)) != (ssize_t)sizeof(all)) die("write f1");
	char five[5];
	if (read(r1, five, 5) != 5) die("read f1");
	memcpy(exp1, all + 5, sizeof(exp1));

	rw2 = open(p2, O_RDWR);
	if (rw2 < 0 || write(rw2, TEXT2, strlen(TEXT2)) != (ssize_t)strlen(TEXT2)) die("f2");

	int r3 = open(p3, O_RDONLY | O_NONBLOCK);
	w3 = open(p3, O_WRONLY);
	if (r3 < 0 || w3 < 0 || write(w3, TEXT3, strlen(TEXT3)) != (ssize_t)strlen(TEXT3)) die("f3");
	close(r3);

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	printf("READY pid=%d\n", getpid());
	struct timespec ts = { 0, 1000000 };
	for (;;) {
		if (probe_req) {
			probe_req = 0;
			verify();
		}
		nanosleep(&ts, NULL);
	}
}
