/*
 * tree_badchild -- a parent with two children, one of which holds a file
 * lcr can never save: `lcr check` of the parent must name that child.
 *
 *   tree_badchild
 *
 * The "bad" child opens an io_uring instance (io_uring_setup), or if the
 * kernel refuses that, a userfaultfd, keeps it open and sleeps; the "good"
 * child and the parent hold nothing unusual.  The children exit when their
 * parent is gone.  Prints "READY pid=P bad=B good=G kind=K fd=N" (K:
 * io_uring or userfaultfd, N: its fd in B); on SIGUSR1 the parent prints
 * "PASS tree_badchild pid=P" if both children are alive, else FAIL.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/io_uring.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NAME "tree_badchild"

static volatile sig_atomic_t probe_req;
static void on_usr1(int sig) { (void)sig; probe_req = 1; }

static void idle(pid_t parent)
{
	struct timespec ts = { 0, 20000000 };
	while (getppid() == parent)
		nanosleep(&ts, NULL);
	_exit(0);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	int rep[2];
	if (pipe(rep)) { perror("pipe"); return 1; }
	pid_t me = getpid();
	pid_t bad = fork();
	if (bad == 0) {
		signal(SIGUSR1, SIG_IGN);
		struct io_uring_params p;
		memset(&p, 0, sizeof(p));
		int fd = (int)syscall(SYS_io_uring_setup, 4, &p);
		int kind = 0;
		if (fd < 0) {
			fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY);
			kind = 1;
		}
		if (fd < 0) { perror("io_uring_setup and userfaultfd"); _exit(1); }
		int msg[2] = { fd, kind };
		if (write(rep[1], msg, sizeof(msg)) != sizeof(msg))
			_exit(1);
		close(rep[0]);
		close(rep[1]);
		idle(me);
	}
	pid_t good = fork();
	if (good == 0) {
		signal(SIGUSR1, SIG_IGN);
		close(rep[0]);
		close(rep[1]);
		idle(me);
	}
	int msg[2];
	if (read(rep[0], msg, sizeof(msg)) != sizeof(msg)) { fprintf(stderr, "bad child failed\n"); return 1; }
	close(rep[0]);
	close(rep[1]);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	printf("READY pid=%d bad=%d good=%d kind=%s fd=%d\n", me, bad, good,
	       msg[1] ? "userfaultfd" : "io_uring", msg[0]);
	for (;;) {
		if (probe_req) {
			probe_req = 0;
			int st;
			if (waitpid(bad, &st, WNOHANG) == 0 && waitpid(good, &st, WNOHANG) == 0)
				printf("PASS " NAME " pid=%d bad=%d good=%d\n", me, bad, good);
			else
				printf("FAIL " NAME ": a child is gone (pid=%d)\n", me);
		}
		struct timespec ts = { 0, 5000000 };
		nanosleep(&ts, NULL);
	}
}
