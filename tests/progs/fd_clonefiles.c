/*
 * fd_clonefiles -- two processes sharing one fd table (clone CLONE_FILES).
 *
 *   fd_clonefiles DIR            the pair, probed on SIGUSR1
 *   fd_clonefiles DIR siblings   two children sharing one table that their
 *                                parent left (unshare): lcr refuses it
 *
 * The parent clone()s a child with CLONE_FILES|SIGCHLD on a stack of its
 * own (no CLONE_VM: separate memory).  Right after the clone each side
 * opens a file and the other finds it by number, then closes it and the
 * first sees it gone.  On SIGUSR1 the parent does the same again (a new
 * file DIR/p.N opened by the parent is read by the child, which closes it;
 * a file DIR/c.N opened by the child is read by the parent), and checks
 * with kcmp(KCMP_FILES) that both still share one table.  Commands and
 * answers travel over two pipes made before the clone.
 * Prints "READY pid=P a=C"; on SIGUSR1 "PASS fd_clonefiles pid=P a=C round=N" or
 * "FAIL fd_clonefiles: ...".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define NAME "fd_clonefiles"
#include "probe.h"

#define KCMP_FILES 2
#define STACK (256 * 1024)

static char dir[PATH_MAX - 64];
static int cmd[2], ans[2];          /* parent -> child, child -> parent */
static pid_t child;

/* what one side sends: an fd number and a round (its file holds "round N\n") */
struct msg { int fd; int round; };

static void die(const char *what) { fprintf(stderr, NAME ": %s: %s\n", what, strerror(errno)); exit(1); }

static void xwrite(int fd, const struct msg *m) { if (write(fd, m, sizeof(*m)) != sizeof(*m)) die("write"); }

static int xread(int fd, struct msg *m)
{
	ssize_t n;
	do n = read(fd, m, sizeof(*m)); while (n < 0 && errno == EINTR);
	return n == sizeof(*m) ? 0 : -1;
}

/* open DIR/<who>.<round> holding "round N\n" */
static int make(char who, int round)
{
	char p[PATH_MAX], text[32];
	snprintf(p, sizeof(p), "%s/%c.%d", dir, who, round);
	int fd = open(p, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) return -1;
	int n = snprintf(text, sizeof(text), "round %d\n", round);
	if (write(fd, text, n) != n) { close(fd); return -1; }
	return fd;
}

/* fd holds the file of that round (read without moving the shared offset) */
static const char *check(int fd, int round)
{
	char want[32], got[32];
	static char why[128];
	int n = snprintf(want, sizeof(want), "round %d\n", round);
	if (fcntl(fd, F_GETFD) < 0) { snprintf(why, sizeof(why), "fd %d not open: %s", fd, strerror(errno)); return why; }
	ssize_t r = pread(fd, got, sizeof(got), 0);
	if (r != n || memcmp(got, want, n)) { snprintf(why, sizeof(why), "fd %d holds other content", fd); return why; }
	return NULL;
}

/* The child: answer every command of the parent. */
static int child_main(void *arg)
{
	(void)arg;
	struct msg m;
	while (xread(cmd[0], &m) == 0) {
		const char *why = check(m.fd, m.round);
		struct msg r = { .fd = -1, .round = m.round };
		if (!why) {
			/* opened before the close: it must not take the number just closed */
			r.fd = make('c', m.round);
			if (r.fd < 0) why = "open failed";
		}
		if (!why && close(m.fd)) why = "close failed";
		if (why) { fprintf(stderr, NAME " child: %s\n", why); r.fd = -2; }
		xwrite(ans[1], &r);
	}
	return 0;
}

/* One round, from the parent: its file is found by the child, the child's by it. */
static void round_trip(int round)
{
	int fd = make('p', round);
	if (fd < 0) { fail("open p.%d: %s", round, strerror(errno)); return; }
	struct msg m = { .fd = fd, .round = round }, r;
	xwrite(cmd[1], &m);
	if (xread(ans[0], &r)) { fail("no answer from the child"); return; }
	if (r.fd == -2) { fail("round %d: the child did not find fd %d (see stderr)", round, fd); return; }
	if (fcntl(fd, F_GETFD) >= 0 || errno != EBADF) fail("round %d: fd %d closed by the child is still open here", round, fd);
	const char *why = check(r.fd, round);
	if (why) fail("round %d: the child's file: %s", round, why);
	else close(r.fd);
}

static void verify(int round)
{
	fails[0] = 0;
	long k = syscall(SYS_kcmp, getpid(), child, KCMP_FILES, 0, 0);
	if (k != 0) fail("kcmp(KCMP_FILES) with the child: %ld (%s)", k, k < 0 ? strerror(errno) : "different tables");
	round_trip(round);
	if (fails[0]) printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else printf("PASS " NAME " pid=%d a=%d round=%d\n", getpid(), child, round);
	fflush(stdout);
}

static int idle(void *arg) { (void)arg; for (;;) pause(); return 0; }

/* Two children cloned with CLONE_FILES, then the parent takes a table of its own. */
static int siblings(void)
{
	pid_t k[2];
	for (int i = 0; i < 2; i++) {
		char *st = malloc(STACK);
		if (!st) die("malloc");
		k[i] = clone(idle, st + STACK, CLONE_FILES | SIGCHLD, NULL);
		if (k[i] < 0) die("clone");
	}
	if (unshare(CLONE_FILES)) die("unshare");
	printf("READY pid=%d a=%d b=%d\n", getpid(), k[0], k[1]);
	for (;;) pause();
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 3 && !strcmp(argv[2], "siblings")) return siblings();
	if (argc != 2) { fprintf(stderr, "usage: " NAME " DIR [siblings]\n"); return 2; }
	snprintf(dir, sizeof(dir), "%s", argv[1]);
	if (pipe2(cmd, O_CLOEXEC) || pipe2(ans, O_CLOEXEC)) die("pipe");
	char *stack = malloc(STACK);
	if (!stack) die("malloc");
	child = clone(child_main, stack + STACK, CLONE_FILES | SIGCHLD, NULL);
	if (child < 0) die("clone");
	verify(0);                     /* after the clone, before any checkpoint */
	if (fails[0]) return 1;

	sigset_t usr1, old;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	sigprocmask(SIG_BLOCK, &usr1, &old);
	struct sigaction sa = { .sa_handler = on_usr1 };
	sigaction(SIGUSR1, &sa, NULL);
	printf("READY pid=%d a=%d\n", getpid(), child);
	for (int round = 1;; round++) {
		while (!probe_req) sigsuspend(&old);
		probe_req = 0;
		verify(round);
	}
}
