"""Migration keeps an `lcr run` tree's own namespaces as `lcr restart`
does: the destination's tree gets a uts (its hostname), ipc and network
namespace of its own again, also when the final image is incremental
(the skeleton's blanks are made in them).

The tree is started and migrated from one shell in namespace A: each `ip
netns exec` makes a mount namespace of its own, and a tree in another
mount namespace than the migrating lcr's is refused (its mounts)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import assert_pass
from test_migrate import (LCR_MIG, PORT, TOKEN, Receiver, _env, _restored, needs_net,  # noqa: F401
                          net)
from test_run_ns import PROBE

pytestmark = pytest.mark.e2e


def _ns(pid, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


@needs_net
def test_migrated_tree_keeps_its_namespaces(net, trees, procs, tmp_path):  # noqa: F811
    log, pidfile = tmp_path / "ns.log", tmp_path / "root.pid"
    py = shlex.quote(sys.executable)
    script = (f"{py} -m linuxcr run --hostname box-1 --ipc --net -o {log} -- {py} {PROBE} box-1 "
              f"> {pidfile} || exit 9; "
              f"until grep -q '^READY pid=2$' {log}; do sleep 0.05; done; "
              f"{shlex.join(map(str, LCR_MIG))} migrate $(cat {pidfile}) "
              f"--to {net.addr_b}:{PORT} --token {TOKEN}")
    recv = Receiver(net, procs, tmp_path)
    cp = subprocess.run(net.exec_a(["sh", "-c", script]), capture_output=True, text=True,
                        timeout=240, env=_env(verbose=False), stdin=subprocess.DEVNULL)
    if pidfile.exists() and pidfile.read_text().strip():
        trees.add(int(pidfile.read_text()))
    if cp.returncode != 0:
        recv.p.kill()
    assert cp.returncode == 0, cp.stderr
    new = trees.add(_restored(recv, procs))
    assert not re.search("full image", cp.stdout + cp.stderr), cp.stdout   # the skeleton's path
    for kind in ("uts", "ipc", "net"):
        assert _ns(new, kind) != _ns("self", kind), f"migrated into lcr's {kind} namespace"
    assert_pass(new, log, "ns_probe")
