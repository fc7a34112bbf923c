/*
 * signals -- signal dispositions, mask, pending signals and sigaltstack.
 *
 *   signals
 *
 * State set up before READY:
 *   SIGUSR2  handler with SA_SIGINFO|SA_RESTART|SA_ONSTACK and
 *            sa_mask {SIGINT, SIGQUIT, SIGWINCH}, runs on an alternate stack
 *   SIGINT   handler with SA_RESETHAND|SA_NODEFER (never raised)
 *   SIGTERM  ignored
 *   SIGUSR1  probe handler (SA_RESTART)
 *   blocked  {SIGHUP, SIGRTMIN+3}
 *   pending  SIGHUP (raise(), i.e. tgkill: SI_TKILL), and SIGRTMIN+3 queued
 *            twice with sigqueue() values 0x1234 then 0x5678 (SI_QUEUE)
 *   sigaltstack of ALT_SIZE bytes at a static array
 *
 * On SIGUSR1 it checks all of it (pending signals are taken with
 * sigtimedwait, checked -- siginfo included -- and queued again, so the
 * state is the same for the next probe), raises SIGUSR2 and checks that the
 * handler ran on the alternate stack with the right mask and siginfo.
 * Prints "PASS signals pid=P" or "FAIL signals: <details> (pid=P)".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NAME "signals"
#define ALT_SIZE (64 * 1024)
#define RTSIG (SIGRTMIN + 3)
#ifndef SA_RESTORER
#define SA_RESTORER 0x04000000   /* set by glibc, not by us */
#endif

#include "probe.h"

static char altstack[ALT_SIZE] __attribute__((aligned(16)));
static pid_t ready_pid;

/* what the SIGUSR2 handler saw */
static volatile int usr2_count;
static volatile uintptr_t usr2_sp;
static volatile int usr2_signo, usr2_code, usr2_ss_flags;
static sigset_t usr2_mask;

static void on_usr2(int sig, siginfo_t *si, void *uc)
{
	volatile char here;
	stack_t ss;
	(void)sig; (void)uc;
	usr2_sp = (uintptr_t)&here;
	usr2_signo = si->si_signo;
	usr2_code = si->si_code;
	sigprocmask(SIG_BLOCK, NULL, &usr2_mask);
	usr2_ss_flags = sigaltstack(NULL, &ss) ? -1 : ss.ss_flags;
	usr2_count++;
}

static void on_int(int sig) { (void)sig; }

static void set_action(int sig, void (*h)(int), void (*sa3)(int, siginfo_t *, void *),
		       int flags, const int *mask_sigs)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	if (sa3)
		sa.sa_sigaction = sa3;
	else
		sa.sa_handler = h;
	sa.sa_flags = flags;
	sigemptyset(&sa.sa_mask);
	for (; mask_sigs && *mask_sigs; mask_sigs++)
		sigaddset(&sa.sa_mask, *mask_sigs);
	if (sigaction(sig, &sa, NULL)) { perror("sigaction"); exit(1); }
}

static int sigset_eq(const sigset_t *a, const sigset_t *b, char *diff, size_t dl)
{
	int eq = 1;
	diff[0] = 0;
	for (int s = 1; s < NSIG; s++) {
		if (s == SIGKILL || s == SIGSTOP)
			continue;
		if (sigismember(a, s) != sigismember(b, s)) {
			size_t n = strlen(diff);
			snprintf(diff + n, dl - n, "%s%s%d", n ? "," : "",
				 sigismember(a, s) ? "+" : "-", s);
			eq = 0;
		}
	}
	return eq;
}

static void check_action(int sig, const char *name, void *want_handler, int want_flags,
			 const int *mask_sigs)
{
	struct sigaction sa;
	sigset_t want;
	char diff[256];
	if (sigaction(sig, NULL, &sa)) {
		fail("sigaction(%s): %s", name, strerror(errno));
		return;
	}
	void *h = (sa.sa_flags & SA_SIGINFO) ? (void *)sa.sa_sigaction : (void *)sa.sa_handler;
	if (h != want_handler)
		fail("%s handler %p, want %p", name, h, want_handler);
	int flags = sa.sa_flags & ~SA_RESTORER;
	if (flags != want_flags)
		fail("%s sa_flags %#x, want %#x", name, flags, want_flags);
	sigemptyset(&want);
	for (; mask_sigs && *mask_sigs; mask_sigs++)
		sigaddset(&want, *mask_sigs);
	if (!sigset_eq(&sa.sa_mask, &want, diff, sizeof(diff)))
		fail("%s sa_mask differs: %s", name, diff);
}

static const int usr2_mask_sigs[] = { SIGINT, SIGQUIT, SIGWINCH, 0 };

static void take_pending(int sig, const char *name, int want_code, int want_val)
{
	sigset_t set;
	siginfo_t si;
	struct timespec zero = { 0, 0 };
	sigemptyset(&set);
	sigaddset(&set, sig);
	memset(&si, 0, sizeof(si));
	/* the raw syscall: glibc's sigtimedwait() folds SI_TKILL into SI_USER */
	int r = syscall(SYS_rt_sigtimedwait, &set, &si, &zero, _NSIG / 8);
	if (r != sig) {
		fail("%s not pending (sigtimedwait: %s)", name, r < 0 ? strerror(errno) : "other");
		return;
	}
	if (si.si_code != want_code)
		fail("pending %s si_code %d, want %d", name, si.si_code, want_code);
	if (si.si_pid != ready_pid || si.si_uid != getuid())
		fail("pending %s si_pid %d si_uid %d, want %d %d", name, si.si_pid,
		     si.si_uid, ready_pid, getuid());
	if (want_code == SI_QUEUE && si.si_value.sival_int != want_val)
		fail("pending %s si_value %#x, want %#x", name, si.si_value.sival_int, want_val);
}

static void make_pending(void)
{
	union sigval v;
	raise(SIGHUP);
	v.sival_int = 0x1234;
	sigqueue(getpid(), RTSIG, v);
	v.sival_int = 0x5678;
	sigqueue(getpid(), RTSIG, v);
}

static void verify(void)
{
	sigset_t cur, want, pend;
	char diff[256];
	stack_t ss;
	fails[0] = 0;

	if (getpid() != ready_pid)
		fail("pid %d, was %d", getpid(), ready_pid);

	check_action(SIGUSR2, "SIGUSR2", (void *)on_usr2,
		     SA_SIGINFO | SA_RESTART | SA_ONSTACK, usr2_mask_sigs);
	check_action(SIGINT, "SIGINT", (void *)on_int, SA_RESETHAND | SA_NODEFER, NULL);
	check_action(SIGTERM, "SIGTERM", (void *)SIG_IGN, 0, NULL);
	check_action(SIGUSR1, "SIGUSR1", (void *)on_usr1, SA_RESTART, NULL);
	check_action(SIGQUIT, "SIGQUIT", (void *)SIG_DFL, 0, NULL);
	check_action(SIGALRM, "SIGALRM", (void *)SIG_DFL, 0, NULL);

	sigemptyset(&want);
	sigaddset(&want, SIGHUP);
	sigaddset(&want, RTSIG);
	sigprocmask(SIG_BLOCK, NULL, &cur);
	if (!sigset_eq(&cur, &want, diff, sizeof(diff)))
		fail("blocked mask differs: %s", diff);
	sigpending(&pend);
	if (!sigset_eq(&pend, &want, diff, sizeof(diff)))
		fail("pending set differs: %s", diff);

	/* take the pending signals with their siginfo, then pend them again */
	take_pending(SIGHUP, "SIGHUP", SI_TKILL, 0);
	take_pending(RTSIG, "SIGRTMIN+3 #1", SI_QUEUE, 0x1234);
	take_pending(RTSIG, "SIGRTMIN+3 #2", SI_QUEUE, 0x5678);
	sigpending(&pend);
	if (sigismember(&pend, RTSIG) || sigismember(&pend, SIGHUP))
		fail("more pending signals than were queued");
	make_pending();

	if (sigaltstack(NULL, &ss))
		fail("sigaltstack: %s", strerror(errno));
	else if (ss.ss_sp != altstack || ss.ss_size != ALT_SIZE || ss.ss_flags != 0)
		fail("sigaltstack sp %p size %zu flags %d, want %p %d 0", ss.ss_sp,
		     ss.ss_size, ss.ss_flags, (void *)altstack, ALT_SIZE);

	int before = usr2_count;
	raise(SIGUSR2);
	if (usr2_count != before + 1) {
		fail("SIGUSR2 handler did not run");
	} else {
		if (usr2_sp < (uintptr_t)altstack || usr2_sp >= (uintptr_t)altstack + ALT_SIZE)
			fail("SIGUSR2 handler ran at sp %#lx, not on the alternate stack %p",
			     (unsigned long)usr2_sp, (void *)altstack);
		if (usr2_signo != SIGUSR2 || usr2_code != SI_TKILL)
			fail("SIGUSR2 siginfo signo %d code %d", usr2_signo, usr2_code);
		if (!(usr2_ss_flags & SS_ONSTACK))
			fail("sigaltstack in handler: flags %d, no SS_ONSTACK", usr2_ss_flags);
		sigset_t hw = want;
		for (const int *s = usr2_mask_sigs; *s; s++)
			sigaddset(&hw, *s);
		sigaddset(&hw, SIGUSR2);
		if (!sigset_eq(&usr2_mask, &hw, diff, sizeof(diff)))
			fail("mask inside SIGUSR2 handler differs: %s", diff);
	}
	sigprocmask(SIG_BLOCK, NULL, &cur);
	if (!sigset_eq(&cur, &want, diff, sizeof(diff)))
		fail("blocked mask after handler differs: %s", diff);

	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d\n", getpid());
	fflush(stdout);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	ready_pid = getpid();

	stack_t ss = { .ss_sp = altstack, .ss_size = ALT_SIZE, .ss_flags = 0 };
	if (sigaltstack(&ss, NULL)) { perror("sigaltstack"); return 1; }
	set_action(SIGUSR2, NULL, on_usr2, SA_SIGINFO | SA_RESTART | SA_ONSTACK, usr2_mask_sigs);
	set_action(SIGINT, on_int, NULL, SA_RESETHAND | SA_NODEFER, NULL);
	set_action(SIGTERM, SIG_IGN, NULL, 0, NULL);
	set_action(SIGUSR1, on_usr1, NULL, SA_RESTART, NULL);
	set_action(SIGQUIT, SIG_DFL, NULL, 0, NULL);   /* a shell may have ignored it */
	set_action(SIGALRM, SIG_DFL, NULL, 0, NULL);

	sigset_t block;
	sigemptyset(&block);
	sigaddset(&block, SIGHUP);
	sigaddset(&block, RTSIG);
	sigprocmask(SIG_BLOCK, &block, NULL);
	make_pending();

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
