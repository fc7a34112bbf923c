/*
 * roll_locks -- file locks a rollback must give back
 * (tests/test_rollback_ident.py).
 *
 *   roll_locks DIR
 *
 * Holds: flock(LOCK_EX) on DIR/a, a POSIX F_WRLCK on bytes 0-9 of DIR/b,
 * an OFD F_WRLCK on bytes 0-4 of DIR/c; DIR/d open, unlocked.  Prints
 * "READY pid=P".
 * SIGUSR2 (change): releases the flock on a, takes one on d, releases the
 * POSIX lock on b and takes bytes 20-29 instead, makes the OFD lock on c a
 * read lock; prints "CHANGED pid=P".
 * SIGUSR1: asks a checker (forked: another lock owner) whether a, b (0-9)
 * and c are locked and d is not: "PASS roll_locks pid=P" or
 * "FAIL roll_locks: ... (pid=P)".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>
#include "probe.h"

static volatile sig_atomic_t change_req;
static void on_usr2(int s) { (void)s; change_req = 1; }
static char dir[4000];

static int open_in(const char *name)
{
	char p[4096];
	snprintf(p, sizeof p, "%s/%s", dir, name);
	int fd = open(p, O_RDWR | O_CREAT, 0644);
	if (fd < 0) { perror(p); _exit(1); }
	return fd;
}

static int range(int fd, int cmd, short type, off_t start, off_t len)
{
	struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len };
	return fcntl(fd, cmd, &fl);
}

/* in a fresh process with fresh opens: what is locked */
static void check(void)
{
	int a = open_in("a"), b = open_in("b"), c = open_in("c"), d = open_in("d");
	if (flock(a, LOCK_EX | LOCK_NB) == 0) fail("a is not flocked");
	if (flock(d, LOCK_EX | LOCK_NB) != 0) fail("d is flocked");
	struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 10 };
	if (fcntl(b, F_GETLK, &fl) || fl.l_type != F_WRLCK || fl.l_start != 0 || fl.l_len != 10)
		fail("b 0-9 is not write-locked (type %d %ld+%ld)", fl.l_type, (long)fl.l_start, (long)fl.l_len);
	struct flock f2 = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 10, .l_len = 0 };
	if (fcntl(b, F_GETLK, &f2) || f2.l_type != F_UNLCK) fail("b from 10 is locked");
	struct flock f3 = { .l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 5 };
	if (fcntl(c, F_OFD_GETLK, &f3) || f3.l_type != F_WRLCK) fail("c 0-4 is not write-locked (type %d)", f3.l_type);
	printf("%s", fails[0] ? fails : "");
}

int main(int argc, char **argv)
{
	if (argc != 2) return 2;
	setvbuf(stdout, NULL, _IOLBF, 0);
	snprintf(dir, sizeof dir, "%s", argv[1]);
	signal(SIGUSR1, on_usr1);
	signal(SIGUSR2, on_usr2);
	int a = open_in("a"), b = open_in("b"), c = open_in("c"), d = open_in("d");
	if (flock(a, LOCK_EX | LOCK_NB)) perror("flock a");
	if (range(b, F_SETLK, F_WRLCK, 0, 10)) perror("lock b");
	if (range(c, F_OFD_SETLK, F_WRLCK, 0, 5)) perror("lock c");
	printf("READY pid=%d\n", getpid());
	for (;;) {
		sigset_t all, old;
		sigfillset(&all);
		sigprocmask(SIG_BLOCK, &all, &old);
		if (probe_req) {
			probe_req = 0;
			int pfd[2];
			char buf[8192] = "";
			if (pipe(pfd)) { perror("pipe"); _exit(1); }
			pid_t k = fork();
			if (k == 0) {
				dup2(pfd[1], 1);
				check();
				fflush(stdout);
				_exit(0);
			}
			close(pfd[1]);
			ssize_t n, got = 0;
			while ((n = read(pfd[0], buf + got, sizeof buf - 1 - got)) > 0) got += n;
			close(pfd[0]);
			waitpid(k, NULL, 0);
			if (got) printf("FAIL roll_locks: %s (pid=%d)\n", buf, getpid());
			else printf("PASS roll_locks pid=%d\n", getpid());
		}
		if (change_req) {
			change_req = 0;
			flock(a, LOCK_UN);
			if (flock(d, LOCK_EX | LOCK_NB)) perror("flock d");
			range(b, F_SETLK, F_UNLCK, 0, 10);
			if (range(b, F_SETLK, F_WRLCK, 20, 10)) perror("lock b 20");
			if (range(c, F_OFD_SETLK, F_RDLCK, 0, 5)) perror("relock c");
			printf("CHANGED pid=%d\n", getpid());
		}
		sigprocmask(SIG_SETMASK, &old, NULL);
		usleep(1000);
	}
}
