/*
 * dirty_writer -- writes exactly the pages it is told to (for write tracking).
 *
 *   dirty_writer FIFO DIR
 *
 * Mappings:
 *   buf    NPAGES private anonymous pages: [0, NPAGES/2) written at start,
 *          [NPAGES/2, 3*NPAGES/4) only read (zero page), the rest never touched
 *   fpriv  MAP_PRIVATE of DIR/data.bin (FPAGES pages), every page read
 *
 * Commands, one per line on FIFO (opened O_RDWR: never EOF); each is answered
 * on stdout by "DONE <seq> <cmd> <details>", seq counting from 1:
 *   w I    write one byte into buf page I        r I   read buf page I
 *   f I    write fpriv page I
 *   R I    read(2) one page of DIR/data.bin into buf page I ("n=<ret> errno=<e>")
 *   T I    a new thread writes buf page I
 *   m N    mmap N new anonymous pages and write them all ("addr=0x..")
 *   M      mremap the new area to twice its size, may move ("addr=0x..")
 *   u      munmap the new area
 *   b N    sbrk(N pages), write them ("addr=0x.." of the first)
 *   s K    write K KiB of stack below the current frame ("lo=0x.. hi=0x..")
 *   F      fork: the child writes buf page 1 and checks all of buf, exits 0
 *          if good; the parent writes buf page 2 ("status=<wait status>")
 *   c      check every page holds what was last put there ("ok" or "bad ...")
 *   q      exit(0)
 * Prints "READY pid=P buf=0x.. npages=N fpriv=0x.. fpages=M" once set up.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PG 4096UL
#define NPAGES 2048
#define FPAGES 16

static unsigned char *buf, *fpriv, *area;
static size_t area_pages;
static unsigned char want[NPAGES];     /* first byte of each buf page */
static unsigned char fwant[FPAGES];
static unsigned char filebyte[FPAGES]; /* first byte of each page of data.bin */
static int datafd;

static void *thread_write(void *arg)
{
	size_t i = (size_t)arg;
	buf[i * PG] = ++want[i];
	return NULL;
}

static void stack_write(size_t kib, uintptr_t *lo, uintptr_t *hi)
{
	volatile unsigned char a[kib * 1024];
	for (size_t off = 0; off < sizeof(a); off += PG)
		a[off] = (unsigned char)off | 1;
	*lo = (uintptr_t)&a[0];
	*hi = (uintptr_t)&a[sizeof(a) - 1];
}

static int check(char *out, size_t n)
{
	for (size_t i = 0; i < NPAGES; i++)
		if (buf[i * PG] != want[i]) {
			snprintf(out, n, "bad buf page %zu: %u want %u", i, buf[i * PG], want[i]);
			return 0;
		}
	for (size_t i = 0; i < FPAGES; i++)
		if (fpriv[i * PG] != fwant[i]) {
			snprintf(out, n, "bad fpriv page %zu: %u want %u", i, fpriv[i * PG], fwant[i]);
			return 0;
		}
	snprintf(out, n, "ok");
	return 1;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: dirty_writer FIFO DIR\n");
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	char path[4096];
	snprintf(path, sizeof(path), "%s/data.bin", argv[2]);
	datafd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (datafd < 0) { perror("open data"); return 1; }
	static unsigned char page[PG];
	for (size_t i = 0; i < FPAGES; i++) {
		filebyte[i] = (unsigned char)(0x40 + i);
		memset(page, filebyte[i], PG);
		if (write(datafd, page, PG) != (ssize_t)PG) { perror("write data"); return 1; }
	}
	buf = mmap(NULL, NPAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	fpriv = mmap(NULL, FPAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, datafd, 0);
	if (buf == MAP_FAILED || fpriv == MAP_FAILED) { perror("mmap"); return 1; }
	madvise(buf, NPAGES * PG, MADV_NOHUGEPAGE);   /* page-exact expectations */
	for (size_t i = 0; i < NPAGES / 2; i++)
		buf[i * PG] = want[i] = (unsigned char)(i | 1);
	volatile unsigned char sink = 0;
	for (size_t i = NPAGES / 2; i < 3 * NPAGES / 4; i++)
		sink += buf[i * PG];
	for (size_t i = 0; i < FPAGES; i++)
		sink += fpriv[i * PG], fwant[i] = filebyte[i];
	(void)sink;

	int fifo = open(argv[1], O_RDWR | O_CLOEXEC);
	if (fifo < 0) { perror("open fifo"); return 1; }
	FILE *in = fdopen(fifo, "r");
	printf("READY pid=%d buf=%p npages=%d fpriv=%p fpages=%d\n", getpid(), (void *)buf, NPAGES,
	       (void *)fpriv, FPAGES);

	char line[256], out[256];
	unsigned long seq = 0;
	while (fgets(line, sizeof(line), in)) {
		char cmd = 0;
		unsigned long arg = 0;
		if (sscanf(line, " %c %lu", &cmd, &arg) < 1)
			continue;
		seq++;
		out[0] = 0;
		if ((strchr("wrRT", cmd) && arg >= NPAGES) || (cmd == 'f' && arg >= FPAGES)) {
			printf("DONE %lu %c bad-index\n", seq, cmd);
			continue;
		}
		switch (cmd) {
		case 'w':
			buf[arg * PG] = ++want[arg];
			break;
		case 'r': {
			volatile unsigned char x = buf[arg * PG];
			(void)x;
			break;
		}
		case 'f':
			fpriv[arg * PG] = ++fwant[arg];
			break;
		case 'R': {
			ssize_t n = pread(datafd, buf + arg * PG, PG, 0);
			int e = n < 0 ? errno : 0;
			if (n == (ssize_t)PG)
				want[arg] = filebyte[0];
			snprintf(out, sizeof(out), "n=%zd errno=%d", n, e);
			break;
		}
		case 'T': {
			pthread_t th;
			pthread_create(&th, NULL, thread_write, (void *)arg);
			pthread_join(th, NULL);
			break;
		}
		case 'm':
			area_pages = arg;
			area = mmap(NULL, arg * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			for (size_t i = 0; area != MAP_FAILED && i < arg; i++)
				area[i * PG] = 7;
			snprintf(out, sizeof(out), "addr=%p", (void *)area);
			break;
		case 'M': {
			void *p = mremap(area, area_pages * PG, 2 * area_pages * PG, MREMAP_MAYMOVE);
			if (p != MAP_FAILED) {
				area = p;
				area_pages *= 2;
				for (size_t i = 0; i < area_pages; i++)
					if (i < area_pages / 2 ? area[i * PG] != 7 : 0)
						snprintf(out, sizeof(out), "bad-content ");
			}
			snprintf(out + strlen(out), sizeof(out) - strlen(out), "addr=%p", p);
			break;
		}
		case 'u':
			munmap(area, area_pages * PG);
			area = NULL;
			break;
		case 'b': {
			unsigned char *p = sbrk(arg * PG);
			for (size_t i = 0; p != (void *)-1 && i < arg; i++)
				p[i * PG] = 9;
			snprintf(out, sizeof(out), "addr=%p", (void *)p);
			break;
		}
		case 's': {
			uintptr_t lo, hi;
			stack_write(arg, &lo, &hi);
			snprintf(out, sizeof(out), "lo=0x%lx hi=0x%lx", (unsigned long)lo, (unsigned long)hi);
			break;
		}
		case 'F': {
			pid_t c = fork();
			if (c == 0) {
				buf[1 * PG] = ++want[1];
				char o[256];
				_exit(check(o, sizeof(o)) ? 0 : 1);
			}
			buf[2 * PG] = ++want[2];
			int st = -1;
			waitpid(c, &st, 0);
			snprintf(out, sizeof(out), "status=%d", st);
			break;
		}
		case 'c':
			check(out, sizeof(out));
			break;
		case 'q':
			printf("DONE %lu q\n", seq);
			return 0;
		default:
			snprintf(out, sizeof(out), "unknown");
		}
		printf("DONE %lu %c %s\n", seq, cmd, out);
	}
	return 0;
}
