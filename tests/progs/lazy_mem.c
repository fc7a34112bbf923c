/* lazy_mem MiB THREADS -- memory whose every word can be checked anywhere
 * (tests/test_lazy.py: restart --lazy).
 *
 * Maps MiB of private anonymous memory; word i holds mix(i) (a function of
 * its index only), so any process -- a forked child too -- can check it.
 * THREADS threads (0: none) wait for SIGUSR1.
 * SIGUSR1: every thread checks its slice at once (threads faulting at the
 *   same time; without threads main checks it all), then main prints
 *   PASS/FAIL.
 * SIGUSR2: fork; the child checks the whole buffer, writes one word in each
 *   page of its first half, checks again, and exits 0/1; the parent prints
 *   "FORK PASS|FAIL pid=P" (and its own memory must stay intact).
 * SIGHUP: munmap the last quarter, MADV_DONTNEED the third quarter (it must
 *   read zeros), mremap the second quarter elsewhere; then check what is
 *   left (PASS/FAIL on the next SIGUSR1 counts those changes).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t usr1, usr2, hup;
static void on1(int s) { (void)s; usr1 = 1; }
static void on2(int s) { (void)s; usr2 = 1; }
static void onh(int s) { (void)s; hup = 1; }

static uint64_t *buf, *moved;
static size_t words, nthreads;
static int changed;                      /* SIGHUP done */
static pthread_barrier_t go, done;
static volatile int gen;
static int bad[64];

static inline uint64_t mix(uint64_t i)
{
	i += 0x9e3779b97f4a7c15ULL;
	i = (i ^ (i >> 30)) * 0xbf58476d1ce4e5b9ULL;
	i = (i ^ (i >> 27)) * 0x94d049bb133111ebULL;
	return (i ^ (i >> 31)) | 1;
}

/* the expected content of word i (after SIGHUP: quarters moved/zeroed/gone) */
static int check_range(size_t lo, size_t hi)
{
	size_t q = words / 4;
	for (size_t i = lo; i < hi; i++) {
		if (!changed) {
			if (buf[i] != mix(i)) return 1;
		} else if (i < q) {
			if (buf[i] != mix(i)) return 1;
		} else if (i < 2 * q) {
			if (moved[i - q] != mix(i)) return 1;
		} else if (i < 3 * q) {
			if (buf[i] != 0) return 1;
		}
	}
	return 0;
}

static void *worker(void *arg)
{
	size_t k = (size_t)arg, lo = words * k / nthreads, hi = words * (k + 1) / nthreads;
	uint64_t s = 88172645463325252ULL + k;
	for (;;) {
		pthread_barrier_wait(&go);
		bad[k] = check_range(lo, hi);
		pthread_barrier_wait(&done);
		(void)s;
	}
	return NULL;
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], 0, 0) : 64;
	nthreads = argc > 2 ? strtoul(argv[2], 0, 0) : 0;
	if (nthreads > 64) nthreads = 64;
	size_t bytes = mib << 20;
	words = bytes / 8;
	buf = mmap(0, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) { perror("mmap"); return 1; }
	for (size_t i = 0; i < words; i++) buf[i] = mix(i);
	signal(SIGUSR1, on1);
	signal(SIGUSR2, on2);
	signal(SIGHUP, onh);
	/* no threads unless asked: lcr refuses a threaded process while any
	 * System V semaphore set exists (undo lists), as other tests leave */
	size_t n = nthreads;
	if (n) {
		pthread_barrier_init(&go, 0, n + 1);
		pthread_barrier_init(&done, 0, n + 1);
	}
	for (size_t k = 0; k < n; k++) {
		pthread_t t;
		pthread_create(&t, 0, worker, (void *)k);
	}
	printf("READY pid=%d mib=%zu threads=%zu\n", getpid(), mib, n);
	fflush(stdout);
	for (;;) {
		pause();
		if (hup) {
			hup = 0;
			size_t q = bytes / 4;
			char *b = (char *)buf;
			munmap(b + 3 * q, q);
			madvise(b + 2 * q, q, MADV_DONTNEED);
			moved = mremap(b + q, q, q, MREMAP_MAYMOVE | MREMAP_FIXED,
				       mmap(0, q, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
			changed = 1;
			printf("CHANGED pid=%d moved=%p\n", getpid(), (void *)moved);
			fflush(stdout);
		}
		if (usr2) {
			usr2 = 0;
			pid_t c = fork();
			if (c == 0) {
				int r = check_range(0, words);
				for (size_t i = 0; i < words / 2 && !changed; i += 512) buf[i] = mix(i);
				r |= check_range(0, words);
				_exit(r);
			}
			int st = 1;
			waitpid(c, &st, 0);
			int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0 && !check_range(0, words);
			printf("FORK %s pid=%d\n", ok ? "PASS" : "FAIL", getpid());
			fflush(stdout);
		}
		if (usr1) {
			usr1 = 0;
			gen++;
			int b = 0;
			if (n) {
				pthread_barrier_wait(&go);
				pthread_barrier_wait(&done);
				for (size_t k = 0; k < n; k++) b |= bad[k];
			} else {
				b = check_range(0, words);
			}
			printf("%s lazy_mem pid=%d threads=%zu changed=%d\n", b ? "FAIL" : "PASS", getpid(),
			       n, changed);
			fflush(stdout);
		}
	}
}
