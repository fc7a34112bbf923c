/*
 * tree_session -- a session leader with process groups and zombies.
 *
 *   tree_session [k|kSIG]
 *
 * Becomes a session leader (setsid(), unless it already leads its session),
 * then forks:
 *   A  -- leads a new process group (setpgid(A, A)), and forks
 *   A1 -- a grandchild, in A's group;
 *   B  -- joins A's group (setpgid(B, A));
 *   C  -- stays in the leader's own group;
 *   Z  -- exits at once with status 42 and stays a zombie (never reaped
 *         before the probe);
 *   K  -- (only with argument "k", or "kSIG": by signal number SIG) killed
 *         by SIGTERM at once, and stays a zombie too.
 * A, A1, B, C sleep, and exit when their parent is gone.
 *
 * Prints "READY pid=P a=A a1=A1 b=B c=C z=Z k=K" once all is set up.  On
 * the FIRST SIGUSR1 it checks: getsid(0) == getpgid(0) == getpid(); A, B, C
 * are its live children (waitpid WNOHANG says nothing happened to them) in
 * session P, A and B in group A, C in group P; A1 is alive, in group A and
 * session P; then it reaps Z (exited, status 42) and K (killed by SIGTERM)
 * with waitpid.  Later probes check the same, and that Z and K are gone
 * (waitpid: ECHILD).  Prints "PASS tree_session pid=P ..." or
 * "FAIL tree_session: <details> (pid=P)".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NAME "tree_session"

static volatile sig_atomic_t probe_req;
static void on_usr1(int sig) { (void)sig; probe_req = 1; }

static void msleep(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000 };
	nanosleep(&ts, NULL);
}

static void idle(pid_t parent)
{
	signal(SIGUSR1, SIG_IGN);
	for (;;) {
		if (getppid() != parent)
			_exit(0);
		msleep(20);
	}
}

static pid_t a, a1, b, c, z, k;
static int probes;
static int ksig = SIGTERM;      /* what K is killed by */

/* the state of pid p as in /proc/p/stat, or 0 */
static char proc_state(pid_t p)
{
	char path[64], buf[512];
	snprintf(path, sizeof(path), "/proc/%d/stat", p);
	FILE *f = fopen(path, "r");
	if (!f)
		return 0;
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = 0;
	char *r = strrchr(buf, ')');
	return r && r[1] == ' ' ? r[2] : 0;
}

static void verify(void)
{
	char fails[1024] = "";
	size_t fl = 0;
#define ADD(...) do { if (fl < sizeof(fails) - 1) fl += snprintf(fails + fl, sizeof(fails) - fl, __VA_ARGS__); } while (0)
	pid_t me = getpid();
	if (getsid(0) != me || getpgid(0) != me)
		ADD("leader: sid %d pgid %d, want %d; ", getsid(0), getpgid(0), me);
	struct { const char *name; pid_t pid; pid_t pgid; int child; } want[] = {
		{ "A", a, a, 1 }, { "A1", a1, a, 0 }, { "B", b, a, 1 }, { "C", c, me, 1 },
	};
	for (unsigned i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
		pid_t p = want[i].pid;
		int st;
		if (want[i].child && waitpid(p, &st, WNOHANG) != 0)
			ADD("%s (pid %d) is no longer a live child; ", want[i].name, p);
		char s = proc_state(p);
		if (kill(p, 0) != 0 || s == 0 || s == 'Z' || s == 'X')
			ADD("%s (pid %d) is not alive (state %c); ", want[i].name, p, s ? s : '?');
		if (getsid(p) != me)
			ADD("%s (pid %d) in session %d, want %d; ", want[i].name, p, getsid(p), me);
		if (getpgid(p) != want[i].pgid)
			ADD("%s (pid %d) in group %d, want %d; ", want[i].name, p, getpgid(p), want[i].pgid);
	}
	int st = 0;
	if (probes == 0) {
		char zs = proc_state(z), ks = proc_state(k);
		if (zs != 'Z')
			ADD("Z (pid %d) is in state %c, want a zombie; ", z, zs ? zs : '?');
		if (k && ks != 'Z')
			ADD("K (pid %d) is in state %c, want a zombie; ", k, ks ? ks : '?');
		pid_t r = waitpid(z, &st, WNOHANG);
		if (r != z)
			ADD("waitpid(Z=%d) returned %d (%s); ", z, r, r < 0 ? strerror(errno) : "not exited");
		else if (!WIFEXITED(st) || WEXITSTATUS(st) != 42)
			ADD("Z ended with wait status 0x%x, want exit 42; ", st);
		r = k ? waitpid(k, &st, WNOHANG) : 0;
		if (!k)
			;
		else if (r != k)
			ADD("waitpid(K=%d) returned %d (%s); ", k, r, r < 0 ? strerror(errno) : "not exited");
		else if (!WIFSIGNALED(st) || WTERMSIG(st) != ksig)
			ADD("K ended with wait status 0x%x, want killed by signal %d; ", st, ksig);
	} else {
		if (waitpid(z, &st, WNOHANG) != -1 || errno != ECHILD)
			ADD("Z (pid %d) still waitable after it was reaped; ", z);
		if (k && (waitpid(k, &st, WNOHANG) != -1 || errno != ECHILD))
			ADD("K (pid %d) still waitable after it was reaped; ", k);
	}
	probes++;
	if (fails[0])
		printf("FAIL " NAME ": %s(pid=%d)\n", fails, me);
	else
		printf("PASS " NAME " pid=%d a=%d a1=%d b=%d c=%d z=%d k=%d probes=%d\n", me, a, a1, b,
		       c, z, k, probes);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	int with_k = argc > 1 && argv[1][0] == 'k';
	if (with_k && argv[1][1])
		ksig = atoi(argv[1] + 1);
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (getsid(0) != getpid() && setsid() < 0) {
		perror("setsid");
		return 1;
	}
	pid_t me = getpid();
	int p[2];
	if (pipe(p)) { perror("pipe"); return 1; }

	a = fork();
	if (a == 0) {
		setpgid(0, 0);
		pid_t self = getpid();
		pid_t g = fork();
		if (g == 0) {
			close(p[0]);
			close(p[1]);
			idle(self);
		}
		/* tell the leader the grandchild's pid */
		if (write(p[1], &g, sizeof(g)) != sizeof(g))
			_exit(3);
		close(p[0]);
		close(p[1]);
		idle(me);
	}
	setpgid(a, a);
	b = fork();
	if (b == 0) {
		close(p[0]);
		close(p[1]);
		setpgid(0, a);
		idle(me);
	}
	setpgid(b, a);
	c = fork();
	if (c == 0) {
		close(p[0]);
		close(p[1]);
		idle(me);
	}
	z = fork();
	if (z == 0)
		_exit(42);
	k = with_k ? fork() : 0;
	if (with_k && k == 0) {
		signal(ksig, SIG_DFL);
		raise(ksig);
		_exit(1);
	}
	if (read(p[0], &a1, sizeof(a1)) != sizeof(a1)) { perror("read"); return 1; }
	close(p[0]);
	close(p[1]);
	/* ready once the zombies are zombies and A1 is in A's group */
	for (int i = 0; i < 5000; i++) {
		if (proc_state(z) == 'Z' && (!k || proc_state(k) == 'Z') && getpgid(a1) == a && getpgid(b) == a)
			break;
		msleep(1);
	}

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	printf("READY pid=%d a=%d a1=%d b=%d c=%d z=%d k=%d\n", me, a, a1, b, c, z, k);
	fflush(stdout);
	for (;;) {
		if (probe_req) {
			probe_req = 0;
			verify();
		}
		msleep(5);
	}
}
