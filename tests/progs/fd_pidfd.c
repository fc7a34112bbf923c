/*
 * fd_pidfd -- pidfds of children: one from pidfd_open (A), one from
 * clone3(CLONE_PIDFD) (B), one (O_NONBLOCK) of a child C that has exited
 * and been reaped.
 *
 * A and B answer SIGUSR2 by writing their letter into a pipe to the parent.
 * The probe: pidfd_send_signal through pa/pb must reach A/B (the letter
 * comes back); pc polls readable, says ESRCH to a signal and is
 * O_NONBLOCK.  If A has exited meanwhile (the test kills it), pa must poll
 * readable and waitid(P_PIDFD) must give A's status (killed by SIGKILL):
 * "PASS fd_pidfd a=dead"; else "PASS fd_pidfd a=alive".
 * Prints "READY pid=P a=A b=B"; on SIGUSR1 PASS/FAIL lines.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NAME "fd_pidfd"
#include "probe.h"

#ifndef PIDFD_NONBLOCK
#define PIDFD_NONBLOCK O_NONBLOCK
#endif
#ifndef P_PIDFD
#define P_PIDFD 3
#endif

static void die(const char *what) { fprintf(stderr, NAME ": %s: %s\n", what, strerror(errno)); exit(1); }

static int sig_pipe[2];
static char letter;
static void on_usr2(int s) { (void)s; if (write(sig_pipe[1], &letter, 1) != 1) _exit(3); }

static void child(char c)
{
	letter = c;
	signal(SIGUSR2, on_usr2);
	for (;;) pause();
}

static int pidfd_send(int fd, int sig) { return syscall(SYS_pidfd_send_signal, fd, sig, NULL, 0); }

static int pa, pb, pc, a_dead;

static int readable(int fd)
{
	struct pollfd p = { fd, POLLIN, 0 };
	return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

static void reaches(int fd, char want, const char *what)
{
	if (pidfd_send(fd, SIGUSR2)) { fail("pidfd_send_signal(%s): %s", what, strerror(errno)); return; }
	char c = 0;
	struct pollfd p = { sig_pipe[0], POLLIN, 0 };
	if (poll(&p, 1, 10000) != 1 || read(sig_pipe[0], &c, 1) != 1) fail("%s: no answer to SIGUSR2", what);
	else if (c != want) fail("%s reached %c, want %c", what, c, want);
}

static void verify(void)
{
	fails[0] = 0;
	if (!a_dead && readable(pa)) {
		siginfo_t si;
		memset(&si, 0, sizeof(si));
		if (waitid(P_PIDFD, pa, &si, WEXITED | WNOHANG)) fail("waitid(pa): %s", strerror(errno));
		else if (si.si_code != CLD_KILLED || si.si_status != SIGKILL) fail("A: code %d status %d", si.si_code, si.si_status);
		else a_dead = 1;
	}
	if (!a_dead) reaches(pa, 'A', "pa");
	else if (pidfd_send(pa, 0) == 0 || errno != ESRCH) fail("pa of the reaped A: signal did not fail with ESRCH");
	if (readable(pb)) fail("pb polls readable while B lives");
	reaches(pb, 'B', "pb");
	if (!readable(pc)) fail("pc (exited C) does not poll readable");
	if (pidfd_send(pc, 0) == 0 || errno != ESRCH) fail("pc: signal to the exited C did not fail with ESRCH");
	if (!(fcntl(pc, F_GETFL) & O_NONBLOCK)) fail("pc lost O_NONBLOCK");
	if (fcntl(pa, F_GETFL) & O_NONBLOCK) fail("pa became O_NONBLOCK");
	if (!(fcntl(pb, F_GETFD) & FD_CLOEXEC)) fail("pb lost close-on-exec");
	if (fails[0]) printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else printf("PASS " NAME " a=%s pid=%d\n", a_dead ? "dead" : "alive", getpid());
	fflush(stdout);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (pipe(sig_pipe)) die("pipe");
	pid_t a = fork();
	if (a < 0) die("fork");
	if (a == 0) child('A');
	pa = syscall(SYS_pidfd_open, a, 0);
	if (pa < 0) die("pidfd_open A");

	struct clone_args ca;
	memset(&ca, 0, sizeof(ca));
	ca.flags = CLONE_PIDFD;
	ca.pidfd = (uint64_t)(uintptr_t)&pb;
	ca.exit_signal = SIGCHLD;
	long b = syscall(SYS_clone3, &ca, sizeof(ca));
	if (b < 0) die("clone3");
	if (b == 0) child('B');

	pid_t c = fork();
	if (c == 0) _exit(7);
	pc = syscall(SYS_pidfd_open, c, PIDFD_NONBLOCK);
	if (pc < 0) die("pidfd_open C");
	if (waitpid(c, NULL, 0) != c) die("waitpid C");

	signal(SIGUSR1, on_usr1);
	printf("READY pid=%d a=%d b=%ld\n", getpid(), a, b);
	struct timespec ts = { 0, 1000000 };
	for (;;) {
		if (probe_req) { probe_req = 0; verify(); }
		nanosleep(&ts, NULL);
	}
}
