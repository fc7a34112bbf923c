/*
 * snap_counter -- a counter and a file offset that move together.
 *
 *   snap_counter FILE
 *
 * Every millisecond: count++ and the offset of FILE (opened O_RDONLY)
 * advances by one byte (lseek SEEK_CUR).  On SIGUSR1 prints
 *     PASS snap_counter pid=P count=N off=O
 * or  FAIL snap_counter: offset O != count N (pid=P)
 * A rollback must bring both back to the same moment.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t probe;
static void on_usr1(int s) { (void)s; probe = 1; }

int main(int argc, char **argv)
{
	if (argc != 2) return 2;
	int fd = open(argv[1], O_RDONLY);
	if (fd < 0) { perror("open"); return 1; }
	signal(SIGUSR1, on_usr1);
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("READY pid=%d\n", getpid());
	uint64_t count = 0;
	struct timespec ms = {0, 1000000};
	for (;;) {
		sigset_t all, old;
		sigfillset(&all);
		sigprocmask(SIG_BLOCK, &all, &old);     /* both move as one */
		count++;
		lseek(fd, 1, SEEK_CUR);
		sigprocmask(SIG_SETMASK, &old, NULL);
		if (probe) {
			probe = 0;
			off_t off = lseek(fd, 0, SEEK_CUR);
			if ((uint64_t)off == count)
				printf("PASS snap_counter pid=%d count=%llu off=%lld\n", getpid(),
				       (unsigned long long)count, (long long)off);
			else
				printf("FAIL snap_counter: offset %lld != count %llu (pid=%d)\n",
				       (long long)off, (unsigned long long)count, getpid());
		}
		nanosleep(&ms, NULL);
	}
}
