/*
 * fd_memfd -- memfds: held by fds, mapped, sealed, shared with a child.
 *
 *   fd_memfd
 *
 * M1 "lcr-test memfd": MFD_ALLOW_SEALING, SIZE1 bytes (data in its first
 *   pages, a hole after), sealed F_SEAL_SHRINK|F_SEAL_GROW, offset OFF1.
 *   Also opened a second time through /proc/self/fd, O_RDONLY, offset 5.
 *   Mapped MAP_SHARED (pages 0-1) by this process and, with its own mmap
 *   of the inherited fd, by a child (forked at start); MAP_PRIVATE (pages
 *   2-3) with its first page written (copied on write).
 * M2 "sealed": F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL, mapped
 *   MAP_SHARED read-only.
 * M3 "mapped-only": mapped MAP_SHARED, then its fd closed.
 * ANON: 32 MiB of MAP_SHARED|MAP_ANONYMOUS memory shared with the child
 *   (restored as a memfd "lcr-shm": checkpointed again, it is still shared
 *   anonymous memory, of any size).
 *
 * Each probe checks names (readlink, maps), sizes, offsets, access modes,
 * seals (and that they hold: write and ftruncate fail on M2, grow and
 * shrink on M1), content, then writes a new value into the shared
 * mapping of M1 and waits for the child to copy it (through its own
 * mapping of the same memfd) into another word of it; last, a new marker
 * in M3's mapping.
 * Prints "READY pid=P child=C"; on SIGUSR1 "PASS fd_memfd pid=P" or
 * "FAIL fd_memfd: <details> (pid=P)".  The child exits when its parent dies.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define NAME "fd_memfd"
#define PG 4096
#define SIZE1 (64 * PG)
#define DATA1 (5 * PG)
#define OFF1 100L
#define NAME1 "lcr-test memfd"
#define SEALS1 (F_SEAL_SHRINK | F_SEAL_GROW)
#define SEALS2 (F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
#define TEXT2 "sealed content\n"

#include "probe.h"

static unsigned char pattern(long i) { return (unsigned char)((i * 131 + 7) % 251); }
static void die(const char *what) { fprintf(stderr, NAME ": %s: %s\n", what, strerror(errno)); exit(1); }

static int m1, m1ro, m2;
static unsigned char *map1, *map1p, *map2, *map3;
static pid_t child;
static uint64_t value;      /* last value the child copied (0 at the start) */
static uint64_t m3mark;
#define ANON (32L << 20)
static unsigned char *anon;

#define W_IN 0      /* word the parent writes in map1 */
#define W_OUT 64    /* word the child copies it to */

static unsigned char expected1(long i)
{
	if ((i >= W_IN && i < W_IN + 8) || (i >= W_OUT && i < W_OUT + 8))
		return ((unsigned char *)&value)[i % 8];
	return i < DATA1 ? pattern(i) : 0;
}

static void check_name(int fd, const char *name)
{
	char p[64], l[PATH_MAX], want[PATH_MAX];
	snprintf(p, sizeof(p), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(p, l, sizeof(l) - 1);
	if (n < 0) { fail("readlink fd %d: %s", fd, strerror(errno)); return; }
	l[n] = 0;
	snprintf(want, sizeof(want), "/memfd:%s (deleted)", name);
	if (strcmp(l, want)) fail("fd %d is %s, expected %s", fd, l, want);
}

static int maps_has(void *addr, const char *text)
{
	char line[1024], head[64];
	snprintf(head, sizeof(head), "%lx-", (unsigned long)addr);
	FILE *f = fopen("/proc/self/maps", "r");
	int ok = 0;
	while (f && fgets(line, sizeof(line), f))
		if (strncmp(line, head, strlen(head)) == 0) { ok = strstr(line, text) != NULL; break; }
	if (f) fclose(f);
	return ok;
}

static void verify(void)
{
	struct stat s1, s1r, s2;
	fails[0] = 0;
	if (fstat(m1, &s1) || fstat(m1ro, &s1r) || fstat(m2, &s2)) { fail("fstat: %s", strerror(errno)); goto out; }
	check_name(m1, NAME1);
	check_name(m1ro, NAME1);
	check_name(m2, "sealed");
	if (s1.st_ino != s1r.st_ino || s1.st_dev != s1r.st_dev) fail("the two opens of M1 are not one memfd");
	if (s1.st_size != SIZE1) fail("M1 size %ld, expected %d", (long)s1.st_size, SIZE1);
	if (s2.st_size != (off_t)strlen(TEXT2)) fail("M2 size %ld", (long)s2.st_size);
	if ((fcntl(m1, F_GETFL) & O_ACCMODE) != O_RDWR) fail("M1 is not O_RDWR");
	if ((fcntl(m1ro, F_GETFL) & O_ACCMODE) != O_RDONLY) fail("M1's second open is not O_RDONLY");
	if (lseek(m1, 0, SEEK_CUR) != OFF1) fail("M1 at offset %ld, expected %ld", (long)lseek(m1, 0, SEEK_CUR), OFF1);
	if (lseek(m1ro, 0, SEEK_CUR) != 5) fail("M1's second open at offset %ld, expected 5", (long)lseek(m1ro, 0, SEEK_CUR));
	int se1 = fcntl(m1, F_GET_SEALS), se2 = fcntl(m2, F_GET_SEALS);
	if (se1 != SEALS1) fail("M1 seals 0x%x, expected 0x%x", se1, SEALS1);
	if (se2 != SEALS2) fail("M2 seals 0x%x, expected 0x%x", se2, SEALS2);
	/* the seals hold */
	if (pwrite(m2, "X", 1, 0) != -1 || errno != EPERM) fail("a write to write-sealed M2 did not fail with EPERM");
	if (ftruncate(m2, 0) != -1 || errno != EPERM) fail("shrinking sealed M2 did not fail");
	if (ftruncate(m1, SIZE1 * 2) != -1 || errno != EPERM) fail("growing M1 did not fail");
	if (ftruncate(m1, PG) != -1 || errno != EPERM) fail("shrinking M1 did not fail");
	if (fcntl(m2, F_ADD_SEALS, F_SEAL_FUTURE_WRITE) != -1 || errno != EPERM) fail("M2 is not sealed against more seals");
	void *w = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_SHARED, m2, 0);
	if (w != MAP_FAILED) { fail("M2 could be mapped shared and writable"); munmap(w, PG); }
	char t[64] = {0};
	if (pread(m2, t, sizeof(t) - 1, 0) != (ssize_t)strlen(TEXT2) || strcmp(t, TEXT2)) fail("M2 holds %s", t);
	if (memcmp(map2, TEXT2, strlen(TEXT2))) fail("M2's mapping does not hold its content");
	/* M1's content, through the read-only description */
	static unsigned char buf[SIZE1];
	if (pread(m1ro, buf, SIZE1, 0) != SIZE1) fail("pread M1");
	else
		for (long i = 0; i < SIZE1; i++)
			if (buf[i] != expected1(i)) { fail("M1 byte %ld is %u, expected %u", i, buf[i], expected1(i)); break; }
	for (long i = 0; i < 2 * PG; i++)
		if (map1[i] != expected1(i)) { fail("M1 shared mapping byte %ld is %u, expected %u", i, map1[i], expected1(i)); break; }
	for (long i = 0; i < 2 * PG; i++) {
		unsigned char want = i < PG ? 0xCD : expected1(3 * PG + i);
		if (map1p[i] != want) { fail("M1 private mapping byte %ld is %u, expected %u", i, map1p[i], want); break; }
	}
	if (!maps_has(map1, "/memfd:" NAME1 " (deleted)")) fail("maps does not show M1's mapping as /memfd:" NAME1);
	if (!maps_has(map3, "/memfd:mapped-only (deleted)")) fail("maps does not show M3's mapping");
	/* the child sees the same memfd through its own mapping */
	uint64_t v = value + 1, got = 0;
	memcpy(map1 + W_IN, &v, 8);
	for (int i = 0; i < 5000; i++) {
		__atomic_load(( uint64_t *)(map1 + W_OUT), &got, __ATOMIC_SEQ_CST);
		if (got == v) break;
		usleep(1000);
	}
	if (got != v) fail("child %d did not copy %lu through its mapping (saw %lu)", child, (unsigned long)v, (unsigned long)got);
	else value = v;
	if (pread(m1, &got, 8, W_OUT) != 8 || got != value) fail("the child's copy is not in M1");
	/* shared anonymous memory: the child copies its first word to its last */
	if (*(uint64_t *)(anon + ANON / 2) != 0x1234567890abcdefULL) fail("ANON's middle word changed");
	uint64_t a = *(uint64_t *)anon + 1, ga = 0;
	__atomic_store((uint64_t *)anon, &a, __ATOMIC_SEQ_CST);
	for (int i = 0; i < 5000; i++) {
		__atomic_load((uint64_t *)(anon + ANON - 8), &ga, __ATOMIC_SEQ_CST);
		if (ga == a) break;
		usleep(1000);
	}
	if (ga != a) fail("child did not copy %lu in ANON (saw %lu)", (unsigned long)a, (unsigned long)ga);
	/* mapped only */
	for (long i = 0; i < 2 * PG; i++) {
		unsigned char want = (i < 8 && m3mark) ? ((unsigned char *)&m3mark)[i] : pattern(i + 7);
		if (map3[i] != want) { fail("M3 byte %ld is %u, expected %u", i, map3[i], want); break; }
	}
	m3mark++;
	memcpy(map3, &m3mark, 8);
out:
	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

static void child_loop(pid_t parent)
{
	unsigned char *m = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_SHARED, m1, 0);
	if (m == MAP_FAILED) _exit(1);
	struct timespec ts = { 0, 500000 };
	for (;;) {
		uint64_t v;
		__atomic_load((uint64_t *)(m + W_IN), &v, __ATOMIC_SEQ_CST);
		__atomic_store((uint64_t *)(m + W_OUT), &v, __ATOMIC_SEQ_CST);
		__atomic_load((uint64_t *)anon, &v, __ATOMIC_SEQ_CST);
		__atomic_store((uint64_t *)(anon + ANON - 8), &v, __ATOMIC_SEQ_CST);
		if (getppid() != parent) _exit(0);
		nanosleep(&ts, NULL);
	}
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	static unsigned char buf[DATA1];
	for (long i = 0; i < DATA1; i++) buf[i] = pattern(i);
	memset(buf + W_IN, 0, 8);           /* the words parent and child share start at 0 */
	memset(buf + W_OUT, 0, 8);
	m1 = memfd_create(NAME1, MFD_ALLOW_SEALING);
	if (m1 < 0) die("memfd_create");
	if (ftruncate(m1, SIZE1) || pwrite(m1, buf, DATA1, 0) != DATA1) die("fill M1");
	if (lseek(m1, OFF1, SEEK_SET) != OFF1) die("lseek");
	char p[64];
	snprintf(p, sizeof(p), "/proc/self/fd/%d", m1);
	m1ro = open(p, O_RDONLY);
	if (m1ro < 0 || lseek(m1ro, 5, SEEK_SET) != 5) die("reopen M1");
	map1 = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, m1, 0);
	map1p = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, m1, 3 * PG);
	if (map1 == MAP_FAILED || map1p == MAP_FAILED) die("mmap M1");
	memset(map1p, 0xCD, PG);
	if (fcntl(m1, F_ADD_SEALS, SEALS1)) die("seal M1");

	m2 = memfd_create("sealed", MFD_ALLOW_SEALING | MFD_CLOEXEC);
	if (m2 < 0 || write(m2, TEXT2, strlen(TEXT2)) != (ssize_t)strlen(TEXT2)) die("M2");
	if (fcntl(m2, F_ADD_SEALS, SEALS2)) die("seal M2");
	map2 = mmap(NULL, PG, PROT_READ, MAP_SHARED, m2, 0);
	if (map2 == MAP_FAILED) die("mmap M2");

	int m3 = memfd_create("mapped-only", 0);
	if (m3 < 0 || ftruncate(m3, 2 * PG)) die("M3");
	map3 = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, m3, 0);
	if (map3 == MAP_FAILED) die("mmap M3");
	for (long i = 0; i < 2 * PG; i++) map3[i] = pattern(i + 7);
	close(m3);

	anon = mmap(NULL, ANON, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (anon == MAP_FAILED) die("mmap ANON");
	*(uint64_t *)(anon + ANON / 2) = 0x1234567890abcdefULL;
	pid_t parent = getpid();
	signal(SIGCHLD, SIG_IGN);           /* a killed child leaves no zombie */
	child = fork();
	if (child < 0) die("fork");
	if (child == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		child_loop(parent);
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	printf("READY pid=%d child=%d\n", getpid(), child);
	struct timespec ts = { 0, 1000000 };
	for (;;) {
		if (probe_req) {
			probe_req = 0;
			verify();
		}
		nanosleep(&ts, NULL);
	}
}
