"""End to end: timerfd, signalfd, epoll and inotify file descriptors
(resources/fdkinds/{timerfd,signalfd,epoll,inotify}.py).

Each kind has a program (tests/progs/fd_<kind>.c) that sets up the state,
prints READY and, on SIGUSR1, checks every detail and prints PASS or FAIL.
- selfcheck: the programs pass without lcr (a FAIL after a restart is lcr's);
- checkpoint (kill) -> restart -> PASS, twice in a row (a restored process
  is checkpointed again);
- checkpoint --leave-running must change nothing the program sees (no
  tick, signal or event consumed), and its image restarts too;
- the states lcr refuses: `lcr check` names them (exit 5), `lcr checkpoint`
  refuses them, and the process goes on untouched.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import helpers
from helpers import (Prog, as_user, assert_clean_error, assert_running_untraced,
                     checkpoint_kill_restart, kill_and_reap, lcr, reap, restart_image,
                     start_prog)

pytestmark = pytest.mark.e2e

NOBODY = 65534


def _inotify_argv(*mode: str):
    def argv(bins, tmp: Path) -> list:
        d = tmp / "inotify-dir"
        d.mkdir(exist_ok=True)
        return [bins["fd_inotify"], d, *mode]
    return argv


PROGS = {p.id: p for p in [
    Prog("timerfd", "fd_timerfd", lambda b, t: [b["fd_timerfd"]]),
    Prog("signalfd", "fd_signalfd", lambda b, t: [b["fd_signalfd"]]),
    Prog("epoll", "fd_epoll", lambda b, t: [b["fd_epoll"]]),
    Prog("inotify", "fd_inotify", _inotify_argv()),
]}
ALL = list(PROGS.values())
ids = [p.id for p in ALL]


@pytest.mark.parametrize("prog", ALL, ids=ids)
def test_selfcheck(prog, bins, procs, tmp_path):
    r = start_prog(procs, prog, bins, tmp_path)
    r.assert_pass()
    r.assert_pass()
    assert_running_untraced(r.pid)


@pytest.mark.parametrize("prog", ALL, ids=ids)
def test_checkpoint_restart(prog, bins, procs, tmp_path):
    r = start_prog(procs, prog, bins, tmp_path)
    r.assert_pass()
    for cycle in range(2):
        new = checkpoint_kill_restart(r.pid, tmp_path / f"img{cycle}", procs)
        assert new == r.pid, f"restored as pid {new}, was {r.pid} (and it was free)"
        assert_running_untraced(new)
        r.assert_pass()
        r.assert_pass()


@pytest.mark.parametrize("prog", ALL, ids=ids)
def test_leave_running_consumes_nothing(prog, bins, procs, tmp_path):
    """Dumping reads the state without consuming it: the program still finds
    its pending ticks, signals and watches; the image restarts."""
    r = start_prog(procs, prog, bins, tmp_path)
    r.assert_pass()
    img = tmp_path / "img"
    lcr("checkpoint", r.pid, "-o", img, "--leave-running")
    assert_running_untraced(r.pid)
    r.assert_pass()
    kill_and_reap(r.pid)
    new = restart_image(img, procs)
    assert new == r.pid
    r.assert_pass()


def test_image_shows_states(bins, procs, tmp_path):
    """The saved states are in the image, as the schema declares them."""
    import json
    seen = {}
    for prog in ALL:
        r = start_prog(procs, prog, bins, tmp_path)
        img = tmp_path / f"{prog.id}.img"
        lcr("checkpoint", r.pid, "-o", img, "--leave-running")
        js = json.loads(lcr("show", img, "--json").stdout)
        states = [d["state"] for d in _descs(js) if d.get("state")]
        seen[prog.id] = [s for s in states if s.get("type") == prog.id]
    timers = {(t["clock"], t["interval_ns"], t["ticks"] if t["value_ns"] == 0 else None)
              for t in seen["timerfd"]}
    assert (1, 0, 1) in timers, timers           # fired one-shot: 1 tick, disarmed
    assert (1, 5 * 10**9, 0) in timers, timers   # disarmed, interval kept
    assert any(t["ticks"] == 7 and t["value_ns"] > 0 for t in seen["timerfd"])
    assert any(t["clock"] == 0 and t["settime_flags"] == 3 for t in seen["timerfd"])
    masks = sorted(s["mask"] for s in seen["signalfd"])
    assert len(masks) == 3, masks
    eps = sorted(len(s["watches"]) for s in seen["epoll"])
    assert eps == [4, 5], eps
    ino = sorted((w["wd"] for s in seen["inotify"] for w in s["watches"]))
    assert ino == [1, 2, 2, 4, 10, 11], ino
    assert all(w["path"].startswith(str(tmp_path)) for s in seen["inotify"] for w in s["watches"])


def _descs(js) -> list[dict]:
    """Every open file description in `lcr show --json` output."""
    out = []

    def walk(o):
        if isinstance(o, dict):
            if "fid" in o and "kind" in o:
                out.append(o)
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    walk(js)
    return out


# --------------------------------------------------------------------------
# refused states

REFUSED = [
    # a watch whose fd was closed or reused: restored (tests/test_fdkinds_extra.py)
    pytest.param(Prog("epoll-oneshot", "fd_epoll", lambda b, t: [b["fd_epoll"], "oneshot"]),
                 r"one-shot watch of fd \d+ that fired", id="epoll-fired-oneshot-idle"),
    pytest.param(Prog("inotify-queued", "fd_inotify", _inotify_argv("queued")),
                 r"inotify has \d+ bytes of events the program has not read", id="inotify-queued"),
    # a watch of a deleted file still open: restored (tests/test_fdkinds_extra.py)
]


@pytest.mark.parametrize("prog,why", REFUSED)
def test_check_refuses(prog, why, bins, procs, tmp_path):
    r = start_prog(procs, prog, bins, tmp_path)
    r.assert_pass()
    cp = lcr("check", r.pid, check=False)
    assert cp.returncode == 5, (cp.returncode, cp.stdout, cp.stderr)
    assert re.search(why, cp.stdout + cp.stderr), (cp.stdout, cp.stderr)
    assert "Traceback" not in cp.stderr, cp.stderr
    assert_running_untraced(r.pid)
    r.assert_pass()
    img = tmp_path / "img"
    cp = lcr("checkpoint", r.pid, "-o", img, check=False)
    assert_clean_error(cp, "NotCheckpointable", mentions=[str(r.pid)], match=why)
    assert not img.exists()
    assert_running_untraced(r.pid)
    r.assert_pass()


# --------------------------------------------------------------------------
# inotify without root: paths are looked for near the files the process uses



@pytest.fixture
def open_dir():
    """A directory anyone may use (tmp_path is root's only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run processes as another user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not found")
    d = Path(tempfile.mkdtemp(prefix="lcr-inotify-"))
    os.chmod(d, 0o777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("near", [True, False], ids=["near-its-files", "far"])
def test_inotify_without_root(near, open_dir, bins, procs):
    """Without CAP_DAC_READ_SEARCH lcr cannot open file handles: a watched
    directory next to the process's open files is found all the same, one
    elsewhere is refused with a reason."""
    logs = open_dir / "logs"
    logs.mkdir(mode=0o777)
    watched = (logs if near else open_dir / "a" / "b") / "watched"
    watched.mkdir(parents=True)
    for p in [watched, *watched.parents]:
        if p == open_dir.parent:
            break
        os.chmod(p, 0o777)
    prog = Prog("inotify-nobody", "fd_inotify", lambda b, t: [b["fd_inotify"], watched])
    r = start_prog(procs, prog, bins, logs, prefix=as_user(NOBODY), log=logs / "log")
    os.chmod(logs / "log", 0o666)
    r.assert_pass()
    cp = helpers.lcr_as(NOBODY, "check", r.pid, cwd=open_dir)
    assert "Traceback" not in cp.stderr, cp.stderr
    if near:
        assert cp.returncode == 0, (cp.stdout, cp.stderr)
    else:
        assert cp.returncode == 5, (cp.stdout, cp.stderr)
        assert re.search(r"inotify watch wd 1 .*needs root", cp.stdout), cp.stdout
    assert_running_untraced(r.pid)
    r.assert_pass()


def test_restart_refused_when_watched_file_is_gone(bins, procs, tmp_path):
    """A watched path missing at restart: a clean RestoreError naming it,
    and no process left behind."""
    r = start_prog(procs, PROGS["inotify"], bins, tmp_path)
    r.assert_pass()
    img = tmp_path / "img"
    lcr("checkpoint", r.pid, "-o", img)
    reap(r.pid)
    gone = tmp_path / "inotify-dir" / "f1"
    gone.unlink()
    cp = lcr("restart", img, check=False)
    assert_clean_error(cp, "RestoreError", mentions=[str(gone)])
    assert not helpers.exists(r.pid), "a failed restart left a process behind"


# --------------------------------------------------------------------------
# inotify watch numbers, in lcr's own process (no program needed)

@pytest.mark.parametrize("setnextwd", [True, False], ids=["ioctl", "skip-by-dummies"])
def test_inotify_numbers_come_back(setnextwd, tmp_path, monkeypatch):
    """Watches get their saved numbers back, gaps included, with the
    INOTIFY_IOC_SETNEXTWD ioctl or (kernels without it) by using numbers up;
    no stray event is left queued either way."""
    from linuxcr.image.kinds import InotifyState, InotifyWatch
    from linuxcr.procfs import read_fdinfo
    from linuxcr.resources.fdkinds import inotify

    paths = []
    for i in range(4):
        p = tmp_path / f"f{i}"
        p.write_text("x")
        paths.append(str(p))
    wds = [1, 3, 4, 40]
    if not setnextwd:
        real = inotify.fcntl.ioctl

        def no_setnextwd(fd, req, *a):
            if req == inotify.INOTIFY_IOC_SETNEXTWD:
                raise OSError(25, "Inappropriate ioctl for device")
            return real(fd, req, *a)
        monkeypatch.setattr(inotify.fcntl, "ioctl", no_setnextwd)
    state = InotifyState(watches=[InotifyWatch(wd=wd, mask=0x2, path=p)
                                  for wd, p in zip(wds, paths)])
    fd = inotify.KIND.open(state, os.O_NONBLOCK)
    try:
        got = sorted(int(w.split()[0].split(":")[1], 16)
                     for w in read_fdinfo(os.getpid(), fd).values("inotify"))
        assert got == wds
        assert inotify.queued(fd) == 0
        assert os.get_blocking(fd) is False
    finally:
        os.close(fd)
