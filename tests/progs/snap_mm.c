/*
 * snap_mm -- memory that changes content and shape on demand (fast rollback tests).
 *
 *   snap_mm
 *
 * A: 256 pages; the first word of every page holds `gen`.
 * B: 64 pages mapped and never touched until the first step.
 * C: 16 pages holding `cval`; SIGHUP replaces it (munmap, then a 32-page
 *    mmap at the same address: the layout changes).
 * Every millisecond count++.
 * SIGUSR2 (a step): gen++, written to every page of A and of B;
 *   prints "STEP pid=P gen=G".
 * SIGHUP (remap): as above, the new C filled with cval = gen + 1000;
 *   prints "REMAP pid=P pages=K".
 * SIGUSR1 (probe):
 *   PASS snap_mm pid=P gen=G count=N bres=R bzero=Z cpages=K
 *   (R: pages of B resident (mincore), Z: 1 if B reads as zeros)
 * or FAIL snap_mm: <what> (pid=P) if a page of A or C disagrees.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include "probe.h"

#define PG 4096UL
#define NA 256
#define NB 64

static volatile sig_atomic_t step_req, remap_req;
static void on_usr2(int s) { (void)s; step_req = 1; }
static void on_hup(int s) { (void)s; remap_req = 1; }

static uint64_t *area(size_t pages)
{
	void *p = mmap(NULL, pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) { perror("mmap"); _exit(1); }
	return p;
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGUSR1, on_usr1);
	signal(SIGUSR2, on_usr2);
	signal(SIGHUP, on_hup);
	uint64_t *a = area(NA), *b = area(NB);
	size_t nc = 16;
	uint64_t *c = area(nc);
	volatile uint64_t gen = 0, cval = 7, count = 0;
	for (size_t i = 0; i < NA; i++) a[i * PG / 8] = gen;
	for (size_t i = 0; i < nc; i++) c[i * PG / 8] = cval;
	printf("READY pid=%d\n", getpid());
	struct timespec ms = {0, 1000000};
	for (;;) {
		sigset_t all, old;
		sigfillset(&all);
		sigprocmask(SIG_BLOCK, &all, &old);
		count++;
		if (step_req) {
			step_req = 0;
			gen++;
			for (size_t i = 0; i < NA; i++) a[i * PG / 8] = gen;
			for (size_t i = 0; i < NB; i++) b[i * PG / 8] = gen;
			printf("STEP pid=%d gen=%llu\n", getpid(), (unsigned long long)gen);
		}
		if (remap_req) {
			remap_req = 0;
			munmap(c, nc * PG);
			nc = 32;
			void *p = mmap(c, nc * PG, PROT_READ | PROT_WRITE,
				       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
			if (p == MAP_FAILED) p = area(nc);
			c = p;
			cval = gen + 1000;
			for (size_t i = 0; i < nc; i++) c[i * PG / 8] = cval;
			printf("REMAP pid=%d pages=%zu\n", getpid(), nc);
		}
		sigprocmask(SIG_SETMASK, &old, NULL);
		if (probe_req) {
			probe_req = 0;
			fails[0] = 0;
			for (size_t i = 0; i < NA; i++)
				if (a[i * PG / 8] != gen) { fail("A page %zu holds %llu, gen %llu", i,
					(unsigned long long)a[i * PG / 8], (unsigned long long)gen); break; }
			for (size_t i = 0; i < nc; i++)
				if (c[i * PG / 8] != cval) { fail("C page %zu holds %llu, not %llu", i,
					(unsigned long long)c[i * PG / 8], (unsigned long long)cval); break; }
			unsigned char vec[NB];
			int res = 0, zero = 1;
			if (mincore(b, NB * PG, vec) == 0)
				for (size_t i = 0; i < NB; i++) res += vec[i] & 1;
			for (size_t i = 0; i < NB * PG / 8; i++)
				if (b[i]) { zero = 0; break; }
			if (fails[0])
				printf("FAIL snap_mm: %s (pid=%d)\n", fails, getpid());
			else
				printf("PASS snap_mm pid=%d gen=%llu count=%llu bres=%d bzero=%d cpages=%zu\n",
				       getpid(), (unsigned long long)gen, (unsigned long long)count, res, zero, nc);
		}
		nanosleep(&ms, NULL);
	}
}
