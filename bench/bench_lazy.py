#!/usr/bin/env python3
"""Lazy restore: time to running and time to complete of `lcr restart --lazy`
against a normal `lcr restart` and `criu restore`, on memhog.

    python bench/bench_lazy.py [--sizes 1024] [--runs 3] [--no-criu] [--pace 0]

(root.)  Per size: memhog (shared/workloads) is started and checkpointed
once by lcr and once by CRIU; then, per run and interleaved, each image is
restarted (the page cache pre-warmed by reading the image first), memhog's
checksum is checked (SIGUSR1: OK), and the process killed again:
  - lazy: running = `lcr restart --lazy` returned (CLI, interpreter start
    included); complete = the page server exited (polled every 2 ms from
    the same start); "engine ms" is lcr's own time to running (the
    restart's "seconds", no interpreter start-up), "server ms" the server
    log's complete_ms (from the same engine start to the last page in);
  - lcr: `lcr restart` returned (running = complete);
  - criu: `criu restore -d` returned (running = complete).
Medians over runs, in ms; the rows as JSON at the end.  Timing on a shared
machine is noisy: compare ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, build_memhog, gone, kill, log, memhog_ok

CRIU = os.environ.get("CRIU", next((p for p in ("/opt/criu-sid/criu", "/opt/criu-trixie/criu")
                                    if os.access(p, os.X_OK)), "criu"))
ROOT = Path(os.environ.get("BENCH_DIR", "/var/tmp/lcr-lazybench"))
LCR = [sys.executable, "-m", "linuxcr"]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def wait_gone(pid: int) -> None:
    if not gone(pid, 30.0):
        raise SystemExit(f"pid {pid} still there")


def start_hog(memhog: Path, mib: int, hoglog: Path) -> int:
    out = subprocess.run([memhog, "-o", hoglog, str(mib)], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[0])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def prewarm(path: Path) -> None:
    for f in ([path] if path.is_file() else sorted(path.iterdir())):
        with open(f, "rb") as fh:
            while fh.read(16 << 20):
                pass


def one(mode: str, img: Path, pid: int, hoglog: Path, pace: float, d: Path) -> dict:
    prewarm(img)
    env = dict(ENV)
    if pace:
        env["LCR_LAZY_PACE"] = str(pace)
    row: dict = {"mode": mode}
    t0 = time.monotonic()
    if mode == "criu":
        cp = subprocess.run([CRIU, "restore", "-d", "-D", img, "-o", "restore.log"],
                            capture_output=True, text=True)
    elif mode == "lazy":
        llog = d / "lazy.log"
        if llog.exists():
            llog.unlink()
        cp = subprocess.run([*LCR, "restart", img, "--lazy", "--lazy-log", llog, "--json",
                             "--no-progress"], capture_output=True, text=True, env=env)
    else:
        cp = subprocess.run([*LCR, "restart", img, "--json", "--no-progress"],
                            capture_output=True, text=True, env=env)
    t1 = time.monotonic()
    if cp.returncode != 0:
        raise SystemExit(f"{mode} restore failed: {cp.stderr}")
    row["running_ms"] = (t1 - t0) * 1000
    row["complete_ms"] = row["running_ms"]
    if mode != "criu":       # lcr's own time, without the interpreter's start-up
        row["engine_ms"] = json.loads(cp.stdout)["seconds"] * 1000
    if mode == "lazy":
        data = json.loads(cp.stdout)
        srv = data["lazy"]["server"]
        while _alive(srv):                   # (a zombie: init reaps it only every 1-2 s)
            time.sleep(0.002)
        row["complete_ms"] = (time.monotonic() - t0) * 1000
        m = re.search(r"(\d+) faults.*complete_ms=([\d.]+)", (d / "lazy.log").read_text())
        row["server_complete_ms"] = float(m.group(2)) if m else None
        row["faults"] = int(m.group(1)) if m else None
    row["ok"] = memhog_ok(pid, hoglog, timeout=120, poll=0.01)
    if not kill(pid):
        raise SystemExit(f"pid {pid} still there")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-criu", action="store_true")
    ap.add_argument("--pace", type=float, default=0.0, help="LCR_LAZY_PACE (a slow disk)")
    a = ap.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    memhog = build_memhog(ROOT)
    modes = ["lazy", "lcr"] + ([] if a.no_criu or not os.access(CRIU, os.X_OK) else ["criu"])
    rows = []
    for mib in (int(x) for x in a.sizes.split(",")):
        d = ROOT / f"{mib}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        hoglog = d / "hog.log"
        pid = start_hog(memhog, mib, hoglog)
        subprocess.run([*LCR, "checkpoint", str(pid), "-o", d / "image.lcr"], check=True, env=ENV)
        wait_gone(pid)
        imgs = {"lazy": d / "image.lcr", "lcr": d / "image.lcr"}
        if "criu" in modes:
            pid2 = start_hog(memhog, mib, d / "hog2.log")
            (d / "criu").mkdir()
            subprocess.run([CRIU, "dump", "-t", str(pid2), "-D", d / "criu", "-o", "dump.log"],
                           check=True)
            wait_gone(pid2)
            imgs["criu"] = d / "criu"
        for run in range(a.runs):
            for mode in modes:
                p, hl = (pid2, d / "hog2.log") if mode == "criu" else (pid, hoglog)
                row = one(mode, imgs[mode], p, hl, a.pace, d)
                row.update(mib=mib, run=run)
                rows.append(row)
                log(json.dumps(row))
    print(f"{'MiB':>6} {'mode':>5} {'running ms':>11} {'complete ms':>12} {'÷criu run':>10} "
          f"{'÷criu compl':>11} {'engine ms':>10} {'server ms':>10} ok")
    for mib in sorted({r["mib"] for r in rows}):
        med = {}
        for mode in modes:
            rs = [r for r in rows if r["mib"] == mib and r["mode"] == mode]
            med[mode] = (statistics.median(r["running_ms"] for r in rs),
                         statistics.median(r["complete_ms"] for r in rs), all(r["ok"] for r in rs),
                         statistics.median(r.get("engine_ms") or 0 for r in rs),
                         statistics.median(r.get("server_complete_ms") or 0 for r in rs))
        for mode, (run_ms, comp_ms, ok, eng, srv) in med.items():
            c = med.get("criu")
            print(f"{mib:>6} {mode:>5} {run_ms:>11.1f} {comp_ms:>12.1f} "
                  f"{(run_ms / c[0]) if c else float('nan'):>10.2f} "
                  f"{(comp_ms / c[1]) if c else float('nan'):>11.2f} {eng:>10.1f} {srv:>10.1f} "
                  f"{'OK' if ok else 'BAD'}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
