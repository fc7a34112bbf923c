#!/usr/bin/env python3
"""In-memory checkpoints: downtime of `checkpoint --low-downtime` vs CRIU's
frozen time, plus snapshot, writeback and rollback times.

    python bench/bench_snapshot.py [MiB ...]        (default: 1024 4096; root)

Per size: memhog (shared/workloads) is started detached; lcr's numbers come
from the engine in this process (the same code the agent runs):
  snapshot (frozen time = downtime, total), writeback to a file on
  /var/tmp, rollback after 1 s of running, and the checksum checked after the
  rollback; then CRIU dumps the same process (`criu dump -t PID`, which
  kills it) and `crit show stats-dump` gives its frozen_time.
One run each; prints a table and the ratios.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from linuxcr.engine import snapshots  # noqa: E402

SHARED = Path(os.environ.get("LCR_SHARED", REPO.parent / "shared"))
CRIU = os.environ.get("CRIU", "/opt/criu-trixie/criu")
CRIT = os.environ.get("CRIT", "/opt/criu-trixie/crit")
ROOT = Path(os.environ.get("BENCH_DIR", "/var/tmp/lcr-snapbench"))


def build() -> Path:
    out = ROOT / "memhog"
    if not out.exists():
        subprocess.run(["gcc", "-O2", "-o", out, SHARED / "workloads" / "memhog.c"], check=True)
    return out


def start(memhog: Path, mib: int, log: Path) -> int:
    out = subprocess.run([memhog, "-o", log, str(mib)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def probe(pid: int, log: Path) -> tuple[int, bool]:
    n = log.read_text().count("counter=")
    os.kill(pid, signal.SIGUSR1)
    for _ in range(1200):
        text = log.read_text()
        if text.count("counter=") > n:
            line = [ln for ln in text.splitlines() if "counter=" in ln][-1]
            return int(re.search(r"counter=(\d+)", line).group(1)), line.endswith("OK")
        time.sleep(0.02)
    raise RuntimeError("no probe reply")


def gone(pid: int) -> None:
    for _ in range(600):
        if not os.path.exists(f"/proc/{pid}"):
            return
        time.sleep(0.05)


def one(memhog: Path, mib: int) -> dict:
    r: dict = {"MiB": mib}
    log = ROOT / f"memhog-{mib}.log"
    log.unlink(missing_ok=True)
    pid = start(memhog, mib, log)
    try:
        time.sleep(0.5)
        t = time.monotonic()
        s = snapshots.take(pid)
        r["snapshot_s"] = time.monotonic() - t
        r["lcr_frozen_s"] = s.frozen_seconds
        img = ROOT / "snap.img"
        fd = os.open(img, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            r["writeback_s"] = snapshots.writeback(s, fd)["seconds"]
        finally:
            os.close(fd)
        img.unlink()
        before, _ = probe(pid, log)
        time.sleep(1.0)
        res = snapshots.rollback(s)
        r["rollback_s"] = res["seconds"]
        after, ok = probe(pid, log)
        r["rollback_ok"] = ok and after < before + 1000
        snapshots.discard(s)
        # CRIU on the same process (it kills it)
        if os.path.exists(CRIU):
            d = ROOT / f"criu-{mib}"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            t = time.monotonic()
            cp = subprocess.run([CRIU, "dump", "-t", str(pid), "-D", d, "-v0"], capture_output=True,
                                text=True)
            r["criu_dump_s"] = time.monotonic() - t
            if cp.returncode == 0:
                st = json.loads(subprocess.run([CRIT, "show", d / "stats-dump"], capture_output=True,
                                               text=True, check=True).stdout)
                r["criu_frozen_s"] = st["entries"][0]["dump"]["frozen_time"] / 1e6
            else:
                r["criu_error"] = cp.stderr.strip()[-200:]
            shutil.rmtree(d, ignore_errors=True)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        gone(pid)
    return r


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root (CRIU needs it)")
    sizes = [int(a) for a in sys.argv[1:]] or [1024, 4096]
    ROOT.mkdir(parents=True, exist_ok=True)
    memhog = build()
    rows = [one(memhog, m) for m in sizes]
    print(f"{'MiB':>6} {'lcr frozen':>11} {'snapshot':>9} {'writeback':>10} {'rollback':>9} "
          f"{'CRIU frozen':>12} {'ratio':>8}")
    for r in rows:
        cf = r.get("criu_frozen_s")
        ratio = f"{r['lcr_frozen_s'] / cf * 100:.2f}%" if cf else "-"
        print(f"{r['MiB']:>6} {r['lcr_frozen_s'] * 1e3:>9.1f}ms {r['snapshot_s'] * 1e3:>7.1f}ms "
              f"{r['writeback_s']:>9.3f}s {r['rollback_s']:>8.3f}s "
              f"{(f'{cf:.3f}s' if cf else r.get('criu_error', 'n/a')):>12} {ratio:>8}"
              f"{'' if r['rollback_ok'] else '  ROLLBACK CHECK FAILED'}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
