/*
 * sock_unix_tree -- a UNIX stream server and its client in one process
 * tree: the parent listens on a name and echoes every connection; the
 * child connects to that name and keeps sending numbered lines, checking
 * each echo.  Both ends of the accepted connection and the listener are
 * saved together.
 *
 *   sock_unix_tree NAME       a path, or @name for an abstract name
 *
 * Prints "READY pid=P child=C"; the child prints "CHILD n=N" every 100
 * round trips and "FAIL sock_unix_tree ..." on an error.  On SIGUSR1 the
 * parent prints "PASS sock_unix_tree pid=P conns=N accepted=A" if the child
 * is alive and no connection failed, else FAIL.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t probe_req;
static void on_usr1(int sig) { (void)sig; probe_req = 1; }

static socklen_t make_addr(struct sockaddr_un *a, const char *name)
{
	memset(a, 0, sizeof(*a));
	a->sun_family = AF_UNIX;
	size_t n = strlen(name);
	if (name[0] == '@') {
		memcpy(a->sun_path + 1, name + 1, n - 1);
		return (socklen_t)(sizeof(sa_family_t) + n);
	}
	memcpy(a->sun_path, name, n);
	return (socklen_t)(sizeof(sa_family_t) + n + 1);
}

static void child(const char *name)
{
	struct sockaddr_un a;
	socklen_t al = make_addr(&a, name);
	int s = socket(AF_UNIX, SOCK_STREAM, 0);
	if (connect(s, (struct sockaddr *)&a, al)) {
		printf("FAIL sock_unix_tree child: connect: %s\n", strerror(errno));
		_exit(1);
	}
	char out[64], in[64];
	for (long n = 1;; n++) {
		int len = snprintf(out, sizeof(out), "ping %ld\n", n);
		if (write(s, out, (size_t)len) != len) {
			printf("FAIL sock_unix_tree child: write: %s\n", strerror(errno));
			_exit(1);
		}
		int got = 0;
		while (got < len) {
			ssize_t r = read(s, in + got, (size_t)(len - got));
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0) {
				printf("FAIL sock_unix_tree child: read: %s\n", r ? strerror(errno) : "end of stream");
				_exit(1);
			}
			got += (int)r;
		}
		if (memcmp(in, out, (size_t)len)) {
			printf("FAIL sock_unix_tree child: echo of %ld differs\n", n);
			_exit(1);
		}
		if (n % 100 == 0)
			printf("CHILD n=%ld\n", n);
		if (getppid() == 1)
			_exit(0);
		struct timespec ts = {0, 2000000};
		nanosleep(&ts, NULL);
	}
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2) {
		fprintf(stderr, "usage: sock_unix_tree NAME\n");
		return 2;
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	struct sockaddr_un a;
	socklen_t al = make_addr(&a, argv[1]);
	int ls = socket(AF_UNIX, SOCK_STREAM, 0);
	if (bind(ls, (struct sockaddr *)&a, al) || listen(ls, 7)) {
		perror("bind/listen");
		return 1;
	}
	pid_t c = fork();
	if (c == 0) {
		signal(SIGUSR1, SIG_IGN);
		close(ls);
		child(argv[1]);
	}
	printf("READY pid=%d child=%d\n", getpid(), c);
	struct pollfd pf[33];
	int nc = 0, accepted = 0, errors = 0;
	char buf[4096];
	pf[0].fd = ls;
	pf[0].events = POLLIN;
	for (;;) {
		if (probe_req) {
			probe_req = 0;
			if (errors || kill(c, 0))
				printf("FAIL sock_unix_tree pid=%d: errors=%d child %s\n", getpid(), errors,
				       kill(c, 0) ? "gone" : "alive");
			else
				printf("PASS sock_unix_tree pid=%d conns=%d accepted=%d\n", getpid(), nc, accepted);
		}
		int n = poll(pf, (nfds_t)nc + 1, 100);
		if (n < 0)
			continue;
		if (pf[0].revents & POLLIN) {
			int s = accept(ls, NULL, NULL);
			if (s >= 0 && nc < 32) {
				pf[++nc].fd = s;
				pf[nc].events = POLLIN;
				pf[nc].revents = 0;
				accepted++;
			}
		}
		for (int i = 1; i <= nc; i++) {
			if (!pf[i].revents)
				continue;
			ssize_t r = read(pf[i].fd, buf, sizeof(buf));
			if (r < 0 && errno == EINTR)
				continue;
			if (r > 0 && write(pf[i].fd, buf, (size_t)r) == r)
				continue;
			if (r < 0)
				errors++;
			close(pf[i].fd);
			pf[i] = pf[nc--];
			i--;
		}
	}
}
