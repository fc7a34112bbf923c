"""TCP sockets (IPv4 and IPv6): listening, unconnected, and established
connections, saved with the kernel's TCP repair mode.

Listening: address, port, backlog and options.  A listener with connections
waiting in its accept queue is refused (they are kernel objects half made
by the handshake; a restore cannot make them again).  Restore: socket(),
options, bind() (SO_REUSEADDR on while binding and listening, then as
saved, so that restored connections on the same port do not stand in the
way), listen().

Unconnected (CLOSE, never connected): options, and the address if bound.

Established (needs CAP_NET_ADMIN: root; refused otherwise): on lcr's own
copy of the socket (pidfd_getfd) --
  1. a socket filter that drops every incoming segment: the kernel discards
     them before acknowledging them, so the peer keeps its data and sends it
     again later (nothing the peer sends during the checkpoint is lost);
  2. TCP_REPAIR on; TCP_QUEUE_SEQ of both queues; the queues' bytes read
     with MSG_PEEK (TCP_REPAIR_QUEUE selects which: in repair mode a peek of
     the send queue returns it); TCP_MAXSEG (the mss clamp), the options
     negotiated (tcp_info), TCP_TIMESTAMP, TCP_REPAIR_WINDOW;
  3. TCP_REPAIR off again (without a window probe) and SO_REUSEADDR as it
     was: the program, if it goes on (--leave-running), sees nothing.
The copy then goes to a small keeper process (see KEEPER below) that waits
for the program's fate: thawed -> it removes the filter and lets go (the
peer's retransmissions get through); killed -> it turns repair mode on, so
the socket will close without FIN or RST, and holds it (incoming segments
still dropped, so the peer gets no RST either) until a restore claims it or
LCR_TCP_HOLD seconds (default 300) pass.
Restore, in lcr before the tasks exist: socket(), options, TCP_REPAIR on,
the queue sequences, bind() to the local address, close the held original
(if a keeper holds it: silently, repair mode), connect() to the peer (no
SYN in repair mode), TCP_REPAIR_OPTIONS, TCP_TIMESTAMP, the receive queue
and the sent-but-unacknowledged part of the send queue, TCP_REPAIR_WINDOW,
TCP_REPAIR off (a window probe tells the peer we are there), SO_REUSEADDR,
then the never-sent tail of the send queue is sent normally.  If the
original still has the connection (--leave-running), connect() fails: the
restore is refused.  The sent-but-unacknowledged bytes go out again when
the retransmission timer fires (~1 s); the peer drops what it already had.

Other states (SYN_SENT, SYN_RECV, FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK,
CLOSING, TIME_WAIT, CLOSE after a connection) are refused with the state's
name; so are sockets with a BPF filter of their own, an upper-layer
protocol (kernel TLS), or in another network namespace.  Not saved: urgent
data, TCP_MD5SIG keys, congestion control and IP-level options."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import struct
import subprocess
import sys
import time

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import MAX_SOCK_QUEUE, InetAddr, TcpState
from linuxcr.resources.fdkinds.unix_bound import (apply_opts, lock_buffers, read_opts, set_buffers,
                                                   set_peek_off)
from linuxcr.sys import sockdiag as sd
from linuxcr.sys.syscalls import pidfd_open

FAMILIES = (socket.AF_INET, socket.AF_INET6)
HOLD_SECONDS = 300.0
CLAIM_TIMEOUT = 15.0


# --- addresses ---------------------------------------------------------------

def to_addr(a: tuple) -> InetAddr:
    if len(a) == 4:
        return InetAddr(host=a[0], port=a[1], flowinfo=a[2], scope_id=a[3])
    return InetAddr(host=a[0], port=a[1])


def sockaddr(family: int, a: InetAddr) -> tuple:
    return (a.host, a.port, a.flowinfo, a.scope_id) if family == socket.AF_INET6 else (a.host, a.port)


def shown(a: InetAddr | None) -> str:
    if a is None:
        return "?"
    return f"[{a.host}]:{a.port}" if ":" in a.host else f"{a.host}:{a.port}"


def _peer(s: socket.socket) -> InetAddr | None:
    try:
        return to_addr(s.getpeername())
    except OSError:
        return None


def inet_identity(ctx) -> tuple[int, int, int] | None:
    """(family, type, protocol) of an AF_INET/AF_INET6 socket fd, else None."""
    if not ctx.link.startswith("socket:"):
        return None
    try:
        with sd.grab_socket(ctx.pid, ctx.fd) as s:
            ident = sd.identity(s)
    except OSError:
        return None
    return ident if ident[0] in FAMILIES else None


def v6only(s: socket.socket, family: int) -> bool:
    return family == socket.AF_INET6 and bool(s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))


_can_repair: dict[int, bool] = {}


def can_repair() -> bool:
    """May lcr use TCP repair mode (CAP_NET_ADMIN over the network namespace
    sockets are made in: lcr's, or an `lcr run --net` tree's, see
    sockdiag.inside -- an ordinary user has it over a tree's own)?"""
    ns = sd.netns_ino()
    if ns not in _can_repair:
        with sd.new_socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.setsockopt(socket.SOL_TCP, sd.TCP_REPAIR, sd.TCP_REPAIR_ON)
                _can_repair[ns] = True
            except PermissionError:
                _can_repair[ns] = False
    return _can_repair[ns]


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def keeper_name(boot_id: str, ino: int, local: InetAddr, peer: InetAddr) -> bytes:
    """Abstract UNIX name of the keeper holding one original connection."""
    key = f"{boot_id}/{ino}/{shown(local)}/{shown(peer)}".encode()
    return b"\0linuxcr-tcp-" + hashlib.sha256(key).hexdigest()[:40].encode()


# --- the kind ----------------------------------------------------------------

class InetKind:
    """What TCP and UDP kinds share: which sockets are theirs, and the check
    (their module's _reason, on our own copy of the socket)."""
    name = label = ""
    sock_type = proto = 0

    def matches(self, ctx) -> bool:
        ident = inet_identity(ctx)
        return ident is not None and ident[1] == self.sock_type and ident[2] == self.proto

    def why(self, ctx, s) -> str | None:
        raise NotImplementedError

    def reason(self, ctx) -> str | None:
        try:
            with sd.grab_socket(ctx.pid, ctx.fd) as s:
                return self.why(ctx, s)
        except OSError as e:
            return f"{self.label} socket: cannot inspect it: {e.strerror}"

    def refuse(self, ctx, s) -> None:
        """dump() calls it first: the state may have changed since the check."""
        why = self.why(ctx, s)
        if why:
            raise RestoreError(f"pid {ctx.pid} fd {ctx.fd}: {why}")


class Tcp(InetKind):
    name, label = "tcp", "TCP"
    sock_type, proto = socket.SOCK_STREAM, socket.IPPROTO_TCP

    def why(self, ctx, s) -> str | None:
        return _reason(ctx, s)

    def dump(self, ctx) -> TcpState:
        with sd.grab_socket(ctx.pid, ctx.fd) as s:
            self.refuse(ctx, s)
            family = sd.identity(s)[0]
            ti = sd.tcp_info(s)
            base = dict(family=family, local=to_addr(s.getsockname()), opts=read_opts(s),
                        v6only=v6only(s, family), **_tcp_opts(s))
            if ti.state == sd.TCP_LISTEN:
                return TcpState(state="LISTEN", backlog=ti.sacked, **base)
            if ti.state == sd.TCP_CLOSE:
                return TcpState(state="CLOSE", **base)
            try:
                return _dump_established(ctx, s, base)
            except OSError as e:
                raise RestoreError(f"pid {ctx.pid} fd {ctx.fd}: TCP connection {shown(base['local'])} "
                                   f"-> {shown(_peer(s))}: {e.strerror}") from None

    def open(self, state: TcpState, flags: int) -> int:
        if state.family not in FAMILIES:
            raise RestoreError(f"image holds a TCP socket of unknown family {state.family}")
        s = sd.new_socket(state.family, socket.SOCK_STREAM)
        try:
            if state.v6only:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if state.state == "LISTEN":
                _open_listener(s, state)
            elif state.state == "CLOSE":
                apply_opts(s, state.opts)
                if state.local.port:
                    _bind(s, state)
            elif state.state == "ESTABLISHED":
                try:
                    _open_established(s, state)
                except OSError as e:
                    raise RestoreError(f"cannot restore TCP connection {shown(state.local)} -> "
                                       f"{shown(state.peer)}: {e.strerror}") from None
            else:
                raise RestoreError(f"image holds a TCP socket in state {state.state!r}")
            if state.state != "ESTABLISHED":
                _set_tcp_opts(s, state)
            set_peek_off(s, state.opts)
            s.setblocking(not flags & os.O_NONBLOCK)
        except BaseException:
            s.close()
            raise
        return s.detach()

    def finish_open(self, fd: int, state: TcpState, env) -> None:
        """An established connection leaves repair mode once every socket is open."""
        if state.state != "ESTABLISHED":
            return
        with socket.socket(fileno=os.dup(fd)) as s:
            try:
                _finish_established(s, state)
            except OSError as e:
                raise RestoreError(f"cannot restore TCP connection {shown(state.local)} -> "
                                   f"{shown(state.peer)}: {e.strerror}") from None


_CLOSING = "; the connection is being closed: checkpoint again once it is over"
STATE_HINTS = {
    "SYN_SENT": "; it is still connecting: checkpoint again once it is connected",
    "SYN_RECV": "; it is still connecting: checkpoint again once it is connected",
    "CLOSE_WAIT": ("; the peer has closed the connection and this process has not closed its "
                   "end: close the fd; if it is a copy a child inherited through fork() "
                   "(multiprocessing's 'fork' start method does that), start such children "
                   "with the 'spawn' or 'forkserver' start method instead"),
    "FIN_WAIT1": _CLOSING, "FIN_WAIT2": _CLOSING, "LAST_ACK": _CLOSING, "CLOSING": _CLOSING,
    "TIME_WAIT": _CLOSING,
}


def _reason(ctx, s: socket.socket) -> str | None:
    ti = sd.tcp_info(s)
    name = sd.TCP_STATES.get(ti.state, str(ti.state))
    local, peer = to_addr(s.getsockname()), _peer(s)
    ends = f"{shown(local)} -> {shown(peer)}" if peer else shown(local)
    if ti.state not in (sd.TCP_ESTABLISHED, sd.TCP_LISTEN, sd.TCP_CLOSE):
        return f"TCP socket in state {name}: cannot be checkpointed ({ends}){STATE_HINTS.get(name, '')}"
    if ti.state == sd.TCP_CLOSE and (ti.segs_out or ti.segs_in):
        return f"TCP socket in state CLOSE (its connection is over): cannot be checkpointed ({ends})"
    why = sd.netns_reason(s, ctx.pid)
    if why:
        return f"TCP socket {ends} {why}"
    if sd.filter_len(s) or s.getsockopt(socket.SOL_SOCKET, sd.SO_LOCK_FILTER):
        return f"TCP socket {ends} has a socket filter (SO_ATTACH_FILTER) of its own: not supported"
    if ti.state == sd.TCP_LISTEN:
        if ti.unacked:
            return (f"TCP socket listening on {shown(local)} has {ti.unacked} connection(s) not "
                    "accepted yet: cannot be checkpointed until the program accepts them")
        return None
    if ti.state == sd.TCP_ESTABLISHED:
        ulp = s.getsockopt(socket.SOL_TCP, sd.TCP_ULP, 16).rstrip(b"\0").decode(errors="replace")
        if ulp:
            return f"TCP connection {ends} uses the {ulp!r} upper-layer protocol: not supported"
        if not can_repair():
            return (f"TCP connection {ends}: saving an established connection needs TCP repair "
                    "mode (CAP_NET_ADMIN): run lcr as root")
        inq, outq, _ = sd.queue_sizes(s)
        if max(inq, outq) > MAX_SOCK_QUEUE:
            return (f"TCP connection {ends} has more than {MAX_SOCK_QUEUE >> 20} MiB queued: "
                    "not supported")
    return None


def _tcp_opts(s: socket.socket) -> dict:
    g = lambda opt: s.getsockopt(socket.SOL_TCP, opt)  # noqa: E731
    return dict(nodelay=bool(g(socket.TCP_NODELAY)), cork=bool(g(sd.TCP_CORK)),
                keepidle=g(sd.TCP_KEEPIDLE), keepintvl=g(sd.TCP_KEEPINTVL), keepcnt=g(sd.TCP_KEEPCNT))


def _set_tcp_opts(s: socket.socket, state: TcpState) -> None:
    """Options that differ from a new socket's (those equal to the system's
    defaults are left to follow the sysctls)."""
    now = _tcp_opts(s)
    for opt, key in ((socket.TCP_NODELAY, "nodelay"), (sd.TCP_CORK, "cork"),
                     (sd.TCP_KEEPIDLE, "keepidle"), (sd.TCP_KEEPINTVL, "keepintvl"),
                     (sd.TCP_KEEPCNT, "keepcnt")):
        want = getattr(state, key)
        if want != now[key] and (want or key in ("nodelay", "cork")):
            s.setsockopt(socket.SOL_TCP, opt, int(want))


def _bind(s: socket.socket, state: TcpState) -> None:
    try:
        s.bind(sockaddr(state.family, state.local))
    except OSError as e:
        raise RestoreError(f"cannot bind a TCP socket to {shown(state.local)}: {e.strerror}",
                           "is the port in use? (was the checkpoint taken with --leave-running?)"
                           ) from None


def _open_listener(s: socket.socket, state: TcpState) -> None:
    apply_opts(s, state.opts)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # not blocked by restored connections
    _bind(s, state)
    try:
        s.listen(state.backlog)
    except OSError as e:
        raise RestoreError(f"cannot listen on {shown(state.local)}: {e.strerror}",
                           "is the port in use? (was the checkpoint taken with --leave-running?)"
                           ) from None
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(state.opts.reuseaddr))


# --- established: dump --------------------------------------------------------

def _repair(s: socket.socket, val: int) -> None:
    s.setsockopt(socket.SOL_TCP, sd.TCP_REPAIR, val)


def _select_queue(s: socket.socket, q: int) -> None:
    s.setsockopt(socket.SOL_TCP, sd.TCP_REPAIR_QUEUE, q)


def _dump_established(ctx, s: socket.socket, base: dict) -> TcpState:
    where = f"pid {ctx.pid} fd {ctx.fd}: TCP connection {shown(base['local'])} -> {shown(_peer(s))}"
    peek_off = base["opts"].peek_off
    sd.attach_drop_all(s)          # from here on the peer's segments wait (it sends them again)
    try:
        _repair(s, sd.TCP_REPAIR_ON)
        try:
            if peek_off >= 0:
                s.setsockopt(socket.SOL_SOCKET, sd.SO_PEEK_OFF, -1)
            ti = sd.tcp_info(s)
            if ti.state != sd.TCP_ESTABLISHED:
                raise RestoreError(f"{where}: changed to state {sd.TCP_STATES.get(ti.state)} "
                                   "during the checkpoint")
            inq_len, outq_len, unsent = sd.queue_sizes(s)
            inq_seq, inq = _read_queue(s, sd.TCP_RECV_QUEUE, inq_len, where)
            outq_seq, outq = _read_queue(s, sd.TCP_SEND_QUEUE, outq_len, where)
            _select_queue(s, sd.TCP_NO_QUEUE)
            mss = s.getsockopt(socket.SOL_TCP, sd.TCP_MAXSEG)
            ts = 0
            if ti.options & sd.TCPI_OPT_TIMESTAMPS:
                ts = struct.unpack("<I", s.getsockopt(socket.SOL_TCP, sd.TCP_TIMESTAMP, 4))[0]
            window = list(sd.REPAIR_WINDOW.unpack(
                s.getsockopt(socket.SOL_TCP, sd.TCP_REPAIR_WINDOW, sd.REPAIR_WINDOW.size)))
            peer = to_addr(s.getpeername())
        finally:
            with contextlib.suppress(OSError):
                _select_queue(s, sd.TCP_NO_QUEUE)
            _repair(s, sd.TCP_REPAIR_OFF_NO_WP)        # no window probe: nothing on the wire
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(base["opts"].reuseaddr))
            if peek_off >= 0:
                s.setsockopt(socket.SOL_SOCKET, sd.SO_PEEK_OFF, peek_off)
        ino = os.fstat(s.fileno()).st_ino
        boot = _boot_id()
        state = TcpState(state="ESTABLISHED", peer=peer, ino=ino, boot_id=boot,
                         inq_seq=inq_seq, outq_seq=outq_seq, inq=inq, outq=outq,
                         unsent=min(unsent, len(outq)), mss_clamp=mss, opt_mask=ti.options,
                         snd_wscale=ti.snd_wscale, rcv_wscale=ti.rcv_wscale, timestamp=ts,
                         window=window, **base)
        _hand_to_keeper(ctx.pid, s, keeper_name(boot, ino, base["local"], peer))
        return state
    except BaseException:
        with contextlib.suppress(OSError):
            sd.detach_filter(s)
        raise


def _read_queue(s: socket.socket, q: int, length: int, where: str) -> tuple[int, bytes]:
    _select_queue(s, q)
    seq = struct.unpack("<I", s.getsockopt(socket.SOL_TCP, sd.TCP_QUEUE_SEQ, 4))[0]
    if not length:
        return seq, b""
    data = s.recv(length + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)   # one more: all is there
    if len(data) != length:
        raise RestoreError(f"{where}: read {len(data)} bytes of its "
                           f"{'receive' if q == sd.TCP_RECV_QUEUE else 'send'} queue, "
                           f"expected {length}")
    return seq, data


# The keeper: a tiny process of its own (no linuxcr import, so it starts in
# a few ms) holding lcr's copy of one connection after the dump.
#   argv: socket fd, pidfd of the owner, listening fd (bound to the name a
#   restore asks at; -1: none), owner pid, hold seconds
KEEPER = r"""
import os, select, socket, struct, sys, time
sfd, pidfd, lfd = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
pid, hold = int(sys.argv[4]), float(sys.argv[5])
sk = socket.socket(fileno=sfd)
ls = socket.socket(fileno=lfd) if lfd >= 0 else None
def exited(timeout):
    return bool(select.select([pidfd], [], [], timeout)[0])
def status():
    tracer, state = None, "X"
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("State:"):
                    state = line.split()[1]
                elif line.startswith("TracerPid:"):
                    tracer = int(line.split()[1])
    except OSError:
        pass
    return tracer, state
while not exited(0.005):
    tracer, state = status()
    if tracer is None or state in "ZX":
        break                                   # dying or dead: killed after the dump
    if tracer == 0 and not exited(0):           # thawed (--leave-running, or a failed dump)
        sk.setsockopt(socket.SOL_SOCKET, 27, 0)   # SO_DETACH_FILTER: the peer gets through
        sys.exit(0)
try:
    sk.setsockopt(socket.SOL_TCP, 19, 1)        # TCP_REPAIR: it will close without FIN or RST
except OSError:
    sys.exit(0)
deadline = time.monotonic() + hold
while ls is not None:
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([ls], [], [], left)[0]:
        break
    c, _ = ls.accept()
    c.settimeout(10)
    try:
        uid = struct.unpack("3i", c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid not in (0, os.getuid()):
            c.close()
            continue
        c.sendmsg([b"ok"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", sfd))])
        sk.close()                              # the message holds it now, then the claimer alone
        c.send(b"closed")
        c.recv(16)                              # until the claimer closes
    except OSError:
        c.close()
        continue
    break
"""


def _hand_to_keeper(pid: int, s: socket.socket, name: bytes) -> None:
    """Start the keeper with lcr's copy of the socket.  Its name is bound
    here, before the keeper runs: a restore that comes early waits in the
    backlog instead of missing it."""
    hold = os.environ.get("LCR_TCP_HOLD", str(HOLD_SECONDS))
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        ls.bind(name)
        ls.listen(8)
    except OSError:          # an earlier keeper of this very connection is still there
        ls.close()
        ls = None
    pfd = pidfd_open(pid)
    try:
        keep = (s.fileno(), pfd) + ((ls.fileno(),) if ls else ())
        subprocess.Popen([sys.executable, "-I", "-S", "-c", KEEPER, str(s.fileno()), str(pfd),
                          str(ls.fileno() if ls else -1), str(pid), hold],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, pass_fds=keep, close_fds=True,
                         start_new_session=True, cwd="/")
    except OSError as e:
        raise RestoreError(f"cannot start the process that holds TCP connections: {e}") from None
    finally:
        os.close(pfd)
        if ls:
            ls.close()


# --- established: restore -----------------------------------------------------

def _claim(state: TcpState) -> socket.socket | None:
    """The original connection, if a keeper of this machine still holds it."""
    if not state.boot_id or state.boot_id != _boot_id() or state.peer is None:
        return None
    name = keeper_name(state.boot_id, state.ino, state.local, state.peer)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as c:
        c.settimeout(CLAIM_TIMEOUT)
        try:
            c.connect(name)
            _, anc, _, _ = c.recvmsg(16, socket.CMSG_SPACE(4))
        except OSError:
            return None
        held = None
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(blob) >= 4:
                held = socket.socket(fileno=int.from_bytes(blob[:4], "little"))
        if held is not None:
            with contextlib.suppress(OSError):
                c.recv(16)          # "closed": the keeper has let go of its copy
        return held


def _send_all(s: socket.socket, data: bytes, what: str) -> None:
    """Queue data in chunks (halved when the kernel refuses a big one)."""
    off, chunk = 0, len(data)
    while off < len(data):
        try:
            n = s.send(data[off:off + chunk], socket.MSG_DONTWAIT)
        except OSError as e:
            if chunk > 1024:
                chunk //= 2
                continue
            raise RestoreError(f"cannot restore {len(data)} bytes of {what}: {e.strerror}") from None
        off += n


def _open_established(s: socket.socket, st: TcpState) -> None:
    conn = f"TCP connection {shown(st.local)} -> {shown(st.peer)}"
    if st.peer is None or len(st.window) != 5:
        raise RestoreError(f"image holds an incomplete {conn}")
    apply_opts(s, st.opts, bufs=False)
    try:
        _repair(s, sd.TCP_REPAIR_ON)
    except PermissionError:
        raise RestoreError(f"cannot restore {conn}: TCP repair mode needs CAP_NET_ADMIN",
                           "restart as root") from None
    for q, seq, data in ((sd.TCP_RECV_QUEUE, st.inq_seq, st.inq), (sd.TCP_SEND_QUEUE, st.outq_seq, st.outq)):
        _select_queue(s, q)
        s.setsockopt(socket.SOL_TCP, sd.TCP_QUEUE_SEQ, struct.pack("<I", (seq - len(data)) & 0xFFFFFFFF))
    _select_queue(s, sd.TCP_NO_QUEUE)
    _bind(s, st)
    held = _claim(st)
    if held is not None:
        held.close()             # in repair mode: gone without a word to the peer
    deadline = time.monotonic() + (CLAIM_TIMEOUT if held is not None else 0)
    while True:
        try:
            s.connect(sockaddr(st.family, st.peer))
            break
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL and time.monotonic() < deadline:
                time.sleep(0.01)     # the original is on its way out
                continue
            raise RestoreError(f"cannot restore {conn}: {e.strerror}",
                               "the original connection must be gone first (was the checkpoint "
                               "taken with --leave-running?)") from None
    opts = [(sd.TCPOPT_MAXSEG, st.mss_clamp)]
    if st.opt_mask & sd.TCPI_OPT_SACK:
        opts.append((sd.TCPOPT_SACK_PERM, 0))
    if st.opt_mask & sd.TCPI_OPT_WSCALE:
        opts.append((sd.TCPOPT_WINDOW, st.snd_wscale | (st.rcv_wscale << 16)))
    if st.opt_mask & sd.TCPI_OPT_TIMESTAMPS:
        opts.append((sd.TCPOPT_TIMESTAMP, 0))
    s.setsockopt(socket.SOL_TCP, sd.TCP_REPAIR_OPTIONS, b"".join(sd.REPAIR_OPT.pack(*o) for o in opts))
    if st.opt_mask & sd.TCPI_OPT_TIMESTAMPS:
        s.setsockopt(socket.SOL_TCP, sd.TCP_TIMESTAMP, struct.pack("<I", st.timestamp))
    o = st.opts     # room for the queues, whatever the sizes now are
    set_buffers(s, max(o.sndbuf, 2 * len(st.outq) + 65536), max(o.rcvbuf, 2 * len(st.inq) + 65536))
    sent = len(st.outq) - st.unsent
    _select_queue(s, sd.TCP_RECV_QUEUE)
    if st.inq:
        _send_all(s, st.inq, f"the receive queue of {conn}")
    _select_queue(s, sd.TCP_SEND_QUEUE)
    if sent:
        _send_all(s, st.outq[:sent], f"the send queue of {conn}")
    _select_queue(s, sd.TCP_NO_QUEUE)
    try:
        s.setsockopt(socket.SOL_TCP, sd.TCP_REPAIR_WINDOW, sd.REPAIR_WINDOW.pack(*st.window))
    except OSError as e:
        raise RestoreError(f"cannot restore the window of {conn}: {e.strerror}") from None
    # Repair mode stays on until every socket of the image is open
    # (finish_open): the window probe of leaving it must find its peer when
    # both ends are restored here -- in a fresh `lcr run --net` namespace,
    # no original is held there to take it quietly, and the listener would
    # answer with a reset.


def _finish_established(s: socket.socket, st: TcpState) -> None:
    conn = f"TCP connection {shown(st.local)} -> {shown(st.peer)}"
    o = st.opts
    _repair(s, sd.TCP_REPAIR_OFF)          # a window probe: the peer hears from us again
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(o.reuseaddr))
    _set_tcp_opts(s, st)
    if st.unsent:
        _send_all(s, st.outq[len(st.outq) - st.unsent:], f"the send queue of {conn}")
    if o.buf_lock & 3 != 3:
        set_buffers(s, o.sndbuf if o.buf_lock & 1 else 0, o.rcvbuf if o.buf_lock & 2 else 0)
    lock_buffers(s, o.buf_lock)


KIND = Tcp()
