"""In-memory checkpoints (crid snapshots): the agent, writeback, rollback,
low-downtime checkpoint, self-rollback (transaction), agent death, SO_PEERCRED
and limits.  Every test gets its own agent (LCR_AGENT_DIR), killed at teardown."""
from __future__ import annotations

import json
import os
import pwd
import select
import signal
import subprocess
import sys
import time

import pytest

import helpers
from helpers import (READY_TIMEOUT, REPO, assert_running_untraced, lcr, pass_field, probe,
                     probe_hog, reap, restart_image, start_memhog, wait_for_line)

pytestmark = pytest.mark.e2e
WALL = 0x40000000


@pytest.fixture
def agent_env(tmp_path, monkeypatch):
    d = tmp_path / "agent"
    monkeypatch.setenv("LCR_AGENT_DIR", str(d))
    env = helpers.child_env({"LCR_AGENT_DIR": str(d)})
    yield env
    try:
        pid = int((d / "agent.pid").read_text())
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


def _snapshots(env, pid=None) -> list[dict]:
    args = ["snapshots", "--json"] + ([pid] if pid else [])
    return json.loads(lcr(*args, env=env).stdout)


def _gone_or_zombie(pid: int) -> bool:
    st = helpers.proc_state(pid)
    return st is None or st in ("Z", "X")


def _reap_any(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG | WALL)
    except ChildProcessError:
        pass


def test_snapshot_writeback_restart_memhog(bins, procs, tmp_path, agent_env):
    r = start_memhog(procs, bins, tmp_path, 64)
    crid = lcr("snapshot", r.pid, env=agent_env).stdout.strip()
    at_snap = probe_hog(r.pid, r.log)          # just after: the counter barely moved
    time.sleep(1.5)
    later = probe_hog(r.pid, r.log)
    assert later.ok and later.counter > at_snap.counter + 500
    [info] = _snapshots(agent_env, r.pid)
    assert info["crid"] == crid and info["frozen_seconds"] < 1.0
    lcr("writeback", crid, "-o", tmp_path / "img", env=agent_env)
    lcr("discard", crid, env=agent_env)
    assert _snapshots(agent_env) == []
    helpers.kill_and_reap(r.pid)
    new = restart_image(tmp_path / "img", procs)
    assert new == r.pid
    back = probe_hog(new, r.log)
    assert back.ok, back.line
    assert back.counter < later.counter, "restored from a later state than the snapshot"
    assert_running_untraced(new)


def test_low_downtime_checkpoint(bins, procs, tmp_path, agent_env):
    r = start_memhog(procs, bins, tmp_path, 64)
    cp = lcr("checkpoint", r.pid, "-o", tmp_path / "img", "--low-downtime", env=agent_env)
    assert "frozen" in cp.stderr
    reap(r.pid)
    new = restart_image(tmp_path / "img", procs)
    assert probe_hog(new, r.log).ok


def test_rollback_counter_and_offset(bins, procs, tmp_path, agent_env):
    data = tmp_path / "data"
    data.write_bytes(b"x" * 100)
    log = tmp_path / "snap_counter.log"
    p = procs.start([bins["snap_counter"], data], log)
    wait_for_line(log, r"^READY pid=", READY_TIMEOUT, pid=p.pid)
    crid = lcr("snapshot", p.pid, env=agent_env).stdout.strip()
    first = pass_field(probe(p.pid, log, r"^(PASS|FAIL) snap_counter"), "count")
    time.sleep(1.0)
    m = probe(p.pid, log, r"^(PASS|FAIL) snap_counter")
    assert m.group(1) == "PASS", m.string
    before = pass_field(m, "count")
    assert before > first + 200
    lcr("rollback", crid, env=agent_env)
    m = probe(p.pid, log, r"^(PASS|FAIL) snap_counter")
    assert m.group(1) == "PASS", m.string          # the offset moved back with the counter
    assert pass_field(m, "count") < before - 200
    assert_running_untraced(p.pid)
    # several rollbacks to one snapshot; memory-only leaves the offset behind
    time.sleep(0.5)
    lcr("rollback", crid, "--memory-only", env=agent_env)
    m = probe(p.pid, log, r"^(PASS|FAIL) snap_counter")
    assert m.group(1) == "FAIL" and "offset" in m.string, m.string
    lcr("discard", crid, env=agent_env)


def test_transaction_rolls_back_itself(tmp_path, agent_env):
    data = tmp_path / "data"
    data.write_bytes(os.urandom(4096))
    env = dict(agent_env, PYTHONPATH=str(REPO))
    cp = subprocess.run([sys.executable, REPO / "tests/progs/snap_txn.py", data], env=env,
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith("PASS snap_txn"), cp.stdout + cp.stderr
    assert _snapshots(agent_env) == []


def test_pipe_reader_sees_eof(procs, tmp_path, agent_env):
    r, w = os.pipe()
    log = tmp_path / "snap_pipe.log"
    with open(log, "ab") as f:
        p = subprocess.Popen([sys.executable, REPO / "tests/progs/snap_pipe.py"], stdin=subprocess.DEVNULL,
                             stdout=w, stderr=f, start_new_session=True, env=helpers.child_env())
    procs.add(p.pid)
    os.close(w)
    wait_for_line(log, r"^READY pid=", READY_TIMEOUT, pid=p.pid)
    crid = lcr("snapshot", p.pid, env=agent_env).stdout.strip()
    [info] = _snapshots(agent_env)
    assert os.listdir(f"/proc/{info['child']}/fd") == []
    os.kill(p.pid, signal.SIGUSR1)
    wait_for_line(log, r"^CLOSED pid=", READY_TIMEOUT, pid=p.pid)
    ready, _, _ = select.select([r], [], [], 10)
    assert ready and os.read(r, 10) == b"", "the reader did not see EOF"
    os.close(r)
    lcr("discard", crid, env=agent_env)


def test_agent_death_kills_snapshots_only(bins, procs, tmp_path, agent_env):
    r = start_memhog(procs, bins, tmp_path, 32)
    lcr("snapshot", r.pid, env=agent_env)
    lcr("snapshot", r.pid, env=agent_env)
    children = [s["child"] for s in _snapshots(agent_env)]
    assert len(children) == 2 and all(helpers.proc_state(c) == "t" for c in children)
    agent = int((tmp_path / "agent" / "agent.pid").read_text())
    os.kill(agent, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not all(_gone_or_zombie(c) for c in children):
        assert time.monotonic() < deadline, [helpers.proc_state(c) for c in children]
        time.sleep(0.05)
    for c in children:
        _reap_any(c)
    assert probe_hog(r.pid, r.log).ok
    assert_running_untraced(r.pid)


def test_limits(bins, procs, tmp_path, agent_env):
    env = dict(agent_env, LCR_MAX_SNAPSHOTS="1")
    r = start_memhog(procs, bins, tmp_path, 16)
    crid = lcr("snapshot", r.pid, env=env).stdout.strip()
    cp = lcr("snapshot", r.pid, env=env, check=False)
    assert cp.returncode == 14 and "too many snapshots" in cp.stderr, cp.stderr
    lcr("discard", crid, env=env)


def test_other_user_cannot_use_roots_crids(bins, procs, tmp_path):
    try:
        u = pwd.getpwnam("lcrtest")
    except KeyError:
        pytest.skip("user lcrtest does not exist")
    if os.geteuid() != 0:
        pytest.skip("needs root")
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="lcr-agent-")     # under /tmp: reachable by lcrtest
    env = helpers.child_env({"LCR_AGENT_DIR": d})
    try:
        r = start_memhog(procs, bins, tmp_path, 16)
        crid = lcr("snapshot", r.pid, env=env).stdout.strip()
        # open the door on purpose: only SO_PEERCRED stands in the way now
        os.chmod(d, 0o755)
        os.chmod(os.path.join(d, "agent.sock"), 0o666)
        for args in (["rollback", crid], ["writeback", crid, "-o", "-"], ["discard", crid],
                     ["snapshot", r.pid]):
            cp = lcr(*args, env=env, user=u.pw_uid, check=False, binary=True, cwd=REPO)
            assert cp.returncode == 4, (args, cp.returncode, cp.stderr)
            assert "uid 0" in cp.stderr, cp.stderr
        cp = lcr("snapshots", "--json", env=env, user=u.pw_uid, cwd=REPO)
        assert json.loads(cp.stdout) == []
        assert [s["crid"] for s in _snapshots(env)] == [crid]
        lcr("discard", crid, env=env)
    finally:
        try:
            os.kill(int(open(os.path.join(d, "agent.pid")).read()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        shutil.rmtree(d, ignore_errors=True)
