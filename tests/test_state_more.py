"""Process state issue 17 lists that came back different (tests/progs/
state_more.c checks its own): process groups and sessions led by a process
that is now a zombie, a working directory that was removed, a working
directory inside a chroot; guard regions (MADV_GUARD_INSTALL)."""
from __future__ import annotations

import os

import pytest

import helpers
from helpers import assert_pass, lcr, reap, restart_image, wait_for_line
from rootless_helpers import find_user, lcr_as, user_can_run_lcr, user_file, user_workdir

pytestmark = pytest.mark.e2e
NAME = "state_more"


def _tree_dir(base):
    (base / "root" / "sub").mkdir(parents=True)
    (base / "root" / "marker").write_text("")
    return base


def _ids(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[2]), int(fields[3])      # pgrp, session


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_zombie_leaders_deleted_cwd_chroot(bins, procs, tmp_path):
    d = _tree_dir(tmp_path / "d")
    log = tmp_path / "s.log"
    p = procs.start([bins[NAME], d], log)
    m = wait_for_line(log, r"^READY pid=(\d+) child=(\d+) z1=(\d+) z2=(\d+) guards=(\d)", pid=p.pid)
    pid, child, z1, z2, guards = (int(x) for x in m.groups())
    procs.add(child)
    assert_pass(pid, log, NAME)
    assert_pass(child, log, NAME)
    img = tmp_path / "img"
    lcr("checkpoint", pid, "-o", img)
    for gone in (pid, child, z1, z2):     # the zombies come to us (a subreaper) too
        reap(gone)
    assert restart_image(img, procs) == pid
    procs.add(child)            # the restored one (another start time): killed before its parent
    assert_pass(pid, log, NAME)
    assert_pass(child, log, NAME)
    assert _ids(z1) == (z1, pid) and _ids(z2) == (z2, z2)
    for z in (z1, z2):
        with open(f"/proc/{z}/comm") as f:
            assert f.read().strip() == NAME, f"zombie {z} lost its name"
    assert not (d / "gone").exists(), "the recreated working directory was left behind"
    if not guards:
        pytest.skip("no guard regions on this kernel (MADV_GUARD_INSTALL: Linux 6.13+); "
                    "the rest passed")


def test_deleted_cwd_as_user(bins, procs, tmp_path):
    """The same as an ordinary user (no chroot): restored in a user+pid
    namespace, zombies and the removed working directory included."""
    user = find_user()
    why = user_can_run_lcr(user)
    if why:
        pytest.skip(why)
    wd = user_workdir(user)
    log = user_file(user, wd / "s.log")
    p = procs.start([*user.prefix, bins[NAME], wd, "nochroot"], log)
    m = wait_for_line(log, r"^READY pid=(\d+) child=(\d+) z1=(\d+) z2=(\d+)", pid=p.pid)
    child = int(m.group(2))
    procs.add(child)
    img = wd / "img"
    lcr_as(user, "checkpoint", p.pid, "-o", img)
    for gone in (p.pid, child, int(m.group(3)), int(m.group(4))):
        reap(gone)
    new = int(lcr_as(user, "restart", img).stdout)
    procs.add(new)
    with open(f"/proc/{new}/task/{new}/children") as f:
        kids = [int(k) for k in f.read().split()]
    procs.add(next(k for k in kids if helpers.proc_state(k) != "Z"))   # C, not a zombie
    assert_pass(new, log, NAME)


@pytest.mark.skipif(os.geteuid() != 0, reason="the shared object is read through map_files (root)")
def test_shared_pages_of_exited_child(bins, procs, tmp_path):
    """Pages of a shared anonymous area that only an exited child wrote:
    no page table of the saved process maps them, the object holds them."""
    log = tmp_path / "o.log"
    p = procs.start([bins["shm_orphan"]], log)
    wait_for_line(log, r"^READY pid=\d+", pid=p.pid)
    img = tmp_path / "img"
    lcr("checkpoint", p.pid, "-o", img)     # before any probe touches the pages
    reap(p.pid)
    assert restart_image(img, procs) == p.pid
    assert_pass(p.pid, log, "shm_orphan")
