#!/bin/bash
# demo.sh -- checkpoint a running process, restart it, check that it is intact.
#
#   bash scripts/demo.sh [MiB]          (default 64)
#
# 1. install into a virtual environment of its own ($REPO/.venv, made with
#    python3 -m venv; no root, no PEP 668 trouble; set LCR_DEMO_NO_INSTALL=1 to
#    use python3 as it is, with the repository on PYTHONPATH)
# 2. build memhog (shared/workloads/memhog.c, or a built-in copy) into a temp dir
# 3. start memhog: MiB of random memory + a running checksum; SIGUSR1 makes it
#    recompute the checksum over all its memory and log "counter=N ... OK"
# 4. lcr checkpoint PID -o IMAGE   (the process is killed after a good dump)
# 5. lcr show IMAGE
# 6. lcr restart IMAGE             (prints the restored pid)
# 7. SIGUSR1 again: the checksum must match and the counter must have advanced
# Exit 0 and "DEMO OK" on success, non-zero and "DEMO FAIL" otherwise.
# Every process started here is killed by pid on exit.
set -euo pipefail

MIB=${1:-64}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
TMP=$(mktemp -d /tmp/lcr-demo.XXXXXX)
PIDS=()

cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
fail() { echo "DEMO FAIL: $*" >&2; exit 1; }
run() { echo "+ $*" >&2; "$@"; }

# ---- 1. install
LCR_ENV=${LCR:-}                        # override, e.g. LCR="python3 -m linuxcr"
# Into a venv of the demo's own: a system python may be "externally managed"
# (PEP 668, Debian) and refuse `pip install`; a venv works for any user.
if [ "${LCR_DEMO_NO_INSTALL:-0}" != 1 ]; then
  VENV=${LCR_DEMO_VENV:-$REPO/.venv}
  if ! { [ -w "$REPO" ] || [ -d "$VENV" ]; }; then VENV="$TMP/venv"; fi   # read-only clone
  if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "== creating a virtual environment in $VENV" >&2
    "$PY" -m venv "$VENV" >&2 ||
      fail "python3 -m venv failed: on Debian/Ubuntu install it with: apt-get install python3-venv"
  fi
  echo "== installing linuxcr into $VENV (pip install -e .)" >&2
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install -q -e "$REPO" >&2 ||
    fail "pip install -e . into $VENV failed"
  PY="$VENV/bin/python"
  LCR=("$VENV/bin/lcr")
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  LCR=("$PY" -m linuxcr)
fi
[ -z "$LCR_ENV" ] || read -r -a LCR <<<"$LCR_ENV"

# ---- 2. build memhog
SRC=""
# shared/ lies beside the repository (as CI lays it out); nowhere else
for d in "$REPO/../shared"; do
  [ -n "$d" ] && [ -f "$d/workloads/memhog.c" ] && { SRC="$(cd "$d/workloads" && pwd)/memhog.c"; break; }
done
if [ -z "$SRC" ]; then
  # built-in copy of memhog's protocol (ready line, SIGUSR1 -> checksum line)
  SRC="$TMP/memhog.c"
  cat > "$SRC" <<'EOF'
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1 = 1; }
static uint64_t xs(uint64_t *s) { uint64_t x = *s; x ^= x << 13; x ^= x >> 7; x ^= x << 17; return *s = x; }
int main(int argc, char **argv)
{
	if (argc != 4 || strcmp(argv[1], "-o")) { fprintf(stderr, "usage: memhog -o LOG MiB\n"); return 2; }
	size_t bytes = strtoull(argv[3], NULL, 0) << 20, nw = bytes / 8, np = bytes / 4096;
	int pfd[2]; if (pipe(pfd)) return 1;
	pid_t c = fork(); if (c < 0) return 1;
	if (c > 0) { char b; close(pfd[1]); if (read(pfd[0], &b, 1) != 1) return 1; printf("%d ready\n", c); return 0; }
	close(pfd[0]); setsid();
	int n = open("/dev/null", O_RDONLY), l = open(argv[2], O_WRONLY | O_CREAT | O_APPEND, 0644);
	if (n < 0 || l < 0) _exit(1);
	dup2(n, 0); dup2(l, 1); dup2(l, 2);
	for (int f = 3; f < 1024; f++) if (f != pfd[1]) close(f);    /* image holds fds 0-2 only */
	uint64_t *w = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (w == MAP_FAILED) _exit(1);
	uint64_t seed = 0x9E3779B97F4A7C15ULL, exp = 0, cnt = 0;
	for (size_t i = 0; i < nw; i++) { w[i] = xs(&seed); exp += w[i] * (2 * i + 1); }
	struct sigaction sa; memset(&sa, 0, sizeof(sa)); sa.sa_handler = on_usr1; sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	printf("pid=%d ready addr=%p bytes=%zu\n", getpid(), (void *)w, bytes); fflush(stdout);
	char b = 'r'; if (write(pfd[1], &b, 1) != 1) _exit(1); close(pfd[1]);
	struct timespec ts = { 0, 1000000 };
	for (;;) {
		for (int k = 0; k < 4; k++) {
			size_t i = (xs(&seed) % np) * 512 + xs(&seed) % 512; uint64_t v = xs(&seed);
			exp += (v - w[i]) * (2 * i + 1); w[i] = v;
		}
		cnt++;
		if (usr1) {
			usr1 = 0; uint64_t a = 0;
			for (size_t i = 0; i < nw; i++) a += w[i] * (2 * i + 1);
			printf("pid=%d counter=%llu expected=%016llx actual=%016llx %s\n", getpid(), (unsigned long long)cnt,
			       (unsigned long long)exp, (unsigned long long)a, a == exp ? "OK" : "MISMATCH");
			fflush(stdout);
		}
		nanosleep(&ts, NULL);
	}
}
EOF
fi
echo "== building memhog from $SRC" >&2
gcc -O2 -o "$TMP/memhog" "$SRC" || fail "cannot compile memhog (apt-get install gcc libc6-dev)"

LOG="$TMP/memhog.log"
IMG="$TMP/memhog.lcr"

# probe PID: SIGUSR1, wait for a new checksum line, print "COUNTER STATUS"
probe() {
  local pid=$1 n i line
  n=$(grep -c 'counter=' "$LOG" || true)
  kill -USR1 "$pid" 2>/dev/null || { echo "0 DEAD"; return; }
  for i in $(seq 600); do
    [ "$(grep -c 'counter=' "$LOG" || true)" -gt "$n" ] && break
    sleep 0.05
  done
  [ "$(grep -c 'counter=' "$LOG" || true)" -gt "$n" ] || { echo "0 NOREPLY"; return; }
  line=$(grep 'counter=' "$LOG" | tail -1)
  echo "$(sed 's/.*counter=\([0-9]*\).*/\1/' <<<"$line") $(awk '{print $NF}' <<<"$line")"
}
wait_gone() {   # pid 1 may reap orphans lazily: wait until /proc/PID is gone
  local i; for i in $(seq 600); do [ -e "/proc/$1" ] || return 0; sleep 0.05; done; return 1; }

# ---- 3. start the workload
echo "== starting memhog ($MIB MiB)" >&2
PID=$("$TMP/memhog" -o "$LOG" "$MIB" | awk '{print $1}')
[ -n "$PID" ] || fail "memhog did not start"
PIDS+=("$PID")
grep 'ready' "$LOG" >&2
read -r C0 S0 < <(probe "$PID")
echo "before: pid $PID counter=$C0 checksum $S0" >&2
[ "$S0" = OK ] || fail "memhog is not healthy before the checkpoint ($S0)"

# ---- 4. checkpoint
echo "== checkpoint" >&2
t0=$(date +%s%N)
run "${LCR[@]}" checkpoint "$PID" -o "$IMG" || fail "lcr checkpoint exited with $?"
t1=$(date +%s%N)
echo "checkpoint took $(( (t1 - t0) / 1000000 )) ms, image $(du -h "$IMG" | cut -f1)" >&2
wait_gone "$PID" || fail "pid $PID still exists after the checkpoint"

# ---- 5. show
echo "== image summary" >&2
run "${LCR[@]}" show "$IMG" || fail "lcr show exited with $?"

# ---- 6. restart
echo "== restart" >&2
# As root the process gets its saved pid back; as an ordinary user it comes
# back in a new user+pid namespace where the saved pid is free (no option).
RESTART=("${LCR[@]}" restart "$IMG")
t0=$(date +%s%N)
NEW=$(run "${RESTART[@]}") || fail "lcr restart exited with $?"
t1=$(date +%s%N)
[[ "$NEW" =~ ^[0-9]+$ ]] || fail "lcr restart printed '$NEW', expected a pid"
PIDS+=("$NEW")
echo "restart took $(( (t1 - t0) / 1000000 )) ms, restored pid $NEW" >&2

# ---- 7. verify
read -r C1 S1 < <(probe "$NEW")
echo "after:  pid $NEW counter=$C1 checksum $S1" >&2
if [ "$S1" = OK ] && [ "$C1" -gt "$C0" ]; then
  echo "DEMO OK: pid $PID -> $NEW, checksum OK, counter $C0 -> $C1"
else
  fail "pid $PID -> $NEW, checksum $S1, counter $C0 -> $C1"
fi
