"""`lcr migrate` / `lcr receive`: pre-copy live migration over TCP.

Protocol units (framing, handshake) run anywhere; the end-to-end tests move
real processes between two network namespaces joined by a veth pair
(tests/netns.py; root only): `lcr receive` in namespace B, `lcr migrate`
in namespace A, the process itself in the host namespace.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import helpers
import netns

sys.path.insert(0, str(helpers.REPO))

from linuxcr.migration import protocol as P  # noqa: E402

TOKEN = "test-token-8f3a9c"
PORT = 7707
# `lcr` with the migration commands, whether or not cli.py registers them yet
WRAPPER = ("import sys; from linuxcr.cli import main; "
           "from linuxcr.cli_migrate import migrate_cmd, receive_cmd; "
           "[main.add_command(c) for c in (migrate_cmd, receive_cmd) if c.name not in main.commands]; "
           "main(prog_name='lcr')")
LCR_MIG = [sys.executable, "-c", WRAPPER]


# =============================================================================
# protocol units

def _pair(timeout: float = 5.0, authenticated: bool = True) -> tuple[P.Conn, P.Conn]:
    a, b = socket.socketpair()
    ca, cb = P.Conn(a, "peer-a", timeout), P.Conn(b, "peer-b", timeout)
    ca.authenticated = cb.authenticated = authenticated
    return ca, cb


def test_frame_round_trip():
    a, b = _pair()
    try:
        data = os.urandom(2 * P.PAGE)
        a.send(P.Msg.PAGES, P.schema.Pages(pid=42, addr=0x10000, npages=2), data)
        a.send(P.Msg.ROUND_END, P.RoundEnd(round=3, pages=2))
        mt, obj, got = b.recv()
        assert mt is P.Msg.PAGES and obj.pid == 42 and obj.addr == 0x10000 and bytes(got) == data
        mt, obj, _ = b.recv((P.Msg.ROUND_END,))
        assert obj.round == 3
    finally:
        a.close()
        b.close()


def _raw(mtype: int, meta: bytes, data: bytes = b"", *, magic: int = P.MAGIC,
         meta_len: int | None = None, data_len: int | None = None, cs: int | None = None,
         reserved: int = 0) -> bytes:
    import xxhash
    ml = len(meta) if meta_len is None else meta_len
    dl = len(data) if data_len is None else data_len
    head = P.FRAME.pack(magic, mtype, reserved, ml, dl, 0)[:P.HEAD]
    if cs is None:
        h = xxhash.xxh3_64(head)
        h.update(meta)
        h.update(data)
        cs = h.intdigest()
    return head + cs.to_bytes(8, "little") + meta + data


def _recv_raw(raw: bytes, authenticated: bool = True,
              expect: tuple[P.Msg, ...] | None = None) -> str:
    a, b = socket.socketpair()
    a.sendall(raw)
    a.shutdown(socket.SHUT_WR)
    conn = P.Conn(b, "peer", 2.0)
    conn.authenticated = authenticated
    try:
        conn.recv(expect)
    except P.MigrationError as e:
        return str(e)
    finally:
        a.close()
        conn.close()
    return ""


def test_frame_rejects_bad_input():
    meta = P.ENCODER.encode(P.RoundEnd(round=1, pages=1))
    assert "bad frame magic" in _recv_raw(_raw(9, meta, magic=0x12345678))
    assert "unknown type" in _recv_raw(_raw(99, meta))
    assert "reserved" in _recv_raw(_raw(9, meta, reserved=1))
    assert "more than" in _recv_raw(_raw(9, meta, meta_len=P.MAX_META + 1))
    assert "bytes of data" in _recv_raw(_raw(9, meta, b"x" * 10))          # data where none may be
    assert "bytes of data" in _recv_raw(_raw(8, meta, data_len=P.MAX_DATA + 1))
    assert "checksum mismatch" in _recv_raw(_raw(9, meta, cs=1))
    assert "closed by the peer" in _recv_raw(_raw(9, meta)[:-1])           # truncated
    assert "invalid ROUND_END" in _recv_raw(_raw(9, b"\x81\xa1x\x01"))     # wrong fields
    pages = P.ENCODER.encode(P.schema.Pages(pid=1, addr=4096, npages=2))
    assert "bytes for 2 pages" in _recv_raw(_raw(8, pages, b"\0" * P.PAGE))
    odd = P.ENCODER.encode(P.schema.Pages(pid=1, addr=4097, npages=1))
    assert "malformed PAGES" in _recv_raw(_raw(8, odd, b"\0" * P.PAGE))


def test_frame_fuzz():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=200, deadline=None)
    @hypothesis.given(st.binary(min_size=0, max_size=200))
    def check(blob: bytes) -> None:
        # anything at all: a clean MigrationError (or, rarely, a valid message)
        msg = _recv_raw(blob)
        assert isinstance(msg, str)

    @hypothesis.settings(max_examples=200, deadline=None)
    @hypothesis.given(st.integers(0, 27 + 20), st.integers(0, 255))
    def flip(at: int, bit: int) -> None:
        good = b"".join(bytes(x) for x in P.encode(P.Msg.ROUND_END, P.RoundEnd(round=1, pages=7)))
        bad = bytearray(good)
        bad[at % len(bad)] ^= (bit % 255) + 1
        assert _recv_raw(bytes(bad)) != ""        # every corruption is noticed

    check()
    flip()


def _handshake(tok_src: bytes, tok_dst: bytes, proto: str | None = None):
    a, b = _pair(authenticated=False)
    out: dict = {}

    def dest():
        try:
            out["dst"] = b.handshake_destination(tok_dst)
        except P.MigrationError as e:
            out["dst_err"] = e

    th = threading.Thread(target=dest)
    th.start()
    try:
        if proto is None:
            out["src"] = a.handshake_source(tok_src)
        else:      # a source of another protocol version
            a.recv((P.Msg.HELLO,))
            a.send(P.Msg.HELLO, P.Hello(proto, "source", os.urandom(32)))
            a.send(P.Msg.AUTH, P.Auth(b"\0" * 32))
            a.recv((P.Msg.AUTH,))
    except P.MigrationError as e:
        out["src_err"] = e
    th.join(10)
    a.close()
    b.close()
    return out


def test_handshake():
    out = _handshake(b"same-token", b"same-token")
    assert out["src"] == out["dst"] and len(out["src"]) == 16
    out = _handshake(b"token-one!", b"token-two!")
    assert isinstance(out["dst_err"], P.AuthError) and "wrong token" in str(out["dst_err"])
    assert isinstance(out["src_err"], P.AuthError) and "tokens differ" in str(out["src_err"])
    out = _handshake(b"same-token", b"same-token", proto="lcr-migrate/2")
    assert isinstance(out["dst_err"], P.AuthError) and "lcr-migrate/2" in str(out["dst_err"])
    assert "lcr-migrate/2" in str(out["src_err"])


def test_token_required(monkeypatch):
    monkeypatch.delenv(P.TOKEN_ENV, raising=False)
    with pytest.raises(P.AuthError, match="needs a shared token"):
        P.load_token(None)
    with pytest.raises(P.AuthError, match="too short"):
        P.load_token("abc")
    monkeypatch.setenv(P.TOKEN_ENV, "from-the-environment")
    assert P.load_token(None) == b"from-the-environment"


def test_parse_addr():
    assert P.parse_addr("10.0.0.1:80") == ("10.0.0.1", 80)
    assert P.parse_addr("[::1]:7000") == ("::1", 7000)
    for bad in ("nohost", ":80", "h:", "h:99999", "h:x"):
        with pytest.raises(P.MigrationError):
            P.parse_addr(bad)


# =============================================================================
# end to end

needs_net = pytest.mark.skipif(netns.available() is not None, reason=netns.available() or "")


@pytest.fixture
def net():
    with netns.two_namespaces() as n:
        yield n


def _env(extra: dict | None = None, verbose: bool = True) -> dict:
    env = helpers.child_env({**({"LCR_VERBOSE": "1"} if verbose else {}), **(extra or {})})
    env["PYTHONPATH"] = str(helpers.REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Receiver:
    def __init__(self, net, procs, tmp: Path, token: str = TOKEN, env: dict | None = None,
                 name: str = "recv", args=()) -> None:
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        argv = net.exec_b([*LCR_MIG, "receive", "--listen", f"{net.addr_b}:{PORT}",
                           "--token", token, "--timeout", "120s", *args])
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                                      env=_env(env), close_fds=True, start_new_session=True)
        procs.add(self.p.pid)
        helpers.wait_for_line(self.err, r"listening on", pid=self.p.pid)

    def wait(self, timeout: float = 120) -> int:
        return self.p.wait(timeout)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


def _migrate(net, pid: int, *args, token: str = TOKEN, env: dict | None = None,
             timeout: float = 240) -> subprocess.CompletedProcess:
    argv = net.exec_a([*LCR_MIG, "migrate", pid, "--to", f"{net.addr_b}:{PORT}",
                       "--token", token, *args])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=_env(env, verbose=False),
                          stdin=subprocess.DEVNULL)


def _start_memhog(procs, bins, tmp: Path, mib: int, usec: int = 1000) -> helpers.Running:
    log = tmp / f"memhog-{mib}.log"
    p = procs.start([bins["memhog"], "-f", "-s", str(usec), str(mib)], log)
    helpers.wait_for_line(log, rf"^pid={p.pid} ready\b", helpers.READY_TIMEOUT, pid=p.pid)
    return helpers.Running(p.pid, log, None, p)


def _restored(recv: Receiver, procs) -> int:
    rc = recv.wait()
    out = recv.out.read_text()
    m = re.fullmatch(r"(\d+)\n", out)
    if m:
        procs.add(int(m.group(1)))
    assert rc == 0, f"lcr receive exited {rc}:\n{recv.stderr()}"
    assert m, f"lcr receive printed {out!r}"
    assert "Traceback" not in recv.stderr()
    return int(m.group(1))


def _no_uffd(pid: int) -> None:
    smaps = Path(f"/proc/{pid}/smaps").read_text()
    flags = [ln for ln in smaps.splitlines() if ln.startswith("VmFlags:")]
    assert flags and not any(" uw" in ln for ln in flags), "write tracking left registered"


def _nothing_left(net, before: set[int]) -> None:
    deadline = time.monotonic() + 15
    while True:
        left = {p for p in net.pids_b() - before if helpers.alive(p)}
        if not left:
            return
        assert time.monotonic() < deadline, f"processes left in the destination: {left}"
        time.sleep(0.05)


def _migrate_memhog(net, procs, bins, tmp: Path, mib: int, *args) -> tuple[int, str]:
    hog = _start_memhog(procs, bins, tmp, mib)
    before = helpers.probe_hog(hog.pid, hog.log)
    assert before.ok, before.line
    recv = Receiver(net, procs, tmp)
    cp = _migrate(net, hog.pid, *args)
    new = _restored(recv, procs)
    assert cp.returncode == 0, f"lcr migrate exited {cp.returncode}:\n{cp.stderr}"
    assert "Traceback" not in cp.stderr
    helpers.reap(hog.pid)                               # the original is gone
    first = helpers.probe_hog(new, hog.log)
    assert first.ok, first.line
    assert first.counter > before.counter
    time.sleep(0.3)
    second = helpers.probe_hog(new, hog.log)
    assert second.ok and second.counter > first.counter, second.line
    helpers.assert_running_untraced(new)
    _no_uffd(new)
    return new, cp.stdout


@needs_net
@pytest.mark.e2e
def test_migrate_memhog_256m(net, procs, bins, tmp_path):
    _, report = _migrate_memhog(net, procs, bins, tmp_path, 256)
    assert re.search(r"^round 0: \d+ pages", report, re.M), report
    assert re.search(r"^stop-and-copy: \d+ pages sent, \d+ already there", report, re.M), report
    m = re.search(r"^downtime ([\d.]+) ms", report, re.M)
    assert m, report
    print(report)


@needs_net
@pytest.mark.e2e
def test_migrate_memhog_1g(net, procs, bins, tmp_path):
    _, report = _migrate_memhog(net, procs, bins, tmp_path, 1024, "--max-downtime", "100ms")
    assert re.search(r"^downtime ([\d.]+) ms", report, re.M), report
    print(report)


PIPEPROG = r'''
import os, signal, sys, time
PAYLOAD = b"in-the-pipe:0123456789"
r, w = os.pipe()
os.write(w, PAYLOAD)                      # unread bytes held by the pipe
path = sys.argv[1]
with open(path, "wb") as f:
    f.write(bytes(i % 251 for i in range(1 << 16)))
fd = os.open(path, os.O_RDONLY)
os.lseek(fd, 1000, os.SEEK_SET)
state = {"counter": 0, "pos": 1000, "probe": False}

def probe(sig, frame):
    state["probe"] = True

signal.signal(signal.SIGUSR1, probe)
print(f"READY pid={os.getpid()}", flush=True)
while True:
    state["counter"] += 1
    if state["probe"]:
        state["probe"] = False
        got = os.read(r, len(PAYLOAD))
        os.write(w, got)
        chunk = os.read(fd, 10)
        want = bytes(i % 251 for i in range(state["pos"], state["pos"] + 10))
        state["pos"] += 10
        errs = []
        if got != PAYLOAD:
            errs.append(f"pipe held {got!r}")
        if chunk != want:
            errs.append(f"file offset wrong: read {chunk!r}")
        if os.lseek(fd, 0, os.SEEK_CUR) != state["pos"]:
            errs.append("offset")
        print(("FAIL pipeprog " + "; ".join(errs)) if errs else
              f"PASS pipeprog counter={state['counter']} pos={state['pos']}", flush=True)
    time.sleep(0.001)
'''


@needs_net
@pytest.mark.e2e
def test_migrate_pipe_file_counter(net, procs, tmp_path):
    prog = tmp_path / "pipeprog.py"
    prog.write_text(PIPEPROG)
    log = tmp_path / "pipeprog.log"
    p = procs.start([sys.executable, prog, tmp_path / "data.bin"], log)
    helpers.wait_for_line(log, rf"^READY pid={p.pid}", pid=p.pid)
    m1 = helpers.assert_pass(p.pid, log, "pipeprog")
    recv = Receiver(net, procs, tmp_path)
    cp = _migrate(net, p.pid)
    new = _restored(recv, procs)
    assert cp.returncode == 0, cp.stderr
    helpers.reap(p.pid)
    m2 = helpers.assert_pass(new, log, "pipeprog")
    assert helpers.pass_field(m2, "counter") > helpers.pass_field(m1, "counter")
    assert helpers.pass_field(m2, "pos") == helpers.pass_field(m1, "pos") + 10
    helpers.assert_running_untraced(new)


def _failed_migration(net, procs, bins, tmp: Path, *, recv_env=None, src_env=None,
                      token: str = TOKEN, args=()) -> tuple[helpers.Running, Receiver,
                                                             subprocess.CompletedProcess]:
    hog = _start_memhog(procs, bins, tmp, 128)
    before = helpers.probe_hog(hog.pid, hog.log)
    assert before.ok
    pids_before = net.pids_b()
    recv = Receiver(net, procs, tmp, env=recv_env)
    cp = _migrate(net, hog.pid, *args, token=token, env=src_env)
    recv.wait()
    _nothing_left(net, pids_before - {recv.p.pid})
    assert recv.out.read_text() == ""
    # the process runs on, unchanged, no longer traced or tracked
    helpers.assert_running_untraced(hog.pid)
    _no_uffd(hog.pid)
    after = helpers.probe_hog(hog.pid, hog.log)
    assert after.ok and after.counter > before.counter, after.line
    return hog, recv, cp


@needs_net
@pytest.mark.e2e
@pytest.mark.parametrize("point", ["dest.round0", "dest.round1", "dest.final"])
def test_receiver_killed(net, procs, bins, tmp_path, point):
    """The receiver dies (SIGKILL) in round 0, round 1, or during the
    stop-and-copy with the source tree frozen."""
    args = ("--max-downtime", "1ms") if point == "dest.round1" else ()
    hog, recv, cp = _failed_migration(net, procs, bins, tmp_path,
                                      recv_env={"LCR_MIGRATE_FAULT": point}, args=args)
    assert recv.p.returncode == -signal.SIGKILL
    helpers.assert_clean_error(cp, match=r"connection|closed|lost")
    assert cp.returncode == P.MigrationError.exit_code


@needs_net
@pytest.mark.e2e
def test_source_killed_while_frozen(net, procs, bins, tmp_path):
    """lcr migrate dies with the tree frozen for the stop-and-copy: the
    kernel lets the tree go, and the receiver cleans up."""
    hog, recv, cp = _failed_migration(net, procs, bins, tmp_path,
                                      src_env={"LCR_MIGRATE_FAULT": "source.final"})
    assert cp.returncode == -signal.SIGKILL
    assert recv.p.returncode != 0
    assert "Traceback" not in recv.stderr()
    assert re.search(r"stop-and-copy failed: .*(empty|truncated)|connection .* (closed|lost)", recv.stderr()), recv.stderr()


@needs_net
@pytest.mark.e2e
def test_wrong_token(net, procs, bins, tmp_path):
    """A wrong token is refused on both sides; the source runs on, the
    receiver logs one line and goes on waiting: the right token then gets
    through the same receiver (a host's first failure costs no delay)."""
    hog = _start_memhog(procs, bins, tmp_path, 64)
    before = helpers.probe_hog(hog.pid, hog.log)
    recv = Receiver(net, procs, tmp_path)
    cp = _migrate(net, hog.pid, token="another-token-xyz")
    line = helpers.assert_clean_error(cp, match="token")
    assert cp.returncode == P.AuthError.exit_code, line
    helpers.assert_running_untraced(hog.pid)
    _no_uffd(hog.pid)
    after = helpers.probe_hog(hog.pid, hog.log)
    assert after.ok and after.counter > before.counter, after.line
    helpers.wait_for_line(recv.err, r"dropped .*wrong token", pid=recv.p.pid)
    assert recv.p.poll() is None, recv.stderr()
    cp = _migrate(net, hog.pid)
    new = _restored(recv, procs)
    assert cp.returncode == 0, cp.stderr
    helpers.reap(hog.pid)
    assert helpers.probe_hog(new, hog.log).ok
    dropped = [ln for ln in recv.stderr().splitlines() if "dropped" in ln]
    assert len(dropped) == 1 and net.addr_a in dropped[0], recv.stderr()


@needs_net
@pytest.mark.e2e
def test_no_receiver(net, procs, bins, tmp_path):
    hog = _start_memhog(procs, bins, tmp_path, 16)
    cp = _migrate(net, hog.pid)
    helpers.assert_clean_error(cp, match="cannot connect")
    helpers.assert_running_untraced(hog.pid)


@needs_net
@pytest.mark.e2e
def test_migrate_tree(net, procs, bins, tmp_path):
    """Two processes, two pipes between them (one with numbers in flight) and
    one shared file description: the whole tree moves, nothing is lost."""
    data = tmp_path / "numbers"
    log = tmp_path / "tree.log"
    p = helpers.start_detached([bins["tree_pipefile"], data], log)
    m = helpers.wait_for_line(log, r"^READY pid=(\d+) child=(\d+)", pid=p.pid)
    root, child = int(m.group(1)), int(m.group(2))
    procs.add(root)
    procs.add(child)
    sent = helpers.pass_field(helpers.assert_pass(root, log, "tree_pipefile"), "sent")
    recv = Receiver(net, procs, tmp_path)
    cp = _migrate(net, root)
    new = _restored(recv, procs)
    assert cp.returncode == 0, cp.stderr
    helpers.reap(root)
    m2 = helpers.assert_pass(new, log, "tree_pipefile")
    assert helpers.pass_field(m2, "sent") > sent
    helpers.assert_running_untraced(new)


FORKPROG = r'''
import os, signal, sys, time
buf = bytearray(os.urandom(1 << 20)) * 32          # 32 MiB to copy in round 0
kids = []
state = {"fork": False, "probe": False, "counter": 0}
signal.signal(signal.SIGUSR2, lambda *_: state.__setitem__("fork", True))
signal.signal(signal.SIGUSR1, lambda *_: state.__setitem__("probe", True))
print(f"READY pid={os.getpid()}", flush=True)
while True:
    state["counter"] += 1
    buf[(state["counter"] * 4096) % len(buf)] ^= 1
    if state["fork"]:
        state["fork"] = False
        k = os.fork()
        if k == 0:
            while True:
                time.sleep(0.01)
        kids.append(k)
    if state["probe"]:
        state["probe"] = False
        alive = [k for k in kids if os.waitpid(k, os.WNOHANG) == (0, 0)]
        print(f"PASS forkprog counter={state['counter']} kids={len(alive)}", flush=True)
    time.sleep(0.001)
'''

SIGNAL_AFTER_ROUND0 = r'''
import os, signal, sys, time
sys.path.insert(0, sys.argv[4])
from linuxcr.engine import migrate
pid = int(sys.argv[1])

def progress(text):
    print(text, file=sys.stderr, flush=True)
    if text.startswith("round 0:"):          # the preliminary tree is taken: change it now
        os.kill(pid, signal.SIGUSR2)
        for _ in range(500):
            if open(f"/proc/{pid}/task/{pid}/children").read().split():
                break
            time.sleep(0.01)

res = migrate.migrate(pid, sys.argv[2], int(sys.argv[3]), token=sys.argv[5], progress=progress,
                      max_rounds=3)
print(res.final_kind if hasattr(res, "final_kind") else "", flush=True)
'''


@needs_net
@pytest.mark.e2e
def test_migrate_tree_changed_during_precopy(net, procs, tmp_path):
    """A child forked after the preliminary snapshot: the skeleton no longer
    fits, a full image goes instead, and the destination restores the tree
    from it (with the new child)."""
    prog = tmp_path / "forkprog.py"
    prog.write_text(FORKPROG)
    log = tmp_path / "forkprog.log"
    p = procs.start([sys.executable, prog], log)
    helpers.wait_for_line(log, rf"^READY pid={p.pid}", pid=p.pid)
    recv = Receiver(net, procs, tmp_path)
    argv = net.exec_a([sys.executable, "-c", SIGNAL_AFTER_ROUND0, p.pid, net.addr_b, PORT,
                       helpers.REPO, TOKEN])
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=_env(),
                        stdin=subprocess.DEVNULL)
    new = _restored(recv, procs)
    assert cp.returncode == 0, cp.stderr
    assert "the process tree changed" in cp.stderr, cp.stderr
    assert "full image" in recv.stderr() or "plain restore" in recv.stderr(), recv.stderr()
    for k in helpers.live_children(p.pid) if helpers.exists(p.pid) else ():
        procs.add(k)
    helpers.reap(p.pid)
    # restored in a new pid namespace (the source held the pids): its init
    # goes first at teardown, which takes every process of the namespace
    init = int(helpers.proc_status(new)["PPid"])
    if helpers.proc_status(init) and "lcr" in open(f"/proc/{init}/cmdline").read():
        procs.add(init)
    m = helpers.assert_pass(new, log, "forkprog")
    assert helpers.pass_field(m, "kids") == 1
