"""Snapshots of a process tree (tests/progs/snap_tree.c: a parent writing a
sequence into a pipe that is never empty, a child checking it): one
snapshot child per process, writeback to a normal tree image that lcr
restart restores, rollback of the whole tree (pipe bytes included), and a
rollback refused when the tree gained a process."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

import helpers
from helpers import READY_TIMEOUT, lcr, log_size, pass_field, probe, wait_for_line
from rootless_helpers import Trees, assert_tree_running_untraced, children, kill_tree, restart_tree
from test_snapshots import agent_env  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e




def _start(bins, trees, tmp_path):
    log = tmp_path / "snap_tree.log"
    p = helpers.start_detached([bins["snap_tree"]], log)
    trees.add(p.pid, p)
    m = wait_for_line(log, r"^READY pid=(\d+) child=(\d+)", READY_TIMEOUT, pid=p.pid)
    return p.pid, int(m.group(2)), log


def _probe(pid: int, child: int, log) -> tuple[int, int]:
    m = probe(pid, log, r"^(PASS|FAIL) snap_tree\b")
    assert m.group(1) == "PASS", m.string
    sent = pass_field(m, "sent")
    m = probe(child, log, r"^(PASS|FAIL) snap_tree_child\b")
    assert m.group(1) == "PASS", m.string
    return sent, pass_field(m, "got")


def _snapshots(env) -> list[dict]:
    return json.loads(lcr("snapshots", "--json", env=env).stdout)


def test_tree_snapshot_writeback_restart(bins, trees, tmp_path, agent_env):  # noqa: F811
    pid, child, log = _start(bins, trees, tmp_path)
    _probe(pid, child, log)
    crid = lcr("snapshot", pid, env=agent_env).stdout.strip()
    [info] = _snapshots(agent_env)
    assert info["processes"] == 2 and info["pids"] == [pid, child], info
    snap_children = info["children"]
    assert all(helpers.proc_state(c) == "t" for c in snap_children)
    # the root's snapshot child is outside the tree; the child's is invisible to wait()
    assert children(pid) == [child]
    at_snap = _probe(pid, child, log)
    time.sleep(1.0)
    later = _probe(pid, child, log)
    assert later[1] > at_snap[1]
    lcr("writeback", crid, "-o", tmp_path / "img", env=agent_env)
    lcr("discard", crid, env=agent_env)
    assert children(child) == [], "the child's snapshot process was not reaped"
    for c in snap_children:
        helpers.reap(c)
    kill_tree(pid)
    new, _ = restart_tree(tmp_path / "img", trees)
    assert new == pid and children(new) == [child]
    assert_tree_running_untraced(new)
    sent, got = _probe(pid, child, log)          # the sequence goes on: pipe bytes came back
    assert got < later[1], "restored from a later state than the snapshot"
    time.sleep(0.3)
    _probe(pid, child, log)


def test_tree_rollback(bins, trees, tmp_path, agent_env):  # noqa: F811
    pid, child, log = _start(bins, trees, tmp_path)
    crid = lcr("snapshot", pid, env=agent_env).stdout.strip()
    time.sleep(1.0)
    before = _probe(pid, child, log)
    cp = lcr("rollback", crid, env=agent_env)
    assert "warning" not in cp.stderr, cp.stderr
    after = _probe(pid, child, log)
    assert after[0] < before[0] and after[1] < before[1], (before, after)
    time.sleep(0.3)
    _probe(pid, child, log)                      # no gap, no repeat in the sequence
    lcr("rollback", crid, env=agent_env)         # again, to the same snapshot
    _probe(pid, child, log)
    lcr("discard", crid, env=agent_env)
    assert children(pid) == [child] and children(child) == []
    assert_tree_running_untraced(pid)


def test_tree_rollback_refused_when_tree_changed(bins, trees, tmp_path, agent_env):  # noqa: F811
    pid, child, log = _start(bins, trees, tmp_path)
    crid = lcr("snapshot", pid, env=agent_env).stdout.strip()
    start = log_size(log)
    os.kill(pid, signal.SIGUSR2)
    extra = int(wait_for_line(log, r"^FORKED pid=(\d+)", READY_TIMEOUT, start=start,
                              pid=pid).group(1))
    cp = lcr("rollback", crid, env=agent_env, check=False)
    assert cp.returncode == 12, cp.stderr
    assert f"pid {extra} was created since the snapshot" in cp.stderr, cp.stderr
    _probe(pid, child, log)                      # untouched
    lcr("discard", crid, env=agent_env)
    assert children(child) == []
    assert_tree_running_untraced(pid)
