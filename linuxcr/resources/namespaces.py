"""Namespaces of a tree's own (`lcr run --ipc --uts --net --mount`): which
ones, what they hold that lcr gives back (the hostname), and running a
function inside a process's namespaces (resources/sysvipc.py reads and makes
its objects so).

Made again on restart: the blank's namespaces are unshared with these kinds
(engine/spawn.py), then ``restore`` sets what they hold before any task runs.
"""
from __future__ import annotations

import os
import pickle
import socket
from typing import Any, Callable

from linuxcr.errors import RestoreError
from linuxcr.image.schema import FileDesc, Namespaces
from linuxcr.procfs.mounts import Mount, read_mountinfo
from linuxcr.sys import ipc

KINDS = ("ipc", "uts", "net", "mnt")
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWNET = 0x20000, 0x4000000, 0x8000000, 0x40000000
FLAGS = {"ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS, "net": CLONE_NEWNET, "mnt": CLONE_NEWNS}


def _ino(pid: int | str, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def own(pid: int) -> list[str]:
    """The kinds of namespace ``pid`` does not share with lcr."""
    return [k for k in KINDS if _ino(pid, k) != _ino("self", k)]


def check(pid: int, root: int, root_is_init: bool) -> list[str]:
    """A process whose namespaces lcr cannot make again: one of the tree
    (not its root) in other namespaces than the root's, or a root with
    namespaces of its own that is not the init of a tree `lcr run` made."""
    if pid != root:
        diff = [k for k in KINDS if _ino(pid, k) != _ino(root, k)]
        return [f"it is in {'/'.join(diff)} namespaces other than its tree root's (pid {root}): "
                "not supported"] if diff else []
    mine = own(pid)
    if mine and not root_is_init:
        return [f"it is in {'/'.join(mine)} namespaces of its own, made outside `lcr run`: "
                "start it with `lcr run --" + " --".join("mount" if k == "mnt" else k for k in mine)
                + "` to checkpoint it"]
    if "mnt" in mine:
        made = _mounts_made(pid)
        if made:
            return [f"it mounted {made[0].fstype} on {made[0].point} in its mount namespace "
                    f"({len(made)} mount(s) lcr does not see): mounts made inside are not "
                    "restored yet"]
    return []


def _mounts_made(pid: int) -> list[Mount]:
    """Mounts the tree sees that lcr does not (it made them, since its mount
    namespace began as a copy of lcr's)."""
    ours = {(m.point, m.root, m.fstype, m.source) for m in read_mountinfo("self")}
    return [m for m in read_mountinfo(pid) if (m.point, m.root, m.fstype, m.source) not in ours]


# Sockets lcr makes itself before the tasks exist, in its own network
# namespace: wrong for a tree with one of its own.
NET_KINDS = ("tcp", "udp", "netlink", "unix_bound")


def check_files(root: int, ns: Namespaces | None, descs: list[FileDesc]) -> list[str]:
    if ns is None or "net" not in ns.kinds:
        return []
    return [f"it holds a {d.kind} socket in a network namespace of its own (`lcr run --net`): "
            "lcr makes sockets again in its own network namespace, so these are not restored "
            "yet" for d in descs if d.kind in NET_KINDS][:1]


def dump(pid: int) -> Namespaces | None:
    kinds = own(pid)
    if not kinds:
        return None
    host = dom = ""
    if "uts" in kinds:
        host, dom = call_in(pid, ["uts"], _uts_names)
    return Namespaces(kinds=kinds, hostname=host, domainname=dom)


def _uts_names() -> tuple[str, str]:
    with open("/proc/sys/kernel/domainname") as f:
        return socket.gethostname(), f.read().strip()


def unshare_flags(ns: Namespaces | None) -> int:
    return sum(FLAGS[k] for k in ns.kinds) if ns is not None else 0


def restore(pid: int, ns: Namespaces | None) -> None:
    """What the fresh namespaces of the blank ``pid`` hold: the hostname."""
    if ns is None or "uts" not in ns.kinds:
        return
    try:
        call_in(pid, ["uts"], lambda: _set_uts(ns.hostname, ns.domainname),
                what="set the hostname of the restored tree")
    except OSError as e:
        raise RestoreError(f"cannot set the hostname {ns.hostname!r} of the restored tree: "
                           f"{e.strerror or e}") from None


def _set_uts(host: str, dom: str) -> None:
    socket.sethostname(host)
    ipc.setdomainname(dom.encode())


def call_in(pid: int, kinds: list[str], fn: Callable[[], Any], what: str = "",
            force: bool = False) -> Any:
    """``fn()`` run inside ``pid``'s namespaces of these kinds (and its user
    namespace first, when not root and it differs): in a child of lcr when
    they are not lcr's own (or ``force``: fn changes the process, e.g. its
    euid), else here.  Its result (pickled: lcr to lcr), or OSError /
    RestoreError as it raised."""
    kinds = [k for k in kinds if _ino(pid, k) != _ino("self", k)]
    if not kinds and not force:
        return fn()
    if os.geteuid() != 0 and _ino(pid, "user") != _ino("self", "user"):
        kinds = ["user"] + kinds
    fds = [os.open(f"/proc/{pid}/ns/{k}", os.O_RDONLY | os.O_CLOEXEC) for k in kinds]
    r, w = os.pipe()
    try:
        child = os.fork()
        if child == 0:   # single-threaded: setns(user) is allowed here
            code = 0
            try:
                os.close(r)
                for fd in fds:
                    ipc.setns(fd)
                out = pickle.dumps(("ok", fn()))
            except RestoreError as e:
                out, code = pickle.dumps(("lcr", e.args[0] if e.args else str(e),
                                          getattr(e, "hint", None))), 1
            except BaseException as e:  # noqa: BLE001 - sent to lcr, which raises it
                out, code = pickle.dumps(("err", getattr(e, "errno", None) or 0, str(e))), 1
            try:
                with os.fdopen(w, "wb") as f:
                    f.write(out)
            finally:
                os._exit(code)
        os.close(w)
        w = -1
        with os.fdopen(r, "rb") as f:
            r = -1
            data = f.read()
        os.waitpid(child, 0)
    finally:
        for fd in fds + [x for x in (r, w) if x >= 0]:
            os.close(fd)
    if not data:
        raise RestoreError(f"cannot {what or 'work'} inside the namespaces of pid {pid}: "
                           "the helper died")
    got = pickle.loads(data)
    if got[0] == "ok":
        return got[1]
    if got[0] == "lcr":
        raise RestoreError(got[1], got[2])
    if got[1]:
        raise OSError(got[1], got[2])
    raise RestoreError(f"cannot {what or 'work'} inside the namespaces of pid {pid}: {got[2]}")
