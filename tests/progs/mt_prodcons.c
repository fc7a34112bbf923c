/*
 * mt_prodcons -- producer and consumer threads on a bounded queue
 * (pthread mutex + two condition variables).
 *
 *   mt_prodcons
 *
 * 3 producer threads ("prod-0".."prod-2") push items {producer, seq} with
 * seq = 1, 2, 3, ... for each producer into a queue of 8 slots; 3 consumer
 * threads ("cons-0".."cons-2") pop them.  Consumers check, under the mutex,
 * that the items of each producer come out in order with no gap or
 * duplicate.  Producers sleep 200 us between items, consumers 300 us after
 * each, so the queue is sometimes full (producers wait on not_full) and
 * sometimes empty (consumers wait on not_empty).  Worker threads block all
 * signals: SIGUSR1 goes to the main thread ("mt-main").
 *
 * On SIGUSR1 the main thread checks: 7 threads; each thread has its name
 * (/proc/self/task/TID/comm) and its recorded tid is in /proc/self/task;
 * no sequence error; for each producer, produced = consumed + queued; every
 * thread made progress since the last probe (waits up to 5 s).
 * Prints "READY pid=P tids=T1,T2,..." (the worker tids in order prod-0..
 * cons-2), then "PASS mt_prodcons pid=P tids=... items=N" or
 * "FAIL mt_prodcons: <details> (pid=P)".
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NAME "mt_prodcons"
#define NP 3
#define NC 3
#define QCAP 8

struct item { int prod; long seq; };

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t not_full = PTHREAD_COND_INITIALIZER;
static pthread_cond_t not_empty = PTHREAD_COND_INITIALIZER;
static struct item q[QCAP];
static int qhead, qlen;

static long produced[NP];           /* under mu */
static long consumed_from[NP];      /* under mu */
static long last_seq[NP];           /* under mu */
static long consumed_by[NC];        /* under mu */
static long seq_errors;             /* under mu */
static char seq_error_text[160];

static volatile pid_t tids[NP + NC];
static char names[NP + NC][16];
static volatile long progress[NP + NC];

static volatile sig_atomic_t probe_req;
static void on_usr1(int sig) { (void)sig; probe_req = 1; }

static void usleep_(long us)
{
	struct timespec ts = { 0, us * 1000 };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static void setup_thread(int idx)
{
	sigset_t all;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	pthread_setname_np(pthread_self(), names[idx]);
	tids[idx] = (pid_t)syscall(SYS_gettid);
}

static void *producer(void *arg)
{
	int p = (int)(long)arg;
	setup_thread(p);
	for (long seq = 1;; seq++) {
		pthread_mutex_lock(&mu);
		while (qlen == QCAP)
			pthread_cond_wait(&not_full, &mu);
		q[(qhead + qlen) % QCAP] = (struct item){ p, seq };
		qlen++;
		produced[p] = seq;
		pthread_cond_signal(&not_empty);
		pthread_mutex_unlock(&mu);
		progress[p]++;
		usleep_(200);
	}
	return NULL;
}

static void *consumer(void *arg)
{
	int c = (int)(long)arg;
	setup_thread(NP + c);
	for (;;) {
		pthread_mutex_lock(&mu);
		while (qlen == 0)
			pthread_cond_wait(&not_empty, &mu);
		struct item it = q[qhead];
		qhead = (qhead + 1) % QCAP;
		qlen--;
		if (it.prod < 0 || it.prod >= NP || it.seq != last_seq[it.prod] + 1) {
			if (!seq_errors)
				snprintf(seq_error_text, sizeof(seq_error_text),
					 "consumer %d got item %ld of producer %d after %ld", c, it.seq,
					 it.prod, it.prod >= 0 && it.prod < NP ? last_seq[it.prod] : -1L);
			seq_errors++;
		}
		if (it.prod >= 0 && it.prod < NP) {
			last_seq[it.prod] = it.seq;
			consumed_from[it.prod]++;
		}
		consumed_by[c]++;
		pthread_cond_signal(&not_full);
		pthread_mutex_unlock(&mu);
		progress[NP + c]++;
		usleep_(300);
	}
	return NULL;
}

static int count_threads(void)
{
	int n = 0;
	DIR *d = opendir("/proc/self/task");
	struct dirent *e;
	while (d && (e = readdir(d)))
		if (e->d_name[0] != '.')
			n++;
	if (d)
		closedir(d);
	return n;
}

static int read_comm(pid_t tid, char *out, size_t n)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/self/task/%d/comm", tid);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	if (!fgets(out, (int)n, f)) {
		fclose(f);
		return -1;
	}
	fclose(f);
	out[strcspn(out, "\n")] = 0;
	return 0;
}

static long last_progress[NP + NC];

static void verify(void)
{
	char fails[1024] = "";
	size_t fl = 0;
#define ADD(...) do { if (fl < sizeof(fails) - 1) fl += snprintf(fails + fl, sizeof(fails) - fl, __VA_ARGS__); } while (0)
	int n = count_threads();
	if (n != 1 + NP + NC)
		ADD("%d threads, want %d; ", n, 1 + NP + NC);
	char comm[32];
	if (read_comm(getpid(), comm, sizeof(comm)) || strcmp(comm, "mt-main"))
		ADD("main thread is named '%s', want 'mt-main'; ", comm);
	for (int i = 0; i < NP + NC; i++) {
		if (read_comm(tids[i], comm, sizeof(comm)))
			ADD("thread %s: tid %d not in /proc/self/task; ", names[i], tids[i]);
		else if (strcmp(comm, names[i]))
			ADD("tid %d is named '%s', want '%s'; ", tids[i], comm, names[i]);
	}
	for (int i = 0; i < NP + NC; i++) {
		for (int k = 0; k < 5000 && progress[i] <= last_progress[i]; k++)
			usleep_(1000);
		if (progress[i] <= last_progress[i])
			ADD("thread %s made no progress; ", names[i]);
		last_progress[i] = progress[i];
	}
	long items = 0;
	pthread_mutex_lock(&mu);
	if (seq_errors)
		ADD("%ld sequence errors, first: %s; ", seq_errors, seq_error_text);
	long inq[NP] = { 0 };
	for (int k = 0; k < qlen; k++)
		inq[q[(qhead + k) % QCAP].prod]++;
	long by = 0;
	for (int c = 0; c < NC; c++)
		by += consumed_by[c];
	for (int p = 0; p < NP; p++) {
		if (produced[p] != consumed_from[p] + inq[p])
			ADD("producer %d: produced %ld, consumed %ld, queued %ld; ", p, produced[p],
			    consumed_from[p], inq[p]);
		if (consumed_from[p] != last_seq[p])
			ADD("producer %d: consumed %ld items, last seq %ld; ", p, consumed_from[p], last_seq[p]);
		items += consumed_from[p];
	}
	if (by != items)
		ADD("consumers counted %ld items, producers' tallies %ld; ", by, items);
	pthread_mutex_unlock(&mu);
	if (fails[0]) {
		printf("FAIL " NAME ": %s(pid=%d)\n", fails, getpid());
	} else {
		printf("PASS " NAME " pid=%d tids=", getpid());
		for (int i = 0; i < NP + NC; i++)
			printf("%s%d", i ? "," : "", tids[i]);
		printf(" items=%ld\n", items);
	}
	fflush(stdout);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	pthread_setname_np(pthread_self(), "mt-main");
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);

	pthread_t th;
	for (int p = 0; p < NP; p++) {
		snprintf(names[p], sizeof(names[p]), "prod-%d", p);
		if (pthread_create(&th, NULL, producer, (void *)(long)p)) { perror("pthread_create"); return 1; }
	}
	for (int c = 0; c < NC; c++) {
		snprintf(names[NP + c], sizeof(names[NP + c]), "cons-%d", c);
		if (pthread_create(&th, NULL, consumer, (void *)(long)c)) { perror("pthread_create"); return 1; }
	}
	for (int i = 0; i < NP + NC; i++)
		while (!tids[i] || !progress[i])
			usleep_(1000);
	printf("READY pid=%d tids=", getpid());
	for (int i = 0; i < NP + NC; i++)
		printf("%s%d", i ? "," : "", tids[i]);
	printf("\n");
	fflush(stdout);
	for (;;) {
		if (probe_req) {
			probe_req = 0;
			verify();
		}
		usleep_(1000);
	}
}
