"""Rollback of signal state: setitimer() timers, POSIX timers, pending
signals of the process and of each thread (tests/progs/snap_signals.c)."""
from __future__ import annotations

import os
import signal

import pytest

from helpers import READY_TIMEOUT, assert_running_untraced, lcr, log_size, probe, wait_for_line
from test_snapshots import agent_env  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e
ANSWER = r"^(PASS|FAIL) snap_signals"


def test_rollback_signal_state(bins, procs, tmp_path, agent_env):  # noqa: F811
    log = tmp_path / "snap_signals.log"
    p = procs.start([bins["snap_signals"]], log)
    wait_for_line(log, r"^READY pid=", READY_TIMEOUT, pid=p.pid)
    m = probe(p.pid, log, ANSWER)
    assert m.group(1) == "PASS", m.string
    crid = lcr("snapshot", p.pid, env=agent_env).stdout.strip()
    m = probe(p.pid, log, ANSWER)          # the snapshot changed nothing
    assert m.group(1) == "PASS", m.string
    start = log_size(log)
    os.kill(p.pid, signal.SIGUSR2)
    wait_for_line(log, r"^MUTATED pid=", READY_TIMEOUT, start=start, pid=p.pid)
    m = probe(p.pid, log, ANSWER)
    assert m.group(1) == "FAIL", m.string
    for what in ("ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF", "T1", "T2",
                 "process-wide pending", "main thread pending", "worker pending"):
        assert what in m.string, (what, m.string)
    lcr("rollback", crid, env=agent_env)
    m = probe(p.pid, log, ANSWER)
    assert m.group(1) == "PASS", m.string
    assert_running_untraced(p.pid)
    # twice: a rollback with nothing changed keeps it as it is
    lcr("rollback", crid, env=agent_env)
    m = probe(p.pid, log, ANSWER)
    assert m.group(1) == "PASS", m.string
    lcr("discard", crid, env=agent_env)
