/*
 * threadhog -- multi-threaded workload for the checkpoint/restart benchmark.
 *
 *   threadhog [-t NTHREADS] [-s USEC] [-o LOG] MiB
 *
 * One process, NTHREADS worker threads (default 8) besides the main thread.
 * Each worker maps its own MiB of private anonymous memory, fills it with
 * non-zero xorshift64 data (seeded by its index), keeps an incrementally
 * maintained position-weighted checksum of it (as memhog does) and rewrites
 * 4 random words of it every USEC microseconds (default 1000).
 *
 * SIGUSR1 is blocked in the workers, so the main thread takes it; it then
 * bumps a generation number that every worker polls: each worker recomputes
 * its checksum over all of its memory and publishes the result, and once all
 * have answered the main thread appends one line per worker to LOG:
 *     pid=P idx=I tid=T counter=N expected=X actual=Y OK|MISMATCH
 *
 * Detaching as memhog does: the launcher forks; the child does setsid(),
 * stdin=/dev/null, stdout+stderr -> LOG, closes every other inherited fd,
 * starts the workers, waits until all have filled their memory, logs
 * "pid=P ready ..." and signals the launcher over a pipe (closed
 * afterwards), which prints "P ready" and exits 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/close_range.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define TOUCH 4
#define MAXT 256

static volatile sig_atomic_t got_usr1;
static void on_usr1(int sig) { (void)sig; got_usr1 = 1; }

static inline uint64_t xs64(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13; x ^= x >> 7; x ^= x << 17;
	return *s = x;
}

static uint64_t full_checksum(const uint64_t *w, size_t n)
{
	uint64_t s = 0;
	for (size_t i = 0; i < n; i++)
		s += w[i] * (2 * (uint64_t)i + 1);
	return s;
}

struct worker {
	pthread_t th;
	int idx, tid;
	uint64_t counter;                  /* read by main after done == gen */
	uint64_t res_expected, res_actual, res_counter;
	unsigned ready;                    /* atomic */
	unsigned done;                     /* atomic: last generation answered */
} W[MAXT];

static size_t g_mib;
static long g_usec = 1000;
static unsigned gen;                       /* atomic */

static void *work(void *arg)
{
	struct worker *me = arg;
	me->tid = (int)syscall(SYS_gettid);
	size_t bytes = g_mib << 20, nw = bytes / 8, npages = bytes / PAGE;
	uint64_t *w = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (w == MAP_FAILED) { perror("mmap"); _exit(1); }
	uint64_t seed = 0x9E3779B97F4A7C15ULL ^ ((uint64_t)g_mib << 8) ^ (uint64_t)(me->idx + 1) * 0x2545F4914F6CDD1DULL;
	if (!seed)
		seed = 1;
	uint64_t expected = 0;
	for (size_t i = 0; i < nw; i++) {
		w[i] = xs64(&seed);
		expected += w[i] * (2 * (uint64_t)i + 1);
	}
	uint64_t rng = seed ^ 0xD1B54A32D192ED03ULL, counter = 0;
	unsigned mygen = __atomic_load_n(&gen, __ATOMIC_ACQUIRE);
	__atomic_store_n(&me->ready, 1, __ATOMIC_RELEASE);
	struct timespec ts = { g_usec / 1000000, (g_usec % 1000000) * 1000 };
	for (;;) {
		for (int k = 0; k < TOUCH; k++) {
			size_t pg = xs64(&rng) % npages;
			size_t i = pg * (PAGE / 8) + (xs64(&rng) % (PAGE / 8));
			uint64_t nv = xs64(&rng);
			expected += (nv - w[i]) * (2 * (uint64_t)i + 1);
			w[i] = nv;
		}
		counter++;
		unsigned g = __atomic_load_n(&gen, __ATOMIC_ACQUIRE);
		if (g != mygen) {
			mygen = g;
			me->res_actual = full_checksum(w, nw);
			me->res_expected = expected;
			me->res_counter = counter;
			__atomic_store_n(&me->done, g, __ATOMIC_RELEASE);
		}
		if (g_usec > 0)
			nanosleep(&ts, NULL);
	}
	return NULL;
}

static void usage(void)
{
	fprintf(stderr, "usage: threadhog [-t NTHREADS] [-s USEC] [-o LOG] MiB\n");
	exit(2);
}

int main(int argc, char **argv)
{
	int nt = 8, opt;
	const char *log = NULL;
	char logbuf[64];

	while ((opt = getopt(argc, argv, "t:s:o:")) != -1) {
		switch (opt) {
		case 't': nt = atoi(optarg); break;
		case 's': g_usec = atol(optarg); break;
		case 'o': log = optarg; break;
		default: usage();
		}
	}
	if (optind != argc - 1 || nt < 1 || nt > MAXT)
		usage();
	g_mib = strtoull(argv[optind], NULL, 0);
	if (!g_mib)
		usage();

	int pfd[2];
	if (pipe(pfd)) { perror("pipe"); return 1; }
	pid_t c = fork();
	if (c < 0) { perror("fork"); return 1; }
	if (c > 0) {
		char b;
		close(pfd[1]);
		if (read(pfd[0], &b, 1) != 1) {
			fprintf(stderr, "threadhog: child %d failed\n", c);
			return 1;
		}
		printf("%d ready\n", c);
		fflush(stdout);
		return 0;
	}
	close(pfd[0]);
	setsid();
	if (!log) {
		snprintf(logbuf, sizeof(logbuf), "/tmp/threadhog.%d.log", getpid());
		log = logbuf;
	}
	int n = open("/dev/null", O_RDONLY);
	int l = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
	if (n < 0 || l < 0) { perror("open"); _exit(1); }
	dup2(n, 0); dup2(l, 1); dup2(l, 2);
	if (dup2(pfd[1], 3) != 3) _exit(1);
	close_range(4, ~0U, 0);

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);

	sigset_t usr1, old;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &usr1, &old);     /* workers inherit it blocked */
	for (int i = 0; i < nt; i++) {
		W[i].idx = i;
		if (pthread_create(&W[i].th, NULL, work, &W[i])) { perror("pthread_create"); _exit(1); }
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	for (int i = 0; i < nt; i++)
		while (!__atomic_load_n(&W[i].ready, __ATOMIC_ACQUIRE))
			usleep(1000);
	printf("pid=%d ready threads=%d bytes_each=%zu\n", getpid(), nt, g_mib << 20);
	fflush(stdout);
	char b = 'r';
	if (write(3, &b, 1) != 1) _exit(1);
	close(3);

	struct timespec ts = { 0, 5 * 1000 * 1000 };
	for (;;) {
		nanosleep(&ts, NULL);
		if (!got_usr1)
			continue;
		got_usr1 = 0;
		unsigned g = __atomic_add_fetch(&gen, 1, __ATOMIC_ACQ_REL);
		for (int i = 0; i < nt; i++)
			while (__atomic_load_n(&W[i].done, __ATOMIC_ACQUIRE) != g)
				nanosleep(&ts, NULL);
		for (int i = 0; i < nt; i++)
			printf("pid=%d idx=%d tid=%d counter=%llu expected=%016llx actual=%016llx %s\n",
			       getpid(), i, W[i].tid, (unsigned long long)W[i].res_counter,
			       (unsigned long long)W[i].res_expected, (unsigned long long)W[i].res_actual,
			       W[i].res_actual == W[i].res_expected ? "OK" : "MISMATCH");
		fflush(stdout);
	}
}
