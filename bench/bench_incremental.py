#!/usr/bin/env python3
"""bench_incremental.py -- incremental checkpoints against full ones, one run.

    python3 bench/bench_incremental.py [--mib 1024] [--usec 2000] [--gap 2]
                                       [--dir /var/tmp/lcr-bench-inc]
    python3 bench/bench_incremental.py --written 0,1 [--runs 5] [--code CHECKOUT]

memhog MIB (incompressible private memory) rewriting 4 random words every
USEC microseconds.  In one run, on the same process:

  full      `lcr checkpoint --leave-running` (API, in this interpreter)
  hash      `--parent full`: no write tracker, pages compared by content
  track     a full image with `--track`, then after GAP seconds `--parent`
            on it: the userfaultfd write tracker knows the written pages
  restart   restart of the last incremental image (its chain: 2 files)
            vs restart of a full image of the same moment

Printed: time and image size of each, and the ratios incremental / full.

``--written 0,1``: for a process that wrote nothing (0) or 1% of its pages
since a tracked image, a full checkpoint and a tracked incremental one in
turn, ``--runs`` times (medians and every ratio printed); ``--code DIR``
times the linuxcr of another checkout (the code before a change) with this
script.
Memory is pre-warmed (a page-cache file of the image's size written and
deleted) before each timed step.  Every process started is killed by pid.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# --code DIR: time another checkout's linuxcr (the code before a change)
_CODE = sys.argv[sys.argv.index("--code") + 1] if "--code" in sys.argv[:-1] else str(REPO)
sys.path.insert(0, _CODE)

import linuxcr  # noqa: E402
from linuxcr import api  # noqa: E402
from common import build_memhog, kill, memhog_ok, prewarm_memory  # noqa: E402


def start(memhog: str, mib: int, usec: int, logf: Path) -> int:
    out = subprocess.run([memhog, "-s", str(usec), "-o", str(logf), str(mib)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


def probe(pid: int, logf: Path) -> bool:
    return memhog_ok(pid, logf, timeout=30, poll=0.05)


def timed(fn):
    t = time.monotonic()
    r = fn()
    return time.monotonic() - t, r


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


_FULL_SECONDS = [1.0]     # a full checkpoint's time, as the last case measured it


def written(a, d: Path, memhog: str, pct: float) -> None:
    """A process that wrote ``pct`` % of its pages (0: nothing) between a
    tracked image and the next: full checkpoint vs tracked incremental, in
    turn, ``--runs`` times on the same process (the chain grows by one each)."""
    npages = (a.mib << 20) // 4096
    # memhog writes 4 words (on 4 random pages) per loop, then sleeps usec;
    # between two incremental images: the gap and a full checkpoint
    between = a.gap + _FULL_SECONDS[0]
    usec = 1_000_000_000 if pct <= 0 else max(1, int(between * 1e6 * 4 / (npages * pct / 100)))
    logf = d / "memhog.log"
    pid = start(memhog, a.mib, usec, logf)
    try:
        size = a.mib << 20
        prev = d / "w-base.img"
        prewarm_memory(d, size)
        api.checkpoint(pid, prev, leave_running=True, track=True)
        fulls, incs, stored = [], [], []
        for i in range(a.runs):
            prewarm_memory(d, size)
            t_full, _ = timed(lambda: api.checkpoint(pid, d / "w-full.img", leave_running=True))
            time.sleep(a.gap)
            cur = d / f"w-inc{i}.img"
            t_inc, r = timed(lambda: api.checkpoint(pid, cur, leave_running=True, track=True,
                                                    parent=prev))
            prev = cur
            fulls.append(t_full)
            incs.append(t_inc)
            stored.append(r.incremental.get("stored", r.pages))
            assert set(r.incremental.get("method", {}).values()) == {"uffd-wp-async"}, r.incremental
        ratios = [i / f for i, f in zip(incs, fulls)]
        _FULL_SECONDS[0] = median(fulls)
        print(f"  {pct:g}% written ({min(stored)}-{max(stored)} pages stored): full "
              f"{median(fulls) * 1e3:6.0f} ms, incremental {median(incs) * 1e3:5.1f} ms "
              f"(min {min(incs) * 1e3:.1f}), ratio x{median(ratios):.3f} "
              f"(medians of {a.runs}; runs: {' '.join(f'{x:.3f}' for x in ratios)})")
    finally:
        kill(pid)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--usec", type=int, default=2000)
    ap.add_argument("--gap", type=float, default=2.0)
    ap.add_argument("--dir", default="/var/tmp/lcr-bench-inc")
    ap.add_argument("--written", default="",
                    help="percents of pages written between checkpoints, e.g. 0,1: time "
                         "full vs tracked incremental for each (instead of the default steps)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--code", default=str(REPO), help="the checkout whose linuxcr is timed")
    a = ap.parse_args()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    for f in list(d.glob("*.img")) + list(d.glob("*.lcr-index")):
        f.unlink()
    if a.written:
        memhog = str(build_memhog(d, reuse=False))
        print(f"memhog {a.mib} MiB, {a.gap} s between checkpoints, linuxcr from {a.code}")
        for pct in a.written.split(","):
            written(a, d, memhog, float(pct))
        return
    memhog = str(build_memhog(d, reuse=False))
    logf = d / "memhog.log"
    logf.write_text("")
    pids = []
    try:
        pid = start(memhog, a.mib, a.usec, logf)
        pids.append(pid)
        size = a.mib << 20
        prewarm_memory(d, size)
        t_full, _ = timed(lambda: api.checkpoint(pid, d / "full.img", leave_running=True))
        s_full = (d / "full.img").stat().st_size
        time.sleep(a.gap)
        prewarm_memory(d, size)
        t_hash, r_hash = timed(lambda: api.checkpoint(pid, d / "hash.img", leave_running=True,
                                                      parent=d / "full.img"))
        s_hash = (d / "hash.img").stat().st_size
        prewarm_memory(d, size)
        t_tfull, _ = timed(lambda: api.checkpoint(pid, d / "tfull.img", leave_running=True,
                                                  track=True))
        time.sleep(a.gap)
        prewarm_memory(d, size)
        t_track, r_track = timed(lambda: api.checkpoint(pid, d / "track.img", leave_running=True,
                                                        parent=d / "tfull.img", track=True))
        s_track = (d / "track.img").stat().st_size
        # the restart comparison: a full image of the same moment as track.img
        # is not possible; take one right after and compare restart times
        prewarm_memory(d, size)
        api.checkpoint(pid, d / "full2.img", leave_running=True)
        api.checkpoint(pid, d / "track2.img", parent=d / "track.img")   # kills it
        kill(pid)
        prewarm_memory(d, size)
        t_rinc, new = timed(lambda: api.restart(d / "track2.img"))
        pids.append(new)
        ok_inc = probe(new, logf)
        kill(new)
        prewarm_memory(d, size)
        t_rfull, new2 = timed(lambda: api.restart(d / "full2.img"))
        pids.append(new2)
        ok_full = probe(new2, logf)
        kill(new2)
        methods = lambda r: ",".join(sorted(set(r.incremental.get("method", {}).values())))  # noqa
        print(f"memhog {a.mib} MiB, 4 words every {a.usec} us, {a.gap} s between checkpoints "
              f"(linuxcr {linuxcr.__version__})")
        print(f"  full checkpoint        {t_full * 1e3:8.0f} ms  {s_full / 2**20:9.1f} MiB")
        print(f"  incremental, hashes    {t_hash * 1e3:8.0f} ms  {s_hash / 2**20:9.1f} MiB  "
              f"({methods(r_hash)}; time x{t_hash / t_full:.2f}, size x{s_hash / s_full:.4f})")
        print(f"  full with --track      {t_tfull * 1e3:8.0f} ms")
        print(f"  incremental, tracked   {t_track * 1e3:8.0f} ms  {s_track / 2**20:9.1f} MiB  "
              f"({methods(r_track)}; time x{t_track / t_full:.2f}, size x{s_track / s_full:.4f})")
        print(f"  restart: chain of 3 {t_rinc * 1e3:8.0f} ms ({'OK' if ok_inc else 'MISMATCH'}), "
              f"full {t_rfull * 1e3:.0f} ms ({'OK' if ok_full else 'MISMATCH'}): "
              f"x{t_rinc / t_rfull:.2f}")
    finally:
        for p in pids:
            kill(p)


if __name__ == "__main__":
    main()
