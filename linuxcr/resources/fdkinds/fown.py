"""The owner, signal and lease of an open file description, whatever its
kind: F_SETOWN / F_SETOWN_EX (who gets SIGIO/SIGURG), F_SETSIG (which
signal, with siginfo), the O_ASYNC flag (files.py keeps it in the flags)
and a file lease (F_SETLEASE F_RDLCK/F_WRLCK).  Not a kind of its own:
files.py calls dump()/reason() for every description and restore() once
the task's fds are in place.

Dump: lcr's copy of the file (pidfd_getfd: the same description) answers
F_GETOWN_EX, F_GETSIG and F_GETLEASE without changing anything.  The owner
is kept as the holder sees it (its pid namespace), plus lcr's view for the
check that it is a process of the saved tree (files.Table.check_refs).
Refused: an owner that is another thread than the holder's main thread
(threads are made after the fds), a process group other than the holder's,
an owner outside the holder's session.
Restore, inside the task: F_SETOWN_EX, F_SETSIG, F_SETFL |= O_ASYNC (which
registers the file for SIGIO), F_SETLEASE -- after the files are open and
the other tasks exist; an owner that is not a restored process (--any-pid
gave it another pid) fails the restart rather than signal a stranger.
"""
from __future__ import annotations

import fcntl
import os
import struct

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import Fown
from linuxcr.procfs import read_status
from linuxcr.resources.fdkinds.pidfd import restored
from linuxcr.sys.syscalls import pidfd_getfd, pidfd_open

F_SETOWN_EX, F_GETOWN_EX, F_SETSIG, F_GETSIG = 15, 16, 10, 11
F_SETLEASE, F_GETLEASE, F_GETFL, F_SETFL = 1024, 1025, 3, 4
F_OWNER_TID, F_OWNER_PID, F_OWNER_PGRP = 0, 1, 2
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
FASYNC = 0o20000
_OWNER = struct.Struct("<ii")
_LEASES = {F_RDLCK: "read lease", F_WRLCK: "write lease"}


def _read(pid: int, fd: int) -> tuple[int, int, int, int]:
    """(owner type, owner pid as lcr sees it, signal, lease type)."""
    pfd = pidfd_open(pid)
    try:
        copy = pidfd_getfd(pfd, fd)
    finally:
        os.close(pfd)
    try:
        try:
            typ, who = _OWNER.unpack(fcntl.fcntl(copy, F_GETOWN_EX, bytes(_OWNER.size)))
            sig = fcntl.fcntl(copy, F_GETSIG)
        except OSError:          # an O_PATH fd (EBADF): it has no owner
            return F_OWNER_PID, 0, 0, F_UNLCK
        try:
            lease = fcntl.fcntl(copy, F_GETLEASE)
        except OSError:
            lease = F_UNLCK
    finally:
        os.close(copy)
    return typ, who, sig, lease


def _depth(pid: int) -> int:
    return len(read_status(pid).ns_pid or (0,)) - 1


def _seen(holder: int, typ: int, who: int) -> int:
    """The owner as the holder names it; 0: it cannot."""
    depth = _depth(holder)
    if typ == F_OWNER_PGRP:
        ns = read_status(holder).ns_pgid
        return ns[depth] if ns and ns[0] == who and depth < len(ns) else 0
    ns = read_status(who).ns_pid or (who,)
    return ns[depth] if depth < len(ns) else 0


def reason(pid: int, fd: int) -> str | None:
    """Why the owner or lease of ``fd`` cannot be saved (None: it can)."""
    try:
        typ, who, _sig, _lease = _read(pid, fd)
    except OSError:
        return None          # gone meanwhile, or a file without owner state: nothing to say
    if who <= 0:
        return None
    what = {F_OWNER_TID: "thread", F_OWNER_PID: "process", F_OWNER_PGRP: "process group"}.get(typ)
    if what is None:
        return f"its owner (F_SETOWN_EX) is of unknown type {typ}: not supported; close it first"
    try:
        if typ == F_OWNER_TID and who != pid:
            if read_status(who).tgid == pid:
                return (f"its owner (F_SETOWN_EX) is thread {who}, not the main thread: not "
                        "supported; make the process (F_SETOWN) the owner, or close it first")
        elif typ == F_OWNER_PGRP and _seen(pid, typ, who) == 0:
            return (f"its owner (F_SETOWN) is process group {who}, not the holder's own group: "
                    "not supported; close it first")
        if typ != F_OWNER_PGRP and (_seen(pid, typ, who) == 0 or os.getsid(who) != os.getsid(pid)):
            return (f"its owner (F_SETOWN) is pid {who}, which is not part of this process tree: "
                    "checkpoint a common ancestor, or close it first")
    except (FileNotFoundError, ProcessLookupError):
        return None          # the owner exited: SIGIO goes nowhere, nothing to restore
    return None


def dump(pid: int, fd: int) -> Fown | None:
    """The owner, signal and lease of ``fd`` of ``pid``; None if none is set."""
    typ, who, sig, lease = _read(pid, fd)
    seen = 0
    if who > 0:
        try:
            seen = _seen(pid, typ, who)
        except (FileNotFoundError, ProcessLookupError):
            who = 0          # the owner exited meanwhile
    if who <= 0 and sig == 0 and lease == F_UNLCK:
        return None
    host = who if who > 0 and typ != F_OWNER_PGRP and who != pid else -1
    return Fown(type=typ, pid=seen, host_pid=host, signum=sig, lease=lease)


def restore(t, arena, fd: int, flags: int, fo: Fown | None) -> None:
    """Inside the task, once its fds are in place and every task exists."""
    if fo is not None and fo.pid > 0:
        try:
            t.syscall("fcntl", fd, F_SETOWN_EX, arena.put(_OWNER.pack(fo.type, fo.pid)))
        except OSError as e:
            raise RestoreError(f"fd {fd}: cannot make pid {fo.pid} its owner (F_SETOWN) again: "
                               f"{e.strerror}", "was it restarted with --any-pid?") from None
        _check_owner(t, fd, fo)
    if fo is not None and fo.signum:
        t.syscall("fcntl", fd, F_SETSIG, fo.signum)
    if flags & FASYNC:
        now = t.syscall("fcntl", fd, F_GETFL)
        t.syscall("fcntl", fd, F_SETFL, now | FASYNC)
    if fo is not None and fo.lease != F_UNLCK:
        try:
            t.syscall("fcntl", fd, F_SETLEASE, fo.lease)
        except OSError as e:
            raise RestoreError(f"fd {fd}: cannot take its {_LEASES.get(fo.lease, 'lease')} "
                               f"(F_SETLEASE) again: {e.strerror}",
                               "another process has the file open now") from None


def _check_owner(t, fd: int, fo: Fown) -> None:
    """The pid the owner has now names a restored process (not a stranger
    who took the pid: --any-pid)."""
    try:
        pfd = t.syscall("pidfd_open", fo.pid, 0)
    except OSError:
        if fo.type == F_OWNER_PGRP:
            return           # a group whose leader has gone: no process has that pid
        raise RestoreError(f"fd {fd}: its owner, pid {fo.pid}, is not there",
                           "restart without --any-pid") from None
    try:
        if not restored(t.pid, pfd):
            raise RestoreError(f"fd {fd}: pid {fo.pid}, its owner (F_SETOWN), is not a restored "
                               "process (the tasks did not get their pids back)",
                               "restart without --any-pid")
    finally:
        t.syscall("close", pfd)
