/*
 * rseq -- the glibc restartable-sequences registration.
 *
 *   rseq
 *
 * glibc (2.35+) registers an rseq area for every thread at start.  A
 * restored task starts without one: the restorer has to register the saved
 * area again (same address, length and signature).  On SIGUSR1 this program
 * checks:
 *   - sched_getcpu() and the getcpu system call give a valid cpu;
 *   - the rseq area's cpu_id is valid and agrees with getcpu;
 *   - the kernel still has *this* area registered: rseq(area, len, 0, SIG)
 *     must fail with EBUSY (0 = nothing was registered: the registration
 *     was lost; EINVAL = another area or length; EPERM = another signature).
 * Without <sys/rseq.h> or with rseq disabled in glibc only the cpu checks
 * are done (READY says rseq=off).
 * Prints "READY pid=P rseq=on|off"; on SIGUSR1 "PASS rseq pid=P cpu=N" or
 * "FAIL rseq: <details> (pid=P)".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#if defined(__has_include)
#if __has_include(<sys/rseq.h>)
#include <sys/rseq.h>
#endif
#endif

#define NAME "rseq"

static volatile sig_atomic_t probe_req;
static void on_usr1(int sig) { (void)sig; probe_req = 1; }

static char fails[4096];
static void fail(const char *fmt, ...)
{
	size_t n = strlen(fails);
	va_list ap;
	if (n && n < sizeof(fails) - 2) { strcat(fails, "; "); n += 2; }
	va_start(ap, fmt);
	vsnprintf(fails + n, sizeof(fails) - n, fmt, ap);
	va_end(ap);
}

static int ncpus;

#if defined(RSEQ_SIG) && defined(SYS_rseq)
#define HAVE_RSEQ 1
static struct rseq *area;
static unsigned reg_len;       /* the length glibc registered with */

static void *thread_pointer(void)
{
	void *tp;
	__asm__("mov %%fs:0, %0" : "=r"(tp));
	return tp;
}

/* 0: registered with exactly (area, len, RSEQ_SIG); else the errno */
static int rseq_probe(unsigned len)
{
	long r = syscall(SYS_rseq, area, len, 0, RSEQ_SIG);
	if (r == -1 && errno == EBUSY)
		return 0;
	if (r == 0)
		return -1;     /* it was NOT registered: now it is (by us) */
	return errno;
}

static int rseq_setup(void)
{
	if (__rseq_size == 0)
		return 0;
	area = (struct rseq *)((char *)thread_pointer() + __rseq_offset);
	unsigned lens[] = { 32, __rseq_size, sizeof(struct rseq) };
	for (unsigned i = 0; i < sizeof(lens) / sizeof(lens[0]); i++)
		if (rseq_probe(lens[i]) == 0) {
			reg_len = lens[i];
			return 1;
		}
	return 0;
}

static int rseq_lost;           /* sticky: the probe re-registers it */

static void rseq_check(void)
{
	int r = rseq_probe(reg_len);
	if (r == -1)
		rseq_lost++;
	if (rseq_lost)
		fail("rseq area %p was not registered (registration lost; seen %d times)",
		     (void *)area, rseq_lost);
	else if (r == EINVAL)
		fail("another rseq area/length is registered (not %p/%u)", (void *)area, reg_len);
	else if (r == EPERM)
		fail("rseq registered with another signature");
	else if (r)
		fail("rseq(): %s", strerror(r));
	int cpu = (int)area->cpu_id, ok = 0;
	if (cpu < 0 || cpu >= ncpus)
		fail("rseq cpu_id %d is not a valid cpu", cpu);
	for (int i = 0; i < 1000 && !ok; i++) {      /* allow for migrations */
		unsigned c = ~0u;
		syscall(SYS_getcpu, &c, NULL, NULL);
		ok = (int)c == (int)area->cpu_id && area->cpu_id_start == area->cpu_id;
	}
	if (!ok)
		fail("rseq cpu_id %d never agrees with getcpu", (int)area->cpu_id);
}
#else
#define HAVE_RSEQ 0
static int rseq_setup(void) { return 0; }
static void rseq_check(void) {}
#endif

static int rseq_on;

static void verify(void)
{
	fails[0] = 0;
	int cpu = sched_getcpu();
	if (cpu < 0 || cpu >= ncpus)
		fail("sched_getcpu() = %d (%s)", cpu, cpu < 0 ? strerror(errno) : "out of range");
	unsigned c = ~0u;
	if (syscall(SYS_getcpu, &c, NULL, NULL) || (int)c >= ncpus)
		fail("getcpu: %u (%s)", c, strerror(errno));
	if (rseq_on)
		rseq_check();
	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d cpu=%d\n", getpid(), cpu);
	fflush(stdout);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	ncpus = (int)sysconf(_SC_NPROCESSORS_CONF);
	rseq_on = HAVE_RSEQ && rseq_setup();

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);

	printf("READY pid=%d rseq=%s\n", getpid(), rseq_on ? "on" : "off");
	fflush(stdout);

	struct timespec ts = { 0, 1000000 };
	for (;;) {
		if (probe_req) {
			probe_req = 0;
			verify();
		}
		/* a little work between sleeps: sched_getcpu uses the rseq area */
		volatile int c = sched_getcpu();
		(void)c;
		nanosleep(&ts, NULL);
	}
}
