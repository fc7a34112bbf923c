/*
 * tree_server -- a forking server: a parent and 3 workers sharing an
 * anonymous MAP_SHARED region and a pipe.
 *
 *   tree_server
 *
 * The parent maps a MAP_SHARED|MAP_ANONYMOUS region and makes a pipe, then
 * forks 3 workers.  Worker i, every millisecond: increments its slot
 * count[i] in the shared region, then writes a token {i, count[i]} into the
 * pipe.  The parent reads the tokens and checks each worker's sequence
 * numbers arrive as 1, 2, 3, ... (no token lost, duplicated or reordered).
 *
 * On SIGUSR1 the parent verifies:
 *  - every worker is alive (its child, not a zombie, not exited);
 *  - the shared counters agree with the pipe: it asks the workers to pause
 *    (a generation number in the shared region, which each worker
 *    acknowledges in its own slot), drains the pipe, and then count[i] must
 *    equal the number of tokens received from worker i and its last
 *    sequence number; a worker also counts in private memory and must agree;
 *  - the region is really shared: the parent writes a fresh nonce into
 *    ping[i]; the worker, which sees it only through the shared region,
 *    copies it to pong[i] and adds its pid; the parent waits for both;
 *  - then the workers resume.
 * Prints "READY pid=P workers=A,B,C", then "PASS tree_server pid=P
 * workers=A,B,C tokens=N" or "FAIL tree_server: <details> (pid=P)".
 * Workers exit when their parent is gone (getppid() changes).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NAME "tree_server"
#define N 3

struct slot {
	volatile long count;        /* tokens written (worker) */
	volatile long ack_gen;      /* last pause generation seen (worker) */
	volatile long ping;         /* nonce written by the parent */
	volatile long pong;         /* the nonce, echoed by the worker */
	volatile long pong_pid;     /* getpid() of the worker that echoed */
	volatile long private_seen; /* the worker's private count when it paused */
	char pad[64 - 6 * sizeof(long)];
};

struct shared {
	volatile long magic;
	volatile long pause_gen;    /* != ack_gen: pause and acknowledge */
	volatile long paused;       /* 1 while the parent verifies */
	struct slot s[N];
};

struct token {
	int32_t worker;
	int32_t pad;
	int64_t seq;
};

static struct shared *sh;
static int pfd[2];
static pid_t workers[N];
static long received[N], last_seq[N];
static long total_tokens;
static char errbuf[512];
static int bad;

static volatile sig_atomic_t probe_req;
static void on_usr1(int sig) { (void)sig; probe_req = 1; }

static void msleep(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000 };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static void fail(const char *fmt, long a, long b, long c)
{
	if (bad)
		return;
	bad = 1;
	snprintf(errbuf, sizeof(errbuf), fmt, a, b, c);
}

static void worker(int i, pid_t parent)
{
	long mine = 0;              /* private copy of the count */
	close(pfd[0]);
	for (;;) {
		if (getppid() != parent)
			_exit(0);
		struct slot *s = &sh->s[i];
		if (s->ping != s->pong) {
			s->pong_pid = getpid();
			__sync_synchronize();
			s->pong = s->ping;
		}
		if (sh->paused) {
			long g = sh->pause_gen;
			if (s->ack_gen != g) {
				s->private_seen = mine;
				__sync_synchronize();
				s->ack_gen = g;
			}
			msleep(1);
			continue;
		}
		mine++;
		s->count = mine;
		struct token t = { i, 0, mine };
		ssize_t w;
		do
			w = write(pfd[1], &t, sizeof(t));
		while (w < 0 && errno == EINTR);
		if (w != sizeof(t))
			_exit(3);
		msleep(1);
	}
}

static int read_tokens(int block_ms)
{
	struct pollfd p = { pfd[0], POLLIN, 0 };
	int r = poll(&p, 1, block_ms);
	if (r <= 0)
		return 0;
	struct token t[64];
	ssize_t n = read(pfd[0], t, sizeof(t));
	if (n < 0)
		return errno == EINTR || errno == EAGAIN ? 0 : -1;
	if (n % sizeof(struct token))
		fail("read a partial token (%ld bytes)", (long)n, 0, 0);
	for (ssize_t k = 0; k < n / (ssize_t)sizeof(struct token); k++) {
		int i = t[k].worker;
		if (i < 0 || i >= N) {
			fail("token from unknown worker %ld", i, 0, 0);
			continue;
		}
		if (t[k].seq != last_seq[i] + 1)
			fail("worker %ld: token %ld after %ld", i, (long)t[k].seq, last_seq[i]);
		last_seq[i] = t[k].seq;
		received[i]++;
		total_tokens++;
	}
	return (int)(n / sizeof(struct token));
}

static void verify(void)
{
	char fails[1024] = "";
	size_t fl = 0;
#define ADD(...) do { if (fl < sizeof(fails) - 1) fl += snprintf(fails + fl, sizeof(fails) - fl, __VA_ARGS__); } while (0)
	if (bad)
		ADD("%s; ", errbuf);
	if (sh->magic != 0x5e12e12)
		ADD("shared magic %lx; ", sh->magic);
	for (int i = 0; i < N; i++) {
		int st;
		pid_t r = waitpid(workers[i], &st, WNOHANG);
		if (r != 0)
			ADD("worker %d (pid %d) is gone (waitpid %d, status 0x%x); ", i, workers[i], r, r > 0 ? st : 0);
		else if (kill(workers[i], 0) != 0)
			ADD("worker %d (pid %d): kill 0: %s; ", i, workers[i], strerror(errno));
	}
	/* pause the workers */
	long gen = sh->pause_gen + 1;
	sh->paused = 1;
	__sync_synchronize();
	sh->pause_gen = gen;
	for (int i = 0; i < N; i++) {
		int waited = 0;
		while (sh->s[i].ack_gen != gen && waited < 10000) {
			read_tokens(0);     /* a worker blocked on a full pipe needs room */
			msleep(1);
			waited++;
		}
		if (sh->s[i].ack_gen != gen)
			ADD("worker %d never paused; ", i);
	}
	while (read_tokens(0) > 0)
		;
	for (int i = 0; i < N; i++) {
		struct slot *s = &sh->s[i];
		if (s->count != received[i] || s->count != last_seq[i] || s->private_seen != s->count)
			ADD("worker %d: shared count %ld, private %ld, %ld tokens received, last %ld; ",
			    i, s->count, s->private_seen, received[i], last_seq[i]);
	}
	/* the handshake: a write by the parent must be seen by the worker */
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	for (int i = 0; i < N; i++) {
		long nonce = ((long)now.tv_nsec << 8) ^ ((long)i << 4) ^ (sh->s[i].ping + 1);
		if (nonce == sh->s[i].pong)
			nonce++;
		sh->s[i].ping = nonce;
		int waited = 0;
		while (sh->s[i].pong != nonce && waited < 10000) {
			msleep(1);
			waited++;
		}
		if (sh->s[i].pong != nonce)
			ADD("worker %d never echoed the parent's nonce through the shared memory; ", i);
		else if (sh->s[i].pong_pid != workers[i])
			ADD("worker %d echoed as pid %ld, want %d; ", i, sh->s[i].pong_pid, workers[i]);
	}
	sh->paused = 0;
	if (fails[0])
		printf("FAIL " NAME ": %s(pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d workers=%d,%d,%d tokens=%ld\n", getpid(),
		       workers[0], workers[1], workers[2], total_tokens);
	fflush(stdout);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED) { perror("mmap"); return 1; }
	memset((void *)sh, 0, sizeof(*sh));
	sh->magic = 0x5e12e12;
	if (pipe(pfd)) { perror("pipe"); return 1; }
	pid_t me = getpid();
	for (int i = 0; i < N; i++) {
		pid_t c = fork();
		if (c < 0) { perror("fork"); return 1; }
		if (c == 0) {
			signal(SIGUSR1, SIG_IGN);
			worker(i, me);
		}
		workers[i] = c;
	}
	close(pfd[1]);

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);

	/* wait for a first token from each worker */
	for (int k = 0; k < 5000; k++) {
		read_tokens(1);
		if (received[0] && received[1] && received[2])
			break;
	}
	printf("READY pid=%d workers=%d,%d,%d\n", getpid(), workers[0], workers[1], workers[2]);
	fflush(stdout);
	for (;;) {
		if (probe_req) {
			probe_req = 0;
			verify();
		}
		if (read_tokens(10) < 0) {
			printf("FAIL " NAME ": read: %s (pid=%d)\n", strerror(errno), getpid());
			fflush(stdout);
			msleep(100);
		}
	}
}
