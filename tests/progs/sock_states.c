/*
 * sock_states -- TCP sockets in particular states, for `lcr check` and for
 * a connection whose both ends are in the checkpointed process.
 *
 *   sock_states synsent PORT   a non-blocking connect() to 127.0.0.1:PORT
 *                              (the test makes it stay in SYN_SENT)
 *   sock_states pending        a listener (printed port=N) that never
 *                              accepts: connections queue up
 *   sock_states pair [4|6]     a listener, a connection to it and the
 *                              accepted end, with bytes queued both ways
 *
 * Prints "READY pid=P port=N fd=F" (F: the socket of interest).  On SIGUSR1:
 * pair checks both queued messages arrive intact, queues them again, does
 * one more round trip and prints "PASS sock_states pid=P" (or FAIL); the
 * other modes print "PASS sock_states pid=P".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t probe_req;
static void on_usr1(int sig) { (void)sig; probe_req = 1; }

static const char C2S[] = "queued from the client to the server";
static const char S2C[] = "queued from the server to the client, a bit longer";

static socklen_t loop_addr(struct sockaddr_storage *ss, int six, int port)
{
	memset(ss, 0, sizeof(*ss));
	if (six) {
		struct sockaddr_in6 *a = (void *)ss;
		a->sin6_family = AF_INET6;
		a->sin6_addr = in6addr_loopback;
		a->sin6_port = htons((unsigned short)port);
		return sizeof(*a);
	}
	struct sockaddr_in *a = (void *)ss;
	a->sin_family = AF_INET;
	a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	a->sin_port = htons((unsigned short)port);
	return sizeof(*a);
}

static int port_of(int s)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	getsockname(s, (struct sockaddr *)&ss, &sl);
	return ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
					      : ((struct sockaddr_in *)&ss)->sin_port);
}

static int listener(int six, int backlog)
{
	struct sockaddr_storage ss;
	socklen_t sl = loop_addr(&ss, six, 0);
	int ls = socket(ss.ss_family, SOCK_STREAM, 0);
	if (bind(ls, (struct sockaddr *)&ss, sl) || listen(ls, backlog)) {
		perror("bind/listen");
		exit(1);
	}
	return ls;
}

static int expect(int fd, const char *want)
{
	size_t n = strlen(want), got = 0;
	char buf[256];
	while (got < n) {
		ssize_t r = read(fd, buf + got, n - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		got += (size_t)r;
	}
	return memcmp(buf, want, n) ? -1 : 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2)
		return 2;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	int cs = -1, as = -1, fd = -1, port = 0;
	if (strcmp(argv[1], "synsent") == 0 && argc > 2) {
		struct sockaddr_storage ss;
		socklen_t sl = loop_addr(&ss, 0, atoi(argv[2]));
		fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
		if (connect(fd, (struct sockaddr *)&ss, sl) == 0 || errno != EINPROGRESS) {
			printf("FAIL sock_states: connect did not stay in progress: %s\n", strerror(errno));
			return 1;
		}
		port = atoi(argv[2]);
	} else if (strcmp(argv[1], "pending") == 0) {
		fd = listener(0, 5);
		port = port_of(fd);
	} else if (strcmp(argv[1], "pair") == 0) {
		int six = argc > 2 && strcmp(argv[2], "6") == 0;
		int ls = listener(six, 1);
		struct sockaddr_storage ss;
		socklen_t sl = loop_addr(&ss, six, port_of(ls));
		cs = socket(ss.ss_family, SOCK_STREAM, 0);
		if (connect(cs, (struct sockaddr *)&ss, sl)) {
			perror("connect");
			return 1;
		}
		as = accept(ls, NULL, NULL);
		if (write(cs, C2S, strlen(C2S)) < 0 || write(as, S2C, strlen(S2C)) < 0)
			return 1;
		fd = as;
		port = port_of(ls);
	} else {
		fprintf(stderr, "usage: sock_states synsent PORT | pending | pair [4|6]\n");
		return 2;
	}
	printf("READY pid=%d port=%d fd=%d\n", getpid(), port, fd);
	for (;;) {
		pause();
		if (!probe_req)
			continue;
		probe_req = 0;
		if (as < 0) {
			printf("PASS sock_states pid=%d\n", getpid());
			continue;
		}
		const char *bad = NULL;
		if (expect(as, C2S))
			bad = "client->server queue";
		else if (expect(cs, S2C))
			bad = "server->client queue";
		else if (write(cs, "ping", 4) != 4 || expect(as, "ping"))
			bad = "round trip";
		else if (write(cs, C2S, strlen(C2S)) < 0 || write(as, S2C, strlen(S2C)) < 0)
			bad = "queue again";
		if (bad)
			printf("FAIL sock_states pid=%d: %s\n", getpid(), bad);
		else
			printf("PASS sock_states pid=%d\n", getpid());
	}
}
