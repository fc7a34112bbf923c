/*
 * fd_opath -- O_PATH descriptors.
 *
 *   fd_opath DIR      (makes DIR/file, DIR/sub/, DIR/link -> file, DIR/fifo)
 *
 * Holds: O_PATH of the file, O_PATH|O_DIRECTORY of sub, O_PATH|O_NOFOLLOW
 * of the symlink itself, O_PATH of the FIFO (opening it for real would
 * block).  The probe checks each fd is O_PATH, names the same object
 * (type, inode), the link's target through readlinkat(fd, ""), a file
 * opened relative to the directory fd, and the file's content read by
 * reopening the O_PATH fd through /proc/self/fd.
 * Prints "READY pid=P"; on SIGUSR1 "PASS fd_opath pid=P" or "FAIL fd_opath: ...".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define NAME "fd_opath"
#include "probe.h"

static void die(const char *what) { fprintf(stderr, NAME ": %s: %s\n", what, strerror(errno)); exit(1); }

static char d[PATH_MAX - 64], pf[PATH_MAX], ps[PATH_MAX], pl[PATH_MAX], pq[PATH_MAX];
static int ff, fs, fl, fq;
static struct stat sf, ss, sl, sq;

static void same(int fd, const struct stat *want, const char *what)
{
	struct stat st;
	if (fstat(fd, &st)) { fail("fstat %s: %s", what, strerror(errno)); return; }
	if ((st.st_mode & S_IFMT) != (want->st_mode & S_IFMT)) fail("%s: type %o, want %o", what, st.st_mode & S_IFMT, want->st_mode & S_IFMT);
	if (st.st_ino != want->st_ino || st.st_dev != want->st_dev) fail("%s: another inode", what);
	int f = fcntl(fd, F_GETFL);
	if (f < 0 || !(f & O_PATH)) fail("%s: not O_PATH (flags %o)", what, f);
}

static void verify(void)
{
	fails[0] = 0;
	same(ff, &sf, "file");
	same(fs, &ss, "dir");
	same(fl, &sl, "symlink");
	same(fq, &sq, "fifo");
	char buf[256];
	ssize_t n = readlinkat(fl, "", buf, sizeof(buf) - 1);
	if (n < 0) fail("readlinkat(link fd): %s", strerror(errno));
	else { buf[n] = 0; if (strcmp(buf, "file")) fail("link target %s", buf); }
	int in = openat(fs, "inner", O_RDONLY);
	if (in < 0) fail("openat(dir fd, inner): %s", strerror(errno));
	else { n = read(in, buf, sizeof(buf)); close(in); if (n != 6 || memcmp(buf, "inner\n", 6)) fail("inner content"); }
	char p[64];
	snprintf(p, sizeof(p), "/proc/self/fd/%d", ff);
	int r = open(p, O_RDONLY);
	if (r < 0) fail("reopen file: %s", strerror(errno));
	else { n = read(r, buf, sizeof(buf)); close(r); if (n != 8 || memcmp(buf, "content\n", 8)) fail("file content"); }
	if (read(ff, buf, 1) != -1 || errno != EBADF) fail("read on an O_PATH fd did not fail with EBADF");
	if (fails[0]) printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 2) { fprintf(stderr, "usage: " NAME " DIR\n"); return 2; }
	snprintf(d, sizeof(d), "%s", argv[1]);
	snprintf(pf, sizeof(pf), "%s/file", d);
	snprintf(ps, sizeof(ps), "%s/sub", d);
	snprintf(pl, sizeof(pl), "%s/link", d);
	snprintf(pq, sizeof(pq), "%s/fifo", d);
	unlink(pl); unlink(pq);
	FILE *f = fopen(pf, "w"); if (!f) die("file"); fputs("content\n", f); fclose(f);
	mkdir(ps, 0755);
	char in[PATH_MAX + 8]; snprintf(in, sizeof(in), "%s/inner", ps);
	f = fopen(in, "w"); if (!f) die("inner"); fputs("inner\n", f); fclose(f);
	if (symlink("file", pl)) die("symlink");
	if (mkfifo(pq, 0600)) die("mkfifo");
	if ((ff = open(pf, O_PATH)) < 0) die("open file");
	if ((fs = open(ps, O_PATH | O_DIRECTORY)) < 0) die("open dir");
	if ((fl = open(pl, O_PATH | O_NOFOLLOW)) < 0) die("open link");
	if ((fq = open(pq, O_PATH | O_CLOEXEC)) < 0) die("open fifo");
	if (fstat(ff, &sf) || fstat(fs, &ss) || fstat(fl, &sl) || fstat(fq, &sq)) die("fstat");
	signal(SIGUSR1, on_usr1);
	printf("READY pid=%d\n", getpid());
	struct timespec ts = { 0, 1000000 };
	for (;;) {
		if (probe_req) { probe_req = 0; verify(); }
		nanosleep(&ts, NULL);
	}
}
