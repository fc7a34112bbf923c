/*
 * posix_timer -- POSIX timers (timer_create) of every kind of notification.
 *
 *   posix_timer
 *
 * State set up before READY (ids made sparse: fillers are created, some
 * deleted again, so the timers do not sit at 0, 1, 2...):
 *   F0, F4  CLOCK_MONOTONIC, SIGEV_NONE, never armed
 *   A       CLOCK_MONOTONIC, SIGEV_SIGNAL SIGRTMIN+2, sival_ptr VAL_A,
 *           every 150 ms (handler with SA_SIGINFO counts and records)
 *   B       CLOCK_REALTIME, SIGEV_THREAD_ID to the worker thread,
 *           SIGRTMIN+4, sival_int VAL_B, every 250 ms (the worker takes it
 *           with sigwaitinfo; every thread blocks it)
 *   C       CLOCK_BOOTTIME, SIGEV_NONE, one-shot in 1000 s
 *   D       CLOCK_MONOTONIC, SIGEV_SIGNAL SIGRTMIN+5, sival_int VAL_D,
 *           one-shot in 2 s
 *   E       CLOCK_MONOTONIC, default notification (NULL sigevent: SIGALRM
 *           with sival_int = its id), never armed
 *
 * On SIGUSR1 it checks: every id still names its timer, with the same
 * interval and a plausible time left; A ticks 3 more times with the right
 * si_value, si_timerid and si_code, about 150 ms apart; B ticks twice more,
 * in the worker, with its si_value and id; C is still counting down (never
 * more than the last probe saw); D has fired exactly once (waiting for it
 * up to 5 s) with its value, and is disarmed; E, F0, F4 are disarmed; a new
 * timer can be created.  /proc/self/timers shows B aimed at the worker.
 * Prints "READY pid=P tid=T", then "PASS posix_timer pid=P ids=..." or
 * "FAIL posix_timer: <details> (pid=P)".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NAME "posix_timer"
#define VAL_A ((void *)0x5eed0000cafeUL)
#define VAL_B 0x777
#define VAL_D 0x4242
#define MS 1000000L

#include "probe.h"

static timer_t f0, f4, ta, tb, tc, td, te;
static int sig_a, sig_b, sig_d;

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* A: in the main thread's handler */
static volatile long count_a;
static volatile void *val_a;
static volatile int id_a, code_a;
static volatile int64_t at_a[2];
static void on_a(int sig, siginfo_t *si, void *uc)
{
	(void)sig; (void)uc;
	val_a = si->si_value.sival_ptr;
	id_a = si->si_timerid;
	code_a = si->si_code;
	at_a[0] = at_a[1];
	at_a[1] = now_ns();
	count_a++;
}

/* D: one-shot */
static volatile long count_d;
static volatile int val_d, id_d;
static void on_d(int sig, siginfo_t *si, void *uc)
{
	(void)sig; (void)uc;
	val_d = si->si_value.sival_int;
	id_d = si->si_timerid;
	count_d++;
}

/* B: taken by the worker with sigwaitinfo */
static volatile long count_b;
static volatile int val_b, id_b, code_b;
static volatile pid_t tid_b, worker_tid;
static void *worker(void *arg)
{
	(void)arg;
	sigset_t all, want;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	sigemptyset(&want);
	sigaddset(&want, sig_b);
	worker_tid = (pid_t)syscall(SYS_gettid);
	for (;;) {
		siginfo_t si;
		int r = sigwaitinfo(&want, &si);
		if (r != sig_b)
			continue;   /* EINTR */
		val_b = si.si_value.sival_int;
		id_b = si.si_timerid;
		code_b = si.si_code;
		tid_b = (pid_t)syscall(SYS_gettid);
		count_b++;
	}
	return NULL;
}

static int tid_of(timer_t t) { return (int)(intptr_t)t; }

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * MS };
	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

static int64_t ts_ns(struct timespec t) { return t.tv_sec * 1000000000LL + t.tv_nsec; }

static int get(timer_t t, const char *name, struct itimerspec *its)
{
	if (timer_gettime(t, its)) {
		fail("timer_gettime(%s id %d): %s", name, tid_of(t), strerror(errno));
		return -1;
	}
	return 0;
}

static void expect_disarmed(timer_t t, const char *name)
{
	struct itimerspec its;
	if (get(t, name, &its) == 0 && (ts_ns(its.it_value) || ts_ns(its.it_interval)))
		fail("%s armed: value %lld ns interval %lld ns", name,
		     (long long)ts_ns(its.it_value), (long long)ts_ns(its.it_interval));
}

static int wait_count(volatile long *c, long want, long ms)
{
	for (long i = 0; i < ms && *c < want; i++)
		sleep_ms(1);
	return *c >= want;
}

static int64_t last_c = 1000000000000LL * 1000;   /* C's time left at the last probe */

static void check_proc_timers(void)
{
	FILE *f = fopen("/proc/self/timers", "r");
	char line[256], want[64];
	int in_b = 0, ok = 0;
	snprintf(want, sizeof(want), "notify: signal/tid.%d", (int)worker_tid);
	if (!f) {
		fail("/proc/self/timers: %s", strerror(errno));
		return;
	}
	while (fgets(line, sizeof(line), f)) {
		int id;
		if (sscanf(line, "ID: %d", &id) == 1)
			in_b = id == tid_of(tb);
		else if (in_b && !strncmp(line, want, strlen(want)))
			ok = 1;
	}
	fclose(f);
	if (!ok)
		fail("/proc/self/timers does not show timer B (id %d) aimed at thread %d",
		     tid_of(tb), (int)worker_tid);
}

static void verify(void)
{
	struct itimerspec its;
	fails[0] = 0;

	/* A: periodic, process-directed */
	if (get(ta, "A", &its) == 0) {
		if (ts_ns(its.it_interval) != 150 * MS)
			fail("A interval %lld ns, want 150 ms", (long long)ts_ns(its.it_interval));
		if (ts_ns(its.it_value) <= 0 || ts_ns(its.it_value) > 150 * MS)
			fail("A time left %lld ns, want (0, 150 ms]", (long long)ts_ns(its.it_value));
	}
	if (timer_getoverrun(ta) < 0)
		fail("timer_getoverrun(A): %s", strerror(errno));
	long a0 = count_a;
	if (!wait_count(&count_a, a0 + 3, 3000)) {
		fail("A did not tick 3 times in 3 s (%ld ticks)", count_a - a0);
	} else {
		int64_t gap = at_a[1] - at_a[0];
		if (gap < 75 * MS || gap > 600 * MS)
			fail("A ticks %lld ms apart, want about 150", (long long)(gap / MS));
		if (val_a != VAL_A)
			fail("A si_value %p, want %p", (void *)val_a, VAL_A);
		if (id_a != tid_of(ta))
			fail("A si_timerid %d, want %d", id_a, tid_of(ta));
		if (code_a != SI_TIMER)
			fail("A si_code %d, want SI_TIMER", code_a);
	}

	/* B: periodic, to the worker thread */
	if (get(tb, "B", &its) == 0 && ts_ns(its.it_interval) != 250 * MS)
		fail("B interval %lld ns, want 250 ms", (long long)ts_ns(its.it_interval));
	long b0 = count_b;
	if (!wait_count(&count_b, b0 + 2, 3000)) {
		fail("B did not tick twice in 3 s (%ld ticks)", count_b - b0);
	} else {
		if (tid_b != worker_tid)
			fail("B delivered to thread %d, want the worker %d", (int)tid_b, (int)worker_tid);
		if (val_b != VAL_B)
			fail("B si_value %#x, want %#x", val_b, VAL_B);
		if (id_b != tid_of(tb) || code_b != SI_TIMER)
			fail("B si_timerid %d si_code %d, want %d SI_TIMER", id_b, code_b, tid_of(tb));
	}
	check_proc_timers();

	/* C: one-shot, far away, no notification */
	if (get(tc, "C", &its) == 0) {
		int64_t left = ts_ns(its.it_value);
		if (ts_ns(its.it_interval))
			fail("C interval %lld ns, want 0", (long long)ts_ns(its.it_interval));
		if (left <= 0 || left > 1000 * 1000 * MS || left > last_c)
			fail("C time left %lld ns, want (0, %lld]", (long long)left, (long long)last_c);
		last_c = left;
	}

	/* D: one-shot in 2 s */
	if (!wait_count(&count_d, 1, 5000))
		fail("D did not fire within 5 s");
	sleep_ms(5);
	if (count_d != 1)
		fail("D fired %ld times, want once", count_d);
	else if (val_d != VAL_D || id_d != tid_of(td))
		fail("D si_value %#x si_timerid %d, want %#x %d", val_d, id_d, VAL_D, tid_of(td));
	expect_disarmed(td, "D (fired)");

	expect_disarmed(te, "E");
	expect_disarmed(f0, "F0");
	expect_disarmed(f4, "F4");

	timer_t n;
	struct sigevent ev = { .sigev_notify = SIGEV_NONE };
	if (timer_create(CLOCK_MONOTONIC, &ev, &n)) {
		fail("a new timer_create: %s", strerror(errno));
	} else {
		timer_t all[] = { f0, f4, ta, tb, tc, td, te };
		for (unsigned i = 0; i < sizeof(all) / sizeof(all[0]); i++)
			if (tid_of(all[i]) == tid_of(n))
				fail("a new timer got id %d, which timer #%u has", tid_of(n), i);
		timer_delete(n);
	}

	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d ids=%d,%d,%d,%d,%d,%d,%d\n", getpid(), tid_of(f0),
		       tid_of(f4), tid_of(ta), tid_of(tb), tid_of(tc), tid_of(td), tid_of(te));
	fflush(stdout);
}

static timer_t make(clockid_t clk, int notify, int sig, union sigval v, pid_t tid)
{
	struct sigevent ev;
	timer_t t;
	memset(&ev, 0, sizeof(ev));
	ev.sigev_notify = notify;
	ev.sigev_signo = sig;
	ev.sigev_value = v;
	if (notify == SIGEV_THREAD_ID)
		ev._sigev_un._tid = tid;
	if (timer_create(clk, &ev, &t)) { perror("timer_create"); exit(1); }
	return t;
}

static void arm(timer_t t, long first_ms, long every_ms)
{
	struct itimerspec its = {
		.it_interval = { every_ms / 1000, (every_ms % 1000) * MS },
		.it_value = { first_ms / 1000, (first_ms % 1000) * MS },
	};
	if (timer_settime(t, 0, &its, NULL)) { perror("timer_settime"); exit(1); }
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	sig_a = SIGRTMIN + 2;
	sig_b = SIGRTMIN + 4;
	sig_d = SIGRTMIN + 5;

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_sigaction = on_a;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigaction(sig_a, &sa, NULL);
	sa.sa_sigaction = on_d;
	sigaction(sig_d, &sa, NULL);

	sigset_t bset;
	sigemptyset(&bset);
	sigaddset(&bset, sig_b);
	sigprocmask(SIG_BLOCK, &bset, NULL);   /* only the worker takes it */

	pthread_t th;
	if (pthread_create(&th, NULL, worker, NULL)) { perror("pthread_create"); return 1; }
	while (!worker_tid)
		sleep_ms(1);

	union sigval none = { .sival_int = 0 };
	timer_t fill[5];
	for (int i = 0; i < 5; i++)
		fill[i] = make(CLOCK_MONOTONIC, SIGEV_NONE, 0, none, 0);
	f0 = fill[0];
	f4 = fill[4];
	union sigval va = { .sival_ptr = VAL_A }, vb = { .sival_int = VAL_B },
		     vd = { .sival_int = VAL_D };
	ta = make(CLOCK_MONOTONIC, SIGEV_SIGNAL, sig_a, va, 0);
	for (int i = 1; i < 4; i++)
		timer_delete(fill[i]);
	tb = make(CLOCK_REALTIME, SIGEV_THREAD_ID, sig_b, vb, worker_tid);
	tc = make(CLOCK_BOOTTIME, SIGEV_NONE, 0, none, 0);
	td = make(CLOCK_MONOTONIC, SIGEV_SIGNAL, sig_d, vd, 0);
	if (timer_create(CLOCK_MONOTONIC, NULL, &te)) { perror("timer_create"); return 1; }

	arm(ta, 150, 150);
	arm(tb, 250, 250);
	arm(tc, 1000 * 1000, 0);
	arm(td, 2000, 0);

	printf("READY pid=%d tid=%d\n", getpid(), (int)worker_tid);
	fflush(stdout);

	for (;;) {
		if (probe_req) {
			probe_req = 0;
			verify();
		}
		sleep_ms(1);
	}
}
