/*
 * tracer -- a minimal debugger: holds another process under ptrace.
 *
 *   tracer PID
 *
 * PTRACE_SEIZEs PID (which keeps running), prints "READY pid=P tracee=PID"
 * and then passes every signal on to it (signal-delivery stops are resumed
 * with the signal), so the tracee behaves as before -- it is just traced.
 * Exits when the tracee does; killing the tracer detaches it.
 * Not a probe-able test program: it only makes PID "busy" for lcr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 2) { fprintf(stderr, "usage: tracer PID\n"); return 2; }
	pid_t pid = atoi(argv[1]);
	if (ptrace(PTRACE_SEIZE, pid, 0, 0)) { perror("PTRACE_SEIZE"); return 1; }
	printf("READY pid=%d tracee=%d\n", getpid(), pid);
	fflush(stdout);
	for (;;) {
		int st;
		pid_t w = waitpid(-1, &st, __WALL);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return 0;                        /* no tracee left */
		}
		if (WIFEXITED(st) || WIFSIGNALED(st))
			continue;
		if (WIFSTOPPED(st)) {
			int sig = WSTOPSIG(st);
			int event = (unsigned)st >> 16;
			if (event == PTRACE_EVENT_STOP)  /* group-stop: stay stopped */
				ptrace(PTRACE_LISTEN, w, 0, 0);
			else
				ptrace(PTRACE_CONT, w, 0, sig);
		}
	}
}
