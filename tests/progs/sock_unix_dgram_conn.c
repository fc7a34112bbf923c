/*
 * sock_unix_dgram_conn -- a /dev/log-style datagram server with clients.
 *
 *   sock_unix_dgram_conn DIR
 *
 * srv: bound to DIR/log, one datagram queued ("queued") from c1.
 * c1:  unbound, connect()ed to DIR/log.
 * c2:  bound to DIR/c2 and connect()ed to DIR/log.
 * The probe: getpeername of c1 and c2 is DIR/log; the queued datagram is
 * read first; c1 and c2 each send one; recvfrom gives c2's name for c2's;
 * then "queued" is sent again by c1 so the next probe finds the same state.
 * Prints "READY pid=P"; on SIGUSR1 "PASS sock_unix_dgram_conn pid=P" or FAIL.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define NAME "sock_unix_dgram_conn"
#include "probe.h"

static void die(const char *w) { fprintf(stderr, NAME ": %s: %s\n", w, strerror(errno)); exit(1); }

static struct sockaddr_un a_log, a_c2;
static int srv, c1, c2;

static void addr(struct sockaddr_un *a, const char *dir, const char *name)
{
	memset(a, 0, sizeof(*a));
	a->sun_family = AF_UNIX;
	snprintf(a->sun_path, sizeof(a->sun_path), "%.90s/%s", dir, name);
}

static void peer_is_log(int fd, const char *what)
{
	struct sockaddr_un p;
	socklen_t l = sizeof(p);
	if (getpeername(fd, (struct sockaddr *)&p, &l)) fail("%s getpeername: %s", what, strerror(errno));
	else if (strcmp(p.sun_path, a_log.sun_path)) fail("%s peer is %s", what, p.sun_path);
}

static void recv_one(const char *want, const char *from)
{
	char buf[64];
	struct sockaddr_un s;
	socklen_t l = sizeof(s);
	memset(&s, 0, sizeof(s));
	ssize_t n = recvfrom(srv, buf, sizeof(buf) - 1, MSG_DONTWAIT, (struct sockaddr *)&s, &l);
	if (n < 0) { fail("recv %s: %s", want, strerror(errno)); return; }
	buf[n] = 0;
	if (strcmp(buf, want)) fail("got %s, want %s", buf, want);
	if (from && (l <= sizeof(sa_family_t) || strcmp(s.sun_path, from))) fail("%s came from %s", want, l > 2 ? s.sun_path : "(unnamed)");
}

static void verify(void)
{
	fails[0] = 0;
	peer_is_log(c1, "c1");
	peer_is_log(c2, "c2");
	recv_one("queued", NULL);
	if (send(c1, "one", 3, 0) != 3) fail("c1 send: %s", strerror(errno));
	if (send(c2, "two", 3, 0) != 3) fail("c2 send: %s", strerror(errno));
	recv_one("one", NULL);
	recv_one("two", a_c2.sun_path);
	if (send(c1, "queued", 6, 0) != 6) fail("c1 send again: %s", strerror(errno));
	if (fails[0]) printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 2) return 2;
	addr(&a_log, argv[1], "log");
	addr(&a_c2, argv[1], "c2");
	unlink(a_log.sun_path);
	unlink(a_c2.sun_path);
	if ((srv = socket(AF_UNIX, SOCK_DGRAM, 0)) < 0 || bind(srv, (void *)&a_log, sizeof(a_log))) die("srv");
	if ((c1 = socket(AF_UNIX, SOCK_DGRAM, 0)) < 0 || connect(c1, (void *)&a_log, sizeof(a_log))) die("c1");
	if ((c2 = socket(AF_UNIX, SOCK_DGRAM, 0)) < 0 || bind(c2, (void *)&a_c2, sizeof(a_c2)) ||
	    connect(c2, (void *)&a_log, sizeof(a_log))) die("c2");
	if (send(c1, "queued", 6, 0) != 6) die("send");
	signal(SIGUSR1, on_usr1);
	printf("READY pid=%d\n", getpid());
	struct timespec ts = { 0, 1000000 };
	for (;;) {
		if (probe_req) { probe_req = 0; verify(); }
		nanosleep(&ts, NULL);
	}
}
