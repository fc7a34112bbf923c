#!/usr/bin/env python3
"""In-memory checkpoints: downtime of `checkpoint --low-downtime` vs CRIU's
frozen time, plus snapshot, writeback and rollback times.

    python bench/bench_snapshot.py [--sizes 1024,4096] [--runs 1] [--no-criu]
    python bench/bench_snapshot.py --sizes 64            (quick check)

(root; old form `bench_snapshot.py 1024 4096` still works.)

Per size and run: memhog (shared/workloads) is started detached; lcr's
numbers come from the engine in this process (the same code the agent and
`lcr checkpoint --low-downtime` run).  Before each timed step the guest's
memory is pre-warmed (a scratch file of the workload's size written and
deleted, DESIGN.md: freshly allocated guest memory is slow and noisy).
  - snapshot: frozen time and total (take),
  - writeback of that snapshot to a file on /var/tmp,
  - a snapshot with the write tracker started (what the agent takes): its
    frozen time, then rollback after 1 s of running by the fast path (only
    the pages written since) and, 1 s later, by the full path (the whole
    address space rebuilt): memhog's checksum checked after each,
  - checkpoint --low-downtime (snapshot + writeback + discard, the process
    left running): its downtime = the frozen time,
  - CRIU dumps the same process (`criu dump -t PID`, which kills it) and
    `crit show stats-dump` gives its frozen_time.
Prints a table (median over runs) and the ratio lcr downtime / CRIU frozen
(target at 4 GiB: under 5%), then the raw rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from linuxcr import api  # noqa: E402
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


def prewarm(mib: int) -> None:
    """Recycle that much guest memory through the page cache (untimed)."""
    path = ROOT / ".warm"
    chunk = b"\0" * (1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(chunk)
    path.unlink()


def one(memhog: Path, mib: int, criu: bool) -> dict:
    r: dict = {"MiB": mib}
    log = ROOT / f"memhog-{mib}.log"
    log.unlink(missing_ok=True)
    pid = start(memhog, mib, log)
    warm = mib + 64
    img = ROOT / "snap.img"
    try:
        time.sleep(0.5)
        prewarm(warm)
        t = time.monotonic()
        s = snapshots.take(pid)
        r["snapshot_s"] = time.monotonic() - t
        r["snapshot_frozen_s"] = s.frozen_seconds
        try:
            fd = os.open(img, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                r["writeback_s"] = snapshots.writeback(s, fd)["seconds"]
            finally:
                os.close(fd)
            img.unlink()
        finally:
            snapshots.discard(s)
        # as the agent does it: a write tracker per process, the fast path
        wt = snapshots.WriteTrackers(enabled=True)
        prewarm(warm)
        t = time.monotonic()
        s = snapshots.take(pid, trackers=wt)
        r["snapshot_tracked_s"] = time.monotonic() - t
        r["snapshot_tracked_frozen_s"] = s.frozen_seconds
        try:
            for path in ("fast", "full"):
                before, _ = probe(pid, log)
                time.sleep(1.0)
                prewarm(warm)
                res = snapshots.rollback(s, trackers=wt, full=path == "full")
                after, ok = probe(pid, log)
                r[f"rollback_{path}_s"] = res["seconds"]
                r[f"rollback_{path}_frozen_s"] = res["frozen_seconds"]
                r[f"rollback_{path}_pages"] = res["pages_copied"]
                r[f"rollback_{path}_ok"] = ok and after < before and res["path"] == path
        finally:
            snapshots.discard(s, wt)
            wt.close()
        # checkpoint --low-downtime, the process left running (for CRIU)
        prewarm(warm)
        res = api.checkpoint_low_downtime(pid, str(img), leave_running=True)
        r["lowdt_frozen_s"] = res.frozen_seconds
        r["lowdt_total_s"] = res.seconds
        img.unlink(missing_ok=True)
        _, ok = probe(pid, log)
        r["lowdt_ok"] = ok
        # CRIU on the same process (it kills it)
        if criu and os.path.exists(CRIU):
            d = ROOT / f"criu-{mib}"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            prewarm(warm)
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
        elif criu:
            r["criu_error"] = f"no CRIU at {CRIU} (bash shared/anchors/install-criu.sh)"
    finally:
        img.unlink(missing_ok=True)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        gone(pid)
    return r


def _med(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sizes_pos", nargs="*", type=int, metavar="MiB", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default=None, help="memhog sizes in MiB, comma-separated "
                    "(default 1024,4096; 64 for a quick check)")
    ap.add_argument("--runs", type=int, default=1, help="runs per size (default 1)")
    ap.add_argument("--no-criu", action="store_true", help="skip the CRIU side")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (CRIU needs it)")
    sizes = ([int(x) for x in a.sizes.split(",") if x] if a.sizes else a.sizes_pos) or [1024, 4096]
    ROOT.mkdir(parents=True, exist_ok=True)
    memhog = build()
    rows = []
    for _ in range(a.runs):          # interleaved: size after size, run after run
        for m in sizes:
            r = one(memhog, m, not a.no_criu)
            print(json.dumps(r), file=sys.stderr, flush=True)
            rows.append(r)
    print(f"median of {a.runs} run(s); times in ms")
    print(f"{'MiB':>6} {'snap frozen':>11} {'snapshot':>9} {'+track frz':>10} {'writeback':>10} "
          f"{'rb fast':>8} {'pages':>7} {'rb full':>8} "
          f"{'lowdt down':>11} {'lowdt total':>12} {'CRIU frozen':>12} {'ratio':>8}")
    for m in sizes:
        rs = [r for r in rows if r["MiB"] == m]
        cf, down = _med(rs, "criu_frozen_s"), _med(rs, "lowdt_frozen_s")
        ratio = f"{down / cf * 100:.2f}%" if cf and down is not None else "-"
        err = next((r["criu_error"] for r in rs if "criu_error" in r), "n/a")
        bad = [k for k in ("rollback_fast_ok", "rollback_full_ok", "lowdt_ok")
               if not all(r.get(k) for r in rs)]

        def ms(k: str) -> str:
            v = _med(rs, k)
            return f"{v * 1e3:.1f}" if v is not None else "-"
        pages = _med(rs, "rollback_fast_pages")
        print(f"{m:>6} {ms('snapshot_frozen_s'):>11} {ms('snapshot_s'):>9} "
              f"{ms('snapshot_tracked_frozen_s'):>10} {ms('writeback_s'):>10} "
              f"{ms('rollback_fast_s'):>8} {(int(pages) if pages is not None else '-'):>7} "
              f"{ms('rollback_full_s'):>8} {ms('lowdt_frozen_s'):>11} {ms('lowdt_total_s'):>12} "
              f"{(ms('criu_frozen_s') if cf else 'n/a'):>12} {ratio:>8}"
              + (f"  CHECK FAILED: {', '.join(bad)}" if bad else "")
              + (f"  (CRIU: {err})" if not cf and not a.no_criu else ""))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
