#!/usr/bin/env python3
"""Downtime of a preempted job under `lcr run --checkpoint-dir`, against a restart from scratch.

    python3 bench/bench_preempt.py [--mib 1024] [--runs 3] [--dir /var/tmp/lcr-bench-preempt]

Workload: memhog MiB (shared/workloads/memhog.c, built here), in the foreground
under `lcr run --checkpoint-dir DIR`.  Per run:

- stop:   SIGTERM to lcr -> lcr has exited (image written, named, latest set);
- resume: `lcr run --checkpoint-dir` started again -> memhog answers a probe
          (SIGUSR1, forwarded by lcr) with its checksum OK: running again;
- scratch: what a job without lcr pays: kill -> exit is immediate, but a new
          start must allocate and fill its memory again (start -> "ready"),
          and every bit of work done since the start is lost.

Prints a table and one JSON line.  Pre-warms (one untimed cycle) first.
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
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LCR_SHARED", REPO.parent / "shared"))
LCR = [sys.executable, "-m", "linuxcr"]


def build_memhog(out: Path) -> Path:
    exe = out / "memhog"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(SHARED / "workloads" / "memhog.c")], check=True)
    return exe


def wait_for(path: Path, pattern: str, start: int = 0, timeout: float = 300) -> float:
    rx = re.compile(pattern, re.M)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if rx.search(path.read_text(errors="replace")[start:]):
            return time.monotonic()
        time.sleep(0.002)
    raise SystemExit(f"timeout waiting for {pattern!r} in {path}:\n{path.read_text()[-2000:]}")


class Job:
    def __init__(self, ckdir: Path, logs: Path, argv: list[str]) -> None:
        self.out, self.err = logs / "out", logs / "err"
        self.o0 = self.out.stat().st_size if self.out.exists() else 0
        self.e0 = self.err.stat().st_size if self.err.exists() else 0
        self.t0 = time.monotonic()
        with open(self.out, "ab") as fo, open(self.err, "ab") as fe:
            self.p = subprocess.Popen([*LCR, "run", "--checkpoint-dir", str(ckdir), "--", *argv],
                                      stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)

    def probe_ok(self) -> float:
        """SIGUSR1 until the hog answers OK; the time of the answer."""
        n = self.out.read_text(errors="replace")[self.o0:].count(" OK")
        while True:
            os.kill(self.p.pid, signal.SIGUSR1)
            end = time.monotonic() + 0.05
            while time.monotonic() < end:
                text = self.out.read_text(errors="replace")[self.o0:]
                if "MISMATCH" in text:
                    raise SystemExit("checksum MISMATCH after restore")
                if text.count(" OK") > n:
                    return time.monotonic()
                time.sleep(0.001)

    def stop(self) -> float:
        t = time.monotonic()
        self.p.send_signal(signal.SIGTERM)
        code = self.p.wait()
        if code != 0:
            raise SystemExit(f"lcr exited {code}:\n{self.err.read_text()[-2000:]}")
        return time.monotonic() - t


def one_cycle(ck: Path, logs: Path, argv: list[str]) -> dict:
    job = Job(ck, logs, argv)
    wait_for(job.err, r"resumed from", job.e0)
    resumed = job.probe_ok() - job.t0
    time.sleep(0.5)                    # let it run (and dirty pages) a little
    stop = job.stop()
    return {"stop": stop, "resume": resumed}


def scratch(exe: Path, mib: int, logs: Path) -> dict:
    log = logs / "scratch.log"
    log.write_text("")
    t0 = time.monotonic()
    with open(log, "ab") as f:
        p = subprocess.Popen([str(exe), "-f", str(mib)], stdout=f, stderr=f)
    ready = wait_for(log, r"ready") - t0
    t = time.monotonic()
    p.send_signal(signal.SIGTERM)
    p.wait()
    return {"stop": time.monotonic() - t, "resume": ready}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp/lcr-bench-preempt")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lcr-bench-"))
    ck = Path(a.dir)
    shutil.rmtree(ck, ignore_errors=True)
    try:
        exe = build_memhog(work)
        argv = [str(exe), "-f", str(a.mib)]
        first = Job(ck, work, argv)
        wait_for(first.out, r"ready", first.o0)
        first.probe_ok()
        first.stop()
        one_cycle(ck, work, argv)                          # warm-up, untimed
        runs = [one_cycle(ck, work, argv) for _ in range(a.runs)]
        scr = [scratch(exe, a.mib, work) for _ in range(a.runs)]
        img = max(ck.glob("*.img"), key=lambda p: p.stat().st_mtime)
        res = {"mib": a.mib, "image_bytes": img.stat().st_size, "dir": str(ck),
               "lcr_stop_s": [round(r["stop"], 3) for r in runs],
               "lcr_resume_s": [round(r["resume"], 3) for r in runs],
               "scratch_stop_s": [round(r["stop"], 3) for r in scr],
               "scratch_start_to_ready_s": [round(r["resume"], 3) for r in scr]}
        med = statistics.median
        print(f"{a.mib} MiB job, image {res['image_bytes'] / 2**20:.0f} MiB in {ck}")
        print(f"  lcr:     SIGTERM -> exit  {med(res['lcr_stop_s']):.2f} s   "
              f"start -> running again  {med(res['lcr_resume_s']):.2f} s   (state kept)")
        print(f"  scratch: SIGTERM -> exit  {med(res['scratch_stop_s']):.2f} s   "
              f"start -> ready          {med(res['scratch_start_to_ready_s']):.2f} s   "
              f"(all work since the start lost)")
        print(json.dumps(res))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
