/*
 * sock_unix_inflight -- messages queued in UNIX sockets that carry more than bytes.
 *
 *   sock_unix_inflight DIR
 *
 * p0/p1: stream pair; queued for p0: "files" with SCM_RIGHTS [F, R], where
 *        F is DIR/f ("hello", offset 2) and R the read end of a pipe holding
 *        "pipedata"; the program closed both (no task holds them).
 * srv:   datagram socket bound to DIR/srv with SO_PASSCRED; queued for it:
 *        "named" from cli (bound to DIR/cli), "anon" from an unbound socket
 *        (closed since), "creds" from cli.
 * The probe reads all of it: the files arrive and read "llo" and "pipedata";
 * "named" and "creds" come from DIR/cli, "anon" from no name; every datagram
 * carries our uid and gid.  Then it queues the same again.
 * Prints "READY pid=P"; on SIGUSR1 "PASS sock_unix_inflight pid=P" or FAIL.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define NAME "sock_unix_inflight"
#include "probe.h"

static void die(const char *w) { fprintf(stderr, NAME ": %s: %s\n", w, strerror(errno)); exit(1); }

static int p0, p1, srv, cli;
static struct sockaddr_un a_srv, a_cli;
static char fpath[128];

static void addr(struct sockaddr_un *a, const char *dir, const char *name)
{
	memset(a, 0, sizeof(*a));
	a->sun_family = AF_UNIX;
	snprintf(a->sun_path, sizeof(a->sun_path), "%.90s/%s", dir, name);
}

static int send_fds(int s, const char *msg, int *fds, int n)
{
	char cbuf[CMSG_SPACE(sizeof(int) * 4)];
	struct iovec iov = { (void *)msg, strlen(msg) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = CMSG_SPACE(sizeof(int) * n) };
	struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int) * n);
	memcpy(CMSG_DATA(c), fds, sizeof(int) * n);
	return sendmsg(s, &mh, 0) == (ssize_t)strlen(msg) ? 0 : -1;
}

/* the queued state: files in flight on p0, three datagrams on srv */
static void queue_all(void)
{
	int f = open(fpath, O_RDWR), pp[2];
	if (f < 0 || lseek(f, 2, SEEK_SET) != 2) die("open f");
	if (pipe(pp) || write(pp[1], "pipedata", 8) != 8) die("pipe");
	int fds[2] = { f, pp[0] };
	if (send_fds(p1, "files", fds, 2)) die("send fds");
	close(f); close(pp[0]); close(pp[1]);
	if (sendto(cli, "named", 5, 0, (void *)&a_srv, sizeof(a_srv)) != 5) die("named");
	int anon = socket(AF_UNIX, SOCK_DGRAM, 0);
	if (sendto(anon, "anon", 4, 0, (void *)&a_srv, sizeof(a_srv)) != 4) die("anon");
	close(anon);
	if (sendto(cli, "creds", 5, 0, (void *)&a_srv, sizeof(a_srv)) != 5) die("creds");
}

static void recv_files(void)
{
	char buf[32], cbuf[CMSG_SPACE(sizeof(int) * 8)];
	struct iovec iov = { buf, sizeof(buf) - 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	ssize_t n = recvmsg(p0, &mh, MSG_DONTWAIT);
	if (n < 0) { fail("recv files: %s", strerror(errno)); return; }
	buf[n] = 0;
	if (strcmp(buf, "files")) fail("got '%s' instead of 'files'", buf);
	struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
	if (!c || c->cmsg_type != SCM_RIGHTS || c->cmsg_len != CMSG_LEN(2 * sizeof(int))) { fail("no 2 fds with 'files'"); return; }
	int fds[2];
	memcpy(fds, CMSG_DATA(c), sizeof(fds));
	memset(buf, 0, sizeof(buf));
	if (read(fds[0], buf, 10) != 3 || strcmp(buf, "llo")) fail("file in flight read '%s'", buf);
	memset(buf, 0, sizeof(buf));
	if (read(fds[1], buf, 10) != 8 || strcmp(buf, "pipedata")) fail("pipe in flight read '%s'", buf);
	close(fds[0]); close(fds[1]);
}

static void recv_dgram(const char *want, const char *from)
{
	char buf[32], cbuf[CMSG_SPACE(sizeof(struct ucred))];
	struct sockaddr_un s;
	struct iovec iov = { buf, sizeof(buf) - 1 };
	struct msghdr mh = { .msg_name = &s, .msg_namelen = sizeof(s), .msg_iov = &iov, .msg_iovlen = 1,
			     .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	memset(&s, 0, sizeof(s));
	ssize_t n = recvmsg(srv, &mh, MSG_DONTWAIT);
	if (n < 0) { fail("recv %s: %s", want, strerror(errno)); return; }
	buf[n] = 0;
	if (strcmp(buf, want)) fail("got '%s', want '%s'", buf, want);
	if (from && (mh.msg_namelen <= sizeof(sa_family_t) || strcmp(s.sun_path, from)))
		fail("'%s' came from %s", want, mh.msg_namelen > 2 ? s.sun_path : "(unnamed)");
	if (!from && mh.msg_namelen > sizeof(sa_family_t)) fail("'%s' came from %s", want, s.sun_path);
	struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
	if (!c || c->cmsg_type != SCM_CREDENTIALS) { fail("'%s' without credentials", want); return; }
	struct ucred u;
	memcpy(&u, CMSG_DATA(c), sizeof(u));
	if (u.uid != getuid() || u.gid != getgid()) fail("'%s' from uid %u gid %u", want, u.uid, u.gid);
}

static void verify(void)
{
	fails[0] = 0;
	recv_files();
	recv_dgram("named", a_cli.sun_path);
	recv_dgram("anon", NULL);
	recv_dgram("creds", a_cli.sun_path);
	queue_all();
	if (fails[0]) printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 2) return 2;
	int sv[2], one = 1;
	snprintf(fpath, sizeof(fpath), "%.90s/f", argv[1]);
	int f = open(fpath, O_CREAT | O_TRUNC | O_WRONLY, 0644);
	if (f < 0 || write(f, "hello", 5) != 5) die("f");
	close(f);
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) die("pair");
	p0 = sv[0]; p1 = sv[1];
	addr(&a_srv, argv[1], "srv");
	addr(&a_cli, argv[1], "cli");
	unlink(a_srv.sun_path);
	unlink(a_cli.sun_path);
	if ((srv = socket(AF_UNIX, SOCK_DGRAM, 0)) < 0 || bind(srv, (void *)&a_srv, sizeof(a_srv))) die("srv");
	setsockopt(srv, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one));
	if ((cli = socket(AF_UNIX, SOCK_DGRAM, 0)) < 0 || bind(cli, (void *)&a_cli, sizeof(a_cli))) die("cli");
	queue_all();
	signal(SIGUSR1, on_usr1);
	printf("READY pid=%d\n", getpid());
	struct timespec ts = { 0, 1000000 };
	for (;;) {
		if (probe_req) { probe_req = 0; verify(); }
		nanosleep(&ts, NULL);
	}
}
