/*
 * files -- open file descriptors of every simple kind.
 *
 *   files READFILE APPENDFILE RDWRFILE DIR
 *
 * READFILE  must hold the pattern byte(i) = (i * 131 + 7) % 251 (the test
 *           writes it); opened O_RDONLY and positioned mid-file at READ_OFF.
 *           fd 100 is a dup2() of it: both share one open file description
 *           (one offset), which the probe checks.
 * APPENDFILE opened O_WRONLY|O_APPEND; each probe appends a line and checks
 *           it landed at the end.
 * RDWRFILE  opened O_RDWR, positioned at RDWR_OFF; each probe writes a
 *           record at the current offset and reads it back with pread.
 * DIR       opened O_RDONLY|O_DIRECTORY, and also the cwd (chdir).
 * Plus /dev/null (O_WRONLY), /dev/zero (O_RDONLY, close-on-exec) and
 * /dev/urandom (O_RDONLY).
 *
 * Prints "READY pid=P"; on SIGUSR1 prints "PASS files pid=P" or
 * "FAIL files: <details> (pid=P)".
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
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#define NAME "files"
#define READ_OFF 12345L
#define RDWR_OFF 4000L
#define HIGH_FD 100
#define CHUNK 100

#include "probe.h"

static unsigned char pattern(long i) { return (unsigned char)((i * 131 + 7) % 251); }

enum { F_READ, F_HIGH, F_APPEND, F_RDWR, F_DIR, F_NULL, F_ZERO, F_URANDOM, NFD };
static const char *fdname[NFD] = {
	"read", "high(dup of read)", "append", "rdwr", "dir", "/dev/null",
	"/dev/zero", "/dev/urandom",
};
static int fds[NFD];
#define MAX_FD 1024
static char open0[MAX_FD];             /* which fds were open at READY */
static int fl_getfd[NFD], fl_getfl[NFD];
static struct stat st0[NFD];

static const char *append_path, *rdwr_path, *dir_path;
static char cwd0[PATH_MAX];
static long read_pos = READ_OFF;        /* expected offset of READFILE */
static long rdwr_pos = RDWR_OFF;        /* expected offset of RDWRFILE */
static off_t append_size;               /* expected size of APPENDFILE */
static int nprobe;

static void check_read_chunk(int fd, const char *which)
{
	unsigned char got[CHUNK];
	ssize_t n = read(fd, got, CHUNK);
	if (n != CHUNK) {
		fail("read(%s) returned %zd: %s", which, n, n < 0 ? strerror(errno) : "short");
		return;
	}
	for (int i = 0; i < CHUNK; i++)
		if (got[i] != pattern(read_pos + i)) {
			fail("read(%s) at offset %ld: byte %d is %u, want %u (wrong offset?)",
			     which, read_pos, i, got[i], pattern(read_pos + i));
			break;
		}
	read_pos += CHUNK;
}

static void verify(void)
{
	fails[0] = 0;
	nprobe++;

	/* flags, close-on-exec, identity of every fd */
	for (int k = 0; k < NFD; k++) {
		int fd = fds[k], v;
		struct stat st;
		if ((v = fcntl(fd, F_GETFD)) != fl_getfd[k])
			fail("fd %d (%s): F_GETFD %d, want %d", fd, fdname[k], v, fl_getfd[k]);
		if ((v = fcntl(fd, F_GETFL)) != fl_getfl[k])
			fail("fd %d (%s): F_GETFL %#o, want %#o", fd, fdname[k], v, fl_getfl[k]);
		if (fstat(fd, &st)) {
			fail("fd %d (%s): fstat: %s", fd, fdname[k], strerror(errno));
			continue;
		}
		if ((st.st_mode & S_IFMT) != (st0[k].st_mode & S_IFMT) ||
		    st.st_ino != st0[k].st_ino || st.st_dev != st0[k].st_dev ||
		    st.st_rdev != st0[k].st_rdev)
			fail("fd %d (%s): now another file (ino %lu dev %lu rdev %lu, was %lu %lu %lu)",
			     fd, fdname[k], (unsigned long)st.st_ino, (unsigned long)st.st_dev,
			     (unsigned long)st.st_rdev, (unsigned long)st0[k].st_ino,
			     (unsigned long)st0[k].st_dev, (unsigned long)st0[k].st_rdev);
	}

	/* READFILE: offset kept, shared with fd 100 */
	off_t o = lseek(fds[F_READ], 0, SEEK_CUR);
	if (o != read_pos)
		fail("read fd offset %ld, want %ld", (long)o, read_pos);
	read_pos = o;                 /* go on from where it is: one report */
	check_read_chunk(fds[F_READ], "read fd");
	o = lseek(fds[F_HIGH], 0, SEEK_CUR);
	if (o != read_pos)
		fail("fd %d offset %ld, want %ld: not sharing the open file with fd %d",
		     HIGH_FD, (long)o, read_pos, fds[F_READ]);
	read_pos = lseek(fds[F_HIGH], 0, SEEK_CUR);
	check_read_chunk(fds[F_HIGH], "fd 100");
	if ((o = lseek(fds[F_READ], 0, SEEK_CUR)) != read_pos)
		fail("read through fd %d did not move fd %d: offset %ld, want %ld",
		     HIGH_FD, fds[F_READ], (long)o, read_pos);

	/* APPENDFILE: size unchanged since last probe, new line lands at end */
	struct stat st;
	fstat(fds[F_APPEND], &st);
	if (st.st_size != append_size)
		fail("append file size %ld, want %ld", (long)st.st_size, (long)append_size);
	char line[64];
	int len = snprintf(line, sizeof(line), "probe %d pid %d\n", nprobe, getpid());
	if (write(fds[F_APPEND], line, len) != len)
		fail("append write: %s", strerror(errno));
	fstat(fds[F_APPEND], &st);
	if (st.st_size != append_size + len)
		fail("append file grew to %ld, want %ld", (long)st.st_size,
		     (long)(append_size + len));
	append_size = st.st_size;
	int rfd = open(append_path, O_RDONLY);
	char tail[64] = "";
	if (rfd < 0 || pread(rfd, tail, len, st.st_size - len) != len ||
	    memcmp(tail, line, len))
		fail("appended line not at the end of %s", append_path);
	if (rfd >= 0)
		close(rfd);

	/* RDWRFILE: offset kept, write + read back */
	o = lseek(fds[F_RDWR], 0, SEEK_CUR);
	if (o != rdwr_pos)
		fail("rdwr fd offset %ld, want %ld", (long)o, rdwr_pos);
	char rec[64], back[64];
	int rl = snprintf(rec, sizeof(rec), "[probe %d pid %d]", nprobe, getpid());
	if (write(fds[F_RDWR], rec, rl) != rl)
		fail("rdwr write: %s", strerror(errno));
	if (pread(fds[F_RDWR], back, rl, o) != rl || memcmp(rec, back, rl))
		fail("rdwr pread did not give back the record");
	rdwr_pos = o + rl;

	/* directory fd and cwd */
	char cwd[PATH_MAX];
	if (!getcwd(cwd, sizeof(cwd)))
		fail("getcwd: %s", strerror(errno));
	else if (strcmp(cwd, cwd0))
		fail("cwd is %s, want %s", cwd, cwd0);
	struct stat cs;
	if (stat(".", &cs) || cs.st_ino != st0[F_DIR].st_ino)
		fail("cwd is not the directory of the dir fd");
	int rel = openat(fds[F_DIR], ".", O_RDONLY | O_DIRECTORY);
	if (rel < 0)
		fail("openat(dirfd, \".\"): %s", strerror(errno));
	else
		close(rel);

	/* devices */
	if (write(fds[F_NULL], "x", 1) != 1)
		fail("write /dev/null: %s", strerror(errno));
	unsigned char z[64];
	memset(z, 0xff, sizeof(z));
	if (read(fds[F_ZERO], z, sizeof(z)) != sizeof(z))
		fail("read /dev/zero: %s", strerror(errno));
	for (size_t i = 0; i < sizeof(z); i++)
		if (z[i]) { fail("/dev/zero gave a non-zero byte"); break; }
	if (read(fds[F_URANDOM], z, 16) != 16)
		fail("read /dev/urandom: %s", strerror(errno));

	/* exactly the fds we had at READY are open: none lost, none added */
	for (int fd = 0; fd < MAX_FD; fd++) {
		int open_now = fcntl(fd, F_GETFD) != -1;
		if (open_now != open0[fd])
			fail("fd %d is %s", fd, open_now ? "open but was not" : "closed but was open");
	}

	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

static int xopen(const char *path, int flags)
{
	int fd = open(path, flags);
	if (fd < 0) { fprintf(stderr, "open %s: %s\n", path, strerror(errno)); exit(1); }
	return fd;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 5) {
		fprintf(stderr, "usage: files READFILE APPENDFILE RDWRFILE DIR\n");
		return 2;
	}
	append_path = argv[2];
	rdwr_path = argv[3];
	dir_path = argv[4];

	fds[F_READ] = xopen(argv[1], O_RDONLY);
	if (lseek(fds[F_READ], READ_OFF, SEEK_SET) != READ_OFF) { perror("lseek"); return 1; }
	if (dup2(fds[F_READ], HIGH_FD) != HIGH_FD) { perror("dup2"); return 1; }
	fds[F_HIGH] = HIGH_FD;
	fds[F_APPEND] = xopen(append_path, O_WRONLY | O_APPEND);
	fds[F_RDWR] = xopen(rdwr_path, O_RDWR);
	if (lseek(fds[F_RDWR], RDWR_OFF, SEEK_SET) != RDWR_OFF) { perror("lseek"); return 1; }
	fds[F_DIR] = xopen(dir_path, O_RDONLY | O_DIRECTORY);
	fds[F_NULL] = xopen("/dev/null", O_WRONLY);
	fds[F_ZERO] = xopen("/dev/zero", O_RDONLY | O_CLOEXEC);
	fds[F_URANDOM] = xopen("/dev/urandom", O_RDONLY);
	if (chdir(dir_path)) { perror("chdir"); return 1; }
	if (!getcwd(cwd0, sizeof(cwd0))) { perror("getcwd"); return 1; }

	for (int fd = 0; fd < MAX_FD; fd++)
		open0[fd] = fcntl(fd, F_GETFD) != -1;
	for (int k = 0; k < NFD; k++) {
		fl_getfd[k] = fcntl(fds[k], F_GETFD);
		fl_getfl[k] = fcntl(fds[k], F_GETFL);
		fstat(fds[k], &st0[k]);
	}
	/* sanity of what was set up (a wrong start is a test bug, not a C/R bug) */
	if (!(fl_getfd[F_ZERO] & FD_CLOEXEC) || (fl_getfd[F_NULL] & FD_CLOEXEC) ||
	    !(fl_getfl[F_APPEND] & O_APPEND) || (fl_getfl[F_RDWR] & O_ACCMODE) != O_RDWR ||
	    !S_ISDIR(st0[F_DIR].st_mode) || st0[F_NULL].st_rdev != makedev(1, 3) ||
	    st0[F_ZERO].st_rdev != makedev(1, 5) || st0[F_URANDOM].st_rdev != makedev(1, 9)) {
		fprintf(stderr, "files: unexpected initial state\n");
		return 1;
	}
	append_size = st0[F_APPEND].st_size;

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);

	printf("READY pid=%d\n", getpid());
	fflush(stdout);

	struct timespec ts = { 0, 1000000 };
	for (;;) {
		if (probe_req) {
			probe_req = 0;
			verify();
		}
		nanosleep(&ts, NULL);
	}
}
