#!/bin/bash
# run.sh -- run the benchmark with the usual settings and keep the results.
#   bench/run.sh [bench.py options]     e.g. bench/run.sh --cases memhog,tree --runs 5
# Writes $OUT/<date>.txt (the table) and .json (everything); OUT defaults to
# /var/tmp/lcr-bench/results (outside the repo).
# Installs CRIU (root only, Debian trixie build in /opt/criu-trixie) if missing.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/var/tmp/lcr-bench/results}; mkdir -p "$OUT"
STAMP=$(date +%Y%m%d-%H%M%S)
PY=${PYTHON:-python3}
INSTALL=()
[ "$(id -u)" = 0 ] && INSTALL=(--install-criu)
rc=0
"$PY" "$HERE/bench.py" "${INSTALL[@]}" --json "$OUT/$STAMP.json" "$@" | tee "$OUT/$STAMP.txt" || rc=$?
echo "results: $OUT/$STAMP.txt $OUT/$STAMP.json" >&2
exit $rc
