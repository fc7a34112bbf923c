"""End to end: /proc files of the tree (fdkinds/procfile.py), file owners
and signals (F_SETOWN/F_SETOWN_EX/F_SETSIG, O_ASYNC) and leases, and the
objects of fds3's sweep: restored, or refused with one clear line.

Programs: tests/progs/fd_procfile.c, fd_fown.c, fd_zoo.c.  Each runs as
root and, where an ordinary user can make the object, as lcrtest
(restored into a new user+pid namespace).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

import helpers
from helpers import (Procs, Running, assert_clean_error, assert_pass, assert_running_untraced,
                     lcr, reap, restart_image, wait_for_line)
from rootless_helpers import (Trees, find_user, lcr_as, nspid, start_as, user_can_run_lcr,
                              user_file, user_workdir, tree_pids, kill_tree_and_reap)

pytestmark = pytest.mark.e2e


def _start(procs: Procs, argv: list, log: Path) -> Running:
    p = procs.start(argv, log)
    m = wait_for_line(log, r"^(READY pid=(\d+)|SKIP )")
    if m.group(0).startswith("SKIP"):
        reap(p.pid)
        pytest.skip(m.string)
    assert int(m.group(2)) == p.pid
    return Running(p.pid, log, None, p, m.string)


def _no_internal(cp) -> None:
    for out in (cp.stdout, cp.stderr):
        text = out if isinstance(out, str) else out.decode()
        assert "internal error" not in text.lower() and "Traceback" not in text, text


def _cycle(r: Running, name: str, tmp: Path, procs: Procs, cycles: int = 2, *args) -> int:
    """Checkpoint (kill) + restart, ``cycles`` times; the probe passes each time."""
    pid = r.pid
    for c in range(cycles):
        cp = lcr("checkpoint", pid, "-o", tmp / f"img{c}", check=False)
        _no_internal(cp)
        assert cp.returncode == 0, cp.stderr
        reap(pid)
        new = restart_image(tmp / f"img{c}", procs, *args)
        if not args:
            assert new == r.pid
        assert_running_untraced(new)
        assert_pass(new, r.log, name)
        pid = new
    return pid


def _refused(r: Running, tmp: Path, mentions: list[str], fd: int = 3) -> str:
    """`lcr check` names pid, fd, the object and a way out; checkpoint
    refuses with one line and leaves the process running, unharmed."""
    cp = lcr("check", r.pid, check=False)
    _no_internal(cp)
    assert cp.returncode == 5, cp
    lines = [ln for ln in cp.stdout.splitlines() if f"fd {fd}:" in ln]
    assert len(lines) == 1, cp.stdout
    for w in [f"pid {r.pid}"] + mentions:
        assert w in lines[0], lines[0]
    assert re.search(r"close it|keep its name|release it|until the program|checkpoint once", lines[0]), lines[0]
    cp = lcr("checkpoint", r.pid, "-o", tmp / "img", check=False)
    assert_clean_error(cp, "NotCheckpointable", mentions=[str(r.pid), f"fd {fd}"] + mentions)
    assert not (tmp / "img").exists()
    assert_running_untraced(r.pid)
    return lines[0]


# --------------------------------------------------------------------------
# /proc files

def test_procfile_self(bins, procs, tmp_path):
    r = _start(procs, [bins["fd_procfile"], "self"], tmp_path / "pf.log")
    assert_pass(r.pid, r.log, "fd_procfile")
    pid = _cycle(r, "fd_procfile", tmp_path, procs)
    assert os.readlink(f"/proc/{pid}/fd/3") == f"/proc/{pid}/stat"
    assert os.readlink(f"/proc/{pid}/fd/7") == f"/proc/{pid}/task/{pid}/stat"


def test_procfile_any_pid(bins, procs, tmp_path):
    """Restarted with --any-pid while the old pid is taken: the files name
    the new pid."""
    r = _start(procs, [bins["fd_procfile"], "self"], tmp_path / "pf.log")
    cp = lcr("checkpoint", r.pid, "-o", tmp_path / "img", "--leave-running", check=False)
    if cp.returncode == 2 and "leave-running" in cp.stderr:
        pytest.skip("no --leave-running")
    assert cp.returncode == 0, cp.stderr
    new = restart_image(tmp_path / "img", procs, "--any-pid")
    assert new != r.pid
    assert_pass(new, r.log, "fd_procfile")
    assert os.readlink(f"/proc/{new}/fd/3") == f"/proc/{new}/stat"
    assert_pass(r.pid, r.log, "fd_procfile")     # the original is untouched


def test_procfile_tree(bins, tmp_path):
    """A parent holds /proc/CHILD/status: the restored child's."""
    trees = Trees()
    try:
        log = tmp_path / "pt.log"
        p = helpers.start_detached([bins["fd_procfile"], "tree"], log)
        trees.add(p.pid, p)
        m = wait_for_line(log, r"^READY pid=(\d+) child=(\d+)", pid=p.pid)
        child = int(m.group(2))
        assert_pass(p.pid, log, "fd_procfile")
        for c in range(2):
            pids = tree_pids(p.pid)
            cp = lcr("checkpoint", p.pid, "-o", tmp_path / f"img{c}", check=False)
            _no_internal(cp)
            assert cp.returncode == 0, cp.stderr
            kill_tree_and_reap(pids)
            cp = lcr("restart", tmp_path / f"img{c}", check=False)
            _no_internal(cp)
            assert cp.returncode == 0, cp.stderr
            new = int(cp.stdout)
            trees.add(new)
            assert new == p.pid and helpers.alive(child)
            assert_pass(new, log, "fd_procfile")
            assert os.readlink(f"/proc/{new}/fd/8") == f"/proc/{child}/status"
    finally:
        assert not trees.kill_all()


def test_procfile_outside_refused(bins, procs, tmp_path):
    r = _start(procs, [bins["fd_procfile"], "outside"], tmp_path / "po.log")
    line = _refused(r, tmp_path, ["/proc/1/stat", "pid 1", "not part of this process tree"])
    assert "checkpoint a common ancestor" in line


# --------------------------------------------------------------------------
# owners, signals, O_ASYNC, leases

def _leased(d: Path) -> Path:
    f = d / "leased.dat"
    f.write_text("lease me\n")
    return f


def test_fown(bins, procs, tmp_path):
    """SIGIO to the process, F_SETSIG to the thread with si_fd, a read lease
    whose break is signalled: all after two restarts."""
    r = _start(procs, [bins["fd_fown"], _leased(tmp_path)], tmp_path / "fo.log")
    assert_pass(r.pid, r.log, "fd_fown")
    _cycle(r, "fd_fown", tmp_path, procs)


def test_fown_outside_refused(bins, procs, tmp_path):
    r = _start(procs, [bins["fd_fown"], _leased(tmp_path), "outside"], tmp_path / "fo.log")
    _refused(r, tmp_path, ["owner (F_SETOWN)", f"pid {os.getpid()}", "not part of this process tree"])


# --------------------------------------------------------------------------
# unlinked FIFOs and device nodes, shared anonymous memory through map_files

ZOO_RESTORED = ["unlinked_fifo", "unlinked_dev", "zero_shm", "zero_shm_unmapped", "fanotify"]


@pytest.mark.parametrize("kind", ZOO_RESTORED)
def test_zoo_restored(kind, bins, procs, tmp_path):
    r = _start(procs, [bins["fd_zoo"], kind, tmp_path], tmp_path / "zoo.log")
    assert_pass(r.pid, r.log, "fd_zoo")
    pid = _cycle(r, "fd_zoo", tmp_path, procs)
    link = os.readlink(f"/proc/{pid}/fd/3")
    if kind == "fanotify":
        return
    if kind.startswith("unlinked"):
        assert link == f"{tmp_path}/obj (deleted)" and not (tmp_path / "obj").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("obj")]
    else:
        assert link == "/memfd:lcr-shm (deleted)"


def test_zoo_unlinked_device_refused(bins, procs, tmp_path):
    r = _start(procs, [bins["fd_zoo"], "unlinked_kmsg", tmp_path], tmp_path / "zoo.log")
    _refused(r, tmp_path, ["character device 1:11", f"{tmp_path}/obj (deleted)", "unlinked"])
    assert_pass(r.pid, r.log, "fd_zoo")


def test_fanotify_queued_refused(bins, procs, tmp_path):
    r = _start(procs, [bins["fd_zoo"], "fanotify_queued", tmp_path], tmp_path / "zoo.log")
    _refused(r, tmp_path, ["fanotify group has", "events the program has not read"])


def test_aio_context_refused(bins, procs, tmp_path):
    """An io_setup ring: refused (not silently restored as plain memory)."""
    r = _start(procs, [bins["fd_zoo"], "aio", tmp_path], tmp_path / "zoo.log")
    cp = lcr("check", r.pid, check=False)
    _no_internal(cp)
    assert cp.returncode == 5, cp
    lines = [ln for ln in cp.stdout.splitlines() if "AIO" in ln]
    assert len(lines) == 1 and f"pid {r.pid}" in lines[0] and "io_destroy" in lines[0], cp.stdout
    cp = lcr("checkpoint", r.pid, "-o", tmp_path / "img", check=False)
    assert_clean_error(cp, "NotCheckpointable", mentions=[str(r.pid), "Linux AIO context"])
    assert_running_untraced(r.pid)
    assert_pass(r.pid, r.log, "fd_zoo")


# --------------------------------------------------------------------------
# epoll watches that outlive their fd number

@pytest.mark.parametrize("mode", ["closed", "reused"])
def test_epoll_orphan_watch(mode, bins, procs, tmp_path):
    """The watched pipe is kept by a dup, its fd closed (and the number
    taken by an eventfd): the watch on (pipe, old number) comes back and
    wakes for the pipe, not for the eventfd."""
    r = _start(procs, [bins["fd_epoll"], mode], tmp_path / "ep.log")
    assert_pass(r.pid, r.log, "fd_epoll")
    _cycle(r, "fd_epoll", tmp_path, procs)


# --------------------------------------------------------------------------
# inotify watch of a file deleted since, still open

def test_inotify_deleted_file(bins, procs, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    r = _start(procs, [bins["fd_inotify"], d, "deleted"], tmp_path / "in.log")
    assert_pass(r.pid, r.log, "fd_inotify")
    pid = _cycle(r, "fd_inotify", tmp_path, procs)
    assert not (d / "victim").exists()
    assert any(os.readlink(f"/proc/{pid}/fd/{fd}") == f"{d}/victim (deleted)"
               for fd in os.listdir(f"/proc/{pid}/fd"))


# --------------------------------------------------------------------------
# as an ordinary user (restored into a new user+pid namespace)







def _restart_as(user, img: Path, trees: Trees) -> int:
    cp = lcr_as(user, "restart", img, check=False)
    _no_internal(cp)
    assert cp.returncode == 0, cp.stderr
    pid = int(cp.stdout)
    st = helpers.proc_status(pid)
    init = int(st["PPid"]) if st else 0
    if init > 1 and init != os.getpid() and nspid(init)[-1] == 1:
        trees.add(init)
    trees.add(pid)
    return pid


ROOTLESS = {"fd_procfile": lambda b, wd: [b["fd_procfile"], "self"],
            "fd_fown": lambda b, wd: [b["fd_fown"], wd / "leased.dat"],
            "fd_zoo": lambda b, wd: [b["fd_zoo"], "unlinked_fifo", wd],
            "fd_epoll": lambda b, wd: [b["fd_epoll"], "reused"],
            "fd_inotify": lambda b, wd: [b["fd_inotify"], wd / "op", "deleted"]}


@pytest.mark.parametrize("name", list(ROOTLESS))
def test_as_user(name, user, wd, bins, trees):
    (wd / "op").mkdir()
    os.chown(wd / "op", user.uid, user.gid)
    log = wd / f"{name}.log"
    user_file(user, wd / "leased.dat", b"lease me\n")
    p = start_as(user, ROOTLESS[name](bins, wd), log, cwd=wd)
    trees.add(p.pid, p)
    m = wait_for_line(log, r"^(READY pid=(\d+)|SKIP )", pid=p.pid)
    if m.group(0).startswith("SKIP"):
        pytest.skip(m.string)
    assert_pass(p.pid, log, name)
    cp = lcr_as(user, "checkpoint", p.pid, "-o", wd / "img", check=False)
    _no_internal(cp)
    assert cp.returncode == 0, cp.stderr
    reap(p.pid)
    new = _restart_as(user, wd / "img", trees)
    assert nspid(new)[-1] == p.pid
    assert_pass(new, log, name)
