/*
 * fd_fown -- owners and signals of open files, and a lease.
 *
 *   fd_fown FILE [outside]   (FILE: a file of ours to take a read lease on)
 *
 * Holds: a pipe whose read end is O_ASYNC, owned by this process
 * (F_SETOWN, plain SIGIO); a socket pair whose end is O_ASYNC, owned by
 * this thread (F_SETOWN_EX F_OWNER_TID) with F_SETSIG SIGRTMIN+1; FILE
 * opened read-only with a read lease (F_SETLEASE F_RDLCK) and F_SETSIG
 * SIGRTMIN+2.  Signals are blocked and taken with sigtimedwait.
 * The probe checks F_GETOWN_EX, F_GETSIG, O_ASYNC and F_GETLEASE of each,
 * then writes into the pipe (SIGIO must come), into the socket (SIGRTMIN+1
 * with si_fd and POLL_IN must come), and has a child try to open FILE for
 * writing (the lease breaks: SIGRTMIN+2 with si_fd must come, then the
 * lease is given up and taken again).
 * outside: the pipe (fd 3) is owned by the parent instead, with SIGWINCH
 * (refused; the probe is not used).
 * Prints "READY pid=P"; on SIGUSR1 "PASS fd_fown pid=P" or "FAIL fd_fown: ...".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NAME "fd_fown"
#include "probe.h"

static void die(const char *what) { fprintf(stderr, NAME ": %s: %s\n", what, strerror(errno)); exit(1); }

static const char *file;
static int pr, pw, s0, s1, lf;
static sigset_t waited;

static void owner(int fd, int type, const char *what)
{
	struct f_owner_ex o;
	if (fcntl(fd, F_GETOWN_EX, &o)) { fail("%s: F_GETOWN_EX: %s", what, strerror(errno)); return; }
	pid_t want = type == F_OWNER_TID ? gettid() : getpid();
	if ((int)o.type != type || o.pid != want) fail("%s: owner type %d pid %d, want %d %d", what, o.type, o.pid, type, want);
}

static void async(int fd, int want, const char *what)
{
	int fl = fcntl(fd, F_GETFL);
	if (!!(fl & O_ASYNC) != want) fail("%s: O_ASYNC %s", what, want ? "lost" : "appeared");
}

static int wait_sig(int sig, int fd, const char *what)
{
	struct timespec to = { 5, 0 };
	siginfo_t si;
	sigset_t one;
	sigemptyset(&one);
	sigaddset(&one, sig);
	int got = sigtimedwait(&one, &si, &to);
	if (got != sig) { fail("%s: signal %d did not come: %s", what, sig, strerror(errno)); return -1; }
	if (fd >= 0 && si.si_fd != fd) fail("%s: si_fd %d, want %d", what, si.si_fd, fd);
	return si.si_code;
}

static void drain(void)
{
	struct timespec zero = { 0, 0 };
	while (sigtimedwait(&waited, NULL, &zero) > 0) ;
}

static void verify(void)
{
	fails[0] = 0;
	drain();
	owner(pr, F_OWNER_PID, "pipe");
	owner(s0, F_OWNER_TID, "socket");
	owner(lf, F_OWNER_PID, "leased file");
	async(pr, 1, "pipe");
	async(s0, 1, "socket");
	async(lf, 1, "leased file");   /* F_SETLEASE sets O_ASYNC */
	if (fcntl(pr, F_GETSIG) != 0) fail("pipe: F_GETSIG %d", fcntl(pr, F_GETSIG));
	if (fcntl(s0, F_GETSIG) != SIGRTMIN + 1) fail("socket: F_GETSIG %d", fcntl(s0, F_GETSIG));
	if (fcntl(lf, F_GETSIG) != SIGRTMIN + 2) fail("file: F_GETSIG %d", fcntl(lf, F_GETSIG));
	if (fcntl(lf, F_GETLEASE) != F_RDLCK) fail("lease: F_GETLEASE %d", fcntl(lf, F_GETLEASE));
	char c;
	if (write(pw, "x", 1) != 1) fail("write pipe");
	wait_sig(SIGIO, -1, "pipe");
	if (read(pr, &c, 1) != 1) fail("read pipe");
	if (write(s1, "y", 1) != 1) fail("write socket");
	if (wait_sig(SIGRTMIN + 1, s0, "socket") != POLL_IN) fail("socket: si_code not POLL_IN");
	if (read(s0, &c, 1) != 1) fail("read socket");
	pid_t k = fork();
	if (k == 0) {
		int w = open(file, O_WRONLY | O_NONBLOCK);
		_exit(w < 0 && errno == EWOULDBLOCK ? 0 : 1);
	}
	int st = 0;
	waitpid(k, &st, 0);
	if (!WIFEXITED(st) || WEXITSTATUS(st)) fail("a writer's open did not meet the lease");
	wait_sig(SIGRTMIN + 2, lf, "lease break");
	if (fcntl(lf, F_SETLEASE, F_UNLCK)) fail("give up the lease: %s", strerror(errno));
	if (fcntl(lf, F_SETLEASE, F_RDLCK)) fail("take the lease again: %s", strerror(errno));
	/* giving a lease up clears the owner and the signal: set them again */
	if (fcntl(lf, F_SETOWN, getpid()) || fcntl(lf, F_SETSIG, SIGRTMIN + 2)) fail("lease owner again");
	drain();
	if (fails[0]) printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2) { fprintf(stderr, "usage: " NAME " FILE [outside]\n"); return 2; }
	file = argv[1];
	sigemptyset(&waited);
	sigaddset(&waited, SIGIO);
	sigaddset(&waited, SIGRTMIN + 1);
	sigaddset(&waited, SIGRTMIN + 2);
	sigprocmask(SIG_BLOCK, &waited, NULL);
	int p[2], s[2];
	if (pipe(p) || socketpair(AF_UNIX, SOCK_STREAM, 0, s)) die("pipe/socketpair");
	pr = p[0]; pw = p[1]; s0 = s[0]; s1 = s[1];
	if (fcntl(pr, F_SETOWN, argc > 2 ? getppid() : getpid()) || fcntl(pr, F_SETFL, fcntl(pr, F_GETFL) | O_ASYNC)) die("pipe owner");
	/* outside: the parent gets SIGWINCH (ignored by default), never a deadly SIGIO */
	if (argc > 2 && fcntl(pr, F_SETSIG, SIGWINCH)) die("pipe signal");
	struct f_owner_ex o = { F_OWNER_TID, gettid() };
	if (fcntl(s0, F_SETOWN_EX, &o) || fcntl(s0, F_SETSIG, SIGRTMIN + 1) ||
	    fcntl(s0, F_SETFL, fcntl(s0, F_GETFL) | O_ASYNC)) die("socket owner");
	if ((lf = open(file, O_RDONLY)) < 0) die(file);
	if (fcntl(lf, F_SETLEASE, F_RDLCK)) {
		printf("SKIP " NAME ": F_SETLEASE: %s\n", strerror(errno));
		return 0;
	}
	if (fcntl(lf, F_SETOWN, getpid()) || fcntl(lf, F_SETSIG, SIGRTMIN + 2)) die("lease owner");
	signal(SIGUSR1, on_usr1);
	printf("READY pid=%d\n", getpid());
	struct timespec ts = { 0, 1000000 };
	for (;;) {
		if (probe_req) { probe_req = 0; verify(); }
		nanosleep(&ts, NULL);
	}
}
