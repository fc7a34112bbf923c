/*
 * roll_attrs -- process attributes and area flags that a rollback must give
 * back (tests/test_rollback_attrs.py checks them from outside).
 *
 *   roll_attrs
 *
 * Areas of 16 pages, each apart: D (MADV_DONTDUMP), F (no flag), H
 * (MADV_NOHUGEPAGE), L (not locked), G (a guard region on its first page).
 * Prints "READY pid=P D=0x.. F=0x.. H=0x.. L=0x.. G=0x..".
 * SIGUSR2 (change): nice +5, I/O class idle, affinity {CPU 0}, oom_score_adj 300,
 * RLIMIT_NOFILE soft 100, timer slack 777777, subreaper, D MADV_DODUMP, F
 * MADV_DONTFORK, H MADV_HUGEPAGE, L mlock, G: guard moved to its second
 * page; prints "CHANGED pid=P".
 * SIGHUP: sets no_new_privs; prints "NNP pid=P".
 * SIGWINCH: installs an allow-all seccomp filter (as root); prints
 * "SECCOMP pid=P r=R".
 * SIGUSR1: "PASS roll_attrs pid=P".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/syscall.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>
#include "probe.h"

#define PG 4096UL
#define N 16
#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#define MADV_GUARD_REMOVE 103
#endif

static volatile sig_atomic_t change_req;
static volatile sig_atomic_t nnp_req;
static void on_usr2(int s) { (void)s; change_req = 1; }
static void on_hup(int s) { (void)s; nnp_req = 1; }
static volatile sig_atomic_t sec_req;
static void on_winch(int s) { (void)s; sec_req = 1; }

static char *area(void)
{
	/* a hole after each area: no two merge */
	char *p = mmap(NULL, (N + 1) * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) { perror("mmap"); _exit(1); }
	munmap(p + N * PG, PG);
	memset(p, 1, N * PG);
	return p;
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGUSR1, on_usr1);
	signal(SIGUSR2, on_usr2);
	signal(SIGHUP, on_hup);
	signal(SIGWINCH, on_winch);
	char *d = area(), *f = area(), *h = area(), *l = area(), *g = area();
	madvise(d, N * PG, MADV_DONTDUMP);
	madvise(h, N * PG, MADV_NOHUGEPAGE);
	if (madvise(g, PG, MADV_GUARD_INSTALL)) perror("guard");
	printf("READY pid=%d D=%p F=%p H=%p L=%p G=%p\n", getpid(), d, f, h, l, g);
	for (;;) {
		sigset_t all, old;
		sigfillset(&all);
		sigprocmask(SIG_BLOCK, &all, &old);
		if (probe_req) {
			probe_req = 0;
			printf("PASS roll_attrs pid=%d\n", getpid());
		}
		if (nnp_req) {
			nnp_req = 0;
			prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
			printf("NNP pid=%d\n", getpid());
		}
		if (sec_req) {
			sec_req = 0;
			struct sock_filter allow[] = { BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW) };
			struct sock_fprog prog = { 1, allow };
			long r = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
			printf("SECCOMP pid=%d r=%ld\n", getpid(), r);
		}
		if (change_req) {
			change_req = 0;
			setpriority(PRIO_PROCESS, 0, getpriority(PRIO_PROCESS, 0) + 5);
			syscall(SYS_ioprio_set, 1, 0, 3 << 13);     /* IOPRIO_WHO_PROCESS, idle */
			cpu_set_t one;
			CPU_ZERO(&one);
			CPU_SET(0, &one);
			sched_setaffinity(0, sizeof one, &one);
			int fd = open("/proc/self/oom_score_adj", O_WRONLY);
			if (fd >= 0) { (void)!write(fd, "300", 3); close(fd); }
			struct rlimit rl;
			getrlimit(RLIMIT_NOFILE, &rl);
			rl.rlim_cur = 100;
			setrlimit(RLIMIT_NOFILE, &rl);
			prctl(PR_SET_TIMERSLACK, 777777UL, 0, 0, 0);
			prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
			madvise(d, N * PG, MADV_DODUMP);
			madvise(f, N * PG, MADV_DONTFORK);
			madvise(h, N * PG, MADV_HUGEPAGE);
			if (mlock(l, N * PG)) perror("mlock");
			madvise(g, PG, MADV_GUARD_REMOVE);
			madvise(g + PG, PG, MADV_GUARD_INSTALL);
			printf("CHANGED pid=%d\n", getpid());
		}
		sigprocmask(SIG_SETMASK, &old, NULL);
		usleep(1000);
	}
}
