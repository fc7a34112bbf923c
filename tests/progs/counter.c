/*
 * counter -- the simplest checkpoint/restart test program.
 *
 *   counter
 *
 * State: a counter in memory, a register-heavy integer loop (many live
 * values in general-purpose registers for ~1 ms at a time), an 8 MiB
 * malloc'd buffer and a static .bss array whose weighted checksum is kept up
 * to date incrementally while random words are rewritten, and an initialised
 * .data table.
 *
 * Prints "READY pid=P" when set up.  On SIGUSR1 it verifies everything and
 * prints one line:
 *     PASS counter pid=P count=N
 *     FAIL counter: <what is wrong> (pid=P)
 * then keeps running.  A restore that loses registers in the middle of the
 * register loop, loses or swaps pages, or rewinds the counter is detected.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NAME "counter"
#define BUF_WORDS ((8UL << 20) / 8)
#define STATIC_WORDS 65536

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

static uint64_t *buf;                       /* malloc'd, 8 MiB */
static uint64_t sarr[STATIC_WORDS];         /* .bss, 512 KiB */
static const uint64_t dconst[8] = {         /* .rodata/.data */
	0x0123456789abcdefULL, 0xfedcba9876543210ULL, 0xdeadbeefcafebabeULL,
	0x1111111111111111ULL, 0x8000000000000001ULL, 0x7fffffffffffffffULL,
	0x5555aaaa5555aaaaULL, 0x0f0f0f0ff0f0f0f0ULL,
};
static uint64_t dinit[4] = { 11, 22, 33, 44 };  /* .data, written below */
static volatile uint64_t counter;
static uint64_t expected;                   /* weighted checksum of buf+sarr */

static inline uint64_t xs64(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13; x ^= x >> 7; x ^= x << 17;
	return *s = x;
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* Twelve live 64-bit values: at -O1 they all sit in registers for the whole
 * loop.  noipa: two calls with the same argument must really both run. */
__attribute__((noipa)) static uint64_t regloop(uint64_t seed, long n)
{
	uint64_t a = seed | 1, b = a * 3 + 1, c = a ^ 0x9e3779b97f4a7c15ULL,
		 d = rotl(a, 17), e = ~a, f = a * 0x2545f4914f6cdd1dULL,
		 g = a + 12345, h = rotl(c, 31), i2 = b ^ d, j = e + f,
		 k = g ^ h, l = 7;
	for (long it = 0; it < n; it++) {
		a += b ^ (c >> 3);
		b = rotl(b ^ d, 7) + e;
		c ^= a + f;
		d = rotl(d + g, 13) ^ h;
		e += i2 ^ (j << 1);
		f = rotl(f ^ k, 29) + l;
		g += a ^ d;
		h ^= b + e;
		i2 = rotl(i2 + c, 11) ^ f;
		j += g ^ h;
		k = rotl(k ^ i2, 5) + j;
		l += k ^ a;
	}
	return a ^ b ^ c ^ d ^ e ^ f ^ g ^ h ^ i2 ^ j ^ k ^ l;
}

static uint64_t word_weight(size_t i) { return 2 * (uint64_t)i + 1; }

static uint64_t full_checksum(void)
{
	uint64_t s = 0;
	for (size_t i = 0; i < BUF_WORDS; i++)
		s += buf[i] * word_weight(i);
	for (size_t i = 0; i < STATIC_WORDS; i++)
		s += sarr[i] * word_weight(BUF_WORDS + i);
	return s;
}

static void set_word(size_t i, uint64_t v)
{
	uint64_t *p = i < BUF_WORDS ? &buf[i] : &sarr[i - BUF_WORDS];
	expected += (v - *p) * word_weight(i);
	*p = v;
}

static uint64_t last_probe_count;
static long reg_mismatches;

static void verify(void)
{
	static const uint64_t want_dconst[8] = {
		0x0123456789abcdefULL, 0xfedcba9876543210ULL, 0xdeadbeefcafebabeULL,
		0x1111111111111111ULL, 0x8000000000000001ULL, 0x7fffffffffffffffULL,
		0x5555aaaa5555aaaaULL, 0x0f0f0f0ff0f0f0f0ULL,
	};
	fails[0] = 0;
	uint64_t now = counter;
	if (now <= last_probe_count)
		fail("counter did not increase: %llu after %llu",
		     (unsigned long long)now, (unsigned long long)last_probe_count);
	last_probe_count = now;
	uint64_t act = full_checksum();
	if (act != expected)
		fail("memory checksum %016llx != expected %016llx",
		     (unsigned long long)act, (unsigned long long)expected);
	if (memcmp(dconst, want_dconst, sizeof(dconst)))
		fail("constant table changed");
	if (dinit[0] != 11 || dinit[1] != 22 || dinit[2] != 33 ||
	    dinit[3] != 44 + 1000)
		fail(".data table changed");
	if (reg_mismatches)
		fail("register loop gave a wrong result %ld times", reg_mismatches);
	if (fails[0])
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	else
		printf("PASS " NAME " pid=%d count=%llu\n", getpid(),
		       (unsigned long long)now);
	fflush(stdout);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	buf = malloc(BUF_WORDS * 8);
	if (!buf) { perror("malloc"); return 1; }
	uint64_t seed = 0x9E3779B97F4A7C15ULL;
	for (size_t i = 0; i < BUF_WORDS; i++)
		buf[i] = xs64(&seed);
	for (size_t i = 0; i < STATIC_WORDS; i++)
		sarr[i] = xs64(&seed);
	dinit[3] += 1000;
	expected = full_checksum();

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);

	printf("READY pid=%d\n", getpid());
	fflush(stdout);

	const size_t nwords = BUF_WORDS + STATIC_WORDS;
	struct timespec ts = { 0, 1000000 };
	uint64_t rng = seed ^ 0xD1B54A32D192ED03ULL;
	for (;;) {
		uint64_t s = counter * 0x9E3779B97F4A7C15ULL;
		uint64_t r1 = regloop(s, 200000), r2 = regloop(s, 200000);
		if (r1 != r2)
			reg_mismatches++;
		for (int k = 0; k < 4; k++) {
			size_t i = xs64(&rng) % nwords;
			set_word(i, xs64(&rng) ^ r1);
		}
		counter++;
		if (probe_req) {
			probe_req = 0;
			verify();
		}
		nanosleep(&ts, NULL);
	}
}
