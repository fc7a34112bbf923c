"""External connections: pipes and UNIX socket pairs whose other end is held
by a process outside the checkpointed tree (`prog | cat` with only prog
checkpointed).  A restored process could not reach that peer: its next
write would fail (EPIPE) or its next read see end-of-file, after lcr said
"restored".  So they are named (pid, fd, kind, who holds the other end) and
refused by default.

The way out, like CRIU's --inherit-fd:
- ``lcr checkpoint --external`` records each as a FileDesc of kind
  "external" (its flags, and a description in ``path``);
- ``lcr restart IMG --fd N=PATH|-|&M`` gives the restored process a new file
  for fd N: PATH opened with the saved access mode (O_CREAT, and O_APPEND
  when it is written to, so a log is not overwritten), ``-`` lcr's own
  stdout, ``&M`` a copy of fd M that lcr inherited.  An external fd not
  given is refused naming the option.

FIFOs are not external connections: the restored process opens the FIFO
again by its path and finds the same peer (resources/fdkinds/fifo.py).
Terminals are resources/fdkinds/pty.py (and --shell-job).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from linuxcr.errors import LcrError, RestoreError
from linuxcr.image.schema import FileDesc, Task
from linuxcr.procfs import fd_links, list_fds, read_fd_link, read_fdinfo
from linuxcr.resources import unix_sockets
from linuxcr.resources.fdkinds import pty
from linuxcr.sys import sockdiag

KIND = "external"
FD_OPTION = "--fd N=PATH|-|&M"
SNAPSHOT_COMM = "lcr-snapshot"     # engine/snapshots.py: never an outside peer


@dataclass(frozen=True)
class Options:
    record: bool = False                      # checkpoint --external
    fds: dict[int, str] = field(default_factory=dict)   # restart --fd N=SPEC


_OPTIONS: contextvars.ContextVar[Options] = contextvars.ContextVar("lcr_external", default=Options())


@contextlib.contextmanager
def options(*, record: bool = False, fds: dict[int, str] | None = None) -> Iterator[None]:
    tok = _OPTIONS.set(Options(record=record, fds=dict(fds or {})))
    try:
        yield
    finally:
        _OPTIONS.reset(tok)


def current() -> Options:
    return _OPTIONS.get()


@dataclass
class External:
    pid: int                 # holder inside the tree
    fd: int
    kind: str                # "pipe" | "UNIX socket"
    ino: int                 # the pipe's inode / our socket's inode
    end: str                 # "read end" | "write end" | ""
    holders: list[tuple[int, str, int]]   # outside: (pid, comm, fd)

    def describe(self) -> str:
        who = ", ".join(f"pid {p} ({c}) fd {f}" for p, c, f in self.holders[:4]) or "nobody"
        more = f" and {len(self.holders) - 4} more" if len(self.holders) > 4 else ""
        obj = f"pipe:[{self.ino}] ({self.end})" if self.kind == "pipe" else f"UNIX socket:[{self.ino}]"
        return f"{obj}, other end held outside the tree by {who}{more}"

    def reason(self) -> str:
        return (f"fd {self.fd}: external connection: {self.describe()}; checkpoint with "
                f"--external and restart with --fd {self.fd}=PATH|-|&M")


# --- finding them ------------------------------------------------------------

def find(pids: Iterable[int]) -> list[External]:
    """Every pipe and connected UNIX socket of the tree ``pids`` that a process
    outside the tree can reach."""
    inside = set(pids)
    pipes: dict[int, list[tuple[int, int]]] = {}      # ino -> [(pid, fd)] inside
    socks: dict[int, tuple[int, int]] = {}            # our socket ino -> (pid, fd)
    for pid in inside:
        for fd, link in _links(pid):
            if link.startswith("pipe:["):
                pipes.setdefault(int(link[6:-1]), []).append((pid, fd))
            elif link.startswith("socket:["):
                socks.setdefault(int(link[8:-1]), (pid, fd))
    peers: dict[int, int] = {}                        # peer ino outside -> our ino
    for ino in socks:
        peer = unix_sockets.peer_of(ino) if _is_unix(ino) else 0
        if peer and peer not in socks:
            peers[peer] = ino
        # a listener's connections not accepted yet: their clients are the
        # other ends, wherever they are held
        for client in _waiting_clients(ino):
            if client not in socks:
                peers[client] = ino
    if not pipes and not peers:
        return []
    outside = _holders(inside, {f"pipe:[{i}]" for i in pipes} | {f"socket:[{p}]" for p in peers})
    out = []
    for ino, held in sorted(pipes.items()):
        who = outside.get(f"pipe:[{ino}]")
        if who:
            for pid, fd in held:
                out.append(External(pid, fd, "pipe", ino, _end(pid, fd), who))
    for peer, ino in sorted(peers.items()):
        pid, fd = socks[ino]
        out.append(External(pid, fd, "UNIX socket", ino, "", outside.get(f"socket:[{peer}]", [])))
    return out


def _waiting_clients(ino: int) -> list[int]:
    """The client sockets of the connections waiting on ``ino`` if it is a
    listening UNIX socket with any ([] otherwise; 0 = a client that is gone)."""
    try:
        d = unix_sockets.unix_diag(ino)
        if d is None or d.state != unix_sockets.TCP_LISTEN or not d.rqueue:
            return []
        return [c for c in sockdiag.unix_icons(ino) if c]
    except OSError:
        return []


def _is_unix(ino: int) -> bool:
    try:
        return unix_sockets.unix_diag(ino) is not None
    except OSError:
        return False


def _links(pid: int) -> list[tuple[int, str]]:
    out = []
    try:
        fds = list_fds(pid)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return out
    for fd in fds:
        try:
            out.append((fd, read_fd_link(pid, fd)))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


def _end(pid: int, fd: int) -> str:
    try:
        return "read end" if read_fdinfo(pid, fd).flags & os.O_ACCMODE == os.O_RDONLY else "write end"
    except (FileNotFoundError, ProcessLookupError):
        return "?"


def _holders(inside: set[int], wanted: set[str]) -> dict[str, list[tuple[int, str, int]]]:
    """Who outside the tree holds each of ``wanted`` (fd links): one walk of /proc."""
    found: dict[str, list[tuple[int, str, int]]] = {}
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in inside or int(name) == me:
            continue
        pid = int(name)
        for f, link in fd_links(pid):
            if link in wanted:
                comm = _comm(pid)
                if comm == SNAPSHOT_COMM:    # a held copy-on-write snapshot of a tree process
                    break
                found.setdefault(link, []).append((pid, comm, f))
    return found


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def reasons(pids: Iterable[int], root: int) -> list[str]:
    """What `lcr check` and `lcr checkpoint` say (nothing with --external)."""
    pids = list(pids)
    terminals = pty.tree_reasons(pids, root)
    if current().record:
        return terminals
    return terminals + [e.reason() if e.pid == root else f"child pid {e.pid}: {e.reason()}"
                        for e in find(pids)]


# --- checkpoint --external ----------------------------------------------------------

def mark(table, pids: Iterable[int]) -> None:
    """Turn the descriptions of external connections in ``table`` (a
    files.Table, every task read) into kind "external": no bytes, no peer
    saved, only the flags and what it was."""
    pty.mark(table)                # a shell job's terminal (--shell-job)
    found = find(pids)
    if not found:
        return
    if not current().record:       # checked before the freeze; a new one since
        raise LcrError(found[0].reason())
    by_obj = {(("pipe:" if e.kind == "pipe" else "socket:") + f"[{e.ino}]"): e for e in found}
    for i, d in enumerate(table.descs):
        key = f"pipe:[{d.pipe}]" if d.kind == "pipe" else f"socket:[{d.sock}]" if d.kind == "unix" else None
        e = by_obj.get(key or "")
        if e is None:
            continue
        table.descs[i] = FileDesc(fid=d.fid, kind=KIND, flags=d.flags, path=e.describe()[:4000])
        if d.kind == "unix":
            table.unix.pop(d.sock, None)
            table.where.pop(d.sock, None)


# --- restart --fd N=... -----------------------------------------------------------------

def parse_fd_specs(specs: Iterable[str]) -> dict[int, str]:
    """["1=out.log", "2=-", "0=&5"] -> {1: "out.log", 2: "-", 0: "&5"}."""
    out: dict[int, str] = {}
    for s in specs:
        n, sep, what = s.partition("=")
        if not sep or not n.strip().isdigit() or not what:
            raise LcrError(f"--fd {s}: expected N=PATH, N=- or N=&M")
        out[int(n)] = what
    return out


def resolve(descs: list[FileDesc], tasks: list[Task]) -> dict[int, int]:
    """fid -> an fd of lcr's for every external description (the tasks
    inherit it); refuses one not given with --fd."""
    pty.release()                  # pairs a previous restart in this process made
    pty.check_restart(descs, tasks)
    given = current().fds
    ext = {d.fid: d for d in descs if d.kind == KIND}
    nums_ext = {f.fd for k in tasks for f in k.files if f.fid in ext}
    for n in sorted(set(given) - nums_ext):      # a mistake is said, never ignored
        raise RestoreError(f"--fd {n}: fd {n} of the image is not an external connection",
                           "lcr show IMAGE lists the open files")
    if not ext:
        return {}
    out: dict[int, int] = {}
    try:
        for fid, d in ext.items():
            nums = sorted({f.fd for k in tasks for f in k.files if f.fid == fid})
            pick = next((n for n in nums if n in given), None)
            if pick is None:
                who = next((k.vpid or k.pid for k in tasks for f in k.files if f.fid == fid), 0)
                n = nums[0] if nums else 0
                raise RestoreError(f"pid {who} fd {n} was an external connection ({d.path})",
                                   f"give it a new file with --fd {n}=PATH, --fd {n}=- "
                                   f"(lcr's stdout) or --fd {n}=&M (an fd lcr inherited)")
            out[fid] = _open_spec(pick, given[pick], d.flags)
    except BaseException:
        for fd in out.values():
            os.close(fd)
        raise
    return out


def _open_spec(n: int, spec: str, flags: int) -> int:
    acc = flags & os.O_ACCMODE
    if spec == "-":
        return os.dup(1)
    if spec.startswith("&"):
        try:
            return os.dup(int(spec[1:]))
        except ValueError:
            raise LcrError(f"--fd {n}={spec}: &M needs a number") from None
        except OSError as e:
            raise RestoreError(f"--fd {n}={spec}: lcr has no fd {spec[1:]} ({e.strerror})") from None
    extra = (os.O_CREAT | os.O_APPEND) if acc != os.O_RDONLY else 0
    try:
        fd = os.open(spec, acc | extra | (flags & os.O_NONBLOCK) | os.O_CLOEXEC | os.O_NOCTTY, 0o644)
    except OSError as e:
        raise RestoreError(f"--fd {n}={spec}: cannot open it: {e.strerror}") from None
    return fd
