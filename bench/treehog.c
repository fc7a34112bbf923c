/*
 * treehog -- process-tree workload for the checkpoint/restart benchmark.
 *
 *   treehog [-n NPROC] [-s USEC] [-o LOG] MiB
 *
 * A tree of NPROC processes (default 8): the root and NPROC-1 children of
 * the root.  Each process holds MiB of private anonymous memory filled with
 * non-zero xorshift64 data (incompressible; the seed depends on its index,
 * so no two processes hold the same pages) and keeps, like memhog, an
 * incrementally maintained position-weighted checksum while it rewrites 4
 * random words every USEC microseconds (default 1000).
 *
 * On SIGUSR1 the root sends SIGUSR1 to each child, then every process
 * recomputes its checksum over all of its memory and appends one line to
 * the shared LOG:
 *     pid=P idx=I ppid=Q counter=N expected=X actual=Y OK|MISMATCH
 * (idx 0 is the root).  A child whose parent is no longer the root (the root
 * died) exits, so a killed tree does not leave children behind.
 *
 * Detaching as memhog does: the launcher forks the root and waits; the root
 * does setsid(), stdin=/dev/null, stdout+stderr -> LOG (O_APPEND, shared by
 * the whole tree), closes every other inherited fd, forks the children, waits
 * until every process has filled its memory (over a pipe that is closed
 * afterwards: no pipe is left in the tree), logs "pid=P ready ..." and
 * signals the launcher, which prints "P ready" and exits 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/close_range.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define TOUCH 4
#define MAXPROC 256

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

static void usage(void)
{
	fprintf(stderr, "usage: treehog [-n NPROC] [-s USEC] [-o LOG] MiB\n");
	exit(2);
}

struct hog {
	uint64_t *w;
	size_t nw, npages;
	uint64_t expected, rng;
};

static void fill(struct hog *h, size_t mib, int idx)
{
	size_t bytes = mib << 20;
	h->nw = bytes / 8;
	h->npages = bytes / PAGE;
	h->w = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (h->w == MAP_FAILED) { perror("mmap"); _exit(1); }
	uint64_t seed = 0x9E3779B97F4A7C15ULL ^ ((uint64_t)mib << 8) ^ (uint64_t)(idx + 1) * 0x2545F4914F6CDD1DULL;
	if (!seed)
		seed = 1;
	h->expected = 0;
	for (size_t i = 0; i < h->nw; i++) {
		h->w[i] = xs64(&seed);
		h->expected += h->w[i] * (2 * (uint64_t)i + 1);
	}
	h->rng = seed ^ 0xD1B54A32D192ED03ULL;
}

static pid_t kids[MAXPROC];
static int nkids;

static void run(struct hog *h, int idx, pid_t parent, long usec)
{
	struct timespec ts = { usec / 1000000, (usec % 1000000) * 1000 };
	uint64_t counter = 0;
	for (;;) {
		for (int k = 0; k < TOUCH; k++) {
			size_t pg = xs64(&h->rng) % h->npages;
			size_t i = pg * (PAGE / 8) + (xs64(&h->rng) % (PAGE / 8));
			uint64_t nv = xs64(&h->rng);
			h->expected += (nv - h->w[i]) * (2 * (uint64_t)i + 1);
			h->w[i] = nv;
		}
		counter++;
		if (idx > 0 && (counter & 63) == 0 && getppid() != parent) {
			printf("pid=%d idx=%d parent %d gone, exiting\n", getpid(), idx, parent);
			fflush(stdout);
			_exit(3);
		}
		if (got_usr1) {
			got_usr1 = 0;
			for (int c = 0; c < nkids; c++)
				kill(kids[c], SIGUSR1);
			uint64_t act = full_checksum(h->w, h->nw);
			printf("pid=%d idx=%d ppid=%d counter=%llu expected=%016llx actual=%016llx %s\n",
			       getpid(), idx, getppid(), (unsigned long long)counter,
			       (unsigned long long)h->expected, (unsigned long long)act,
			       act == h->expected ? "OK" : "MISMATCH");
			fflush(stdout);
		}
		if (usec > 0)
			nanosleep(&ts, NULL);
	}
}

int main(int argc, char **argv)
{
	int nproc = 8, opt;
	long usec = 1000;
	const char *log = NULL;
	char logbuf[64];

	while ((opt = getopt(argc, argv, "n:s:o:")) != -1) {
		switch (opt) {
		case 'n': nproc = atoi(optarg); break;
		case 's': usec = atol(optarg); break;
		case 'o': log = optarg; break;
		default: usage();
		}
	}
	if (optind != argc - 1 || nproc < 1 || nproc > MAXPROC)
		usage();
	size_t mib = strtoull(argv[optind], NULL, 0);
	if (!mib)
		usage();

	int pfd[2];
	if (pipe(pfd)) { perror("pipe"); return 1; }
	pid_t c = fork();
	if (c < 0) { perror("fork"); return 1; }
	if (c > 0) {            /* launcher: wait for ready, report, exit */
		char b;
		close(pfd[1]);
		if (read(pfd[0], &b, 1) != 1) {
			fprintf(stderr, "treehog: root %d failed\n", c);
			return 1;
		}
		printf("%d ready\n", c);
		fflush(stdout);
		return 0;
	}

	/* the root */
	close(pfd[0]);
	setsid();
	if (!log) {
		snprintf(logbuf, sizeof(logbuf), "/tmp/treehog.%d.log", getpid());
		log = logbuf;
	}
	int n = open("/dev/null", O_RDONLY);
	int l = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
	if (n < 0 || l < 0) { perror("open"); _exit(1); }
	dup2(n, 0); dup2(l, 1); dup2(l, 2);
	if (dup2(pfd[1], 3) != 3) _exit(1);
	close_range(4, ~0U, 0);
	int kfd[2];             /* children report "filled" on it */
	if (pipe(kfd)) { perror("pipe"); _exit(1); }

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);

	pid_t root = getpid();
	struct hog h;
	for (int i = 1; i < nproc; i++) {
		pid_t k = fork();
		if (k < 0) { perror("fork"); _exit(1); }
		if (k == 0) {
			close(3);
			close(kfd[0]);
			nkids = 0;
			fill(&h, mib, i);
			char b = 'r';
			if (write(kfd[1], &b, 1) != 1) _exit(1);
			close(kfd[1]);
			run(&h, i, root, usec);
		}
		kids[nkids++] = k;
	}
	close(kfd[1]);
	fill(&h, mib, 0);
	for (int i = 1; i < nproc; i++) {
		char b;
		if (read(kfd[0], &b, 1) != 1) {
			fprintf(stderr, "treehog: a child failed\n");
			_exit(1);
		}
	}
	close(kfd[0]);
	printf("pid=%d ready nproc=%d bytes_each=%zu\n", getpid(), nproc, mib << 20);
	fflush(stdout);
	char b = 'r';
	if (write(3, &b, 1) != 1) _exit(1);
	close(3);
	run(&h, 0, 0, usec);
}
