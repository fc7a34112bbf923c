"""`lcr receive` against hostile peers (issue 14, item 5).

Units run the destination's handshake (DestHandshake) and the accept loop
(protocol.Gate) in-process on loopback, each hostile peer from its own
127.0.0.X address (per-address rate limiting would otherwise mix them).
The end-to-end test runs the real `lcr receive` in namespace B, the hostile
peers from extra addresses of namespace A, then a real migration through
the same receiver.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading

import pytest

import helpers
import netns
from test_migrate import PORT, TOKEN, Receiver, _env, _migrate, _restored, _start_memhog

sys.path.insert(0, str(helpers.REPO))

from linuxcr.migration import protocol as P  # noqa: E402

KEY = TOKEN.encode()
BIG = 64 << 20
GONE = r"closed by the peer|lost \(Connection reset"   # FIN or RST, as the race goes


def _header(mtype: P.Msg, meta_len: int, data_len: int = 0) -> bytes:
    return P.FRAME.pack(P.MAGIC, int(mtype), 0, meta_len, data_len, 0)


def _source_bytes(dh: P.DestHandshake, token: bytes) -> bytes:
    """What a real source answers to ``dh``'s greeting (HELLO, AUTH)."""
    a, b = socket.socketpair()
    try:
        a.sendall(dh.greeting())
        conn = P.Conn(b, "dest", 5.0)
        out: dict = {}
        th = threading.Thread(target=lambda: out.setdefault("r", _try(conn, token)))
        th.start()
        a.settimeout(10)
        got = b"".join(_one_frame(a) for _ in range(2))     # HELLO, AUTH
        a.close()
        th.join(10)
        return got
    finally:
        b.close()


def _exactly(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        b = s.recv(n - len(got))
        assert b, "closed early"
        got += b
    return got


def _one_frame(s: socket.socket) -> bytes:
    head = _exactly(s, P.FRAME.size)
    _, _, _, meta_len, data_len, _ = P.FRAME.unpack(head)
    return head + _exactly(s, meta_len + data_len)


def _try(conn: P.Conn, token: bytes):
    try:
        return conn.handshake_source(token)
    except P.MigrationError as e:
        return e


# =============================================================================
# the handshake's caps

def test_preauth_frame_refused_on_the_header():
    """A 64 MiB frame before authentication is refused on its 28-byte
    header: nothing after it is read, nothing is allocated for it."""
    dh = P.DestHandshake(KEY, "peer")
    assert dh.want() == P.FRAME.size
    with pytest.raises(P.MigrationError, match=r"announced 67108864 bytes .*before authenticating"):
        dh.feed(_header(P.Msg.HELLO, BIG))
    assert len(dh.buf) == P.FRAME.size
    # a type the handshake does not expect: refused on the header too
    for mt in (P.Msg.TREE, P.Msg.PAGES, P.Msg.AUTH):
        dh = P.DestHandshake(KEY, "peer")
        with pytest.raises(P.MigrationError, match=f"{mt.name} before authenticating"):
            dh.feed(_header(mt, 10))
    # the largest metadata allowed is still read, one frame at most
    dh = P.DestHandshake(KEY, "peer")
    dh.feed(_header(P.Msg.HELLO, P.MAX_PREAUTH))
    assert dh.want() == P.MAX_PREAUTH


def test_source_side_preauth_cap():
    """The source, too, caps what a destination sends before proving the token."""
    from test_migrate import _recv_raw
    msg = _recv_raw(_header(P.Msg.HELLO, P.MAX_PREAUTH + 1), authenticated=False,
                    expect=(P.Msg.HELLO,))
    assert "before authenticating" in msg
    assert "TREE before authenticating" in _recv_raw(_header(P.Msg.TREE, 8), authenticated=False,
                                                     expect=(P.Msg.HELLO,))
    # once authenticated, the usual bounds apply (the same header passes the cap)
    assert "before authenticating" not in _recv_raw(_header(P.Msg.HELLO, P.MAX_PREAUTH + 1))


def test_postauth_data_length_checked_on_the_header():
    """PAGES data that is not whole pages is refused before it is read."""
    with pytest.raises(P.MigrationError, match="bytes of data"):
        P.parse_frame(_header(P.Msg.PAGES, 10, P.PAGE + 1), "peer")
    with pytest.raises(P.MigrationError, match="bytes of data"):
        P.parse_frame(_header(P.Msg.PAGES, 10, P.MAX_DATA + P.PAGE), "peer")


def test_dest_handshake_byte_by_byte():
    """A real source's answer, fed one byte at a time: authenticated, and
    the buffer never holds more than one frame."""
    dh = P.DestHandshake(KEY, "peer")
    raw = _source_bytes(dh, KEY)
    done = False
    for i in range(len(raw)):
        assert dh.want() >= 1 and len(dh.buf) <= P.FRAME.size + P.MAX_PREAUTH
        done = dh.feed(raw[i:i + 1])
    assert done and dh.session and dh.reply
    # wrong token: refused, with the reason to send back
    dh = P.DestHandshake(KEY, "peer")
    raw = _source_bytes(dh, b"another-token")
    with pytest.raises(P.AuthError, match="wrong token"):
        dh.feed(raw)
    assert "tokens differ" in dh.refusal


def test_blocking_handshake_deadline():
    """handshake_destination gives a peer that trickles or stalls a
    deadline for the whole handshake, not per read."""
    a, b = socket.socketpair()
    conn = P.Conn(b, "staller", 30.0)
    try:
        a.sendall(_header(P.Msg.HELLO, 100)[:10])     # a start, then silence
        with pytest.raises(P.MigrationError, match="did not authenticate within 0.3 s"):
            conn.handshake_destination(KEY, timeout=0.3)
    finally:
        a.close()
        conn.close()


# =============================================================================
# the gate, in-process

class GateRun:
    """A Gate on 127.0.0.1 in a thread; its log lines collected."""

    def __init__(self, limits: P.Limits, timeout: float | None = 60.0) -> None:
        self.lsock, where = P.listen("127.0.0.1:0")
        self.port = int(where.rsplit(":", 1)[1])
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.gate = P.Gate(self.lsock, KEY, 10.0, limits, self._log)
        self.result: tuple[P.Conn, bytes] | None = None
        self.error: BaseException | None = None
        self.th = threading.Thread(target=self._run, args=(timeout,), daemon=True)
        self.th.start()

    def _log(self, line: str) -> None:
        with self.cond:
            self.lines.append(line)
            self.cond.notify_all()

    def _run(self, timeout: float | None) -> None:
        try:
            self.result = self.gate.wait(timeout)
        except BaseException as e:   # handed to the test thread
            self.error = e
        with self.cond:
            self.cond.notify_all()

    def wait_lines(self, n: int, timeout: float = 30.0) -> list[str]:
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.lines) >= n or not self.th.is_alive(),
                                    timeout)
            assert ok and len(self.lines) >= n, (self.lines, self.error)
            return list(self.lines)

    def finish(self) -> None:
        """Cleanup (a test that failed early may leave the daemon thread waiting)."""
        self.th.join(2)
        if self.result:
            self.result[0].close()
        self.lsock.close()


def _connect(port: int, src: str, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(src, 0))


def _real_source(port: int, src: str, token: bytes = KEY) -> bytes | P.MigrationError:
    s = _connect(port, src)
    conn = P.Conn(s, f"127.0.0.1:{port}", 10.0)
    try:
        return _try(conn, token)
    finally:
        conn.close()


def _read_until_closed(s: socket.socket) -> bytes:
    got = b""
    while True:
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            return got
        if not b:
            return got
        got += b


def test_gate_hostile_peers_then_the_source():
    """Each hostile peer is logged in one line (its address, why) and
    dropped; the source that knows the token then gets in."""
    run = GateRun(P.Limits(handshake=0.5))
    try:
        n = 0

        def expect(pattern: str, src: str) -> None:
            nonlocal n
            n += 1
            line = run.wait_lines(n)[n - 1]
            assert src in line and re.search(pattern, line), run.lines

        _connect(run.port, "127.0.0.2").close()                       # connect and close
        expect(GONE, "127.0.0.2")
        s = _connect(run.port, "127.0.0.3")                            # garbage
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
        expect(r"does not speak the lcr migration protocol", "127.0.0.3")
        s.close()
        s = _connect(run.port, "127.0.0.4")                            # a 64 MiB frame
        s.sendall(_header(P.Msg.HELLO, BIG))
        expect(r"announced 67108864 bytes", "127.0.0.4")
        s.close()
        r = _real_source(run.port, "127.0.0.5", b"another-token")      # wrong token
        assert isinstance(r, P.AuthError) and "tokens differ" in str(r)
        expect(r"wrong token", "127.0.0.5")
        s = _connect(run.port, "127.0.0.6")                            # stalls
        _read_until_closed(s)                # the gate closes it at the deadline
        s.close()
        expect(r"did not authenticate within 0.5 s", "127.0.0.6")
        s = _connect(run.port, "127.0.0.7")                            # leaves mid-handshake
        s.recv(4096)
        s.sendall(b"".join(P.encode(P.Msg.HELLO, P.Hello(P.PROTO, "source", os.urandom(32)))))
        s.close()
        expect(GONE, "127.0.0.7")
        session = _real_source(run.port, "127.0.0.8")
        assert isinstance(session, bytes), session
        run.th.join(30)
        assert run.error is None and run.result is not None
        assert run.result[1] == session
        assert run.gate.failures == 6 and len(run.lines) == 6
    finally:
        run.finish()


def test_gate_source_not_held_up_by_a_staller():
    """A peer sitting in its handshake does not keep the source waiting."""
    run = GateRun(P.Limits(handshake=600))
    stallers = [_connect(run.port, "127.0.0.2") for _ in range(3)]
    try:
        session = _real_source(run.port, "127.0.0.3")
        assert isinstance(session, bytes), session
        run.th.join(30)
        assert run.result is not None and run.gate.failures == 0
        for s in stallers:               # closed by the gate once the source got in
            _read_until_closed(s)
    finally:
        for s in stallers:
            s.close()
        run.finish()


def test_gate_flood_rate_limited():
    """A flood of bad connections from one address: after its second
    failure its connections are dropped unread, with a growing delay, and
    logged once per window; accept is paced; the source still gets in."""
    run = GateRun(P.Limits(handshake=5, rate=100))
    flood = 300
    sent = 0
    try:
        for _ in range(flood):
            try:
                s = _connect(run.port, "127.0.0.2", timeout=2)
                s.sendall(b"\xff" * 64)
                s.close()
                sent += 1
            except OSError:
                pass               # refused or timed out in a full backlog: also fine
        assert sent > 50
        session = _real_source(run.port, "127.0.0.3")
        assert isinstance(session, bytes), session
        run.th.join(30)
        assert run.result is not None
        fails = [ln for ln in run.lines if "(failure" in ln]
        limited = [ln for ln in run.lines if "rate-limited" in ln]
        # handled: a handful (0, 0.25, 0.5, 1, 2 ... s apart), not hundreds
        assert 2 <= len(fails) < 15, run.lines
        assert limited and all("127.0.0.2" in ln for ln in fails + limited)
        assert len(run.lines) < 40, run.lines   # one line per failure or window
        assert len(run.gate.pending) == 0
    finally:
        run.finish()


def test_gate_bounded_pending_and_hosts():
    """Connections in their handshake and remembered addresses are bounded."""
    run = GateRun(P.Limits(handshake=600, pending=4, pending_per_host=2, hosts=3))
    socks = []
    try:
        for i in range(3):                       # 3 from one host: the third is dropped
            socks.append(_connect(run.port, "127.0.0.2"))
        lines = run.wait_lines(1)
        assert "2 connections from 127.0.0.2 already" in lines[0]
        for i in range(3):                       # 3 more hosts: the oldest pending goes
            socks.append(_connect(run.port, f"127.0.0.{3 + i}"))
        lines = run.wait_lines(2)
        assert "4 connections in their handshake; the oldest goes" in lines[1]
        assert "127.0.0.2" in lines[1]
        for i in range(5):                       # failures of 5 hosts: 3 remembered
            s = _connect(run.port, f"127.0.1.{i + 1}")
            s.sendall(b"\0" * 64)
            s.close()
        run.wait_lines(2 + 5)
        assert len(run.gate.hosts) <= 3
        assert len(run.gate.pending) <= 4
        assert isinstance(_real_source(run.port, "127.0.2.1"), bytes)
    finally:
        for s in socks:
            s.close()
        run.finish()


def test_gate_max_failures():
    """The bound: past --max-failures the gate gives up, with the last
    failure's class (AuthError for a wrong token)."""
    run = GateRun(P.Limits(max_failures=3))
    try:
        for i in range(2):
            s = _connect(run.port, f"127.0.0.{2 + i}")
            s.sendall(b"\0" * 64)
            s.close()
            run.wait_lines(i + 1)
        _real_source(run.port, "127.0.0.9", b"another-token")
        run.th.join(30)
        assert isinstance(run.error, P.AuthError), run.error
        assert "3 connections failed" in str(run.error) and "--max-failures 3" in str(run.error)
    finally:
        run.finish()


def test_gate_timeout():
    run = GateRun(P.Limits(), timeout=0.2)
    run.th.join(30)
    run.finish()
    assert isinstance(run.error, P.MigrationError) and "no migration arrived" in str(run.error)


# =============================================================================
# end to end: the real `lcr receive`

needs_net = pytest.mark.skipif(netns.available() is not None, reason=netns.available() or "")

HOSTILE = r'''
import os, socket, struct, sys, time
sys.path.insert(0, sys.argv[5])
from linuxcr.migration import protocol as P
mode, src, dst, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def conn(timeout=30):
    return socket.create_connection((dst, port), timeout=timeout, source_address=(src, 0))

def drain(s):
    n = 0
    try:
        while True:
            b = s.recv(65536)
            if not b:
                return n
            n += len(b)
    except (ConnectionResetError, socket.timeout):
        return n

if mode == "close":
    conn().close()
elif mode == "garbage":
    s = conn(); s.sendall(os.urandom(4096)); drain(s); s.close()
elif mode == "big":        # a 64 MiB frame before authenticating, pushed as fast as it goes
    s = conn()
    s.sendall(P.FRAME.pack(P.MAGIC, int(P.Msg.HELLO), 0, 64 << 20, 0, 0))
    sent = 0
    chunk = b"\0" * (1 << 20)
    try:
        while sent < (64 << 20):
            sent += s.send(chunk)
    except OSError:
        pass
    print(f"sent={sent}", flush=True)
    s.close()
elif mode == "stall":
    s = conn(); drain(s); s.close()
elif mode == "midway":     # HELLO, then gone before AUTH
    s = conn(); s.recv(4096)
    s.sendall(b"".join(P.encode(P.Msg.HELLO, P.Hello(P.PROTO, "source", os.urandom(32)))))
    s.close()
elif mode == "flood":
    n = 0
    for _ in range(int(sys.argv[6])):
        try:
            s = conn(timeout=2); s.sendall(b"\xff" * 64); s.close(); n += 1
        except OSError:
            pass
    print(f"connected={n}", flush=True)
'''


def _hwm_kib(pid: int) -> int:
    return int(helpers.proc_status(pid)["VmHWM"].split()[0])


@needs_net
@pytest.mark.e2e
def test_receive_survives_hostile_peers(procs, bins, tmp_path):
    """One `lcr receive`: a bare connect-and-close, garbage, a 64 MiB frame
    before authentication (refused on the header: the receiver's peak RSS
    does not grow by it), a peer that stalls (dropped after 5 s), one that
    leaves mid-handshake, a flood, a wrong token from the real lcr migrate;
    then the real migration through the same receiver succeeds."""
    with netns.two_namespaces() as net:
        prog = tmp_path / "hostile.py"
        prog.write_text(HOSTILE)
        hog = _start_memhog(procs, bins, tmp_path, 64)
        before = helpers.probe_hog(hog.pid, hog.log)
        recv = Receiver(net, procs, tmp_path, args=("--max-failures", "1000"))
        hosts = iter(net.extra_a)

        def hostile(mode: str, *extra) -> tuple[str, str]:
            src = next(hosts)
            cp = subprocess.run(net.exec_a([sys.executable, prog, mode, src, net.addr_b, PORT,
                                            helpers.REPO, *extra]),
                                capture_output=True, text=True, timeout=300, env=_env())
            assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
            return src, cp.stdout

        def logged(src: str, pattern: str) -> None:
            helpers.wait_for_line(recv.err, rf"dropped {re.escape(src)}:\d+: .*{pattern}",
                                  pid=recv.p.pid)

        src, _ = hostile("close")
        logged(src, GONE)
        src, _ = hostile("garbage")
        logged(src, "does not speak")
        hwm = _hwm_kib(recv.p.pid)
        src, out = hostile("big")
        logged(src, "announced 67108864 bytes")
        assert _hwm_kib(recv.p.pid) - hwm < 8 << 10, "the receiver grew by the frame"
        assert int(out.split("=")[1]) < BIG, out
        src, _ = hostile("stall")
        logged(src, r"did not authenticate within 5 s")
        src, _ = hostile("midway")
        logged(src, GONE)
        src, out = hostile("flood", 200)
        helpers.wait_for_line(recv.err, rf"dropped {re.escape(src)}:\d+: rate-limited",
                              pid=recv.p.pid)
        cp = _migrate(net, hog.pid, token="another-token-xyz")
        assert cp.returncode == P.AuthError.exit_code, cp.stderr
        logged(net.addr_a, "wrong token")
        assert recv.p.poll() is None, recv.stderr()
        helpers.assert_running_untraced(hog.pid)
        assert helpers.probe_hog(hog.pid, hog.log).ok

        cp = _migrate(net, hog.pid)
        new = _restored(recv, procs)
        assert cp.returncode == 0, cp.stderr
        helpers.reap(hog.pid)
        after = helpers.probe_hog(new, hog.log)
        assert after.ok and after.counter > before.counter, after.line
        err = recv.stderr()
        assert "Traceback" not in err
        flood = [ln for ln in err.splitlines() if src in ln]
        assert len(flood) < 20, err           # rate-limited: a few lines, not 200
