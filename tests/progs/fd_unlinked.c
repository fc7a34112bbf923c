/*
 * fd_unlinked -- open files that were unlinked, and mappings of them.
 *
 *   fd_unlinked DIR          the checks below
 *   fd_unlinked DIR big      only a 20 MiB unlinked file (lcr must refuse it)
 *
 * DIR/unl.dat: SIZE bytes, data in [0, R1) and [R2, SIZE), a hole between,
 *   mode 0640; then unlinked.  Held by fd A (O_RDWR, offset OFF_A), fd C
 *   (a dup of A: same description), fd B (a second open, O_RDONLY, offset
 *   OFF_B), a MAP_SHARED mapping of its first two pages and a MAP_PRIVATE
 *   mapping of pages 4-5 whose first page was written (copied on write).
 * DIR/s1.dat: opened, renamed to DIR/s2.dat, then unlinked (fd S, offset 7).
 * DIR/before.dat: opened, renamed to DIR/after.dat, still linked (fd R).
 * DIR/maponly.dat: mapped MAP_SHARED and MAP_PRIVATE (read-only), its fd
 *   closed, then unlinked: only mappings hold it.
 *
 * Each probe checks: nlink 0, size, mode, one inode for A/B/C, readlink
 * "PATH (deleted)", offsets (and that A and C share theirs), access modes,
 * the content (holes, data, what earlier probes wrote), then writes a new
 * marker through the shared mapping and reads it back through fd B, and
 * one through the map-only shared mapping, seen through its private one.
 * Prints "READY pid=P"; on SIGUSR1 "PASS fd_unlinked pid=P" or
 * "FAIL fd_unlinked: <details> (pid=P)".
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
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define NAME "fd_unlinked"
#define PG 4096
#define R1 100000L
#define R2 (1L << 20)
#define SIZE (R2 + 12345L)
#define OFF_A 12345L
#define OFF_B 777L
#define FD_C 50
#define MARK 200          /* marker offset in unl.dat (through the shared mapping) */
#define MMARK 100         /* marker offset in maponly.dat */
#define BIG (20L << 20)

#include "probe.h"

static unsigned char pattern(long i) { return (unsigned char)((i * 131 + 7) % 251); }
static unsigned char pattern2(long i) { return (unsigned char)((i * 17 + 3) % 253); }

static char path_unl[PATH_MAX], path_s2[PATH_MAX], path_after[PATH_MAX];
static int fa, fb, fs, fr, fbig = -1;
static unsigned char *map_s, *map_p, *map_m, *map_r;
static uint64_t marker, mmarker;     /* last values written (0: none yet) */
static int big;

static void die(const char *what) { fprintf(stderr, NAME ": %s: %s\n", what, strerror(errno)); exit(1); }

static void check_link(int fd, const char *path, int deleted)
{
	char p[PATH_MAX], l[PATH_MAX + 16];
	snprintf(p, sizeof(p), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(p, l, sizeof(l) - 1);
	if (n < 0) { fail("readlink fd %d: %s", fd, strerror(errno)); return; }
	l[n] = 0;
	size_t pl = strlen(path);
	/* the same name, or (when lcr found it taken) that name plus a suffix */
	if (strncmp(l, path, pl) != 0)
		fail("fd %d is %s, expected %s", fd, l, path);
	int is_del = n > 10 && strcmp(l + n - 10, " (deleted)") == 0;
	if (is_del != deleted)
		fail("fd %d is %s: %s", fd, l, deleted ? "not unlinked" : "unlinked");
}

static long offset_of(int fd) { return lseek(fd, 0, SEEK_CUR); }

static unsigned char expected(long i)
{
	if (i >= MARK && i < MARK + 8 && marker)
		return ((unsigned char *)&marker)[i - MARK];
	if (i < R1 || i >= R2)
		return pattern(i);
	return 0;
}

static void verify_big(void)
{
	struct stat st;
	if (fstat(fbig, &st)) fail("fstat big: %s", strerror(errno));
	else if (st.st_nlink != 0 || st.st_size != BIG) fail("big: nlink %ld size %ld", (long)st.st_nlink, (long)st.st_size);
}

static void verify(void)
{
	struct stat sa, sb, sc, sp;
	fails[0] = 0;
	if (big) { verify_big(); goto out; }
	if (fstat(fa, &sa) || fstat(fb, &sb) || fstat(FD_C, &sc)) { fail("fstat: %s", strerror(errno)); goto out; }
	if (sa.st_nlink != 0) fail("unl.dat has %ld links, expected 0", (long)sa.st_nlink);
	if (!S_ISREG(sa.st_mode) || (sa.st_mode & 07777) != 0640) fail("unl.dat mode 0%o", sa.st_mode);
	if (sa.st_size != SIZE) fail("unl.dat size %ld, expected %ld", (long)sa.st_size, SIZE);
	if (sb.st_ino != sa.st_ino || sb.st_dev != sa.st_dev || sc.st_ino != sa.st_ino)
		fail("fds A, B, C are not one inode (%lu %lu %lu)", (unsigned long)sa.st_ino,
		     (unsigned long)sb.st_ino, (unsigned long)sc.st_ino);
	if (stat(path_unl, &sp) == 0 && sp.st_ino == sa.st_ino && sp.st_dev == sa.st_dev)
		fail("%s is linked again", path_unl);
	check_link(fa, path_unl, 1);
	check_link(fb, path_unl, 1);
	if ((fcntl(fa, F_GETFL) & O_ACCMODE) != O_RDWR) fail("A is not O_RDWR");
	if ((fcntl(fb, F_GETFL) & O_ACCMODE) != O_RDONLY) fail("B is not O_RDONLY");
	if (offset_of(fa) != OFF_A) fail("A at offset %ld, expected %ld", offset_of(fa), OFF_A);
	if (offset_of(FD_C) != OFF_A) fail("C at offset %ld, expected %ld", offset_of(FD_C), OFF_A);
	if (offset_of(fb) != OFF_B) fail("B at offset %ld, expected %ld", offset_of(fb), OFF_B);
	lseek(fa, 1, SEEK_CUR);
	if (offset_of(FD_C) != OFF_A + 1) fail("A and C do not share their offset");
	lseek(fa, OFF_A, SEEK_SET);
	/* content, through fd B (pread: no offset change) */
	static unsigned char buf[SIZE];
	ssize_t n = pread(fb, buf, SIZE, 0);
	if (n != SIZE) fail("pread unl.dat: %zd", n);
	else
		for (long i = 0; i < SIZE; i++)
			if (buf[i] != expected(i)) { fail("unl.dat byte %ld is %u, expected %u", i, buf[i], expected(i)); break; }
	for (long i = 0; i < 2 * PG; i++)
		if (map_s[i] != expected(i)) { fail("shared mapping byte %ld is %u, expected %u", i, map_s[i], expected(i)); break; }
	for (long i = 0; i < 2 * PG; i++) {
		unsigned char want = (i < 100) ? 0xAB : pattern(4 * PG + i);
		if (map_p[i] != want) { fail("private mapping byte %ld is %u, expected %u", i, map_p[i], want); break; }
	}
	/* a new marker through the shared mapping, seen through fd B */
	uint64_t m = marker + 1, got = 0;
	memcpy(map_s + MARK, &m, 8);
	if (pread(fb, &got, 8, MARK) != 8 || got != m) fail("write through the shared mapping not seen by fd B");
	else marker = m;
	/* renamed, then unlinked */
	struct stat ss;
	char sbuf[64] = {0};
	if (fstat(fs, &ss) || ss.st_nlink != 0) fail("s2.dat is not unlinked");
	check_link(fs, path_s2, 1);
	if (offset_of(fs) != 7) fail("s2.dat at offset %ld, expected 7", offset_of(fs));
	if (pread(fs, sbuf, sizeof(sbuf) - 1, 0) != 21 || strcmp(sbuf, "second file contents\n"))
		fail("s2.dat holds %s", sbuf);
	/* renamed, still linked */
	check_link(fr, path_after, 0);
	if (offset_of(fr) != 3) fail("after.dat at offset %ld, expected 3", offset_of(fr));
	memset(sbuf, 0, sizeof(sbuf));
	if (pread(fr, sbuf, sizeof(sbuf) - 1, 0) != 13 || strcmp(sbuf, "renamed file\n"))
		fail("after.dat holds %s", sbuf);
	/* mapped only */
	for (long i = 0; i < 2 * PG; i++) {
		unsigned char want = (i >= MMARK && i < MMARK + 8 && mmarker) ? ((unsigned char *)&mmarker)[i - MMARK] : pattern2(i);
		if (map_m[i] != want || map_r[i] != want) {
			fail("map-only byte %ld is %u/%u, expected %u", i, map_m[i], map_r[i], want);
			break;
		}
	}
	m = mmarker + 1;
	memcpy(map_m + MMARK, &m, 8);
	if (memcmp(map_r + MMARK, &m, 8)) fail("map-only: the private mapping does not see the shared one's write");
	else mmarker = m;
out:
	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

static int make_file(const char *path, const char *text)
{
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0) die(path);
	if (write(fd, text, strlen(text)) != (ssize_t)strlen(text)) die("write");
	return fd;
}

static void setup(const char *dir)
{
	char p[PATH_MAX];
	snprintf(path_unl, sizeof(path_unl), "%s/unl.dat", dir);
	unlink(path_unl);
	fa = open(path_unl, O_RDWR | O_CREAT | O_EXCL, 0600);
	if (fa < 0) die(path_unl);
	if (fchmod(fa, 0640)) die("fchmod");
	static unsigned char buf[SIZE];
	for (long i = 0; i < SIZE; i++) buf[i] = pattern(i);
	if (pwrite(fa, buf, R1, 0) != R1 || pwrite(fa, buf + R2, SIZE - R2, R2) != SIZE - R2) die("pwrite");
	fb = open(path_unl, O_RDONLY);
	if (fb < 0) die("open B");
	if (lseek(fb, OFF_B, SEEK_SET) != OFF_B || lseek(fa, OFF_A, SEEK_SET) != OFF_A) die("lseek");
	if (dup2(fa, FD_C) != FD_C) die("dup2");
	map_s = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fa, 0);
	map_p = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fa, 4 * PG);
	if (map_s == MAP_FAILED || map_p == MAP_FAILED) die("mmap");
	memset(map_p, 0xAB, 100);
	if (unlink(path_unl)) die("unlink");

	snprintf(p, sizeof(p), "%s/s1.dat", dir);
	snprintf(path_s2, sizeof(path_s2), "%s/s2.dat", dir);
	fs = make_file(p, "second file contents\n");
	if (rename(p, path_s2) || unlink(path_s2)) die("rename s1");
	lseek(fs, 7, SEEK_SET);

	snprintf(p, sizeof(p), "%s/before.dat", dir);
	snprintf(path_after, sizeof(path_after), "%s/after.dat", dir);
	int w = make_file(p, "renamed file\n");
	close(w);
	fr = open(p, O_RDONLY);
	if (fr < 0 || rename(p, path_after)) die("rename before");
	lseek(fr, 3, SEEK_SET);

	snprintf(p, sizeof(p), "%s/maponly.dat", dir);
	int fm = open(p, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fm < 0) die(p);
	for (long i = 0; i < 2 * PG; i++) buf[i] = pattern2(i);
	if (pwrite(fm, buf, 2 * PG, 0) != 2 * PG) die("pwrite maponly");
	map_m = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fm, 0);
	map_r = mmap(NULL, 2 * PG, PROT_READ, MAP_PRIVATE, fm, 0);
	if (map_m == MAP_FAILED || map_r == MAP_FAILED) die("mmap maponly");
	close(fm);
	if (unlink(p)) die("unlink maponly");
}

static void setup_big(const char *dir)
{
	char p[PATH_MAX];
	static char chunk[1 << 20];
	snprintf(p, sizeof(p), "%s/big.dat", dir);
	fbig = open(p, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fbig < 0) die(p);
	memset(chunk, 'x', sizeof(chunk));
	for (long off = 0; off < BIG; off += sizeof(chunk))
		if (write(fbig, chunk, sizeof(chunk)) != (ssize_t)sizeof(chunk)) die("write big");
	if (unlink(p)) die("unlink big");
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2) { fprintf(stderr, "usage: " NAME " DIR [big]\n"); return 2; }
	big = argc > 2 && strcmp(argv[2], "big") == 0;
	if (big) setup_big(argv[1]); else setup(argv[1]);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	printf("READY pid=%d\n", getpid());
	struct timespec ts = { 0, 1000000 };
	for (;;) {
		if (probe_req) {
			probe_req = 0;
			verify();
		}
		nanosleep(&ts, NULL);
	}
}
