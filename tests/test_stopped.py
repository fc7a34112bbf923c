"""Stopped processes (SIGSTOP, ^Z): checkpointed as stopped and restarted
stopped; left stopped by --leave-running, --low-downtime, `lcr check`,
snapshot and rollback, with no stop or continue report to their parent
(the test process is the parent: os.waitid WNOWAIT sees any); a process
held by another tracer refused with that tracer's pid; lcr SIGKILLed in
the middle leaves it stopped (the guardian sends no SIGCONT)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

import helpers
from helpers import (lcr, log_size, pass_field, probe, read_log, reap, restart_image,
                     start_prog, wait_for_line, wait_state)
from test_faults import SETTLE, lcr_fault

pytestmark = pytest.mark.e2e
COUNT = r"^(PASS|FAIL) counter\b"


@pytest.fixture
def agent_env(tmp_path, monkeypatch):
    d = tmp_path / "agent"
    monkeypatch.setenv("LCR_AGENT_DIR", str(d))
    env = helpers.child_env({"LCR_AGENT_DIR": str(d)})
    yield env
    try:
        os.kill(int((d / "agent.pid").read_text()), signal.SIGKILL)
    except (OSError, ValueError):
        pass


def _stopped_counter(procs, bins, tmp_path, sig=signal.SIGSTOP):
    """A counter (our child), probed, then stopped by ``sig``; its stop
    report consumed.  (running, count at the stop)

    SIGTSTP stops only a process group that is not orphaned (the kernel
    drops it there): that counter is a job of our session, as in a shell."""
    if sig == signal.SIGSTOP:
        r = start_prog(procs, "counter", bins, tmp_path)
    else:
        log = tmp_path / "counter.log"
        with open(log, "ab") as f:
            p = subprocess.Popen([bins["counter"]], stdin=subprocess.DEVNULL, stdout=f,
                                 stderr=subprocess.STDOUT, process_group=0, close_fds=True,
                                 env=helpers.child_env())
        procs.add(p.pid)
        wait_for_line(log, rf"^READY pid={p.pid}\b", pid=p.pid)
        r = helpers.Running(p.pid, log, helpers.PROGRAMS["counter"], p)
    count = pass_field(r.assert_pass(), "count")
    os.kill(r.pid, sig)
    wait_state(r.pid, "T")
    info = os.waitid(os.P_PID, r.pid, os.WSTOPPED | os.WNOHANG)
    assert info.si_code == os.CLD_STOPPED and info.si_status == sig
    return r, count


def _no_report(pid: int) -> None:
    """Nothing new for the parent: no CLD_STOPPED, no CLD_CONTINUED."""
    got = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WCONTINUED | os.WNOHANG | os.WNOWAIT)
    assert got is None, f"pid {pid}'s parent got a report lcr caused: {got}"


def _stays_stopped(pid: int) -> None:
    assert helpers.proc_state(pid) == "T"
    assert helpers.proc_status(pid)["TracerPid"] == "0"
    _no_report(pid)


def _wait_let_go(pid: int) -> None:
    """The guardian has put it back and let it go: stopped, untraced."""
    deadline = time.monotonic() + SETTLE
    while helpers.proc_state(pid) != "T" or helpers.proc_status(pid)["TracerPid"] != "0":
        assert time.monotonic() < deadline, f"pid {pid} still held: {helpers.proc_status(pid)}"
        time.sleep(0.02)


def _continue_counts_on(pid: int, log, count: int) -> None:
    """SIGCONT: it runs again from where it was (a stopped process answers no probe)."""
    start = log_size(log)
    os.kill(pid, signal.SIGCONT)
    m = probe(pid, log, COUNT)
    assert m.group(1) == "PASS", m.string
    assert pass_field(m, "count") >= count, "counted back"
    assert read_log(log, start).count("PASS counter") == 1


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGTSTP], ids=["SIGSTOP", "SIGTSTP"])
def test_stopped_checkpoint_restart(sig, bins, procs, tmp_path):
    r, count = _stopped_counter(procs, bins, tmp_path, sig)
    img = tmp_path / "img"
    lcr("checkpoint", r.pid, "-o", img)
    reap(r.pid)
    shown = lcr("show", img).stdout
    assert f"stopped ({signal.Signals(sig).name})" in shown, shown
    cp = lcr("restart", img, check=False)
    assert cp.returncode == 0, cp.stderr
    new = procs.add(helpers.parse_restored_pid(cp.stdout))
    assert new == r.pid
    assert helpers.proc_state(new) == "T", "restored running"
    # the parent (lcr, then us: the subreaper) is told it is stopped
    info = os.waitid(os.P_PID, new, os.WSTOPPED | os.WNOHANG)
    assert info is not None and info.si_code == os.CLD_STOPPED
    if info.si_status != sig:
        # SIGTSTP cannot stop an orphaned process group: SIGSTOP, said so
        assert sig != signal.SIGSTOP and info.si_status == signal.SIGSTOP
        assert re.search(rf"warning: pid {r.pid}: restored stopped by SIGSTOP, not SIGTSTP",
                         cp.stderr), cp.stderr
    _continue_counts_on(new, r.log, count)


MODES = {
    "check": ["check"],
    "leave-running": ["checkpoint", "--leave-running", "-o", "{img}"],
    "track": ["checkpoint", "--leave-running", "--track", "-o", "{img}"],
    "low-downtime": ["checkpoint", "--leave-running", "--low-downtime", "-o", "{img}"],
    "snapshot": ["snapshot"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_stays_stopped(mode, bins, procs, tmp_path, agent_env):
    r, count = _stopped_counter(procs, bins, tmp_path)
    args = [a.format(img=tmp_path / "img") for a in MODES[mode]]
    cp = lcr(*args, r.pid, env=agent_env, check=False)
    assert cp.returncode == 0, cp.stderr
    _stays_stopped(r.pid)
    if mode != "check" and mode != "snapshot":
        assert "stopped (SIGSTOP)" in lcr("show", tmp_path / "img").stdout
    _continue_counts_on(r.pid, r.log, count)


def test_snapshot_rollback_stopped(bins, procs, tmp_path, agent_env):
    """Snapshot of a running counter, rollback once it is stopped: it stays
    stopped (a rollback keeps the job-control state it finds); after SIGCONT
    it counts from the snapshot."""
    r = start_prog(procs, "counter", bins, tmp_path)
    crid = lcr("snapshot", r.pid, env=agent_env).stdout.strip()
    at_snap = later = pass_field(r.assert_pass(), "count")
    while later < at_snap + 300:                 # well past the snapshot
        later = pass_field(r.assert_pass(), "count")
    os.kill(r.pid, signal.SIGSTOP)
    wait_state(r.pid, "T")
    assert os.waitid(os.P_PID, r.pid, os.WSTOPPED | os.WNOHANG) is not None
    lcr("rollback", crid, env=agent_env)
    _stays_stopped(r.pid)
    os.kill(r.pid, signal.SIGCONT)
    assert pass_field(r.assert_pass(), "count") < later, "not rolled back"


def _pair(procs, bins, tmp_path):
    log = tmp_path / "pair.log"
    p = procs.start([bins["stop_pair"]], log)
    m = wait_for_line(log, r"^READY pid=(\d+) child=(\d+)", pid=p.pid)
    child = procs.add(int(m.group(2)))
    count = pass_field(probe(child, log, r"^PASS stop_child"), "count")
    os.kill(child, signal.SIGSTOP)
    wait_for_line(log, r"^CHILD stopped sig=19 n=1$", pid=p.pid)
    return p, child, log, count


def test_stopped_child_leave_running(bins, procs, tmp_path):
    p, child, log, _count = _pair(procs, bins, tmp_path)
    lcr("checkpoint", p.pid, "-o", tmp_path / "img", "--leave-running")
    wait_state(child, "T")
    assert helpers.proc_status(child)["TracerPid"] == "0"
    m = probe(p.pid, log, r"^PASS stop_pair pid=\d+ reports=(\d+)")
    assert m.group(1) == "1", read_log(log)       # no report lcr caused


def test_stopped_child_restart(bins, procs, tmp_path):
    p, child, log, count = _pair(procs, bins, tmp_path)
    img = tmp_path / "img"
    lcr("checkpoint", p.pid, "-o", img)
    reap(p.pid)
    reap(child)
    start = log_size(log)
    root = restart_image(img, procs)
    procs.add(child)
    assert helpers.proc_state(child) == "T"
    # the restored parent is told its child is stopped
    wait_for_line(log, r"^CHILD stopped sig=19 n=2$", start=start, pid=root)
    os.kill(child, signal.SIGCONT)
    wait_for_line(log, r"^CHILD continued n=3$", start=start, pid=root)
    assert pass_field(probe(child, log, r"^PASS stop_child"), "count") >= count


def test_traced_stopped_process_refused(bins, procs, tmp_path, agent_env):
    """Held by a debugger (progs/tracer.c, which leaves group-stops in
    place): check, checkpoint and snapshot refuse in one line naming the
    tracer; the process stays stopped and traced by it."""
    r, count = _stopped_counter(procs, bins, tmp_path)
    log = tmp_path / "tracer.log"
    tracer = procs.start([bins["tracer"], r.pid], log)
    wait_for_line(log, rf"^READY pid={tracer.pid} tracee={r.pid}\b", pid=tracer.pid)
    for args in (["check"], ["checkpoint", "-o", tmp_path / "img"], ["snapshot"]):
        cp = lcr(*args, r.pid, env=agent_env, check=False)
        assert cp.returncode == 10, cp.stderr
        lines = cp.stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in cp.stderr, cp.stderr
        assert f"pid {r.pid} is already traced by pid {tracer.pid} (tracer)" in lines[0]
        assert helpers.proc_status(r.pid)["TracerPid"] == str(tracer.pid)
        assert helpers.proc_state(r.pid) in ("t", "T")
    assert not (tmp_path / "img").exists()
    helpers.kill_and_reap(tracer.pid)
    wait_state(r.pid, "T")
    _continue_counts_on(r.pid, r.log, count)


@pytest.mark.parametrize("point", ["inject.exit@2", "inject.rest@4", "dump.collected"])
def test_lcr_killed_leaves_it_stopped(point, bins, procs, tmp_path):
    """lcr SIGKILLed while it injects into a stopped process: the guardian
    puts it back, stopped (no SIGCONT), and its parent hears nothing."""
    r, count = _stopped_counter(procs, bins, tmp_path)
    cp = lcr_fault(point, "checkpoint", r.pid, "-o", tmp_path / "img")
    assert cp.returncode == -signal.SIGKILL, f"the fault did not fire: {cp.returncode} {cp.stderr}"
    assert "SIGCONT" not in cp.stderr, cp.stderr
    _wait_let_go(r.pid)
    _stays_stopped(r.pid)
    _continue_counts_on(r.pid, r.log, count)
