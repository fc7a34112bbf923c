/*
 * snap_tree -- a parent and a child joined by a pipe that is never empty.
 *
 *   snap_tree
 *
 * The parent writes 4-byte numbers 1, 2, 3, ... into a pipe as fast as the
 * pipe takes them (so it is full most of the time, the parent blocked in
 * write()), a short pause every 256 numbers; the child reads them one at a
 * time, a little slower, and checks that each is the previous one + 1.
 * Both keep a counter in memory, so a rollback of the tree must bring the
 * pipe's unread bytes back with the two memories for the sequence to go on.
 *
 * On SIGUSR2 the parent forks one more child that only sleeps (prints
 * "FORKED pid=X"): the tree is not the snapshot's any more.
 *
 * On SIGUSR1 the parent prints "PASS snap_tree pid=P child=C sent=N", the
 * child "PASS snap_tree_child pid=C got=N" or "FAIL snap_tree_child: got X
 * after Y (pid=C)".  Prints "READY pid=P child=C".  The child exits when
 * its parent is gone (PR_SET_PDEATHSIG).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "probe.h"

static volatile sig_atomic_t fork_req;
static void on_usr2(int s) { (void)s; fork_req = 1; }

static void nap(long us)
{
	struct timespec ts = {0, us * 1000};
	nanosleep(&ts, NULL);
}

static void child(int rfd)
{
	uint32_t last = 0, v;
	char bad[128] = "";
	for (;;) {
		ssize_t n = read(rfd, &v, sizeof(v));
		if (n == sizeof(v)) {
			if (v != last + 1 && !bad[0])
				snprintf(bad, sizeof(bad), "got %u after %u", v, last);
			last = v;
			if (last % 64 == 0) nap(2000);
		} else if (n == 0) {
			_exit(0);
		} else if (n > 0) {
			snprintf(bad, sizeof(bad), "short read of %zd bytes", n);
		}
		if (probe_req) {
			probe_req = 0;
			if (bad[0]) printf("FAIL snap_tree_child: %s (pid=%d)\n", bad, getpid());
			else printf("PASS snap_tree_child pid=%d got=%u\n", getpid(), last);
		}
	}
}

int main(void)
{
	int p[2];
	struct sigaction sa = {0};
	setvbuf(stdout, NULL, _IOLBF, 0);
	sa.sa_handler = on_usr1;           /* no SA_RESTART: a blocked read/write returns */
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_usr2;
	sigaction(SIGUSR2, &sa, NULL);
	if (pipe(p)) { perror("pipe"); return 1; }
	pid_t parent = getpid();
	pid_t c = fork();
	if (c < 0) { perror("fork"); return 1; }
	if (c == 0) {
		close(p[1]);
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent) _exit(0);
		child(p[0]);
	}
	close(p[0]);
	printf("READY pid=%d child=%d\n", getpid(), c);
	uint32_t sent = 0;
	for (;;) {
		uint32_t v = sent + 1;
		ssize_t n = write(p[1], &v, sizeof(v));
		if (n == sizeof(v)) {
			sent = v;
			if (sent % 256 == 0) nap(1000);
		} else if (n < 0 && errno != EINTR) {
			perror("write");
			return 1;
		}
		if (probe_req) {
			probe_req = 0;
			printf("PASS snap_tree pid=%d child=%d sent=%u\n", getpid(), c, sent);
		}
		if (fork_req) {
			fork_req = 0;
			pid_t k = fork();
			if (k == 0) {
				close(p[1]);
				prctl(PR_SET_PDEATHSIG, SIGKILL);
				for (;;) pause();
			}
			printf("FORKED pid=%d\n", k);
		}
	}
}
