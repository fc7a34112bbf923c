"""POSIX timers (timer_create) and file locks (flock, POSIX record locks, OFD
locks) across a checkpoint and restart; leases restored.

- posix_timer.c: timers of every notification kind (signal with a pointer
  value, SIGEV_THREAD_ID to a worker thread, SIGEV_NONE, the default) at
  sparse ids; after a restore every id names the same timer (same
  /proc/PID/timers), they tick at their interval with their si_value and
  si_timerid, a pending one-shot fires once;
- flock.c: an flock held through two fds, a shared flock, two POSIX ranges,
  an OFD range (and, as a tree, a child sharing the flock's open file
  description with a POSIX lock of its own); after a restore another
  process finds each lock held by the restored pid;
- a lock someone else holds at restart time fails the restart with one line
  naming the file and the holder, and leaves nothing running;
- a process holding a lease gets it back.

test_*_selfcheck do not use lcr: they prove the programs pass on their own.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import struct
from pathlib import Path

import pytest

from helpers import (Prog, assert_clean_error, assert_running_untraced, checkpoint_kill_restart,
                     exists, kill_and_reap, lcr, parse_restored_pid, reap, restart_image,
                     start_prog)
from linuxcr.procfs.locks import read_locks
from linuxcr.procfs.timers import read_timers


def _lockdir(t: Path) -> Path:
    d = t / "locks"
    d.mkdir(exist_ok=True)
    return d


TIMER = Prog("posix_timer", "posix_timer", lambda b, t: [b["posix_timer"]])
FLOCK = Prog("flock", "flock", lambda b, t: [b["flock"], _lockdir(t)])
FLOCK_TREE = Prog("flock-tree", "flock", lambda b, t: [b["flock"], _lockdir(t), "tree"])


def _lease_argv(b, t):
    f = t / "leased.dat"
    f.write_text("lease me\n")
    return [b["flock"], "lease", f]


LEASE = Prog("flock-lease", "flock-lease", _lease_argv)


def _timers_text(pid: int) -> str:
    return Path(f"/proc/{pid}/timers").read_text()


def _locks_of(pid: int) -> set[tuple]:
    """(kind, type, pid, inode, start, end) of every lock the process holds."""
    return {(e.kind, e.type, e.pid, e.ino, e.start, e.end) for e in read_locks()
            if e.pid == pid and not e.blocked}


def _ofd_locks(inos: set[int]) -> set[tuple]:
    return {(e.kind, e.type, e.ino, e.start, e.end) for e in read_locks()
            if e.kind == "OFDLCK" and e.ino in inos}


# --------------------------------------------------------------------------
# the programs alone

@pytest.mark.parametrize("prog", [TIMER, FLOCK, FLOCK_TREE, LEASE], ids=lambda p: p.id)
def test_progs_selfcheck(prog, bins, procs, tmp_path):
    if prog is LEASE:
        _skip_without_leases(tmp_path)
    r = start_prog(procs, prog, bins, tmp_path)
    r.assert_pass()
    r.assert_pass()
    assert_running_untraced(r.pid)


# --------------------------------------------------------------------------
# POSIX timers

@pytest.mark.e2e
def test_posix_timers_checkpoint_restart(bins, procs, tmp_path):
    r = start_prog(procs, TIMER, bins, tmp_path)
    before = _timers_text(r.pid)
    ids = sorted(t.id for t in read_timers(r.pid))
    assert len(ids) == 7 and ids != list(range(7)), before    # sparse ids
    img = tmp_path / "img"
    # right away: the 2 s one-shot D has not fired yet and must after the restore
    new = checkpoint_kill_restart(r.pid, img, procs)
    assert new == r.pid
    assert_running_untraced(new)
    # same ids, clocks, signals, values, target thread (tids are restored)
    assert _timers_text(new) == before
    m = r.assert_pass()
    assert re.search(r"ids=([\d,]+)", m.string).group(1) == ",".join(map(str, ids))
    r.assert_pass()
    saved = json.loads(lcr("show", img, "--json").stdout)["tasks"][0]["posix_timers"]
    assert sorted(t["id"] for t in saved) == ids
    b = next(t for t in saved if t["notify"] == 4)
    assert b["tid"] != r.pid and b["interval_ns"] == 250_000_000 and b["sigval"] == 0x777


@pytest.mark.e2e
def test_posix_timers_repeated(bins, procs, tmp_path):
    """A restored process's timers are checkpointed again (twice)."""
    r = start_prog(procs, TIMER, bins, tmp_path)
    r.assert_pass()
    before = _timers_text(r.pid)
    for cycle in range(2):
        new = checkpoint_kill_restart(r.pid, tmp_path / f"img{cycle}", procs)
        assert new == r.pid
        assert _timers_text(new) == before
        r.assert_pass()


# --------------------------------------------------------------------------
# file locks

@pytest.mark.e2e
def test_locks_checkpoint_restart(bins, procs, tmp_path):
    r = start_prog(procs, FLOCK, bins, tmp_path)
    r.assert_pass()
    held = _locks_of(r.pid)
    inos = {os.stat(_lockdir(tmp_path) / f).st_ino for f in ("ofd.dat",)}
    ofd = _ofd_locks(inos)
    assert len(held) == 4 and len(ofd) == 1, (held, ofd)
    img = tmp_path / "img"
    new = checkpoint_kill_restart(r.pid, img, procs)
    assert new == r.pid
    assert _locks_of(new) == held          # taken by the restored process itself
    assert _ofd_locks(inos) == ofd
    r.assert_pass()
    locks = json.loads(lcr("show", img, "--json").stdout)["tasks"][0]["locks"]
    assert {lk["kind"] for lk in locks} == {"flock", "posix", "ofd"}


@pytest.mark.e2e
def test_locks_tree_checkpoint_restart(bins, procs, tmp_path):
    """A child shares the flock's open file description (taken once) and
    holds a POSIX lock of its own."""
    r = start_prog(procs, FLOCK_TREE, bins, tmp_path)
    child = int(re.search(r"child=(\d+)", r.ready).group(1))
    procs.add(child)
    r.assert_pass()
    held, held_child = _locks_of(r.pid), _locks_of(child)
    assert len(held_child) == 1
    lcr("checkpoint", r.pid, "-o", tmp_path / "img")
    reap(r.pid)
    reap(child)        # re-parented to us (the subreaper) when its parent died
    new = parse_restored_pid(lcr("restart", tmp_path / "img").stdout)
    procs.add(child)   # teardown kills in reverse: the parent first, then we reap the child
    procs.add(new)
    assert new == r.pid and exists(child)
    assert _locks_of(new) == held and _locks_of(child) == held_child
    flock_ino = os.stat(_lockdir(tmp_path) / "flock.dat").st_ino
    assert len([e for e in read_locks() if e.ino == flock_ino and e.kind == "FLOCK"]) == 1
    r.assert_pass()


_FLOCK_STRUCT = struct.Struct("hhxxxxqqi4x")


def _take(kind: str, path: Path) -> int:
    """Take in this (pytest) process a lock conflicting with flock.c's."""
    fd = os.open(path, os.O_RDWR)
    if kind == "flock":
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    elif kind == "posix":
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 15)
    else:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK_STRUCT.pack(fcntl.F_RDLCK, os.SEEK_SET, 3, 1, 0))
    return fd


@pytest.mark.e2e
@pytest.mark.parametrize("kind,file", [("flock", "flock.dat"), ("posix", "posix.dat"),
                                       ("ofd", "ofd.dat")])
def test_lock_taken_meanwhile_fails_restart(kind, file, bins, procs, tmp_path):
    r = start_prog(procs, FLOCK, bins, tmp_path)
    r.assert_pass()
    img = tmp_path / "img"
    lcr("checkpoint", r.pid, "-o", img)
    reap(r.pid)
    path = _lockdir(tmp_path) / file
    fd = _take(kind, path)
    try:
        cp = lcr("restart", img, check=False)
        if cp.returncode == 0:
            procs.add(parse_restored_pid(cp.stdout))
        line = assert_clean_error(cp, "RestoreError", mentions=[str(path)], empty_stdout=True)
        if kind != "ofd":
            assert f"pid {os.getpid()}" in line, line
        assert not exists(r.pid), "a failed restart left the process behind"
    finally:
        os.close(fd)
    new = restart_image(img, procs)
    assert new == r.pid
    r.assert_pass()


@pytest.mark.e2e
def test_locks_of_a_running_original_fail_restart(bins, procs, tmp_path):
    """--leave-running then restart --any-pid: the original still holds them."""
    r = start_prog(procs, FLOCK, bins, tmp_path)
    img = tmp_path / "img"
    lcr("checkpoint", r.pid, "-o", img, "--leave-running")
    cp = lcr("restart", img, "--any-pid", check=False)
    if cp.returncode == 0:
        procs.add(parse_restored_pid(cp.stdout))
    line = assert_clean_error(cp, "RestoreError", mentions=["flock.dat", f"pid {r.pid}"])
    assert "lock" in line
    r.assert_pass()                 # the original is untouched
    kill_and_reap(r.pid)
    new = restart_image(img, procs)
    assert new == r.pid
    r.assert_pass()


# --------------------------------------------------------------------------
# leases: refused

def _skip_without_leases(tmp_path: Path) -> None:
    f = tmp_path / "lease-probe"
    f.write_text("x")
    fd = os.open(f, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        pytest.skip(f"no file leases here: {e.strerror}")
    finally:
        os.close(fd)


@pytest.mark.e2e
def test_lease_restored(bins, procs, tmp_path):
    """A read lease is saved with its open file (resources/fdkinds/fown.py)
    and taken again by the restored process (fd_fown.c tests its breaks)."""
    _skip_without_leases(tmp_path)
    r = start_prog(procs, LEASE, bins, tmp_path)
    cp = lcr("check", r.pid, check=False)
    assert cp.returncode == 0, (cp.returncode, cp.stdout, cp.stderr)
    new = checkpoint_kill_restart(r.pid, tmp_path / "img", procs)
    assert new == r.pid
    assert any(e.kind == "LEASE" and e.type == "READ" for e in read_locks() if e.pid == new)
    assert_running_untraced(new)
    r.assert_pass()


# --------------------------------------------------------------------------
# pieces (no processes)

def test_struct_layouts():
    from linuxcr.resources import locks, posix_timers
    from linuxcr.image.schema import PosixTimer
    assert locks._FLOCK.size == 32
    ev = posix_timers._sigevent(PosixTimer(id=3, clock=1, notify=4, signo=34, sigval=7, tid=99))
    assert len(ev) == 64 and struct.unpack_from("<Qiii", ev) == (7, 34, 4, 99)
    assert posix_timers._TIMER_ID.unpack(posix_timers._TIMER_ID.pack(12345))[0] == 12345


def test_image_roundtrip_of_new_fields():
    import msgspec
    from linuxcr.image.schema import FileLock, PosixTimer
    t = PosixTimer(id=5, clock=-6, notify=0, signo=36, sigval=(1 << 64) - 1, left_s=3, left_ns=9)
    lk = FileLock(fd=4, kind="posix", write=True, start=10, length=20)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(t), type=PosixTimer) == t
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(lk), type=FileLock) == lk
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"id": 1, "clock": 0, "notify": 9,
                                                       "signo": 1, "sigval": 0}), type=PosixTimer)
