"""What the bench scripts share (bench_lazy.py, bench_migrate.py,
bench_incremental.py import it from their own directory): memhog built
from shared/workloads, its checksum probe, killing a process by pid and
waiting for it to be gone, memory pre-warming.  bench.py stays standalone.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LCR_SHARED", REPO.parent / "shared"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_memhog(out_dir: Path, reuse: bool = True) -> Path:
    """shared/workloads/memhog.c compiled to OUT_DIR/memhog (kept when
    ``reuse`` and already there)."""
    out = out_dir / "memhog"
    if not (reuse and out.exists()):
        subprocess.run(["gcc", "-O2", "-o", out, SHARED / "workloads" / "memhog.c"], check=True)
    return out


def memhog_ok(pid: int, logf: Path, timeout: float = 60.0, poll: float = 0.02) -> bool:
    """SIGUSR1 to memhog: True when the line it logs says its memory
    checksum is right (OK), False on MISMATCH or nothing within timeout."""
    start = logf.stat().st_size
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tail = logf.read_bytes()[start:].decode(errors="replace")
        m = re.search(r"actual=\w+ (OK|MISMATCH)", tail)
        if m:
            return m.group(1) == "OK"
        time.sleep(poll)
    return False


def gone(pid: int, timeout: float = 30.0) -> bool:
    """Wait up to timeout s until /proc/PID is gone (reaping it when it is
    our child): True when it is."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def kill(pid: int, timeout: float = 30.0) -> bool:
    """SIGKILL pid (gone already: fine), then gone(pid, timeout)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return gone(pid, timeout)


def prewarm_memory(d: Path, nbytes: int) -> None:
    """Write and delete a file of nbytes in d: freshly allocated guest
    memory is slow and noisy here, so warm it before a timed step."""
    p = d / "prewarm"
    chunk = b"\x5a" * (1 << 20)
    with open(p, "wb") as f:
        for _ in range(nbytes >> 20):
            f.write(chunk)
    p.unlink()
