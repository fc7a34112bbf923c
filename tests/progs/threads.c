/*
 * threads -- a process with a second thread (pthreads).
 *
 *   threads
 *
 * The worker thread increments a counter every millisecond.  On SIGUSR1
 * (the worker blocks all signals: the main thread gets it) it checks that
 * there are exactly 2 threads and that the worker makes progress (it ticks
 * again after the last probe, waiting up to 5 s for it).
 * Prints "READY pid=P tid=T" (T: the worker's tid), then
 * "PASS threads pid=P ticks=N" or "FAIL threads: <details> (pid=P)".
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NAME "threads"

static volatile sig_atomic_t probe_req;
static void on_usr1(int sig) { (void)sig; probe_req = 1; }

static volatile long worker_ticks;
static volatile pid_t worker_tid;

static void *worker(void *arg)
{
	(void)arg;
	sigset_t all;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);     /* signals go to main */
	worker_tid = (pid_t)syscall(SYS_gettid);
	struct timespec ts = { 0, 1000000 };
	for (;;) {
		worker_ticks++;
		nanosleep(&ts, NULL);
	}
	return NULL;
}

static int count_threads(void)
{
	FILE *f = fopen("/proc/self/status", "r");
	char line[256];
	int n = -1;
	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "Threads: %d", &n) == 1)
			break;
	if (f)
		fclose(f);
	return n;
}

static long last_ticks = -1;

static void verify(void)
{
	char fails[512] = "";
	int n = count_threads();
	/* the worker must run: give it up to 5 s to tick (a loaded machine) */
	for (int i = 0; i < 5000 && worker_ticks <= last_ticks; i++) {
		struct timespec w = { 0, 1000000 };
		nanosleep(&w, NULL);
	}
	long t = worker_ticks;
	if (n != 2)
		snprintf(fails, sizeof(fails), "%d threads, want 2", n);
	else if (t <= last_ticks)
		snprintf(fails, sizeof(fails), "worker made no progress (%ld)", t);
	last_ticks = t;
	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d ticks=%ld\n", getpid(), t);
	fflush(stdout);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);

	pthread_t th;
	if (pthread_create(&th, NULL, worker, NULL)) { perror("pthread_create"); return 1; }
	while (!worker_tid || !worker_ticks) {
		struct timespec w = { 0, 1000000 };
		nanosleep(&w, NULL);
	}
	printf("READY pid=%d tid=%d\n", getpid(), worker_tid);
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
