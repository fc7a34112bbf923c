"""lcr SIGKILLed at every boundary of a kill-safe injected call into a live
target (LCR_FAULT=inject.*, see linuxcr/remote/task.py and guardian.py), for
checkpoint, checkpoint --leave-running and checkpoint --low-downtime, on a
CPU-busy target (memhog: checksum on SIGUSR1) and a sleeping one (pauser:
pause() must only ever return EINTR).  After each kill: the target runs
(not stopped: the guardian sent SIGCONT), untraced, with the same signal
mask, mappings and fds, and its memory intact."""
from __future__ import annotations

import signal
import time

import pytest

import helpers
from helpers import probe_hog, start_memhog
from test_faults import PAUSER_C, lcr_fault, outside, pauser, wait_running  # noqa: F401

pytestmark = pytest.mark.e2e

# (fault point, what it is): the n-th guarded call of the run with @n
POINTS = [
    "inject.masked",        # mask all, before the SIGSTOP stop (1st call: the scratch mmap)
    "inject.parked",        # parked in pause(), registers injected
    "inject.entry@2",       # real call set up, SIGSTOP re-queued, scratch mapped
    "inject.exit@3",        # at the exit stop, injected registers in place
    "inject.rest@4",        # between two calls, scratch mapped
    "inject.mapped",        # scratch mapped, its code page not written
    "dump.collected",       # injection over, all threads at rest (SIGSTOP pending)
]
# --low-downtime: the snapshot fork (clone3) at every boundary
LOW_DOWNTIME = ["inject.entry@3", "clone.entry", "clone.event", "clone.exit", "clone.rest"]


def _check_same(pid: int, before) -> None:
    wait_running(pid)
    now = outside(pid)
    assert now.sigblk == before.sigblk, f"signal mask changed: {before.sigblk} -> {now.sigblk}"
    assert now.maps == before.maps, f"mappings changed: {set(now.maps) ^ set(before.maps)}"
    assert now.fds == before.fds, f"fds changed: {before.fds} -> {now.fds}"


def _forks_of(pid: int) -> list[int]:
    """Live processes (not zombies) running the target's program, other than it."""
    import os
    exe = os.readlink(f"/proc/{pid}/exe")
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != pid:
            try:
                if os.readlink(f"/proc/{d}/exe") == exe:
                    out.append(int(d))
            except OSError:
                pass
    return out


def _kill_at(point: str, pid: int, tmp_path, *extra: str) -> None:
    cp = lcr_fault(point, "checkpoint", pid, "-o", tmp_path / "img", *extra)
    assert cp.returncode == -signal.SIGKILL, f"the fault did not fire: {cp.returncode} {cp.stderr}"
    assert "Traceback" not in cp.stderr, cp.stderr


CASES = [(p, m) for m in ("plain", "leave") for p in POINTS] \
    + [(p, "low") for p in LOW_DOWNTIME]


def _args(mode: str) -> tuple[str, ...]:
    return {"plain": (), "leave": ("--leave-running",), "low": ("--low-downtime",)}[mode]


@pytest.mark.parametrize("point,mode", CASES, ids=[f"{m}-{p}" for p, m in CASES])
def test_busy_target_survives(point, mode, bins, procs, tmp_path):
    r = start_memhog(procs, bins, tmp_path, 8)
    h = probe_hog(r.pid, r.log)
    assert h.ok, h.line
    before = outside(r.pid)
    _kill_at(point, r.pid, tmp_path, *_args(mode))
    _check_same(r.pid, before)
    assert not _forks_of(r.pid), "a snapshot child was left running"
    for _ in range(2):
        h2 = probe_hog(r.pid, r.log)
        assert h2.ok and h2.counter > h.counter, h2.line
        h = h2


SLEEP_CASES = [(p, "plain") for p in POINTS] + [("clone.entry", "low"), ("clone.exit", "low"),
                                                ("inject.exit@2", "leave")]


@pytest.mark.parametrize("point,mode", SLEEP_CASES, ids=[f"{m}-{p}" for p, m in SLEEP_CASES])
def test_sleeping_target_survives(point, mode, pauser, procs, tmp_path):
    log = tmp_path / "pauser.log"
    p = procs.start([pauser], log)
    helpers.wait_for_line(log, rf"^READY pid={p.pid}\b", pid=p.pid)
    helpers.assert_pass(p.pid, log, "pauser")
    before = outside(p.pid)
    _kill_at(point, p.pid, tmp_path, *_args(mode))
    _check_same(p.pid, before)
    time.sleep(0.1)
    fails = [ln for ln in helpers.read_log(log).splitlines() if ln.startswith("FAIL")]
    assert not fails, fails
    helpers.assert_pass(p.pid, log, "pauser")


def test_guardian_says_what_it_did(bins, procs, tmp_path):
    r = start_memhog(procs, bins, tmp_path, 8)
    cp = lcr_fault("inject.exit@2", "checkpoint", r.pid, "-o", tmp_path / "img")
    assert cp.returncode == -signal.SIGKILL
    lines = [ln for ln in cp.stderr.splitlines() if ln.startswith("lcr guardian:")]
    assert len(lines) == 1 and "scratch mapping" in lines[0] and "SIGCONT" in lines[0], cp.stderr
    wait_running(r.pid)
    assert probe_hog(r.pid, r.log).ok
