#!/usr/bin/env python3
"""ns_probe -- the namespaces of an `lcr run` tree, checked from inside.

    ns_probe.py HOSTNAME

Prints "READY pid=P"; on SIGUSR1 checks that its hostname is HOSTNAME,
that its network namespace has loopback only and up (a TCP connection to
itself over 127.0.0.1 carries bytes), and prints "PASS ns_probe pid=P
links=N" or "FAIL ns_probe: <details> (pid=P)".
"""
import socket
import sys

from probeloop import serve

NAME = "ns_probe"
want = sys.argv[1]


def check(n: int) -> list[str]:
    fails = []
    if socket.gethostname() != want:
        fails.append(f"hostname {socket.gethostname()!r}")
    with open("/proc/net/dev") as f:
        links = [ln.split(":")[0].strip() for ln in f.readlines()[2:]]
    if links != ["lo"]:
        fails.append(f"links {links}")
    try:
        with socket.socket() as srv:
            srv.bind(("127.0.0.1", 0))
            srv.listen(1)
            with socket.create_connection(srv.getsockname(), timeout=5) as c:
                a, _ = srv.accept()
                c.sendall(b"ping")
                if a.recv(4) != b"ping":
                    fails.append("loopback lost bytes")
                a.close()
    except OSError as e:
        fails.append(f"loopback: {e}")
    return fails


serve(NAME, check, lambda n: "links=1")
