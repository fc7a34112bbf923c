"""Rollback gives back what `lcr restart` gives back of a task's identity
(resources/finish.py, steps misc, fs, threads): name of the process and of
each thread, personality, process group, working directory (also inside a
chroot), umask, robust list, clear_child_tid, the mm fields a program may
set with PR_SET_MM_MAP (setproctitle: /proc/PID/cmdline) and (as root)
securebits; on
the fast and the full path.  It refuses, before any change, what it cannot
give back: a session left (setsid), namespaces left (unshare), a new root
directory (chroot), securebits locked since.  File locks (flock, POSIX,
OFD) come back as at the snapshot; one another owner took since refuses."""
from __future__ import annotations

import fcntl
import os
import re
import signal

import pytest

from helpers import READY_TIMEOUT, log_size, wait_for_line
from linuxcr import agent
from linuxcr.errors import NotCheckpointable, RollbackRefused
from linuxcr.resources import locks
from test_snapshots import agent_env  # noqa: F401  (fixture)

pytestmark = [pytest.mark.e2e]


def _start(bins, procs, tmp_path, *args, cwd=None):
    log = tmp_path / "roll_ident.log"
    work = cwd or tmp_path / "work"
    os.makedirs(work, exist_ok=True)
    p = procs.start([bins["roll_ident"], *args], log, cwd=work)
    m = wait_for_line(log, r"^READY pid=(\d+) pgid=(\d+)", READY_TIMEOUT, pid=p.pid)
    return procs.add(int(m.group(1))), log


def _signal(pid, log, sig, pattern):
    start = log_size(log)
    os.kill(pid, sig)
    return wait_for_line(log, pattern, READY_TIMEOUT, start=start, pid=pid)


def _probe(pid, log) -> str:
    m = _signal(pid, log, signal.SIGUSR1, r"^(PASS|FAIL) roll_ident.*")
    return m.group(0)


def _seen(pid: int) -> dict:
    """The task's state as lcr sees it from outside."""
    def read(path):
        with open(f"/proc/{pid}/{path}") as f:
            return f.read().strip()
    threads = sorted(read(f"task/{t}/comm") for t in os.listdir(f"/proc/{pid}/task"))
    return dict(comm=read("comm"), threads=threads, cmdline=read("cmdline"), personality=read("personality"),
                pgid=os.getpgid(pid), cwd=os.readlink(f"/proc/{pid}/cwd"),
                umask=re.search(r"Umask:\s+(\d+)", read("status")).group(1))


def _snapshot(pid):
    try:
        return agent.snapshot(pid)
    except NotCheckpointable as e:
        if "undo" in str(e):      # other tests' semaphore sets: threads look like SEM_UNDO users
            pytest.skip(f"snapshot refused for a reason of other tests: {e}")
        raise


@pytest.mark.parametrize("full", [False, True], ids=["fast", "full"])
def test_rollback_gives_identity_back(bins, procs, tmp_path, agent_env, full):  # noqa: F811
    pid, log = _start(bins, procs, tmp_path, "-t")
    before = _seen(pid)
    assert "worker" in before["threads"], before
    snap = _snapshot(pid)
    _signal(pid, log, signal.SIGUSR2, r"^CHANGED pid=")
    changed = _seen(pid)
    for k in before:
        assert changed[k] != before[k], (k, changed, before)
    res = agent.rollback(snap.crid, full=full)
    assert res["path"] == ("full" if full else "fast"), res
    assert _seen(pid) == before, (res.get("warnings"),)
    assert _probe(pid, log).startswith("PASS"), res.get("warnings")
    snap.discard()


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs CAP_SYS_CHROOT")
def test_rollback_cwd_inside_a_chroot(bins, procs, tmp_path, agent_env):  # noqa: F811
    """The saved cwd is a path as lcr sees it: inside the chroot the task
    enters it without the root in front."""
    root = tmp_path / "root"
    os.makedirs(root / "sub")
    os.chmod(tmp_path, 0o755)
    pid, log = _start(bins, procs, tmp_path, "-c", str(root))
    before = _seen(pid)
    assert before["cwd"] == str(root / "sub"), before
    snap = _snapshot(pid)
    _signal(pid, log, signal.SIGUSR2, r"^CHANGED pid=")
    assert _seen(pid)["cwd"] == str(root), _seen(pid)
    res = agent.rollback(snap.crid)
    assert not [w for w in res["warnings"] if "working directory" in w], res["warnings"]
    assert _seen(pid) == before, res["warnings"]
    assert _probe(pid, log).startswith("PASS"), res["warnings"]
    snap.discard()


REFUSED = [
    (signal.SIGHUP, r"^SETSID pid=\d+ r=(-?\d+)", r"session \(\d+ now"),
    (signal.SIGWINCH, r"^UNSHARE pid=\d+ r=(-?\d+)", r"namespaces uts \(left since"),
    (signal.SIGPWR, r"^CHROOT pid=\d+ r=(-?\d+)", r"root directory \(chroot since"),
    (signal.SIGTTIN, r"^LOCKED pid=\d+ r=(-?\d+)", r"securebits \(0xc now, 0x0 .* locked since"),
]


@pytest.mark.parametrize("sig,said,why", REFUSED, ids=["setsid", "unshare", "chroot", "securebits"])
def test_refused_when_it_cannot_be_given_back(bins, procs, tmp_path, agent_env, sig, said, why):  # noqa: F811
    if sig != signal.SIGHUP and os.geteuid() != 0:
        pytest.skip("needs root")
    pid, log = _start(bins, procs, tmp_path)
    snap = _snapshot(pid)
    m = _signal(pid, log, sig, said)
    assert m.group(1) == "0", m.group(0)
    seen = _seen(pid)
    with pytest.raises(RollbackRefused) as ei:
        agent.rollback(snap.crid)
    assert re.search(why, str(ei.value)), str(ei.value)
    assert _seen(pid) == seen                       # untouched
    _probe(pid, log)                                # and running
    snap.discard()


def _start_locks(bins, procs, tmp_path):
    log, d = tmp_path / "roll_locks.log", tmp_path / "locks"
    d.mkdir()
    p = procs.start([bins["roll_locks"], d], log)
    wait_for_line(log, r"^READY pid=", READY_TIMEOUT, pid=p.pid)
    return p.pid, log, d


def _lockset(pid_or_locks) -> set:
    got = locks.dump(pid_or_locks) if isinstance(pid_or_locks, int) else pid_or_locks
    return {(lk.fd, lk.kind, lk.write, lk.start, lk.length) for lk in got}


def _locks_probe(pid, log) -> str:
    return _signal(pid, log, signal.SIGUSR1, r"^(PASS|FAIL) roll_locks.*").group(0)


@pytest.mark.parametrize("full", [False, True], ids=["fast", "full"])
def test_rollback_gives_locks_back(bins, procs, tmp_path, agent_env, full):  # noqa: F811
    """flock, POSIX and OFD locks: those taken since released, those
    released since taken again, one converted since as it was."""
    pid, log, _d = _start_locks(bins, procs, tmp_path)
    before = locks.dump(pid)
    assert {lk.kind for lk in before} == {"flock", "posix", "ofd"}, before
    snap = agent.snapshot(pid)
    _signal(pid, log, signal.SIGUSR2, r"^CHANGED pid=")
    assert _locks_probe(pid, log).startswith("FAIL")
    res = agent.rollback(snap.crid, full=full)
    assert _lockset(pid) == _lockset(before), res["warnings"]
    assert _locks_probe(pid, log).startswith("PASS"), res["warnings"]
    snap.discard()


def test_lock_held_by_another_now_refuses(bins, procs, tmp_path, agent_env):  # noqa: F811
    """A lock released since and taken by another owner: refused, untouched;
    once the other lets go, the rollback takes it back."""
    pid, log, d = _start_locks(bins, procs, tmp_path)
    snap = agent.snapshot(pid)
    _signal(pid, log, signal.SIGUSR2, r"^CHANGED pid=")
    held = locks.dump(pid)
    fd = os.open(d / "a", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RollbackRefused) as ei:
            agent.rollback(snap.crid)
        assert re.search(r"fd \d+: the exclusive flock\(\) lock on .*/a it held at the snapshot "
                         rf"is held by pid {os.getpid()} now", str(ei.value)), str(ei.value)
        assert _lockset(pid) == _lockset(held)          # untouched
    finally:
        os.close(fd)
    res = agent.rollback(snap.crid)
    assert _locks_probe(pid, log).startswith("PASS"), res["warnings"]
    snap.discard()
