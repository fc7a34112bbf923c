"""Every exit code of errors.EXIT_CODES provoked for real: the CLI (or, for
RolledBack, the Python API) on a real process, one `lcr:` line on stderr
and the code of the error's class.  The codes already provoked elsewhere
(test_cli_ux.py, test_e2e_failures.py, ...) are not repeated here."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable

import pytest

import helpers
from helpers import LCR, assert_clean_error, child_env, lcr

INTERRUPTED = 130


def _until(cond: Callable[[], object], what: str, bound: float = helpers.READY_TIMEOUT) -> None:
    """Poll ``cond`` until true; ``bound`` is a safety bound only."""
    deadline = time.monotonic() + bound
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {bound} s: {what}")
        time.sleep(0.01)


def _in_read_of_stdin(pid: int) -> bool:
    """``pid`` is blocked in read(2)/readv(2) of fd 0 (/proc/PID/syscall:
    number, then the first argument)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] in ("0", "19") and int(fields[1], 16) == 0


def test_interrupted_restart_from_stdin(tmp_path):
    """`lcr restart -` reading from a pipe nobody writes to: ^C ends it with
    `lcr: interrupted` and 130 -- also when it inherited SIGINT ignored (a
    shell script's background job), where Python installs no handler and
    the read could not be interrupted."""
    r, w = os.pipe()
    try:
        p = subprocess.Popen([*LCR, "restart", "-"], stdin=r, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=child_env(),
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    finally:
        os.close(r)
    try:
        _until(lambda: _in_read_of_stdin(p.pid) or p.poll() is not None,
               "lcr restart - blocked reading stdin")
        assert p.poll() is None, p.stderr.read().decode()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=helpers.LCR_TIMEOUT)
    finally:
        os.close(w)
        if p.poll() is None:
            p.kill()
            p.wait()
    cp = subprocess.CompletedProcess(p.args, p.returncode, out.decode(), err.decode())
    line = assert_clean_error(cp, mentions=["interrupted"], empty_stdout=True)
    assert cp.returncode == INTERRUPTED, line
    assert line == "lcr: interrupted"


# --- the processes and the agent ------------------------------------------------

@pytest.fixture
def agent_dir(tmp_path):
    """A private agent directory; its agent (if one started) killed after."""
    d = tmp_path / "agent"
    yield d
    try:
        os.kill(int((d / "agent.pid").read_text()), signal.SIGKILL)
    except (OSError, ValueError):
        pass


def _env(agent_dir, **extra: str) -> dict[str, str]:
    return child_env({"LCR_AGENT_DIR": str(agent_dir), "LCR_FAULT": "", **extra})


def _start(procs, prog: str, tmp_path, name: str = "prog") -> int:
    log = tmp_path / f"{name}.log"
    p = procs.start([prog], log)
    helpers.wait_for_line(log, r"READY pid=", pid=p.pid)
    return p.pid


def test_task_gone(bins, procs, tmp_path):
    """The process dies while lcr holds it (lcr stopped at dump.frozen: tree frozen and checked): 3."""
    pid = _start(procs, bins["counter"], tmp_path)
    p = subprocess.Popen([*LCR, "checkpoint", str(pid), "-o", str(tmp_path / "a.img")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=child_env({"LCR_FAULT": "dump.frozen:stop"}))
    try:
        _until(lambda: helpers.proc_state(p.pid) == "T" or p.poll() is not None,
               "lcr stopped at its fault point")
        assert p.poll() is None, p.communicate()[1].decode()
        os.kill(pid, signal.SIGKILL)
        # gone for good (a zombie lcr, its tracer, has not reaped) before lcr goes on
        _until(lambda: helpers.proc_state(pid) in ("Z", "X", None), f"pid {pid} dead")
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
    out, err = p.communicate(timeout=helpers.LCR_TIMEOUT)
    cp = subprocess.CompletedProcess(p.args, p.returncode, out.decode(), err.decode())
    assert_clean_error(cp, "TaskGone", mentions=[str(pid)], empty_stdout=True)
    assert not (tmp_path / "a.img").exists()


def _snapshot(pid: int, env: dict[str, str]) -> str:
    cp = lcr("snapshot", pid, env=env)
    crid = cp.stdout.strip()
    assert crid, cp.stderr
    return crid


def test_rollback_refused(bins, procs, tmp_path, agent_dir):
    """The executable the snapshot maps is gone: the rollback is refused (12)
    and the process runs on."""
    exe = tmp_path / "counter"
    exe.write_bytes(open(bins["counter"], "rb").read())
    exe.chmod(0o755)
    pid = _start(procs, str(exe), tmp_path)
    env = _env(agent_dir)
    crid = _snapshot(pid, env)
    exe.unlink()
    cp = lcr("rollback", crid, check=False, env=env)
    assert_clean_error(cp, "RollbackRefused", mentions=[str(pid), str(exe)])
    helpers.assert_pass(pid, tmp_path / "prog.log", "counter")


def test_snapshot_limit(bins, procs, tmp_path, agent_dir):
    """An agent started with LCR_MAX_SNAPSHOTS=1 refuses the second (14)."""
    pid = _start(procs, bins["counter"], tmp_path)
    env = _env(agent_dir, LCR_MAX_SNAPSHOTS="1")
    _snapshot(pid, env)
    cp = lcr("snapshot", pid, check=False, env=env)
    assert_clean_error(cp, "SnapshotLimit", mentions=["LCR_MAX_SNAPSHOTS"], empty_stdout=True)
    helpers.assert_pass(pid, tmp_path / "prog.log", "counter")


def test_agent_error(bins, procs, tmp_path, agent_dir):
    """LCR_AGENT_DIR is another user's directory: the agent cannot be
    started there (13), and nothing of it is used."""
    pid = _start(procs, bins["counter"], tmp_path)
    agent_dir.mkdir(mode=0o700)
    os.chown(agent_dir, 1001, 1001)          # lcrtest (tests run as root)
    cp = lcr("snapshot", pid, check=False, env=_env(agent_dir))
    assert_clean_error(cp, "AgentError", mentions=[str(agent_dir)], empty_stdout=True)
    assert os.listdir(agent_dir) == []


NO_TRACKER = """
import os, sys
from linuxcr.agent.client import Client
from linuxcr.errors import LcrError
pid = int(sys.argv[1])
start = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])
try:
    with Client() as c:
        c.call_fds("tracker_take", pid=pid, starttime=start, with_written=False)
except LcrError as e:
    print(f"{type(e).__name__} {e.exit_code} {e}")
"""


def test_no_tracker(bins, procs, tmp_path, agent_dir):
    """NoTracker (13) never reaches the CLI (take_tracker reads it as "no
    tracker"): asked of the agent itself, about a process it tracks nothing of."""
    pid = _start(procs, bins["counter"], tmp_path)
    cp = subprocess.run([sys.executable, "-c", NO_TRACKER, str(pid)], capture_output=True,
                        text=True, env=_env(agent_dir), timeout=helpers.LCR_TIMEOUT)
    assert cp.stdout.startswith(f"NoTracker {helpers.error_exit_code('NoTracker')} "
                                f"no tracker for pid {pid}"), (cp.stdout, cp.stderr)


ROLLED_BACK = """
from linuxcr import api
from linuxcr.errors import RolledBack
entered = 0
try:
    with api.transaction() as t:
        entered += 1
        t.rollback("asked")
except RolledBack as e:
    print(f"RolledBack {e.exit_code} entered={entered} {e}")
"""


def test_rolled_back(tmp_path, agent_dir):
    """API transaction(): the process comes back from its rollback as
    RolledBack (15), with the body's effects undone."""
    cp = subprocess.run([sys.executable, "-c", ROLLED_BACK], capture_output=True, text=True,
                        env=_env(agent_dir), timeout=helpers.LCR_TIMEOUT)
    assert cp.returncode == 0, cp.stderr
    want = helpers.error_exit_code("RolledBack")
    assert cp.stdout.startswith(f"RolledBack {want} entered=0 rolled back to snapshot"), \
        (cp.stdout, cp.stderr)
    assert "asked" in cp.stdout
