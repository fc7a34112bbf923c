/*
 * fd_timerfd -- timerfds of every sort, checked after a restart.
 *
 *   fd_timerfd
 *
 * State set up before READY:
 *   per    CLOCK_MONOTONIC, TFD_NONBLOCK|TFD_CLOEXEC, periodic 200 ms
 *   one    CLOCK_MONOTONIC, blocking, one-shot in 3600 s
 *   abs    CLOCK_REALTIME, TFD_CLOEXEC, TFD_TIMER_ABSTIME|TFD_TIMER_CANCEL_ON_SET,
 *          at now + 3600 s
 *   boot   CLOCK_BOOTTIME, TFD_NONBLOCK, first in 1800 s then every 7 s
 *   fired  CLOCK_MONOTONIC, one-shot of 1 ms that expired: 1 tick not read
 *   many   CLOCK_MONOTONIC, one-shot in 3600 s with 7 ticks not read
 *          (set with TFD_IOC_SET_TICKS)
 *   off    CLOCK_MONOTONIC, disarmed, interval 5 s kept by timerfd_settime
 *
 * On SIGUSR1 it checks clocks and settime flags (its own fdinfo), fd flags,
 * time left and intervals (timerfd_gettime), reads the pending ticks (and
 * puts them back), and times the periodic timer: its next expirations come
 * about 200 ms apart.  Prints "PASS fd_timerfd pid=P" or
 * "FAIL fd_timerfd: <details> (pid=P)".
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
#include <sys/ioctl.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define NAME "fd_timerfd"
#ifndef TFD_IOC_SET_TICKS
#define TFD_IOC_SET_TICKS _IOW('T', 0, uint64_t)
#endif
#define MS 1000000LL
#define SEC 1000000000LL

#include "probe.h"

static int t_per, t_one, t_abs, t_boot, t_fired, t_many, t_off;
static long long one_set_at;     /* CLOCK_MONOTONIC when 'one' was set */

static long long now_ns(clockid_t c)
{
	struct timespec ts;
	clock_gettime(c, &ts);
	return ts.tv_sec * SEC + ts.tv_nsec;
}

static struct timespec ts_of(long long ns) { return (struct timespec){ ns / SEC, ns % SEC }; }
static long long ns_of(struct timespec ts) { return ts.tv_sec * SEC + ts.tv_nsec; }

static int make(clockid_t clk, int flags, int sflags, long long value, long long interval)
{
	int fd = timerfd_create(clk, flags);
	if (fd < 0) { perror("timerfd_create"); exit(1); }
	struct itimerspec it = { ts_of(interval), ts_of(value) };
	if ((value || interval) && timerfd_settime(fd, sflags, &it, NULL)) {
		perror("timerfd_settime"); exit(1);
	}
	return fd;
}

/* "key: value" of /proc/self/fdinfo/fd, as a number in base `base` */
static long long fdinfo_num(int fd, const char *key, int base)
{
	char path[64], buf[4096];
	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
	int f = open(path, O_RDONLY | O_CLOEXEC);
	if (f < 0) return -1;
	ssize_t n = read(f, buf, sizeof(buf) - 1);
	close(f);
	if (n <= 0) return -1;
	buf[n] = 0;
	char *p = strstr(buf, key);
	if (!p) return -1;
	return strtoll(p + strlen(key), NULL, base);
}

static void check_fd(const char *name, int fd, int clk, int sflags, int nonblock, int cloexec)
{
	long long c = fdinfo_num(fd, "clockid:", 10);
	long long s = fdinfo_num(fd, "settime flags:", 8);
	if (c != clk) fail("%s: clockid %lld, want %d", name, c, clk);
	if (s != sflags) fail("%s: settime flags 0%llo, want 0%o", name, s, sflags);
	int fl = fcntl(fd, F_GETFL), fdf = fcntl(fd, F_GETFD);
	if (fl < 0 || fdf < 0) { fail("%s: fd %d not open", name, fd); return; }
	if (!!(fl & O_NONBLOCK) != nonblock) fail("%s: O_NONBLOCK is %d", name, !!(fl & O_NONBLOCK));
	if (!!(fdf & FD_CLOEXEC) != cloexec) fail("%s: FD_CLOEXEC is %d", name, !!(fdf & FD_CLOEXEC));
}

static void get(int fd, long long *value, long long *interval)
{
	struct itimerspec it;
	if (timerfd_gettime(fd, &it)) { *value = *interval = -1; return; }
	*value = ns_of(it.it_value);
	*interval = ns_of(it.it_interval);
}

static int readable(int fd, int timeout_ms)
{
	struct pollfd p = { fd, POLLIN, 0 };
	return poll(&p, 1, timeout_ms) == 1 && (p.revents & POLLIN);
}

static long long take(int fd)   /* ticks read, -errno if none */
{
	uint64_t n;
	ssize_t r = read(fd, &n, sizeof(n));
	return r == sizeof(n) ? (long long)n : -errno;
}

static void check_per(void)
{
	long long v, iv;
	check_fd("per", t_per, CLOCK_MONOTONIC, 0, 1, 1);
	get(t_per, &v, &iv);
	if (iv != 200 * MS) fail("per: interval %lld ns, want 200 ms", iv);
	if (v <= 0 || v > 200 * MS) fail("per: %lld ns left, want (0, 200 ms]", v);
	if (!readable(t_per, 1000)) { fail("per: did not fire within 1 s"); return; }
	long long n = take(t_per);
	if (n < 1) fail("per: read gave %lld", n);
	/* the next two expirations: about 200 ms apart, the first within 200 ms */
	long long t0 = now_ns(CLOCK_MONOTONIC);
	if (!readable(t_per, 1000)) { fail("per: no expiration after a read"); return; }
	long long t1 = now_ns(CLOCK_MONOTONIC);
	take(t_per);
	if (!readable(t_per, 1000)) { fail("per: no second expiration"); return; }
	long long t2 = now_ns(CLOCK_MONOTONIC);
	take(t_per);
	if (t1 - t0 > 500 * MS) fail("per: next expiration after %lld ms", (t1 - t0) / MS);
	if (t2 - t1 < 100 * MS || t2 - t1 > 500 * MS)
		fail("per: expirations %lld ms apart, want ~200", (t2 - t1) / MS);
}

static void check_one(void)
{
	long long v, iv;
	check_fd("one", t_one, CLOCK_MONOTONIC, 0, 0, 0);
	get(t_one, &v, &iv);
	long long elapsed = now_ns(CLOCK_MONOTONIC) - one_set_at;
	if (iv != 0) fail("one: interval %lld", iv);
	/* time spent checkpointed is not counted: never less left than that */
	if (v > 3600 * SEC || v < 3600 * SEC - elapsed - SEC)
		fail("one: %lld ms left, %lld ms after setting it to 3600 s", v / MS, elapsed / MS);
	if (readable(t_one, 0)) fail("one: readable before it expired");
}

static void check_abs(void)
{
	long long v, iv;
	check_fd("abs", t_abs, CLOCK_REALTIME, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, 0, 1);
	get(t_abs, &v, &iv);
	if (iv != 0) fail("abs: interval %lld", iv);
	if (v > 3600 * SEC || v < 3000 * SEC) fail("abs: %lld ms left", v / MS);
	if (readable(t_abs, 0)) fail("abs: readable");
}

static void check_boot(void)
{
	long long v, iv;
	check_fd("boot", t_boot, CLOCK_BOOTTIME, 0, 1, 0);
	get(t_boot, &v, &iv);
	if (iv != 7 * SEC) fail("boot: interval %lld", iv);
	if (v > 1800 * SEC || v < 1700 * SEC) fail("boot: %lld ms left", v / MS);
	if (take(t_boot) != -EAGAIN) fail("boot: a read did not say EAGAIN");
}

static void check_fired(void)
{
	long long v, iv, n;
	check_fd("fired", t_fired, CLOCK_MONOTONIC, 0, 1, 0);
	get(t_fired, &v, &iv);
	if (v != 0 || iv != 0) fail("fired: %lld ns left, interval %lld: should be disarmed", v, iv);
	if (!readable(t_fired, 0)) fail("fired: its expiration is not pending");
	if ((n = take(t_fired)) != 1) fail("fired: read gave %lld, want 1", n);
	if ((n = take(t_fired)) != -EAGAIN) fail("fired: second read gave %lld", n);
	/* again: 1 ms, and wait until it expired */
	struct itimerspec it = { { 0, 0 }, { 0, MS } };
	timerfd_settime(t_fired, 0, &it, NULL);
	if (!readable(t_fired, 1000)) fail("fired: 1 ms timer did not fire");
}

static void check_many(void)
{
	long long v, iv, n;
	uint64_t seven = 7;
	check_fd("many", t_many, CLOCK_MONOTONIC, 0, 1, 0);
	get(t_many, &v, &iv);
	if (iv != 0 || v > 3600 * SEC || v < 3000 * SEC) fail("many: %lld ms left, interval %lld", v / MS, iv);
	if ((n = take(t_many)) != 7) fail("many: read gave %lld, want 7", n);
	if ((n = take(t_many)) != -EAGAIN) fail("many: second read gave %lld", n);
	if (ioctl(t_many, TFD_IOC_SET_TICKS, &seven)) fail("many: TFD_IOC_SET_TICKS: %s", strerror(errno));
}

static void check_off(void)
{
	long long v, iv, n;
	check_fd("off", t_off, CLOCK_MONOTONIC, 0, 1, 0);
	get(t_off, &v, &iv);
	if (v != 0 || iv != 5 * SEC) fail("off: %lld ns left, interval %lld (want 0, 5 s)", v, iv);
	if ((n = take(t_off)) != -EAGAIN) fail("off: read gave %lld", n);
	if (fdinfo_num(t_off, "ticks:", 10) != 0) fail("off: ticks in fdinfo");
}

static void verify(void)
{
	fails[0] = 0;
	check_one();
	check_abs();
	check_boot();
	check_fired();
	check_many();
	check_off();
	check_per();
	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	struct sigaction sa = { .sa_handler = on_usr1, .sa_flags = SA_RESTART };
	sigaction(SIGUSR1, &sa, NULL);

	t_per = make(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC, 0, 200 * MS, 200 * MS);
	t_one = make(CLOCK_MONOTONIC, 0, 0, 3600 * SEC, 0);
	one_set_at = now_ns(CLOCK_MONOTONIC);
	t_abs = make(CLOCK_REALTIME, TFD_CLOEXEC, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET,
		     now_ns(CLOCK_REALTIME) + 3600 * SEC, 0);
	t_boot = make(CLOCK_BOOTTIME, TFD_NONBLOCK, 0, 1800 * SEC, 7 * SEC);
	t_fired = make(CLOCK_MONOTONIC, TFD_NONBLOCK, 0, MS, 0);
	t_many = make(CLOCK_MONOTONIC, TFD_NONBLOCK, 0, 3600 * SEC, 0);
	uint64_t seven = 7;
	if (ioctl(t_many, TFD_IOC_SET_TICKS, &seven)) { perror("TFD_IOC_SET_TICKS"); return 1; }
	t_off = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
	struct itimerspec off = { ts_of(5 * SEC), { 0, 0 } };
	timerfd_settime(t_off, 0, &off, NULL);
	if (!readable(t_fired, 1000)) { fprintf(stderr, "1 ms timer did not fire\n"); return 1; }

	printf("READY pid=%d\n", getpid());
	fflush(stdout);

	struct timespec ts = { 0, 1000000 };
	for (;;) {
		if (probe_req) {
			probe_req = 0;
			verify();
		}
		nanosleep(&ts, NULL);
	}
}
