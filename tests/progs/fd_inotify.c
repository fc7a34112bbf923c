/*
 * fd_inotify -- inotify instances with their watches (and their numbers),
 * checked after a restart.
 *
 *   fd_inotify DIR              the state below, in DIR (which must exist)
 *   fd_inotify DIR queued       an event left unread (refused by lcr)
 *   fd_inotify DIR deleted      a watch on a file deleted since, still open:
 *                               writing into it must raise IN_MODIFY (wd 1)
 *
 * It works from "/" (chdir) and makes DIR/f1, DIR/f2, DIR/sub/deep.
 * State set up before READY:
 *   in1 (IN_NONBLOCK|IN_CLOEXEC), watch numbers with gaps:
 *     wd 1   DIR        IN_CREATE|IN_DELETE|IN_MOVED_TO
 *     wd 2   DIR/f1     IN_MODIFY|IN_CLOSE_WRITE
 *     (wd 3  DIR/f2, removed)
 *     wd 4   DIR/sub    IN_CREATE|IN_ONESHOT
 *     (wd 5..9 added and removed)
 *     wd 10  DIR/f2     IN_ATTRIB|IN_EXCL_UNLINK
 *     wd 11  DIR/sub/deep  IN_MOVE_SELF
 *   in2 (blocking): (wd 1 removed), wd 2 DIR IN_CREATE
 *   no events queued
 *
 * On SIGUSR1 it compares the watches of its own fdinfo (wd, mask, inode)
 * with those seen before READY, checks flags and that no event is queued,
 * then changes the files and checks that each change is reported with the
 * right watch number (and name), that a new watch gets a number above all
 * the others, and leaves no event queued.  The refused modes only check
 * their odd state is still there.
 * Prints "PASS fd_inotify pid=P" or "FAIL fd_inotify: <details> (pid=P)".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define NAME "fd_inotify"

#include "probe.h"

static const char *dir;
static char p_f1[PATH_MAX], p_f2[PATH_MAX], p_sub[PATH_MAX], p_deep[PATH_MAX], p_deep2[PATH_MAX];
static int in1, in2, mode_queued, mode_deleted, victim_fd;
static int probes;
static char gold1[4096], gold2[4096];

static void path(char *out, const char *name)
{
	snprintf(out, PATH_MAX, "%s/%s", dir, name);
}

static void touch(const char *p)
{
	int fd = open(p, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0) { perror(p); exit(1); }
	close(fd);
}

/* "wd:mask:ino" of each watch in the fdinfo of fd, sorted by wd */
static void watches(int fd, char *out, size_t size)
{
	char p[64], buf[16384];
	snprintf(p, sizeof(p), "/proc/self/fdinfo/%d", fd);
	out[0] = 0;
	int f = open(p, O_RDONLY | O_CLOEXEC);
	if (f < 0) return;
	ssize_t len = read(f, buf, sizeof(buf) - 1);
	close(f);
	if (len <= 0) return;
	buf[len] = 0;
	unsigned wds[64], masks[64];
	unsigned long inos[64];
	int n = 0;
	for (char *save, *l = strtok_r(buf, "\n", &save); l && n < 64; l = strtok_r(NULL, "\n", &save))
		if (sscanf(l, "inotify wd:%x ino:%lx sdev:%*x mask:%x", &wds[n], &inos[n], &masks[n]) == 3)
			n++;
	for (int i = 0; i < n; i++)
		for (int j = i + 1; j < n; j++)
			if (wds[j] < wds[i]) {
				unsigned t = wds[i]; wds[i] = wds[j]; wds[j] = t;
				t = masks[i]; masks[i] = masks[j]; masks[j] = t;
				unsigned long u = inos[i]; inos[i] = inos[j]; inos[j] = u;
			}
	for (int i = 0; i < n; i++) {
		char one[64];
		snprintf(one, sizeof(one), "%u:%x:%lx ", wds[i], masks[i], inos[i]);
		strncat(out, one, size - strlen(out) - 1);
	}
}

static int queued(int fd)
{
	int n = -1;
	ioctl(fd, FIONREAD, &n);
	return n;
}

struct seen { int wd; uint32_t mask; char name[64]; };

/* read events from fd for up to 1 s, until `want` of them came */
static int collect(int fd, struct seen *out, int max, int want)
{
	char buf[8192] __attribute__((aligned(__alignof__(struct inotify_event))));
	int n = 0;
	for (int round = 0; round < 100 && n < want; round++) {
		struct pollfd p = { fd, POLLIN, 0 };
		if (poll(&p, 1, 10) != 1) continue;
		ssize_t len = read(fd, buf, sizeof(buf));
		for (char *q = buf; len > 0 && q < buf + len;) {
			struct inotify_event *e = (struct inotify_event *)q;
			if (n < max) {
				out[n].wd = e->wd;
				out[n].mask = e->mask;
				snprintf(out[n].name, sizeof(out[n].name), "%s", e->len ? e->name : "");
				n++;
			}
			q += sizeof(*e) + e->len;
		}
	}
	return n;
}

static void want(const char *what, struct seen *s, int n, int wd, uint32_t mask, const char *name)
{
	for (int i = 0; i < n; i++)
		if (s[i].wd == wd && (s[i].mask & mask) && !strcmp(s[i].name, name))
			return;
	char got[1024] = "";
	for (int i = 0; i < n; i++) {
		char one[96];
		snprintf(one, sizeof(one), " %d:%x:%s", s[i].wd, s[i].mask, s[i].name);
		strncat(got, one, sizeof(got) - strlen(got) - 1);
	}
	fail("%s: no event wd %d mask %x name '%s' (got%s)", what, wd, mask, name, got);
}

static void verify_main(void)
{
	char now[4096], newf[PATH_MAX], nm[64];
	struct seen s[64];
	int n;

	watches(in1, now, sizeof(now));
	if (strcmp(now, gold1)) fail("in1 watches [%s], were [%s]", now, gold1);
	watches(in2, now, sizeof(now));
	if (strcmp(now, gold2)) fail("in2 watches [%s], were [%s]", now, gold2);
	int fl1 = fcntl(in1, F_GETFL), fd1 = fcntl(in1, F_GETFD), fl2 = fcntl(in2, F_GETFL);
	if (fl1 < 0 || !(fl1 & O_NONBLOCK) || !(fd1 & FD_CLOEXEC)) fail("in1 flags %o/%o", fl1, fd1);
	if (fl2 < 0 || (fl2 & O_NONBLOCK)) fail("in2 flags %o", fl2);
	if (queued(in1) != 0 || queued(in2) != 0) fail("events queued: %d, %d", queued(in1), queued(in2));

	/* a write to f1 */
	int fd = open(p_f1, O_WRONLY | O_APPEND | O_CLOEXEC);
	if (fd < 0 || write(fd, "more\n", 5) != 5) fail("write f1");
	close(fd);
	n = collect(in1, s, 64, 2);
	want("write f1", s, n, 2, IN_MODIFY, "");
	want("close f1", s, n, 2, IN_CLOSE_WRITE, "");
	/* a new file in DIR, then deleted */
	snprintf(nm, sizeof(nm), "new.%d", ++probes);
	path(newf, nm);
	touch(newf);
	unlink(newf);
	n = collect(in1, s, 64, 2);
	want("create", s, n, 1, IN_CREATE, nm);
	want("delete", s, n, 1, IN_DELETE, nm);
	n = collect(in2, s, 64, 1);
	want("in2 create", s, n, 2, IN_CREATE, nm);
	/* attributes of f2, deep moved there and back */
	chmod(p_f2, probes & 1 ? 0600 : 0644);
	rename(p_deep, p_deep2);
	rename(p_deep2, p_deep);
	n = collect(in1, s, 64, 2);      /* the two IN_MOVE_SELF are merged */
	want("chmod f2", s, n, 10, IN_ATTRIB, "");
	want("move deep", s, n, 11, IN_MOVE_SELF, "");
	for (int i = 0; i < n; i++)
		if (s[i].wd != 1 && s[i].wd != 2 && s[i].wd != 10 && s[i].wd != 11)
			fail("event for wd %d mask %x", s[i].wd, s[i].mask);
	/* a new watch gets a number above all others; then removed */
	touch(newf);
	int wd = inotify_add_watch(in1, newf, IN_OPEN);
	if (wd <= 11) fail("new watch got wd %d", wd);
	inotify_rm_watch(in1, wd);
	unlink(newf);
	n = collect(in1, s, 64, 3);       /* IN_IGNORED, IN_CREATE, IN_DELETE: drained */
	n = collect(in2, s, 64, 1);
	if (queued(in1) != 0 || queued(in2) != 0) fail("events left: %d, %d", queued(in1), queued(in2));
	watches(in1, now, sizeof(now));
	if (strcmp(now, gold1)) fail("in1 watches after: [%s]", now);
}

static void drain(int in);

static void verify(void)
{
	fails[0] = 0;
	if (mode_queued) {
		if (queued(in1) <= 0) fail("no event queued");
	} else if (mode_deleted) {
		char now[4096];
		watches(in1, now, sizeof(now));
		if (!strstr(now, "1:2:")) fail("watch of the deleted file gone: [%s]", now);
		if (fcntl(victim_fd, F_GETFD) < 0) fail("victim not open");
		struct stat st;
		if (fstat(victim_fd, &st) || st.st_nlink) fail("victim is linked");
		if (pwrite(victim_fd, "x", 1, 0) != 1) fail("write victim: %s", strerror(errno));
		union { struct inotify_event e; char b[4096]; } ev;
		ssize_t n = read(in1, &ev, sizeof(ev));
		if (n < (ssize_t)sizeof(ev.e) || ev.e.wd != 1 || !(ev.e.mask & IN_MODIFY))
			fail("no IN_MODIFY of wd 1 after a write (%zd bytes, wd %d mask %x)", n, n > 0 ? ev.e.wd : 0, n > 0 ? ev.e.mask : 0);
		drain(in1);
	} else {
		verify_main();
	}
	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

static int add(int in, const char *p, uint32_t mask, int expect)
{
	int wd = inotify_add_watch(in, p, mask);
	if (wd != expect) { fprintf(stderr, "watch %s: wd %d, want %d (%s)\n", p, wd, expect, strerror(errno)); exit(1); }
	return wd;
}

static void drain(int in)
{
	char buf[4096];
	struct pollfd p = { in, POLLIN, 0 };
	while (poll(&p, 1, 0) == 1 && read(in, buf, sizeof(buf)) > 0)
		;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2) { fprintf(stderr, "usage: fd_inotify DIR [queued|deleted]\n"); return 2; }
	dir = argv[1];
	mode_queued = argc > 2 && !strcmp(argv[2], "queued");
	mode_deleted = argc > 2 && !strcmp(argv[2], "deleted");
	struct sigaction sa = { .sa_handler = on_usr1, .sa_flags = SA_RESTART };
	sigaction(SIGUSR1, &sa, NULL);
	if (chdir("/")) return 1;

	path(p_f1, "f1");
	path(p_f2, "f2");
	path(p_sub, "sub");
	path(p_deep, "sub/deep");
	path(p_deep2, "sub/deep2");
	mkdir(p_sub, 0755);
	touch(p_f1);
	touch(p_f2);
	touch(p_deep);

	in1 = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
	in2 = inotify_init1(0);
	if (in1 < 0 || in2 < 0) { perror("inotify_init1"); return 1; }
	if (mode_deleted) {
		char victim[PATH_MAX];
		path(victim, "victim");
		victim_fd = open(victim, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
		add(in1, victim, IN_MODIFY, 1);
		unlink(victim);
	} else {
		add(in1, dir, IN_CREATE | IN_DELETE | IN_MOVED_TO, 1);
		add(in1, p_f1, IN_MODIFY | IN_CLOSE_WRITE, 2);
		inotify_rm_watch(in1, add(in1, p_f2, IN_ATTRIB, 3));
		add(in1, p_sub, IN_CREATE | IN_ONESHOT, 4);
		for (int wd = 5; wd <= 9; wd++)
			inotify_rm_watch(in1, add(in1, p_deep, IN_OPEN, wd));
		add(in1, p_f2, IN_ATTRIB | IN_EXCL_UNLINK, 10);
		add(in1, p_deep, IN_MOVE_SELF, 11);
		inotify_rm_watch(in2, add(in2, p_f2, IN_ATTRIB, 1));
		add(in2, dir, IN_CREATE, 2);
		drain(in1);
		drain(in2);
		if (mode_queued)
			touch(p_f1), chmod(p_f2, 0600);   /* IN_CLOSE_WRITE and IN_ATTRIB, unread */
	}
	watches(in1, gold1, sizeof(gold1));
	watches(in2, gold2, sizeof(gold2));

	printf("READY pid=%d\n", getpid());
	fflush(stdout);

	struct timespec ts = { 0, 1000000 };
	for (;;) {
		if (probe_req) {
			probe_req = 0;
			verify();
		}
		nanosleep(&ts, NULL);
	}
}
