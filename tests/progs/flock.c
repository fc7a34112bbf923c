/*
 * flock -- file locks of every kind a process can hold.
 *
 *   flock DIR [tree]       locks on files in DIR (created if missing)
 *   flock lease FILE       holds a read lease on FILE (lcr restores it)
 *
 * State set up before READY (DIR mode):
 *   DIR/flock.dat    flock(LOCK_EX), through fd X and a dup of X
 *   DIR/shared.dat   flock(LOCK_SH)
 *   DIR/posix.dat    POSIX F_WRLCK on bytes 10-29, F_RDLCK from 100 to EOF
 *   DIR/ofd.dat      OFD F_WRLCK on bytes 0-4
 *   tree: a child (forked after the locks: it shares flock.dat's open file
 *         description, so the flock) takes a POSIX F_WRLCK on all of
 *         DIR/child.dat and waits.
 *
 * On SIGUSR1 a checker process (forked, fresh opens: another lock owner)
 * tests every lock: flock(LOCK_NB) is refused on flock.dat (and /proc/locks
 * names this pid as its holder), LOCK_SH is granted and LOCK_EX refused on
 * shared.dat, F_GETLK on posix.dat reports exactly the two ranges held by
 * this pid and nothing between, F_OFD_GETLK on ofd.dat the OFD range
 * (l_pid -1), F_GETLK on child.dat the child's lock.
 * Prints "READY pid=P [child=C]", then "PASS flock pid=P" or
 * "FAIL flock: <details> (pid=P)".  Lease mode prints "PASS flock-lease
 * pid=P" while it holds its lease.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NAME "flock"

#include "probe.h"

static const char *dir;
static pid_t child_pid;

static char *path(const char *name)
{
	static char buf[4][4096];
	static int i;
	i = (i + 1) % 4;
	snprintf(buf[i], sizeof(buf[i]), "%s/%s", dir, name);
	return buf[i];
}

static int open_rw(const char *name)
{
	int fd = open(path(name), O_RDWR | O_CREAT, 0644);
	if (fd < 0) { perror(path(name)); exit(1); }
	return fd;
}

static void setlk(int fd, int cmd, short type, off_t start, off_t len)
{
	struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len };
	if (fcntl(fd, cmd, &fl)) { perror("fcntl setlk"); exit(1); }
}

/* --- in the checker ------------------------------------------------------ */

static void getlk(const char *name, int cmd, short type, off_t start, off_t len,
		  short want_type, off_t want_start, off_t want_len, pid_t want_pid)
{
	int fd = open(path(name), O_RDWR);
	struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len };
	if (fd < 0) {
		fail("open %s: %s", name, strerror(errno));
		return;
	}
	if (fcntl(fd, cmd, &fl)) {
		fail("%s GETLK: %s", name, strerror(errno));
	} else if (fl.l_type != want_type) {
		fail("%s [%lld,+%lld): lock type %d, want %d", name, (long long)start,
		     (long long)len, fl.l_type, want_type);
	} else if (want_type != F_UNLCK &&
		   (fl.l_start != want_start || fl.l_len != want_len || fl.l_pid != want_pid)) {
		fail("%s: lock [%lld,+%lld) pid %d, want [%lld,+%lld) pid %d", name,
		     (long long)fl.l_start, (long long)fl.l_len, fl.l_pid,
		     (long long)want_start, (long long)want_len, want_pid);
	}
	close(fd);
}

static void try_flock(const char *name, int op, int want_ok)
{
	int fd = open(path(name), O_RDONLY);
	if (fd < 0) {
		fail("open %s: %s", name, strerror(errno));
		return;
	}
	int r = flock(fd, op | LOCK_NB);
	if (want_ok && r)
		fail("flock(%s, %s) refused: %s", name, op == LOCK_SH ? "LOCK_SH" : "LOCK_EX",
		     strerror(errno));
	if (!want_ok && !r)
		fail("flock(%s, %s) granted: nobody holds it", name,
		     op == LOCK_SH ? "LOCK_SH" : "LOCK_EX");
	if (!want_ok && r && errno != EWOULDBLOCK)
		fail("flock(%s): %s", name, strerror(errno));
	close(fd);   /* releases what we may have got */
}

/* /proc/locks: a FLOCK WRITE line for name's inode, held by pid */
static void proc_locks_flock(const char *name, pid_t pid)
{
	struct stat st;
	char line[512];
	int found = 0;
	if (stat(path(name), &st)) {
		fail("stat %s: %s", name, strerror(errno));
		return;
	}
	FILE *f = fopen("/proc/locks", "r");
	while (f && fgets(line, sizeof(line), f)) {
		char kind[16], mode[16], type[16];
		int p;
		unsigned maj, min;
		unsigned long ino;
		if (strstr(line, "->"))
			continue;
		if (sscanf(line, "%*d: %15s %15s %15s %d %x:%x:%lu", kind, mode, type, &p, &maj,
			   &min, &ino) == 7 && ino == st.st_ino && !strcmp(kind, "FLOCK")) {
			found = 1;
			if (p != pid || strcmp(type, "WRITE"))
				fail("/proc/locks: %s flock %s by pid %d, want WRITE by %d", name,
				     type, p, pid);
		}
	}
	if (f)
		fclose(f);
	if (!found)
		fail("/proc/locks shows no flock on %s", name);
}

static void checker(pid_t holder)
{
	try_flock("flock.dat", LOCK_EX, 0);
	try_flock("flock.dat", LOCK_SH, 0);
	proc_locks_flock("flock.dat", holder);
	try_flock("shared.dat", LOCK_SH, 1);
	try_flock("shared.dat", LOCK_EX, 0);
	getlk("posix.dat", F_GETLK, F_WRLCK, 0, 0, F_WRLCK, 10, 20, holder);
	getlk("posix.dat", F_GETLK, F_WRLCK, 30, 70, F_UNLCK, 0, 0, 0);
	getlk("posix.dat", F_GETLK, F_WRLCK, 200, 1, F_RDLCK, 100, 0, holder);
	getlk("posix.dat", F_GETLK, F_RDLCK, 100, 0, F_UNLCK, 0, 0, 0);
	getlk("ofd.dat", F_OFD_GETLK, F_WRLCK, 0, 1, F_WRLCK, 0, 5, -1);
	getlk("ofd.dat", F_OFD_GETLK, F_WRLCK, 5, 10, F_UNLCK, 0, 0, 0);
	getlk("ofd.dat", F_GETLK, F_RDLCK, 2, 1, F_WRLCK, 0, 5, -1);
	if (child_pid)
		getlk("child.dat", F_GETLK, F_RDLCK, 0, 0, F_WRLCK, 0, 0, child_pid);
}

/* --- in the process -------------------------------------------------------- */

static void verify(void)
{
	int p[2];
	pid_t me = getpid(), c = -1;
	fails[0] = 0;
	if (pipe(p)) {
		fail("pipe: %s", strerror(errno));
	} else if ((c = fork()) < 0) {
		fail("fork: %s", strerror(errno));
		close(p[0]);
		close(p[1]);
	} else if (c == 0) {
		close(p[0]);
		checker(me);
		ssize_t n = write(p[1], fails, strlen(fails));
		(void)n;
		_exit(0);
	} else {
		close(p[1]);
		size_t got = 0;
		ssize_t n;
		while ((n = read(p[0], fails + got, sizeof(fails) - 1 - got)) > 0 ||
		       (n < 0 && errno == EINTR))
			got += n > 0 ? (size_t)n : 0;
		fails[got] = 0;
		close(p[0]);
		int st;
		while (waitpid(c, &st, 0) < 0 && errno == EINTR)
			;
	}
	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	nanosleep(&ts, NULL);
}

static void set_probe_handler(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
}

static int lease_mode(const char *file)
{
	int fd = open(file, O_RDONLY);
	if (fd < 0 || fcntl(fd, F_SETLEASE, F_RDLCK)) { perror("lease"); return 1; }
	printf("READY pid=%d\n", getpid());
	fflush(stdout);
	for (;;) {
		if (probe_req) {
			probe_req = 0;
			int l = fcntl(fd, F_GETLEASE);
			if (l == F_RDLCK)
				printf("PASS flock-lease pid=%d\n", getpid());
			else
				printf("FAIL flock-lease: lease is %d (pid=%d)\n", l, getpid());
			fflush(stdout);
		}
		sleep_ms(1);
	}
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	set_probe_handler();
	if (argc == 3 && !strcmp(argv[1], "lease"))
		return lease_mode(argv[2]);
	if (argc < 2) {
		fprintf(stderr, "usage: flock DIR [tree] | flock lease FILE\n");
		return 2;
	}
	dir = argv[1];

	int fl = open_rw("flock.dat");
	if (flock(fl, LOCK_EX)) { perror("flock"); return 1; }
	if (dup(fl) < 0) { perror("dup"); return 1; }
	int sh = open_rw("shared.dat");
	if (flock(sh, LOCK_SH)) { perror("flock"); return 1; }
	int px = open_rw("posix.dat");
	setlk(px, F_SETLK, F_WRLCK, 10, 20);
	setlk(px, F_SETLK, F_RDLCK, 100, 0);
	int ofd = open_rw("ofd.dat");
	setlk(ofd, F_OFD_SETLK, F_WRLCK, 0, 5);

	if (argc > 2 && !strcmp(argv[2], "tree")) {
		int ready[2];
		if (pipe(ready)) { perror("pipe"); return 1; }
		child_pid = fork();
		if (child_pid == 0) {
			close(ready[0]);
			int cf = open_rw("child.dat");
			setlk(cf, F_SETLK, F_WRLCK, 0, 0);
			if (write(ready[1], "x", 1) != 1)
				_exit(1);
			close(ready[1]);
			pid_t pp = getppid();
			for (;;) {          /* never outlive the parent (tests kill it by pid) */
				sleep(1);
				if (getppid() != pp)
					_exit(0);
			}
		}
		close(ready[1]);
		char x;
		if (read(ready[0], &x, 1) != 1) { fprintf(stderr, "child failed\n"); return 1; }
		close(ready[0]);
		printf("READY pid=%d child=%d\n", getpid(), (int)child_pid);
	} else {
		printf("READY pid=%d\n", getpid());
	}
	fflush(stdout);

	for (;;) {
		if (probe_req) {
			probe_req = 0;
			verify();
		}
		sleep_ms(1);
	}
}
