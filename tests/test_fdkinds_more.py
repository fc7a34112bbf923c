"""End to end: O_PATH descriptors (fdkinds/opath.py), pidfds (pidfd.py),
netlink and other socket families (othersock.py), deleted directories
(deleted_dir.py), and the sweep of objects that must be either restored or
refused with one clear line -- never an "internal error".

Programs: tests/progs/fd_opath.c, fd_pidfd.c, fd_zoo.c (one object per run).
Each runs as root and, where an ordinary user can make the object, as
lcrtest (restored into a new user+pid namespace).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import helpers
from helpers import (Procs, Running, assert_clean_error, assert_pass, assert_running_untraced,
                     lcr, reap, restart_image, wait_for_line)
from rootless_helpers import (Trees, find_user, lcr_as, nspid, start_as, user_can_run_lcr,
                              user_workdir)

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


def _cycle(r: Running, name: str, tmp: Path, procs: Procs, cycles: int = 2) -> int:
    """Checkpoint (kill) + restart, ``cycles`` times; the probe passes each time."""
    pid = r.pid
    for c in range(cycles):
        cp = lcr("checkpoint", pid, "-o", tmp / f"img{c}", check=False)
        _no_internal(cp)
        assert cp.returncode == 0, cp.stderr
        reap(pid)
        new = restart_image(tmp / f"img{c}", procs)
        assert new == r.pid
        assert_running_untraced(new)
        assert_pass(new, r.log, name)
        pid = new
    return pid


# --------------------------------------------------------------------------
# O_PATH

def test_opath(bins, procs, tmp_path):
    d = tmp_path / "op"
    d.mkdir()
    r = _start(procs, [bins["fd_opath"], d], tmp_path / "opath.log")
    assert_pass(r.pid, r.log, "fd_opath")
    _cycle(r, "fd_opath", tmp_path, procs)


def test_opath_link_replaced_by_file(bins, procs, tmp_path):
    """The symlink an O_NOFOLLOW O_PATH fd named became a file: refused
    with the path and both types, no process left."""
    d = tmp_path / "op"
    d.mkdir()
    r = _start(procs, [bins["fd_opath"], d], tmp_path / "opath.log")
    lcr("checkpoint", r.pid, "-o", tmp_path / "img")
    reap(r.pid)
    (d / "link").unlink()
    (d / "link").write_text("now a file\n")
    cp = lcr("restart", tmp_path / "img", check=False)
    assert_clean_error(cp, "RestoreError", mentions=[str(d / "link"), "symbolic link", "regular file"])
    assert not helpers.exists(r.pid)


# --------------------------------------------------------------------------
# pidfds

def test_pidfd(bins, trees, tmp_path):
    """pidfds of two children (pidfd_open, clone3 CLONE_PIDFD) reach the
    restored children; one of a reaped child still reports its exit; after
    a restart, the death of a child is seen through its pidfd.  (Trees:
    the parent is killed before its children, which it never reaps.)"""
    log = tmp_path / "pidfd.log"
    p = helpers.start_detached([bins["fd_pidfd"]], log)
    trees.add(p.pid, p)
    m = wait_for_line(log, r"^READY pid=(\d+) a=(\d+) b=(\d+)", pid=p.pid)
    a, b = int(m.group(2)), int(m.group(3))
    assert "a=alive" in assert_pass(p.pid, log, "fd_pidfd").string
    for c in range(2):
        cp = lcr("checkpoint", p.pid, "-o", tmp_path / f"img{c}", check=False)
        _no_internal(cp)
        assert cp.returncode == 0, cp.stderr
        for k in (p.pid, a, b):
            reap(k)
        cp = lcr("restart", tmp_path / f"img{c}", check=False)
        _no_internal(cp)
        assert cp.returncode == 0, cp.stderr
        trees.add(int(cp.stdout))
        assert int(cp.stdout) == p.pid and helpers.alive(a) and helpers.alive(b)
        assert "a=alive" in assert_pass(p.pid, log, "fd_pidfd").string
    os.kill(a, 9)
    helpers.wait_state(a, "Z")
    assert "a=dead" in assert_pass(p.pid, log, "fd_pidfd").string


def test_pidfd_outside_tree_refused(bins, procs, tmp_path):
    r = _start(procs, [bins["fd_zoo"], "pidfd_parent", tmp_path], tmp_path / "zoo.log")
    cp = lcr("check", r.pid, check=False)
    _no_internal(cp)
    assert cp.returncode == 5, cp
    line = [ln for ln in cp.stdout.splitlines() if "pidfd" in ln]
    assert line and f"pid {r.pid}" in line[0] and "fd 3" in line[0] and \
        "not part of this process tree" in line[0], cp.stdout
    cp = lcr("checkpoint", r.pid, "-o", tmp_path / "img", check=False)
    assert_clean_error(cp, "NotCheckpointable", mentions=[str(r.pid), "fd 3", "pidfd", str(os.getpid())])
    assert_running_untraced(r.pid)


# --------------------------------------------------------------------------
# UNIX datagram clients of a named server (/dev/log style)

def test_unix_dgram_connected_clients(bins, procs, tmp_path):
    """A bound datagram server, an unbound client and a bound client both
    connect()ed to it: the clients are connected again, the server keeps
    its queued datagram, the bound client's datagrams carry its name."""
    d = tmp_path / "s"
    d.mkdir()
    r = _start(procs, [bins["sock_unix_dgram_conn"], d], tmp_path / "dgc.log")
    assert_pass(r.pid, r.log, "sock_unix_dgram_conn")
    _cycle(r, "sock_unix_dgram_conn", tmp_path, procs)


# --------------------------------------------------------------------------
# the sweep: restored, or refused with one line naming pid, fd, kind, way out

RESTORED = ["netlink_route", "netlink_generic", "deleted_dir"]
REFUSED = {
    "netlink_uevent": "netlink socket (NETLINK_KOBJECT_UEVENT)",
    "packet": "packet socket",
    "vsock": "vsock socket",
    "alg": "AF_ALG",
    "icmp": "datagram IPv4 socket (ICMP)",
}   # unlinked FIFOs and devices, fanotify: tests/test_fdkinds_extra.py


@pytest.mark.parametrize("kind", RESTORED)
def test_zoo_restored(kind, bins, procs, tmp_path):
    r = _start(procs, [bins["fd_zoo"], kind, tmp_path], tmp_path / "zoo.log")
    assert_pass(r.pid, r.log, "fd_zoo")
    _cycle(r, "fd_zoo", tmp_path, procs)
    if kind == "deleted_dir":
        assert os.readlink(f"/proc/{r.pid}/fd/3") == f"{tmp_path}/obj (deleted)"
        assert not (tmp_path / "obj").exists()


@pytest.mark.parametrize("kind", list(REFUSED))
def test_zoo_refused(kind, bins, procs, tmp_path):
    r = _start(procs, [bins["fd_zoo"], kind, tmp_path], tmp_path / "zoo.log")
    cp = lcr("check", r.pid, check=False)
    _no_internal(cp)
    assert cp.returncode == 5, cp
    lines = [ln for ln in cp.stdout.splitlines() if "fd 3:" in ln]
    assert len(lines) == 1, cp.stdout
    assert f"pid {r.pid}" in lines[0] and REFUSED[kind] in lines[0], lines[0]
    assert re.search(r"close it|keep its name|until the program|only .* restored", lines[0]), lines[0]
    cp = lcr("checkpoint", r.pid, "-o", tmp_path / "img", check=False)
    assert_clean_error(cp, "NotCheckpointable", mentions=[str(r.pid), "fd 3", REFUSED[kind]])
    assert not (tmp_path / "img").exists()
    assert_running_untraced(r.pid)
    assert_pass(r.pid, r.log, "fd_zoo")


# --------------------------------------------------------------------------
# as an ordinary user







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


ROOTLESS = {"fd_opath": lambda b, wd: [b["fd_opath"], wd / "op"],
            "fd_pidfd": lambda b, wd: [b["fd_pidfd"]],
            "fd_zoo": lambda b, wd: [b["fd_zoo"], "netlink_route", wd],
            "sock_unix_dgram_conn": lambda b, wd: [b["sock_unix_dgram_conn"], wd / "op"]}


@pytest.mark.parametrize("name", list(ROOTLESS))
def test_as_user(name, user, wd, bins, trees):
    (wd / "op").mkdir()
    os.chown(wd / "op", user.uid, user.uid)
    log = wd / f"{name}.log"
    p = start_as(user, ROOTLESS[name](bins, wd), log, cwd=wd)
    trees.add(p.pid, p)
    m = wait_for_line(log, r"^(READY pid=(\d+)|SKIP )", pid=p.pid)
    if m.group(0).startswith("SKIP"):
        pytest.skip(m.string)
    kids = [int(x) for x in re.findall(r"[ab]=(\d+)", m.string)]
    assert_pass(p.pid, log, name)
    cp = lcr_as(user, "checkpoint", p.pid, "-o", wd / "img", check=False)
    _no_internal(cp)
    assert cp.returncode == 0, cp.stderr
    for k in [p.pid] + kids:
        reap(k)
    new = _restart_as(user, wd / "img", trees)
    assert nspid(new)[-1] == p.pid
    m = assert_pass(new, log, name)
    if name == "fd_pidfd":
        assert "a=alive" in m.string
