/*
 * sock_unix_states -- UNIX sockets in states a program leaves them in:
 *
 *   sock_unix_states DIR
 *
 * st:  unbound, unconnected stream socket (SO_SNDBUF set by hand)
 * sq:  seqpacket bound to the abstract name @lcr-states-PID, not listening
 * ls:  stream listener on @lcr-states-l-PID (no connection waiting)
 * dg:  datagram socket bound to DIR/dg, SO_PASSCRED on, SO_RCVBUF set
 * a0/a1: stream pair, a0 shut down for writing (SHUT_WR)
 * b0/b1: stream pair, b1 shut down for reading (SHUT_RD)
 * c0/c1: stream pair, "abcdef" queued for c0, c0's SO_PEEK_OFF at 2
 * ul:  datagram socket bound to DIR/gone, whose file was then removed
 *       (with "replaced" as second argument: a regular file put there,
 *       which lcr refuses)
 * The probe checks types, names, not-connected, options, buffer sizes (as
 * they were at the start), shutdown behaviour and that a peek on c0 starts
 * at its peek offset; the listener still accepts a new connection.
 * Prints "READY pid=P"; on SIGUSR1 "PASS sock_unix_states pid=P" or FAIL.
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

#define NAME "sock_unix_states"
#include "probe.h"

static void die(const char *w) { fprintf(stderr, NAME ": %s: %s\n", w, strerror(errno)); exit(1); }

static int ul, replaced;
static struct sockaddr_un a_ul;
static int st, sq, ls, dg, a0, a1, b0, b1, c0, c1;
static struct sockaddr_un a_sq, a_ls, a_dg;
static socklen_t l_sq, l_ls;
static int st_snd, dg_rcv, dg_snd;

static socklen_t abstract(struct sockaddr_un *a, const char *fmt)
{
	memset(a, 0, sizeof(*a));
	a->sun_family = AF_UNIX;
	int n = snprintf(a->sun_path + 1, sizeof(a->sun_path) - 1, fmt, getpid());
	return offsetof(struct sockaddr_un, sun_path) + 1 + n;
}

static int opt(int fd, int o)
{
	int v = -1;
	socklen_t l = sizeof(v);
	if (getsockopt(fd, SOL_SOCKET, o, &v, &l)) fail("getsockopt %d: %s", o, strerror(errno));
	return v;
}

static void name_is(int fd, const char *what, const struct sockaddr_un *want, socklen_t wl)
{
	struct sockaddr_un a;
	socklen_t l = sizeof(a);
	memset(&a, 0, sizeof(a));
	if (getsockname(fd, (struct sockaddr *)&a, &l)) { fail("%s getsockname: %s", what, strerror(errno)); return; }
	if (l != wl || memcmp(&a, want, wl)) fail("%s: name %s%s (len %u, want %u)", what, a.sun_path[0] ? "" : "@",
						     a.sun_path[0] ? a.sun_path : a.sun_path + 1, l, wl);
}

static void not_connected(int fd, const char *what)
{
	struct sockaddr_un a;
	socklen_t l = sizeof(a);
	if (!getpeername(fd, (struct sockaddr *)&a, &l) || errno != ENOTCONN) fail("%s is connected", what);
}

static void verify(void)
{
	char buf[16];
	fails[0] = 0;
	if (opt(st, SO_TYPE) != SOCK_STREAM) fail("st type");
	if (opt(sq, SO_TYPE) != SOCK_SEQPACKET) fail("sq type");
	if (opt(dg, SO_TYPE) != SOCK_DGRAM) fail("dg type");
	struct sockaddr_un unb = { .sun_family = AF_UNIX };
	name_is(st, "st", &unb, sizeof(sa_family_t));
	name_is(sq, "sq", &a_sq, l_sq);
	name_is(ls, "ls", &a_ls, l_ls);
	name_is(dg, "dg", &a_dg, offsetof(struct sockaddr_un, sun_path) + strlen(a_dg.sun_path) + 1);
	not_connected(st, "st");
	not_connected(sq, "sq");
	not_connected(dg, "dg");
	if (opt(ls, SO_ACCEPTCONN) != 1) fail("ls not listening");
	if (opt(sq, SO_ACCEPTCONN) != 0) fail("sq listening");
	if (opt(dg, SO_PASSCRED) != 1) fail("dg SO_PASSCRED off");
	if (opt(st, SO_PASSCRED) != 0) fail("st SO_PASSCRED on");
	if (opt(st, SO_SNDBUF) != st_snd) fail("st SO_SNDBUF %d, want %d", opt(st, SO_SNDBUF), st_snd);
	if (opt(dg, SO_RCVBUF) != dg_rcv) fail("dg SO_RCVBUF %d, want %d", opt(dg, SO_RCVBUF), dg_rcv);
	if (opt(dg, SO_SNDBUF) != dg_snd) fail("dg SO_SNDBUF %d, want %d", opt(dg, SO_SNDBUF), dg_snd);
	/* shutdown: a0 cannot write, a1 sees EOF; b0 cannot write to b1 (read shut) */
	if (send(a0, "x", 1, MSG_NOSIGNAL | MSG_DONTWAIT) != -1 || errno != EPIPE) fail("a0 could write after SHUT_WR");
	if (recv(a1, buf, 1, MSG_DONTWAIT) != 0) fail("a1 sees no EOF");
	if (send(a1, "y", 1, MSG_NOSIGNAL | MSG_DONTWAIT) != 1) fail("a1 cannot write: %s", strerror(errno));
	else if (recv(a0, buf, 1, MSG_DONTWAIT) != 1 || buf[0] != 'y') fail("a0 did not get a1's byte");
	if (send(b0, "x", 1, MSG_NOSIGNAL | MSG_DONTWAIT) != -1 || errno != EPIPE) fail("b0 could write to b1 after SHUT_RD");
	/* peek offset */
	if (opt(c0, SO_PEEK_OFF) != 2) fail("c0 SO_PEEK_OFF %d", opt(c0, SO_PEEK_OFF));
	memset(buf, 0, sizeof(buf));
	if (recv(c0, buf, 2, MSG_PEEK | MSG_DONTWAIT) != 2 || memcmp(buf, "cd", 2)) fail("c0 peek gave '%.2s'", buf);
	int two = 2;
	setsockopt(c0, SOL_SOCKET, SO_PEEK_OFF, &two, sizeof(two));
	/* bound to a name whose file is gone */
	name_is(ul, "ul", &a_ul, offsetof(struct sockaddr_un, sun_path) + strlen(a_ul.sun_path) + 1);
	if (!access(a_ul.sun_path, F_OK) && !replaced) fail("%s exists again", a_ul.sun_path);
	/* the listener takes a new connection */
	int c = socket(AF_UNIX, SOCK_STREAM, 0);
	if (connect(c, (struct sockaddr *)&a_ls, l_ls)) fail("connect to ls: %s", strerror(errno));
	else {
		int s = accept(ls, NULL, NULL);
		if (s < 0) fail("accept: %s", strerror(errno));
		else close(s);
	}
	close(c);
	if (fails[0]) printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2) return 2;
	int sv[2], one = 1, v;
	if ((st = socket(AF_UNIX, SOCK_STREAM, 0)) < 0) die("st");
	v = 50000;
	setsockopt(st, SOL_SOCKET, SO_SNDBUF, &v, sizeof(v));
	l_sq = abstract(&a_sq, "lcr-states-%d");
	if ((sq = socket(AF_UNIX, SOCK_SEQPACKET, 0)) < 0 || bind(sq, (void *)&a_sq, l_sq)) die("sq");
	l_ls = abstract(&a_ls, "lcr-states-l-%d");
	if ((ls = socket(AF_UNIX, SOCK_STREAM, 0)) < 0 || bind(ls, (void *)&a_ls, l_ls) || listen(ls, 7)) die("ls");
	memset(&a_dg, 0, sizeof(a_dg));
	a_dg.sun_family = AF_UNIX;
	snprintf(a_dg.sun_path, sizeof(a_dg.sun_path), "%.90s/dg", argv[1]);
	unlink(a_dg.sun_path);
	if ((dg = socket(AF_UNIX, SOCK_DGRAM, 0)) < 0 || bind(dg, (void *)&a_dg, sizeof(a_dg))) die("dg");
	setsockopt(dg, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one));
	v = 70000;
	setsockopt(dg, SOL_SOCKET, SO_RCVBUF, &v, sizeof(v));
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) die("a");
	a0 = sv[0]; a1 = sv[1];
	shutdown(a0, SHUT_WR);
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) die("b");
	b0 = sv[0]; b1 = sv[1];
	shutdown(b1, SHUT_RD);
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) die("c");
	c0 = sv[0]; c1 = sv[1];
	if (send(c1, "abcdef", 6, 0) != 6) die("send c");
	v = 2;
	if (setsockopt(c0, SOL_SOCKET, SO_PEEK_OFF, &v, sizeof(v))) die("peek_off");
	memset(&a_ul, 0, sizeof(a_ul));
	a_ul.sun_family = AF_UNIX;
	snprintf(a_ul.sun_path, sizeof(a_ul.sun_path), "%.90s/gone", argv[1]);
	unlink(a_ul.sun_path);
	if ((ul = socket(AF_UNIX, SOCK_DGRAM, 0)) < 0 || bind(ul, (void *)&a_ul, sizeof(a_ul))) die("ul");
	unlink(a_ul.sun_path);
	replaced = argc > 2 && !strcmp(argv[2], "replaced");
	if (replaced) {
		FILE *f = fopen(a_ul.sun_path, "w");
		if (!f) die("replaced");
		fclose(f);
	}
	st_snd = opt(st, SO_SNDBUF);
	dg_rcv = opt(dg, SO_RCVBUF);
	dg_snd = opt(dg, SO_SNDBUF);
	signal(SIGUSR1, on_usr1);
	printf("READY pid=%d\n", getpid());
	struct timespec ts = { 0, 1000000 };
	for (;;) {
		if (probe_req) { probe_req = 0; verify(); }
		nanosleep(&ts, NULL);
	}
}
