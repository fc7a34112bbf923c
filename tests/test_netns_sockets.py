"""Sockets inside `lcr run --net` (issue 17): a tree in a network namespace
of its own, holding a TCP listener, an established connection to itself
(both ends, bytes queued), a UDP socket with a datagram queued, an abstract
UNIX listener and a netlink socket, is
checkpointed, killed and restarted into a fresh network namespace, where it
keeps serving (tests/progs/netns_server.py checks from inside: its unread
bytes and datagram are there, the pair carries bytes, the listener takes a
new connection).  As root and as an ordinary user (lcr run makes it a user
namespace: lcr has CAP_NET_ADMIN over the tree's network namespace, so the
established connection is saved with TCP repair mode there too).

What lcr cannot make again is refused by name: a socket of a network
namespace the tree made itself later."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers import assert_pass, lcr, ns_inode, reap, wait_for_line
from rootless_helpers import descendants, lcr_as, root_or_user

pytestmark = pytest.mark.e2e
PROGS = Path(__file__).resolve().parent / "progs"
SERVER = PROGS / "netns_server.py"


def _tcp_states(pid: int, port: int) -> list[str]:
    """States (hex) of the TCP sockets on ``port`` in pid's network namespace."""
    with open(f"/proc/{pid}/net/tcp") as f:
        rows = [ln.split() for ln in f.readlines()[1:]]
    return sorted(r[3] for r in rows
                  if int(r[1].split(":")[1], 16) == port or int(r[2].split(":")[1], 16) == port)


@pytest.mark.parametrize("who", ["root", "lcrtest"])
def test_sockets_in_own_netns(trees, who, request):
    user, wd = root_or_user(request, who)
    log = wd / "srv.log"
    root = trees.add(int(lcr_as(user, "run", "--net", "-o", log, "--",
                                sys.executable, SERVER).stdout))
    wait_for_line(log, r"^READY pid=2$")
    prog = descendants(root)[0]
    # listener + both ends of the connection, in the tree's namespace only
    assert _tcp_states(prog, 7070) == ["01", "01", "0A"], _tcp_states(prog, 7070)
    assert ns_inode(prog, "net") != ns_inode("self", "net")
    check = lcr_as(user, "check", root, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    img = wd / "img"
    lcr_as(user, "checkpoint", root, "-o", img)
    reap(root)
    new = trees.add(int(lcr_as(user, "restart", img).stdout))
    prog = descendants(new)[0]
    assert ns_inode(prog, "net") != ns_inode("self", "net"), "restored into lcr's network namespace"
    assert _tcp_states(prog, 7070) == ["01", "01", "0A"], _tcp_states(prog, 7070)
    m = assert_pass(new, log, "netns_server")          # queued bytes and datagram, then a round
    assert "round=0" in m.string, m.string
    assert_pass(new, log, "netns_server")              # and it goes on serving
    # a second checkpoint of the restored tree works the same
    img2 = wd / "img2"
    lcr_as(user, "checkpoint", new, "-o", img2)
    reap(new)
    again = trees.add(int(lcr_as(user, "restart", img2).stdout))
    assert_pass(again, log, "netns_server")


OTHER_NS = r"""
import ctypes, os, signal, socket
libc = ctypes.CDLL(None, use_errno=True)
home = os.open("/proc/self/ns/net", os.O_RDONLY)
assert libc.unshare(0x40000000) == 0, ctypes.get_errno()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 9999))
assert libc.setns(home, 0x40000000) == 0, ctypes.get_errno()
print("READY", flush=True)
signal.pause()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the tree makes a network namespace: root")
def test_socket_of_another_netns_refused(trees, tmp_path):
    """A socket made in a network namespace the tree unshared later (its task
    back in the --net one) is refused by name, not restored in the wrong one."""
    log = tmp_path / "o.log"
    root = trees.add(int(lcr("run", "--net", "-o", log, "--", sys.executable, "-c",
                             OTHER_NS).stdout))
    wait_for_line(log, r"^READY$")
    cp = lcr("check", root, check=False)
    assert cp.returncode == 5, cp.stdout + cp.stderr
    assert "UDP socket 127.0.0.1:9999 belongs to a network namespace the tree made itself" \
        in cp.stdout, cp.stdout
    assert "Traceback" not in cp.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="root run")
def test_migrate_and_writeback_refused(trees, tmp_path):
    """Migration and the writeback of a snapshot do not make the tree's own
    network namespace again: refused with that reason, never "use lcr run
    --net" (the tree already has it)."""
    import signal
    from helpers import child_env
    log = tmp_path / "srv.log"
    root = trees.add(int(lcr("run", "--net", "-o", log, "--", sys.executable, SERVER).stdout))
    wait_for_line(log, r"^READY pid=2$")
    cp = lcr("migrate", root, "--to", "127.0.0.1:9", "--token", "0123456789abcdef", check=False)
    assert cp.returncode == 5, cp.stderr
    assert "migration is not yet for a tree in its own network namespace" in cp.stderr, cp.stderr
    agent = tmp_path / "agent"
    env = child_env({"LCR_AGENT_DIR": str(agent)})
    try:
        crid = lcr("snapshot", "-q", root, env=env).stdout.strip()
        wb = lcr("writeback", crid, "-o", tmp_path / "wb.img", check=False, env=env)
        assert wb.returncode == 5, wb.stderr
        assert "not yet for a tree in its own network namespace" in wb.stderr, wb.stderr
        assert "--net`" not in wb.stderr and "Traceback" not in wb.stderr
        lcr("discard", crid, env=env)
    finally:
        try:
            os.kill(int((agent / "agent.pid").read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    assert_pass(root, log, "netns_server")      # refused: it runs on untouched
