/*
 * state_more -- process groups and sessions led by zombies, a working
 * directory that was removed, a working directory inside a chroot.
 *
 *   state_more DIR [nochroot]
 *
 * The parent P: forks Z1, which makes itself a process group leader and
 * exits once C joined its group; forks Z2, which makes itself a session
 * leader and exits; P never reaps them (they stay zombies).  P works in
 * DIR/gone (mode 0751), removed after P entered it.  The child C joins Z1's
 * group and, unless "nochroot", chroots into DIR/root and works in /sub
 * there (DIR/root/marker is a file).  P also has an area of 8 pages whose
 * pages 2 and 3 are guard regions (MADV_GUARD_INSTALL, Linux 6.13+; "guards=0"
 * on READY when the kernel has none): they must fault, the others keep
 * their content.
 * Prints "READY pid=P child=C"; on SIGUSR1 each of P and C checks its own
 * state and prints "PASS state_more pid=X" or "FAIL state_more: ... (pid=X)".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <stdint.h>
#include <sys/mman.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include "probe.h"

#define NAME "state_more"

static pid_t z1, z2, child;
static char gone[PATH_MAX];
static int chrooted;
static unsigned char *area;
static int guards;
static sigjmp_buf jb;

#define MADV_GUARD_INSTALL_ 102

static void on_segv(int sig) { (void)sig; siglongjmp(jb, 1); }

static int faults(volatile unsigned char *p)
{
	struct sigaction sa = {.sa_handler = on_segv}, old;
	int hit = 0;
	sigaction(SIGSEGV, &sa, &old);
	if (sigsetjmp(jb, 1) == 0)
		(void)*p;
	else
		hit = 1;
	sigaction(SIGSEGV, &old, NULL);
	return hit;
}

static void check_guards(void)
{
	for (int i = 0; i < 8; i++) {
		int g = guards && (i == 2 || i == 3);
		if (faults(area + i * 4096) != g)
			fail("page %d of the guarded area %s", i, g ? "does not fault" : "faults");
		else if (!g && area[i * 4096 + 17] != (unsigned char)(i + 1))
			fail("page %d of the guarded area lost its content", i);
	}
}

static void check_parent(void)
{
	struct stat st;
	siginfo_t si;
	char link[PATH_MAX + 16], want[PATH_MAX + 16];
	ssize_t n;
	if (getpgid(z1) != z1)
		fail("zombie %d is in group %d", z1, getpgid(z1));
	if (getsid(z2) != z2)
		fail("zombie %d is in session %d", z2, getsid(z2));
	if (getpgid(child) != z1)
		fail("child %d is in group %d, not %d", child, getpgid(child), z1);
	for (int i = 0; i < 2; i++) {
		pid_t z = i ? z2 : z1;
		memset(&si, 0, sizeof(si));
		if (waitid(P_PID, z, &si, WEXITED | WNOHANG | WNOWAIT) < 0 || si.si_pid != z)
			fail("%d is not a zombie child", z);
		else if (si.si_status != 3 + i)
			fail("zombie %d exited %d", z, si.si_status);
	}
	if (stat(".", &st) < 0)
		fail("stat(.): %s", strerror(errno));
	else if (!S_ISDIR(st.st_mode) || st.st_nlink != 0 || (st.st_mode & 07777) != 0751)
		fail("cwd: mode %o links %lu", st.st_mode, (unsigned long)st.st_nlink);
	n = readlink("/proc/self/cwd", link, sizeof(link) - 1);
	link[n > 0 ? n : 0] = 0;
	snprintf(want, sizeof(want), "%s (deleted)", gone);
	if (strcmp(link, want))
		fail("cwd is %s", link);
	if (mkdir("x", 0700) == 0 || errno != ENOENT)
		fail("mkdir in a removed directory: %s", strerror(errno));
	check_guards();
}

static void check_child(void)
{
	char cwd[PATH_MAX];
	if (getpgid(0) != z1)
		fail("in group %d, not %d", getpgid(0), z1);
	if (!chrooted)
		return;
	if (!getcwd(cwd, sizeof(cwd)) || strcmp(cwd, "/sub"))
		fail("cwd %s", getcwd(cwd, sizeof(cwd)) ? cwd : strerror(errno));
	if (access("/marker", F_OK) < 0)
		fail("no /marker: the root is not DIR/root");
}

static void on_chld(int sig)
{
	int e = errno;
	(void)sig;
	waitpid(child, NULL, WNOHANG);   /* C only: Z1 and Z2 stay zombies */
	errno = e;
}

static void serve(void (*check)(void))
{
	for (;;) {
		pause();
		if (!probe_req)
			continue;
		probe_req = 0;
		fails[0] = 0;
		check();
		if (fails[0])
			printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
		else
			printf("PASS " NAME " pid=%d\n", getpid());
	}
}

int main(int argc, char **argv)
{
	int go[2], joined[2];
	char b, path[PATH_MAX];
	if (argc < 2)
		return 2;
	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGUSR1, on_usr1);
	chrooted = !(argc > 2 && !strcmp(argv[2], "nochroot"));
	if (pipe(go) || pipe(joined))
		return 1;
	z1 = fork();
	if (z1 == 0) {
		setpgid(0, 0);
		close(go[1]);
		read(go[0], &b, 1);      /* until C has joined */
		_exit(3);
	}
	setpgid(z1, z1);                 /* (both sides: no race with C) */
	child = fork();
	if (child == 0) {
		close(go[1]);            /* Z1 waits for the last write end to go */
		setpgid(0, z1);
		if (chrooted) {
			snprintf(path, sizeof(path), "%s/root", argv[1]);
			if (chroot(path) || chdir("/sub")) {
				printf("FAIL " NAME ": chroot %s: %s (pid=%d)\n", path, strerror(errno), getpid());
				_exit(1);
			}
		}
		write(joined[1], "j", 1);
		serve(check_child);
	}
	read(joined[0], &b, 1);
	close(go[1]);                    /* Z1 exits */
	z2 = fork();
	if (z2 == 0) {
		setsid();
		_exit(4);
	}
	for (int i = 0; i < 2; i++) {    /* both zombies, not reaped */
		siginfo_t si;
		waitid(P_PID, i ? z2 : z1, &si, WEXITED | WNOWAIT);
	}
	snprintf(gone, sizeof(gone), "%s/gone", argv[1]);
	if (mkdir(gone, 0751) || chmod(gone, 0751) || chdir(gone) || rmdir(gone)) {
		printf("FAIL " NAME ": %s: %s (pid=%d)\n", gone, strerror(errno), getpid());
		return 1;
	}
	area = mmap(NULL, 8 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	for (int i = 0; i < 8; i++)
		memset(area + i * 4096, i + 1, 4096);
	guards = madvise(area + 2 * 4096, 2 * 4096, MADV_GUARD_INSTALL_) == 0;
	signal(SIGCHLD, on_chld);        /* a killed C goes without leaving a zombie */
	printf("READY pid=%d child=%d z1=%d z2=%d guards=%d\n", getpid(), child, z1, z2, guards);
	serve(check_parent);
}
