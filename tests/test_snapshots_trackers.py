"""The agent holds dirty-page trackers between checkpoints: tracker_put /
tracker_take / tracker_drop, with a plain eventfd standing for a tracker's
userfaultfd (its counter tells which one came back)."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import helpers
from helpers import REPO
from linuxcr import agent
from linuxcr.errors import NoSuchProcess
from test_snapshots import agent_env  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e


def _efd(value: int) -> int:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    os.eventfd_write(fd, value)
    return fd


def _sleeper(procs, tmp_path):
    p = procs.start(["sleep", "1000"], tmp_path / "sleep.log")
    return p.pid, helpers.start_time(p.pid)


def _agent_eventfds() -> int:
    pid = agent.agent_pid()
    d = f"/proc/{pid}/fd"
    n = 0
    for fd in os.listdir(d):
        try:
            n += os.readlink(f"{d}/{fd}") == "anon_inode:[eventfd]"
        except OSError:
            pass
    return n


def test_put_take_drop(procs, tmp_path, agent_env):  # noqa: F811
    pid, start = _sleeper(procs, tmp_path)
    assert agent.take_tracker(pid, start) is None          # no agent yet: none
    fd = _efd(5)
    agent.put_tracker(pid, start, "e1", fd)
    os.close(fd)
    [tr] = agent.trackers()
    assert tr["pid"] == pid and tr["epoch"] == "e1" and tr["starttime"] == start
    assert agent.trackers(pid + 1) == []
    assert agent.take_tracker(pid, start + 1) is None        # another process's
    epoch, fd = agent.take_tracker(pid, start)
    assert epoch == "e1" and os.eventfd_read(fd) == 5         # the same eventfd came back
    assert agent.take_tracker(pid, start) is None             # taken: gone from the agent
    assert agent.trackers() == [] and _agent_eventfds() == 0
    # a second put replaces the first (whose fd the agent closes)
    agent.put_tracker(pid, start, "e2", fd)
    os.close(fd)
    fd = _efd(7)
    agent.put_tracker(pid, start, "e3", fd)
    os.close(fd)
    assert _agent_eventfds() == 1
    epoch, fd = agent.take_tracker(pid, start)
    assert epoch == "e3" and os.eventfd_read(fd) == 7
    agent.put_tracker(pid, start, "e4", fd)
    os.close(fd)
    assert agent.drop_tracker(pid) is True
    assert agent.drop_tracker(pid) is False
    assert agent.take_tracker(pid, start) is None and _agent_eventfds() == 0
    # a process that is not the one named
    fd = _efd(1)
    with pytest.raises(NoSuchProcess):
        agent.put_tracker(pid, start + 1, "x", fd)
    os.close(fd)


def test_tracker_closed_when_process_dies(procs, tmp_path, agent_env):  # noqa: F811
    pid, start = _sleeper(procs, tmp_path)
    fd = _efd(3)
    agent.put_tracker(pid, start, "e1", fd)
    os.close(fd)
    assert _agent_eventfds() == 1
    helpers.kill_and_reap(pid)
    deadline = time.monotonic() + 10
    while agent.trackers() or _agent_eventfds():
        assert time.monotonic() < deadline, "the agent still holds the tracker of a dead process"
        time.sleep(0.1)
    assert agent.take_tracker(pid, start) is None


def test_other_user_cannot_take_roots_tracker(procs, tmp_path):
    try:
        u = pwd.getpwnam("lcrtest")
    except KeyError:
        pytest.skip("user lcrtest does not exist")
    if os.geteuid() != 0:
        pytest.skip("needs root")
    d = tempfile.mkdtemp(prefix="lcr-agent-")     # under /tmp: reachable by lcrtest
    old = os.environ.get("LCR_AGENT_DIR")
    os.environ["LCR_AGENT_DIR"] = d
    try:
        pid, start = _sleeper(procs, tmp_path)
        fd = _efd(9)
        agent.put_tracker(pid, start, "root", fd)
        os.close(fd)
        os.chmod(d, 0o755)
        os.chmod(os.path.join(d, "agent.sock"), 0o666)
        code = ("import sys; from linuxcr import agent\n"
                "from linuxcr.errors import PermissionDenied\n"
                f"for f in (lambda: agent.take_tracker({pid}, {start}), lambda: agent.drop_tracker({pid})):\n"
                "    try:\n        f()\n    except PermissionDenied as e:\n        print('DENIED', e.message)\n"
                "    else:\n        print('ALLOWED')\n"
                "print(len(agent.trackers()))\n")
        env = helpers.child_env({"LCR_AGENT_DIR": d, "PYTHONPATH": str(REPO)})
        cp = subprocess.run([*helpers.as_user(u.pw_uid), sys.executable, "-c", code], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
        lines = cp.stdout.splitlines()
        assert lines[:2] == [lines[0], lines[1]] and all(ln.startswith("DENIED") for ln in lines[:2]), cp.stdout
        assert "uid 0" in lines[0], cp.stdout
        assert lines[2] == "0", cp.stdout                    # root's trackers are not listed
        epoch, fd = agent.take_tracker(pid, start)
        assert epoch == "root" and os.eventfd_read(fd) == 9
        os.close(fd)
    finally:
        if old is None:
            os.environ.pop("LCR_AGENT_DIR", None)
        else:
            os.environ["LCR_AGENT_DIR"] = old
        try:
            os.kill(int(open(os.path.join(d, "agent.pid")).read()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        shutil.rmtree(d, ignore_errors=True)
