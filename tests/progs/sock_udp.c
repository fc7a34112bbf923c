/*
 * sock_udp -- a UDP socket bound to the loopback and connected to a peer,
 * reading nothing until asked.
 *
 *   sock_udp PEERPORT [4|6]   peer: 127.0.0.1:PEERPORT (or [::1])
 *
 * Prints "READY pid=P port=N"; on SIGUSR1 reads every queued datagram,
 * sends "got=N" to its peer (through the connection) and prints
 * "PASS sock_udp pid=P got=N msgs=A|B|C", or FAIL if the send failed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t probe_req;
static void on_usr1(int sig) { (void)sig; probe_req = 1; }

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2)
		return 2;
	int six = argc > 2 && strcmp(argv[2], "6") == 0;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	int s = socket(six ? AF_INET6 : AF_INET, SOCK_DGRAM, 0);
	struct sockaddr_storage me, peer;
	socklen_t sl;
	memset(&me, 0, sizeof(me));
	memset(&peer, 0, sizeof(peer));
	if (six) {
		struct sockaddr_in6 *a = (void *)&me, *p = (void *)&peer;
		a->sin6_family = p->sin6_family = AF_INET6;
		a->sin6_addr = p->sin6_addr = in6addr_loopback;
		p->sin6_port = htons((unsigned short)atoi(argv[1]));
		sl = sizeof(*a);
	} else {
		struct sockaddr_in *a = (void *)&me, *p = (void *)&peer;
		a->sin_family = p->sin_family = AF_INET;
		a->sin_addr.s_addr = p->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		p->sin_port = htons((unsigned short)atoi(argv[1]));
		sl = sizeof(*a);
	}
	if (bind(s, (struct sockaddr *)&me, sl) || connect(s, (struct sockaddr *)&peer, sl)) {
		perror("bind/connect");
		return 1;
	}
	getsockname(s, (struct sockaddr *)&me, &sl);
	printf("READY pid=%d port=%d\n", getpid(),
	       ntohs(six ? ((struct sockaddr_in6 *)&me)->sin6_port : ((struct sockaddr_in *)&me)->sin_port));
	for (;;) {
		pause();
		if (!probe_req)
			continue;
		probe_req = 0;
		static char line[65536];
		char buf[4096];
		int got = 0, off = 0;
		line[0] = 0;
		for (;;) {
			ssize_t r = recv(s, buf, sizeof(buf) - 1, MSG_DONTWAIT);
			if (r < 0)
				break;
			buf[r] = 0;
			off += snprintf(line + off, sizeof(line) - (size_t)off, "%s%s", got ? "|" : "", buf);
			got++;
		}
		char reply[64];
		int len = snprintf(reply, sizeof(reply), "got=%d", got);
		if (send(s, reply, (size_t)len, 0) != len)
			printf("FAIL sock_udp pid=%d: send: %s\n", getpid(), strerror(errno));
		else
			printf("PASS sock_udp pid=%d got=%d msgs=%s\n", getpid(), got, line);
	}
}
