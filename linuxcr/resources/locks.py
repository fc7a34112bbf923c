"""File locks: flock(2) locks, POSIX record locks (fcntl F_SETLK) and open
file description locks (F_OFD_SETLK).

Dump: the ``lock:`` lines of /proc/PID/fdinfo/N say which fd (so which open
file description) holds which lock: an fdinfo file lists the locks set
through its open file that belong to this process (POSIX) or to this open
file description (flock, OFD).  A lock is saved once per fd it shows on; a
POSIX lock (owned by the process, not by an fd) once per process.
Restore: once the task's fds are in place, the task itself takes each lock
again with an injected flock(LOCK_NB) / fcntl(F_SETLK) / fcntl(F_OFD_SETLK),
so the lock belongs to the restored process (pid in /proc/locks, l_pid of
F_GETLK) or to its open file description.  flock and OFD locks belong to the
description, which several fds and processes of the tree may share: one that
shows already on the description (fdinfo) is not taken again.  A lock that
someone else holds now fails the restore, naming the file and the holder.
Leases (F_SETLEASE) belong to the open file description and are saved with
its owner and signal (resources/fdkinds/fown.py).  Refused: delegations and
mandatory locks (gone since Linux 5.15).
"""
from __future__ import annotations

import errno
import os
import struct

from linuxcr.errors import ImageError, NotCheckpointable, RestoreError
from linuxcr.image.schema import FileLock, OpenFile
from linuxcr.procfs import list_fds, read_fd_link, read_fdinfo
from linuxcr.procfs.locks import LockEntry, fdinfo_locks, read_locks
from linuxcr.remote.task import Arena, Tracee

FLOCK, POSIX, OFD = "flock", "posix", "ofd"
_KINDS = {"FLOCK": FLOCK, "POSIX": POSIX, "OFDLCK": OFD}
_PROC_KIND = {v: k for k, v in _KINDS.items()}
F_SETLK, F_OFD_SETLK = 6, 37
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN = 1, 2, 4, 8
_FLOCK = struct.Struct("<hhxxxxqqi4x")   # struct flock: type, whence, start, len, pid
_WHAT = {FLOCK: "flock() lock", POSIX: "POSIX record lock (fcntl F_SETLK)",
         OFD: "open file description lock (fcntl F_OFD_SETLK)"}


def _refusal(e: LockEntry) -> str | None:
    if e.kind == "DELEG":
        return ("holds a file delegation (NFS server): delegations are not saved; "
                "release it before checkpointing")
    if e.kind == "LEASE":
        return None          # saved with the open file (resources/fdkinds/fown.py)
    if e.mode == "MANDATORY":
        return "holds a mandatory lock: mandatory locking is not supported"
    if e.kind not in _KINDS or e.type not in ("READ", "WRITE"):
        return f"holds a file lock lcr does not know ({e.kind} {e.mode} {e.type})"
    return None


# Reading /proc/locks costs an RCU grace period (the kernel takes file_rwsem
# for writing: 5-20 ms on an idle machine, more under load), reading one
# fdinfo some microseconds: below this many fds the fdinfo files are read
# straight away.
FDINFO_FIRST = 256


def check(pid: int) -> list[str]:
    """Reasons the process's locks cannot be saved (leases, unknown kinds)."""
    fds = list_fds(pid)
    if len(fds) > FDINFO_FIRST and not any(_refusal(e) for e in read_locks() if not e.blocked):
        return []         # nothing of the kind anywhere: spare reading every fdinfo
    reasons = []
    for fd in fds:
        try:
            entries = fdinfo_locks(read_fdinfo(pid, fd))
            why = [w for w in map(_refusal, entries) if w]
            if why:
                reasons.append(f"fd {fd}: {read_fd_link(pid, fd)}: {why[0]}")
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}"):
                raise
    return reasons


def dump(pid: int) -> list[FileLock]:
    """Every lock the (frozen) process holds, by the fd it holds it through."""
    out: list[FileLock] = []
    posix_seen: set[tuple] = set()
    for fd in list_fds(pid):
        for e in fdinfo_locks(read_fdinfo(pid, fd)):
            if e.blocked or e.kind == "LEASE":   # leases: resources/fdkinds/fown.py
                continue
            why = _refusal(e)
            if why:      # check() said so before the freeze; this appeared since
                raise NotCheckpointable(pid, [f"fd {fd}: {read_fd_link(pid, fd)}: {why}"])
            kind = _KINDS[e.kind]
            if kind == POSIX:   # the process's, whichever fd of the file shows it
                key = (e.dev, e.ino, e.type, e.start, e.end)
                if key in posix_seen:
                    continue
                posix_seen.add(key)
            out.append(FileLock(fd=fd, kind=kind, write=e.type == "WRITE",
                                start=e.start, length=e.length))
    return out


def restore(t: Tracee, arena: Arena, locks: list[FileLock], files: list[OpenFile]) -> None:
    """Take every saved lock again, inside the task, through its saved fd."""
    fds = {f.fd for f in files}
    for lk in locks:
        if lk.fd not in fds or lk.kind not in _WHAT:
            raise ImageError(f"image holds a {lk.kind} lock on fd {lk.fd}, which the task "
                             "does not have" if lk.fd not in fds else
                             f"image holds a file lock of unknown kind {lk.kind!r}")
        if _held(t.pid, lk):
            continue    # a description shared with a task restored before, or a duplicate
        try:
            if lk.kind == FLOCK:
                t.syscall("flock", lk.fd, (LOCK_EX if lk.write else LOCK_SH) | LOCK_NB)
            else:
                fl = _FLOCK.pack(F_WRLCK if lk.write else F_RDLCK, os.SEEK_SET, lk.start, lk.length, 0)
                t.syscall("fcntl", lk.fd, F_SETLK if lk.kind == POSIX else F_OFD_SETLK, arena.put(fl))
        except OSError as e:
            _failed(t.pid, lk, e)


# --- rollback: a live process's locks become the snapshot's -------------------------

def _key(lk: FileLock) -> tuple:
    return lk.fd, lk.kind, lk.write, lk.start, lk.length


def _unlock(t: Tracee, arena: Arena, lk: FileLock) -> None:
    if lk.kind == FLOCK:
        t.syscall("flock", lk.fd, LOCK_UN)
    else:
        fl = _FLOCK.pack(F_UNLCK, os.SEEK_SET, lk.start, lk.length, 0)
        t.syscall("fcntl", lk.fd, F_SETLK if lk.kind == POSIX else F_OFD_SETLK, arena.put(fl))


def roll_back(t: Tracee, arena: Arena, saved: list[FileLock], files: list[OpenFile]) -> list[str]:
    """Its fds as at the snapshot (finish step files): locks taken since are
    released, those held at the snapshot and released since taken again
    (``restore``, lock by lock).  Warnings for those that could not be."""
    want = {_key(lk) for lk in saved}
    warnings = []
    for lk in dump(t.pid):
        if _key(lk) not in want:
            arena.reset()
            try:
                _unlock(t, arena, lk)
            except OSError as e:
                warnings.append(f"pid {t.pid} fd {lk.fd}: its {_WHAT[lk.kind]} taken since the "
                                f"snapshot could not be released: {e.strerror}")
    for lk in saved:
        arena.reset()
        try:
            restore(t, arena, [lk], files)
        except (RestoreError, ImageError) as e:
            warnings.append(f"pid {t.pid}: {e.message}")
    return warnings


def taken_since(pid: int, saved: list[FileLock], fds: set[int]) -> list[str]:
    """Rollback, before any change: saved locks, through ``fds`` (those that
    reach the same file as at the snapshot), the process no longer holds and
    another owner holds now in a conflicting way: they cannot be taken back."""
    missing = [lk for lk in saved if lk.fd in fds and lk.kind in _WHAT and not _held(pid, lk)]
    if not missing:
        return []
    table = [e for e in read_locks() if not e.blocked and e.kind in _KINDS]
    out = []
    for lk in missing:
        try:
            st = os.stat(f"/proc/{pid}/fd/{lk.fd}")
            mine = {(e.kind, e.type, e.start, e.end) for e in fdinfo_locks(read_fdinfo(pid, lk.fd))}
        except OSError:
            continue
        end = None if lk.length == 0 else lk.start + lk.length - 1
        for e in table:
            if e.ino != st.st_ino or e.dev not in (None, (os.major(st.st_dev), os.minor(st.st_dev))):
                continue
            if (lk.kind == FLOCK) != (e.kind == "FLOCK") or not (lk.write or e.type == "WRITE"):
                continue
            if e.pid == pid or (e.kind, e.type, e.start, e.end) in mine:
                continue          # the process's own
            if lk.kind != FLOCK and not _overlap(lk.start, end, e.start, e.end):
                continue
            who = f"pid {e.pid}" if e.pid > 0 else "another open file description"
            out.append(f"fd {lk.fd}: the {'exclusive' if lk.write else 'shared'} {_WHAT[lk.kind]} "
                       f"on {read_fd_link(pid, lk.fd)} it held at the snapshot is held by {who} now")
            break
    return out


def _overlap(a0: int, a1: int | None, b0: int, b1: int | None) -> bool:
    return (a1 is None or b0 <= a1) and (b1 is None or a0 <= b1)


def _held(pid: int, lk: FileLock) -> bool:
    end = None if lk.length == 0 else lk.start + lk.length - 1
    want = (_PROC_KIND[lk.kind], "WRITE" if lk.write else "READ", lk.start, end)
    if lk.kind == FLOCK:
        want = (want[0], want[1], 0, None)
    return any((e.kind, e.type, e.start, e.end) == want and not e.blocked
               for e in fdinfo_locks(read_fdinfo(pid, lk.fd)))


def _failed(pid: int, lk: FileLock, e: OSError) -> None:
    path = read_fd_link(pid, lk.fd)
    what = f"{'exclusive' if lk.write else 'shared'} {_WHAT[lk.kind]}"
    if lk.kind != FLOCK:
        what += f" on bytes {lk.start}-{'EOF' if not lk.length else lk.start + lk.length - 1}"
    if e.errno in (errno.EAGAIN, errno.EACCES):
        raise RestoreError(f"cannot take the {what} on {path} again: {_holder(pid, lk.fd)}",
                           "stop the process holding it (see /proc/locks), then restart") from None
    raise RestoreError(f"cannot take the {what} on {path} again: {e.strerror}") from None


def _holder(pid: int, fd: int) -> str:
    """Who holds a lock on the file now, from /proc/locks, if it tells."""
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
        entries = [e for e in read_locks() if e.ino == st.st_ino and not e.blocked]
    except OSError:
        entries = []
    dev = (os.major(st.st_dev), os.minor(st.st_dev)) if entries else None
    entries = [e for e in entries if e.dev == dev] or entries   # st_dev may differ (btrfs)
    pids = sorted({e.pid for e in entries if e.pid > 0 and e.pid != pid})
    if pids:
        return f"another process holds a lock on it now (pid {', '.join(map(str, pids))})"
    if any(e.pid == -1 for e in entries):
        return "another open file description holds a lock on it now (an OFD lock)"
    return "another process holds a conflicting lock on it now"
