"""`lcr checkpoint` handed off to this user's running agent (linuxcr/handoff.py,
linuxcr/agent/worker.py): the same image, messages and exit codes as
in-process; --no-agent / LCR_NO_AGENT; ^C and a killed agent leave the target
running; another uid is refused."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import helpers
from helpers import lcr

WORKER = re.compile(r"worker (\d+): checkpoint")


@pytest.fixture
def agent(tmp_path, request):
    """A running agent of our own (its dir; killed afterwards, by pid);
    indirect parameter: more environment for it."""
    d = Path(tempfile.mkdtemp(prefix="lcr-handoff-"))
    env = helpers.child_env({"LCR_AGENT_DIR": str(d), **getattr(request, "param", {})})
    env.pop("LCR_NO_AGENT", None)
    lcr("agent", env=env)
    deadline = time.monotonic() + 30
    while not (d / "agent.sock").exists() or "serving" not in _log(d):
        assert time.monotonic() < deadline, f"the agent did not start: {_log(d)}"
        time.sleep(0.02)
    pid = int((d / "agent.pid").read_text())
    yield d, env
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    subprocess.run(["rm", "-rf", str(d)])


def _log(d: Path) -> str:
    try:
        return (d / "agent.log").read_text()
    except FileNotFoundError:
        return ""


def _workers(d: Path) -> int:
    return len(WORKER.findall(_log(d)))


def test_same_image_and_restart(agent, procs, bins, tmp_path):
    d, env = agent
    r = helpers.start_memhog(procs, bins, tmp_path, 16)
    img = tmp_path / "a.img"
    cp = lcr("checkpoint", r.pid, "-o", img, "--leave-running", "-v", env=env, cwd=tmp_path)
    assert _workers(d) == 1, _log(d)
    assert img.exists() and "pages" in cp.stdout + cp.stderr
    helpers.assert_running_untraced(r.pid)
    # relative output path: the worker works in our working directory
    lcr("checkpoint", r.pid, "-o", "b.img", env=env, cwd=tmp_path)
    assert _workers(d) == 2 and (tmp_path / "b.img").exists()
    helpers.reap(r.pid)
    pid = helpers.restart_image(tmp_path / "b.img", procs)
    assert helpers.probe_hog(pid, r.log).ok


@pytest.mark.parametrize("case", ["bad_pid", "exists", "usage", "unwritable"])
def test_errors_same_both_ways(agent, procs, bins, tmp_path, case):
    d, env = agent
    r = helpers.start_memhog(procs, bins, tmp_path, 4)
    (tmp_path / "old.img").write_bytes(b"x")
    args = {"bad_pid": ["checkpoint", helpers.free_pid(), "-o", "x.img"],
            "exists": ["checkpoint", r.pid, "-o", "old.img"],
            "usage": ["checkpoint", r.pid, "-o", "y.img", "--low-downtime", "--track"],
            "unwritable": ["checkpoint", r.pid, "-o", "/proc/no/z.img"]}[case]
    via = lcr(*args, env=env, cwd=tmp_path, check=False)
    n = _workers(d)
    assert n == 1, _log(d)
    here = lcr(*args, "--no-agent", env=env, cwd=tmp_path, check=False)
    assert _workers(d) == n
    assert via.returncode == here.returncode != 0
    assert via.stderr == here.stderr and via.stderr.count("\n") == 1, (via.stderr, here.stderr)
    helpers.assert_running_untraced(r.pid)


def test_no_agent_flag_and_env(agent, procs, bins, tmp_path):
    d, env = agent
    r = helpers.start_memhog(procs, bins, tmp_path, 4)
    lcr("checkpoint", r.pid, "-o", "a.img", "--leave-running", "--no-agent", env=env, cwd=tmp_path)
    lcr("checkpoint", r.pid, "-o", "b.img", "--leave-running", env={**env, "LCR_NO_AGENT": "1"},
        cwd=tmp_path)
    assert _workers(d) == 0, _log(d)
    assert (tmp_path / "a.img").exists() and (tmp_path / "b.img").exists()


def test_no_agent_running_runs_here(procs, bins, tmp_path):
    d = tmp_path / "none"
    env = helpers.child_env({"LCR_AGENT_DIR": str(d)})
    r = helpers.start_memhog(procs, bins, tmp_path, 4)
    lcr("checkpoint", r.pid, "-o", "a.img", "--leave-running", env=env, cwd=tmp_path)
    assert (tmp_path / "a.img").exists() and not (d / "agent.sock").exists()


def _blocked_checkpoint(d, env, pid, tmp_path, prefix=()):
    """A handed-off checkpoint writing to a pipe nobody reads: the worker
    blocks with the target frozen.  (client Popen, worker pid)"""
    p = subprocess.Popen([*prefix, *helpers.LCR, "checkpoint", str(pid), "-o", "-"], env=env, cwd=tmp_path,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        m = WORKER.search(_log(d))
        st = helpers.proc_status(pid)
        if m and st and st["TracerPid"] != "0":
            break
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, _log(d)
        time.sleep(0.02)
    time.sleep(0.3)           # into the image's writes (blocked on the full pipe)
    return p, int(m.group(1))


def test_ctrl_c_forwarded(agent, procs, bins, tmp_path):
    d, env = agent
    r = helpers.start_memhog(procs, bins, tmp_path, 64)
    p, worker = _blocked_checkpoint(d, env, r.pid, tmp_path)
    try:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        err = err.decode()
        assert p.returncode == 130, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert err.strip() == "lcr: interrupted", err
    helpers.assert_running_untraced(r.pid)
    assert helpers.probe_hog(r.pid, r.log).ok


def test_worker_takes_client_scheduling(agent, procs, bins, tmp_path):
    """`nice`, `ionice`, `taskset` and `choom` on the command hold for the
    worker that does the checkpoint, as they would in-process."""
    from linuxcr.sys.syscalls import ioprio_get
    d, env = agent
    r = helpers.start_memhog(procs, bins, tmp_path, 64)
    cpu = max(os.sched_getaffinity(0))
    prefix = ["nice", "-n", "7", "ionice", "-c3", "taskset", "-c", str(cpu)]
    p, worker = _blocked_checkpoint(d, env, r.pid, tmp_path, prefix)
    try:
        got = dict(nice=os.getpriority(os.PRIO_PROCESS, worker), ioprio=ioprio_get(worker),
                   cpus=os.sched_getaffinity(worker))
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0 and len(out) > 64 << 20, err
    assert got["ioprio"] >> 13 == 3, got      # idle (ionice may give a level too)
    assert got == dict(nice=7, ioprio=got["ioprio"], cpus={cpu}), got
    assert os.getpriority(os.PRIO_PROCESS, int((d / "agent.pid").read_text())) == 0
    # a higher oom_score_adj: the worker's too, so the same refusal as in-process
    # where lcr may not lower the target's back (without CAP_SYS_RESOURCE), or
    # the same success where it may
    n = _workers(d)
    r = helpers.start_memhog(procs, bins, tmp_path, 4)     # the first one was checkpointed
    args = ["choom", "-n", "200", "--", *helpers.LCR, "checkpoint", str(r.pid), "-o"]
    via = subprocess.run([*args, "a.img", "--leave-running"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert _workers(d) == n + 1, _log(d)
    here = subprocess.run([*args, "b.img", "--leave-running", "--no-agent"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (via.returncode, via.stderr) == (here.returncode, here.stderr), (via, here)
    helpers.assert_running_untraced(r.pid)


def test_chrooted_client_not_served(tmp_path):
    """A client in another root directory resolves paths elsewhere: its
    context differs from the agent's (worker._context), so it runs in-process."""
    from linuxcr.agent.worker import _context
    kids = []
    for root in (None, tmp_path):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                if root is not None:
                    os.chroot(root)
                os.write(w, b"x")
                time.sleep(60)
            finally:
                os._exit(0)
        kids.append(pid)
        os.close(w)
        assert os.read(r, 1) == b"x"
        os.close(r)
    try:
        assert _context(kids[0]) == _context("self")
        assert _context(kids[1]) != _context("self")
    finally:
        for pid in kids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_agent_killed_mid_checkpoint(agent, procs, bins, tmp_path):
    d, env = agent
    r = helpers.start_memhog(procs, bins, tmp_path, 64)
    p, worker = _blocked_checkpoint(d, env, r.pid, tmp_path)
    try:
        os.kill(int((d / "agent.pid").read_text()), signal.SIGKILL)
        _, err = p.communicate(timeout=60)
        err, rc = err.decode(), p.returncode
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == 130 and err.strip().endswith("lcr: interrupted"), (rc, err)
    deadline = time.monotonic() + 30
    while helpers.exists(worker) and helpers.proc_state(worker) not in ("Z", "X"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    helpers.assert_running_untraced(r.pid)
    assert helpers.probe_hog(r.pid, r.log).ok


@pytest.mark.parametrize("agent", [{"LCR_AGENT_IDLE": "4"}], indirect=True)
def test_worker_keeps_agent_from_idle_exit(agent, procs, bins, tmp_path):
    d, env = agent
    r = helpers.start_memhog(procs, bins, tmp_path, 64)
    p, worker = _blocked_checkpoint(d, env, r.pid, tmp_path)
    try:
        time.sleep(6)                 # idle limit 4 s, but a worker runs
        assert "idle: exiting" not in _log(d)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert len(out) > 64 << 20
    deadline = time.monotonic() + 30
    while "idle: exiting" not in _log(d):      # and then it does exit
        assert time.monotonic() < deadline, _log(d)
        time.sleep(0.05)


REQUEST = """
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
req = {"op": "run", "argv": ["lcr", "checkpoint", sys.argv[2], "-o", "/tmp/never.img"],
       "env": dict(os.environ)}
cwd = os.open("/", os.O_PATH)
socket.send_fds(s, [(json.dumps(req) + "\\n").encode()], [0, 1, 2, cwd])
print(s.makefile().readline().strip())
"""


def test_other_uid_refused(agent, procs, bins, tmp_path):
    d, env = agent
    r = helpers.start_memhog(procs, bins, tmp_path, 4)
    os.chmod(d, 0o711)
    os.chmod(d / "agent.sock", 0o666)
    cp = subprocess.run([*helpers.as_user(65534), sys.executable, "-I", "-c", REQUEST,
                         str(d / "agent.sock"), str(r.pid)],
                        capture_output=True, text=True, timeout=60, cwd="/")
    assert cp.returncode == 0, cp.stderr
    reply = json.loads(cp.stdout)
    assert reply["ok"] is False and reply["class"] == "PermissionDenied", reply
    assert _workers(d) == 0
    helpers.assert_running_untraced(r.pid)


def test_other_capabilities_run_in_process(agent, procs, bins, tmp_path):
    """Same uid, fewer capabilities (bounding set): not handed off."""
    d, env = agent
    r = helpers.start_memhog(procs, bins, tmp_path, 4)
    cp = subprocess.run(["setpriv", "--bounding-set=-net_raw", *helpers.LCR, "checkpoint",
                         str(r.pid), "-o", "a.img", "--leave-running"], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert _workers(d) == 0, _log(d)
    assert (tmp_path / "a.img").exists()


def test_other_code_refused(agent, procs, bins, tmp_path):
    """A client of another lcr (package dir or interpreter): refused, so it
    runs its own code in-process."""
    d, env = agent
    r = helpers.start_memhog(procs, bins, tmp_path, 4)
    cp = subprocess.run([sys.executable, "-I", "-c", REQUEST, str(d / "agent.sock"), str(r.pid)],
                        capture_output=True, text=True, timeout=60, cwd="/")
    assert cp.returncode == 0, cp.stderr
    reply = json.loads(cp.stdout)
    assert reply["ok"] is False and reply["class"] == "AgentError", reply
    assert "other code" in reply["error"]
    assert _workers(d) == 0


RESTART_WORKER = re.compile(r"worker (\d+): restart")


def test_restart_handed_off(agent, procs, bins, tmp_path):
    """`lcr restart` runs in the agent's worker: the same restored process
    (its memory checksum), the pid printed on our stdout, and the same
    message and exit code for an image that cannot be restarted."""
    d, env = agent
    r = helpers.start_memhog(procs, bins, tmp_path, 16)
    img = tmp_path / "a.img"
    lcr("checkpoint", r.pid, "-o", img, env=env, cwd=tmp_path)
    helpers.reap(r.pid)
    cp = lcr("restart", "a.img", env=env, cwd=tmp_path, check=False)
    if cp.returncode == 0:
        procs.add(helpers.parse_restored_pid(cp.stdout))
    assert cp.returncode == 0, cp.stderr
    assert len(RESTART_WORKER.findall(_log(d))) == 1, _log(d)
    pid = helpers.parse_restored_pid(cp.stdout)
    assert pid == r.pid and helpers.probe_hog(pid, r.log).ok
    # the pid is in use now: the same refusal both ways
    there = lcr("restart", "a.img", env=env, cwd=tmp_path, check=False)
    here = lcr("restart", "a.img", "--no-agent", env=env, cwd=tmp_path, check=False)
    assert len(RESTART_WORKER.findall(_log(d))) == 2, _log(d)
    assert there.returncode == here.returncode != 0
    assert there.stderr == here.stderr and "in use" in there.stderr


@pytest.mark.parametrize("argv,handed", [
    (["lcr", "restart", "a.img"], True),
    (["lcr", "restart", "-", "--fd", "1=&1"], True),
    (["lcr", "restart", "a.img", "--wait"], False),
    (["lcr", "restart", "a.img", "--shell-job"], False),
    (["lcr", "restart", "a.img", "--fd", "3=&5"], False),
    (["lcr", "restart", "a.img", "--fd=3=&7"], False),
    (["lcr", "restart", "a.img", "--fd", "3=out.log"], True),
    (["lcr", "show", "a.img"], False),
])
def test_restart_handoff_wanted(argv, handed, monkeypatch):
    from linuxcr import handoff
    monkeypatch.delenv("LCR_NO_AGENT", raising=False)
    monkeypatch.delenv("LCR_FAULT", raising=False)
    assert handoff.wanted(argv) is handed
