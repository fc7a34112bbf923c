"""sock_diag (NETLINK_SOCK_DIAG) queries for UNIX sockets: what `ss -x` uses.

/proc/net/unix does not say who a socket's peer is; the kernel tells it here,
with the receive-queue length and the shutdown state."""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
UDIAG_SHOW_NAME, UDIAG_SHOW_PEER, UDIAG_SHOW_RQLEN = 0x01, 0x04, 0x10
UNIX_DIAG_NAME, UNIX_DIAG_PEER, UNIX_DIAG_RQLEN, UNIX_DIAG_SHUTDOWN = 0, 2, 4, 6
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


def unix_diag(ino: int) -> UnixDiag | None:
    """What the kernel knows of UNIX socket ``ino`` (None if it is gone)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        req = _REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino,
                        UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN | 0x20,
                        0xFFFFFFFF, 0xFFFFFFFF)
        nl.send(_NLMSG.pack(_NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + req)
        data = nl.recv(65536)
    length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data)
    if mtype == NLMSG_ERROR or length > len(data):
        return None
    _fam, stype, state, _pad, got, _c0, _c1 = _MSG.unpack_from(data, _NLMSG.size)
    peer = rq = shut = 0
    name = b""
    off = _NLMSG.size + _MSG.size
    while off + 4 <= length:
        rlen, rtype = struct.unpack_from("<HH", data, off)
        if rlen < 4:
            break
        body = data[off + 4:off + rlen]
        if rtype == UNIX_DIAG_PEER and len(body) >= 4:
            peer = struct.unpack_from("<I", body)[0]
        elif rtype == UNIX_DIAG_RQLEN and len(body) >= 8:
            rq = struct.unpack_from("<I", body)[0]
        elif rtype == UNIX_DIAG_SHUTDOWN and body:
            shut = body[0]
        elif rtype == UNIX_DIAG_NAME:
            name = bytes(body)
        off += (rlen + 3) & ~3
    return UnixDiag(ino=got, type=stype, state=state, peer=peer, name=name, rqueue=rq, shutdown=shut)
