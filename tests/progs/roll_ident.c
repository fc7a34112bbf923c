/*
 * roll_ident -- per-task state a rollback must give back, or refuse to
 * touch (tests/test_rollback_ident.py).
 *
 *   roll_ident [-t] [-c DIR]
 *
 * Forks: the parent (a session leader, as the tests start programs) only
 * waits; the child is the subject, in its parent's process group.  With
 * -t it has a second thread named "worker"; with -c it first enters
 * DIR/sub and chroots to DIR (as root).  It notes its state: name, the
 * thread's name, personality, process group, working directory, umask,
 * robust list head and clear_child_tid address.  Prints
 * "READY pid=P pgid=G".
 * SIGUSR2 (change): every item above changed (name "changed", thread name
 * "wchanged", personality ADDR_NO_RANDOMIZE, a group of its own, cwd /,
 * umask 077, robust list and clear_child_tid pointing elsewhere, its
 * arguments area moved to a new title as setproctitle() does with
 * PR_SET_MM_MAP; as root, securebits SECBIT_KEEP_CAPS); prints
 * "CHANGED pid=P".
 * SIGHUP: setsid(); prints "SETSID pid=P r=R".
 * SIGWINCH: unshare(CLONE_NEWUTS) (as root); prints "UNSHARE pid=P r=R".
 * SIGPWR: chroot("/tmp") (as root); prints "CHROOT pid=P r=R".
 * SIGTTIN: securebits SECBIT_NO_SETUID_FIXUP and its lock (as root);
 * prints "LOCKED pid=P r=R".
 * SIGUSR1: compares with the noted state: "PASS roll_ident pid=P" or
 * "FAIL roll_ident: ... (pid=P)".
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include "probe.h"

#include <linux/prctl.h>
#ifndef PR_GET_TID_ADDRESS
#define PR_GET_TID_ADDRESS 40
#endif

static volatile sig_atomic_t change_req, setsid_req, unshare_req, chroot_req, lock_req;
static void on_ttin(int s) { (void)s; lock_req = 1; }
static void on_usr2(int s) { (void)s; change_req = 1; }
static void on_hup(int s) { (void)s; setsid_req = 1; }
static void on_winch(int s) { (void)s; unshare_req = 1; }
static void on_pwr(int s) { (void)s; chroot_req = 1; }

static pthread_t worker;
static int have_worker;
static volatile int worker_rename;
static struct robust_list_head other_head = { { &other_head.list }, 0, NULL };
static int other_tid;

static void *work(void *arg)
{
	(void)arg;
	prctl(PR_SET_NAME, "worker", 0, 0, 0);
	for (;;) {
		if (worker_rename) {
			prctl(PR_SET_NAME, "wchanged", 0, 0, 0);
			worker_rename = 0;
		}
		usleep(1000);
	}
	return NULL;
}

/* setproctitle the way libraries do it without CAP_SYS_RESOURCE: the whole
 * mm map at once (PR_SET_MM_MAP), the arguments area moved to a new string */
static int retitle(void)
{
	char *title = malloc(64);     /* anonymous memory: /proc/PID/cmdline reads only that */
	strcpy(title, "roll_ident-retitled");
	unsigned long f[64] = {0};
	char buf[4096];
	FILE *st = fopen("/proc/self/stat", "r");
	if (!st || !fgets(buf, sizeof buf, st)) return -1;
	fclose(st);
	char *p = strchr(strrchr(buf, ')') + 2, ' ') + 1;   /* field 4 on (3: the state) */
	for (int i = 4; i <= 52 && p; i++) {
		f[i] = strtoul(p, &p, 10);
		while (*p == ' ') p++;
	}
	static unsigned long auxv[512];
	FILE *a = fopen("/proc/self/auxv", "r");
	size_t n = a ? fread(auxv, 1, sizeof auxv, a) : 0;
	if (a) fclose(a);
	struct prctl_mm_map m = {
		.start_code = f[26], .end_code = f[27], .start_data = f[45], .end_data = f[46],
		.start_brk = f[47], .brk = (unsigned long)sbrk(0), .start_stack = f[28],
		.arg_start = (unsigned long)title, .arg_end = (unsigned long)title + strlen(title) + 1,
		.env_start = f[50], .env_end = f[51], .auxv = (__u64 *)auxv, .auxv_size = n,
		.exe_fd = (__u32)-1,
	};
	return prctl(PR_SET_MM, PR_SET_MM_MAP, &m, sizeof m, 0);
}

struct state {
	char comm[16], wcomm[16], cwd[4096];
	int pers, secbits;
	pid_t pgid;
	mode_t umask;
	void *head;
	size_t hlen;
	int *tidaddr;
};

static void note(struct state *s)
{
	memset(s, 0, sizeof *s);
	prctl(PR_GET_NAME, s->comm, 0, 0, 0);
	if (have_worker)
		pthread_getname_np(worker, s->wcomm, sizeof s->wcomm);
	if (!getcwd(s->cwd, sizeof s->cwd))
		strcpy(s->cwd, "?");
	s->pers = personality(0xffffffff);
	s->secbits = prctl(PR_GET_SECUREBITS, 0, 0, 0, 0);
	s->pgid = getpgid(0);
	s->umask = umask(0);
	umask(s->umask);
	syscall(SYS_get_robust_list, 0, &s->head, &s->hlen);
	prctl(PR_GET_TID_ADDRESS, &s->tidaddr, 0, 0, 0);
}

static void subject(const char *root)
{
	signal(SIGUSR1, on_usr1);
	signal(SIGUSR2, on_usr2);
	signal(SIGHUP, on_hup);
	signal(SIGWINCH, on_winch);
	signal(SIGPWR, on_pwr);
	signal(SIGTTIN, on_ttin);
	if (root) {
		char sub[4096];
		snprintf(sub, sizeof sub, "%s/sub", root);
		if (chdir(sub) || chroot(root)) { perror("chroot"); _exit(1); }
	}
	struct state was, now;
	if (have_worker) {
		pthread_create(&worker, NULL, work, NULL);
		char n[16] = "";
		while (strcmp(n, "worker")) {
			usleep(1000);
			pthread_getname_np(worker, n, sizeof n);
		}
	}
	note(&was);
	printf("READY pid=%d pgid=%d\n", getpid(), getpgid(0));
	for (;;) {
		sigset_t all, old;
		sigfillset(&all);
		sigprocmask(SIG_BLOCK, &all, &old);
		if (probe_req) {
			probe_req = 0;
			fails[0] = 0;
			note(&now);
			if (strcmp(now.comm, was.comm)) fail("name %s, was %s", now.comm, was.comm);
			if (strcmp(now.wcomm, was.wcomm)) fail("thread name %s, was %s", now.wcomm, was.wcomm);
			if (strcmp(now.cwd, was.cwd)) fail("cwd %s, was %s", now.cwd, was.cwd);
			if (now.pers != was.pers) fail("personality 0x%x, was 0x%x", now.pers, was.pers);
			if (now.pgid != was.pgid) fail("pgid %d, was %d", now.pgid, was.pgid);
			if (now.secbits != was.secbits) fail("securebits 0x%x, was 0x%x", now.secbits, was.secbits);
			if (now.umask != was.umask) fail("umask %o, was %o", now.umask, was.umask);
			if (now.head != was.head || now.hlen != was.hlen) fail("robust list %p, was %p", now.head, was.head);
			if (now.tidaddr != was.tidaddr) fail("clear_child_tid %p, was %p", (void *)now.tidaddr, (void *)was.tidaddr);
			if (fails[0]) printf("FAIL roll_ident: %s (pid=%d)\n", fails, getpid());
			else printf("PASS roll_ident pid=%d\n", getpid());
		}
		if (change_req) {
			change_req = 0;
			prctl(PR_SET_NAME, "changed", 0, 0, 0);
			if (have_worker) {
				worker_rename = 1;
				while (worker_rename) usleep(1000);
			}
			personality(was.pers | ADDR_NO_RANDOMIZE);
			if (setpgid(0, 0)) perror("setpgid");
			if (chdir("/")) perror("chdir");
			umask(077);
			syscall(SYS_set_robust_list, &other_head, sizeof other_head);
			syscall(SYS_set_tid_address, &other_tid);
			if (retitle()) perror("PR_SET_MM_MAP");
			if (geteuid() == 0 && prctl(PR_SET_SECUREBITS, was.secbits | 1 << 4, 0, 0, 0))
				perror("securebits");
			printf("CHANGED pid=%d\n", getpid());
		}
		if (setsid_req) {
			setsid_req = 0;
			printf("SETSID pid=%d r=%d\n", getpid(), setsid() < 0 ? -1 : 0);
		}
		if (unshare_req) {
			unshare_req = 0;
			printf("UNSHARE pid=%d r=%d\n", getpid(), unshare(CLONE_NEWUTS));
		}
		if (lock_req) {
			lock_req = 0;
			printf("LOCKED pid=%d r=%d\n", getpid(),
			       prctl(PR_SET_SECUREBITS, was.secbits | 1 << 2 | 1 << 3, 0, 0, 0));
		}
		if (chroot_req) {
			chroot_req = 0;
			printf("CHROOT pid=%d r=%d\n", getpid(), chroot("/tmp"));
		}
		sigprocmask(SIG_SETMASK, &old, NULL);
		usleep(1000);
	}
}

int main(int argc, char **argv)
{
	const char *root = NULL;
	int c;
	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((c = getopt(argc, argv, "tc:")) != -1) {
		if (c == 't') have_worker = 1;
		else if (c == 'c') root = optarg;
		else return 2;
	}
	pid_t child = fork();
	if (child == 0) {
		subject(root);
		return 0;
	}
	for (;;) {
		int st;
		if (waitpid(child, &st, 0) == child)
			return 0;
	}
}
