/*
 * unsupported -- holds a kind of file lcr cannot checkpoint.
 *
 *   unsupported
 *
 * Opens an io_uring instance (io_uring_setup), or if the kernel refuses
 * that, a userfaultfd; a checkpoint must be refused and must leave the
 * process as it was.  Prints "READY pid=P kind=K fd=N" (K: io_uring or
 * userfaultfd).  On SIGUSR1 it checks that fd N is still that object
 * (/proc/self/fd/N) and prints "PASS unsupported pid=P" or
 * "FAIL unsupported: <details> (pid=P)".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NAME "unsupported"

static volatile sig_atomic_t probe_req;
static void on_usr1(int sig) { (void)sig; probe_req = 1; }

static int fd = -1;
static const char *kind;
static char link0[256];

static void verify(void)
{
	char path[64], link[256] = "";
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(path, link, sizeof(link) - 1);
	if (n < 0)
		printf("FAIL " NAME ": fd %d: %s (pid=%d)\n", fd, strerror(errno), getpid());
	else if (link[n] = 0, strcmp(link, link0))
		printf("FAIL " NAME ": fd %d is %s, was %s (pid=%d)\n", fd, link, link0, getpid());
	else
		printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	struct io_uring_params p;
	memset(&p, 0, sizeof(p));
	fd = (int)syscall(SYS_io_uring_setup, 4, &p);
	kind = "io_uring";
	if (fd < 0) {
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY);
		kind = "userfaultfd";
	}
	if (fd < 0) { perror("io_uring_setup and userfaultfd"); return 1; }
	char path[64];
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(path, link0, sizeof(link0) - 1);
	if (n < 0) { perror("readlink"); return 1; }
	link0[n] = 0;

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);

	printf("READY pid=%d kind=%s fd=%d\n", getpid(), kind, fd);
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
