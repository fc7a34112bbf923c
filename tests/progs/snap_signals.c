/*
 * snap_signals -- signal state a rollback must bring back: setitimer()
 * timers, POSIX timers, and the pending signals of the process and of each
 * thread.
 *
 *   snap_signals
 *
 * State set up before READY (every thread blocks every signal but SIGUSR1
 * and SIGUSR2, which only the main thread takes):
 *   ITIMER_REAL     one-shot, 1000 s left
 *   ITIMER_VIRTUAL  2000 s left, interval 1 s
 *   ITIMER_PROF     disarmed
 *   POSIX timer T1  CLOCK_MONOTONIC, SIGEV_NONE, 1000 s left
 *   POSIX timer T2  CLOCK_MONOTONIC, SIGEV_SIGNAL SIGRTMIN+6, 500 s left
 *   pending, process-wide   SIGRTMIN+1 with sival_int 111 (sigqueue)
 *   pending, main thread    SIGRTMIN+4 with sival_int 44 (pthread_sigqueue)
 *   pending, worker thread  SIGRTMIN+2 with sival_int 22 (pthread_sigqueue)
 *
 * On SIGUSR2 it changes all of it (prints "MUTATED pid=P"):
 *   ITIMER_REAL 5000 s every 7 s; ITIMER_VIRTUAL disarmed; ITIMER_PROF 3000 s;
 *   T1 re-armed to 4000 s, T2 deleted, a new timer T3 (SIGEV_NONE, 700 s);
 *   the process-wide SIGRTMIN+1 taken (sigtimedwait), SIGRTMIN+1 value 222
 *   and SIGHUP queued instead; the main thread's SIGRTMIN+4 taken and
 *   SIGRTMIN+5 queued to it; SIGRTMIN+3 queued to the worker.
 *
 * On SIGUSR1 it checks the READY state (so after a mutation: FAIL; after a
 * rollback to a snapshot taken before it: PASS).  Pending values are taken
 * with sigtimedwait and queued again, so a probe leaves the state as it was.
 * Prints "PASS snap_signals pid=P" or "FAIL snap_signals: <details> (pid=P)".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define NAME "snap_signals"
#include "probe.h"

static volatile sig_atomic_t mutate_req;
static void on_usr2(int s) { (void)s; mutate_req = 1; }

static timer_t t1, t2;
static pid_t worker_tid;
static pthread_t worker;

static void *work(void *arg)
{
	(void)arg;
	worker_tid = (pid_t)syscall(SYS_gettid);
	for (;;)
		pause();          /* every signal blocked: never returns */
	return NULL;
}

/* a pending-signal mask from /proc/self/task/TID/status ("SigPnd" or "ShdPnd") */
static uint64_t pnd(pid_t tid, const char *key)
{
	char path[64], line[256];
	uint64_t v = ~0ULL;
	snprintf(path, sizeof(path), "/proc/self/task/%d/status", tid);
	FILE *f = fopen(path, "r");
	if (!f) return v;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, key, strlen(key)) && line[strlen(key)] == ':')
			v = strtoull(line + strlen(key) + 1, NULL, 16);
	fclose(f);
	return v;
}

static uint64_t bit(int sig) { return 1ULL << (sig - 1); }

static int ntimers(void)
{
	FILE *f = fopen("/proc/self/timers", "r");
	char line[256];
	int n = 0;
	if (!f) return -1;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, "ID:", 3)) n++;
	fclose(f);
	return n;
}

static void arm(timer_t t, time_t left)
{
	struct itimerspec its = {{0, 0}, {left, 0}};
	if (timer_settime(t, 0, &its, NULL)) { perror("timer_settime"); exit(1); }
}

static void set_itimer(int which, time_t interval, time_t left)
{
	struct itimerval v = {{interval, 0}, {left, 0}};
	if (setitimer(which, &v, NULL)) { perror("setitimer"); exit(1); }
}

/* take the one pending `sig` (own or process-wide), check its value, queue it again */
static void take_and_requeue(int sig, int want, int shared)
{
	sigset_t s;
	siginfo_t si;
	struct timespec zero = {0, 0};
	sigemptyset(&s);
	sigaddset(&s, sig);
	if (sigtimedwait(&s, &si, &zero) != sig) {
		fail("SIGRTMIN+%d not pending", sig - SIGRTMIN);
		return;
	}
	if (si.si_value.sival_int != want)
		fail("SIGRTMIN+%d value %d, expected %d", sig - SIGRTMIN, si.si_value.sival_int, want);
	if (sigtimedwait(&s, &si, &zero) == sig)
		fail("SIGRTMIN+%d queued more than once", sig - SIGRTMIN);
	union sigval v = {.sival_int = want};
	if (shared) sigqueue(getpid(), sig, v);
	else pthread_sigqueue(pthread_self(), sig, v);
}

static void verify(void)
{
	struct itimerval it;
	struct itimerspec its;
	pid_t me = getpid();
	fails[0] = 0;
	getitimer(ITIMER_REAL, &it);
	if (it.it_value.tv_sec > 1000 || it.it_value.tv_sec < 900 || it.it_interval.tv_sec)
		fail("ITIMER_REAL %ld s left every %ld s, expected ~1000 one-shot",
		     (long)it.it_value.tv_sec, (long)it.it_interval.tv_sec);
	getitimer(ITIMER_VIRTUAL, &it);
	if (it.it_value.tv_sec > 2000 || it.it_value.tv_sec < 1990 || it.it_interval.tv_sec != 1)
		fail("ITIMER_VIRTUAL %ld s left every %ld s, expected ~2000 every 1",
		     (long)it.it_value.tv_sec, (long)it.it_interval.tv_sec);
	getitimer(ITIMER_PROF, &it);
	if (it.it_value.tv_sec || it.it_value.tv_usec)
		fail("ITIMER_PROF armed (%ld s left)", (long)it.it_value.tv_sec);
	if (timer_gettime(t1, &its)) fail("T1 gone: %s", strerror(errno));
	else if (its.it_value.tv_sec > 1000 || its.it_value.tv_sec < 900)
		fail("T1 %ld s left, expected ~1000", (long)its.it_value.tv_sec);
	if (timer_gettime(t2, &its)) fail("T2 gone: %s", strerror(errno));
	else if (its.it_value.tv_sec > 500 || its.it_value.tv_sec < 400)
		fail("T2 %ld s left, expected ~500", (long)its.it_value.tv_sec);
	int n = ntimers();
	if (n != 2) fail("%d POSIX timers, expected 2", n);
	uint64_t shd = pnd(me, "ShdPnd"), mine = pnd(me, "SigPnd"), his = pnd(worker_tid, "SigPnd");
	if (shd != bit(SIGRTMIN + 1)) fail("process-wide pending %llx, expected %llx",
					   (unsigned long long)shd, (unsigned long long)bit(SIGRTMIN + 1));
	if (mine != bit(SIGRTMIN + 4)) fail("main thread pending %llx, expected %llx",
					    (unsigned long long)mine, (unsigned long long)bit(SIGRTMIN + 4));
	if (his != bit(SIGRTMIN + 2)) fail("worker pending %llx, expected %llx",
					   (unsigned long long)his, (unsigned long long)bit(SIGRTMIN + 2));
	if (!fails[0]) {
		take_and_requeue(SIGRTMIN + 4, 44, 0);    /* own queue first */
		take_and_requeue(SIGRTMIN + 1, 111, 1);
	}
	if (fails[0]) printf("FAIL " NAME ": %s (pid=%d)\n", fails, me);
	else printf("PASS " NAME " pid=%d\n", me);
}

static void mutate(void)
{
	sigset_t s;
	struct timespec zero = {0, 0};
	timer_t t3;
	struct sigevent ev = {.sigev_notify = SIGEV_NONE};
	set_itimer(ITIMER_REAL, 7, 5000);
	set_itimer(ITIMER_VIRTUAL, 0, 0);
	set_itimer(ITIMER_PROF, 0, 3000);
	arm(t1, 4000);
	timer_delete(t2);
	if (timer_create(CLOCK_MONOTONIC, &ev, &t3)) { perror("timer_create"); exit(1); }
	arm(t3, 700);
	sigemptyset(&s);
	sigaddset(&s, SIGRTMIN + 4);
	sigtimedwait(&s, NULL, &zero);
	sigemptyset(&s);
	sigaddset(&s, SIGRTMIN + 1);
	sigtimedwait(&s, NULL, &zero);
	sigqueue(getpid(), SIGRTMIN + 1, (union sigval){.sival_int = 222});
	kill(getpid(), SIGHUP);
	pthread_sigqueue(pthread_self(), SIGRTMIN + 5, (union sigval){.sival_int = 55});
	pthread_sigqueue(worker, SIGRTMIN + 3, (union sigval){.sival_int = 33});
	printf("MUTATED pid=%d\n", getpid());
}

int main(void)
{
	sigset_t all, run;
	struct sigaction sa = {0};
	setvbuf(stdout, NULL, _IOLBF, 0);
	sigfillset(&all);
	sigprocmask(SIG_BLOCK, &all, NULL);
	if (pthread_create(&worker, NULL, work, NULL)) { perror("pthread_create"); return 1; }
	while (!worker_tid) usleep(1000);
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_usr2;
	sigaction(SIGUSR2, &sa, NULL);

	set_itimer(ITIMER_REAL, 0, 1000);
	set_itimer(ITIMER_VIRTUAL, 1, 2000);
	struct sigevent ev = {.sigev_notify = SIGEV_NONE};
	timer_t f0;
	if (timer_create(CLOCK_MONOTONIC, &ev, &f0)) { perror("timer_create"); return 1; }
	if (timer_create(CLOCK_MONOTONIC, &ev, &t1)) { perror("timer_create"); return 1; }
	ev.sigev_notify = SIGEV_SIGNAL;
	ev.sigev_signo = SIGRTMIN + 6;
	ev.sigev_value.sival_int = 66;
	if (timer_create(CLOCK_MONOTONIC, &ev, &t2)) { perror("timer_create"); return 1; }
	timer_delete(f0);                 /* ids not simply 0, 1 */
	arm(t1, 1000);
	arm(t2, 500);
	sigqueue(getpid(), SIGRTMIN + 1, (union sigval){.sival_int = 111});
	pthread_sigqueue(pthread_self(), SIGRTMIN + 4, (union sigval){.sival_int = 44});
	pthread_sigqueue(worker, SIGRTMIN + 2, (union sigval){.sival_int = 22});

	printf("READY pid=%d tid=%d\n", getpid(), worker_tid);
	run = all;                  /* everything else stays blocked (and pending) */
	sigdelset(&run, SIGUSR1);
	sigdelset(&run, SIGUSR2);
	for (;;) {
		sigsuspend(&run);
		if (probe_req) { probe_req = 0; verify(); }
		if (mutate_req) { mutate_req = 0; mutate(); }
	}
}
