"""UNIX sockets connected to each other inside the tree (socketpair, or a
pair whose both ends the tree holds), with the messages still queued.

Dump: the peer comes from sock_diag; queued messages are read without being
consumed (our copy of the socket with SO_PEEK_OFF, MSG_PEEK), so a program
left running reads them all the same.  Restore: lcr makes a socketpair of the
same type and sends each queued message again from the other end, message by
message, so datagram and seqpacket boundaries are kept.

A connection accepted from a listener is such a pair too (the client's end
and the accepted end): it is restored as a socketpair, so getsockname() of
the accepted end and getpeername() of the client's end no longer return the
listener's name.  Listening, bound and unconnected UNIX sockets are the
kind resources/fdkinds/unix_bound.py.

Not yet: a peer outside the tree, a datagram socket both bound and
connected, queued file descriptors (SCM_RIGHTS): refused with a reason."""
from __future__ import annotations

import os
import socket

from linuxcr.errors import RestoreError
from linuxcr.image.schema import UnixPair
from linuxcr.sys.sockdiag import unix_diag
from linuxcr.sys.syscalls import pidfd_getfd, pidfd_open

SO_PEEK_OFF = 42
TCP_ESTABLISHED, TCP_LISTEN = 1, 10
TYPES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram", socket.SOCK_SEQPACKET: "seqpacket"}
MAX_QUEUE = 16 << 20


def reason(fd: int, ino: int) -> str | None:
    """Why the UNIX socket behind ``fd`` cannot be saved (None if it can)."""
    d = unix_diag(ino)
    where = f"fd {fd}: UNIX socket:[{ino}]"
    if d is None:
        return (f"fd {fd}: socket:[{ino}]: this kind of socket is not supported (UNIX, TCP "
                "and UDP sockets are)")
    if d.type not in TYPES:
        return f"{where} of type {d.type}: not supported"
    if d.state == TCP_LISTEN:
        return f"{where} is listening{_named(d.name)}: listening sockets are not supported yet"
    if not d.peer:
        return f"{where} is not connected: unconnected sockets are not supported yet"
    if d.name and d.type == socket.SOCK_DGRAM:   # stream: an accepted end carries the listener's name
        return (f"{where} is bound{_named(d.name)} and connected: bound and connected "
                "datagram sockets are not supported yet")
    return None


def _named(name: bytes) -> str:
    if not name:
        return ""
    return f" on @{name[1:].decode(errors='replace')}" if name[:1] == b"\0" else \
        f" on {name.decode(errors='replace')}"


def peer_of(ino: int) -> int:
    d = unix_diag(ino)
    return d.peer if d else 0


def dump(pid: int, fd: int, ino: int) -> UnixPair:
    """Type, shutdown state, buffer sizes and queued messages of one end."""
    d = unix_diag(ino)
    if d is None:
        raise RestoreError(f"pid {pid} fd {fd}: socket:[{ino}] vanished")
    pfd = pidfd_open(pid)
    try:
        s = socket.socket(fileno=pidfd_getfd(pfd, fd))
    finally:
        os.close(pfd)
    with s:
        msgs = _peek_all(s, pid, fd, ino) if d.rqueue else []
        return UnixPair(ino=ino, peer=d.peer, type=d.type, shutdown=d.shutdown,
                        rcvbuf=s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                        sndbuf=s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                        passcred=bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED)),
                        queue=msgs)


def _peek_all(s: socket.socket, pid: int, fd: int, ino: int) -> list[bytes]:
    """Every queued message, in order, none consumed (SO_PEEK_OFF walks the queue)."""
    msgs: list[bytes] = []
    total = 0
    before = s.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)   # the program's own, put back
    s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    try:
        while True:
            try:
                data, anc, flags, _ = s.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 64),
                                                socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return msgs
            if any(level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS for level, kind, _ in anc):
                for level, kind, blob in anc:   # we were handed fds: do not keep them
                    if kind == socket.SCM_RIGHTS:
                        for i in range(0, len(blob) - len(blob) % 4, 4):
                            os.close(int.from_bytes(blob[i:i + 4], "little"))
                raise RestoreError(f"pid {pid} fd {fd}: socket:[{ino}] has file descriptors queued "
                                   "(SCM_RIGHTS): not supported yet")
            if not data and s.type == socket.SOCK_STREAM:
                return msgs
            if flags & socket.MSG_TRUNC:
                raise RestoreError(f"pid {pid} fd {fd}: socket:[{ino}] holds a message of more "
                                   "than 1 MiB: not supported")
            msgs.append(data)
            total += len(data)
            if total > MAX_QUEUE:
                raise RestoreError(f"pid {pid} fd {fd}: socket:[{ino}] holds more than "
                                   f"{MAX_QUEUE >> 20} MiB of queued data")
    finally:
        s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, before)


peek_all = _peek_all    # for the other socket kinds (resources/fdkinds/unix_bound.py, udp.py)


def create(a: UnixPair, b: UnixPair) -> tuple[int, int]:
    """A connected pair like the saved one: each end gets its queue back by
    sending it from the other end."""
    sa, sb = socket.socketpair(socket.AF_UNIX, a.type)
    try:
        for s, me in ((sa, a), (sb, b)):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, max(me.rcvbuf // 2, 1024))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(me.sndbuf // 2, 1024))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, int(me.passcred))
        for sender, receiver in ((sb, a), (sa, b)):
            sender.setblocking(False)
            for m in receiver.queue:
                try:
                    sender.send(m)
                except OSError as e:
                    raise RestoreError(f"cannot queue {len(m)} bytes again on socket:[{receiver.ino}]: "
                                       f"{e.strerror}") from None
            sender.setblocking(True)
        for s, me in ((sa, a), (sb, b)):
            how = {1: socket.SHUT_RD, 2: socket.SHUT_WR, 3: socket.SHUT_RDWR}.get(me.shutdown & 3)
            if how is not None:
                s.shutdown(how)
    except BaseException:
        sa.close()
        sb.close()
        raise
    return sa.detach(), sb.detach()
