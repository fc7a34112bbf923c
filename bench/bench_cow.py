#!/usr/bin/env python3
"""Copy-on-write sharing across a restored tree: a pre-forked server.

    python bench/bench_cow.py [--mib 1024] [--workers 8] [--runs 1] [--tools lcr,criu]

(root.)  The tree: tests/progs/cow_workers.c in "plain" mode: one parent
with MIB MiB of private anonymous memory (a pattern written over all of
it), then WORKERS forked workers, each of which rewrote its own 1% of the
pages; the other 99% are shared copy-on-write with the parent.

Per tool and run (tools interleaved): start the tree, wait until it is
READY, sum Pss and Pss_Anon over /proc/PID/smaps_rollup of every process
(before), checkpoint it (the tree is killed), restart it, sum again
(after), check every process's checksum of its whole area (SIGUSR1), kill
it.  Times are wall-clock times of the commands (`lcr checkpoint`,
`lcr restart`, `criu dump`, `criu restore -d`), images on --dir, read back
from the page cache.  CRIU: /opt/criu-sid/criu (4.2; set --criu);
``SUITE=sid PREFIX=/opt/criu-sid bash shared/anchors/install-criu.sh``
installs it.  Prints a table and the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LCR = [sys.executable, "-m", "linuxcr"]
CRIU = "/opt/criu-sid/criu"
READY_TIMEOUT = 300.0


def build(out: Path) -> Path:
    exe = out / "cow_workers"
    src = REPO / "tests" / "progs" / "cow_workers.c"
    subprocess.run(["gcc", "-O2", "-Wall", f"-I{src.parent}", "-o", str(exe), str(src)], check=True)
    return exe


def children(pid: int) -> list[int]:
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(x) for x in f.read().split()]
    return sorted(out)


def tree(root: int) -> list[int]:
    out, queue = [root], children(root)
    while queue:
        p = queue.pop(0)
        out.append(p)
        queue += children(p)
    return out


def pss(root: int) -> dict[str, int]:
    """KiB, summed over the tree."""
    tot = {"Pss": 0, "Pss_Anon": 0, "Rss": 0}
    for p in tree(root):
        text = Path(f"/proc/{p}/smaps_rollup").read_text()
        for k in tot:
            tot[k] += int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1))
    return tot


def wait_line(log: Path, pattern: str, start: int = 0, timeout: float = READY_TIMEOUT) -> re.Match:
    rx = re.compile(pattern, re.M)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = rx.search(log.read_text()[start:])
        if m:
            return m
        time.sleep(0.02)
    raise RuntimeError(f"no {pattern!r} in {log}")


def checksums(root: int, log: Path) -> list[str]:
    """Each process's "PASS ..." line (its check of every word of the area)."""
    out = []
    for p in tree(root):
        start = len(log.read_text())
        os.kill(p, signal.SIGUSR1)
        m = wait_line(log, r"^(PASS|FAIL) cow_\w+ .*$", start)
        if m.group(1) != "PASS":
            raise RuntimeError(m.group(0))
        out.append(re.sub(r"pid=\d+ ", "", m.group(0)))
    return sorted(out)


def kill_tree(root: int) -> None:
    pids = tree(root) if os.path.exists(f"/proc/{root}") else [root]
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in pids:
        while os.path.exists(f"/proc/{p}"):
            try:
                os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.01)


def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.monotonic()
    cp = subprocess.run(argv, capture_output=True, text=True)
    dt = time.monotonic() - t0
    if cp.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {cp.returncode}: {cp.stderr.strip()[-600:]}")
    return dt, cp


def one(tool: str, exe: Path, d: Path, a) -> dict:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    log = d / "tree.log"
    with open(log, "w") as f:
        p = subprocess.Popen([str(exe), str(a.mib), str(a.workers), "plain"], stdin=subprocess.DEVNULL,
                             stdout=f, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    root = p.pid
    try:
        wait_line(log, r"^READY pid=")
        time.sleep(0.5)
        before_sums = checksums(root, log)
        before = pss(root)
        pids = tree(root)
        if tool == "lcr":
            img = d / "img.lcr"
            dump_s, _ = timed(LCR + ["checkpoint", str(root), "-o", str(img)])
        else:
            img = d / "img"
            img.mkdir()
            dump_s, _ = timed([a.criu, "dump", "-t", str(root), "-D", str(img), "-o", "dump.log",
                               "-v2"])
        for q in reversed(pids):
            while os.path.exists(f"/proc/{q}"):
                try:
                    os.waitpid(q, os.WNOHANG)
                except ChildProcessError:
                    pass
                time.sleep(0.01)
        p.returncode = -9       # reaped above, by pid
        size = sum(f.stat().st_size for f in ([img] if img.is_file() else img.iterdir()))
        if tool == "lcr":
            restart_s, cp = timed(LCR + ["restart", str(img)])
            root = int(cp.stdout.strip())
        else:
            restart_s, _ = timed([a.criu, "restore", "-d", "-D", str(img), "-o", "restore.log",
                                  "-v2"])
        time.sleep(0.5)
        after = pss(root)
        after_sums = checksums(root, log)
        if after_sums != before_sums:
            raise RuntimeError(f"{tool}: checksums differ after restart")
        return {"tool": tool, "mib": a.mib, "workers": a.workers, "dump_s": round(dump_s, 3),
                "restart_s": round(restart_s, 3), "image_mib": round(size / 2**20, 1),
                "pss_before_kib": before["Pss"], "pss_after_kib": after["Pss"],
                "pss_anon_before_kib": before["Pss_Anon"], "pss_anon_after_kib": after["Pss_Anon"],
                "pss_anon_ratio": round(after["Pss_Anon"] / before["Pss_Anon"], 4)}
    finally:
        kill_tree(root)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--tools", default="lcr,criu")
    ap.add_argument("--criu", default=CRIU)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/lcr-cowbench"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_cow.py runs as root")
    tools = a.tools.split(",")
    if "criu" in tools and not os.access(a.criu, os.X_OK):
        print(f"no CRIU at {a.criu}: lcr only", file=sys.stderr)
        tools.remove("criu")
    a.dir.mkdir(parents=True, exist_ok=True)
    import ctypes      # the restored trees are orphans: we reap them, not init (seconds late)
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)    # PR_SET_CHILD_SUBREAPER
    exe = build(a.dir)
    rows = []
    for run in range(a.runs):
        for tool in tools:
            try:
                rows.append(one(tool, exe, a.dir / tool, a) | {"run": run})
            except RuntimeError as e:
                rows.append({"tool": tool, "run": run, "error": str(e)})
    print(f"{'tool':5} {'run':>3} {'dump s':>7} {'restart s':>9} {'image MiB':>9} "
          f"{'Pss_Anon before':>15} {'after':>9} {'ratio':>6} {'Pss before':>10} {'after':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['tool']:5} {r['run']:>3} ERROR {r['error']}")
            continue
        print(f"{r['tool']:5} {r['run']:>3} {r['dump_s']:>7.2f} {r['restart_s']:>9.2f} "
              f"{r['image_mib']:>9.1f} {r['pss_anon_before_kib']:>15} {r['pss_anon_after_kib']:>9} "
              f"{r['pss_anon_ratio']:>6.3f} {r['pss_before_kib']:>10} {r['pss_after_kib']:>9}")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
