/*
 * fd_procfile -- files under /proc/PID/ held open across a restart.
 *
 *   fd_procfile self | tree | outside
 *
 * self: holds /proc/PID/stat (PID = getpid()), /proc/self/maps,
 * /proc/PID/fd/ (O_DIRECTORY), /proc/self/status read 5 bytes into
 * ("Name:"), /proc/thread-self/stat (a /proc/PID/task/PID/ file).
 * tree: the same, plus /proc/CHILD/status of a child that sleeps.
 * outside: holds /proc/1/stat only (refused: not of the tree).
 * The probe checks each file names this process as /proc names it now
 * (the pid field equals a fresh /proc/self/stat's), maps equals a fresh
 * read and shows a page mapped at a known address, the fd/ directory lists
 * every held fd, status goes on at the saved position ("\t" after "Name:"),
 * the child's status names this process as its parent.
 * Prints "READY pid=P [child=C]"; on SIGUSR1 "PASS fd_procfile pid=P" or
 * "FAIL fd_procfile: ...".
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NAME "fd_procfile"
#include "probe.h"

static void die(const char *what) { fprintf(stderr, NAME ": %s: %s\n", what, strerror(errno)); exit(1); }

static int fstat_, fmaps, fdir, fstatus, fthr, fchild = -1, fout = -1;
static void *mark;
static char a[1 << 16], b[1 << 16];

static ssize_t slurp(int fd, char *buf, size_t n)
{
	ssize_t got = 0, r = 0;
	while ((size_t)got < n - 1 && (r = pread(fd, buf + got, n - 1 - got, got)) > 0) got += r;
	if (r < 0 && !got) return -1;
	buf[got] = 0;
	return got;
}

static long pid_field(const char *stat) { return strtol(stat, NULL, 10); }

static long fresh_pid(void)
{
	int f = open("/proc/self/stat", O_RDONLY);
	if (f < 0) return -1;
	ssize_t n = slurp(f, b, sizeof(b));
	close(f);
	return n > 0 ? pid_field(b) : -1;
}

static void check_dir(int fd, const int *want, int nwant)
{
	char buf[8192];
	int seen[16] = { 0 };
	if (lseek(fd, 0, SEEK_SET) < 0) { fail("lseek fd dir: %s", strerror(errno)); return; }
	for (;;) {
		long n = syscall(SYS_getdents64, fd, buf, sizeof(buf));
		if (n < 0) { fail("getdents fd dir: %s", strerror(errno)); return; }
		if (n == 0) break;
		for (long off = 0; off < n;) {
			struct dirent64 *d = (struct dirent64 *)(buf + off);
			int v = atoi(d->d_name);
			for (int i = 0; i < nwant; i++)
				if (want[i] == v && d->d_name[0] >= '0' && d->d_name[0] <= '9') seen[i] = 1;
			off += d->d_reclen;
		}
	}
	for (int i = 0; i < nwant; i++) if (!seen[i]) fail("fd dir does not list fd %d", want[i]);
}

static void verify(void)
{
	fails[0] = 0;
	long me = fresh_pid();
	if (me <= 0) fail("fresh /proc/self/stat");
	if (slurp(fstat_, a, sizeof(a)) <= 0) fail("read stat: %s", strerror(errno));
	else {
		if (pid_field(a) != me) fail("stat names pid %ld, /proc/self is %ld", pid_field(a), me);
		if (!strstr(a, "(" NAME ")")) fail("stat comm: %.40s", a);
	}
	if (slurp(fthr, a, sizeof(a)) <= 0 || pid_field(a) != me) fail("thread-self stat: %.30s", a);
	char want[64];
	snprintf(want, sizeof(want), "%lx-", (unsigned long)mark);
	int f = open("/proc/self/maps", O_RDONLY);
	ssize_t na = slurp(fmaps, a, sizeof(a)), nb = f < 0 ? -1 : slurp(f, b, sizeof(b));
	if (f >= 0) close(f);
	if (na <= 0 || nb <= 0) fail("read maps");
	else {
		if (!strstr(a, want)) fail("maps has no %s", want);
		if (na != nb || memcmp(a, b, na)) fail("maps differs from a fresh read (%zd/%zd bytes)", na, nb);
	}
	int fds[] = { fstat_, fmaps, fdir, fstatus, fthr };
	check_dir(fdir, fds, 5);
	char c[2] = { 0 };
	off_t at = lseek(fstatus, 0, SEEK_CUR);
	if (at != 5) fail("status at offset %ld, want 5", (long)at);
	if (read(fstatus, c, 1) != 1 || c[0] != '\t') fail("status after \"Name:\": %02x", c[0]);
	lseek(fstatus, 5, SEEK_SET);
	snprintf(want, sizeof(want), "\nPid:\t%ld\n", me);
	if (slurp(fstatus, a, sizeof(a)) <= 0 || !strstr(a, want)) fail("status has no Pid %ld", me);
	if (fchild >= 0) {
		snprintf(want, sizeof(want), "\nPPid:\t%ld\n", me);
		if (slurp(fchild, a, sizeof(a)) <= 0) fail("read child status: %s", strerror(errno));
		else if (!strstr(a, want) || !strstr(a, "Name:\t" NAME)) fail("child status: no PPid %ld", me);
	}
	if (fails[0]) printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 2) { fprintf(stderr, "usage: " NAME " self|tree|outside\n"); return 2; }
	char p[64];
	signal(SIGUSR1, on_usr1);
	if (!strcmp(argv[1], "outside")) {
		if ((fout = open("/proc/1/stat", O_RDONLY)) < 0) die("/proc/1/stat");
		printf("READY pid=%d fd=%d\n", getpid(), fout);
	} else {
		pid_t child = 0;
		if (!strcmp(argv[1], "tree")) {
			child = fork();
			if (child < 0) die("fork");
			if (child == 0) {
				prctl(PR_SET_PDEATHSIG, SIGKILL);
				for (;;) pause();
			}
		}
		mark = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (mark == MAP_FAILED) die("mmap");
		snprintf(p, sizeof(p), "/proc/%d/stat", getpid());
		if ((fstat_ = open(p, O_RDONLY)) < 0) die(p);
		if ((fmaps = open("/proc/self/maps", O_RDONLY | O_CLOEXEC)) < 0) die("maps");
		snprintf(p, sizeof(p), "/proc/%d/fd", getpid());
		if ((fdir = open(p, O_RDONLY | O_DIRECTORY)) < 0) die(p);
		if ((fstatus = open("/proc/self/status", O_RDONLY)) < 0) die("status");
		char five[5];
		if (read(fstatus, five, 5) != 5 || memcmp(five, "Name:", 5)) die("status head");
		if ((fthr = open("/proc/thread-self/stat", O_RDONLY)) < 0) die("thread-self");
		if (child) {
			snprintf(p, sizeof(p), "/proc/%d/status", child);
			if ((fchild = open(p, O_RDONLY)) < 0) die(p);
			printf("READY pid=%d child=%d\n", getpid(), child);
		} else
			printf("READY pid=%d\n", getpid());
	}
	struct timespec ts = { 0, 1000000 };
	for (;;) {
		if (probe_req) { probe_req = 0; if (fout < 0) verify(); else { printf("PASS " NAME " pid=%d\n", getpid()); fflush(stdout); } }
		nanosleep(&ts, NULL);
	}
}
