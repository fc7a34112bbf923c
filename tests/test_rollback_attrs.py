"""Rollback gives back process attributes and area flags (issue 17): nice,
affinity, oom_score_adj, rlimits, timer slack, madvise flags, mlock and
guard regions, on the fast and the full path; and refuses what cannot be
given back (seccomp filters added since)."""
from __future__ import annotations

import os
import re
import resource
import signal

import pytest

from helpers import READY_TIMEOUT, probe, wait_for_line
from linuxcr import agent
from linuxcr.errors import RollbackRefused
from linuxcr.procfs import read_smaps
from linuxcr.resources import guards, memory
from linuxcr.sys.syscalls import ioprio_get

pytestmark = [pytest.mark.e2e]
PG = 4096


def _start(bins, procs, tmp_path):
    log = tmp_path / "roll_attrs.log"
    p = procs.start([bins["roll_attrs"]], log)
    m = wait_for_line(log, r"^READY pid=(\d+) D=(\S+) F=(\S+) H=(\S+) L=(\S+) G=(\S+)",
                      READY_TIMEOUT, pid=p.pid)
    return p.pid, log, dict(zip("DFHLG", (int(m.group(i), 16) for i in range(2, 7))))


def _flags(pid: int) -> dict[int, set[str]]:
    return {e.map.start: set(e.vmflags) for e in read_smaps(pid)}


def _state(pid: int, at: dict[str, int]) -> dict:
    fl = _flags(pid)
    vmas = memory.collect(read_smaps(pid))
    with open(f"/proc/{pid}/oom_score_adj") as f:
        oom = int(f.read())
    with open(f"/proc/{pid}/timerslack_ns") as f:
        slack = int(f.read())
    return dict(nice=os.getpriority(os.PRIO_PROCESS, pid), ioprio=ioprio_get(pid), cpus=os.sched_getaffinity(pid),
                oom=oom, nofile=resource.prlimit(pid, resource.RLIMIT_NOFILE), slack=slack,
                flags={k: fl[a] & {"dd", "dc", "hg", "nh", "lo"} for k, a in at.items()},
                guards=[g for g in guards.dump(pid, vmas) if at["G"] <= g[0] < at["G"] + 16 * PG])


def _change(pid, log):
    probe(pid, log, r"^CHANGED pid=", READY_TIMEOUT, sig=signal.SIGUSR2)


def _alive_ok(pid, log):
    probe(pid, log, r"^PASS roll_attrs", READY_TIMEOUT)


@pytest.mark.parametrize("full", [False, True], ids=["fast", "full"])
def test_rollback_gives_attributes_back(bins, procs, tmp_path, agent_env, full):
    pid, log, at = _start(bins, procs, tmp_path)
    snap = agent.snapshot(pid)
    before = _state(pid, at)
    assert before["guards"] == [[at["G"], at["G"] + PG]], before
    assert "dd" in before["flags"]["D"] and "nh" in before["flags"]["H"], before
    _change(pid, log)
    changed = _state(pid, at)
    for k in ("nice", "ioprio", "oom", "nofile", "slack", "guards"):
        assert changed[k] != before[k], (k, changed, before)
    assert changed["flags"] != before["flags"], changed
    res = agent.rollback(snap.crid, full=full)
    assert res["path"] == ("full" if full else "fast"), res
    after = _state(pid, at)
    if len(before["cpus"]) == 1:
        after.pop("cpus"), before.pop("cpus")
    assert after == before, (after, before, res.get("warnings"))
    _alive_ok(pid, log)
    # a second rollback finds everything as it is: nothing to do, same result
    res = agent.rollback(snap.crid, full=full)
    again = _state(pid, at)
    if "cpus" not in before:
        again.pop("cpus")
    assert again == before, (again, before, res.get("warnings"))
    _alive_ok(pid, log)
    snap.discard()


def test_no_new_privs_set_since_refuses(bins, procs, tmp_path, agent_env):
    """no_new_privs cannot be unset (nor a seccomp filter removed): refused, untouched."""
    log = tmp_path / "sec.log"
    p = procs.start([bins["roll_attrs"]], log)
    wait_for_line(log, r"^READY pid=", READY_TIMEOUT, pid=p.pid)
    snap = agent.snapshot(p.pid)
    probe(p.pid, log, r"^NNP pid=", READY_TIMEOUT, sig=signal.SIGHUP)
    with pytest.raises(RollbackRefused) as ei:
        agent.rollback(snap.crid)
    assert re.search(r"no_new_privs", str(ei.value)), str(ei.value)
    _alive_ok(p.pid, log)
    snap.discard()


@pytest.mark.skipif(os.geteuid() != 0, reason="installs a seccomp filter without no_new_privs")
def test_seccomp_filter_added_since_refuses(bins, procs, tmp_path, agent_env):
    """A seccomp filter added since the snapshot cannot be removed: refused, untouched."""
    log = tmp_path / "sec.log"
    p = procs.start([bins["roll_attrs"]], log)
    wait_for_line(log, r"^READY pid=", READY_TIMEOUT, pid=p.pid)
    snap = agent.snapshot(p.pid)
    m = probe(p.pid, log, r"^SECCOMP pid=\d+ r=(-?\d+)", READY_TIMEOUT, sig=signal.SIGWINCH)
    assert m.group(1) == "0", m.string
    with pytest.raises(RollbackRefused) as ei:
        agent.rollback(snap.crid)
    assert "seccomp" in str(ei.value) and "cannot be removed" in str(ei.value), str(ei.value)
    _alive_ok(p.pid, log)
    snap.discard()
