"""Failure paths that must leave nothing of lcr behind: SIGTERM/SIGHUP to
`lcr checkpoint` in the middle of a dump (in-process and handed off to the
agent's worker) clean up as ^C does before lcr exits (143/129, one line);
the worker takes the client's umask and resource limits (or refuses, and
the client runs the command itself)."""
from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import helpers
from helpers import lcr
from test_faults import outside
from test_handoff import WORKER, _log, _workers, agent  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e


def _frozen(pid: int) -> bool:
    """In a cgroup v1 freezer cgroup that is not THAWED."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _n, ctrl, path = line.split(":", 2)
        if "freezer" in ctrl.split(","):
            st = Path("/sys/fs/cgroup/freezer") / path.lstrip("/") / "freezer.state"
            try:
                return st.read_text().strip() != "THAWED"
            except OSError:
                return False
    return False


def _blocked(env: dict, pid: int, cwd: Path) -> subprocess.Popen:
    """`lcr checkpoint PID -o -` into a pipe nobody reads: it blocks with the
    target held (seized, stopped, our pipe written to)."""
    p = subprocess.Popen([*helpers.LCR, "checkpoint", str(pid), "-o", "-"], env=env, cwd=cwd,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + helpers.LCR_TIMEOUT
    while (helpers.proc_status(pid) or {}).get("TracerPid", "0") == "0":
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "lcr never seized the target"
        time.sleep(0.01)
    time.sleep(0.5)           # into the image's writes (blocked on the full pipe)
    return p


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
@pytest.mark.parametrize("via", ["agent", "no-agent"])
def test_signal_mid_dump_leaves_target_untouched(via, sig, request, procs, bins, tmp_path):
    if via == "agent":
        d, env = request.getfixturevalue("agent")
    else:
        d, env = None, helpers.child_env({"LCR_NO_AGENT": "1"})
    r = helpers.start_memhog(procs, bins, tmp_path, 256)
    before = outside(r.pid)
    p = _blocked(env, r.pid, tmp_path)
    try:
        if d is not None:
            assert _workers(d) == 1, _log(d)
        assert helpers.proc_state(r.pid) in ("t", "T"), "the target is not held by lcr"
        p.send_signal(sig)
        _out, err = p.communicate(timeout=helpers.LCR_TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = err.decode()
    assert p.returncode == 128 + sig, (p.returncode, err)
    assert err == f"lcr: terminated by {signal.Signals(sig).name}\n", err
    # at once, not after a guardian put it back: lcr cleaned up before it exited
    st = helpers.proc_status(r.pid)
    assert st is not None and st["State"][:1] not in ("t", "T", "Z", "X"), st
    assert st["TracerPid"] == "0", st
    assert not _frozen(r.pid)
    now = outside(r.pid)
    assert now.maps == before.maps, f"mappings changed: {set(now.maps) ^ set(before.maps)}"
    assert now.fds == before.fds, f"fds changed: {before.fds} -> {now.fds}"
    assert now.sigblk == before.sigblk
    h = helpers.probe_hog(r.pid, r.log)
    assert h.ok, h.line


def test_worker_takes_the_client_umask(agent, procs, bins, tmp_path):
    """--interval makes its directory: its mode follows the umask of the
    lcr the user ran, handed off or not."""
    d, env = agent
    r = helpers.start_memhog(procs, bins, tmp_path, 4)
    modes = {}
    for how, extra in (("agent", {}), ("here", {"LCR_NO_AGENT": "1"})):
        out = tmp_path / f"dir-{how}"
        cp = subprocess.run([*helpers.LCR, "checkpoint", str(r.pid), "-o", str(out), "--interval",
                             "1s", "--count", "1"], env={**env, **extra}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=helpers.LCR_TIMEOUT,
                            preexec_fn=lambda: os.umask(0o027))
        assert cp.returncode == 0, cp.stderr
        modes[how] = out.stat().st_mode & 0o777
    assert _workers(d) == 1, _log(d)
    assert modes == {"agent": 0o750, "here": 0o750}, {k: oct(v) for k, v in modes.items()}
    helpers.assert_running_untraced(r.pid)


def _fsize(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_worker_takes_the_client_limits(agent, procs, bins, tmp_path):
    """A file size limit of the client (1 MiB) binds the image the worker
    writes, as it does in-process: the same error both ways."""
    d, env = agent
    r = helpers.start_memhog(procs, bins, tmp_path, 16)
    res = {}
    for how, extra in (("agent", {}), ("here", {"LCR_NO_AGENT": "1"})):
        (tmp_path / how).mkdir()
        res[how] = subprocess.run([*helpers.LCR, "checkpoint", str(r.pid), "-o", "a.img",
                                   "--leave-running"], env={**env, **extra}, cwd=tmp_path / how,
                                  capture_output=True, text=True, timeout=helpers.LCR_TIMEOUT,
                                  preexec_fn=_fsize(1 << 20))
    assert _workers(d) == 1, _log(d)
    assert res["agent"].returncode == res["here"].returncode == 7, res
    assert res["agent"].stderr == res["here"].stderr and "too large" in res["agent"].stderr, res
    assert not (tmp_path / "agent" / "a.img").exists()
    helpers.assert_running_untraced(r.pid)


def _cap_sys_resource() -> bool:
    m = re.search(r"^CapEff:\s*(\S+)", Path("/proc/self/status").read_text(), re.M)
    return bool(int(m.group(1), 16) >> 24 & 1)


def test_limit_above_the_agents_runs_in_process(procs, bins, tmp_path):
    """An agent started under a lower hard limit cannot give its worker the
    client's: it refuses and the client runs the checkpoint itself (before:
    the worker wrote under the agent's 1 MiB file size limit and failed)."""
    if _cap_sys_resource():
        pytest.skip("with CAP_SYS_RESOURCE the worker can raise its hard limit")
    d = Path(tempfile.mkdtemp(prefix="lcr-failsafe-"))
    env = helpers.child_env({"LCR_AGENT_DIR": str(d)})
    env.pop("LCR_NO_AGENT", None)
    subprocess.run([*helpers.LCR, "agent"], env=env, check=True, timeout=helpers.LCR_TIMEOUT,
                   capture_output=True, preexec_fn=_fsize(1 << 20))
    agent_pid = None
    try:
        deadline = time.monotonic() + helpers.LCR_TIMEOUT
        while not (d / "agent.sock").exists() or "serving" not in _log(d):
            assert time.monotonic() < deadline, f"the agent did not start: {_log(d)}"
            time.sleep(0.02)
        agent_pid = int((d / "agent.pid").read_text())
        r = helpers.start_memhog(procs, bins, tmp_path, 16)
        cp = lcr("checkpoint", r.pid, "-o", "a.img", "--leave-running", env=env, cwd=tmp_path,
                 check=False)
        assert cp.returncode == 0, cp.stderr
        assert (tmp_path / "a.img").stat().st_size > 16 << 20
        helpers.assert_running_untraced(r.pid)
    finally:
        if agent_pid is not None:
            try:
                os.kill(agent_pid, signal.SIGKILL)
            except OSError:
                pass
        subprocess.run(["rm", "-rf", str(d)])


# --- sys/nshelper.py: nothing of a helper outlives a failed start ----------------

def _children() -> set[int]:
    """Our child processes (any state, zombies too)."""
    me, out = os.getpid(), set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == me:
                out.add(int(d))
    return out


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _slow_enter() -> None:
    time.sleep(30)


@pytest.mark.parametrize("how", ["interrupted", "refused", "gone"])
def test_nshelper_start_failure_leaves_nothing(how):
    """The helper is forked, then the start fails: ^C while waiting for its
    answer, its own refusal, or a failure after its answer (the pid's
    namespace unreadable).  Afterwards: no child of ours, no new fd."""
    from linuxcr.sys import nshelper
    kids, fds = _children(), _fds()
    old = signal.getsignal(signal.SIGALRM)

    def interrupt(_s, _f):
        raise KeyboardInterrupt

    try:
        if how == "interrupted":
            signal.signal(signal.SIGALRM, interrupt)
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(KeyboardInterrupt):
                nshelper.NsHelper._start(_slow_enter)
        elif how == "refused":
            def refuse() -> None:
                raise PermissionError(1, "no")
            with pytest.raises(OSError, match="cannot enter the network namespace"):
                nshelper.NsHelper._start(refuse)
        else:
            real = nshelper._ino

            def gone(path: str) -> int:
                if "/ns/net" in path and not path.startswith("/proc/self"):
                    raise FileNotFoundError(2, "gone", path)
                return real(path)
            nshelper._ino = gone
            try:
                with pytest.raises(FileNotFoundError):
                    nshelper.NsHelper._start(lambda: None)
            finally:
                nshelper._ino = real
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    left = _children() - kids
    for pid in left:                      # the test's own cleanup, by pid
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
    assert not left, f"helper process(es) left: {left}"
    assert _fds() == fds, f"fds left: {_fds() - fds}"


def test_nshelper_works_and_closes():
    """The normal path still works: a socket made in a fresh network
    namespace; close() reaps the helper."""
    from linuxcr.sys import nshelper
    kids = _children()
    try:
        h = nshelper.NsHelper.fresh(user_ns=True)
    except OSError as e:
        pytest.skip(f"no new network namespace here: {e}")
    with h:
        s = h.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.close()
        assert h.netns != os.stat("/proc/self/ns/net").st_ino
    assert _children() == kids


def test_signal_after_the_image_is_complete_finishes_the_job(procs, bins, tmp_path):
    """SIGTERM once the image is complete and named (lcr held at dump.kill):
    the job is finished -- the target killed, exit 0, a good image -- not
    cut short with the image written and the target left to the guardian."""
    r = helpers.start_memhog(procs, bins, tmp_path, 16)
    env = helpers.child_env({"LCR_FAULT": "dump.kill:stop"})
    img = tmp_path / "a.img"
    p = subprocess.Popen([*helpers.LCR, "checkpoint", str(r.pid), "-o", str(img)], env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        helpers.wait_state(p.pid, "T", timeout=helpers.LCR_TIMEOUT)
        p.send_signal(signal.SIGTERM)
        os.kill(p.pid, signal.SIGCONT)
        _out, err = p.communicate(timeout=helpers.LCR_TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err.decode()
    helpers.reap(r.pid)                   # killed by the dump, as without the signal
    lcr("show", img)
    pid = helpers.restart_image(img, procs)
    assert helpers.probe_hog(pid, r.log).ok


def test_client_killed_mid_dump_worker_puts_target_back(agent, procs, bins, tmp_path):
    """The client of a handed-off checkpoint SIGKILLed mid-dump: the worker
    (blocked writing to a pipe nobody reads) sees its connection close and
    ends as in-process lcr would have: the target running, as it was --
    not held (or, unblocked, killed) for a client that is gone."""
    d, env = agent
    r = helpers.start_memhog(procs, bins, tmp_path, 64)
    before = outside(r.pid)
    p = _blocked(env, r.pid, tmp_path)
    try:
        worker = int(WORKER.findall(_log(d))[-1])
        p.kill()
        p.wait()
        deadline = time.monotonic() + helpers.LCR_TIMEOUT      # a safety bound only
        while helpers.exists(worker) and helpers.proc_state(worker) not in ("Z", "X"):
            assert time.monotonic() < deadline, f"worker {worker} runs on for a dead client"
            time.sleep(0.02)
    finally:
        p.stdout.close()
        p.stderr.close()
    helpers.assert_running_untraced(r.pid)
    now = outside(r.pid)
    assert now.maps == before.maps and now.fds == before.fds
    assert helpers.probe_hog(r.pid, r.log).ok
