"""Sockets that are neither UNIX, TCP nor UDP: netlink sockets of the route
and generic families that are only bound (what libraries such as
libnl/libmnl/glibc's getaddrinfo keep open), restored; every other one
refused with its exact kind ("netlink socket (NETLINK_AUDIT)", "packet
socket", "vsock socket", "raw IPv4 socket (protocol 1)" ...).

Dump (netlink): type, protocol, the port id and the multicast groups it is
bound to (getsockname, NETLINK_LIST_MEMBERSHIPS), buffer sizes.  A socket
with messages not read yet, or connect()ed to a port, is refused: the
kernel's answers in flight cannot be asked for again.
Restore: socket(), bind() to the same port id -- libraries check that the
answers carry it -- and the same groups; a port id now taken is refused."""
from __future__ import annotations

import socket
import struct

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import NetlinkState
from linuxcr.resources.fdkinds.tcp import inet_identity
from linuxcr.resources.fdkinds.unix_bound import apply_opts, read_opts
from linuxcr.sys import sockdiag as sd

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP, NETLINK_LIST_MEMBERSHIPS = 1, 9
NETLINK_ROUTE, NETLINK_GENERIC = 0, 16
RESTORED = (NETLINK_ROUTE, NETLINK_GENERIC)
NETLINK_PROTOCOLS = {0: "NETLINK_ROUTE", 2: "NETLINK_USERSOCK", 3: "NETLINK_FIREWALL",
                     4: "NETLINK_SOCK_DIAG", 5: "NETLINK_NFLOG", 6: "NETLINK_XFRM",
                     7: "NETLINK_SELINUX", 8: "NETLINK_ISCSI", 9: "NETLINK_AUDIT",
                     10: "NETLINK_FIB_LOOKUP", 11: "NETLINK_CONNECTOR", 12: "NETLINK_NETFILTER",
                     13: "NETLINK_IP6_FW", 14: "NETLINK_DNRTMSG", 15: "NETLINK_KOBJECT_UEVENT",
                     16: "NETLINK_GENERIC", 18: "NETLINK_SCSITRANSPORT", 19: "NETLINK_ECRYPTFS",
                     20: "NETLINK_RDMA", 21: "NETLINK_CRYPTO", 22: "NETLINK_SMC"}
FAMILIES = {socket.AF_PACKET: "packet", 40: "vsock", 38: "AF_ALG (kernel crypto)",
            31: "Bluetooth", 29: "CAN", 44: "AF_XDP", 15: "AF_KEY (IPsec keys)", 17: "packet",
            3: "AX.25", 4: "IPX", 5: "AppleTalk", 9: "X.25", 21: "RDS", 30: "TIPC",
            41: "KCM", 42: "Qualcomm IPC", 43: "SMC", 45: "MCTP"}
INET_TYPES = {socket.SOCK_RAW: "raw", socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram",
              socket.SOCK_SEQPACKET: "seqpacket"}
WAY_OUT = "close it before the checkpoint, or open it again after the restart"


def kind_name(family: int, stype: int, proto: int) -> str:
    """What the socket is, in words a user recognises."""
    if family == socket.AF_NETLINK:
        return f"netlink socket ({NETLINK_PROTOCOLS.get(proto, f'protocol {proto}')})"
    if family in (socket.AF_INET, socket.AF_INET6):
        v = "IPv4" if family == socket.AF_INET else "IPv6"
        name = {socket.IPPROTO_SCTP: "SCTP", 262: "MPTCP", 136: "UDP-Lite",
                socket.IPPROTO_ICMP: "ICMP", 58: "ICMPv6"}.get(proto, f"protocol {proto}")
        return f"{INET_TYPES.get(stype, f'type {stype}')} {v} socket ({name})"
    return f"{FAMILIES.get(family, f'address family {family}')} socket"


def _identity(ctx) -> tuple[int, int, int] | None:
    if not ctx.link.startswith("socket:"):
        return None
    try:
        with sd.grab_socket(ctx.pid, ctx.fd) as s:
            return sd.identity(s)
    except OSError:
        return None


def _memberships(s: socket.socket) -> list[int]:
    raw = s.getsockopt(SOL_NETLINK, NETLINK_LIST_MEMBERSHIPS, 128)
    out = []
    for i, word in enumerate(struct.unpack(f"<{len(raw) // 4}I", raw[: len(raw) // 4 * 4])):
        out += [i * 32 + b + 1 for b in range(32) if word >> b & 1]
    return out


def _queued(s: socket.socket) -> bool:
    try:
        return bool(s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT | socket.MSG_TRUNC) or True)
    except BlockingIOError:
        return False


class OtherSocket:
    name = "netlink"

    def matches(self, ctx) -> bool:
        ident = _identity(ctx)
        if ident is None or ident[0] == socket.AF_UNIX:
            return False
        return inet_identity(ctx) is None or ident[2] not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP) \
            or ident[1] not in (socket.SOCK_STREAM, socket.SOCK_DGRAM)

    def reason(self, ctx) -> str | None:
        ident = _identity(ctx)
        if ident is None:
            return f"{ctx.link}: vanished while being inspected"
        family, stype, proto = ident
        what = f"{kind_name(family, stype, proto)} {ctx.link}"
        if family != socket.AF_NETLINK:
            return f"{what}: this kind of socket is not supported; {WAY_OUT}"
        if proto not in RESTORED:
            return (f"{what}: only NETLINK_ROUTE and NETLINK_GENERIC sockets are restored; "
                    f"{WAY_OUT}")
        with sd.grab_socket(ctx.pid, ctx.fd) as s:
            why = sd.netns_reason(s, ctx.pid)
            if why:
                return f"{what} {why}"
            try:
                peer = s.getpeername()
            except OSError:
                peer = (0, 0)
            if peer[0]:
                return f"{what} is connected to port {peer[0]}: not supported; {WAY_OUT}"
            if _queued(s):
                return (f"{what} holds messages not read yet (answers or events in flight): "
                        "cannot be checkpointed until the program reads them")
        return None

    def dump(self, ctx) -> NetlinkState:
        with sd.grab_socket(ctx.pid, ctx.fd) as s:
            family, stype, proto = sd.identity(s)
            portid, groups = s.getsockname()
            return NetlinkState(sotype=stype, protocol=proto, portid=portid, groups=groups,
                                memberships=_memberships(s), opts=read_opts(s))

    def open(self, state: NetlinkState, flags: int) -> int:
        if state.protocol not in RESTORED:
            raise RestoreError(f"image holds a netlink socket of protocol {state.protocol}: "
                               "not restorable")
        s = sd.new_socket(socket.AF_NETLINK, state.sotype, state.protocol)
        try:
            apply_opts(s, state.opts)
            if state.portid or state.groups:
                try:
                    s.bind((state.portid, state.groups))
                except OSError as e:
                    raise RestoreError(f"cannot bind a netlink socket to port {state.portid}: "
                                       f"{e.strerror}", "is the original still running "
                                       "(--leave-running)?") from None
            for g in state.memberships:
                if g > 32 or not state.groups >> (g - 1) & 1:
                    s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, g)
            s.setblocking(not flags & 0o4000)
        except BaseException:
            s.close()
            raise
        return s.detach()


KIND = OtherSocket()
