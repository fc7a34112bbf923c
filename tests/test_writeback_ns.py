"""`lcr writeback` of a snapshot of an `lcr run` tree writes what `lcr
checkpoint` writes: the tree's own namespaces (restart makes them again:
its hostname) and the identity of its mapped files (restart refuses a
file that changed)."""
from __future__ import annotations

import json
import os
import sys

import pytest

from helpers import assert_pass, lcr, reap, wait_for_line
from linuxcr.image.schema import RecType
from linuxcr.image.stream import ImageReader
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
