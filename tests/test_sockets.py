"""End to end: sockets beyond connected UNIX pairs (loopback only).

- TCP: an echo server checkpointed (killed) and restarted while a client
  that is not part of the checkpointed tree keeps its connection and keeps
  sending: no reset, every reply intact and in order; the listener accepts
  new connections after the restart (IPv4 and IPv6); a connection whose both
  ends are in the process, with bytes queued both ways; --leave-running
  leaves the connection alone and a restart of that image is refused
  clearly (the original still holds the address).
- UNIX: a listening server and its client in one tree (path and abstract
  name); a bound datagram socket with datagrams queued (not consumed by the
  dump; a stale socket file is replaced, a live one refused).
- UDP: a socket bound and connected, with datagrams queued (IPv4, IPv6).
- `lcr check` reasons: a TCP socket in SYN_SENT, a listener with a
  connection not accepted yet, an established connection as non-root.

Every process is killed and reaped by pid at teardown; so are the keepers
lcr leaves holding checkpointed TCP connections (see fdkinds/tcp.py).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

import helpers
from helpers import (PROGS_DIR, assert_clean_error, assert_pass, assert_running_untraced,
                     checkpoint_kill_restart, lcr, wait_for_line)
from rootless_helpers import (Trees, checkpoint_tree, find_user, lcr_as, restart_tree, start_as,
                              user_can_run_lcr, user_workdir, wait_until)

pytestmark = pytest.mark.e2e

CLIENT = PROGS_DIR / "sock_tcp_client.py"
PROGRESS = 60.0           # safety bound for a client to make progress


def _keepers() -> set[int]:
    """Keeper processes (fdkinds/tcp.py) that came to us (a subreaper)."""
    out = set()
    me = str(os.getpid())
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        st = helpers.proc_status(int(d))
        if not st or st.get("PPid") != me:
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-c" in argv and any(b"TCP_REPAIR" in a for a in argv):
            out.add(int(d))
    return out


@pytest.fixture(autouse=True)
def no_keepers_left():
    yield
    for p in _keepers():
        helpers.kill_and_reap(p)




def _start(procs, argv, log, pattern=r"^READY pid=(\d+)"):
    p = procs.start(argv, log)
    m = wait_for_line(log, pattern, helpers.READY_TIMEOUT, pid=p.pid)
    assert int(m.group(1)) == p.pid, m.string
    return p.pid, m


def _progress(log) -> int:
    ns = [int(x) for x in re.findall(r"^OK n=(\d+)", helpers.read_log(log), re.M)]
    return max(ns, default=0)


def _wait_progress(log, above: int, pid: int) -> int:
    def more():
        text = helpers.read_log(log)
        assert "FAIL" not in text, f"client failed:\n{text[-2000:]}"
        assert helpers.alive(pid), f"client {pid} died:\n{text[-2000:]}"
        n = _progress(log)
        return n if n > above else 0
    return wait_until(more, PROGRESS, f"the client to get past {above} replies")


def _echo(port: int, host: str = "127.0.0.1", data: bytes = b"hello after restart") -> bytes:
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        return got


def _tcp_conns(port: int) -> list[str]:
    """Lines of /proc/net/tcp{,6} for sockets on local or remote port."""
    out = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(name).read_text().splitlines()[1:]:
            f = line.split()
            lport = int(f[1].rsplit(":", 1)[1], 16)
            rport = int(f[2].rsplit(":", 1)[1], 16)
            if port in (lport, rport):
                out.append(line)
    return out


# --------------------------------------------------------------------------
# TCP

@pytest.mark.parametrize("family", ["4", "6"])
def test_tcp_echo_with_outside_client(family, bins, procs, tmp_path):
    host = "127.0.0.1" if family == "4" else "::1"
    slog, clog = tmp_path / "server.log", tmp_path / "client.log"
    server, m = _start(procs, [bins["sock_tcp_echo"], family], slog, r"^READY pid=(\d+) port=(\d+)")
    port = int(m.group(2))
    client, _ = _start(procs, [sys.executable, CLIENT, host, port], clog)
    n0 = _wait_progress(clog, 40, client)

    assert lcr("check", server).returncode == 0
    new = checkpoint_kill_restart(server, tmp_path / "img", procs)
    assert new == server
    assert_running_untraced(new)

    n1 = _wait_progress(clog, n0 + 200, client)
    assert_pass(client, clog, "sock_tcp_client")
    m = assert_pass(new, slog, "sock_tcp_echo")
    assert "conns=1 accepted=1" in m.string, m.string
    # the listener takes new connections
    assert _echo(port, host) == b"hello after restart"
    _wait_progress(clog, n1 + 20, client)
    assert "FAIL" not in helpers.read_log(clog)
    wait_until(lambda: not _keepers(), 10, "the keeper to hand over and exit")


def test_tcp_client_side(bins, procs, tmp_path):
    """The checkpointed process is the client (an outgoing connection from
    an ephemeral port); the server is not checkpointed.  A restart while the
    original still has the connection is refused; a real one carries on."""
    slog, clog = tmp_path / "server.log", tmp_path / "client.log"
    server, m = _start(procs, [bins["sock_tcp_echo"]], slog, r"^READY pid=(\d+) port=(\d+)")
    port = int(m.group(2))
    client, _ = _start(procs, [sys.executable, CLIENT, "127.0.0.1", port], clog)
    n0 = _wait_progress(clog, 40, client)

    img = tmp_path / "img-live"
    lcr("checkpoint", client, "-o", img, "--leave-running")
    n1 = _wait_progress(clog, n0 + 50, client)
    cp = lcr("restart", img, "--any-pid", check=False)
    line = assert_clean_error(cp, "RestoreError", mentions=["TCP connection", "leave-running"])
    assert f":{port}" in line, line
    n2 = _wait_progress(clog, n1 + 50, client)

    new = checkpoint_kill_restart(client, tmp_path / "img", procs)
    _wait_progress(clog, n2 + 200, new)
    assert_pass(new, clog, "sock_tcp_client")
    m = assert_pass(server, slog, "sock_tcp_echo")
    assert "conns=1 accepted=1" in m.string, m.string


def test_tcp_listener_only(bins, procs, tmp_path):
    log = tmp_path / "server.log"
    server, m = _start(procs, [bins["sock_tcp_echo"]], log, r"^READY pid=(\d+) port=(\d+)")
    port = int(m.group(2))
    new = checkpoint_kill_restart(server, tmp_path / "img", procs)
    for i in range(3):
        assert _echo(port, data=b"x%d" % i) == b"x%d" % i
    m = assert_pass(new, log, "sock_tcp_echo")
    assert "accepted=3" in m.string, m.string


@pytest.mark.parametrize("family", ["4", "6"])
def test_tcp_both_ends_in_process(family, bins, procs, tmp_path):
    """A connection to itself (listener, client, accepted end) with bytes
    queued both ways: both ends restored with repair mode, queues intact."""
    log = tmp_path / "pair.log"
    pid, m = _start(procs, [bins["sock_states"], "pair", family], log,
                    r"^READY pid=(\d+) port=(\d+)")
    port = int(m.group(2))
    assert_pass(pid, log, "sock_states")
    new = checkpoint_kill_restart(pid, tmp_path / "img", procs)
    assert_running_untraced(new)
    assert_pass(new, log, "sock_states")
    assert_pass(new, log, "sock_states")
    states = sorted(line.split()[3] for line in _tcp_conns(port))
    assert states == ["01", "01", "0A"], _tcp_conns(port)     # 2 x ESTABLISHED, LISTEN


def test_tcp_leave_running_then_restart_refused(bins, procs, tmp_path):
    slog, clog = tmp_path / "server.log", tmp_path / "client.log"
    server, m = _start(procs, [bins["sock_tcp_echo"]], slog, r"^READY pid=(\d+) port=(\d+)")
    port = int(m.group(2))
    client, _ = _start(procs, [sys.executable, CLIENT, "127.0.0.1", port], clog)
    n0 = _wait_progress(clog, 40, client)
    img = tmp_path / "img"
    lcr("checkpoint", server, "-o", img, "--leave-running")
    assert_running_untraced(server)
    n1 = _wait_progress(clog, n0 + 100, client)      # the connection goes on
    wait_until(lambda: not _keepers(), 10, "the keeper to let go")

    cp = lcr("restart", img, "--any-pid", check=False)
    assert_clean_error(cp, "RestoreError", mentions=["leave-running"])
    _wait_progress(clog, n1 + 100, client)           # and a failed restart did not hurt it
    assert_pass(server, slog, "sock_tcp_echo")
    assert_pass(client, clog, "sock_tcp_client")


# --------------------------------------------------------------------------
# UNIX

@pytest.mark.parametrize("where", ["path", "abstract"])
def test_unix_server_and_client_in_one_tree(where, bins, trees, tmp_path):
    name = str(tmp_path / "srv.sock") if where == "path" else f"@lcr-test-srv-{os.getpid()}"
    log = tmp_path / "tree.log"
    p = helpers.start_detached([bins["sock_unix_tree"], name], log)
    root = trees.add(p.pid, p)
    wait_for_line(log, r"^READY pid=(\d+) child=(\d+)", helpers.READY_TIMEOUT, pid=root)
    wait_for_line(log, r"^CHILD n=100\b", helpers.READY_TIMEOUT, pid=root)
    assert lcr("check", root).returncode == 0

    checkpoint_tree(root, tmp_path / "img")
    if where == "path":
        assert Path(name).is_socket()        # left behind by the killed server: stale
    new, _ = restart_tree(tmp_path / "img", trees)
    assert new == root
    last = max(int(x) for x in re.findall(r"^CHILD n=(\d+)", helpers.read_log(log), re.M))
    wait_for_line(log, rf"^CHILD n={last + 200}\b", 60, pid=root)
    assert "FAIL" not in helpers.read_log(log), helpers.read_log(log)[-2000:]
    assert_pass(root, log, "sock_unix_tree")
    # the listener takes new connections
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(name if where == "path" else "\0" + name[1:])
        s.sendall(b"hi there")
        assert s.recv(100) == b"hi there"
    m = assert_pass(root, log, "sock_unix_tree")
    assert "accepted=2" in m.string, m.string


def _send_dgrams(path: str, msgs: list[bytes]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for x in msgs:
            s.sendto(x, path)


def test_unix_dgram_queued(bins, procs, tmp_path):
    path = str(tmp_path / "dg.sock")
    log = tmp_path / "dg.log"
    pid, _ = _start(procs, [bins["sock_unix_dgram"], path], log)
    msgs = [b"first", b"second datagram", b"x" * 3000, b"last"]
    _send_dgrams(path, msgs)
    os.chmod(path, 0o640)
    new = checkpoint_kill_restart(pid, tmp_path / "img", procs)
    assert oct(os.stat(path).st_mode & 0o7777) == oct(0o640)
    _send_dgrams(path, [b"after"])
    m = assert_pass(new, log, "sock_unix_dgram")
    assert m.string.rstrip("\n").endswith("got=5 msgs=" + "|".join(x.decode() for x in msgs + [b"after"])), \
        m.string[:200]


def test_unix_dgram_leave_running(bins, procs, tmp_path):
    """The dump consumes nothing; a restart while the original still holds
    the name is refused."""
    path = str(tmp_path / "dg.sock")
    log = tmp_path / "dg.log"
    pid, _ = _start(procs, [bins["sock_unix_dgram"], path], log)
    _send_dgrams(path, [b"one", b"two"])
    img = tmp_path / "img"
    lcr("checkpoint", pid, "-o", img, "--leave-running")
    m = assert_pass(pid, log, "sock_unix_dgram")
    assert "got=2 msgs=one|two" in m.string, m.string
    cp = lcr("restart", img, "--any-pid", check=False)
    assert_clean_error(cp, "RestoreError", mentions=[path, "bound"])
    # a file that is not a socket is never removed
    helpers.kill_and_reap(pid)
    os.unlink(path)
    Path(path).write_text("not a socket")
    cp = lcr("restart", img, check=False)
    assert_clean_error(cp, "RestoreError", mentions=[path, "not a socket"])
    assert Path(path).read_text() == "not a socket"


# --------------------------------------------------------------------------
# UDP

@pytest.mark.parametrize("family", ["4", "6"])
def test_udp_bound_and_connected(family, bins, procs, tmp_path):
    fam, host = (socket.AF_INET, "127.0.0.1") if family == "4" else (socket.AF_INET6, "::1")
    peer = socket.socket(fam, socket.SOCK_DGRAM)
    peer.bind((host, 0))
    peer.settimeout(10)
    try:
        log = tmp_path / "udp.log"
        pid, m = _start(procs, [bins["sock_udp"], peer.getsockname()[1], family], log,
                        r"^READY pid=(\d+) port=(\d+)")
        port = int(m.group(2))
        for x in (b"alpha", b"beta", b"gamma"):
            peer.sendto(x, (host, port))
        time.sleep(0.1)
        new = checkpoint_kill_restart(pid, tmp_path / "img", procs)
        peer.sendto(b"delta", (host, port))       # the same port after the restart
        m = assert_pass(new, log, "sock_udp")
        assert "got=4 msgs=alpha|beta|gamma|delta" in m.string, m.string
        data, src = peer.recvfrom(100)            # it is still connected to us
        assert data == b"got=4" and src[1] == port, (data, src)
    finally:
        peer.close()


# --------------------------------------------------------------------------
# what `lcr check` says

def test_check_syn_sent(bins, procs, tmp_path):
    """A listener whose accept queue is full drops SYNs: a connect() to it
    stays in SYN_SENT."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    first = socket.create_connection(("127.0.0.1", port))     # fills the queue
    try:
        log = tmp_path / "syn.log"
        pid, m = _start(procs, [bins["sock_states"], "synsent", port], log,
                        r"^READY pid=(\d+) port=\d+ fd=(\d+)")
        fd = int(m.group(2))
        cp = lcr("check", pid, check=False)
        assert cp.returncode == 5, cp.stdout + cp.stderr
        assert f"fd {fd}: TCP socket in state SYN_SENT: cannot be checkpointed" in cp.stdout, cp.stdout
        cp = lcr("checkpoint", pid, "-o", tmp_path / "img", check=False)
        assert cp.returncode == helpers.error_exit_code("NotCheckpointable"), cp.stderr
        assert "SYN_SENT" in cp.stderr
        assert_running_untraced(pid)
        assert_pass(pid, log, "sock_states")
    finally:
        first.close()
        full.close()


def test_check_listener_with_pending_connection(bins, procs, tmp_path):
    log = tmp_path / "pending.log"
    pid, m = _start(procs, [bins["sock_states"], "pending"], log,
                    r"^READY pid=(\d+) port=(\d+) fd=(\d+)")
    port, fd = int(m.group(2)), int(m.group(3))
    assert lcr("check", pid).returncode == 0
    with socket.create_connection(("127.0.0.1", port)):
        cp = lcr("check", pid, check=False)
        assert cp.returncode == 5, cp.stdout + cp.stderr
        assert re.search(rf"fd {fd}: TCP socket listening on 127\.0\.0\.1:{port} has 1 "
                         r"connection\(s\) not accepted yet", cp.stdout), cp.stdout
    assert_pass(pid, log, "sock_states")


def test_check_unix_listener_with_pending_connection(bins, trees, tmp_path):
    name = str(tmp_path / "srv.sock")
    log = tmp_path / "tree.log"
    p = helpers.start_detached([bins["sock_unix_tree"], name], log)
    root = trees.add(p.pid, p)
    wait_for_line(log, r"^READY pid=", helpers.READY_TIMEOUT, pid=root)
    os.kill(root, signal.SIGSTOP)          # it accepts nothing while stopped
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(name)
            cp = lcr("check", root, check=False)
            # the waiting client is held by this test, outside the tree:
            # an external connection, named with its holder
            assert cp.returncode == 5, cp.stdout + cp.stderr
            assert "external connection" in cp.stdout and f"pid {os.getpid()}" in cp.stdout, cp.stdout
    finally:
        os.kill(root, signal.SIGCONT)




def test_check_tcp_as_non_root(user, bins, trees, tmp_path):
    wd = user_workdir(user)
    try:
        log = wd / "pair.log"
        p = start_as(user, [bins["sock_states"], "pair"], log, cwd=wd)
        pid = trees.add(p.pid, p)
        m = wait_for_line(log, r"^READY pid=(\d+) port=(\d+) fd=(\d+)", helpers.READY_TIMEOUT, pid=pid)
        cp = lcr_as(user, "check", pid, check=False)
        assert cp.returncode == 5, cp.stdout + cp.stderr
        hits = [ln for ln in cp.stdout.splitlines() if "CAP_NET_ADMIN" in ln]
        assert len(hits) == 2, cp.stdout       # the client's end and the accepted end
        assert any(f"fd {m.group(3)}:" in ln for ln in hits), cp.stdout
        assert all("run lcr as root" in ln for ln in hits), cp.stdout
        assert not any("LISTEN" in ln or "listening" in ln for ln in cp.stdout.splitlines()), cp.stdout
        assert_pass(pid, log, "sock_states")
    finally:
        shutil.rmtree(wd, ignore_errors=True)
