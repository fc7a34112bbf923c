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
 * alg, icmp (refused); fanotify (restored, root: an inode mark on DIR/obj
 * for FAN_MODIFY, a mount mark on /proc and a file system mark on DIR's
 * file system with ignore masks only; the probe compares its fdinfo marks
 * and sees FAN_MODIFY of DIR/obj after writing into it); fanotify_queued
 * (refused: an event not read yet); unlinked_fifo (restored: "abc" buffered,
 * read back and written again by the probe), unlinked_dev (restored: an
 * unlinked /dev/null node), unlinked_kmsg (refused: an unlinked node of
 * /dev/kmsg, a device with state), zero_shm (restored: a MAP_SHARED|MAP_ANONYMOUS area opened through
 * /proc/self/map_files, fd and mapping see each other's writes),
 * zero_shm_unmapped (the same, unmapped after the open: the fd keeps it),
 * aio (refused: a Linux AIO context, io_setup, nothing in flight).
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
#include <sys/mman.h>
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
static char *shm;
static size_t shm_len = 2 * 4096;
static unsigned probes;
static char objpath[PATH_MAX], gold[4096];

static void fan_marks(char *out, size_t n)
{
	char p[64], line[512];
	snprintf(p, sizeof(p), "/proc/self/fdinfo/%d", obj);
	FILE *f = fopen(p, "r");
	out[0] = 0;
	while (f && fgets(line, sizeof(line), f))
		if (!strncmp(line, "fanotify ", 9) && strlen(out) + strlen(line) < n) strcat(out, line);
	if (f) fclose(f);
}

static void check_fanotify(void)
{
	char now[4096];
	fan_marks(now, sizeof(now));
	if (strcmp(now, gold)) fail("marks now [%s], were [%s]", now, gold);
	struct stat want;
	int w = open(objpath, O_WRONLY);
	if (w < 0 || write(w, "x", 1) != 1 || fstat(w, &want)) fail("write obj: %s", strerror(errno));
	if (w >= 0) close(w);
	static char buf[8192];
	ssize_t n = read(obj, buf, sizeof(buf));
	int seen = 0;
	for (struct fanotify_event_metadata *m = (void *)buf; n > 0 && FAN_EVENT_OK(m, n); m = FAN_EVENT_NEXT(m, n)) {
		struct stat st;
		if ((m->mask & FAN_MODIFY) && m->fd >= 0 && !fstat(m->fd, &st) && st.st_ino == want.st_ino) seen = 1;
		if (m->fd >= 0) close(m->fd);
	}
	if (!seen) fail("no FAN_MODIFY of obj");
	while (read(obj, buf, sizeof(buf)) > 0) ;
}

static void check_node(mode_t type, const char *what)
{
	struct stat st;
	if (fstat(obj, &st)) { fail("fstat: %s", strerror(errno)); return; }
	if ((st.st_mode & S_IFMT) != type) fail("%s: type %o", what, st.st_mode & S_IFMT);
	if (st.st_nlink) fail("%s: %lu links, want none", what, (unsigned long)st.st_nlink);
}

static void check_fifo(void)
{
	char b[8] = { 0 };
	check_node(S_IFIFO, "fifo");
	int fl = fcntl(obj, F_GETFL);
	fcntl(obj, F_SETFL, fl | O_NONBLOCK);
	ssize_t n = read(obj, b, sizeof(b));
	if (n != 3 || memcmp(b, "abc", 3)) fail("fifo held %zd bytes '%.8s', want abc", n, b);
	if (write(obj, "abc", 3) != 3) fail("fifo write: %s", strerror(errno));
	fcntl(obj, F_SETFL, fl);
}

static void check_dev(void)
{
	struct stat st;
	char b[4];
	check_node(S_IFCHR, "device");
	if (!fstat(obj, &st) && st.st_rdev != makedev(1, 3)) fail("device %u:%u", major(st.st_rdev), minor(st.st_rdev));
	if (read(obj, b, sizeof(b)) != 0) fail("/dev/null read gave data");
	if (write(obj, "x", 1) != 1) fail("/dev/null write: %s", strerror(errno));
}

static void check_shm(void)
{
	char b[32];
	struct stat st;
	if (fstat(obj, &st) || (size_t)st.st_size != shm_len) fail("shm size %ld", (long)st.st_size);
	if (pread(obj, b, 6, 0) != 6 || memcmp(b, "marker", 6)) fail("shm content through the fd");
	snprintf(b, sizeof(b), "probe %u", ++probes);
	if (pwrite(obj, b, strlen(b) + 1, 4096) != (ssize_t)strlen(b) + 1) fail("shm pwrite: %s", strerror(errno));
	if (shm) {
		if (strcmp(shm + 4096, b)) fail("mapping does not see the fd's write (%.20s)", shm + 4096);
		snprintf(shm + 100, 32, "map %u", probes);
		char c[32] = { 0 };
		if (pread(obj, c, 31, 100) < 0 || strcmp(c, shm + 100)) fail("fd does not see the mapping's write");
	}
	if (lseek(obj, 0, SEEK_CUR) != 7) fail("shm offset %ld, want 7", (long)lseek(obj, 0, SEEK_CUR));
}

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
	if (!strcmp(kind, "unlinked_fifo")) check_fifo();
	if (!strcmp(kind, "unlinked_dev")) check_dev();
	if (!strncmp(kind, "zero_shm", 8)) check_shm();
	if (!strcmp(kind, "fanotify")) check_fanotify();
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
	} else if (!strncmp(kind, "fanotify", 8)) {
		snprintf(objpath, sizeof(objpath), "%s", path);
		int c = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
		if (c < 0) skip("create obj");
		close(c);
		if ((obj = fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK, O_RDONLY | O_LARGEFILE)) < 0) skip("fanotify_init");
		if (fanotify_mark(obj, FAN_MARK_ADD, FAN_MODIFY | FAN_CLOSE_WRITE, AT_FDCWD, path) ||
		    fanotify_mark(obj, FAN_MARK_ADD | FAN_MARK_MOUNT | FAN_MARK_IGNORED_MASK, FAN_OPEN, AT_FDCWD, "/proc") ||
		    fanotify_mark(obj, FAN_MARK_ADD | FAN_MARK_FILESYSTEM | FAN_MARK_IGNORED_MASK | FAN_MARK_IGNORED_SURV_MODIFY, FAN_ACCESS, AT_FDCWD, argv[2]))
			skip("fanotify_mark");
		fan_marks(gold, sizeof(gold));
		if (!strcmp(kind, "fanotify_queued")) {
			int w = open(path, O_WRONLY);
			if (w < 0 || write(w, "q", 1) != 1) skip("write obj");
			close(w);
		}
	} else if (!strcmp(kind, "deleted_dir")) {
		if (mkdir(path, 0700) || (obj = open(path, O_RDONLY | O_DIRECTORY)) < 0 || rmdir(path)) skip("dir");
	} else if (!strcmp(kind, "unlinked_fifo")) {
		unlink(path);
		if (mkfifo(path, 0600) || (obj = open(path, O_RDWR)) < 0 || write(obj, "abc", 3) != 3 || unlink(path)) skip("fifo");
	} else if (!strcmp(kind, "unlinked_dev")) {
		unlink(path);
		if (mknod(path, S_IFCHR | 0600, makedev(1, 3)) || (obj = open(path, O_RDWR)) < 0 || unlink(path)) skip("mknod");
	} else if (!strcmp(kind, "aio")) {
		unsigned long ctx = 0;
		if (syscall(SYS_io_setup, 8, &ctx)) skip("io_setup");
	} else if (!strcmp(kind, "unlinked_kmsg")) {
		unlink(path);
		if (mknod(path, S_IFCHR | 0600, makedev(1, 11)) || (obj = open(path, O_RDONLY | O_NONBLOCK)) < 0 || unlink(path)) skip("mknod");
	} else if (!strncmp(kind, "zero_shm", 8)) {
		shm = mmap(NULL, shm_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		if (shm == MAP_FAILED) skip("mmap");
		memcpy(shm, "marker", 6);
		char mf[64];
		snprintf(mf, sizeof(mf), "/proc/self/map_files/%lx-%lx", (unsigned long)shm, (unsigned long)shm + shm_len);
		if ((obj = open(mf, O_RDWR)) < 0) skip("open map_files");
		if (lseek(obj, 7, SEEK_SET) != 7) skip("lseek");
		if (!strcmp(kind, "zero_shm_unmapped")) { munmap(shm, shm_len); shm = NULL; }
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
