/*
 * cow_workers -- a pre-forking server's memory: a parent fills a private
 * anonymous area, forks workers, each writes its own 1% of it.
 *
 *   cow_workers MIB WORKERS [plain]
 *
 * The parent writes a pattern over the first 90% of MIB MiB (every 8-byte
 * word a function of its index), then forks WORKERS (1..99) workers; worker
 * w (0-based) rewrites the pages p with p % 100 == w of that part (1% of
 * them) with its own values and leaves the others alone: those stay shared
 * copy-on-write with the parent.  Once they have, the parent rewrites its
 * pages p % 100 == 99 (its own copies now) and fills the last 10% (which
 * the workers never touched: zeros for them).  Nobody writes the area
 * afterwards.  Prints "READY pid=P workers=a,b,..." then.  With "plain"
 * (bench/bench_cow.py): the parent fills all of it before the fork and
 * writes nothing after.
 *
 * On SIGUSR1 each process checks every word of the area against what it
 * must hold and prints "PASS cow_parent pid=P sum=S" / "PASS cow_worker
 * pid=P w=W sum=S" (S: a checksum of the whole area), or
 * "FAIL cow_...: word N is X, want Y (pid=P)".  Workers exit when the
 * parent is gone (PR_SET_PDEATHSIG).
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "probe.h"

#define PAGE 4096
#define WORDS_PER_PAGE (PAGE / 8)

static uint64_t *area;
static size_t npages;
static int plain;

static uint64_t pattern(size_t i) { return i * 0x9E3779B97F4A7C15ull ^ 0x5bd1e995ull; }
static uint64_t mine(size_t i, int w) { return pattern(i) ^ ((uint64_t)(w + 1) << 56) ^ 0xABCDull; }
static size_t filled(void) { return plain ? npages : npages / 10 * 9; }

/* what word i of page p holds for worker w (-1: the parent), once READY */
static uint64_t want_of(size_t p, size_t i, int w)
{
	if (p >= filled())
		return w < 0 ? pattern(i) : 0;
	if (w >= 0 && (int)(p % 100) == w)
		return mine(i, w);
	if (w < 0 && p % 100 == 99 && !plain)
		return mine(i, 99);
	return pattern(i);
}

static void verify(const char *name, int w)
{
	uint64_t sum = 0;
	for (size_t p = 0; p < npages; p++) {
		for (size_t k = 0; k < WORDS_PER_PAGE; k++) {
			size_t i = p * WORDS_PER_PAGE + k;
			uint64_t want = want_of(p, i, w);
			if (area[i] != want) {
				printf("FAIL %s: word %zu is %#llx, want %#llx (pid=%d)\n", name, i,
				       (unsigned long long)area[i], (unsigned long long)want, getpid());
				return;
			}
			sum = sum * 31 + area[i];
		}
	}
	if (w >= 0)
		printf("PASS %s pid=%d w=%d sum=%llu\n", name, getpid(), w, (unsigned long long)sum);
	else
		printf("PASS %s pid=%d sum=%llu\n", name, getpid(), (unsigned long long)sum);
}

static void serve(const char *name, int w)
{
	for (;;) {
		pause();
		if (probe_req) {
			probe_req = 0;
			verify(name, w);
		}
	}
}

int main(int argc, char **argv)
{
	if (argc < 3 || argc > 4) { fprintf(stderr, "usage: cow_workers MIB WORKERS [plain]\n"); return 2; }
	plain = argc == 4 && !strcmp(argv[3], "plain");
	size_t mib = strtoul(argv[1], NULL, 10);
	int nw = atoi(argv[2]);
	if (nw < 1 || nw > 99) { fprintf(stderr, "1..99 workers\n"); return 2; }
	setvbuf(stdout, NULL, _IOLBF, 0);
	struct sigaction sa = {0};
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	npages = mib * 256;
	area = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (area == MAP_FAILED) { perror("mmap"); return 1; }
	for (size_t i = 0; i < filled() * WORDS_PER_PAGE; i++)
		area[i] = pattern(i);
	int ready[2];
	if (pipe(ready)) { perror("pipe"); return 1; }
	pid_t parent = getpid();
	char list[4096] = "";
	for (int w = 0; w < nw; w++) {
		pid_t c = fork();
		if (c < 0) { perror("fork"); return 1; }
		if (c == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			if (getppid() != parent) _exit(0);
			close(ready[0]);
			for (size_t p = w; p < filled(); p += 100)
				for (size_t k = 0; k < WORDS_PER_PAGE; k++) {
					size_t i = p * WORDS_PER_PAGE + k;
					area[i] = mine(i, w);
				}
			if (write(ready[1], "x", 1) != 1) _exit(1);
			close(ready[1]);
			serve("cow_worker", w);
		}
		snprintf(list + strlen(list), sizeof(list) - strlen(list), "%s%d", w ? "," : "", c);
	}
	close(ready[1]);
	for (int w = 0; w < nw; w++) {
		char b;
		if (read(ready[0], &b, 1) != 1) { fprintf(stderr, "a worker died\n"); return 1; }
	}
	close(ready[0]);
	for (size_t p = 99; p < filled() && !plain; p += 100)
		for (size_t k = 0; k < WORDS_PER_PAGE; k++)
			area[p * WORDS_PER_PAGE + k] = mine(p * WORDS_PER_PAGE + k, 99);
	for (size_t i = filled() * WORDS_PER_PAGE; i < npages * WORDS_PER_PAGE; i++)
		area[i] = pattern(i);
	printf("READY pid=%d workers=%s\n", getpid(), list);
	serve("cow_parent", -1);
}
