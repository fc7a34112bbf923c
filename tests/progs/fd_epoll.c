/*
 * fd_epoll -- epoll sets with their watches, checked after a restart.
 *
 *   fd_epoll            the state below
 *   fd_epoll closed     a watch that outlives its fd (its file kept by a dup)
 *   fd_epoll reused     the same, and the fd number reused by an eventfd
 *   fd_epoll oneshot    a fired one-shot watch of an fd that is ready for
 *                       nothing (refused by lcr: it cannot be made again)
 *
 * State set up before READY (pipes a and b, an eventfd ev, rb2 = dup(rb)):
 *   ep1 (EPOLL_CLOEXEC)
 *     ra   EPOLLIN                data 0x1111000000000001  (ra is readable)
 *     wb   EPOLLOUT               data 0xdead
 *     ev   EPOLLIN|EPOLLET        data 0x77
 *     rb   EPOLLIN|EPOLLONESHOT   data 0xb0c, armed
 *     wa   EPOLLOUT|EPOLLONESHOT  data 0xb0b, already fired: disabled
 *   ep2
 *     ra   EPOLLIN|EPOLLRDHUP     data 0x2222  (ra is in two sets)
 *     ep1  EPOLLIN                data 0x3333  (an epoll in an epoll)
 *     ev   EPOLLIN|EPOLLEXCLUSIVE data 0x55
 *     rb2  EPOLLIN                data 0x4444  (same file as rb, other fd)
 *
 * On SIGUSR1 it compares the watches in its own fdinfo with those it saw
 * before READY (fd, events, data), checks what epoll_wait reports for each
 * set (level, edge-triggered, one-shot disabled then re-armed with
 * EPOLL_CTL_MOD), changes data with EPOLL_CTL_MOD on the original fd
 * numbers and back, deletes and adds a watch again, and leaves everything
 * as it was.  closed/reused: the odd watch is still there under its number,
 * and writing into the pipe wakes it (data 1), the eventfd at its old
 * number does not.  oneshot only checks that the odd watch is still there.
 * Prints "PASS fd_epoll pid=P" or "FAIL fd_epoll: <details> (pid=P)".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define NAME "fd_epoll"

#include "probe.h"

static int ra, wa, rb, wb, rb2, ev, ep1, ep2;
static int closed_mode, oneshot_mode, reused_mode, stray_fd, stray_ep, stray_keep, stray_w, stray_ev = -1;

#define D_RA1 0x1111000000000001ULL
#define D_WB 0xdeadULL
#define D_EV1 0x77ULL
#define D_WA 0xb0bULL
#define D_RB 0xb0cULL
#define D_RA2 0x2222ULL
#define D_EP1 0x3333ULL
#define D_EV2 0x55ULL
#define D_RB2 0x4444ULL

/* the watch lines of an epoll fd's fdinfo: "tfd events data", sorted */
static void watches(int fd, char *out, size_t size)
{
	char path[64], buf[16384], *lines[256];
	int n = 0;
	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
	out[0] = 0;
	int f = open(path, O_RDONLY | O_CLOEXEC);
	if (f < 0) return;
	ssize_t len = read(f, buf, sizeof(buf) - 1);
	close(f);
	if (len <= 0) return;
	buf[len] = 0;
	for (char *save, *l = strtok_r(buf, "\n", &save); l && n < 256; l = strtok_r(NULL, "\n", &save)) {
		int tfd;
		unsigned events;
		unsigned long long data;
		if (sscanf(l, "tfd: %d events: %x data: %llx", &tfd, &events, &data) == 3) {
			lines[n] = malloc(64);
			snprintf(lines[n], 64, "%d:%x:%llx", tfd, events, data);
			n++;
		}
	}
	for (int i = 0; i < n; i++)          /* sort: the kernel's order is by address */
		for (int j = i + 1; j < n; j++)
			if (strcmp(lines[j], lines[i]) < 0) { char *t = lines[i]; lines[i] = lines[j]; lines[j] = t; }
	for (int i = 0; i < n; i++) {
		strncat(out, lines[i], size - strlen(out) - 2);
		strcat(out, " ");
		free(lines[i]);
	}
}

static char gold1[4096], gold2[4096];

static void check_gold(const char *when)
{
	char now[4096];
	watches(ep1, now, sizeof(now));
	if (strcmp(now, gold1)) fail("%s: ep1 watches [%s], were [%s]", when, now, gold1);
	watches(ep2, now, sizeof(now));
	if (strcmp(now, gold2)) fail("%s: ep2 watches [%s], were [%s]", when, now, gold2);
}

/* epoll_wait(ep, 0) must report exactly the (data, events) pairs given, 0-ended */
static void expect(const char *what, int ep, ...)
{
	struct epoll_event evs[16];
	int n = epoll_wait(ep, evs, 16, 0);
	unsigned long long want[16];
	unsigned wev[16];
	int nw = 0, seen[16] = { 0 };
	va_list ap;
	va_start(ap, ep);
	for (;;) {
		unsigned long long d = va_arg(ap, unsigned long long);
		if (!d) break;
		want[nw] = d;
		wev[nw++] = va_arg(ap, unsigned);
	}
	va_end(ap);
	if (n < 0) { fail("%s: epoll_wait: %s", what, strerror(errno)); return; }
	for (int i = 0; i < n; i++) {
		int k;
		for (k = 0; k < nw; k++)
			if (evs[i].data.u64 == want[k]) break;
		if (k == nw) { fail("%s: unexpected event data 0x%llx events 0x%x", what,
				    (unsigned long long)evs[i].data.u64, evs[i].events); continue; }
		seen[k] = 1;
		if (evs[i].events != wev[k])
			fail("%s: data 0x%llx: events 0x%x, want 0x%x", what, want[k], evs[i].events, wev[k]);
	}
	for (int k = 0; k < nw; k++)
		if (!seen[k]) fail("%s: data 0x%llx (events 0x%x) not reported", what, want[k], wev[k]);
}

static void ctl(int ep, int op, int fd, unsigned events, unsigned long long data, const char *what)
{
	struct epoll_event e = { .events = events, .data.u64 = data };
	if (epoll_ctl(ep, op, fd, &e)) fail("%s: %s", what, strerror(errno));
}

static void verify_main(void)
{
	char c;
	uint64_t one = 1, got;
	int fl = fcntl(ep1, F_GETFD), fl2 = fcntl(ep2, F_GETFD);
	if (fl < 0 || !(fl & FD_CLOEXEC)) fail("ep1: not close-on-exec");
	if (fl2 < 0 || (fl2 & FD_CLOEXEC)) fail("ep2: close-on-exec");
	check_gold("before");

	expect("ep1 idle", ep1, D_RA1, EPOLLIN, D_WB, EPOLLOUT, 0ULL);
	expect("ep2 idle", ep2, D_RA2, EPOLLIN, D_EP1, EPOLLIN, 0ULL);

	/* edge-triggered: reported once */
	if (write(ev, &one, 8) != 8) fail("write ev");
	expect("ep1 ev edge", ep1, D_RA1, EPOLLIN, D_WB, EPOLLOUT, D_EV1, EPOLLIN, 0ULL);
	expect("ep1 ev edge again", ep1, D_RA1, EPOLLIN, D_WB, EPOLLOUT, 0ULL);
	expect("ep2 ev level", ep2, D_RA2, EPOLLIN, D_EP1, EPOLLIN, D_EV2, EPOLLIN, 0ULL);
	if (read(ev, &got, 8) != 8 || got != 1) fail("read ev");
	expect("ep2 ev read", ep2, D_RA2, EPOLLIN, D_EP1, EPOLLIN, 0ULL);

	/* one-shot, disabled (wa is writable): nothing until EPOLL_CTL_MOD re-arms it */
	ctl(ep1, EPOLL_CTL_MOD, wa, EPOLLOUT | EPOLLONESHOT, D_WA, "MOD wa in ep1");
	expect("ep1 oneshot re-armed", ep1, D_RA1, EPOLLIN, D_WB, EPOLLOUT, D_WA, EPOLLOUT, 0ULL);
	expect("ep1 oneshot fired", ep1, D_RA1, EPOLLIN, D_WB, EPOLLOUT, 0ULL);
	/* one-shot, armed: fires once when rb gets data */
	if (write(wb, "z", 1) != 1) fail("write wb");
	expect("ep1 oneshot armed", ep1, D_RA1, EPOLLIN, D_WB, EPOLLOUT, D_RB, EPOLLIN, 0ULL);
	expect("ep1 oneshot armed fired", ep1, D_RA1, EPOLLIN, D_WB, EPOLLOUT, 0ULL);
	expect("ep2 rb2", ep2, D_RA2, EPOLLIN, D_EP1, EPOLLIN, D_RB2, EPOLLIN, 0ULL);
	if (read(rb, &c, 1) != 1 || c != 'z') fail("read rb");
	expect("ep2 rb2 empty", ep2, D_RA2, EPOLLIN, D_EP1, EPOLLIN, 0ULL);
	ctl(ep1, EPOLL_CTL_MOD, rb, EPOLLIN | EPOLLONESHOT, D_RB, "MOD rb in ep1 (re-arm)");

	/* EPOLL_CTL_MOD on the original fd numbers, in both sets */
	ctl(ep1, EPOLL_CTL_MOD, ra, EPOLLIN, 0x9999, "MOD ra in ep1");
	ctl(ep2, EPOLL_CTL_MOD, ra, EPOLLIN | EPOLLRDHUP, 0x2223, "MOD ra in ep2");
	expect("ep1 after MOD", ep1, 0x9999ULL, EPOLLIN, D_WB, EPOLLOUT, 0ULL);
	expect("ep2 after MOD", ep2, 0x2223ULL, EPOLLIN, D_EP1, EPOLLIN, 0ULL);
	ctl(ep1, EPOLL_CTL_MOD, ra, EPOLLIN, D_RA1, "MOD ra back in ep1");
	ctl(ep2, EPOLL_CTL_MOD, ra, EPOLLIN | EPOLLRDHUP, D_RA2, "MOD ra back in ep2");
	ctl(ep2, EPOLL_CTL_MOD, rb2, EPOLLIN, D_RB2, "MOD rb2 in ep2");
	/* ADD of a watched fd must say EEXIST; DEL then ADD works */
	struct epoll_event e = { .events = EPOLLOUT, .data.u64 = D_WB };
	if (epoll_ctl(ep1, EPOLL_CTL_ADD, wb, &e) == 0 || errno != EEXIST)
		fail("ADD of watched wb did not say EEXIST");
	ctl(ep1, EPOLL_CTL_DEL, wb, 0, 0, "DEL wb from ep1");
	ctl(ep1, EPOLL_CTL_ADD, wb, EPOLLOUT, D_WB, "ADD wb to ep1");
	if (epoll_ctl(ep2, EPOLL_CTL_MOD, wb, &e) == 0 || errno != ENOENT)
		fail("MOD of wb in ep2 (not watched) did not say ENOENT");

	expect("ep1 end", ep1, D_RA1, EPOLLIN, D_WB, EPOLLOUT, 0ULL);
	check_gold("after");
}

static void verify(void)
{
	fails[0] = 0;
	if (closed_mode || oneshot_mode) {
		char now[4096], want[64];
		watches(stray_ep, now, sizeof(now));
		snprintf(want, sizeof(want), "%d:", stray_fd);
		if (strncmp(now, want, strlen(want))) fail("stray watch gone: [%s]", now);
		if (closed_mode && !reused_mode && fcntl(stray_fd, F_GETFD) != -1) fail("fd %d is open", stray_fd);
		if (closed_mode) {
			struct epoll_event e[4];
			char c;
			int n = epoll_wait(stray_ep, e, 4, 0);
			if (n != 0) fail("%d events before the write", n);
			if (reused_mode && write(stray_ev, &(uint64_t){ 1 }, 8) != 8) fail("eventfd write");
			if (write(stray_w, "x", 1) != 1) fail("pipe write");
			n = epoll_wait(stray_ep, e, 4, 0);
			if (n != 1 || e[0].data.u64 != 1 || !(e[0].events & EPOLLIN)) fail("%d events after the write", n);
			if (read(stray_keep, &c, 1) != 1) fail("pipe read");
			uint64_t v;
			if (reused_mode && read(stray_ev, &v, 8) != 8) fail("eventfd read");
			if (epoll_wait(stray_ep, e, 4, 0) != 0) fail("events after the read");
		}
	} else {
		verify_main();
	}
	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	struct sigaction sa = { .sa_handler = on_usr1, .sa_flags = SA_RESTART };
	sigaction(SIGUSR1, &sa, NULL);
	reused_mode = argc > 1 && !strcmp(argv[1], "reused");
	closed_mode = argc > 1 && (!strcmp(argv[1], "closed") || reused_mode);
	oneshot_mode = argc > 1 && !strcmp(argv[1], "oneshot");

	int p[2];
	if (closed_mode) {
		/* watch p[0], keep its file open through a dup, close p[0] */
		if (pipe(p)) return 1;
		stray_ep = epoll_create1(0);
		struct epoll_event e = { .events = EPOLLIN, .data.u64 = 1 };
		if (epoll_ctl(stray_ep, EPOLL_CTL_ADD, p[0], &e)) { perror("epoll_ctl"); return 1; }
		stray_keep = dup(p[0]);
		stray_w = p[1];
		stray_fd = p[0];
		close(p[0]);
		if (reused_mode && (stray_ev = eventfd(0, EFD_NONBLOCK)) != stray_fd) { fprintf(stderr, "eventfd not at %d\n", stray_fd); return 1; }
	} else if (oneshot_mode) {
		/* p[0] watched one-shot, fired once (data came, was read), empty now */
		if (pipe(p)) return 1;
		stray_ep = epoll_create1(0);
		struct epoll_event e = { .events = EPOLLIN | EPOLLONESHOT, .data.u64 = 1 };
		if (epoll_ctl(stray_ep, EPOLL_CTL_ADD, p[0], &e)) { perror("epoll_ctl"); return 1; }
		char c;
		if (write(p[1], "x", 1) != 1 || epoll_wait(stray_ep, &e, 1, 0) != 1 || read(p[0], &c, 1) != 1)
			return 1;
		stray_fd = p[0];
	} else {
		if (pipe(p)) return 1;
		ra = p[0], wa = p[1];
		if (pipe(p)) return 1;
		rb = p[0], wb = p[1];
		rb2 = dup(rb);
		ev = eventfd(0, EFD_NONBLOCK);
		ep1 = epoll_create1(EPOLL_CLOEXEC);
		ep2 = epoll_create1(0);
		struct epoll_event e;
#define ADD(ep, fd, ev_, d) do { e.events = (ev_); e.data.u64 = (d); \
		if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e)) { perror("epoll_ctl " #fd); return 1; } } while (0)
		ADD(ep1, ra, EPOLLIN, D_RA1);
		ADD(ep1, wb, EPOLLOUT, D_WB);
		ADD(ep1, ev, EPOLLIN | EPOLLET, D_EV1);
		ADD(ep1, rb, EPOLLIN | EPOLLONESHOT, D_RB);
		ADD(ep2, ra, EPOLLIN | EPOLLRDHUP, D_RA2);
		ADD(ep2, ep1, EPOLLIN, D_EP1);
		ADD(ep2, ev, EPOLLIN | EPOLLEXCLUSIVE, D_EV2);
		ADD(ep2, rb2, EPOLLIN, D_RB2);
		ADD(ep1, wa, EPOLLOUT | EPOLLONESHOT, D_WA);
		if (write(wa, "x", 1) != 1) return 1;
		/* fire the one-shot of wa once: it stays disabled */
		struct epoll_event evs[8];
		epoll_wait(ep1, evs, 8, 0);
		watches(ep1, gold1, sizeof(gold1));
		watches(ep2, gold2, sizeof(gold2));
	}

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
