/*
 * stop_pair -- a parent that watches its child's job-control state.
 *
 *   stop_pair
 *
 * The child counts (count++ every millisecond).  The parent waits for it
 * with waitpid(WUNTRACED | WCONTINUED) and prints one line per report:
 *     CHILD stopped sig=N n=K        (K: reports seen so far)
 *     CHILD continued n=K
 * Prints "READY pid=P child=C" when set up.  On SIGUSR1 the child prints
 *     PASS stop_child pid=P count=N
 * and the parent (after collecting any report waiting, without blocking)
 *     PASS stop_pair pid=P reports=K
 * A parent that gets a stop or continue report lcr caused shows it here.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t probe;
static void on_usr1(int s) { (void)s; probe = 1; }

static void child(void)
{
	uint64_t count = 0;
	struct timespec ms = {0, 1000000};
	for (;;) {
		count++;
		if (probe) {
			probe = 0;
			printf("PASS stop_child pid=%d count=%llu\n", getpid(), (unsigned long long)count);
		}
		nanosleep(&ms, NULL);
	}
}

static int report(pid_t c, int st, int *n)
{
	if (WIFSTOPPED(st)) {
		printf("CHILD stopped sig=%d n=%d\n", WSTOPSIG(st), ++*n);
	} else if (WIFCONTINUED(st)) {
		printf("CHILD continued n=%d\n", ++*n);
	} else {
		printf("CHILD %d ended (status 0x%x)\n", c, st);
		return 1;
	}
	return 0;
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	struct sigaction sa = {0};
	sa.sa_handler = on_usr1;        /* no SA_RESTART: waitpid returns EINTR */
	sigaction(SIGUSR1, &sa, NULL);
	pid_t c = fork();
	if (c < 0) { perror("fork"); return 1; }
	if (c == 0)
		child();
	printf("READY pid=%d child=%d\n", getpid(), c);
	int n = 0;
	for (;;) {
		int st;
		pid_t w = waitpid(c, &st, WUNTRACED | WCONTINUED);
		if (w == c && report(c, st, &n))
			return 0;
		if (w < 0 && errno != EINTR) { perror("waitpid"); return 1; }
		if (probe) {
			probe = 0;
			while (waitpid(c, &st, WUNTRACED | WCONTINUED | WNOHANG) == c)
				if (report(c, st, &n))
					return 0;
			printf("PASS stop_pair pid=%d reports=%d\n", getpid(), n);
		}
	}
}
