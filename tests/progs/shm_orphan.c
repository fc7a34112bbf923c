/*
 * shm_orphan -- a shared anonymous area (MAP_SHARED|MAP_ANONYMOUS) whose
 * pages were written by a child that has exited: the parent's page tables
 * never map them (pagemap does not show them), the object holds them.
 *
 * Prints "READY pid=P"; on SIGUSR1 checks that pages 3..10 hold the
 * child's bytes (without touching them before the first probe) and prints
 * "PASS shm_orphan pid=P" or "FAIL shm_orphan: ... (pid=P)".
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include "probe.h"

#define NAME "shm_orphan"

int main(void)
{
	unsigned char *p = mmap(NULL, 64 * 4096, PROT_READ | PROT_WRITE,
				MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGUSR1, on_usr1);
	p[0] = 1;
	if (fork() == 0) {
		for (int i = 3; i <= 10; i++)
			memset(p + i * 4096, 0x40 + i, 4096);
		_exit(0);
	}
	wait(NULL);
	printf("READY pid=%d\n", getpid());
	for (;;) {
		pause();
		if (!probe_req)
			continue;
		probe_req = 0;
		fails[0] = 0;
		for (int i = 3; i <= 10; i++)
			if (p[i * 4096 + 99] != 0x40 + i) {
				fail("page %d holds %u", i, p[i * 4096 + 99]);
				break;
			}
		if (fails[0])
			printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
		else
			printf("PASS " NAME " pid=%d\n", getpid());
	}
}
