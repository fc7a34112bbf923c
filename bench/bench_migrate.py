#!/usr/bin/env python3
"""Live migration: `lcr migrate` (pre-copy) vs a plain
`lcr checkpoint PID -o - | <TCP> | lcr restart -` through the same kind of
connection (two network namespaces joined by a veth pair, tests/netns.py).

    python bench/bench_migrate.py [--mib 1024] [--usec 1000] [--runs 1]
    python bench/bench_migrate.py --quick          (256 MiB, one run)

(root.)  The workload is memhog (shared/workloads) writing continuously
(4 random words per iteration, ``--usec`` between iterations).  Per run:
  - migrate: `lcr receive` in namespace B, `lcr migrate --json` in A: total
    time, downtime (final freeze -> the destination reports it running),
    pages per round;
  - plain: `lcr restart -` in B reading a TCP relay, `lcr checkpoint -o -`
    in A writing into one: the process is frozen from the checkpoint's start
    until the restored one runs (restart prints its pid): that is its
    downtime, and its total.
memhog's checksum is checked after each move.  Prints a table, the ratios
measured in this run, and the raw rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import netns  # noqa: E402
from common import build_memhog, memhog_ok, prewarm_memory  # noqa: E402

ROOT = Path(os.environ.get("BENCH_DIR", "/var/tmp/lcr-migbench"))
TOKEN = "bench-token-5c1e"
WRAPPER = ("import sys; sys.path.insert(0, %r); from linuxcr.cli import main; "
           "from linuxcr.cli_migrate import migrate_cmd, receive_cmd; "
           "[main.add_command(c) for c in (migrate_cmd, receive_cmd) if c.name not in main.commands]; "
           "main(prog_name='lcr')" % str(REPO))
LCR = [sys.executable, "-c", WRAPPER]
RELAY = r'''
import socket, sys, os
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "listen":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(1); print("listening", file=sys.stderr, flush=True)
    c, _ = s.accept(); src, dst = c.fileno(), 1
else:
    c = socket.create_connection((host, port)); src, dst = 0, c.fileno()
while True:
    b = os.read(src, 1 << 20)
    if not b:
        break
    v = memoryview(b)
    while v:
        v = v[os.write(dst, v):]
c.close()
'''


def build() -> Path:
    ROOT.mkdir(parents=True, exist_ok=True)
    (ROOT / "relay.py").write_text(RELAY)
    return build_memhog(ROOT)


def prewarm(mib: int) -> None:
    prewarm_memory(ROOT, mib << 20)


def start(memhog: Path, mib: int, usec: int, log: Path) -> int:
    """memhog as our child, reaped at once when it dies (a zombie reaped by
    init only every 1-2 s would hold its pid: `lcr restart -` waits for it)."""
    with open(log, "ab") as f:
        p = subprocess.Popen([memhog, "-f", "-s", str(usec), str(mib)], stdin=subprocess.DEVNULL,
                             stdout=f, stderr=f, start_new_session=True, close_fds=True)
    threading.Thread(target=p.wait, daemon=True).start()
    wait_line(log, rf"pid={p.pid} ready")
    return p.pid


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_line(path: Path, pattern: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace")):
            return
        time.sleep(0.01)
    raise RuntimeError(f"no {pattern!r} in {path}")


def run_migrate(net, memhog: Path, mib: int, usec: int, max_downtime: str) -> dict:
    log = ROOT / "hog-mig.log"
    log.unlink(missing_ok=True)
    pid = start(memhog, mib, usec, log)
    time.sleep(0.5)
    err = ROOT / "recv.err"
    env = dict(os.environ, LCR_VERBOSE="1")
    with open(err, "wb") as e:
        recv = subprocess.Popen(net.exec_b([*LCR, "receive", "--listen", f"{net.addr_b}:7801",
                                            "--token", TOKEN, "--timeout", "120s"]),
                                stdout=subprocess.PIPE, stderr=e, env=env, close_fds=True)
    new = None
    try:
        wait_line(err, "listening on")
        cp = subprocess.run(net.exec_a([*LCR, "migrate", pid, "--to", f"{net.addr_b}:7801",
                                        "--token", TOKEN, "--max-downtime", max_downtime,
                                        "--json"]),
                            capture_output=True, text=True, timeout=600)
        out, _ = recv.communicate(timeout=120)
        if cp.returncode != 0:
            raise RuntimeError(f"lcr migrate failed: {cp.stderr.strip()}")
        new = int(out)
        rep = json.loads(cp.stdout)
        ok = memhog_ok(new, log)
        return {"kind": "migrate", "mib": mib, "total": rep["seconds"], "downtime": rep["downtime"],
                "rounds": [(r["n"], r["pages"], round(r["seconds"], 3)) for r in rep["rounds"]],
                "final_pages": rep["final_pages"], "inherited": rep["inherited_pages"],
                "frozen_collect": rep["frozen_collect"], "dest_seconds": rep["dest_seconds"],
                "stop_reason": rep["stop_reason"], "checksum_ok": ok}
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
        kill(pid)
        if new:
            kill(new)


def run_plain(net, memhog: Path, mib: int, usec: int) -> dict:
    log = ROOT / "hog-plain.log"
    log.unlink(missing_ok=True)
    pid = start(memhog, mib, usec, log)
    time.sleep(0.5)
    relay = str(ROOT / "relay.py")
    err = ROOT / "restart.err"
    with open(err, "wb") as e:
        dest = subprocess.Popen(net.exec_b(["sh", "-c", f"{sys.executable} {relay} listen "
                                            f"{net.addr_b} 7802 | {' '.join(map(repr, LCR))} "
                                            "restart -"]),
                                stdout=subprocess.PIPE, stderr=e, close_fds=True)
    new = None
    try:
        wait_line(err, "listening")
        t0 = time.monotonic()
        src = subprocess.run(["sh", "-c", f"{' '.join(map(repr, LCR))} checkpoint {pid} -o - | "
                              f"{' '.join(net.exec_a([sys.executable, relay, 'send', net.addr_b, '7802']))}"],
                             capture_output=True, text=True, timeout=600)
        out, _ = dest.communicate(timeout=300)
        t1 = time.monotonic()
        if src.returncode != 0 or dest.returncode != 0:
            raise RuntimeError(f"plain move failed: {src.stderr.strip()} {err.read_text()}")
        new = int(out.split()[-1])
        ok = memhog_ok(new, log)
        return {"kind": "plain", "mib": mib, "total": t1 - t0, "downtime": t1 - t0,
                "checksum_ok": ok}
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()
        kill(pid)
        if new:
            kill(new)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--usec", type=int, default=1000, help="memhog's sleep between writes")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--max-downtime", default="50ms")
    ap.add_argument("--quick", action="store_true", help="256 MiB, one run")
    a = ap.parse_args()
    if a.quick:
        a.mib, a.runs = 256, 1
    why = netns.available()
    if why:
        sys.exit(f"bench_migrate: {why}")
    memhog = build()
    rows = []
    with netns.two_namespaces() as net:
        for _ in range(a.runs):       # interleaved
            prewarm(a.mib)
            rows.append(run_migrate(net, memhog, a.mib, a.usec, a.max_downtime))
            prewarm(a.mib)
            rows.append(run_plain(net, memhog, a.mib, a.usec))
    mig = [r for r in rows if r["kind"] == "migrate"]
    pla = [r for r in rows if r["kind"] == "plain"]
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    print(f"memhog {a.mib} MiB, a write every {a.usec} us, {a.runs} run(s), veth between "
          "two network namespaces")
    print(f"{'':<24}{'total s':>10}{'downtime ms':>14}")
    print(f"{'lcr migrate (pre-copy)':<24}{med(mig, 'total'):>10.2f}{med(mig, 'downtime') * 1e3:>14.1f}")
    print(f"{'checkpoint | restart':<24}{med(pla, 'total'):>10.2f}{med(pla, 'downtime') * 1e3:>14.1f}")
    print(f"ratio downtime migrate/plain: {med(mig, 'downtime') / med(pla, 'downtime'):.3f}; "
          f"total migrate/plain: {med(mig, 'total') / med(pla, 'total'):.2f}")
    for r in mig:
        print("rounds (n, pages, s):", r["rounds"], "final:", r["final_pages"], "pages,",
              r["inherited"], "inherited;", r["stop_reason"])
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
