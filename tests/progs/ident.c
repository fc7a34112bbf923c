/*
 * ident -- process identity and per-process settings.
 *
 *   ident ARG...        (the test passes odd strings: spaces, UTF-8, empty)
 *
 * State: umask 027; RLIMIT_NOFILE soft limit lowered to 200 (hard kept);
 * RLIMIT_CORE soft limit set to 123 pages (hard kept); personality
 * ADDR_NO_RANDOMIZE (if the kernel allows it); comm "lcr-ident"
 * (PR_SET_NAME); the argv strings; the environment (LCR_IDENT_ENV if set).
 *
 * On SIGUSR1 checks all of them, plus: getpid() is the pid printed at READY,
 * it is still its own session and process-group leader (it was started with
 * setsid), uid/gid unchanged, /proc/self/cmdline is the original argv and
 * /proc/self/environ the original environment, /proc/self/comm the name.
 * Prints "PASS ident pid=P" or "FAIL ident: <details> (pid=P)".
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
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define NAME "ident"
#define COMM "lcr-ident"

#include "probe.h"

static pid_t ready_pid;
static uid_t uid0;
static gid_t gid0;
static struct rlimit nofile0, core0;
static int pers0, pers_set;
static int argc0;
static char **argv0;        /* the real argv, in the process's own memory */
static char **argv_copy;    /* heap copies to compare against */
static char *cmdline0, *environ0;
static size_t cmdline0_len, environ0_len;

static char *slurp(const char *path, size_t *len)
{
	int fd = open(path, O_RDONLY);
	size_t cap = 4096, n = 0;
	char *b = malloc(cap);
	ssize_t r;
	if (fd < 0 || !b) { free(b); if (fd >= 0) close(fd); return NULL; }
	while ((r = read(fd, b + n, cap - n)) > 0) {
		n += r;
		if (n == cap)
			b = realloc(b, cap *= 2);
	}
	close(fd);
	*len = n;
	return b;
}

static void verify(void)
{
	fails[0] = 0;

	if (getpid() != ready_pid)
		fail("getpid() %d, READY said %d", getpid(), ready_pid);
	if (getsid(0) != getpid())
		fail("session %d is not own pid %d", getsid(0), getpid());
	if (getpgrp() != getpid())
		fail("process group %d is not own pid %d", getpgrp(), getpid());
	if (getuid() != uid0 || geteuid() != uid0 || getgid() != gid0 || getegid() != gid0)
		fail("uid/gid changed: %d/%d %d/%d, want %d %d", getuid(), geteuid(),
		     getgid(), getegid(), uid0, gid0);

	mode_t m = umask(0);
	umask(m);
	if (m != 027)
		fail("umask %03o, want 027", (unsigned)m);

	struct rlimit r;
	getrlimit(RLIMIT_NOFILE, &r);
	if (r.rlim_cur != nofile0.rlim_cur || r.rlim_max != nofile0.rlim_max)
		fail("RLIMIT_NOFILE %llu/%llu, want %llu/%llu", (unsigned long long)r.rlim_cur,
		     (unsigned long long)r.rlim_max, (unsigned long long)nofile0.rlim_cur,
		     (unsigned long long)nofile0.rlim_max);
	getrlimit(RLIMIT_CORE, &r);
	if (r.rlim_cur != core0.rlim_cur || r.rlim_max != core0.rlim_max)
		fail("RLIMIT_CORE %llu/%llu, want %llu/%llu", (unsigned long long)r.rlim_cur,
		     (unsigned long long)r.rlim_max, (unsigned long long)core0.rlim_cur,
		     (unsigned long long)core0.rlim_max);

	int pers = personality(0xffffffff);
	if (pers != pers0)
		fail("personality %#x, want %#x", pers, pers0);

	char comm[32] = "";
	prctl(PR_GET_NAME, comm);
	if (strcmp(comm, COMM))
		fail("PR_GET_NAME \"%s\", want \"" COMM "\"", comm);
	size_t len;
	char *c = slurp("/proc/self/comm", &len);
	if (!c || len != strlen(COMM) + 1 || memcmp(c, COMM "\n", len))
		fail("/proc/self/comm is \"%.*s\"", c ? (int)len : 0, c ? c : "");
	free(c);

	for (int i = 0; i < argc0; i++)
		if (!argv0[i] || strcmp(argv0[i], argv_copy[i])) {
			fail("argv[%d] is \"%s\", want \"%s\"", i, argv0[i] ? argv0[i] : "(null)",
			     argv_copy[i]);
			break;
		}
	c = slurp("/proc/self/cmdline", &len);
	if (!c || len != cmdline0_len || memcmp(c, cmdline0, len))
		fail("/proc/self/cmdline differs (%zu bytes, want %zu)", c ? len : 0, cmdline0_len);
	free(c);
	c = slurp("/proc/self/environ", &len);
	if (!c || len != environ0_len || memcmp(c, environ0, len))
		fail("/proc/self/environ differs (%zu bytes, want %zu)", c ? len : 0, environ0_len);
	free(c);
	const char *e = getenv("LCR_IDENT_ENV");
	const char *e0 = NULL;
	for (size_t i = 0; i < environ0_len; i += strlen(environ0 + i) + 1)
		if (!strncmp(environ0 + i, "LCR_IDENT_ENV=", 14))
			e0 = environ0 + i + 14;
	if ((e == NULL) != (e0 == NULL) || (e && strcmp(e, e0)))
		fail("getenv(LCR_IDENT_ENV) is \"%s\", want \"%s\"", e ? e : "(unset)",
		     e0 ? e0 : "(unset)");

	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d personality=%#x\n", getpid(), pers0);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	ready_pid = getpid();
	uid0 = getuid();
	gid0 = getgid();
	argc0 = argc;
	argv0 = argv;
	argv_copy = calloc(argc + 1, sizeof(char *));
	for (int i = 0; i < argc; i++)
		argv_copy[i] = strdup(argv[i]);
	/* what /proc/self/cmdline must show: argv strings, each NUL-terminated */
	for (int i = 0; i < argc; i++)
		cmdline0_len += strlen(argv[i]) + 1;
	cmdline0 = malloc(cmdline0_len + 1);
	for (int i = 0, o = 0; i < argc; i++) {
		strcpy(cmdline0 + o, argv[i]);
		o += strlen(argv[i]) + 1;
	}
	environ0 = slurp("/proc/self/environ", &environ0_len);
	if (!environ0) { perror("environ"); return 1; }
	size_t cl;
	char *c = slurp("/proc/self/cmdline", &cl);
	if (!c || cl != cmdline0_len || memcmp(c, cmdline0, cl)) {
		fprintf(stderr, "ident: /proc/self/cmdline does not match argv at start\n");
		return 1;
	}
	free(c);

	umask(027);
	getrlimit(RLIMIT_NOFILE, &nofile0);
	nofile0.rlim_cur = 200;
	if (setrlimit(RLIMIT_NOFILE, &nofile0)) { perror("setrlimit NOFILE"); return 1; }
	getrlimit(RLIMIT_CORE, &core0);
	core0.rlim_cur = 123 * 4096;
	if (core0.rlim_max != RLIM_INFINITY && core0.rlim_max < core0.rlim_cur)
		core0.rlim_cur = core0.rlim_max;
	if (setrlimit(RLIMIT_CORE, &core0)) { perror("setrlimit CORE"); return 1; }
	pers_set = personality(ADDR_NO_RANDOMIZE) != -1;
	pers0 = personality(0xffffffff);
	if (prctl(PR_SET_NAME, COMM)) { perror("PR_SET_NAME"); return 1; }

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);

	printf("READY pid=%d personality=%#x%s\n", getpid(), pers0,
	       pers_set ? "" : " (ADDR_NO_RANDOMIZE refused)");
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
