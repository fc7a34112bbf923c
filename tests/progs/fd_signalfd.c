/*
 * fd_signalfd -- signalfds with their masks and flags, and signals read
 * through them after a restart.
 *
 *   fd_signalfd
 *
 * State set up before READY (SIGUSR2, SIGRTMIN+2, SIGHUP, SIGWINCH blocked):
 *   s1   {SIGUSR2, SIGRTMIN+2}, SFD_NONBLOCK|SFD_CLOEXEC
 *   s2   {SIGHUP}, blocking
 *   s3   made for {SIGUSR2} with SFD_NONBLOCK, then its mask changed to
 *        {SIGUSR2, SIGWINCH} by signalfd(s3, ...)
 *   pending: SIGRTMIN+2 queued with sigqueue() value 0x1111 (read through
 *        s1 by the probe, queued again afterwards)
 *
 * On SIGUSR1 it checks each mask (its own fdinfo) and flags, reads the
 * pending signal from s1 with its siginfo, then sends itself SIGUSR2,
 * SIGRTMIN+2 (value 0x2222), SIGWINCH and SIGHUP and reads each from the
 * right signalfd, siginfo checked.  Prints "PASS fd_signalfd pid=P" or
 * "FAIL fd_signalfd: <details> (pid=P)".
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
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

#define NAME "fd_signalfd"

#include "probe.h"

static int s1, s2, s3;
#define RT (SIGRTMIN + 2)
#define BIT(s) (1ULL << ((s) - 1))

static unsigned long long fdinfo_mask(int fd)
{
	char path[64], buf[4096];
	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
	int f = open(path, O_RDONLY | O_CLOEXEC);
	if (f < 0) return 0;
	ssize_t n = read(f, buf, sizeof(buf) - 1);
	close(f);
	if (n <= 0) return 0;
	buf[n] = 0;
	char *p = strstr(buf, "sigmask:");
	return p ? strtoull(p + 8, NULL, 16) : 0;
}

static void check_fd(const char *name, int fd, unsigned long long mask, int nonblock, int cloexec)
{
	unsigned long long m = fdinfo_mask(fd);
	if (m != mask) fail("%s: sigmask %llx, want %llx", name, m, mask);
	int fl = fcntl(fd, F_GETFL), fdf = fcntl(fd, F_GETFD);
	if (fl < 0 || fdf < 0) { fail("%s: fd %d not open", name, fd); return; }
	if (!!(fl & O_NONBLOCK) != nonblock) fail("%s: O_NONBLOCK is %d", name, !!(fl & O_NONBLOCK));
	if (!!(fdf & FD_CLOEXEC) != cloexec) fail("%s: FD_CLOEXEC is %d", name, !!(fdf & FD_CLOEXEC));
}

/* read one signal from fd (waiting up to 1 s) and check it */
static void expect(const char *name, int fd, int signo, int code, int value)
{
	struct pollfd p = { fd, POLLIN, 0 };
	if (poll(&p, 1, 1000) != 1) { fail("%s: no signal %d to read", name, signo); return; }
	struct signalfd_siginfo si;
	ssize_t n = read(fd, &si, sizeof(si));
	if (n != sizeof(si)) { fail("%s: read gave %zd (%s)", name, n, strerror(errno)); return; }
	if ((int)si.ssi_signo != signo) fail("%s: signal %u, want %d", name, si.ssi_signo, signo);
	if (si.ssi_code != code) fail("%s: si_code %d, want %d", name, si.ssi_code, code);
	if ((pid_t)si.ssi_pid != getpid()) fail("%s: si_pid %u, want %d", name, si.ssi_pid, getpid());
	if (si.ssi_uid != getuid()) fail("%s: si_uid %u", name, si.ssi_uid);
	if (code == SI_QUEUE && si.ssi_int != value) fail("%s: value 0x%x, want 0x%x", name, si.ssi_int, value);
}

static void verify(void)
{
	fails[0] = 0;
	check_fd("s1", s1, BIT(SIGUSR2) | BIT(RT), 1, 1);
	check_fd("s2", s2, BIT(SIGHUP), 0, 0);
	check_fd("s3", s3, BIT(SIGUSR2) | BIT(SIGWINCH), 1, 0);

	expect("s1 pending", s1, RT, SI_QUEUE, 0x1111);
	struct signalfd_siginfo si;
	if (read(s1, &si, sizeof(si)) != -1 || errno != EAGAIN) fail("s1: more than the pending signal");

	kill(getpid(), SIGUSR2);
	expect("s1 SIGUSR2", s1, SIGUSR2, SI_USER, 0);
	union sigval v = { .sival_int = 0x2222 };
	sigqueue(getpid(), RT, v);
	expect("s1 RT", s1, RT, SI_QUEUE, 0x2222);
	raise(SIGWINCH);
	expect("s3 SIGWINCH", s3, SIGWINCH, SI_TKILL, 0);
	kill(getpid(), SIGUSR2);
	expect("s3 SIGUSR2", s3, SIGUSR2, SI_USER, 0);
	raise(SIGHUP);
	expect("s2 SIGHUP", s2, SIGHUP, SI_TKILL, 0);

	sigset_t pend;
	sigpending(&pend);
	if (sigismember(&pend, SIGUSR2) || sigismember(&pend, RT) || sigismember(&pend, SIGHUP) ||
	    sigismember(&pend, SIGWINCH))
		fail("signals left pending");
	v.sival_int = 0x1111;          /* the pending one, for the next probe */
	sigqueue(getpid(), RT, v);

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

	sigset_t m;
	sigemptyset(&m);
	sigaddset(&m, SIGUSR2);
	sigaddset(&m, RT);
	sigaddset(&m, SIGHUP);
	sigaddset(&m, SIGWINCH);
	sigprocmask(SIG_BLOCK, &m, NULL);

	sigemptyset(&m);
	sigaddset(&m, SIGUSR2);
	sigaddset(&m, RT);
	s1 = signalfd(-1, &m, SFD_NONBLOCK | SFD_CLOEXEC);
	sigemptyset(&m);
	sigaddset(&m, SIGHUP);
	s2 = signalfd(-1, &m, 0);
	sigemptyset(&m);
	sigaddset(&m, SIGUSR2);
	s3 = signalfd(-1, &m, SFD_NONBLOCK);
	sigaddset(&m, SIGWINCH);
	if (s1 < 0 || s2 < 0 || s3 < 0 || signalfd(s3, &m, 0) != s3) { perror("signalfd"); return 1; }

	union sigval v = { .sival_int = 0x1111 };
	sigqueue(getpid(), RT, v);

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
