/*
 * fd_zoo -- one kernel object per run, for the "restored or refused
 * cleanly, never an internal error" sweep (tests/test_fdkinds_more.py).
 *
 *   fd_zoo KIND DIR
 *
 * KIND: netlink_route, netlink_generic (restored: the probe checks the port
 * id and that a request is answered with it),
 * deleted_dir (restored: an empty deleted directory), pidfd_parent (a
 * pidfd of the parent, outside the tree), netlink_uevent, packet, vsock,
 * alg, icmp, fanotify, unlinked_fifo, unlinked_dev (refused).
 * Prints "SKIP fd_zoo KIND: why" if the object cannot be made here, else "READY pid=P fd=N"; on SIGUSR1 "PASS fd_zoo pid=P" or
 * "FAIL fd_zoo: ...".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/if_ether.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fanotify.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#define NAME "fd_zoo"
#include "probe.h"

#ifndef AF_ALG
#define AF_ALG 38
#endif
#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif

static const char *kind;
static int obj = -1;
static unsigned portid;

static void skip(const char *why) { printf("SKIP " NAME " %s: %s: %s\n", kind, why, strerror(errno)); exit(0); }

static unsigned nl_port(int fd)
{
	struct sockaddr_nl a;
	socklen_t l = sizeof(a);
	if (getsockname(fd, (struct sockaddr *)&a, &l)) return 0;
	return a.nl_pid;
}

static void check_netlink(void)
{
	if (nl_port(obj) != portid) fail("port id %u, was %u", nl_port(obj), portid);
	if (strcmp(kind, "netlink_route")) return;
	struct { struct nlmsghdr h; struct rtgenmsg g; } req;
	memset(&req, 0, sizeof(req));
	req.h.nlmsg_len = sizeof(req);
	req.h.nlmsg_type = RTM_GETLINK;
	req.h.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
	req.h.nlmsg_seq = 42;
	req.g.rtgen_family = AF_UNSPEC;
	if (send(obj, &req, sizeof(req), 0) != sizeof(req)) { fail("send: %s", strerror(errno)); return; }
	static char buf[1 << 16];
	int done = 0, links = 0;
	while (!done) {
		ssize_t n = recv(obj, buf, sizeof(buf), 0);
		if (n <= 0) { fail("recv: %s", strerror(errno)); return; }
		for (struct nlmsghdr *h = (void *)buf; NLMSG_OK(h, n); h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_pid != portid || h->nlmsg_seq != 42) fail("answer for port %u seq %u", h->nlmsg_pid, h->nlmsg_seq);
			if (h->nlmsg_type == NLMSG_DONE) done = 1;
			else if (h->nlmsg_type == RTM_NEWLINK) links++;
		}
		if (fails[0]) return;
	}
	if (!links) fail("no link in the answer");
}

static void verify(void)
{
	fails[0] = 0;
	if (!strncmp(kind, "netlink_route", 13) || !strcmp(kind, "netlink_generic")) check_netlink();
	if (fails[0]) printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 3) { fprintf(stderr, "usage: " NAME " KIND DIR\n"); return 2; }
	kind = argv[1];
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%.4000s/obj", argv[2]);
	if (!strcmp(kind, "netlink_route") || !strcmp(kind, "netlink_generic")) {
		obj = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, kind[8] == 'r' ? NETLINK_ROUTE : NETLINK_GENERIC);
		struct sockaddr_nl a = { .nl_family = AF_NETLINK };
		if (obj < 0 || bind(obj, (struct sockaddr *)&a, sizeof(a))) skip("netlink");
		portid = nl_port(obj);
	} else if (!strcmp(kind, "pidfd_parent")) {
		if ((obj = syscall(SYS_pidfd_open, getppid(), 0)) < 0) skip("pidfd_open");
	} else if (!strcmp(kind, "netlink_uevent")) {
		obj = socket(AF_NETLINK, SOCK_DGRAM, NETLINK_KOBJECT_UEVENT);
		if (obj < 0) skip("socket");
	} else if (!strcmp(kind, "packet")) {
		if ((obj = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL))) < 0) skip("socket");
	} else if (!strcmp(kind, "vsock")) {
		if ((obj = socket(AF_VSOCK, SOCK_STREAM, 0)) < 0) skip("socket");
	} else if (!strcmp(kind, "alg")) {
		if ((obj = socket(AF_ALG, SOCK_SEQPACKET, 0)) < 0) skip("socket");
	} else if (!strcmp(kind, "icmp")) {
		if ((obj = socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)) < 0) skip("socket");
	} else if (!strcmp(kind, "fanotify")) {
		if ((obj = fanotify_init(FAN_CLASS_NOTIF, O_RDONLY)) < 0) skip("fanotify_init");
	} else if (!strcmp(kind, "deleted_dir")) {
		if (mkdir(path, 0700) || (obj = open(path, O_RDONLY | O_DIRECTORY)) < 0 || rmdir(path)) skip("dir");
	} else if (!strcmp(kind, "unlinked_fifo")) {
		unlink(path);
		if (mkfifo(path, 0600) || (obj = open(path, O_RDWR)) < 0 || write(obj, "abc", 3) != 3 || unlink(path)) skip("fifo");
	} else if (!strcmp(kind, "unlinked_dev")) {
		unlink(path);
		if (mknod(path, S_IFCHR | 0600, makedev(1, 3)) || (obj = open(path, O_RDWR)) < 0 || unlink(path)) skip("mknod");
	} else {
		fprintf(stderr, NAME ": unknown kind %s\n", kind);
		return 2;
	}
	signal(SIGUSR1, on_usr1);
	printf("READY pid=%d fd=%d\n", getpid(), obj);
	struct timespec ts = { 0, 1000000 };
	for (;;) {
		if (probe_req) { probe_req = 0; verify(); }
		nanosleep(&ts, NULL);
	}
}
