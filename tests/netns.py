"""Two network namespaces joined by a veth pair, for migration tests.

    with two_namespaces() as net:
        net.a, net.b            # namespace names (unique per test run)
        net.addr_a, net.addr_b  # "10.77.X.1", "10.77.X.2"
        net.exec_a(argv)        # argv prefixed with `ip netns exec A`
        net.extra_a             # more addresses of A ("10.77.X.11".."18"): other hosts

Created with iproute2 (root only), removed on exit: deleting a namespace
also deletes its end of the veth pair (and so the pair).  A namespace that
some process still lives in lingers, unnamed, until that process exits.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

_seq = itertools.count()


def available() -> str | None:
    """None if the fixture can work here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) not found"
    return None


def _ip(*args: str) -> None:
    cp = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if cp.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {cp.stderr.strip()}")


@dataclass
class TwoNamespaces:
    a: str
    b: str
    addr_a: str
    addr_b: str
    extra_a: list[str]

    def exec_a(self, argv: list) -> list[str]:
        return ["ip", "netns", "exec", self.a, *map(str, argv)]

    def exec_b(self, argv: list) -> list[str]:
        return ["ip", "netns", "exec", self.b, *map(str, argv)]

    def pids_b(self) -> set[int]:
        """Processes living in namespace B."""
        cp = subprocess.run(["ip", "netns", "pids", self.b], capture_output=True, text=True,
                            timeout=30)
        return {int(x) for x in cp.stdout.split()}


@contextmanager
def two_namespaces() -> Iterator[TwoNamespaces]:
    n = next(_seq)
    tag = f"{os.getpid() % 100000}{n}"
    x = (os.getpid() + n * 37) % 250 + 1
    a, b = f"lcrmigA{tag}", f"lcrmigB{tag}"
    va, vb = f"lma{tag}"[:15], f"lmb{tag}"[:15]
    net = TwoNamespaces(a, b, f"10.77.{x}.1", f"10.77.{x}.2",
                        [f"10.77.{x}.{i}" for i in range(11, 19)])
    made: list[str] = []
    try:
        for ns in (a, b):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        try:
            _ip("link", "set", va, "netns", a)
            _ip("link", "set", vb, "netns", b)
        except RuntimeError:
            subprocess.run(["ip", "link", "del", va], capture_output=True)
            raise
        for ns, dev, addr in ((a, va, net.addr_a), (b, vb, net.addr_b)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        for addr in net.extra_a:
            _ip("-n", a, "addr", "add", f"{addr}/24", "dev", va)
        yield net
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
