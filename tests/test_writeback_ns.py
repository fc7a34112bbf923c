"""`lcr writeback` of a snapshot of an `lcr run` tree writes what `lcr
checkpoint` writes: the tree's own namespaces (restart makes them again:
its hostname) and the identity of its mapped files (restart refuses a
file that changed).  A rollback gives the hostname of the tree's own uts
namespace back."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from helpers import assert_pass, lcr, log_size, reap, wait_for_line
from linuxcr.image.schema import RecType
from linuxcr.image.stream import ImageReader
from linuxcr.resources import pstree
from test_run_ns import PROBE
from test_snapshots import agent_env  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e


def _tree(img):
    with open(img, "rb") as f:
        r = ImageReader(f.fileno(), name=str(img))
        r.read_header()
        rec = r.next()
        assert rec.type is RecType.TREE
        return rec.meta


@pytest.mark.skipif(os.geteuid() != 0, reason="lcr run --hostname as root (rootless: test_run_ns)")
def test_writeback_keeps_namespaces_and_identities(trees, tmp_path, agent_env):  # noqa: F811
    log = tmp_path / "ns.log"
    root = trees.add(int(lcr("run", "--hostname", "box-1", "--ipc", "--net", "-o", log, "--",
                             sys.executable, PROBE, "box-1").stdout))
    wait_for_line(log, r"^READY pid=2$")
    snap = json.loads(lcr("snapshot", root, "--json", env=agent_env).stdout)
    img = tmp_path / "wb.img"
    lcr("writeback", snap["crid"], "-o", img, env=agent_env)
    tree = _tree(img)
    assert tree.ns is not None and sorted(tree.ns.kinds) == ["ipc", "net", "uts"], tree.ns
    assert tree.ns.hostname == "box-1"
    assert any(i.path == sys.executable or i.path == os.path.realpath(sys.executable)
               for i in tree.identities), [i.path for i in tree.identities]
    lcr("discard", snap["crid"], env=agent_env)
    os.kill(root, 9)
    reap(root)
    new = trees.add(int(lcr("restart", img).stdout))
    for kind in ("uts", "ipc", "net"):
        assert os.stat(f"/proc/{new}/ns/{kind}").st_ino != os.stat(f"/proc/self/ns/{kind}").st_ino
    assert_pass(new, log, "ns_probe")


HOSTNAMER = ("import signal, socket, time\n"
             "signal.signal(signal.SIGUSR2, lambda *a: (socket.sethostname('changed'),"
             " print('CHANGED', flush=True)))\n"
             "print('READY', flush=True)\n"
             "while True: time.sleep(1)\n")


def _hostname(pid: int) -> str:
    return subprocess.run(["nsenter", "-t", str(pid), "-u", "hostname"], capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="lcr run --hostname as root; nsenter")
def test_rollback_gives_the_hostname_back(trees, tmp_path, agent_env):  # noqa: F811
    log = tmp_path / "host.log"
    root = trees.add(int(lcr("run", "--hostname", "box-1", "-o", log, "--",
                             sys.executable, "-c", HOSTNAMER).stdout))
    wait_for_line(log, r"^READY$")
    (child,) = pstree.children(root)
    snap = json.loads(lcr("snapshot", root, "--json", env=agent_env).stdout)
    start = log_size(log)
    os.kill(child, signal.SIGUSR2)
    wait_for_line(log, r"^CHANGED$", start=start)
    assert _hostname(child) == "changed"
    lcr("rollback", snap["crid"], env=agent_env)
    assert _hostname(child) == "box-1"
    lcr("discard", snap["crid"], env=agent_env)
