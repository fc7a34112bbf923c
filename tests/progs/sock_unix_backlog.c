/*
 * sock_unix_backlog -- a listener with connections not accepted yet.
 *
 *   sock_unix_backlog DIR [data]
 *
 * ls: stream listener bound to DIR/l; c1 (unbound) then c2 (bound to the
 * abstract name @lcr-backlog-PID) connect()ed to it, not accepted.
 * With "data", c2 has also sent bytes (lcr refuses that state: the bytes sit
 * in a socket only accept() reaches).
 * The probe accepts both, in order (c1's first, then the one from c2's name),
 * checks that bytes go both ways on each, closes them and queues two
 * new clients the same way.
 * Prints "READY pid=P"; on SIGUSR1 "PASS sock_unix_backlog pid=P" or FAIL.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define NAME "sock_unix_backlog"
#include "probe.h"

static void die(const char *w) { fprintf(stderr, NAME ": %s: %s\n", w, strerror(errno)); exit(1); }

static int ls, c1, c2, with_data;
static struct sockaddr_un a_ls, a_c2;
static socklen_t l_c2;

static void clients(void)
{
	if ((c1 = socket(AF_UNIX, SOCK_STREAM, 0)) < 0 || connect(c1, (void *)&a_ls, sizeof(a_ls))) die("c1");
	if ((c2 = socket(AF_UNIX, SOCK_STREAM, 0)) < 0 || bind(c2, (void *)&a_c2, l_c2) ||
	    connect(c2, (void *)&a_ls, sizeof(a_ls))) die("c2");
	if (with_data && send(c2, "early", 5, 0) != 5) die("early");
}

static void talk(int a, int c, const char *what)
{
	char b = 0;
	if (send(c, "x", 1, MSG_NOSIGNAL) != 1 || recv(a, &b, 1, MSG_DONTWAIT) != 1 || b != 'x') fail("%s: client to server", what);
	if (send(a, "y", 1, MSG_NOSIGNAL) != 1 || recv(c, &b, 1, MSG_DONTWAIT) != 1 || b != 'y') fail("%s: server to client", what);
}

static void verify(void)
{
	struct sockaddr_un p;
	socklen_t l = sizeof(p);
	fails[0] = 0;
	int a1 = accept4(ls, (void *)&p, &l, SOCK_NONBLOCK);
	if (a1 < 0) fail("accept 1: %s", strerror(errno));
	else if (l != sizeof(sa_family_t)) fail("first connection is from a named socket");
	l = sizeof(p);
	int a2 = accept4(ls, (void *)&p, &l, SOCK_NONBLOCK);
	if (a2 < 0) fail("accept 2: %s", strerror(errno));
	else if (l != l_c2 || memcmp(&p, &a_c2, l_c2)) fail("second connection is not from @lcr-backlog");
	if (a1 >= 0) talk(a1, c1, "c1");
	if (a2 >= 0) talk(a2, c2, "c2");
	int a3 = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
	if (a3 >= 0 || errno != EAGAIN) fail("a third connection was waiting");
	close(a1); close(a2); close(c1); close(c2);
	clients();
	if (fails[0]) printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2) return 2;
	with_data = argc > 2 && !strcmp(argv[2], "data");
	memset(&a_ls, 0, sizeof(a_ls));
	a_ls.sun_family = AF_UNIX;
	snprintf(a_ls.sun_path, sizeof(a_ls.sun_path), "%.90s/l", argv[1]);
	unlink(a_ls.sun_path);
	memset(&a_c2, 0, sizeof(a_c2));
	a_c2.sun_family = AF_UNIX;
	l_c2 = offsetof(struct sockaddr_un, sun_path) + 1 +
	       snprintf(a_c2.sun_path + 1, sizeof(a_c2.sun_path) - 1, "lcr-backlog-%d", getpid());
	if ((ls = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0)) < 0 || bind(ls, (void *)&a_ls, sizeof(a_ls)) || listen(ls, 4)) die("ls");
	clients();
	signal(SIGUSR1, on_usr1);
	printf("READY pid=%d\n", getpid());
	struct timespec ts = { 0, 1000000 };
	for (;;) {
		if (probe_req) { probe_req = 0; verify(); }
		nanosleep(&ts, NULL);
	}
}
