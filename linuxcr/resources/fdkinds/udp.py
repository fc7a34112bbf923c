"""UDP sockets (IPv4 and IPv6): bound or not, connect()ed or not, with the
datagrams still queued.

Dump: addresses (getsockname/getpeername), options, and every queued
datagram read without being consumed (SO_PEEK_OFF + MSG_PEEK on lcr's copy).
Restore, in lcr before the tasks exist: socket(), options, bind() to the
saved address, the datagrams sent again from a temporary socket on this
machine to the new socket's address (so recvfrom() reports that temporary
sender, not the original one, and per-datagram ancillary data is that of
the new delivery), and last connect() to the saved peer.  Datagrams that
arrive while the program is checkpointed and not running are not saved:
UDP may lose datagrams, and does here.  Refused: a BPF filter of the
program's own, another network namespace.  Not saved: multicast group
memberships and IP-level options (TTL, TOS, PKTINFO...)."""
from __future__ import annotations

import os
import socket
import time

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import UdpState
from linuxcr.resources import unix_sockets
from linuxcr.resources.fdkinds.tcp import FAMILIES, InetKind, inet_identity, shown, sockaddr, to_addr, v6only
from linuxcr.resources.fdkinds.unix_bound import apply_opts, read_opts, set_peek_off
from linuxcr.sys import sockdiag as sd

DELIVERY_WAIT = 2.0       # seconds for refilled datagrams to arrive (loopback: at once)


class Udp(InetKind):
    name, label = "udp", "UDP"
    sock_type, proto = socket.SOCK_DGRAM, socket.IPPROTO_UDP

    def why(self, ctx, s) -> str | None:
        return _reason(ctx, s)

    def dump(self, ctx) -> UdpState:
        with sd.grab_socket(ctx.pid, ctx.fd) as s:
            self.refuse(ctx, s)
            family = sd.identity(s)[0]
            try:
                peer = to_addr(s.getpeername())
            except OSError:
                peer = None
            ino = os.fstat(s.fileno()).st_ino
            queue = unix_sockets.peek_all(s, ctx.pid, ctx.fd, ino)
            return UdpState(family=family, local=to_addr(s.getsockname()), opts=read_opts(s),
                            peer=peer, v6only=v6only(s, family), queue=queue)

    def open(self, state: UdpState, flags: int) -> int:
        if state.family not in FAMILIES:
            raise RestoreError(f"image holds a UDP socket of unknown family {state.family}")
        s = sd.new_socket(state.family, socket.SOCK_DGRAM)
        try:
            if state.v6only:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            apply_opts(s, state.opts)
            if state.local.port:
                try:
                    s.bind(sockaddr(state.family, state.local))
                except OSError as e:
                    raise RestoreError(f"cannot bind a UDP socket to {shown(state.local)}: {e.strerror}",
                                       "is the port in use? (was the checkpoint taken with "
                                       "--leave-running?)") from None
            if state.queue:
                _refill(s, state)
            if state.peer is not None:
                try:
                    s.connect(sockaddr(state.family, state.peer))
                except OSError as e:
                    raise RestoreError(f"cannot connect a UDP socket to {shown(state.peer)}: "
                                       f"{e.strerror}") from None
            set_peek_off(s, state.opts)
            s.setblocking(not flags & os.O_NONBLOCK)
        except BaseException:
            s.close()
            raise
        return s.detach()


def _reason(ctx, s: socket.socket) -> str | None:
    where = f"UDP socket {shown(to_addr(s.getsockname()))}"
    why = sd.netns_reason(s, ctx.pid)
    if why:
        return f"{where} {why}"
    if sd.filter_len(s):
        return f"{where} has a socket filter (SO_ATTACH_FILTER) of its own: not supported"
    return None


def _target(state: UdpState) -> tuple:
    """Where to send datagrams so that they reach the new socket."""
    host = state.local.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("::", "::ffff:0.0.0.0"):
        host = "::1"
    return sockaddr(state.family, type(state.local)(host=host, port=state.local.port,
                                                    flowinfo=state.local.flowinfo,
                                                    scope_id=state.local.scope_id))


def _refill(s: socket.socket, state: UdpState) -> None:
    if not state.local.port:
        raise RestoreError("image holds datagrams queued on a UDP socket with no port")
    to = _target(state)
    with sd.new_socket(state.family, socket.SOCK_DGRAM) as tmp:
        for m in state.queue:
            try:
                tmp.sendto(m, to)
            except OSError as e:
                raise RestoreError(f"cannot queue the datagrams of UDP socket "
                                   f"{shown(state.local)} again: {e.strerror}") from None
    deadline = time.monotonic() + DELIVERY_WAIT
    while True:
        got = _count(s)
        if got >= len(state.queue):
            return
        if time.monotonic() > deadline:
            raise RestoreError(f"UDP socket {shown(state.local)}: only {got} of its "
                               f"{len(state.queue)} queued datagrams could be queued again",
                               "its receive buffer may be smaller than where the image was taken")
        time.sleep(0.005)


def _count(s: socket.socket) -> int:
    """Datagrams queued on s, none consumed."""
    n = 0
    s.setsockopt(socket.SOL_SOCKET, sd.SO_PEEK_OFF, 0)
    try:
        while True:
            try:
                s.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return n
            n += 1
    finally:
        s.setsockopt(socket.SOL_SOCKET, sd.SO_PEEK_OFF, -1)


KIND = Udp()
