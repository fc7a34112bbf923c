/*
 * fpu -- SSE/AVX/AVX-512 register state, MXCSR and x87 state.
 *
 *   fpu [sse|avx2|avx512]      (highest level to use; default: all the CPU has)
 *
 * The process is busy almost all the time inside inline-asm loops that keep
 * their whole running state in vector registers between iterations (never
 * in memory): an xorshift64 state per lane, an accumulator, a constant
 * register, an AVX-512 opmask, and a value held on the x87 stack.  Each loop
 * is run twice from the same start state and the results are compared, so a
 * checkpoint that lands inside a loop and a restore that loses, zeroes or
 * truncates (e.g. only the low 128 bits of ymm) any of that state makes the
 * two runs differ.  MXCSR (round toward zero, FTZ, DAZ) and the x87 control
 * word (24-bit precision, round up) are set to non-default values and
 * checked, and a double computed with mulsd depends on the rounding mode.
 *
 * Prints "READY pid=P levels=sse[,avx2[,avx512]]"; on SIGUSR1
 * "PASS fpu pid=P levels=... runs=N" or "FAIL fpu: <details> (pid=P)".
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NAME "fpu"
#define ITERS 100000L
#define WANT_MXCSR 0xffc0u     /* RC=toward zero, FTZ, DAZ, all masked; flags ignored */
#define WANT_X87CW 0x087fu     /* PC=24 bit, RC=up, all exceptions masked */

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

/* offsets are used by the asm: keep the layout */
struct vstate {
	uint64_t s[8];       /*   0: xorshift state, one per lane */
	uint64_t acc[8];     /*  64: accumulator */
	uint64_t k[8];       /* 128: constant xored into each step */
	double x87;          /* 192: held on the x87 stack during the loop */
	double f;            /* 200: multiplied by m every iteration (mulsd) */
	double m;            /* 208 */
	uint64_t mask;       /* 216: AVX-512 opmask */
};

static void sse_run(struct vstate *v, long n)
{
	__asm__ volatile(
		"fldl 192(%[v])\n\t"
		"movdqu 0(%[v]), %%xmm0\n\t"
		"movdqu 64(%[v]), %%xmm1\n\t"
		"movdqu 128(%[v]), %%xmm8\n\t"
		"movsd 200(%[v]), %%xmm4\n\t"
		"movsd 208(%[v]), %%xmm5\n\t"
		"1:\n\t"
		"movdqa %%xmm0, %%xmm2\n\t psllq $13, %%xmm2\n\t pxor %%xmm2, %%xmm0\n\t"
		"movdqa %%xmm0, %%xmm2\n\t psrlq $7, %%xmm2\n\t pxor %%xmm2, %%xmm0\n\t"
		"movdqa %%xmm0, %%xmm2\n\t psllq $17, %%xmm2\n\t pxor %%xmm2, %%xmm0\n\t"
		"movdqa %%xmm0, %%xmm3\n\t pxor %%xmm8, %%xmm3\n\t paddq %%xmm3, %%xmm1\n\t"
		"mulsd %%xmm5, %%xmm4\n\t"
		"dec %[n]\n\t jnz 1b\n\t"
		"movdqu %%xmm0, 0(%[v])\n\t"
		"movdqu %%xmm1, 64(%[v])\n\t"
		"movsd %%xmm4, 200(%[v])\n\t"
		"fstpl 192(%[v])\n\t"
		: [n] "+r"(n)
		: [v] "r"(v)
		: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm8", "memory", "cc");
}

__attribute__((target("avx2"))) static void avx2_run(struct vstate *v, long n)
{
	__asm__ volatile(
		"fldl 192(%[v])\n\t"
		"vmovdqu 0(%[v]), %%ymm0\n\t"
		"vmovdqu 64(%[v]), %%ymm1\n\t"
		"vmovdqu 128(%[v]), %%ymm9\n\t"
		"vmovsd 200(%[v]), %%xmm4\n\t"
		"vmovsd 208(%[v]), %%xmm5\n\t"
		"1:\n\t"
		"vpsllq $13, %%ymm0, %%ymm2\n\t vpxor %%ymm2, %%ymm0, %%ymm0\n\t"
		"vpsrlq $7, %%ymm0, %%ymm2\n\t vpxor %%ymm2, %%ymm0, %%ymm0\n\t"
		"vpsllq $17, %%ymm0, %%ymm2\n\t vpxor %%ymm2, %%ymm0, %%ymm0\n\t"
		"vpxor %%ymm9, %%ymm0, %%ymm3\n\t vpaddq %%ymm3, %%ymm1, %%ymm1\n\t"
		"vmulsd %%xmm5, %%xmm4, %%xmm4\n\t"
		"dec %[n]\n\t jnz 1b\n\t"
		"vmovdqu %%ymm0, 0(%[v])\n\t"
		"vmovdqu %%ymm1, 64(%[v])\n\t"
		"vmovsd %%xmm4, 200(%[v])\n\t"
		"fstpl 192(%[v])\n\t"
		"vzeroupper\n\t"
		: [n] "+r"(n)
		: [v] "r"(v)
		: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm9", "memory", "cc");
}

__attribute__((target("avx512f"))) static void avx512_run(struct vstate *v, long n)
{
	__asm__ volatile(
		"fldl 192(%[v])\n\t"
		"kmovw 216(%[v]), %%k1\n\t"
		"vmovdqu64 0(%[v]), %%zmm16\n\t"
		"vmovdqu64 64(%[v]), %%zmm17\n\t"
		"vmovdqu64 128(%[v]), %%zmm18\n\t"
		"vmovsd 200(%[v]), %%xmm20\n\t"
		"vmovsd 208(%[v]), %%xmm21\n\t"
		"1:\n\t"
		"vpsllq $13, %%zmm16, %%zmm19\n\t vpxorq %%zmm19, %%zmm16, %%zmm16\n\t"
		"vpsrlq $7, %%zmm16, %%zmm19\n\t vpxorq %%zmm19, %%zmm16, %%zmm16\n\t"
		"vpsllq $17, %%zmm16, %%zmm19\n\t vpxorq %%zmm19, %%zmm16, %%zmm16\n\t"
		"vpxorq %%zmm18, %%zmm16, %%zmm19\n\t"
		"vpaddq %%zmm19, %%zmm17, %%zmm17%{%%k1%}\n\t"
		"vmulsd %%xmm21, %%xmm20, %%xmm20\n\t"
		"dec %[n]\n\t jnz 1b\n\t"
		"vmovdqu64 %%zmm16, 0(%[v])\n\t"
		"vmovdqu64 %%zmm17, 64(%[v])\n\t"
		"vmovsd %%xmm20, 200(%[v])\n\t"
		"fstpl 192(%[v])\n\t"
		"vzeroupper\n\t"
		: [n] "+r"(n)
		: [v] "r"(v)
		: "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "k1", "memory", "cc");
}

struct level {
	const char *name;
	void (*run)(struct vstate *, long);
	int lanes;
	struct vstate v;      /* state carried from run to run */
	long runs, mismatches;
	char first_bad[160];
};

static struct level levels[3] = {
	{ .name = "sse", .run = sse_run, .lanes = 2 },
	{ .name = "avx2", .run = avx2_run, .lanes = 4 },
	{ .name = "avx512", .run = avx512_run, .lanes = 8 },
};
static int nlevels;

static unsigned get_mxcsr(void) { unsigned m; __asm__ volatile("stmxcsr %0" : "=m"(m)); return m; }
static void set_mxcsr(unsigned m) { __asm__ volatile("ldmxcsr %0" : : "m"(m)); }
static unsigned short get_x87cw(void) { unsigned short c; __asm__ volatile("fnstcw %0" : "=m"(c)); return c; }
static void set_x87cw(unsigned short c) { __asm__ volatile("fldcw %0" : : "m"(c)); }

static void one_round(struct level *L)
{
	struct vstate a = L->v, b = L->v;
	L->run(&a, ITERS);
	L->run(&b, ITERS);
	L->runs++;
	if (memcmp(&a, &b, sizeof(a)) || a.x87 != L->v.x87) {
		if (!L->mismatches) {
			int lane = 0;
			while (lane < L->lanes - 1 &&
			       a.s[lane] == b.s[lane] && a.acc[lane] == b.acc[lane])
				lane++;
			snprintf(L->first_bad, sizeof(L->first_bad),
				 "lane %d s %016llx/%016llx acc %016llx/%016llx x87 %g/%g f %a/%a",
				 lane, (unsigned long long)a.s[lane], (unsigned long long)b.s[lane],
				 (unsigned long long)a.acc[lane], (unsigned long long)b.acc[lane],
				 a.x87, b.x87, a.f, b.f);
		}
		L->mismatches++;
		return;   /* keep the old state: next rounds start clean */
	}
	L->v = a;
	if (L->v.f < 1e-300 || L->v.f > 1e300)
		L->v.f = 1.0;
}

static long last_runs;

static void verify(void)
{
	fails[0] = 0;
	long runs = 0;
	for (int i = 0; i < nlevels; i++) {
		struct level *L = &levels[i];
		runs += L->runs;
		if (L->mismatches)
			fail("%s: %ld of %ld double runs disagreed (first: %s)", L->name,
			     L->mismatches, L->runs, L->first_bad);
	}
	if (runs <= last_runs)
		fail("no progress: %ld runs, %ld at last probe", runs, last_runs);
	last_runs = runs;
	unsigned m = get_mxcsr() & ~0x3fu;
	if (m != WANT_MXCSR)
		fail("MXCSR %#x, want %#x", m, WANT_MXCSR);
	unsigned short cw = get_x87cw();
	if (cw != WANT_X87CW)
		fail("x87 control word %#x, want %#x", cw, WANT_X87CW);
	/* rounding mode in effect: 1/10 is ...9a to nearest, ...99 toward zero */
	volatile double one = 1.0, ten = 10.0;
	double q = one / ten;
	uint64_t qb;
	memcpy(&qb, &q, 8);
	if (qb != 0x3fb9999999999999ULL)
		fail("1/10 = %016llx: SSE rounding mode is not toward zero",
		     (unsigned long long)qb);
	if (fails[0]) {
		printf("FAIL " NAME ": %s (pid=%d)\n", fails, getpid());
	} else {
		printf("PASS " NAME " pid=%d levels=", getpid());
		for (int i = 0; i < nlevels; i++)
			printf("%s%s", i ? "," : "", levels[i].name);
		printf(" runs=%ld\n", runs);
	}
	fflush(stdout);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	int max = 3;
	if (argc > 1) {
		max = !strcmp(argv[1], "sse") ? 1 : !strcmp(argv[1], "avx2") ? 2 : 3;
	}
	__builtin_cpu_init();
	nlevels = 1;
	if (max >= 2 && __builtin_cpu_supports("avx2")) {
		nlevels = 2;
		if (max >= 3 && __builtin_cpu_supports("avx512f"))
			nlevels = 3;
	}

	uint64_t seed = 0x243F6A8885A308D3ULL;
	for (int i = 0; i < nlevels; i++) {
		struct vstate *v = &levels[i].v;
		for (int l = 0; l < 8; l++) {
			seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
			v->s[l] = seed | 1;
			v->acc[l] = seed >> 7;
			v->k[l] = ~seed ^ ((uint64_t)l << 56);
		}
		v->x87 = 1234.5678 + i;
		v->f = 1.0;
		v->m = 1.0000001;
		v->mask = 0xa5;
	}
	set_mxcsr(WANT_MXCSR);
	set_x87cw(WANT_X87CW);
	if ((get_mxcsr() & ~0x3fu) != WANT_MXCSR || get_x87cw() != WANT_X87CW) {
		fprintf(stderr, "fpu: cannot set MXCSR/x87 control word\n");
		return 1;
	}
	/* the rounding-mode probe must tell the modes apart */
	volatile double one = 1.0, ten = 10.0;
	double q = one / ten;
	uint64_t qb;
	memcpy(&qb, &q, 8);
	if (qb != 0x3fb9999999999999ULL) {
		fprintf(stderr, "fpu: 1/10 under round-toward-zero is %016llx\n",
			(unsigned long long)qb);
		return 1;
	}

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);

	printf("READY pid=%d levels=", getpid());
	for (int i = 0; i < nlevels; i++)
		printf("%s%s", i ? "," : "", levels[i].name);
	printf("\n");
	fflush(stdout);

	for (;;) {
		for (int i = 0; i < nlevels; i++)
			one_round(&levels[i]);
		if (probe_req) {
			probe_req = 0;
			verify();
		}
	}
}
