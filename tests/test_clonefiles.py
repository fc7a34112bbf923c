"""Two processes sharing one fd table (clone CLONE_FILES), tests/progs/fd_clonefiles.c.

After checkpoint + kill + restart the pair shares one table again: the
probe opens a file in one and finds it by number in the other (both ways,
and a close is seen by both), and kcmp(KCMP_FILES) says "same".  Through
the copy-on-write path (a plain checkpoint: the child shares pages with
its parent) and the plain one (an incremental image), through a snapshot's
rollback and writeback, as root and as lcrtest.  A table shared by two
siblings whose parent left it (unshare) cannot be built again by forking:
refused with one line.  Forged images (files_with naming a later task,
another table, different fds) are refused before any process exists.
Every process is killed and reaped by pid at teardown (``trees``).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import msgspec
import pytest

import helpers
from helpers import assert_clean_error, assert_pass, lcr, pass_field, reap, wait_for_line
from rootless_helpers import (Trees, assert_tree_running_untraced, checkpoint_tree, children,
                              find_user, kill_tree, lcr_as, nspid, restart_tree, start_as,
                              user_can_run_lcr, user_workdir)
from test_snapshots import agent_env  # noqa: F401  (fixture)

from linuxcr.errors import ImageError
from linuxcr.sys.syscalls import KCMP_FILES, kcmp_same

pytestmark = pytest.mark.e2e
NAME = "fd_clonefiles"




def _start(bins, trees: Trees, tmp: Path) -> tuple[int, int, Path]:
    d = tmp / "files"
    d.mkdir()
    log = tmp / "clonefiles.log"
    p = helpers.start_detached([bins[NAME], d], log)
    trees.add(p.pid, p)
    m = wait_for_line(log, r"^READY pid=(\d+) a=(\d+)", pid=p.pid)
    return p.pid, int(m.group(2)), log


def _shared(pid: int, child: int, log: Path) -> int:
    """The probe passes and the kernel sees one table; the probe's round."""
    assert children(pid) == [child]
    assert kcmp_same(KCMP_FILES, pid, child), f"pids {pid} and {child}: two fd tables"
    return pass_field(assert_pass(pid, log, NAME), "round")


def test_restart_shared(bins, trees, tmp_path):
    pid, child, log = _start(bins, trees, tmp_path)
    _shared(pid, child, log)
    for c in range(2):
        img = tmp_path / f"img{c}"
        checkpoint_tree(pid, img)
        shown = lcr("show", img).stdout
        assert f"fd table shared with pid {pid}" in shown, shown
        new, _ = restart_tree(img, trees)
        assert new == pid
        assert_tree_running_untraced(pid)
        _shared(pid, child, log)


def test_restart_incremental(bins, trees, tmp_path):
    """An incremental image has no shared pages: the plain build_tree path."""
    pid, child, log = _start(bins, trees, tmp_path)
    lcr("checkpoint", pid, "-o", tmp_path / "full", "--leave-running")
    _shared(pid, child, log)                 # files made and closed in between
    checkpoint_tree(pid, tmp_path / "inc", "--parent", tmp_path / "full")
    new, _ = restart_tree(tmp_path / "inc", trees)
    assert new == pid
    _shared(pid, child, log)


def test_snapshot_rollback_writeback(bins, trees, tmp_path, agent_env):  # noqa: F811
    pid, child, log = _start(bins, trees, tmp_path)
    crid = lcr("snapshot", pid, env=agent_env).stdout.strip()
    assert _shared(pid, child, log) == 1     # files opened and closed since
    assert _shared(pid, child, log) == 2
    cp = lcr("rollback", crid, env=agent_env)
    assert "warning" not in cp.stderr, cp.stderr
    assert _shared(pid, child, log) == 1     # back to the snapshot's round
    lcr("writeback", crid, "-o", tmp_path / "img", env=agent_env)
    lcr("discard", crid, env=agent_env)
    assert children(child) == []
    assert_tree_running_untraced(pid)
    kill_tree(pid)
    new, _ = restart_tree(tmp_path / "img", trees)
    assert new == pid
    _shared(pid, child, log)


def test_siblings_refused(bins, trees, tmp_path):
    log = tmp_path / "siblings.log"
    p = helpers.start_detached([bins[NAME], tmp_path, "siblings"], log)
    trees.add(p.pid, p)
    m = wait_for_line(log, r"^READY pid=(\d+) a=(\d+) b=(\d+)", pid=p.pid)
    a, b = int(m.group(2)), int(m.group(3))
    cp = lcr("checkpoint", p.pid, "-o", tmp_path / "img", check=False)
    assert_clean_error(cp, "NotCheckpointable",
                       mentions=[f"pid {b} shares its fd table with pid {a}", "CLONE_FILES",
                                 f"its parent pid {p.pid} does not"])
    assert helpers.alive(p.pid) and helpers.alive(a) and helpers.alive(b)
    cp = lcr("check", p.pid, check=False)
    assert cp.returncode != 0 and f"pid {b} shares its fd table with pid {a}" in cp.stdout + cp.stderr, cp


# --------------------------------------------------------------------------
# forged images: restore's validate_tree

def _image_tasks(bins, trees, tmp_path):
    from linuxcr.engine.restore import read_meta
    from linuxcr.image.stream import ImageReader
    pid, child, log = _start(bins, trees, tmp_path)
    lcr("checkpoint", pid, "-o", tmp_path / "img", "--leave-running")
    fd = os.open(tmp_path / "img", os.O_RDONLY)
    try:
        _h, tree, tasks, _first = read_meta(ImageReader(fd, name="img"))
    finally:
        os.close(fd)
    return tree, tasks


def test_forged_files_with(bins, trees, tmp_path):
    from linuxcr.engine.restore import check_files_with
    _tree, tasks = _image_tasks(bins, trees, tmp_path)
    root, kid = tasks
    assert root.files_with is None and kid.files_with == root.pid
    check_files_with(tasks)
    rep = msgspec.structs.replace
    bad = {
        "later task": [rep(root, files_with=kid.pid), rep(kid, files_with=None)],
        "unknown pid": [root, rep(kid, files_with=1)],
        "other fds": [root, rep(kid, files=kid.files[:-1])],
    }
    for what, forged in bad.items():
        with pytest.raises(ImageError, match="shares the fd table"):
            check_files_with(forged)
            pytest.fail(f"forged image ({what}) accepted")


# --------------------------------------------------------------------------
# as an ordinary user (restored into a new user + pid namespace)



def test_as_user(user, bins, trees):
    wd = user_workdir(user)
    try:
        (wd / "files").mkdir()
        os.chown(wd / "files", user.uid, user.gid)
        log = wd / "clonefiles.log"
        p = start_as(user, [bins[NAME], wd / "files"], log, cwd=wd)
        trees.add(p.pid, p)
        m = wait_for_line(log, r"^READY pid=(\d+) a=(\d+)", pid=p.pid)
        child = int(m.group(2))
        assert_pass(p.pid, log, NAME)
        cp = lcr_as(user, "checkpoint", p.pid, "-o", wd / "img", check=False)
        assert cp.returncode == 0, cp.stderr
        for k in (p.pid, child):
            reap(k)
        cp = lcr_as(user, "restart", wd / "img", check=False)
        assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
        new = helpers.parse_restored_pid(cp.stdout)
        st = helpers.proc_status(new)
        init = int(st["PPid"]) if st else 0
        if init > 1 and init != os.getpid() and nspid(init)[-1] == 1:
            trees.add(init)
        trees.add(new)
        assert nspid(new)[-1] == p.pid
        [kid] = children(new)
        assert nspid(kid)[-1] == child
        assert kcmp_same(KCMP_FILES, new, kid)
        m = assert_pass(new, log, NAME)
        assert re.search(rf"\ba={child}\b", m.string)
    finally:
        shutil.rmtree(wd, ignore_errors=True)
