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

Files in flight (SCM_RIGHTS) are saved like any other open file (the
Table's adopt(), even when no task holds them any more) and queued again
with their message; credentials (SCM_CREDENTIALS, seen when SO_PASSCRED is
on) are sent again explicitly: uid and gid exactly, the pid when it exists
at the restart (a sender of the tree is not created yet then: lcr's pid).

Not yet: a peer outside the tree: refused with a reason."""
from __future__ import annotations

import os
import socket
import struct

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import MsgExtra
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


def dump(pid: int, fd: int, ino: int, adopt=None) -> UnixPair:
    """Type, shutdown state, options and queued messages of one end
    (``adopt(fd) -> fid`` saves a file found in flight, see files.Table)."""
    d = unix_diag(ino)
    if d is None:
        raise RestoreError(f"pid {pid} fd {fd}: socket:[{ino}] vanished")
    pfd = pidfd_open(pid)
    try:
        s = socket.socket(fileno=pidfd_getfd(pfd, fd))
    finally:
        os.close(pfd)
    with s:
        msgs, extras = peek_full(s, pid, fd, ino, adopt) if d.rqueue else ([], [])
        return UnixPair(ino=ino, peer=d.peer, type=d.type, shutdown=d.shutdown,
                        rcvbuf=s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                        sndbuf=s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                        passcred=bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED)),
                        peek_off=s.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF),
                        queue=msgs, extras=extras)


SCM_MAX_FD = 253
_CREDS = struct.Struct("iII")      # struct ucred: pid, uid, gid
_ANC = socket.CMSG_SPACE(4 * SCM_MAX_FD) + socket.CMSG_SPACE(_CREDS.size)


def _name(addr) -> bytes:
    """A sender's address as recvmsg gives it (str path, bytes abstract)."""
    if not addr:
        return b""
    return os.fsencode(addr) if isinstance(addr, str) else bytes(addr)


def peek_full(s: socket.socket, pid: int, fd: int, ino: int,
              adopt=None) -> tuple[list[bytes], list[MsgExtra]]:
    """Every queued message, in order, none consumed (SO_PEEK_OFF walks the
    queue), with what travels with it: files in flight (each handed to
    ``adopt``, which saves it and gives its fid; without it they are
    refused), credentials (when SO_PASSCRED shows them), the sender's name."""
    msgs: list[bytes] = []
    extras: list[MsgExtra] = []
    total = 0
    before = s.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)   # the program's own, put back
    s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    where = f"pid {pid} fd {fd}: socket:[{ino}]"
    try:
        while True:
            try:
                data, anc, flags, addr = s.recvmsg(1 << 20, _ANC, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return msgs, extras
            fds = _fds_of(anc)
            try:
                if flags & socket.MSG_CTRUNC:
                    raise RestoreError(f"{where} holds a message whose ancillary data lcr cannot read whole")
                if fds and adopt is None:
                    raise RestoreError(f"{where} has file descriptors queued (SCM_RIGHTS): "
                                       "not supported on this kind of socket")
                fids = [adopt(x) for x in fds]
            finally:
                for x in fds:
                    os.close(x)       # adopt() kept its own copy
            if not data and not fds and s.type == socket.SOCK_STREAM:
                return msgs, extras
            if flags & socket.MSG_TRUNC:
                raise RestoreError(f"{where} holds a message of more than 1 MiB: not supported")
            creds = [list(_CREDS.unpack(blob[:_CREDS.size])) for level, kind, blob in anc
                     if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
            sender = _name(addr) if s.family == socket.AF_UNIX and s.type != socket.SOCK_STREAM else b""
            if fids or creds or sender:
                extras.append(MsgExtra(index=len(msgs), fids=fids, creds=creds[0] if creds else [],
                                       sender=sender))
            msgs.append(data)
            total += len(data)
            if total > MAX_QUEUE:
                raise RestoreError(f"{where} holds more than {MAX_QUEUE >> 20} MiB of queued data")
    finally:
        s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, before)


def _fds_of(anc) -> list[int]:
    out: list[int] = []
    for level, kind, blob in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            out += [int.from_bytes(blob[i:i + 4], "little") for i in range(0, len(blob) - len(blob) % 4, 4)]
    return out


def peek_all(s: socket.socket, pid: int, fd: int, ino: int) -> list[bytes]:
    """Queued messages of a socket that cannot carry files (udp.py)."""
    return peek_full(s, pid, fd, ino)[0]


def create(a: UnixPair, b: UnixPair) -> tuple[int, int]:
    """A connected pair like the saved one, with its options; the queues
    come back later (fill), once every open file that may be in flight is open."""
    sa, sb = socket.socketpair(socket.AF_UNIX, a.type | socket.SOCK_CLOEXEC)
    try:
        for s, me in ((sa, a), (sb, b)):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, max(me.rcvbuf // 2, 1024))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(me.sndbuf // 2, 1024))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, int(me.passcred))
            if me.peek_off >= 0:
                s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, me.peek_off)
    except BaseException:
        sa.close()
        sb.close()
        raise
    return sa.detach(), sb.detach()


def fill(fa: int, fb: int, a: UnixPair, b: UnixPair, ours: dict[int, int]) -> None:
    """Each end gets its queue back, sent from the other end (files in
    flight are lcr's fds of their descriptions: ``ours`` fid -> fd)."""
    for sender, receiver in ((fb, a), (fa, b)):
        send_queue(sender, receiver.queue, receiver.extras, ours, f"socket:[{receiver.ino}]")


def shut(fd: int, me: UnixPair) -> None:
    how = {1: socket.SHUT_RD, 2: socket.SHUT_WR, 3: socket.SHUT_RDWR}.get(me.shutdown & 3)
    if how is not None:
        _shutdown(fd, how)


def _shutdown(fd: int, how: int) -> None:
    s = socket.socket(fileno=os.dup(fd))
    try:
        s.shutdown(how)
    finally:
        s.close()


def ancillary(extra: MsgExtra | None, ours: dict[int, int], where: str) -> list:
    """The cmsgs that give a message its files and credentials again."""
    if extra is None:
        return []
    anc = []
    if extra.fids:
        missing = [f for f in extra.fids if f not in ours]
        if missing:
            raise RestoreError(f"{where}: a queued message carries open file #{missing[0]}, "
                               "which the image does not hold")
        anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS,
                    b"".join(ours[f].to_bytes(4, "little") for f in extra.fids)))
    if len(extra.creds) == 3:
        anc.append((socket.SOL_SOCKET, socket.SCM_CREDENTIALS, _CREDS.pack(*extra.creds)))
    return anc


def send_one(s: socket.socket, data: bytes, anc: list, dest=None) -> None:
    """sendmsg, falling back on lcr's own pid in the credentials when the
    saved sender's pid does not exist (yet) here: uid and gid stay."""
    args = (dest,) if dest is not None else ()
    try:
        s.sendmsg([data], anc, socket.MSG_DONTWAIT, *args)
        return
    except (ProcessLookupError, PermissionError):
        if not any(kind == socket.SCM_CREDENTIALS for _l, kind, _b in anc):
            raise
    fixed = []
    for level, kind, blob in anc:
        if kind == socket.SCM_CREDENTIALS:
            _pid, uid, gid = _CREDS.unpack(blob)
            blob = _CREDS.pack(os.getpid(), uid, gid)
        fixed.append((level, kind, blob))
    try:
        s.sendmsg([data], fixed, socket.MSG_DONTWAIT, *args)
    except PermissionError:      # another uid without CAP_SETUID: lcr's own
        s.sendmsg([data], [x for x in fixed if x[1] != socket.SCM_CREDENTIALS], socket.MSG_DONTWAIT, *args)


def send_queue(sender_fd: int, queue: list[bytes], extras: list[MsgExtra], ours: dict[int, int],
               where: str) -> None:
    by_index = {e.index: e for e in extras}
    s = socket.socket(fileno=os.dup(sender_fd))
    try:
        for i, m in enumerate(queue):
            try:
                send_one(s, m, ancillary(by_index.get(i), ours, where))
            except OSError as e:
                raise RestoreError(f"cannot queue {len(m)} bytes again on {where}: "
                                   f"{e.strerror}") from None
    finally:
        s.close()
