/*
 * tree_getpid -- what pid does a process see of itself?
 *
 *   tree_getpid
 *
 * Remembers getpid() and gettid() at start and prints "READY pid=P".  On
 * every SIGUSR1 it prints "PASS tree_getpid pid=P getpid=G gettid=T
 * ppid=Q probes=N" if getpid() and gettid() still return the pid it started
 * with, else "FAIL tree_getpid: getpid() G, gettid() T, started as P
 * (pid=G)".  (A process restored into a new pid namespace sees its saved
 * pid while others see another one.)
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t probe_req;
static void on_usr1(int sig) { (void)sig; probe_req = 1; }

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	pid_t start = getpid();
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	printf("READY pid=%d\n", start);
	long probes = 0;
	for (;;) {
		if (probe_req) {
			probe_req = 0;
			probes++;
			pid_t g = getpid(), t = (pid_t)syscall(SYS_gettid);
			if (g == start && t == start)
				printf("PASS tree_getpid pid=%d getpid=%d gettid=%d ppid=%d probes=%ld\n",
				       g, g, t, getppid(), probes);
			else
				printf("FAIL tree_getpid: getpid() %d, gettid() %d, started as %d (pid=%d)\n",
				       g, t, start, g);
		}
		struct timespec ts = { 0, 2000000 };
		nanosleep(&ts, NULL);
	}
}
