#!/usr/bin/env python3
"""netns_server -- sockets of an `lcr run --net` tree, checked from inside.

    netns_server.py [--no-pair]

Sets up, on 127.0.0.1 of its network namespace: a TCP listener (port
7070), an established connection to itself through it (client and
accepted end, unless --no-pair), a bound UDP socket (port 7071), a UNIX
listener on the abstract name @netns-server, a bound NETLINK_ROUTE socket
(abstract names and netlink ports are per network namespace); leaves
bytes unread in the accepted end's receive queue and one datagram unread
on the UDP socket, then prints "READY pid=P".

On SIGUSR1: the unread bytes and datagram (first time) are there, the pair
carries bytes both ways, the listener accepts a new connection that
carries bytes, the UDP socket gets a datagram, the UNIX listener takes a
connection, netlink lists lo alone; prints "PASS netns_server pid=P
round=N" or "FAIL netns_server: <details> (pid=P)".
"""
import socket
import struct
import sys

from probeloop import serve

NAME = "netns_server"
PAIR = "--no-pair" not in sys.argv


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = s.recv(n - len(out))
        if not got:
            break
        out += got
    return out


lst = socket.socket()
lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("127.0.0.1", 7070))
lst.listen(8)
cli = srv = None
if PAIR:
    cli = socket.create_connection(("127.0.0.1", 7070))
    srv, _ = lst.accept()
    cli.sendall(b"queued-tcp\n")
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 7071))
udp.sendto(b"queued-udp", ("127.0.0.1", 7071))
# abstract UNIX names are per network namespace; so are netlink ports
ux = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
ux.bind(b"\0netns-server")
ux.listen(4)
nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)   # NETLINK_ROUTE
nl.bind((0, 0))


def check(rounds: int) -> list[str]:
    fails = []
    for s in (lst, udp) + ((cli, srv) if PAIR else ()):
        s.settimeout(5)
    try:
        if PAIR:
            if rounds == 0 and recv_exact(srv, 11) != b"queued-tcp\n":
                fails.append("the unread TCP bytes are lost")
            cli.sendall(b"ping")
            if recv_exact(srv, 4) != b"ping":
                fails.append("client -> server lost bytes")
            srv.sendall(b"pong")
            if recv_exact(cli, 4) != b"pong":
                fails.append("server -> client lost bytes")
        if rounds == 0 and udp.recv(100) != b"queued-udp":
            fails.append("the unread datagram is lost")
        udp.sendto(b"u", ("127.0.0.1", 7071))
        if udp.recv(100) != b"u":
            fails.append("UDP lost a datagram")
        with socket.create_connection(("127.0.0.1", 7070), timeout=5) as c:
            a, _ = lst.accept()
            with a:
                a.settimeout(5)
                c.sendall(b"new")
                if recv_exact(a, 3) != b"new":
                    fails.append("a new connection lost bytes")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(5)
            c.connect(b"\0netns-server")
            a, _ = ux.accept()
            with a:
                c.sendall(b"unix")
                if recv_exact(a, 4) != b"unix":
                    fails.append("the abstract UNIX listener lost bytes")
        # RTM_GETLINK dump: the namespace has lo only
        nl.settimeout(5)
        nl.send(struct.pack("=IHHII", 32, 18, 0x301, 1, 0) + bytes(16))
        links, done = 0, False
        while not done:
            data = nl.recv(65536)
            off = 0
            while off + 16 <= len(data):
                ln, typ = struct.unpack_from("=IH", data, off)
                if typ == 3:            # NLMSG_DONE
                    done = True
                    break
                if typ == 16:           # RTM_NEWLINK
                    links += 1
                off += (ln + 3) & ~3
        if links != 1:
            fails.append(f"netlink lists {links} links, not lo alone")
    except OSError as e:
        fails.append(f"{type(e).__name__}: {e}")
    return fails


serve(NAME, check, lambda n: f"round={n}")
