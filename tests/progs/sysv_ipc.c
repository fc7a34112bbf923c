/*
 * sysv_ipc -- System V IPC that must come back with the same ids, keys,
 * modes, content and attach addresses after checkpoint/restart.
 *
 *   sysv_ipc KEY        KEY: base key (decimal); the objects use KEY, KEY+1, KEY+2
 *   sysv_ipc KEY undo   also a semop with SEM_UNDO (+1 then -1: the value is
 *                       as before, but the process now holds an undo list)
 *
 * Makes: segment A (key KEY, 3 pages + 100 bytes, mode 0640), attached read-
 * write with a pattern and split in two by mprotect(PROT_READ) of its second
 * page; segment B (IPC_PRIVATE, 1 page) attached read-only by a second
 * attach, then marked removed (IPC_RMID) while attached; a semaphore set
 * (key KEY+1, values 1 5 7, mode 0600); a message queue (key KEY+2, mode
 * 0620) with three messages of types 1, 2, 3.  A child (fork) inherits the
 * attaches and checks that a word written by its parent into A shows.
 * Prints "READY pid=P child=C"; on SIGUSR1 the parent checks everything
 * (without consuming it) and prints "PASS sysv_ipc pid=P" or
 * "FAIL sysv_ipc: <details> (pid=P)"; the child, on SIGUSR1, prints
 * "PASS sysv_ipc pid=C" when it sees its parent's latest word.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <unistd.h>
#include "probe.h"

#define NAME "sysv_ipc"
#define ASIZE (3 * 4096 + 100)

static int shm_a, shm_b, sem, msq;
static key_t key;
static unsigned char *a, *b;
static void *a_at, *b_at;

static unsigned char pat(size_t i) { return (unsigned char)(i * 7 + 3); }

struct msgb { long mtype; char text[32]; };

static void check_parent(void)
{
	struct shmid_ds ds;
	struct semid_ds sds;
	struct msqid_ds mds;
	unsigned short v[3];
	union { int val; struct semid_ds *buf; unsigned short *array; } arg;
	fails[0] = 0;
	if (shmget(key, 0, 0) != shm_a)
		fail("shmget(key) gives %d, not %d", shmget(key, 0, 0), shm_a);
	if (shmctl(shm_a, IPC_STAT, &ds) < 0)
		fail("IPC_STAT A: %s", strerror(errno));
	else {
		if ((ds.shm_perm.mode & 0777) != 0640)
			fail("A mode %o", ds.shm_perm.mode & 0777);
		if (ds.shm_segsz != ASIZE)
			fail("A size %zu", (size_t)ds.shm_segsz);
		if (ds.shm_perm.uid != getuid() || ds.shm_perm.cuid != getuid())
			fail("A owner %u creator %u", ds.shm_perm.uid, ds.shm_perm.cuid);
	}
	for (size_t i = 8; i < ASIZE; i++)
		if (a[i] != pat(i)) { fail("A byte %zu is %u", i, a[i]); break; }
	if (shmctl(shm_b, IPC_STAT, &ds) < 0)
		fail("IPC_STAT B: %s", strerror(errno));
	else if (!(ds.shm_perm.mode & SHM_DEST))
		fail("B not marked removed (mode %o)", ds.shm_perm.mode);
	for (size_t i = 0; i < 4096; i++)
		if (b[i] != (unsigned char)(255 - i % 251)) { fail("B byte %zu is %u", i, b[i]); break; }
	arg.array = v;
	if (semget(key + 1, 0, 0) != sem)
		fail("semget(key+1) gives %d, not %d", semget(key + 1, 0, 0), sem);
	if (semctl(sem, 0, GETALL, arg) < 0 || v[0] != 1 || v[1] != 5 || v[2] != 7)
		fail("semaphores %u %u %u", v[0], v[1], v[2]);
	arg.buf = &sds;
	if (semctl(sem, 0, IPC_STAT, arg) < 0 || (sds.sem_perm.mode & 0777) != 0600)
		fail("sem mode %o", sds.sem_perm.mode & 0777);
	if (msgget(key + 2, 0) != msq)
		fail("msgget(key+2) gives %d, not %d", msgget(key + 2, 0), msq);
	if (msgctl(msq, IPC_STAT, &mds) < 0 || mds.msg_qnum != 3 || (mds.msg_perm.mode & 0777) != 0620)
		fail("queue: %lu messages, mode %o", (unsigned long)mds.msg_qnum, mds.msg_perm.mode & 0777);
	for (int i = 0; i < 3; i++) {
		struct msgb m;
		ssize_t n = msgrcv(msq, &m, sizeof(m.text), i, IPC_NOWAIT | MSG_COPY);
		char want[32];
		snprintf(want, sizeof(want), "message %d", i + 1);
		if (n != (ssize_t)strlen(want) + 1 || m.mtype != i + 1 || strcmp(m.text, want))
			fail("message %d: n=%zd type %ld", i, n, m.mtype);
	}
	if ((void *)a != a_at || (void *)b != b_at)
		fail("addresses moved");
	/* the second page of A is read-only, B too: the maps must say so */
	FILE *f = fopen("/proc/self/maps", "r");
	char line[512];
	int ro = 0;
	while (f && fgets(line, sizeof(line), f)) {
		unsigned long s;
		char perms[8];
		if (sscanf(line, "%lx-%*lx %7s", &s, perms) == 2 &&
		    (s == (unsigned long)a + 4096 || s == (unsigned long)b) && perms[1] == '-')
			ro++;
	}
	if (f)
		fclose(f);
	if (ro != 2)
		fail("%d of the 2 read-only areas are read-only", ro);
}

int main(int argc, char **argv)
{
	key = argc > 1 ? atoi(argv[1]) : 4242;
	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGUSR1, on_usr1);
	shm_a = shmget(key, ASIZE, IPC_CREAT | IPC_EXCL | 0640);
	shm_b = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
	sem = semget(key + 1, 3, IPC_CREAT | IPC_EXCL | 0600);
	msq = msgget(key + 2, IPC_CREAT | IPC_EXCL | 0620);
	if (shm_a < 0 || shm_b < 0 || sem < 0 || msq < 0) {
		printf("FAIL " NAME ": setup: %s (pid=%d)\n", strerror(errno), getpid());
		return 1;
	}
	a = a_at = shmat(shm_a, NULL, 0);
	unsigned char *bw = shmat(shm_b, NULL, 0);
	b = b_at = shmat(shm_b, NULL, SHM_RDONLY);
	for (size_t i = 0; i < ASIZE; i++)
		a[i] = pat(i);
	for (size_t i = 0; i < 4096; i++)
		bw[i] = (unsigned char)(255 - i % 251);
	shmdt(bw);
	shmctl(shm_b, IPC_RMID, NULL);
	mprotect(a + 4096, 4096, PROT_READ);
	unsigned short vals[3] = {1, 5, 7};
	union { int val; struct semid_ds *buf; unsigned short *array; } arg = {.array = vals};
	semctl(sem, 0, SETALL, arg);
	for (int i = 1; i <= 3; i++) {
		struct msgb m = {.mtype = i};
		snprintf(m.text, sizeof(m.text), "message %d", i);
		msgsnd(msq, &m, strlen(m.text) + 1, 0);
	}
	if (argc > 2 && !strcmp(argv[2], "undo")) {
		struct sembuf up = {0, 1, SEM_UNDO}, down = {0, -1, SEM_UNDO};
		semop(sem, &up, 1);
		semop(sem, &down, 1);
	}
	volatile uint64_t *word = (volatile uint64_t *)a;
	*word = 1;
	pid_t child = fork();
	if (child == 0) {
		for (;;) {
			pause();
			if (probe_req) {
				probe_req = 0;
				uint64_t w = *word;
				/* the parent bumps the word on each of its probes; it must
				 * be the same segment, not a copy: the parent writes it */
				printf("PASS " NAME " pid=%d word=%llu\n", getpid(), (unsigned long long)w);
			}
		}
	}
	signal(SIGCHLD, SIG_IGN);     /* a killed child goes without a wait */
	printf("READY pid=%d child=%d shm=%d\n", getpid(), child, shm_a);
	for (;;) {
		pause();
		if (probe_req) {
			probe_req = 0;
			check_parent();
			*word += 1;
			if (fails[0])
				printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
			else
				printf("PASS " NAME " pid=%d word=%llu\n", getpid(), (unsigned long long)*word);
		}
	}
}
