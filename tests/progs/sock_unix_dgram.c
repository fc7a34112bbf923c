/*
 * sock_unix_dgram -- a UNIX datagram socket bound to a name, that reads
 * nothing until asked: datagrams sent to it stay queued in the kernel.
 *
 *   sock_unix_dgram NAME      a path, or @name for an abstract name
 *
 * Prints "READY pid=P"; on SIGUSR1 reads every queued datagram and prints
 * "PASS sock_unix_dgram pid=P got=N msgs=A|B|C" (the datagrams in order).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static volatile sig_atomic_t probe_req;
static void on_usr1(int sig) { (void)sig; probe_req = 1; }

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2)
		return 2;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	struct sockaddr_un a;
	memset(&a, 0, sizeof(a));
	a.sun_family = AF_UNIX;
	size_t n = strlen(argv[1]);
	socklen_t al;
	if (argv[1][0] == '@') {
		memcpy(a.sun_path + 1, argv[1] + 1, n - 1);
		al = (socklen_t)(sizeof(sa_family_t) + n);
	} else {
		memcpy(a.sun_path, argv[1], n);
		al = (socklen_t)(sizeof(sa_family_t) + n + 1);
	}
	int s = socket(AF_UNIX, SOCK_DGRAM, 0);
	if (bind(s, (struct sockaddr *)&a, al)) {
		perror("bind");
		return 1;
	}
	printf("READY pid=%d\n", getpid());
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
		printf("PASS sock_unix_dgram pid=%d got=%d msgs=%s\n", getpid(), got, line);
	}
}
