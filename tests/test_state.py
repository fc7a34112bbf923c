"""Process state that must never come back silently different (issue 17):
seccomp filters, no_new_privs, securebits, bounding set, scheduling per
thread, affinity, oom_score_adj, timer slack, subreaper, THP disable,
dumpable, membarrier, mlock/MCL_FUTURE, madvise flags, the parent-death
signal (tests/progs/state_attrs.c checks all of it itself).  As root; the
refusals for an ordinary user run as ``lcrtest``."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from helpers import (LCR, assert_clean_error, assert_pass, kill_and_reap, lcr,
                     parse_restored_pid, reap, restart_image, wait_for_line)
from rootless_helpers import find_user, lcr_as, user_can_run_lcr, user_workdir

pytestmark = pytest.mark.e2e


def _cpu() -> int:
    return max(os.sched_getaffinity(0))


def _start(procs, bins, tmp_path, *mode: str, prefix=()):
    log = tmp_path / "state.log"
    p = procs.start([*prefix, bins["state_attrs"], str(_cpu()), *mode], log)
    m = wait_for_line(log, r"^READY pid=(\d+) child=(\d+)", pid=p.pid)
    child = int(m.group(2))
    if child:
        procs.add(child)
    return p.pid, child, log


@pytest.mark.skipif(os.geteuid() != 0, reason="sets state only root may set (securebits, ...)")
def test_state_comes_back(bins, procs, tmp_path):
    pid, child, log = _start(procs, bins, tmp_path)
    assert_pass(pid, log, "state_attrs")       # the set-up itself holds
    img = tmp_path / "img"
    lcr("checkpoint", pid, "-o", img)
    reap(pid)
    reap(child)              # re-parented to us (the tests are a subreaper)
    new = restart_image(img, procs)
    assert new == pid
    assert_pass(pid, log, "state_attrs")
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    assert re.search(r"^Seccomp:\s+2$", status, re.M), status
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
    # the child's parent-death signal fires when its restored parent dies
    kill_and_reap(pid)
    wait_for_line(log, rf"^PDEATH pid={child}$")


def _ioprio(tid: int) -> int:
    from linuxcr.sys.syscalls import ioprio_get
    return ioprio_get(tid)


def test_membarrier_sync_core_only(bins, procs, tmp_path):
    """Registered for SYNC_CORE only (the kernel then reports the plain
    private registration too): the plain barrier stays refused after restart."""
    pid, child, log = _start(procs, bins, tmp_path, "sync")
    assert_pass(pid, log, "state_attrs")
    img = tmp_path / "img"
    lcr("checkpoint", pid, "-o", img)
    reap(pid)
    assert restart_image(img, procs) == pid
    assert_pass(pid, log, "state_attrs")


def test_ioprio_not_inherited_from_lcr(bins, procs, tmp_path):
    """A process in the default I/O class, restarted by an lcr under
    `ionice -c3`, comes back in the default class, not in lcr's idle one."""
    pid, child, log = _start(procs, bins, tmp_path, "plain")
    assert _ioprio(pid) == 0
    img = tmp_path / "img"
    lcr("checkpoint", pid, "-o", img)
    reap(pid)
    reap(child)
    cp = subprocess.run(["ionice", "-c3", *LCR, "restart", str(img)], capture_output=True,
                        text=True, timeout=120)
    if cp.returncode == 0:
        procs.add(parse_restored_pid(cp.stdout))
    assert cp.returncode == 0, cp.stderr
    assert _ioprio(os.getpid()) == 0           # ionice applied to lcr only
    assert _ioprio(pid) == 0, hex(_ioprio(pid))
    assert_pass(pid, log, "state_attrs")


@pytest.mark.skipif(os.geteuid() != 0, reason="sets a seccomp filter as root")
def test_seccomp_filter_survives_rollback(bins, procs, tmp_path, agent_env):
    """A snapshot of a seccomp'd process: the dump's injected syscalls are
    not judged by the filter (the process is not killed) and a rollback
    leaves the filter in place."""
    pid, child, log = _start(procs, bins, tmp_path, "seccomp")
    crid = lcr("snapshot", pid, env=agent_env).stdout.strip()
    lcr("rollback", crid, env=agent_env)
    assert_pass(pid, log, "state_attrs")
    lcr("discard", crid, env=agent_env)
    with open(f"/proc/{pid}/status") as f:
        assert re.search(r"^Seccomp:\s+2$", f.read(), re.M)






def test_user_refused_seccomp(user, wd, bins, procs, tmp_path):
    pid, child, log = _start(procs, bins, tmp_path, "seccomp", prefix=user.prefix)
    img = wd / "img"
    cp = lcr_as(user, "check", pid, check=False)
    assert cp.returncode != 0 and re.search(rf"pid {pid} runs under seccomp.*CAP_SYS_ADMIN.*root",
                                            cp.stdout), cp
    cp = lcr_as(user, "checkpoint", pid, "-o", img, check=False)
    assert_clean_error(cp, "NotCheckpointable", mentions=["seccomp", str(pid), "root"])
    assert not img.exists()
    assert_pass(pid, log, "state_attrs")      # untouched: its filter still holds


def test_user_refused_lower_nice(user, wd, bins, procs, tmp_path):
    """Started by root at nice -5 and running as lcrtest: lcrtest could not
    give that nice value back (RLIMIT_NICE 0)."""
    pid, child, log = _start(procs, bins, tmp_path, "plain",
                             prefix=["nice", "-n", "-5", "prlimit", "--nice=0", *user.prefix])
    cp = lcr_as(user, "check", pid, check=False)
    assert cp.returncode != 0 and re.search(r"nice value -5.*CAP_SYS_NICE", cp.stdout), cp


def test_user_refused_realtime_ioprio(user, wd, bins, procs, tmp_path):
    """Started by root in the real-time I/O class and running as lcrtest:
    lcrtest could not set that class again (CAP_SYS_NICE)."""
    pid, child, log = _start(procs, bins, tmp_path, "plain",
                             prefix=["ionice", "-c1", "-n4", *user.prefix])
    assert _ioprio(pid) == (1 << 13 | 4)
    cp = lcr_as(user, "check", pid, check=False)
    assert cp.returncode != 0 and re.search(
        rf"pid {pid} has the real-time I/O priority \(realtime: prio 4\).*CAP_SYS_NICE",
        cp.stdout), cp
    img = wd / "img"
    cp = lcr_as(user, "checkpoint", pid, "-o", img, check=False)
    assert_clean_error(cp, "NotCheckpointable", mentions=["I/O priority", str(pid)])
    assert not img.exists()
    assert_pass(pid, log, "state_attrs")
