/*
 * tree_pipefile -- two processes, two pipes and one shared file description.
 *
 *   tree_pipefile FILE
 *
 * The parent opens FILE (created or truncated, O_WRONLY) and forks a
 * child; both hold the same open file description (one file offset).  The
 * parent writes numbers 1, 2, 3, ... into a pipe, one every millisecond;
 * the child reads them and writes "N\n" to FILE through the shared
 * description.  Number 0 is a sync request: the child answers on a second
 * pipe once everything before it is in the file.
 *
 * On SIGUSR1 the parent sends a sync, waits for the answer (up to 10 s),
 * then checks that FILE holds exactly "1\n" .. "N\n" for every number N it
 * sent, and that the shared offset (its own lseek(fd, 0, SEEK_CUR), moved
 * only by the child's writes) equals the file size.  Prints "READY pid=P
 * child=C" and "PASS tree_pipefile pid=P child=C sent=N" or
 * "FAIL tree_pipefile: <details> (pid=P)".  The child exits when its
 * parent is gone.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NAME "tree_pipefile"

static volatile sig_atomic_t probe_req;
static void on_usr1(int sig) { (void)sig; probe_req = 1; }

static int write_all(int fd, const void *buf, size_t n)
{
	const char *p = buf;
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static int read_all(int fd, void *buf, size_t n)
{
	char *p = buf;
	while (n) {
		ssize_t r = read(fd, p, n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		p += r;
		n -= (size_t)r;
	}
	return 0;
}

static void child(int in, int ack, int out, pid_t parent)
{
	signal(SIGUSR1, SIG_IGN);
	long expect = 1;
	for (;;) {
		struct pollfd p = { in, POLLIN, 0 };
		if (poll(&p, 1, 50) == 0) {
			if (getppid() != parent)
				_exit(0);
			continue;
		}
		long n;
		if (read_all(in, &n, sizeof(n)) < 0)
			_exit(0);
		if (n == 0) {
			long a = expect - 1;
			if (write_all(ack, &a, sizeof(a)) < 0)
				_exit(0);
			continue;
		}
		if (n != expect) {
			char buf[64];
			int len = snprintf(buf, sizeof(buf), "out of order: %ld after %ld\n", n, expect - 1);
			write_all(out, buf, (size_t)len);
			_exit(4);
		}
		expect++;
		char buf[32];
		int len = snprintf(buf, sizeof(buf), "%ld\n", n);
		if (write_all(out, buf, (size_t)len) < 0)
			_exit(5);
	}
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 2) {
		fprintf(stderr, "usage: tree_pipefile FILE\n");
		return 2;
	}
	const char *path = argv[1];
	int out = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (out < 0) { perror(path); return 1; }
	int down[2], up[2];
	if (pipe(down) || pipe(up)) { perror("pipe"); return 1; }
	pid_t me = getpid();
	pid_t c = fork();
	if (c < 0) { perror("fork"); return 1; }
	if (c == 0) {
		close(down[1]);
		close(up[0]);
		child(down[0], up[1], out, me);
	}
	close(down[0]);
	close(up[1]);
	signal(SIGPIPE, SIG_IGN);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	printf("READY pid=%d child=%d\n", me, c);

	long sent = 0;
	for (;;) {
		if (probe_req) {
			probe_req = 0;
			char fails[512] = "";
			long zero = 0, acked = -1;
			struct pollfd p = { up[0], POLLIN, 0 };
			if (write_all(down[1], &zero, sizeof(zero)) < 0)
				snprintf(fails, sizeof(fails), "cannot send a sync: %s", strerror(errno));
			else if (poll(&p, 1, 10000) != 1 || read_all(up[0], &acked, sizeof(acked)) < 0)
				snprintf(fails, sizeof(fails), "no answer from the child to a sync");
			else if (acked != sent)
				snprintf(fails, sizeof(fails), "child wrote %ld numbers, %ld sent", acked, sent);
			if (!fails[0]) {
				FILE *f = fopen(path, "r");
				long want = 1, n;
				while (f && fscanf(f, "%ld\n", &n) == 1) {
					if (n != want)
						break;
					want++;
				}
				struct stat st;
				off_t off = lseek(out, 0, SEEK_CUR);
				if (!f)
					snprintf(fails, sizeof(fails), "cannot open %s: %s", path, strerror(errno));
				else if (!feof(f) || want != sent + 1)
					snprintf(fails, sizeof(fails), "file holds 1..%ld in order, then %s; %ld sent",
						 want - 1, feof(f) ? "ends" : "something else", sent);
				else if (fstat(out, &st) || off != st.st_size)
					snprintf(fails, sizeof(fails), "shared offset %ld, file size %ld",
						 (long)off, (long)st.st_size);
				if (f)
					fclose(f);
			}
			int st;
			if (!fails[0] && waitpid(c, &st, WNOHANG) != 0)
				snprintf(fails, sizeof(fails), "child %d is gone", c);
			if (fails[0])
				printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
			else
				printf("PASS " NAME " pid=%d child=%d sent=%ld\n", getpid(), c, sent);
		}
		sent++;
		if (write_all(down[1], &sent, sizeof(sent)) < 0) {
			printf("FAIL " NAME ": write to the child: %s (pid=%d)\n", strerror(errno), getpid());
			return 1;
		}
		struct timespec ts = { 0, 1000000 };
		nanosleep(&ts, NULL);
	}
}
