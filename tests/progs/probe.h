/*
 * probe.h -- what every test program shares: the SIGUSR1 probe flag and a
 * failure list that the probe's verification fills and prints as
 * "FAIL <name>: <fails> (pid=P)".  Included by the programs in this folder.
 */
#ifndef LCR_PROBE_H
#define LCR_PROBE_H
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static volatile sig_atomic_t probe_req;
static void on_usr1(int sig) { (void)sig; probe_req = 1; }

static char fails[8192];
__attribute__((unused, format(printf, 1, 2)))
static void fail(const char *fmt, ...)
{
	size_t n = strlen(fails);
	va_list ap;
	if (n && n < sizeof(fails) - 2) { strcat(fails, "; "); n += 2; }
	va_start(ap, fmt);
	vsnprintf(fails + n, sizeof(fails) - n, fmt, ap);
	va_end(ap);
}
#endif
