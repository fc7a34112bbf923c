"""`lcr run --uts/--hostname, --net, --mount` (issue 17): the namespaces a
tree gets, made again on restart (tests/progs/ns_probe.py checks its
hostname and loopback itself), the tmpfs and bind mounts of a --mount
tree; what lcr cannot give back yet is refused with a reason."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from helpers import assert_pass, lcr, ns_inode, reap, wait_for_line
from rootless_helpers import lcr_as, root_or_user

pytestmark = pytest.mark.e2e
PROBE = Path(__file__).resolve().parent / "progs" / "ns_probe.py"


@pytest.mark.parametrize("who", ["root", "lcrtest"])
def test_uts_net(trees, who, request):
    user, wd = root_or_user(request, who)
    log = wd / "ns.log"
    root = trees.add(int(lcr_as(user, "run", "--hostname", "box-1", "--net", "-o", log, "--",
                                sys.executable, PROBE, "box-1").stdout))
    wait_for_line(log, r"^READY pid=2$")      # under lcr run's init (pid 1)
    assert_pass(root, log, "ns_probe")
    for kind in ("uts", "net"):
        assert ns_inode(root, kind) != ns_inode("self", kind)
    img = wd / "img"
    lcr_as(user, "checkpoint", root, "-o", img)
    reap(root)
    new = trees.add(int(lcr_as(user, "restart", img).stdout))
    assert_pass(new, log, "ns_probe")
    for kind in ("uts", "net"):
        assert ns_inode(new, kind) != ns_inode("self", kind), f"restored into lcr's {kind} namespace"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts inside the namespace as root")
def test_mount(trees, tmp_path):
    """A tmpfs (with its files) and a read-only bind mount the tree made come
    back in its new mount namespace, never in lcr's."""
    t, b, src = tmp_path / "t", tmp_path / "b", tmp_path / "src"
    for d in (t, b, src):
        d.mkdir()
    (src / "f").write_text("bound")
    log = tmp_path / "m.log"
    script = (f"mount -t tmpfs -o size=2m,mode=751 lcrtmp {t} && mkdir {t}/d && "
              f"echo data > {t}/d/x && chmod 640 {t}/d/x && ln -s d/x {t}/l && "
              f"mount --bind {src} {b} && mount -o remount,bind,ro {b} && cd / && "
              "echo MOUNTED && exec sleep 1000")
    root = trees.add(int(lcr("run", "--mount", "-o", log, "--", "sh", "-c", script).stdout))
    wait_for_line(log, r"^MOUNTED$")
    assert not os.path.ismount(t), "the tree's mount leaked out of its namespace"
    img = tmp_path / "img"
    lcr("checkpoint", root, "-o", img)
    reap(root)
    new = trees.add(int(lcr("restart", img).stdout))
    assert ns_inode(new, "mnt") != ns_inode("self", "mnt"), "restored into lcr's mount namespace"
    inside = Path(f"/proc/{new}/root")
    assert (inside / str(t)[1:] / "l").read_text() == "data\n"
    assert oct((inside / str(t)[1:] / "d" / "x").stat().st_mode & 0o777) == oct(0o640)
    assert (inside / str(b)[1:] / "f").read_text() == "bound"
    with open(f"/proc/{new}/mountinfo") as f:
        mi = f.read()
    assert re.search(rf" {re.escape(str(t))} \S+ - tmpfs \S+ \S*size=2048k,mode=751", mi), mi
    assert re.search(rf" {re.escape(str(b))} ro,", mi), mi
    assert not os.path.ismount(t) and not os.path.ismount(b)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts inside the namespace as root")
def test_mount_refused(trees, tmp_path):
    """What lcr cannot give back yet, refused with where: a file open under
    a mount the tree made; a proc mount."""
    t = tmp_path / "t"
    t.mkdir()
    log = tmp_path / "m.log"
    root = trees.add(int(lcr("run", "--mount", "-o", log, "--", "sh", "-c",
                             f"mount -t tmpfs x {t} && exec 3>{t}/open && echo MOUNTED && "
                             "exec sleep 1000").stdout))
    wait_for_line(log, r"^MOUNTED$")
    cp = lcr("checkpoint", root, "-o", tmp_path / "img", check=False)
    assert cp.returncode == 5 and f"{t}/open is under {t}" in cp.stderr, cp.stderr
    p = tmp_path / "p"
    p.mkdir()
    root = trees.add(int(lcr("run", "--mount", "-o", log, "--", "sh", "-c",
                             f"mount -t proc proc {p} && echo MOUNTED2 && exec sleep 1000").stdout))
    wait_for_line(log, r"^MOUNTED2$")
    cp = lcr("check", root, check=False)
    assert cp.returncode == 5 and f"proc mounted on {p}" in cp.stdout, cp.stdout
