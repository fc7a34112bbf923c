"""System V IPC: shared memory segments, semaphore sets, message queues.

Dump (tree frozen): in a tree with an ipc namespace of its own (`lcr run
--ipc`) every object of that namespace; in lcr's ipc namespace the objects
the tree uses: segments it has attached (their areas show as /SYSV<key> in
maps, inode = shmid), created or last attached; semaphore sets one of its
processes last operated on (GETPID); queues one of its processes last sent
to or received from.  Content is read without changing anything: segments
through a read-only attach of lcr's, semaphores with GETALL, queued
messages with msgrcv(MSG_COPY).  All of it runs inside the tree's ipc
namespace (namespaces.call_in).

Restart: every object is made again before the tasks exist, inside the
blank's ipc namespace, with its id (the namespace's shm/sem/msg_next_id
sysctls), key, creator, owner and mode, then filled.  Each saved area of a
segment is attached again at its address by memory.map_areas (``attach``);
a segment the tree had marked for removal (IPC_RMID) is removed again once
every task holds its attach.

Snapshots (engine/snapshots.py) take the same record while the tree is
frozen; rollback makes the ones removed since again (``make_again``)
and puts the content back (``put_back``).
Migration sends a full final image for a tree that uses any.

Not given back: the last-operation pids and times (sempid, lspid/lrpid,
otime...); the kernel lets nobody set them.  SEM_UNDO adjustments: the
kernel shows them nowhere, so a process holding an undo list is refused
(``check``).  A semaphore set of another user that lcr may not read is
skipped, unless the tree may use it (then refused by name).
"""
from __future__ import annotations

import atexit
import os
import subprocess
from typing import Iterable

from linuxcr.errors import NotCheckpointable, RestoreError
from linuxcr.image.schema import (IpcOwner, ShmExtent, SysvIpc, SysvMessage, SysvMsg, SysvSem,
                                  SysvShm, Task, Vma)
from linuxcr.procfs import read_maps, read_status
from linuxcr.procfs.sysvipc import read_sysvipc
from linuxcr.remote.task import Tracee
from linuxcr.resources import namespaces
from linuxcr.sys import ipc
from linuxcr.sys.syscalls import kcmp_same

# memory.classify marks every /SYSV area with this reason: checkpoint
# (engine/dump.py), snapshots and migration save the segments (in the IPC
# record) and drop it; whoever does not, refuses.
CHECKPOINT_ONLY = "is saved with the System V IPC objects, not as memory"
MAX_CONTENT = 48 << 20        # bytes of segments and messages in all (they go in the TREE record)
CHUNK = 64 << 10              # zero runs are left out at this grain
PAGE = 4096
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
PROT_EXEC = 4
NEXT_ID = "/proc/sys/kernel/{}_next_id"
KCMP_SYSVSEM = 6


def check(pid: int) -> list[str]:
    """A process that may hold semaphore undo adjustments (a semop with
    SEM_UNDO): the kernel shows them nowhere, so they cannot come back.
    What can be seen: whether it has an undo list at all (kcmp
    KCMP_SYSVSEM against a plain process that has none: not lcr itself, which
    gets one as soon as it has threads) -- a process gets one with its
    first SEM_UNDO, and also when it makes a thread (glibc shares the list
    with CLONE_SYSVSEM) -- and whether a semaphore set it may change exists
    in its ipc namespace (adjustments go with their set).  Both: refused."""
    try:
        if kcmp_same(KCMP_SYSVSEM, pid, _no_undo_list()):
            return []
    except OSError:
        return []      # kcmp refused (no CONFIG_KCMP), no reference process: nothing known
    try:
        status = read_status(pid)
        euid, egid = status.uid[1], status.gid[1]
        sets = namespaces.call_in(pid, ["ipc"], lambda: read_sysvipc("sem"))
    except (OSError, RestoreError):
        return []
    usable = [r["semid"] for r in sets if euid == 0 or _may_alter(r, euid, egid)]
    if not usable:
        return []
    return [f"it may hold System V semaphore undo adjustments (it has an undo list: a semop "
            f"with SEM_UNDO, or threads; semaphore set {usable[0]} is there): the kernel does "
            "not show them, so lcr cannot give them back"]


_reference: list[subprocess.Popen] = []


def _no_undo_list() -> int:
    """The pid of a process with no undo list to compare with: a `cat` lcr
    starts once (fork does not pass undo lists on; lcr's own list, shared
    by its threads, would make every process look different), stopped when
    lcr exits."""
    if _reference and _reference[0].poll() is None:
        return _reference[0].pid
    _reference[:] = [subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, close_fds=True)]
    return _reference[0].pid


def _stop_reference() -> None:
    for p in _reference:
        p.kill()
        p.wait()
    _reference.clear()


atexit.register(_stop_reference)


def _may_alter(row: dict[str, int], uid: int, gid: int, bits: int = 0o2) -> bool:
    """bits: 0o2 alter, 0o4 read, 0o6 either."""
    mode = row["perms"]
    if uid in (row["uid"], row["cuid"]):
        return bool(mode & bits << 6)
    if gid in (row["gid"], row["cgid"]):
        return bool(mode & bits << 3)
    return bool(mode & bits)


def unsupported(where: str, shmid: int) -> str:
    return f"{where}: System V shared memory (shmid {shmid}) {CHECKPOINT_ONLY}"


# --- snapshots: kept at snapshot time, put back by rollback ----------------------

def removed_since(pid: int, saved: SysvIpc | None) -> SysvIpc | None:
    """The snapshot's objects (by id) no longer in the tree's ipc namespace,
    or None."""
    if saved is None or not (saved.sem or saved.msg or saved.shm):
        return None

    def look() -> tuple[set[int], set[int], set[int]]:
        return tuple({r[col] for r in read_sysvipc(kind)}
                     for kind, col in (("shm", "shmid"), ("sem", "semid"), ("msg", "msqid")))
    shm, sem, msg = namespaces.call_in(pid, ["ipc"], look, what="read the System V IPC objects")
    gone = SysvIpc(shm=[o for o in saved.shm if o.perm.id not in shm],
                   sem=[o for o in saved.sem if o.perm.id not in sem],
                   msg=[o for o in saved.msg if o.perm.id not in msg])
    return gone if gone.shm or gone.sem or gone.msg else None


def make_again(pid: int, saved: SysvIpc | None) -> list[str]:
    """The snapshot's objects removed since made again in the tree's ipc
    namespace with their id, key, owner and content (as restart does);
    what was made ("sem 5", ...).  RestoreError naming the object when one
    cannot be (its id or key taken, or not root)."""
    gone = removed_since(pid, saved)
    if gone is None:
        return []
    return [f"{kind} {oid}" for kind, oid in restore(pid, gone)]


def created_since(pid: int, saved: SysvIpc | None, own_ns: bool, pids: list[int]) -> list[str]:
    """Objects not in the snapshot: in an ipc namespace of the tree's own
    (`lcr run --ipc`) all are its, and are removed; in lcr's, those the tree
    clearly made or used (a segment it created, a queue it last used) are
    left, with a warning each (they may be another program's too)."""
    kept = {"shm": {o.perm.id for o in saved.shm} if saved else set(),
            "sem": {o.perm.id for o in saved.sem} if saved else set(),
            "msg": {o.perm.id for o in saved.msg} if saved else set()}
    mine = set(pids)

    def work() -> list[str]:
        out = []
        for kind, col, what, pidcols in (("shm", "shmid", "shared memory segment", ("cpid",)),
                                         ("sem", "semid", "semaphore set", ()),
                                         ("msg", "msqid", "message queue", ("lspid", "lrpid"))):
            for r in read_sysvipc(kind):
                if r[col] in kept[kind]:
                    continue
                if own_ns:
                    _rm(kind, r[col])
                elif any(r[c] in mine for c in pidcols):
                    out.append(f"System V {what} {r[col]} (key {r['key']:#x}) was made or used "
                               "since the snapshot: left as it is (lcr's ipc namespace)")
        return out
    return namespaces.call_in(pid, ["ipc"], work, what="look at the System V IPC objects")


def put_back(pid: int, saved: SysvIpc | None) -> None:
    """Semaphore values, queued messages and segment contents as the
    snapshot kept them (tree frozen; objects made since are left alone).
    SETALL also clears every process's undo adjustments of the set: a tree
    holding some was refused at snapshot time (``check``)."""
    if saved is None:
        return

    def work() -> None:
        for s in saved.sem:
            ipc.sem_setall(s.perm.id, s.values)
        for q in saved.msg:
            ipc.msg_drain(q.perm.id)
            for m in q.messages:
                ipc.msg_send(q.perm.id, m.mtype, m.text)
        for g in saved.shm:
            ipc.shm_write(g.perm.id, [(0, bytes(g.size))] + [(e.offset, e.data) for e in g.extents])
    namespaces.call_in(pid, ["ipc"], work, what="put the System V IPC objects back")


# --- dump -------------------------------------------------------------------------

def dump(root: int, tasks: list[Task], own_ns: bool) -> SysvIpc | None:
    """The tree's objects (see the module doc), or None if it has none."""
    attached = sorted({v.shm for t in tasks for v in t.vmas if v.kind == "sysv"})
    pids = sorted(t.pid for t in tasks)
    creds = _creds(pids)
    got = namespaces.call_in(root, ["ipc"], lambda: _collect(own_ns, attached, pids, creds),
                             what="read the System V IPC objects")
    if isinstance(got, list):
        raise NotCheckpointable(root, got)
    if not (got.shm or got.sem or got.msg):
        return None
    return got


def _creds(pids: list[int]) -> set[tuple[int, int]]:
    """The (euid, egid) pairs of the tree's processes."""
    out = set()
    for pid in pids:
        try:
            st = read_status(pid)
        except OSError:
            continue
        out.add((st.uid[1], st.gid[1]))
    return out


def _unreadable_sem(row: dict[str, int], everything: bool,
                    creds: set[tuple[int, int]]) -> str | None:
    """A semaphore set lcr may not read (another user's): a reason when the
    tree may use it (all of its ipc namespace is the tree's, or one of its
    processes may read or alter it), else None (skipped: not the tree's)."""
    if not (everything or any(u == 0 or _may_alter(row, u, g, 0o6) for u, g in creds)):
        return None
    return (f"System V semaphore set {row['semid']} (owner uid {row['uid']}, mode "
            f"{row['perms'] & 0o777:o}) may be used by it but lcr may not read it: "
            "checkpoint as that user or as root")


def _collect(everything: bool, attached: list[int], pids: list[int],
             creds: set[tuple[int, int]] = frozenset()) -> SysvIpc | list[str]:
    mine = set(pids)
    total = 0
    shm, sem, msg = [], [], []
    for row in read_sysvipc("shm"):
        sid = row["shmid"]
        if not (everything or sid in attached or row["cpid"] in mine or row["lpid"] in mine):
            continue
        ds = ipc.shm_stat(sid)
        if ds.perm.mode & ipc.SHM_DEST and sid not in attached:
            continue      # removed, held only by processes outside the tree
        if total + ds.segsz > 4 * MAX_CONTENT:   # not read at all: zero runs would not save it
            return [f"System V shared memory segment {sid} of {ds.segsz} bytes is too big "
                    f"(lcr saves at most {MAX_CONTENT >> 20} MiB of segments)"]
        extents = _extents(ipc.shm_read(sid, ds.segsz))
        total += sum(len(e.data) for e in extents)
        shm.append(SysvShm(perm=_owner(sid, ds.perm), size=ds.segsz, extents=extents))
    for row in read_sysvipc("sem"):
        sid, n = row["semid"], row["nsems"]
        try:
            if not everything and not mine & set(ipc.sem_pids(sid, n)):
                continue
            ds = ipc.sem_stat(sid)
            values = ipc.sem_values(sid, n)
        except PermissionError:
            why = _unreadable_sem(row, everything, creds)
            if why:
                return [why]
            continue
        sem.append(SysvSem(perm=_owner(sid, ds.perm), values=values))
    for row in read_sysvipc("msg"):
        qid = row["msqid"]
        if not (everything or row["lspid"] in mine or row["lrpid"] in mine):
            continue
        ds = ipc.msg_stat(qid)
        queued = [SysvMessage(mtype=t, text=b) for t, b in ipc.msg_peek(qid, ds.qnum)]
        total += sum(len(m.text) + 16 for m in queued)
        msg.append(SysvMsg(perm=_owner(qid, ds.perm), qbytes=ds.qbytes, messages=queued))
    if total > MAX_CONTENT:
        return [f"its System V shared memory segments and queued messages hold {total} bytes, "
                f"more than the {MAX_CONTENT >> 20} MiB lcr saves"]
    missing = set(attached) - {s.perm.id for s in shm}
    if missing:
        return [f"System V shared memory segment {sorted(missing)[0]} it has attached is gone"]
    return SysvIpc(shm=shm, sem=sem, msg=msg)


def _owner(oid: int, p: ipc.IpcPerm) -> IpcOwner:
    return IpcOwner(id=oid, key=p.key, mode=p.mode & 0o7777, uid=p.uid, gid=p.gid,
                    cuid=p.cuid, cgid=p.cgid)


def _extents(data: bytes) -> list[ShmExtent]:
    """The content without its runs of zeros (CHUNK grain)."""
    out: list[ShmExtent] = []
    zero = bytes(CHUNK)
    start = None
    for off in range(0, len(data), CHUNK):
        piece = data[off:off + CHUNK]
        if piece == zero[:len(piece)]:
            if start is not None:
                out.append(ShmExtent(offset=start, data=data[start:off]))
                start = None
        elif start is None:
            start = off
    if start is not None:
        out.append(ShmExtent(offset=start, data=data[start:]))
    return out


# --- restart: the objects ----------------------------------------------------------

def restore(blank: int, saved: SysvIpc | None) -> list[tuple[str, int]]:
    """Make every saved object again inside the ipc namespace of the blank
    task ``blank``; returns what was made (for ``remove`` if the restart fails)."""
    if saved is None:
        return []
    euid = os.geteuid()
    for o in _all(saved):
        if euid != 0 and (o.cuid, o.cgid) != (euid, os.getegid()):
            raise RestoreError(f"System V IPC object {o.id} was created by uid {o.cuid} gid {o.cgid}: "
                               "only root can make it again with that creator", "restart as root")
    try:
        return namespaces.call_in(blank, ["ipc"], lambda: _make(saved), what="make the System V "
                                  "IPC objects", force=True)
    except OSError as e:
        raise RestoreError(f"cannot make the System V IPC objects of the image: "
                           f"{e.strerror or e}") from None


def _all(saved: SysvIpc) -> Iterable[IpcOwner]:
    return [s.perm for s in saved.shm] + [s.perm for s in saved.sem] + [m.perm for m in saved.msg]


def _taken(kind: str, oid: int, key: int) -> RestoreError:
    return RestoreError(f"System V {kind} id {oid} (key {key}) is taken in this ipc namespace",
                        "a tree started with `lcr run --ipc` has an ipc namespace of its own, "
                        "made again on restart; or remove the object (ipcrm)")


def _create(kind: str, p: IpcOwner, make) -> int:
    """Make one object with the saved id, as its creator."""
    with open(NEXT_ID.format(kind), "w") as f:
        f.write(str(p.id))
    switch = os.geteuid() == 0 and (p.cuid, p.cgid) != (0, 0)
    if switch:
        os.setegid(p.cgid)
        os.seteuid(p.cuid)
    try:
        oid = make(ipc.IPC_CREAT | ipc.IPC_EXCL | (p.mode & 0o777) | 0o600)
    except OSError as e:
        if e.errno in (17, 28):   # EEXIST (the key), ENOSPC (the id)
            raise _taken(kind, p.id, p.key) from None
        raise
    finally:   # (a next_id left set by a failed call cannot be reset: only 0 and up are written)
        if switch:
            os.seteuid(0)
            os.setegid(0)
    if oid != p.id:
        _rm(kind, oid)
        raise _taken(kind, p.id, p.key)
    return oid


def _check_free(saved: SysvIpc) -> None:
    """Every saved id and key free in this namespace, before anything is made."""
    for kind, objs, col in (("shm", saved.shm, "shmid"), ("sem", saved.sem, "semid"),
                            ("msg", saved.msg, "msqid")):
        rows = read_sysvipc(kind)
        ids, keys = {r[col] for r in rows}, {r["key"] for r in rows} - {0}
        for o in objs:
            if o.perm.id in ids or o.perm.key in keys:
                raise _taken(kind, o.perm.id, o.perm.key)


def _make(saved: SysvIpc) -> list[tuple[str, int]]:
    _check_free(saved)
    made: list[tuple[str, int]] = []
    try:
        for s in saved.shm:
            p = s.perm
            made.append(("shm", _create("shm", p, lambda fl: ipc.shm_get(p.key, s.size, fl))))
            ipc.shm_write(p.id, [(e.offset, e.data) for e in s.extents])
            ipc.shm_set(p.id, p.uid, p.gid, p.mode & 0o777)
            if p.mode & ipc.SHM_LOCKED:
                ipc.shm_ctl(p.id, ipc.SHM_LOCK)
        for m in saved.sem:
            p = m.perm
            made.append(("sem", _create("sem", p, lambda fl: ipc.sem_get(p.key, len(m.values), fl))))
            ipc.sem_setall(p.id, m.values)
            ipc.sem_set(p.id, p.uid, p.gid, p.mode & 0o777)
        for q in saved.msg:
            p = q.perm
            made.append(("msg", _create("msg", p, lambda fl: ipc.msg_get(p.key, fl))))
            if ipc.msg_stat(p.id).qbytes != q.qbytes:
                ipc.msg_set(p.id, p.uid, p.gid, 0o600, q.qbytes)
            for x in q.messages:
                ipc.msg_send(p.id, x.mtype, x.text)
            ipc.msg_set(p.id, p.uid, p.gid, p.mode & 0o777, q.qbytes)
    except BaseException:
        for kind, oid in made:
            _rm(kind, oid)
        raise
    return made


def _rm(kind: str, oid: int) -> None:
    try:
        {"shm": lambda i: ipc.shm_ctl(i, ipc.IPC_RMID), "sem": ipc.sem_rm, "msg": ipc.msg_rm}[kind](oid)
    except OSError:
        pass


def remove(blank: int, made: list[tuple[str, int]]) -> None:
    """A failed restart: the objects it made in lcr's ipc namespace go
    (a namespace of the tree's own goes with its last task)."""
    if not made:
        return
    try:
        namespaces.call_in(blank, ["ipc"], lambda: [_rm(k, i) for k, i in made])
    except (OSError, RestoreError):
        if not os.path.exists(f"/proc/{blank}"):
            return
        raise


def finish(pid: int, saved: SysvIpc | None) -> None:
    """Once every task holds its attaches: the segments the tree had
    removed (IPC_RMID) are removed again."""
    gone = [s.perm.id for s in saved.shm if s.perm.mode & ipc.SHM_DEST] if saved else []
    if gone:
        namespaces.call_in(pid, ["ipc"], lambda: [_rm("shm", i) for i in gone])


# --- restart: the attaches (memory.map_areas) -------------------------------------------

def attach(t: Tracee, v: Vma, done: list[tuple[int, int]]) -> None:
    """Attach segment v.shm in the blank so that area v is where it was,
    with its protection.  ``done``: (base, shmid) of attaches made so far;
    an area that continues one of them (an attach split by mprotect) is
    already there."""
    flags = (0 if "mw" in v.vmflags else ipc.SHM_RDONLY) | (ipc.SHM_EXEC if "me" in v.vmflags else 0)
    base = v.start - v.offset
    if (base, v.shm) not in done:
        if v.offset == 0:
            t.syscall("shmat", v.shm, v.start, flags)
        else:   # its head was unmapped: attach anywhere, move this part in place
            tmp = t.syscall("shmat", v.shm, 0, flags)
            t.syscall("mremap", tmp + v.offset, v.end - v.start, v.end - v.start,
                      MREMAP_MAYMOVE | MREMAP_FIXED, v.start)
            base = tmp
        done.append((base, v.shm))
    t.syscall("mprotect", v.start, v.end - v.start, v.prot)


def trim(t: Tracee, vmas: list[Vma]) -> None:
    """Unmap what the attaches cover beyond the saved areas (the parts of a
    segment the tree had unmapped, and the rest of moved attaches)."""
    keep = [(v.start, v.end) for v in vmas if v.kind == "sysv"]
    for m in read_maps(t.pid):
        if not m.path.startswith("/SYSV"):
            continue
        at = m.start
        for s, e in sorted(keep):
            if e <= at or s >= m.end:
                continue
            if s > at:
                t.syscall("munmap", at, s - at)
            at = max(at, e)
        if at < m.end:
            t.syscall("munmap", at, m.end - at)
