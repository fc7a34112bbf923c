"""sock_diag (NETLINK_SOCK_DIAG) queries for UNIX sockets: what `ss -x` uses;
plus the small socket facts lcr reads on its own copy of a program's socket
(family/type/protocol, struct tcp_info) and the constants of TCP repair mode.

/proc/net/unix does not say who a socket's peer is; the kernel tells it here,
with the receive-queue length (for a listener: pending connections, and its
backlog), the shutdown state and the inode of the socket file it is bound to."""
from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
from dataclasses import dataclass

from linuxcr.sys.syscalls import fd_of

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER, UDIAG_SHOW_RQLEN = 0x01, 0x02, 0x04, 0x10
UDIAG_SHOW_SHUTDOWN = 0x20
UDIAG_SHOW_ICONS, UNIX_DIAG_ICONS = 0x08, 3
UNIX_DIAG_NAME, UNIX_DIAG_VFS, UNIX_DIAG_PEER, UNIX_DIAG_RQLEN, UNIX_DIAG_SHUTDOWN = 0, 1, 2, 4, 6
_NLMSG = struct.Struct("<IHHII")
_REQ = struct.Struct("<BBHIIIII")    # family, protocol, pad, states, ino, show, cookie[2]
_MSG = struct.Struct("<BBBBIII")     # family, type, state, pad, ino, cookie[2]


@dataclass(frozen=True)
class UnixDiag:
    ino: int
    type: int            # SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
    state: int           # TCP_ESTABLISHED=1 (connected), TCP_LISTEN=10, TCP_CLOSE=7
    peer: int            # peer's inode, 0 if none
    name: bytes          # bound address (b"" if unbound; leading NUL: abstract)
    rqueue: int          # bytes (or pending connections, when listening) queued
    shutdown: int        # bit 0: no more receives, bit 1: no more sends
    wqueue: int = 0      # bytes being sent (when listening: the backlog)
    vfs: tuple[int, int] | None = None   # (kernel dev_t, inode) of its socket file


# --- which network namespace the queries (and new sockets) are about ---------
# Normally lcr's own.  Inside ``inside(helper)``: the helper's (sys/nshelper.py,
# a tree started with `lcr run --net`), for every query and every socket made
# through new_socket().

_helper = None


@contextlib.contextmanager
def inside(helper):
    """sock_diag queries, new_socket() and same_netns() about ``helper``'s
    network namespace for the time of the block (None: lcr's own)."""
    global _helper
    before, _helper = _helper, helper
    try:
        yield helper
    finally:
        _helper = before


def new_socket(family: int, stype: int, proto: int = 0) -> socket.socket:
    """A new socket (close-on-exec) in the network namespace queries are about."""
    if _helper is None:
        return socket.socket(family, stype | socket.SOCK_CLOEXEC, proto)
    return _helper.socket(family, stype, proto)


def netns_ino() -> int:
    """Inode of the network namespace queries are about."""
    return _helper.netns if _helper is not None else os.stat("/proc/self/ns/net").st_ino


def _netlink() -> socket.socket:
    return new_socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)


def _request(ino: int, flags: int) -> bytes:
    req = _REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino,
                    UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN |
                    UDIAG_SHOW_SHUTDOWN, 0xFFFFFFFF, 0xFFFFFFFF)
    return _NLMSG.pack(_NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY, flags, 1, 0) + req


def _parse(data: bytes, off: int, length: int) -> UnixDiag:
    _fam, stype, state, _pad, got, _c0, _c1 = _MSG.unpack_from(data, off + _NLMSG.size)
    peer = rq = wq = shut = 0
    name = b""
    vfs = None
    end = off + length
    off += _NLMSG.size + _MSG.size
    while off + 4 <= end:
        rlen, rtype = struct.unpack_from("<HH", data, off)
        if rlen < 4:
            break
        body = data[off + 4:off + rlen]
        if rtype == UNIX_DIAG_PEER and len(body) >= 4:
            peer = struct.unpack_from("<I", body)[0]
        elif rtype == UNIX_DIAG_RQLEN and len(body) >= 8:
            rq, wq = struct.unpack_from("<II", body)
        elif rtype == UNIX_DIAG_SHUTDOWN and body:
            shut = body[0]
        elif rtype == UNIX_DIAG_NAME:
            name = bytes(body)
        elif rtype == UNIX_DIAG_VFS and len(body) >= 8:
            vino, vdev = struct.unpack_from("<II", body)
            vfs = (vdev, vino)
        off += (rlen + 3) & ~3
    return UnixDiag(ino=got, type=stype, state=state, peer=peer, name=name, rqueue=rq,
                    shutdown=shut, wqueue=wq, vfs=vfs)


def unix_diag(ino: int) -> UnixDiag | None:
    """What the kernel knows of UNIX socket ``ino`` (None if it is gone)."""
    with _netlink() as nl:
        nl.send(_request(ino, NLM_F_REQUEST))
        data = nl.recv(65536)
    length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data)
    if mtype == NLMSG_ERROR or length > len(data):
        return None
    return _parse(data, 0, length)


def unix_icons(ino: int) -> list[int]:
    """The connections waiting on listener ``ino``, oldest first: the inode
    of each one's client (0: the client is gone)."""
    req = _REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, UDIAG_SHOW_ICONS, 0xFFFFFFFF, 0xFFFFFFFF)
    with _netlink() as nl:
        nl.send(_NLMSG.pack(_NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + req)
        data = nl.recv(1 << 20)
    length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data)
    if mtype == NLMSG_ERROR or length > len(data):
        return []
    off, end = _NLMSG.size + _MSG.size, length
    while off + 4 <= end:
        rlen, rtype = struct.unpack_from("<HH", data, off)
        if rlen < 4:
            break
        if rtype == UNIX_DIAG_ICONS:
            body = data[off + 4:off + rlen]
            return list(struct.unpack_from(f"<{len(body) // 4}I", body))
        off += (rlen + 3) & ~3
    return []


def unix_all() -> list[UnixDiag]:
    """Every UNIX socket of lcr's network namespace."""
    out: list[UnixDiag] = []
    with _netlink() as nl:
        nl.send(_request(0, NLM_F_REQUEST | NLM_F_DUMP))
        while True:
            data = nl.recv(1 << 20)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, mtype, _f, _s, _p = _NLMSG.unpack_from(data, off)
                if mtype == NLMSG_DONE or length < _NLMSG.size:
                    return out
                if mtype == NLMSG_ERROR:
                    raise OSError("sock_diag: the kernel refused to list UNIX sockets")
                out.append(_parse(data, off, length))
                off += (length + 3) & ~3
            if not data:
                return out


def kernel_dev(st_dev: int) -> int:
    """The kernel's dev_t (major << 20 | minor), as sock_diag reports it."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


# --- inet sockets: facts read on lcr's own copy of the program's socket ---------

SO_PROTOCOL, SO_DOMAIN = 38, 39
SO_ATTACH_FILTER = SO_GET_FILTER = 26
SO_DETACH_FILTER, SO_LOCK_FILTER = 27, 44
SO_PEEK_OFF, SO_BUF_LOCK = 42, 72
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B
TCP_MAXSEG, TCP_CORK, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_INFO = 2, 3, 4, 5, 6, 11
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW, TCP_ULP = 24, 29, 31
TCP_REPAIR_ON, TCP_REPAIR_OFF, TCP_REPAIR_OFF_NO_WP = 1, 0, -1
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
              11: "CLOSING", 12: "NEW_SYN_RECV"}
TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10
REPAIR_WINDOW = struct.Struct("<5I")   # snd_wl1 snd_wnd max_window rcv_wnd rcv_wup
REPAIR_OPT = struct.Struct("<II")      # opt_code opt_val


@dataclass(frozen=True)
class TcpInfo:
    """The fields of struct tcp_info lcr uses."""
    state: int
    options: int         # TCPI_OPT_*
    snd_wscale: int
    rcv_wscale: int
    unacked: int         # LISTEN: connections waiting to be accepted
    sacked: int          # LISTEN: the backlog
    segs_out: int
    segs_in: int


def tcp_info(s: socket.socket) -> TcpInfo:
    raw = s.getsockopt(socket.SOL_TCP, TCP_INFO, 232)
    raw = raw + bytes(max(0, 144 - len(raw)))
    state, _ca, _rt, _pr, _bo, options, wscale = struct.unpack_from("<7B", raw)
    unacked, sacked = struct.unpack_from("<II", raw, 24)
    segs_out, segs_in = struct.unpack_from("<II", raw, 136)
    return TcpInfo(state=state, options=options, snd_wscale=wscale & 15, rcv_wscale=wscale >> 4,
                   unacked=unacked, sacked=sacked, segs_out=segs_out, segs_in=segs_in)


def queue_sizes(s: socket.socket) -> tuple[int, int, int]:
    """(bytes to read, bytes not acknowledged by the peer yet, of which not sent yet)."""
    import array
    import fcntl
    out = []
    for req in (SIOCINQ, SIOCOUTQ, SIOCOUTQNSD):
        buf = array.array("i", [0])
        fcntl.ioctl(s.fileno(), req, buf)
        out.append(buf[0])
    return out[0], out[1], out[2]


def grab_socket(pid: int, fd: int) -> socket.socket:
    """lcr's own copy of socket fd of pid (pidfd_getfd): the same socket."""
    return socket.socket(fileno=fd_of(pid, fd))


def identity(s: socket.socket) -> tuple[int, int, int]:
    """(family, type, protocol) of a socket."""
    return (s.getsockopt(socket.SOL_SOCKET, SO_DOMAIN), s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE),
            s.getsockopt(socket.SOL_SOCKET, SO_PROTOCOL))


def filter_len(s: socket.socket) -> int:
    """How many BPF instructions the socket's filter has (0: none)."""
    return s.getsockopt(socket.SOL_SOCKET, SO_GET_FILTER)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


_DROP = (_SockFilter * 1)(_SockFilter(0x06, 0, 0, 0))     # BPF_RET | BPF_K, 0: keep no byte
_DROP_PROG = _SockFprog(1, _DROP)


def attach_drop_all(s: socket.socket) -> None:
    """A socket filter that drops every packet coming in: for TCP the kernel
    discards each segment before acknowledging it, so the peer keeps it and
    sends it again later (what CRIU does with netfilter rules)."""
    s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                 ctypes.string_at(ctypes.addressof(_DROP_PROG), ctypes.sizeof(_DROP_PROG)))


def detach_filter(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)


SIOCGSKNS = 0x894C
NOT_YET_NET = "not yet for a tree in its own network namespace"


def same_netns(pid: int) -> bool:
    """Is pid in lcr's network namespace, or the one queries are about
    (``inside``: the `lcr run --net` namespace of the tree being saved)?"""
    ino = os.stat(f"/proc/{pid}/ns/net").st_ino
    return ino in (os.stat("/proc/self/ns/net").st_ino, netns_ino())


def socket_netns(s: socket.socket) -> int | None:
    """Inode of the network namespace socket s was made in (SIOCGSKNS);
    None if lcr may not ask (it needs CAP_NET_ADMIN over that namespace)."""
    import fcntl
    try:
        fd = fcntl.ioctl(s.fileno(), SIOCGSKNS)
    except OSError:
        return None
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def netns_reason(s: socket.socket, pid: int) -> str | None:
    """Why socket s (of pid) is in a network namespace lcr cannot make it in
    again (None: lcr's own, or the one queries are about -- the tree's own,
    inside(helper)).  By the socket's own namespace when the kernel tells
    it, else by pid's."""
    ino = socket_netns(s)
    if ino is None and same_netns(pid) or ino in (os.stat("/proc/self/ns/net").st_ino, netns_ino()):
        return None
    if _helper is not None:
        return ("belongs to a network namespace the tree made itself, not the one of "
                "`lcr run --net`: not supported")
    return f"belongs to a network namespace other than lcr's: {NOT_YET_NET}"
