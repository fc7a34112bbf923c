/*
 * sleeper -- a process that spends its life blocked in system calls.
 *
 *   sleeper long     blocked in 10 s calls; an interval timer (ITIMER_REAL,
 *                    100 ms, SIGALRM handler without SA_RESTART) interrupts
 *                    them: nanosleep(10 s) resumed with the remaining time,
 *                    sigsuspend(), clock_nanosleep(TIMER_ABSTIME, +10 s)
 *                    resumed with the same deadline, poll(10 s), select(10 s),
 *                    sigtimedwait(10 s).  Needs the timer to survive restore.
 *   sleeper short    no timer: the same kinds of calls with 100 ms timeouts.
 *
 * A checkpoint almost surely interrupts one of these calls.  After restore
 * the call must either be restarted or fail with EINTR (both are handled);
 * anything else (another errno, a wrong remaining time, a timeout reported
 * too early) is recorded as a failure.
 *
 * Prints "READY pid=P mode=M", then every 100 ms "HB n=N call=NAME".
 * On SIGUSR1 (which also interrupts the current call) it checks the
 * recorded errors, the timer (long mode: interval 100 ms, still armed, a
 * tick arrives within 2 s) and prints "PASS sleeper pid=P hb=N" or
 * "FAIL sleeper: <details> (pid=P)".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define NAME "sleeper"
#define TICK_US 100000

static volatile sig_atomic_t probe_req, ticks;
static void on_usr1(int sig) { (void)sig; probe_req = 1; }
static void on_alrm(int sig) { (void)sig; ticks++; }

static char fails[4096];
static void fail(const char *fmt, ...)
{
	size_t n = strlen(fails);
	va_list ap;
	if (n && n < sizeof(fails) - 2) { strcat(fails, "; "); n += 2; }
	va_start(ap, fmt);
	vsnprintf(fails + n, sizeof(fails) - n, fmt, ap);
	va_end(ap);
}

/* errors seen by the calls, reported at the next probe (sticky) */
static char errs[2048];
static long nerrs;
static void call_error(const char *fmt, ...)
{
	size_t n = strlen(errs);
	va_list ap;
	nerrs++;
	if (n > sizeof(errs) - 200)
		return;
	if (n) { strcat(errs, "; "); n += 2; }
	va_start(ap, fmt);
	vsnprintf(errs + n, sizeof(errs) - n, fmt, ap);
	va_end(ap);
}

static int long_mode;
static long hb;
static const char *cur_call = "-";

static double mono(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

static double ts_sec(const struct timespec *t) { return t->tv_sec + t->tv_nsec * 1e-9; }

static void verify(void);

static void heartbeat(void)
{
	hb++;
	printf("HB n=%ld call=%s\n", hb, cur_call);
	fflush(stdout);
}

/* after every return from a blocking call */
static long seen_ticks;
static void service(void)
{
	if (long_mode && ticks != seen_ticks) {
		seen_ticks = ticks;
		heartbeat();
	}
	if (probe_req) {
		probe_req = 0;
		verify();
	}
}

static int expect_eintr(int r, const char *call)
{
	if (r == 0)
		return 0;
	if (errno != EINTR)
		call_error("%s: %s", call, strerror(errno));
	return -1;
}

/* ---- long mode: 10 s calls, cut short by the 100 ms timer ---------------- */

static void long_round(int which)
{
	const int per_call = 5;                 /* heartbeats per kind of call */
	long until = hb + per_call;
	switch (which) {
	case 0: {
		cur_call = "nanosleep";
		struct timespec req = { 10, 0 }, rem;
		while (hb < until) {
			double t0 = mono();
			int r = nanosleep(&req, &rem);
			if (r == 0) {
				if (mono() - t0 < ts_sec(&req) - 0.01)
					call_error("nanosleep returned %.3f s early",
						   ts_sec(&req) - (mono() - t0));
				req.tv_sec = 10; req.tv_nsec = 0;
			} else if (expect_eintr(r, "nanosleep") == -1 && errno == EINTR) {
				if (ts_sec(&rem) > ts_sec(&req) || ts_sec(&rem) < 0)
					call_error("nanosleep remaining %.3f s > requested %.3f s",
						   ts_sec(&rem), ts_sec(&req));
				req = rem;     /* go on sleeping what is left */
				if (req.tv_sec == 0 && req.tv_nsec == 0)
					req.tv_sec = 10;
			}
			service();
		}
		break;
	}
	case 1: {
		cur_call = "sigsuspend";
		sigset_t none;
		sigemptyset(&none);
		while (hb < until) {
			int r = sigsuspend(&none);
			if (r != -1 || errno != EINTR)
				call_error("sigsuspend returned %d (%s)", r, strerror(errno));
			service();
		}
		break;
	}
	case 2: {
		cur_call = "clock_nanosleep";
		struct timespec dl;
		clock_gettime(CLOCK_MONOTONIC, &dl);
		dl.tv_sec += 10;
		while (hb < until) {
			int r = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &dl, NULL);
			if (r == 0) {
				struct timespec now;
				clock_gettime(CLOCK_MONOTONIC, &now);
				if (ts_sec(&now) < ts_sec(&dl))
					call_error("clock_nanosleep(ABSTIME) returned %.3f s early",
						   ts_sec(&dl) - ts_sec(&now));
				dl = now;
				dl.tv_sec += 10;
			} else if (r != EINTR) {
				call_error("clock_nanosleep: %s", strerror(r));
			}
			service();
		}
		break;
	}
	case 3: {
		cur_call = "poll";
		while (hb < until) {
			int r = poll(NULL, 0, 10000);
			if (r != -1 || errno != EINTR) {
				if (r != 0)
					call_error("poll: %d %s", r, strerror(errno));
			}
			service();
		}
		break;
	}
	case 4: {
		cur_call = "select";
		while (hb < until) {
			struct timeval tv = { 10, 0 };
			int r = select(0, NULL, NULL, NULL, &tv);
			if (r != 0)
				expect_eintr(r, "select");
			service();
		}
		break;
	}
	case 5: {
		cur_call = "sigtimedwait";
		sigset_t set;
		sigemptyset(&set);
		sigaddset(&set, SIGUSR2);        /* never sent */
		while (hb < until) {
			struct timespec to = { 10, 0 };
			int r = sigtimedwait(&set, NULL, &to);
			if (r == -1 && errno != EINTR && errno != EAGAIN)
				call_error("sigtimedwait: %s", strerror(errno));
			else if (r != -1)
				call_error("sigtimedwait returned signal %d", r);
			service();
		}
		break;
	}
	}
}

/* ---- short mode: 100 ms calls, no timer ---------------------------------- */

static void short_round(int which)
{
	double t0 = mono();
	switch (which) {
	case 0: {
		cur_call = "nanosleep";
		struct timespec req = { 0, TICK_US * 1000L }, rem;
		for (;;) {
			int r = nanosleep(&req, &rem);
			if (r == 0)
				break;
			if (errno != EINTR) { call_error("nanosleep: %s", strerror(errno)); break; }
			if (ts_sec(&rem) > ts_sec(&req))
				call_error("nanosleep remaining %.3f s > requested %.3f s",
					   ts_sec(&rem), ts_sec(&req));
			req = rem;
			service();
		}
		break;
	}
	case 1: {
		cur_call = "clock_nanosleep";
		struct timespec dl;
		clock_gettime(CLOCK_MONOTONIC, &dl);
		dl.tv_nsec += TICK_US * 1000L;
		if (dl.tv_nsec >= 1000000000L) { dl.tv_sec++; dl.tv_nsec -= 1000000000L; }
		int r;
		while ((r = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &dl, NULL)) == EINTR)
			service();
		if (r)
			call_error("clock_nanosleep: %s", strerror(r));
		break;
	}
	case 2: {
		cur_call = "poll";
		int r;
		while ((r = poll(NULL, 0, TICK_US / 1000)) == -1 && errno == EINTR)
			service();      /* restarting with the full timeout is fine here */
		if (r != 0)
			call_error("poll: %d %s", r, strerror(errno));
		break;
	}
	case 3: {
		cur_call = "select";
		struct timeval tv = { 0, TICK_US };
		int r;
		while ((r = select(0, NULL, NULL, NULL, &tv)) == -1 && errno == EINTR)
			service();      /* Linux select updates tv: the rest is left */
		if (r != 0)
			call_error("select: %d %s", r, strerror(errno));
		break;
	}
	case 4: {
		cur_call = "sigtimedwait";
		sigset_t set;
		sigemptyset(&set);
		sigaddset(&set, SIGUSR2);
		struct timespec to = { 0, TICK_US * 1000L };
		int r;
		while ((r = sigtimedwait(&set, NULL, &to)) == -1 && errno == EINTR)
			service();
		if (r != -1 || errno != EAGAIN)
			call_error("sigtimedwait: %d %s", r, strerror(errno));
		break;
	}
	}
	(void)t0;
	heartbeat();
	service();
}

static void verify(void)
{
	fails[0] = 0;
	if (nerrs)
		fail("%ld system call errors: %s", nerrs, errs);
	if (long_mode) {
		struct itimerval it;
		getitimer(ITIMER_REAL, &it);
		if (it.it_interval.tv_sec != 0 || it.it_interval.tv_usec != TICK_US)
			fail("ITIMER_REAL interval %ld.%06ld s, want 0.%06d s",
			     (long)it.it_interval.tv_sec, (long)it.it_interval.tv_usec, TICK_US);
		if (it.it_value.tv_sec == 0 && it.it_value.tv_usec == 0)
			fail("ITIMER_REAL is disarmed");
		/* a tick must come: the timer really runs */
		long t = ticks;
		double t0 = mono();
		while (ticks == t && mono() - t0 < 2.0) {
			struct timespec s = { 0, 20000000 };
			nanosleep(&s, NULL);
		}
		if (ticks == t)
			fail("no SIGALRM tick for 2 s");
	}
	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d hb=%ld\n", getpid(), hb);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 2 || (strcmp(argv[1], "long") && strcmp(argv[1], "short"))) {
		fprintf(stderr, "usage: sleeper long|short\n");
		return 2;
	}
	long_mode = !strcmp(argv[1], "long");

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	if (long_mode) {
		sa.sa_handler = on_alrm;
		sa.sa_flags = 0;                 /* no SA_RESTART: calls get EINTR */
		sigaction(SIGALRM, &sa, NULL);
		struct itimerval it = { { 0, TICK_US }, { 0, TICK_US } };
		if (setitimer(ITIMER_REAL, &it, NULL)) { perror("setitimer"); return 1; }
	}

	printf("READY pid=%d mode=%s\n", getpid(), argv[1]);
	fflush(stdout);
	for (int round = 0;; round++) {
		if (long_mode)
			long_round(round % 6);
		else
			short_round(round % 5);
	}
}
