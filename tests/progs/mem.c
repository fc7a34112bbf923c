/*
 * mem -- one mapping of every kind.
 *
 *   mem DIR          (DIR: a writable directory for the file-backed mappings)
 *
 *   anon        private anonymous, written (pattern)
 *   untouched   private anonymous, never touched (must read back as zeros)
 *   sbrk        heap grown with sbrk() and written; sbrk(0) must not move
 *   fpriv       MAP_PRIVATE of DIR/priv.dat: pages 0-7 written (COW copies),
 *               pages 8-15 only read (must still show the file)
 *   fshared     MAP_SHARED of DIR/shared.dat, written: changes are in the
 *               file; each probe writes a new value through the mapping and
 *               reads it back from the file (still shared after restore)
 *   shanon      MAP_SHARED|MAP_ANONYMOUS, written
 *   guard       PROT_NONE (a read must fault)
 *   rodata      private anonymous written, then mprotect(PROT_READ)
 *               (content kept, a write must fault)
 *   fixed       MAP_FIXED at FIXED_ADDR, written
 *   stack       a pattern in a local array of main()
 * Protections are checked in /proc/self/maps, malloc() is exercised (many
 * allocations, written, checked, freed) at every probe.
 *
 * Prints "READY pid=P"; on SIGUSR1 "PASS mem pid=P" or "FAIL mem: ... (pid=P)".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define NAME "mem"
#define PG 4096UL
#define FIXED_ADDR ((void *)0x600000000000UL)

#include "probe.h"

static uint64_t pat(uint64_t tag, size_t i)
{
	uint64_t x = tag * 0x9E3779B97F4A7C15ULL + i * 0xBF58476D1CE4E5B9ULL + 1;
	x ^= x >> 31; x *= 0x94D049BB133111EBULL; x ^= x >> 29;
	return x;
}

static void fill(void *p, size_t bytes, uint64_t tag)
{
	uint64_t *w = p;
	for (size_t i = 0; i < bytes / 8; i++)
		w[i] = pat(tag, i);
}

static void check_fill(const char *what, const void *p, size_t bytes, uint64_t tag)
{
	const uint64_t *w = p;
	for (size_t i = 0; i < bytes / 8; i++)
		if (w[i] != pat(tag, i)) {
			fail("%s: word %zu (page %zu) is %016llx, want %016llx", what, i,
			     i * 8 / PG, (unsigned long long)w[i],
			     (unsigned long long)pat(tag, i));
			return;
		}
}

/* fault probing */
static sigjmp_buf fault_jmp;
static volatile int faulted;
static void on_segv(int sig) { (void)sig; faulted = 1; siglongjmp(fault_jmp, 1); }

static int faults(volatile char *p, int write)
{
	struct sigaction sa, old;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_segv;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGSEGV, &sa, &old);
	faulted = 0;
	if (!sigsetjmp(fault_jmp, 1)) {
		if (write)
			*p = *p;
		else
			(void)*p;
	}
	sigaction(SIGSEGV, &old, NULL);
	return faulted;
}

/* the area containing [p, p+len) in /proc/self/maps must have these perms */
static void check_perms(const char *what, const void *p, size_t len, const char *perms)
{
	FILE *f = fopen("/proc/self/maps", "r");
	char line[512];
	unsigned long a = (unsigned long)p, found = 0;
	if (!f) { fail("open maps: %s", strerror(errno)); return; }
	while (fgets(line, sizeof(line), f)) {
		unsigned long s, e;
		char pr[8];
		if (sscanf(line, "%lx-%lx %7s", &s, &e, pr) != 3)
			continue;
		if (s <= a && a + len <= e) {
			found = 1;
			if (strcmp(pr, perms))
				fail("%s at %#lx: perms %s, want %s", what, a, pr, perms);
			break;
		}
	}
	fclose(f);
	if (!found)
		fail("%s: [%#lx, %#lx) is not one area in /proc/self/maps", what, a, a + len);
}

#define ANON_SZ (4 << 20)
#define UNTOUCHED_SZ (4 << 20)
#define SBRK_SZ (1 << 20)
#define FPRIV_PAGES 16
#define FSHARED_PAGES 8
#define SHANON_SZ (1 << 20)
#define GUARD_SZ (4 * PG)
#define RO_SZ (16 * PG)
#define FIXED_SZ (64 * PG)

static char *anon, *untouched, *sbrk_area, *fpriv, *fshared, *shanon, *guard, *rodata, *fixed;
static void *brk_expected;
static int shared_fd;
static char shared_path[4096], priv_path[4096];
static uint64_t shared_gen;

static void malloc_workout(void)
{
	enum { N = 3000 };
	static void *blocks[N];
	static size_t sizes[N];
	uint64_t s = 88172645463325252ULL;
	for (int i = 0; i < N; i++) {
		s ^= s << 13; s ^= s >> 7; s ^= s << 17;
		sizes[i] = 16 + s % 20000;
		blocks[i] = malloc(sizes[i]);
		if (!blocks[i]) { fail("malloc(%zu) failed", sizes[i]); return; }
		memset(blocks[i], i & 0xff, sizes[i]);
	}
	for (int i = 0; i < N; i += 2) {
		free(blocks[i]);
		blocks[i] = NULL;
	}
	for (int i = 1; i < N; i += 2) {
		unsigned char *b = blocks[i];
		if (b[0] != (i & 0xff) || b[sizes[i] - 1] != (i & 0xff))
			fail("malloc block %d overwritten", i);
		b = realloc(b, sizes[i] * 2);
		if (!b) { fail("realloc failed"); return; }
		free(b);
	}
	void *big = malloc(64 << 20);       /* mmap'd by malloc */
	if (!big) fail("malloc(64 MiB) failed");
	else { memset(big, 1, 64 << 20); free(big); }
	malloc_trim(0);
}

static void verify(volatile uint64_t *stk)
{
	fails[0] = 0;

	void *brk_now = sbrk(0);
	if (brk_now != brk_expected)
		fail("sbrk(0) is %p, want %p", brk_now, brk_expected);

	check_fill("anon", anon, ANON_SZ, 1);
	check_perms("anon", anon, ANON_SZ, "rw-p");

	for (size_t i = 0; i < UNTOUCHED_SZ; i += 512)
		if (untouched[i]) { fail("untouched area not zero at +%zu", i); break; }
	check_perms("untouched", untouched, UNTOUCHED_SZ, "rw-p");

	check_fill("sbrk", sbrk_area, SBRK_SZ, 3);
	check_perms("sbrk", sbrk_area, SBRK_SZ, "rw-p");

	check_fill("fpriv written pages", fpriv, 8 * PG, 4);
	check_fill("fpriv read pages", fpriv + 8 * PG, 8 * PG, 104);
	check_perms("fpriv", fpriv, FPRIV_PAGES * PG, "rw-p");
	{       /* the file itself never saw the private writes */
		static char fb[FPRIV_PAGES * PG];
		int fd = open(priv_path, O_RDONLY);
		if (fd < 0 || pread(fd, fb, sizeof(fb), 0) != (ssize_t)sizeof(fb))
			fail("read %s: %s", priv_path, strerror(errno));
		else {
			check_fill("priv.dat pages 0-7", fb, 8 * PG, 204);
			check_fill("priv.dat pages 8-15", fb + 8 * PG, 8 * PG, 104);
		}
		if (fd >= 0)
			close(fd);
	}

	check_fill("fshared", fshared + 8, FSHARED_PAGES * PG - 8, 5);
	if (*(uint64_t *)fshared != shared_gen)
		fail("fshared generation %llu, want %llu",
		     (unsigned long long)*(uint64_t *)fshared, (unsigned long long)shared_gen);
	check_perms("fshared", fshared, FSHARED_PAGES * PG, "rw-s");
	{       /* the file holds what the mapping shows */
		static char fb[FSHARED_PAGES * PG];
		if (pread(shared_fd, fb, sizeof(fb), 0) != (ssize_t)sizeof(fb))
			fail("read %s: %s", shared_path, strerror(errno));
		else if (memcmp(fb, fshared, sizeof(fb)))
			fail("%s differs from its MAP_SHARED mapping", shared_path);
	}
	*(volatile uint64_t *)fshared = ++shared_gen;   /* must reach the file */
	{
		uint64_t g = 0;
		if (pread(shared_fd, &g, 8, 0) != 8 || g != shared_gen)
			fail("write through the shared mapping not in the file (%llu, want %llu)",
			     (unsigned long long)g, (unsigned long long)shared_gen);
	}

	check_fill("shanon", shanon, SHANON_SZ, 6);
	check_perms("shanon", shanon, SHANON_SZ, "rw-s");

	check_perms("guard", guard, GUARD_SZ, "---p");
	if (!faults(guard + PG, 0))
		fail("reading the PROT_NONE guard did not fault");

	check_fill("rodata", rodata, RO_SZ, 7);
	check_perms("rodata", rodata, RO_SZ, "r--p");
	if (!faults(rodata + 3 * PG, 1))
		fail("writing the read-only area did not fault");

	check_fill("fixed", fixed, FIXED_SZ, 8);
	check_perms("fixed", fixed, FIXED_SZ, "rw-p");

	for (int i = 0; i < 512; i++)
		if (stk[i] != pat(9, i)) { fail("stack array word %d changed", i); break; }

	malloc_workout();
	brk_expected = sbrk(0);          /* malloc may have moved it */

	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

static void *xmap(size_t len, int prot, int flags, int fd, void *at)
{
	void *p = mmap(at, len, prot, flags, fd, 0);
	if (p == MAP_FAILED) { perror("mmap"); exit(1); }
	return p;
}

static int make_file(const char *path, size_t bytes, uint64_t tag)
{
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0) { perror(path); exit(1); }
	char *b = malloc(bytes);
	fill(b, bytes, tag);
	if (write(fd, b, bytes) != (ssize_t)bytes) { perror("write"); exit(1); }
	free(b);
	return fd;
}

int main(int argc, char **argv)
{
	static char outbuf[4096];
	setvbuf(stdout, outbuf, _IOLBF, sizeof(outbuf));   /* no malloc for stdio */
	if (argc != 2) { fprintf(stderr, "usage: mem DIR\n"); return 2; }

	uint64_t stk[512];
	for (int i = 0; i < 512; i++)
		stk[i] = pat(9, i);

	sbrk_area = sbrk(SBRK_SZ);
	if (sbrk_area == (void *)-1) { perror("sbrk"); return 1; }
	fill(sbrk_area, SBRK_SZ, 3);

	anon = xmap(ANON_SZ, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, NULL);
	fill(anon, ANON_SZ, 1);
	untouched = xmap(UNTOUCHED_SZ, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, NULL);

	/* private file mapping: file pages 0-7 hold tag 204, pages 8-15 tag 104
	 * (written as two halves so a page of either is recognisable) */
	snprintf(priv_path, sizeof(priv_path), "%s/priv.dat", argv[1]);
	int pfd = make_file(priv_path, 8 * PG, 204);
	{
		char *b = malloc(8 * PG);
		fill(b, 8 * PG, 104);
		if (pwrite(pfd, b, 8 * PG, 8 * PG) != (ssize_t)(8 * PG)) { perror("pwrite"); return 1; }
		free(b);
	}
	fpriv = xmap(FPRIV_PAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, pfd, NULL);
	close(pfd);
	fill(fpriv, 8 * PG, 4);                           /* COW the first 8 pages */
	volatile uint64_t sink = 0;
	for (size_t i = 8 * PG; i < FPRIV_PAGES * PG; i += PG)
		sink += fpriv[i];                         /* only read the rest */
	(void)sink;

	snprintf(shared_path, sizeof(shared_path), "%s/shared.dat", argv[1]);
	shared_fd = make_file(shared_path, FSHARED_PAGES * PG, 55);
	fshared = xmap(FSHARED_PAGES * PG, PROT_READ | PROT_WRITE, MAP_SHARED, shared_fd, NULL);
	shared_gen = 1;
	/* word 0 is the generation counter; the rest keeps pattern 5 shifted */
	fill(fshared + 8, FSHARED_PAGES * PG - 8, 5);
	*(uint64_t *)fshared = shared_gen;
	/* the mapping is the way in: the fd stays open only to read the file */

	shanon = xmap(SHANON_SZ, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, NULL);
	fill(shanon, SHANON_SZ, 6);

	guard = xmap(GUARD_SZ, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, NULL);

	rodata = xmap(RO_SZ, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, NULL);
	fill(rodata, RO_SZ, 7);
	if (mprotect(rodata, RO_SZ, PROT_READ)) { perror("mprotect"); return 1; }

	fixed = xmap(FIXED_SZ, PROT_READ | PROT_WRITE,
		     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, FIXED_ADDR);
	if (fixed != FIXED_ADDR) { fprintf(stderr, "MAP_FIXED_NOREPLACE gave %p\n", fixed); return 1; }
	fill(fixed, FIXED_SZ, 8);

	brk_expected = sbrk(0);

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);

	printf("READY pid=%d fixed=%p\n", getpid(), (void *)fixed);
	fflush(stdout);

	struct timespec ts = { 0, 1000000 };
	for (;;) {
		if (probe_req) {
			probe_req = 0;
			verify(stk);
		}
		nanosleep(&ts, NULL);
	}
}
