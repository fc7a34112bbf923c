/*
 * state_attrs -- per-process and per-thread kernel state that must come
 * back exactly after checkpoint/restart (run as root).
 *
 *   state_attrs CPU            everything below (as root)
 *   state_attrs CPU plain      nothing set up: for `lcr check` refusals of
 *                              state given by whoever started it (nice ...)
 *   state_attrs CPU seccomp    only no_new_privs and the getppid filter
 *   state_attrs CPU sync       only the SYNC_CORE membarrier registration
 *                              (the plain private barrier must stay refused)
 *
 * Sets up: SCHED_BATCH nice 5 for the main thread, nice 7 for a second
 * thread, I/O priority idle for the main thread and best-effort 6 for the
 * second, CPU affinity {CPU}, oom_score_adj 500, timer slack 123456 ns,
 * child subreaper, THP disabled, not dumpable, private expedited
 * membarrier registration, securebits NO_SETUID_FIXUP, CAP_SYS_BOOT dropped
 * from the bounding set, mlock'd area, mlockall(MCL_FUTURE), areas with
 * MADV_DONTFORK, WIPEONFORK, HUGEPAGE, NOHUGEPAGE, MERGEABLE, DONTDUMP,
 * no_new_privs and a seccomp filter making getppid() fail with EPERM (the
 * second thread adds one more making getpgrp() fail with EACCES); a child
 * sets its parent-death signal to SIGUSR2 and prints "PDEATH pid=P" when
 * it fires.
 * Prints "READY pid=P"; on SIGUSR1 "PASS state_attrs pid=P" or
 * "FAIL state_attrs: <details> (pid=P)".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <linux/membarrier.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "probe.h"

#define NAME "state_attrs"
#ifndef MEMBARRIER_GET_REGISTRATIONS
#define MEMBARRIER_GET_REGISTRATIONS (1 << 9)
#endif
#define IOPRIO_WHO_PROCESS 1
#define IOPRIO_IDLE (3 << 13)
#define IOPRIO_BE6 (2 << 13 | 6)
#define AREA (4 << 20)

struct sched_attr_ {
	uint32_t size, policy; uint64_t flags; int32_t nice; uint32_t prio;
	uint64_t runtime, deadline, period;
};

static char *areas[7];
static const char *area_flag[7] = {"lo", "dc", "wf", "hg", "nh", "mg", "dd"};
static const int area_advice[7] = {-1, MADV_DONTFORK, MADV_WIPEONFORK, MADV_HUGEPAGE,
				   MADV_NOHUGEPAGE, MADV_MERGEABLE, MADV_DONTDUMP};
static int have_ksm = 1;
static pid_t thread_tid;
static int cpu;

static int install_filter(int nr, int err)
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | err),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = {4, f};
	return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
}

static void *thread_main(void *arg)
{
	(void)arg;
	setpriority(PRIO_PROCESS, 0, 7);
	if (syscall(SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, IOPRIO_BE6))
		perror("ioprio_set thread");
	thread_tid = gettid();
	if (install_filter(SYS_getpgrp, EACCES))
		perror("thread filter");
	for (;;)
		pause();
	return NULL;
}

/* "lo", "dc", ... of the smaps entry starting at addr: 1 if present */
static int has_flag(char *addr, const char *flag)
{
	FILE *f = fopen("/proc/self/smaps", "r");
	char line[512], want[32];
	int in = 0, found = 0;
	snprintf(want, sizeof(want), "%lx-", (unsigned long)addr);
	while (fgets(line, sizeof(line), f)) {
		if (strchr(line, '-') && strncmp(line, want, strlen(want)) == 0)
			in = 1;
		else if (in && strncmp(line, "VmFlags:", 8) == 0) {
			char pat[8];
			snprintf(pat, sizeof(pat), " %s", flag);
			found = strstr(line, pat) != NULL;
			break;
		}
	}
	fclose(f);
	return found;
}

static long status_kb(const char *key)
{
	FILE *f = fopen("/proc/self/status", "r");
	char line[256];
	long v = -1;
	while (fgets(line, sizeof(line), f))
		if (strncmp(line, key, strlen(key)) == 0)
			v = atol(line + strlen(key) + 1);
	fclose(f);
	return v;
}

static void setup(void)
{
	struct sched_attr_ a = {sizeof(a), SCHED_BATCH, 0, 5, 0, 0, 0, 0};
	cpu_set_t set;
	pthread_t th;
	FILE *f;
	for (int i = 0; i < 7; i++) {
		areas[i] = mmap(NULL, AREA, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		memset(areas[i], i + 1, AREA / 2);
		if (i == 0 && mlock(areas[i], AREA))
			perror("mlock");
		if (i > 0 && madvise(areas[i], AREA, area_advice[i])) {
			if (area_advice[i] == MADV_MERGEABLE)
				have_ksm = 0;
			else
				perror("madvise");
		}
	}
	if (syscall(SYS_sched_setattr, 0, &a, 0))
		perror("sched_setattr");
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	sched_setaffinity(0, sizeof(set), &set);
	f = fopen("/proc/self/oom_score_adj", "w");
	fprintf(f, "500\n");
	fclose(f);
	prctl(PR_SET_TIMERSLACK, 123456, 0, 0, 0);
	if (syscall(SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, IOPRIO_IDLE))
		perror("ioprio_set");
	prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
	prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0);
	if (syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) ||
	    syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED, 0, 0))
		perror("membarrier");
	prctl(PR_SET_SECUREBITS, 1 << 2, 0, 0, 0);     /* SECBIT_NO_SETUID_FIXUP */
	prctl(PR_CAPBSET_DROP, 22, 0, 0, 0);           /* CAP_SYS_BOOT */
	if (mlockall(MCL_FUTURE))
		perror("mlockall");
	prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
	if (install_filter(SYS_getppid, EPERM))
		perror("seccomp");
	pthread_create(&th, NULL, thread_main, NULL);
	while (!thread_tid)
		usleep(1000);
	prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
}

static int full = 1;      /* 0: "plain", "seccomp" or "sync" mode */
static int sync_core;
static int filtered;

static void check(void)
{
	struct sched_attr_ a = {0};
	cpu_set_t set;
	int v = -1;
	FILE *f;
	long lck, lck2;
	char *p;

	if (sync_core) {
		errno = 0;
		if (syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0))
			fail("membarrier SYNC_CORE: %s", strerror(errno));
		if (syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) != -1)
			fail("membarrier private expedited works: never registered");
	}
	if (!full) {
		errno = 0;
		if (filtered && (syscall(SYS_getppid) != -1 || errno != EPERM))
			fail("getppid() is not refused by the seccomp filter (errno %d)", errno);
		goto out;
	}
	if (syscall(SYS_sched_getattr, 0, &a, sizeof(a), 0) || a.policy != SCHED_BATCH || a.nice != 5)
		fail("main thread sched policy %u nice %d, want BATCH/5", a.policy, a.nice);
	errno = 0;
	if ((v = getpriority(PRIO_PROCESS, thread_tid)) != 7)
		fail("thread nice %d, want 7", v);
	sched_getaffinity(0, sizeof(set), &set);
	if (CPU_COUNT(&set) != 1 || !CPU_ISSET(cpu, &set))
		fail("affinity: %d CPUs, want only %d", CPU_COUNT(&set), cpu);
	f = fopen("/proc/self/oom_score_adj", "r");
	if (fscanf(f, "%d", &v) != 1 || v != 500)
		fail("oom_score_adj %d", v);
	fclose(f);
	if ((v = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0)) != 123456)
		fail("timer slack %d", v);
	if ((v = syscall(SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0)) != IOPRIO_IDLE)
		fail("I/O priority 0x%x, want 0x%x (idle)", v, IOPRIO_IDLE);
	if ((v = syscall(SYS_ioprio_get, IOPRIO_WHO_PROCESS, thread_tid)) != IOPRIO_BE6)
		fail("thread I/O priority 0x%x, want 0x%x (best-effort 6)", v, IOPRIO_BE6);
	v = 0;
	prctl(PR_GET_CHILD_SUBREAPER, &v, 0, 0, 0);
	if (v != 1)
		fail("not a child subreaper");
	if (prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) != 1)
		fail("THP not disabled");
	if ((v = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)) != 0)
		fail("dumpable %d", v);
	if (syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0))
		fail("membarrier private expedited: %s", strerror(errno));
	v = syscall(SYS_membarrier, MEMBARRIER_GET_REGISTRATIONS, 0, 0);
	if (v >= 0 && v != (MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED |
			    MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED))
		fail("membarrier registrations 0x%x, want private and global expedited", v);
	if ((v = prctl(PR_GET_SECUREBITS, 0, 0, 0, 0)) != 1 << 2)
		fail("securebits 0x%x", v);
	if (prctl(PR_CAPBSET_READ, 22, 0, 0, 0) != 0 || prctl(PR_CAPBSET_READ, 21, 0, 0, 0) != 1)
		fail("bounding set: CAP_SYS_BOOT %d CAP_SYS_ADMIN %d", prctl(PR_CAPBSET_READ, 22, 0, 0, 0),
		     prctl(PR_CAPBSET_READ, 21, 0, 0, 0));
	if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
		fail("no_new_privs lost");
	errno = 0;
	if (syscall(SYS_getppid) != -1 || errno != EPERM)
		fail("getppid() is not refused by the seccomp filter (errno %d)", errno);
	if (syscall(SYS_getpgrp) < 0)
		fail("getpgrp() refused in the main thread");
	if (getpid() <= 0)
		fail("getpid() refused");
	for (int i = 0; i < 7; i++)
		if ((i != 5 || have_ksm) && !has_flag(areas[i], area_flag[i]))
			fail("area %d lost VmFlag %s", i, area_flag[i]);
	if (status_kb("VmLck") < AREA / 1024)
		fail("VmLck %ld kB", status_kb("VmLck"));
	lck = status_kb("VmLck");
	p = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	lck2 = status_kb("VmLck");
	munmap(p, 1 << 20);
	if (lck2 - lck != 1024)
		fail("mlockall(MCL_FUTURE) lost: a new 1 MiB mapping added %ld kB locked", lck2 - lck);
	{
		char path[64], line[256];
		int filters = -1;
		snprintf(path, sizeof(path), "/proc/self/task/%d/status", thread_tid);
		f = fopen(path, "r");
		while (fgets(line, sizeof(line), f))
			if (strncmp(line, "Seccomp_filters:", 16) == 0)
				filters = atoi(line + 16);
		fclose(f);
		if (filters != 2)
			fail("thread has %d seccomp filters, want 2", filters);
	}
out:
	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d\n", getpid());
	fails[0] = 0;
	fflush(stdout);
}

static void on_usr2(int sig)
{
	(void)sig;
	char msg[64];
	int n = snprintf(msg, sizeof(msg), "PDEATH pid=%d\n", getpid());
	write(1, msg, n);
	_exit(0);
}

int main(int argc, char **argv)
{
	pid_t child;
	cpu = argc > 1 ? atoi(argv[1]) : 0;
	setvbuf(stdout, NULL, _IOLBF, 0);
	child = argc > 2 ? 0 : fork();   /* only the full set-up has a child */
	if (argc <= 2 && child == 0) {
		signal(SIGUSR2, on_usr2);
		prctl(PR_SET_PDEATHSIG, SIGUSR2, 0, 0, 0);
		printf("CHILD pid=%d\n", getpid());
		for (;;)
			pause();
	}
	signal(SIGUSR1, on_usr1);
	full = argc <= 2;
	if (argc > 2 && strcmp(argv[2], "seccomp") == 0) {
		prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
		filtered = install_filter(SYS_getppid, EPERM) == 0;
	} else if (argc > 2 && strcmp(argv[2], "sync") == 0) {
		sync_core = 1;
		if (syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0))
			perror("membarrier");
	} else if (argc <= 2)
		setup();
	printf("READY pid=%d child=%d\n", getpid(), child);
	for (;;) {
		pause();
		if (probe_req) {
			probe_req = 0;
			check();
		}
	}
}
