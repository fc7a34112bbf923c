/*
 * sock_tcp_echo -- a TCP echo server on the loopback: every byte a client
 * sends comes back to it, in order.  Its listener and its connections are
 * what lcr saves (the clients are not part of the checkpointed tree).
 *
 *   sock_tcp_echo [4|6]       listen on 127.0.0.1 (or ::1), any free port
 *
 * Prints "READY pid=P port=N"; on SIGUSR1 prints
 * "PASS sock_tcp_echo pid=P conns=C accepted=A echoed=B" (C: connections
 * open now, A: accepted since the start, B: bytes echoed), or FAIL when an
 * error happened on a connection (a reset, a failed write).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXC 64

static volatile sig_atomic_t probe_req;
static void on_usr1(int sig) { (void)sig; probe_req = 1; }

static int write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	int six = argc > 1 && strcmp(argv[1], "6") == 0;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	int ls = socket(six ? AF_INET6 : AF_INET, SOCK_STREAM, 0);
	int one = 1;
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_storage ss;
	socklen_t sl;
	memset(&ss, 0, sizeof(ss));
	if (six) {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
		a->sin6_family = AF_INET6;
		a->sin6_addr = in6addr_loopback;
		sl = sizeof(*a);
	} else {
		struct sockaddr_in *a = (struct sockaddr_in *)&ss;
		a->sin_family = AF_INET;
		a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		sl = sizeof(*a);
	}
	if (bind(ls, (struct sockaddr *)&ss, sl) || listen(ls, 16)) {
		perror("bind/listen");
		return 1;
	}
	getsockname(ls, (struct sockaddr *)&ss, &sl);
	int port = ntohs(six ? ((struct sockaddr_in6 *)&ss)->sin6_port : ((struct sockaddr_in *)&ss)->sin_port);
	printf("READY pid=%d port=%d\n", getpid(), port);

	struct pollfd pf[MAXC + 1];
	int nc = 0, accepted = 0, errors = 0;
	long long echoed = 0;
	char why[256] = "";
	static char buf[65536];
	pf[0].fd = ls;
	pf[0].events = POLLIN;
	for (;;) {
		if (probe_req) {
			probe_req = 0;
			if (errors)
				printf("FAIL sock_tcp_echo pid=%d: %d errors, last: %s\n", getpid(), errors, why);
			else
				printf("PASS sock_tcp_echo pid=%d conns=%d accepted=%d echoed=%lld\n", getpid(), nc,
				       accepted, echoed);
		}
		int n = poll(pf, (nfds_t)nc + 1, 100);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror("poll");
			return 1;
		}
		if (pf[0].revents & POLLIN) {
			int c = accept(ls, NULL, NULL);
			if (c >= 0 && nc < MAXC) {
				pf[++nc].fd = c;
				pf[nc].events = POLLIN;
				pf[nc].revents = 0;
				accepted++;
			} else if (c >= 0) {
				close(c);
			}
		}
		for (int i = 1; i <= nc; i++) {
			if (!pf[i].revents)
				continue;
			ssize_t r = read(pf[i].fd, buf, sizeof(buf));
			if (r < 0 && errno == EINTR)
				continue;
			if (r < 0 && errno == EAGAIN)
				continue;
			if (r > 0 && write_all(pf[i].fd, buf, (size_t)r) == 0) {
				echoed += r;
				continue;
			}
			if (r != 0) {
				errors++;
				snprintf(why, sizeof(why), "connection %d: %s", i, strerror(errno));
			}
			close(pf[i].fd);
			pf[i] = pf[nc--];
			i--;
		}
	}
}
