/*
 * tree_forkstorm -- a parent that forks short-lived children continuously.
 *
 *   tree_forkstorm
 *
 * Keeps up to 4 children at a time: each child spins for 0 to ~500 us and
 * exits with status (its index & 0x7f); the parent reaps them with
 * waitpid(-1) and checks each status against the child it recorded for
 * that pid.  No sleeping in the parent: it forks again as soon as a child
 * is reaped, so at any moment children are being born and dying.
 *
 * Prints "READY pid=P" after its first 100 children; on SIGUSR1 prints
 * "PASS tree_forkstorm pid=P forks=N" (N: children reaped so far; it must
 * grow between probes, waiting up to 5 s) or "FAIL tree_forkstorm: <details>
 * (pid=P)".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NAME "tree_forkstorm"
#define MAXKIDS 4

static volatile sig_atomic_t probe_req;
static void on_usr1(int sig) { (void)sig; probe_req = 1; }

static struct { pid_t pid; long idx; } kids[MAXKIDS];
static long forks, reaped, bad_status, unknown;
static char first_error[200];

static void spawn(int slot)
{
	long idx = forks++;
	pid_t p = fork();
	if (p < 0) {
		kids[slot].pid = 0;
		return;
	}
	if (p == 0) {
		signal(SIGUSR1, SIG_IGN);
		struct timespec t0, t;
		clock_gettime(CLOCK_MONOTONIC, &t0);
		long spin = (idx * 7919) % 500;     /* us */
		do
			clock_gettime(CLOCK_MONOTONIC, &t);
		while ((t.tv_sec - t0.tv_sec) * 1000000 + (t.tv_nsec - t0.tv_nsec) / 1000 < spin);
		_exit((int)(idx & 0x7f));
	}
	kids[slot].pid = p;
	kids[slot].idx = idx;
}

static void reap_one(void)
{
	int st;
	pid_t p = waitpid(-1, &st, 0);
	if (p < 0)
		return;           /* EINTR (a probe) */
	for (int i = 0; i < MAXKIDS; i++)
		if (kids[i].pid == p) {
			reaped++;
			if (!WIFEXITED(st) || WEXITSTATUS(st) != (kids[i].idx & 0x7f)) {
				if (!bad_status++)
					snprintf(first_error, sizeof(first_error),
						 "child %d (#%ld) ended with status 0x%x", p, kids[i].idx, st);
			}
			spawn(i);
			return;
		}
	if (!unknown++)
		snprintf(first_error, sizeof(first_error), "reaped unknown pid %d", p);
}

static long last_reaped = -1;

static void verify(void)
{
	char fails[512] = "";
	if (bad_status || unknown)
		snprintf(fails, sizeof(fails), "%ld bad statuses, %ld unknown children; first: %s",
			 bad_status, unknown, first_error);
	if (!fails[0] && reaped <= last_reaped)
		snprintf(fails, sizeof(fails), "no child reaped since the last probe (%ld)", reaped);
	last_reaped = reaped;
	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d forks=%ld\n", getpid(), reaped);
	fflush(stdout);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;     /* no SA_RESTART: a probe interrupts waitpid */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	for (int i = 0; i < MAXKIDS; i++)
		spawn(i);
	int ready = 0;
	for (;;) {
		reap_one();
		if (!ready && reaped >= 100) {
			ready = 1;
			printf("READY pid=%d\n", getpid());
			fflush(stdout);
		}
		if (probe_req) {
			probe_req = 0;
			/* wait for progress (up to 5 s) before judging it */
			struct timespec t0, t;
			clock_gettime(CLOCK_MONOTONIC, &t0);
			do {
				reap_one();
				clock_gettime(CLOCK_MONOTONIC, &t);
			} while (reaped <= last_reaped && t.tv_sec - t0.tv_sec < 5);
			verify();
		}
	}
}
