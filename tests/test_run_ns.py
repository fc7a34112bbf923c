"""`lcr run --uts/--hostname, --net, --mount` (issue 17): the namespaces a
tree gets, made again on restart (tests/progs/ns_probe.py checks its
hostname and loopback itself); what lcr cannot give back yet is refused
with a reason (mounts made inside a --mount tree)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers import assert_pass, lcr, reap, wait_for_line
from rootless_helpers import Trees, find_user, lcr_as, user_can_run_lcr, user_workdir

pytestmark = pytest.mark.e2e
PROBE = Path(__file__).resolve().parent / "progs" / "ns_probe.py"


@pytest.fixture
def trees():
    reg = Trees()
    yield reg
    problems = reg.kill_all()
    assert not problems, f"teardown could not kill: {problems}"


def _ns(pid: int | str, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


@pytest.mark.parametrize("who", ["root", "lcrtest"])
def test_uts_net(trees, tmp_path, who):
    user = None
    wd = tmp_path
    if who == "lcrtest":
        user = find_user()
        why = user_can_run_lcr(user)
        if why:
            pytest.skip(why)
        wd = user_workdir(user)
    elif os.geteuid() != 0:
        pytest.skip("root run")
    log = wd / "ns.log"
    root = trees.add(int(lcr_as(user, "run", "--hostname", "box-1", "--net", "-o", log, "--",
                                sys.executable, PROBE, "box-1").stdout))
    wait_for_line(log, r"^READY pid=1$")
    assert_pass(root, log, "ns_probe")
    for kind in ("uts", "net"):
        assert _ns(root, kind) != _ns("self", kind)
    img = wd / "img"
    lcr_as(user, "checkpoint", root, "-o", img)
    reap(root)
    new = trees.add(int(lcr_as(user, "restart", img).stdout))
    assert_pass(new, log, "ns_probe")
    for kind in ("uts", "net"):
        assert _ns(new, kind) != _ns("self", kind), f"restored into lcr's {kind} namespace"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts inside the namespace as root")
def test_mount(trees, tmp_path):
    d = tmp_path / "mnt"
    d.mkdir()
    log = tmp_path / "m.log"
    root = trees.add(int(lcr("run", "--mount", "-o", log, "--", "sh", "-c",
                             f"echo READY; exec sleep 1000").stdout))
    wait_for_line(log, r"^READY$")
    img = tmp_path / "img"
    lcr("checkpoint", root, "-o", img)
    reap(root)
    new = trees.add(int(lcr("restart", img).stdout))
    assert _ns(new, "mnt") != _ns("self", "mnt"), "restored into lcr's mount namespace"
    # a tree that mounted something: refused, with where
    root = trees.add(int(lcr("run", "--mount", "-o", log, "--", "sh", "-c",
                             f"mount -t tmpfs lcrtmp {d} && echo MOUNTED; exec sleep 1000").stdout))
    wait_for_line(log, r"^MOUNTED$")
    assert not os.path.ismount(d), "the tree's mount leaked out of its namespace"
    cp = lcr("check", root, check=False)
    assert cp.returncode == 5 and f"tmpfs on {d}" in cp.stdout, cp.stdout
