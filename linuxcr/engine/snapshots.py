"""In-memory checkpoints ("crid" snapshots): take, write back, roll back, discard.

take: freeze the process, collect its Task record as a checkpoint would
(pipes' bytes are read without consuming them), copy the areas fork() does
not share copy-on-write (MAP_SHARED, MADV_DONTFORK `dc`, MADV_WIPEONFORK
`wf`), inject a fork (clone3, CLONE_PARENT, SIGCHLD) into the frozen
process and thaw it.  The fork -- the "snapshot child" -- is auto-attached
by TRACEFORK, stopped, and never resumed: it runs no instruction of the
application.  One injected close_range() leaves it holding no file (a
pipe's reader still sees EOF).  It carries PTRACE_O_EXITKILL: if its tracer
(the agent, or lcr for --low-downtime) dies, the kernel kills it.

writeback: a normal image from the Task record of the snapshot moment, the
pages read from the snapshot child, the non-COW areas from the copy.

rollback: the same live process returns to the snapshot.  Memory, fast
path: if the holder (the agent) keeps a write tracker for the process
(WriteTrackers, below) and /proc/PID/maps is the same as at the snapshot,
only the pages written since (and those dropped since, and untracked or
shared areas) are copied back from the snapshot child, and pages that
appeared since are dropped (injected MADV_DONTNEED).  Full path otherwise:
the address space is rebuilt by injected munmap/mmap (as restore does),
every page copied from the snapshot child.  Then, either way: registers,
FPU, signal mask and handlers of every thread; fd offsets, fds opened since
closed, regular files closed since reopened.

The tracer of a snapshot child is the thread that injected the fork: the
agent therefore does all of this itself, from one thread.
"""
from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field

import msgspec

from linuxcr import faults
from linuxcr.engine import dump
from linuxcr.errors import LcrError, NoSuchProcess, NotCheckpointable, RestoreError, RollbackRefused
from linuxcr.image import runs
from linuxcr.image.schema import Namespaces, ShmObject, Task, Tree, Vma
from linuxcr.image.stream import PAGE, ImageWriter
from linuxcr.procfs import list_fds, read_fdinfo, read_maps, read_smaps, read_stat, read_status
from linuxcr.remote import guardian
from linuxcr.remote.freezer import Frozen
from linuxcr.remote.task import Arena, Tracee
from linuxcr.resources import (areaflags, cpu, exe_identity, files, finish, locks, memory, namespaces,
                               pstree, security, snapshot_child, sysvipc)



class SnapTable(files.Table):
    """files.Table that records fds it cannot save instead of refusing: a
    snapshot is still good for rollback; writeback refuses with the reasons."""

    def __init__(self) -> None:
        super().__init__()
        self.blockers: list[str] = []
        # pid -> fd -> (st_dev, st_ino) at snapshot time
        self.keys: dict[int, dict[int, tuple[int, int]]] = {}

    def task_files(self, pid: int) -> list:
        from linuxcr.image.schema import OpenFile
        out = []
        keys = self.keys.setdefault(pid, {})
        for fd in list_fds(pid):
            try:
                v = files.describe(pid, fd)
            except FileNotFoundError:
                continue
            keys[fd] = v.key
            if v.reason:
                self.blockers.append(v.reason)
                continue
            info = read_fdinfo(pid, fd)
            fid = self._same_as(pid, fd, v.key)
            if fid is None:
                fid = self._add(pid, fd, v, info.flags & ~files.O_CLOEXEC, info.pos)
            out.append(OpenFile(fd=fd, fid=fid, cloexec=bool(info.flags & files.O_CLOEXEC)))
        return out


@dataclass
class Part:
    """One process of a snapshot: its record and the stopped fork holding its pages."""
    task: Task
    child: Tracee                 # the stopped fork holding the COW pages
    copies: list[tuple[int, bytearray]] = field(default_factory=list)   # non-COW areas
    # /proc/PID/maps of the process at the snapshot moment (the fast rollback's layout check)
    maps: list = field(default_factory=list)
    # (start, end) spans that may differ from the snapshot now, as far as the
    # write tracker of the process has told (WriteTrackers); None: not known
    # (no tracker, or its count was lost): the next rollback is a full one
    written: list[tuple[int, int]] | None = None
    why_full: str = "no write tracker"     # why written is None
    # tid -> kind -> inode: the namespaces of each thread at the snapshot
    ns: dict[int, dict[str, int]] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.task.pid

    @property
    def starttime(self) -> int:
        return self.task.starttime


@dataclass
class Snapshot:
    crid: str
    pid: int                      # the root of the snapshotted tree
    uid: int                      # owner of the process (who may use the crid, with root)
    starttime: int
    taken: float                  # time.time()
    frozen_seconds: float
    seconds: float
    parts: list[Part]             # the root first, parents before children
    table: SnapTable
    shm: list[ShmObject]
    mapped: list = field(default_factory=list)   # memfd/unlinked objects only mapped
    zombies: list = field(default_factory=list)  # zombie children in the tree
    tracer_tid: int = 0
    early_smaps: dict = field(default_factory=dict)   # pid -> smaps read before the freeze (take)
    extra: dict = field(default_factory=dict)   # the agent's bookkeeping
    ipc: object = None            # SysvIpc kept at snapshot time (segments, semaphores, queues)
    ipc_own: bool = False         # the tree has an ipc namespace of its own (`lcr run --ipc`)
    ns: Namespaces | None = None  # of an `lcr run` tree's own (written back, as checkpoint)

    @property
    def task(self) -> Task:
        return self.parts[0].task

    @property
    def child(self) -> Tracee:
        return self.parts[0].child

    @property
    def copies(self) -> list[tuple[int, bytearray]]:
        return self.parts[0].copies

    def children(self) -> list[int]:
        return [p.child.pid for p in self.parts]

    def alive(self) -> bool:
        return all(_alive(p.child.pid) for p in self.parts)

    def copied_bytes(self) -> int:
        return sum(len(b) for p in self.parts for _, b in p.copies)

    def held(self) -> int:
        """Private pages the snapshot children hold (they differ from the live
        processes now, or these are gone) plus the copy of the non-COW areas."""
        return sum(_private_dirty(p.child.pid) for p in self.parts) + self.copied_bytes()

    def info(self) -> dict:
        return dict(crid=self.crid, pid=self.pid, uid=self.uid, time=self.taken,
                    frozen_seconds=round(self.frozen_seconds, 6), seconds=round(self.seconds, 6),
                    held=self.held(), child=self.child.pid, threads=1 + len(self.task.threads),
                    processes=len(self.parts), pids=[p.pid for p in self.parts],
                    children=self.children(),
                    fast_rollback=all(p.written is not None for p in self.parts),
                    writeback_ok=not self.table.blockers, blockers=list(self.table.blockers))


# --- write trackers: what changed since each snapshot --------------------------
#
# One tracker (resources/dirty.py: userfaultfd write-protect, async) per
# process, shared by every snapshot of that process and by the agent's
# `--track` tracker of incremental checkpoints: a second userfaultfd cannot
# register the areas the first one holds (EBUSY), so there is only ever one.
#
# A collect() resets the count, so no snapshot can own the count: every
# collect (a new snapshot, a rollback) is folded into ``Part.written`` of
# EVERY live snapshot of the process.  ``Part.written`` is thus "every span
# that may differ from this snapshot", kept exact for all snapshots, old
# and new, at the cost of a merge per collect.  (The other choice, the fast
# path for the newest snapshot only, would make a rollback to an older
# snapshot -- the usual "undo the last few steps" -- full again.)
#
# After a rollback to S the process equals S: S.written = [] and what the
# rollback changed is folded into every other snapshot of the process.
#
# An incremental checkpoint's count (``epoch``, the id of the image it counts
# from) is kept the same way: ``since_epoch`` gathers what the agent reset
# since; handed back with the tracker (tracker_take with_written) or, to a
# caller that does not take it, by giving the tracker back with epoch ""
# (the checkpoint then compares contents: correct, slower).  Lent to a
# checkpoint, the tracker is reset there: the snapshots keep their count
# only if it comes back with what that checkpoint collected
# (tracker_put written=...); otherwise their next rollback is a full one.

Span = tuple[int, int]
UFFD_VMFLAGS = frozenset({"uw", "um", "ui"})   # set by a userfaultfd registration, not by the process


_merge = runs.normalize     # span lists: image/runs.py


@dataclass
class Tracked:
    """The write tracker of one process, and who counts with it."""
    pid: int
    starttime: int
    uid: int
    fd: int = -1                   # its userfaultfd, handed in (--track), not opened as a Tracker yet
    tracker: object | None = None  # dirty.Tracker
    epoch: str | None = None       # an incremental checkpoint counts from this image id; None: none does
    since_epoch: list[Span] = field(default_factory=list)   # spans reset here since the epoch
    epoch_lost: bool = False       # ... or the count since the epoch is lost altogether
    lent: bool = False             # handed to a checkpoint (tracker_take), not back yet
    parts: list[Part] = field(default_factory=list)        # live snapshots of the process
    since: float = field(default_factory=time.time)
    failed: str = ""

    def live(self):
        """The Tracker, opened from the handed-in fd if need be; None if none works."""
        if self.tracker is None and self.fd >= 0 and not self.lent:
            from linuxcr.resources import dirty
            fd, self.fd = self.fd, -1
            try:
                self.tracker = dirty.Tracker.adopt(self.pid, fd)
            except LcrError as e:
                self.failed = str(e)
                self.lose(f"the write tracker handed in cannot be used ({e})")
        return self.tracker

    def collect(self, *, skip: Part | None = None):
        """Read and reset what the tracker counted; folded into every
        snapshot of the process but ``skip``, and into the incremental
        count.  The process is frozen.  None if there is no working tracker
        (the snapshots then lose their count)."""
        tr = self.live()
        if tr is None:
            return None
        try:
            d = tr.collect(reset=True)
        except LcrError as e:
            self.failed = str(e)
            self.close(f"write tracking failed ({e})")
            return None
        spans = d.spans()
        self.fold(spans, skip=skip)
        return d

    def fold(self, spans: list[Span], *, skip: Part | None = None) -> None:
        if not spans:
            return
        for p in self.parts:
            if p is not skip and p.written is not None:
                p.written = _merge(p.written + spans)
        if self.epoch is not None:
            self.since_epoch = _merge(self.since_epoch + spans)

    def lose(self, why: str) -> None:
        for p in self.parts:
            if p.written is not None:
                p.written, p.why_full = None, why
        self.epoch_lost = self.epoch is not None

    def lend(self) -> int:
        """Hand the userfaultfd out (the caller owns the fd returned);
        the snapshots' count is suspended until it comes back."""
        if self.tracker is not None:
            fd, self.tracker.uffd = self.tracker.uffd, -1
            self.tracker.close()              # our pagemap fd only now
            self.tracker = None
        else:
            fd, self.fd = self.fd, -1
        self.lent = True
        return fd

    def close(self, why: str = "the write tracker was closed") -> None:
        self.lose(why)
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def held(self) -> bool:
        return self.tracker is not None or self.fd >= 0

    def info(self) -> dict:
        return dict(pid=self.pid, starttime=self.starttime, epoch=self.epoch or "", uid=self.uid,
                    since=self.since, snapshots=len(self.parts), lent=self.lent)


class WriteTrackers:
    """pid -> Tracked: the write trackers a holder (the agent) keeps."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.by_pid: dict[int, Tracked] = {}
        if enabled is None:
            enabled = os.environ.get("LCR_SNAPSHOT_TRACK", "1") != "0"
        self.enabled = enabled

    def get(self, pid: int, starttime: int | None = None) -> Tracked | None:
        tr = self.by_pid.get(pid)
        if tr is not None and starttime is not None and tr.starttime != starttime:
            return None
        return tr

    def drop(self, pid: int, why: str = "the write tracker was closed") -> None:
        tr = self.by_pid.pop(pid, None)
        if tr is not None:
            tr.close(why)

    def on_snapshot(self, fz: Frozen, task: Task) -> tuple[Tracked | None, str]:
        """While frozen, at the snapshot moment: the tracker of the process
        reset (what it counted folded into the older snapshots), or started.
        (Tracked, "") or (None, why not)."""
        pid = task.pid
        if not self.enabled:
            return None, "write tracking is off (LCR_SNAPSHOT_TRACK=0)"
        tr = self.by_pid.get(pid)
        if tr is not None and tr.starttime != task.starttime:
            self.drop(pid, "the process is gone")
            tr = None
        if tr is not None:
            if tr.lent:
                return None, "its write tracker is lent to an incremental checkpoint"
            if tr.collect() is not None:
                return tr, ""
            if tr.held() or tr.parts or tr.epoch is not None:
                return None, tr.failed or "its write tracker does not work"
            self.by_pid.pop(pid, None)
        from linuxcr.resources import dirty
        ok, why = dirty.available(pid)
        if not ok:
            return None, why
        t = fz.leader
        fz.block_signals()
        try:
            with t.scratch() as addr:
                tracker = dirty.Tracker.start(t, Arena(t, addr, PAGE))
        except LcrError as e:
            return None, f"cannot track its writes ({e})"
        finally:
            fz.unblock_signals()
        tr = Tracked(pid=pid, starttime=task.starttime, uid=os.stat(f"/proc/{pid}").st_uid,
                     tracker=tracker)
        self.by_pid[pid] = tr
        return tr, ""

    def forget(self, part: Part) -> None:
        """A snapshot goes: its count is no longer kept; a tracker nobody
        wants any more is closed (its areas lose their `uw` flag)."""
        tr = self.by_pid.get(part.pid)
        if tr is None or tr.starttime != part.starttime:
            return
        tr.parts = [p for p in tr.parts if p is not part]
        if not tr.parts and tr.epoch is None and not tr.lent:
            self.drop(part.pid)

    def close(self) -> None:
        for pid in list(self.by_pid):
            self.drop(pid)


def _alive(pid: int) -> bool:
    try:
        return read_stat(pid).state not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def _private_dirty(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Private_Dirty:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


# --- take -------------------------------------------------------------------

def _fd_reason(r: str) -> bool:
    """A reason about one fd: a snapshot is still good for rollback (writeback refuses)."""
    return r.startswith("fd ")


def _snapshot_keeps(r: str) -> bool:
    """A reason of check_process that does not stop a snapshot: about one fd
    (see _fd_reason), or a System V segment attached (its content is kept
    with the snapshot's IPC, Snapshot.ipc)."""
    return not _fd_reason(r) and not dump.checkpoint_saves(r)


def _SnapTree(root: int, exclude: frozenset[int] | set[int] = frozenset()) -> dump.FrozenTree:
    """The tree as dump freezes it, the snapshot children left out (those of
    its earlier snapshots: traced by us, or named so if the agent died)."""
    me = os.getpid()
    exclude = set(exclude)
    return dump.FrozenTree(root, skip=lambda k: k in exclude or _traced_by(k, me)
                           or dump.snapshot_child(k))


def _traced_by(pid: int, tracer: int) -> bool:
    try:
        return read_status(pid).tracer_pid == tracer
    except (FileNotFoundError, ProcessLookupError):
        return False


def tree_pids(root: int, exclude: frozenset[int] | set[int] = frozenset()) -> dict[int, int]:
    """pid -> starttime of the live (non-zombie) processes of the tree now,
    snapshot children left out."""
    me, out, queue = os.getpid(), {}, [root]
    while queue:
        p = queue.pop(0)
        if p in out or p in exclude or pstree.is_zombie(p) or (p != root and _traced_by(p, me)):
            continue
        try:
            out[p] = read_stat(p).starttime
        except (FileNotFoundError, ProcessLookupError):
            continue
        queue += pstree.children(p)
    return out


def take(pid: int, *, crid: str | None = None, exclude: frozenset[int] | set[int] = frozenset(),
         trackers: WriteTrackers | None = None) -> Snapshot:
    """Snapshot process ``pid`` and all its descendants (every thread of
    each); they run on afterwards.  ``exclude``: pids never to take in (the
    snapshot children of earlier snapshots).

    /proc/PID/smaps walks every page (60 ms at 4 GiB): it is read before
    the freeze, and while frozen only the cheap /proc/PID/maps is compared
    with it.  The VmFlags could still change with the layout unchanged
    (madvise over a whole area) in that window: after the thaw they are
    read again, and if an area's flags differ the snapshot is taken again
    with smaps read frozen.

    ``trackers``: the write trackers of the holder (the agent): each
    process's tracker is started or reset at the snapshot moment, so that a
    rollback can copy back only what was written since (rollback)."""
    snap = _take(pid, crid, exclude, early=True, trackers=trackers)
    if _flags_still(snap):
        return snap
    discard(snap, trackers)
    return _take(pid, crid, exclude, early=False, trackers=trackers)


def _take(pid: int, crid: str | None, exclude, early: bool,
          trackers: WriteTrackers | None = None) -> Snapshot:
    t0 = time.monotonic()
    if pid == os.getpid():
        raise NotCheckpointable(pid, ["lcr cannot snapshot itself"])
    pre = _smaps_now(pid, exclude) if early else {}
    reasons = [r for r in dump.check_process(pid, pre.get(pid)) if _snapshot_keeps(r)]
    if reasons:
        raise NotCheckpointable(pid, reasons)
    owner = os.stat(f"/proc/{pid}").st_uid
    tree = _SnapTree(pid, exclude)
    frozen_at = time.monotonic()
    parts: list[Part] = []
    counting: list[tuple[Tracked, Part]] = []
    try:
        tree.freeze()
        smaps = tree.checked(lambda p: _smaps_frozen(p, pre), keep=_snapshot_keeps)
        table = SnapTable()
        tasks = [dump.collect_task(tree.procs[p], smaps[p], table, tree.files_with.get(p))
                 for p in tree.order]
        shm, vmas = memory.shm_objects([t.vmas for t in tasks])
        tasks = [msgspec.structs.replace(t, vmas=[_no_uffd(x) for x in v]) for t, v in zip(tasks, vmas)]
        mapped = memory.mapped_objects(pid, [(t.pid, t.vmas) for t in tasks], table.descs)
        ipc_own = namespaces.own_ipc(pid, tasks[0].pidns_init)
        ns = namespaces.dump(pid, tasks[0].pidns_init)
        table.blockers += namespaces.check_saved(ns, table.descs, tasks)
        ipcs = sysvipc.dump(pid, tasks, ipc_own)     # content copied now (frozen)
        for task in tasks:
            fz = tree.procs[task.pid]
            copies = memory.copy_not_cow(fz.leader, task.vmas)
            part = Part(task=task, child=snapshot_child.fork(fz, sibling=task.pid == pid), copies=copies,
                        maps=[e.map for e in smaps[task.pid]],
                        ns={tid: namespaces.task_inodes(task.pid, tid) for tid in fz.threads})
            parts.append(part)
            if trackers is not None:
                tr, part.why_full = trackers.on_snapshot(fz, task)
                if tr is not None:
                    counting.append((tr, part))
    except BaseException:
        for part in parts:
            _kill_and_reap(part)
        if trackers is not None:
            for tr, _part in counting:
                if not tr.parts and tr.epoch is None and not tr.lent:
                    trackers.drop(tr.pid)
        tree.thaw()
        raise
    tree.thaw()
    for tr, part in counting:          # counted from the snapshot moment on
        part.written, part.why_full = [], ""
        tr.parts.append(part)
    frozen = time.monotonic() - frozen_at
    root = parts[0].task
    snap = Snapshot(crid=crid or secrets.token_hex(5), pid=pid, uid=owner,
                    starttime=root.starttime, taken=time.time(), frozen_seconds=frozen,
                    seconds=time.monotonic() - t0, parts=parts, table=table, shm=shm,
                    mapped=mapped, zombies=list(tree.zombies), tracer_tid=_gettid(), ipc=ipcs,
                    ipc_own=ipc_own, ns=ns)
    snap.early_smaps = {p: smaps[p] for p in tree.order if pre.get(p) is smaps[p]}
    return snap


def _smaps_now(root: int, exclude) -> dict:
    """smaps of the tree's processes, read while they run."""
    out = {}
    queue = [root]
    while queue:
        p = queue.pop(0)
        if p in out or p in exclude:
            continue
        try:
            out[p] = read_smaps(p)
            queue += pstree.children(p)
        except (OSError, LcrError):
            if p == root:
                raise NoSuchProcess(f"pid {root}: no such process") from None
    return out


def _smaps_frozen(p: int, pre: dict):
    """The smaps read before the freeze if the layout is still the same."""
    got = pre.get(p)
    if got is not None and [e.map for e in got] == read_maps(p):
        return got
    return read_smaps(p)


def _flags_still(snap: Snapshot) -> bool:
    """After the thaw: the VmFlags of the areas read before the freeze are
    still those (so they were at the freeze).  An area changed since cannot
    be checked: then False too, and the snapshot is taken again."""
    for p, before in snap.early_smaps.items():
        try:
            now = {e.map: e.vmflags for e in read_smaps(p)}
        except OSError:
            return False
        if any((now.get(e.map) or frozenset()) - UFFD_VMFLAGS != e.vmflags - UFFD_VMFLAGS
               for e in before):
            return False
    return True


def _no_uffd(v: Vma) -> Vma:
    """The area without the VmFlags of a userfaultfd registration (ours)."""
    if UFFD_VMFLAGS.isdisjoint(v.vmflags):
        return v
    return msgspec.structs.replace(v, vmflags=[f for f in v.vmflags if f not in UFFD_VMFLAGS])


def _gettid() -> int:
    return threading.get_native_id()


def discard(snap: Snapshot, trackers: WriteTrackers | None = None) -> None:
    for part in snap.parts:
        if trackers is not None:
            trackers.forget(part)
        part.written, part.why_full = None, "discarded"
        _kill_and_reap(part)
        part.copies = []


def _kill_and_reap(part: Part) -> None:
    """Kill a snapshot child; if it was a child of the target with no exit
    signal (a process inside a tree), nobody would reap it: the target
    does, by an injected wait4(__WALL)."""
    cpid = part.child.pid
    snapshot_child.kill(part.child)
    try:
        st = read_stat(cpid)
    except (FileNotFoundError, ProcessLookupError):
        return
    if st.state != "Z" or st.ppid != part.task.pid:
        return
    try:
        if read_stat(part.task.pid).starttime != part.task.starttime:
            return
        snapshot_child.reap_in(part.task.pid, cpid)
    except (LcrError, OSError) as e:
        import sys
        print(f"lcr: snapshot process {cpid} left a zombie of pid {part.task.pid}: {e}",
              file=sys.stderr)     # it stays one until its parent exits


# --- writeback ---------------------------------------------------------------

def writeback(snap: Snapshot, fd: int, *, compress: bool = False, name: str = "image",
              progress=None) -> dict:
    """A normal image of the process as it was at the snapshot moment."""
    t0 = time.monotonic()
    if snap.table.blockers:
        raise NotCheckpointable(snap.pid, snap.table.blockers)
    if not snap.alive():
        raise LcrError(f"snapshot {snap.crid}: its snapshot process is gone", "take a new snapshot")
    # the files' identity as checkpoint records it: of the inodes mapped at
    # the snapshot, which the snapshot processes map still (forks: same places)
    ids = exe_identity.collect([msgspec.structs.replace(p.task, pid=p.child.pid) for p in snap.parts])
    tree = Tree(root=snap.pid, files=snap.table.descs, pipes=snap.table.pipe_list(),
                unix=snap.table.unix_list(), shm=snap.shm, mapped=snap.mapped,
                zombies=snap.zombies, ipc=snap.ipc, ns=snap.ns, identities=ids)
    def work():
        for part in snap.parts:
            normal = [v for v in part.task.vmas if v.pages and not memory.not_cow(v)]
            for addr, n in memory.page_runs(part.child.pid, normal):
                yield part.pid, part.child, [(addr, n * PAGE)]

    def pages(w: ImageWriter) -> None:
        for pid, pieces, view in memory.read_ahead(work()):
            w.page_run(pid, pieces[0][0], view)
            if progress:
                progress(len(view))
        for part in snap.parts:
            for addr, buf in part.copies:
                for off in range(0, len(buf), memory.CHUNK):
                    w.page_run(part.pid, addr + off, memoryview(buf)[off:off + memory.CHUNK])

    w = dump.write_image(fd, snap.pid, [p.task for p in snap.parts], tree, pages,
                         compress=compress, name=name)
    return dict(pages=w.pages, bytes=w.bytes_written, seconds=time.monotonic() - t0,
                processes=len(snap.parts))


# --- rollback -----------------------------------------------------------------

def rollback(snap: Snapshot, *, memory_only: bool = False, trackers: WriteTrackers | None = None,
             full: bool = False, keep_fds: tuple[int, ...] = (), record=None) -> dict:
    """Bring the live process (or tree: the same processes, same pids) back
    to the snapshot.

    Memory: the fast path (the layout is the same as at the snapshot and the
    write tracker counted since) copies back only the pages written since,
    the pages dropped since, and the areas not tracked or shared, and drops
    the pages that appeared since; otherwise (or ``full``) the whole address
    space is rebuilt and every page copied.  The result says which was taken
    (``path``: fast | full | mixed for a tree; ``processes``: per process).

    Kill-safe (docs/guarantees.md): a guardian forked for this rollback
    (holding the snapshot in its copy of our memory; ``keep_fds`` stay open
    in it) puts the processes back if we die before the first change, and
    finishes the rollback by the full path if we die after it.  ``record``
    (state: str): told "begun" at the first change, "done" when complete."""
    t0 = time.monotonic()
    pid = snap.pid
    _check_same_tree(snap)
    if not snap.alive():
        raise LcrError(f"snapshot {snap.crid}: its snapshot process is gone", "take a new snapshot")
    for part in snap.parts:
        _precheck_files(part.task)
    tree = _SnapTree(pid, set(snap.children()))
    try:
        tree.freeze()
        if sorted(tree.order) != sorted(p.pid for p in snap.parts):
            _check_same_tree(snap)        # changed as we froze it: says how
            raise RollbackRefused(f"cannot roll back pid {pid}: its tree changed while it was frozen")
        pairs = {part.pid: _pair_threads(tree.procs[part.pid], part.task) for part in snap.parts}
        if not memory_only:
            for part in snap.parts:
                _precheck_attrs(snap, part, pairs[part.pid])
        _ipc_again(snap, memory_only)
    except BaseException:
        tree.thaw()
        raise
    faults.point("rollback.frozen")
    frozen_at = time.monotonic()
    journal = None
    try:
        # the guardian, then our safety net in every thread, then the children
        # free to outlive us (parked: see resources/snapshot_child.py)
        journal = guardian.start(lambda procs, begun: _after_death(snap, memory_only, procs, begun,
                                                                   record),
                                 keep=keep_fds)
        if record is not None:
            record("held", journal.guardian_pid)
        for part in snap.parts:
            tree.procs[part.pid].hold(journal)
        for part in snap.parts:
            snapshot_child.loosen(part.child)
        if not memory_only:
            _precheck_securebits(snap, tree, pairs)
    except BaseException:
        _own_children(snap)
        tree.thaw()
        if journal is not None:
            journal.close()
        raise
    per: list[dict] = []
    warnings: list[str] = []
    try:
        if record is not None:
            record("begun")
        journal.begin(pid)
        faults.point("rollback.begun")
        for part in snap.parts:
            fz = tree.procs[part.pid]
            per.append(_rollback_frozen(snap, part, fz, pairs[part.pid], memory_only, warnings,
                                        trackers, full))
        if not memory_only:
            warnings += _refill_pipes(snap)
            sysvipc.put_back(pid, snap.ipc)
            warnings += sysvipc.created_since(pid, snap.ipc, snap.ipc_own, tree.order)
            warnings += _hostname_back(snap)
        faults.point("rollback.finished")
        for p in tree.order:
            tree.procs[p].settle()
        journal.done(pid)
        faults.point("rollback.done")
        _own_children(snap)
    except BaseException as e:
        # address spaces may be half rebuilt: the processes cannot go on
        for p in tree.order:
            tree.procs[p].send_kill()
            for th in tree.procs[p].threads.values():
                th.detach()
        _own_children(snap)
        journal.close()
        what = f"pid {pid}" if len(snap.parts) == 1 else f"the tree of pid {pid}"
        killed = "the process was killed" if len(snap.parts) == 1 else "its processes were killed"
        if isinstance(e, LcrError):
            raise RestoreError(f"rollback of {what} failed midway ({e}); {killed}") from None
        raise RestoreError(f"rollback of {what} failed midway ({type(e).__name__}: {e}); "
                           f"{killed}") from None
    tree.thaw()
    journal.close()
    if record is not None:
        record("done")
    gone = [z.pid for z in snap.zombies if not pstree.is_zombie(z.pid)]
    if gone:
        warnings.append(f"zombie child(ren) {', '.join(map(str, gone))} of the snapshot were reaped "
                        "since: they cannot come back")
    paths = {r["path"] for r in per}
    return dict(pid=pid, seconds=time.monotonic() - t0, frozen_seconds=time.monotonic() - frozen_at,
                warnings=warnings, memory_only=memory_only, processes=len(snap.parts),
                path=paths.pop() if len(paths) == 1 else "mixed",
                pages_copied=sum(r["pages_copied"] for r in per),
                pages_dropped=sum(r["pages_dropped"] for r in per), per_process=per)


def _own_children(snap: Snapshot) -> None:
    """EXITKILL back on every snapshot child we still hold."""
    for part in snap.parts:
        try:
            snapshot_child.own(part.child)
        except OSError:
            pass          # it died: the agent's reaper forgets the snapshot


# --- the rollback's guardian, after our death ---------------------------------------
#
# It runs in the guardian process (a fork of the agent made right before the
# rollback: it holds ``snap`` in its memory); the agent is dead.  Not begun:
# the processes are put back as the journal says (remote/guardian.py).
# Begun: whatever instant we died at, every thread is held (a SIGSTOP
# pending, or parked in pause() with every signal blocked) and the snapshot
# children are parked and alive (EXITKILL dropped): the rollback is done
# again from the start by the full path, which rewrites the whole state
# from the snapshot and so does not care what was done already.  Either way
# the snapshot children go (the agent that knew the crid is gone).

def _after_death(snap: Snapshot, memory_only: bool, procs: dict, begun: bool, record) -> str:
    if begun:
        if record is not None:
            record(f"completing by guardian {os.getpid()}")
        what = _complete(snap, memory_only, procs)
    else:
        what = "; ".join(filter(None, (guardian.recover(p) for p in procs.values())))
        what = "the rollback had not begun: " + (what or "nothing to put back")
        for part in snap.parts:
            # our copy of the agent's Tracee: its fds are closed here, it traces nothing
            part.child = Tracee(part.child.pid)
    for part in snap.parts:
        if snapshot_child.is_snapshot_child(part.child.pid):
            _kill_and_reap(part)
    if record is not None:
        record("done")
    return what


def _complete(snap: Snapshot, memory_only: bool, procs: dict) -> str:
    for part in snap.parts:
        guardian.wait_untraced(part.pid)
        guardian.wait_untraced(part.child.pid)
    for part in snap.parts:
        child = snapshot_child.adopt(part.child.pid, part.child.insn)
        if child is None:
            raise LcrError(f"snapshot process {part.child.pid} is gone: pid {part.pid} stays held "
                           "half rolled back; kill it")
        part.child = child
    frozen: dict[int, Frozen] = {}
    try:
        for part in snap.parts:
            fz = frozen[part.pid] = Frozen(part.pid)
            fz.freeze()
            fz.hold(None)
        warnings: list[str] = []
        for part in snap.parts:
            fz = frozen[part.pid]
            _rollback_frozen(snap, part, fz, _pair_threads(fz, part.task), memory_only, warnings,
                             None, True)
        if not memory_only:
            _refill_pipes(snap)
            try:
                sysvipc.put_back(snap.pid, snap.ipc)
            except (OSError, LcrError):
                pass     # an object removed meanwhile: its memory is back all the same
            _hostname_back(snap)
        for fz in frozen.values():
            fz.settle()
    except BaseException:
        for fz in frozen.values():       # let them go held: they never run in a half state
            for t in fz.threads.values():
                t.detach()
        raise
    for fz in frozen.values():
        fz.thaw()
    for part in snap.parts:
        # let go, a thread of a group-stopped process stops again, later:
        # whether it did cannot be seen yet; SIGCONT unless it was stopped before
        p = procs.get(part.pid)
        if p is not None and not p.stopped:
            os.kill(part.pid, signal.SIGCONT)
    return f"the rollback to snapshot {snap.crid} it had begun was completed (full path)"


def _check_same_tree(snap: Snapshot) -> None:
    """The live tree must hold the same processes as the snapshot."""
    pid = snap.pid
    try:
        same = read_stat(pid).starttime == snap.starttime
    except (FileNotFoundError, ProcessLookupError):
        same = False
    if not same:
        raise NoSuchProcess(f"pid {pid}: the process snapshot {snap.crid} was taken of has exited",
                            "use lcr writeback and lcr restart instead")
    now = tree_pids(pid, set(snap.children()))
    was = {p.pid: p.starttime for p in snap.parts}
    added = sorted(p for p in now if was.get(p) != now[p])
    removed = sorted(p for p in was if now.get(p) != was[p])
    if added or removed:
        why = [f"pid {p} was created since the snapshot" for p in added]
        why += [f"pid {p} has exited since the snapshot" for p in removed]
        raise RollbackRefused(f"cannot roll back the tree of pid {pid}: {'; '.join(why)}",
                              "a rollback needs the same processes as the snapshot; "
                              "use lcr writeback and lcr restart instead")


def _refill_pipes(snap: Snapshot) -> list[str]:
    """Pipes with both ends inside the snapshot's processes get back the
    bytes they held at the snapshot moment (what is in them now is thrown
    away).  Pipes to the outside are left as they are: bytes already read
    out there cannot be taken back."""
    ends: dict[int, set[int]] = {}
    for d in snap.table.descs:
        if d.kind == "pipe":
            ends.setdefault(d.pipe, set()).add(d.flags & os.O_ACCMODE)
    descs = {d.fid: d for d in snap.table.descs}
    holders: dict[int, tuple[int, int, tuple[int, int]]] = {}    # ino -> (pid, fd, key)
    for part in snap.parts:
        keys = snap.table.keys.get(part.pid, {})
        for f in part.task.files:
            d = descs.get(f.fid)
            if d is not None and d.kind == "pipe" and f.fd in keys:
                holders.setdefault(d.pipe, (part.pid, f.fd, keys[f.fd]))
    warnings = []
    for pd in snap.table.pipe_list():
        if not {os.O_RDONLY, os.O_WRONLY} <= ends.get(pd.ino, set()) or pd.ino not in holders:
            continue
        pid, fd, key = holders[pd.ino]
        if finish.fd_key(pid, fd) != key:
            warnings.append(f"pipe:[{pd.ino}]: no longer at fd {fd} of pid {pid}; its bytes were not put back")
            continue
        try:
            f = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            warnings.append(f"pipe:[{pd.ino}]: cannot open it ({e.strerror}); its bytes were not put back")
            continue
        try:
            while True:
                try:
                    if not os.read(f, 1 << 16):
                        break
                except BlockingIOError:
                    break
            data = memoryview(pd.data)
            while data:
                data = data[os.write(f, data):]
        except BlockingIOError:
            warnings.append(f"pipe:[{pd.ino}]: full before all its {len(pd.data)} bytes were put back")
        finally:
            os.close(f)
    return warnings


def _hostname_back(snap: Snapshot) -> list[str]:
    """The hostname of an `lcr run --hostname` tree's own uts namespace, as
    restart sets it (mounts and their files are left as they are now)."""
    ns = snap.ns
    if ns is None or "uts" not in ns.kinds:
        return []
    try:
        namespaces.restore(snap.pid, msgspec.structs.replace(ns, mounts=[]))
    except LcrError as e:
        return [f"hostname not rolled back: {e.message}"]
    return []


def _ipc_again(snap: Snapshot, memory_only: bool) -> None:
    """Tree frozen, before any change: the System V objects the snapshot
    kept and removed since, made again with their ids; refused (by name)
    when one cannot be."""
    if memory_only:
        return
    try:
        sysvipc.make_again(snap.pid, snap.ipc)
    except RestoreError as e:
        raise RollbackRefused(f"cannot roll back pid {snap.pid}: {e.message}",
                              "remove what holds the id or key (ipcrm), or roll back with "
                              "--memory-only") from None


def _precheck_files(task: Task) -> None:
    """Everything the rebuilt address space maps must still exist."""
    for v in task.vmas:
        if v.kind == "file" and not os.access(v.path, os.R_OK):
            raise RollbackRefused(f"cannot roll back pid {task.pid}: {v.path} (mapped at "
                                  f"0x{v.start:x}) is gone or unreadable")


def _process_changed(snap: Snapshot, part: Part) -> list[str]:
    """What of the process changed since the snapshot that a rollback cannot
    give back: its session (setsid() cannot be undone), a file lock it held
    then that another owner holds now, its root directory (a chroot: the
    snapshot process still holds the saved one)."""
    task, out = part.task, []
    st = read_status(task.pid)
    if task.sid and st.ns_sid and st.ns_sid[-1] != task.sid:
        out.append(f"session ({st.ns_sid[-1]} now, {task.sid} at the snapshot: a process cannot "
                   "go back to a session it left)")
    same = {fd for fd, key in snap.table.keys.get(task.pid, {}).items() if finish.fd_key(task.pid, fd) == key}
    out += locks.taken_since(task.pid, task.locks, same)
    was = finish.path_key(f"/proc/{part.child.pid}/root")
    if was is not None and finish.path_key(f"/proc/{task.pid}/root") != was:
        out.append(f"root directory (chroot since the snapshot; it was {task.root})")
    return out


def _precheck_attrs(snap: Snapshot, part: Part, pairs) -> None:
    """Refuse, before anything changes, a rollback that would leave the
    process silently different: see security.changed_since and _process_changed;
    a thread in namespaces it left since (unshare, setns) is refused too."""
    task = part.task
    why = _process_changed(snap, part)
    if why:
        raise RollbackRefused(f"cannot roll back pid {task.pid}: changed since the snapshot: "
                              f"{'; '.join(why)}",
                              "a process cannot get these back; use lcr writeback and lcr "
                              "restart instead")
    for live, saved in pairs:
        was = part.ns.get(saved.tid if saved is not task else task.pid) or part.ns.get(task.pid)
        kinds = namespaces.moved(task.pid, live.pid, was) if was else []
        why = [f"namespaces {', '.join(kinds)} (left since the snapshot: unshare or setns "
               "cannot be undone from outside)"] if kinds else []
        why += security.changed_since(task.pid, live.pid, saved.attrs, task.creds)
        if why:
            who = f"pid {task.pid}" if live.pid == task.pid else f"thread {live.pid} of pid {task.pid}"
            raise RollbackRefused(f"cannot roll back {who}: changed since the snapshot: "
                                  f"{'; '.join(why)}",
                                  "a process cannot get these back; use lcr writeback and lcr "
                                  "restart (as root) instead")


def _precheck_securebits(snap: Snapshot, tree, pairs) -> None:
    """Threads guarded, before any change: securebits changed since that
    cannot be set back refuse the rollback (read by an injected prctl:
    /proc does not show them)."""
    for part in snap.parts:
        fz = tree.procs[part.pid]
        insn = _vdso_insn(fz.leader, part.task.vmas)
        for live, saved in pairs[part.pid]:
            live.insn = insn
            why = security.securebits_stuck(live, saved.attrs.securebits) if saved.attrs else ""
            if why:
                who = f"pid {part.pid}" if live.pid == part.pid else f"thread {live.pid} of pid {part.pid}"
                raise RollbackRefused(f"cannot roll back {who}: changed since the snapshot: {why}",
                                      "a process cannot get these back; use lcr writeback and "
                                      "lcr restart instead")


def _pair_threads(fz: Frozen, task: Task) -> list[tuple[Tracee, object]]:
    """(live thread, its saved state); the same tids, or at least as many."""
    saved = [task] + list(task.threads)
    live = [fz.leader] + fz.others()
    if len(live) != len(saved):
        raise RollbackRefused(f"cannot roll back pid {task.pid}: it has {len(live)} threads now, "
                              f"the snapshot {len(saved)}",
                              "rollback needs the same number of threads")
    by_tid = {t.pid: t for t in live}
    if all(s.tid in by_tid for s in saved):
        return [(by_tid[s.tid], s) for s in saved]
    return list(zip(live, [task] + sorted(task.threads, key=lambda th: th.tid)))


def _vdso_insn(t: Tracee, vmas: list[Vma]) -> int:
    text = memory.vdso_text(vmas)
    if text:
        at = t.read(text[0], text[1] - text[0]).find(b"\x0f\x05")
        if at >= 0:
            return text[0] + at
    raise RollbackRefused(f"cannot roll back pid {t.pid}: no vDSO to run system calls from")


def _fast_why(part: Part, tracked: Tracked | None) -> str:
    """Why the fast path cannot be taken for this process ("" if it can):
    its snapshot must have been counted by a tracker since, and the layout
    (/proc/PID/maps: every area's start, end, permissions, private/shared,
    offset, device, inode and path) must be the one of the snapshot."""
    if part.written is None:
        return part.why_full or "no write tracker"
    if tracked is None or tracked.lent or not tracked.held():
        return "its write tracker is " + ("lent to an incremental checkpoint" if tracked is not None
                                          and tracked.lent else "gone")
    now = read_maps(part.pid)
    if now != part.maps:
        was = {(m.start, m.end): m for m in part.maps}
        diff = next((m for m in now if was.get((m.start, m.end)) != m), None)
        where = f" (0x{diff.start:x}-0x{diff.end:x} {diff.path or 'anonymous'})" if diff else ""
        return f"its memory layout changed since the snapshot{where}"
    return ""


def _rollback_frozen(snap: Snapshot, part: Part, fz: Frozen, pairs, memory_only: bool,
                     warnings: list[str], trackers: WriteTrackers | None = None,
                     full: bool = False) -> dict:
    pid, task, t = part.pid, part.task, fz.leader
    tracked = trackers.get(pid, part.starttime) if trackers is not None else None
    why = "asked for" if full else _fast_why(part, tracked)
    if not why and tracked.collect() is None:     # folded into part.written (and the others')
        why = part.why_full or "write tracking failed"
    now = None
    if why:
        now = memory.collect(read_smaps(pid))
        if [(v.kind, v.start, v.end) for v in now if v.kind in memory.VDSO_KINDS] != \
                [(v.kind, v.start, v.end) for v in task.vmas if v.kind in memory.VDSO_KINDS]:
            raise RollbackRefused(f"cannot roll back pid {pid}: its vDSO moved since the snapshot")
    insn = _vdso_insn(t, task.vmas)
    for th in fz.threads.values():
        th.insn = insn
    # rseq: the kernel writes into a thread's rseq area on every return to
    # user space (SIGSEGV if unmapped): unregister while we rebuild
    for live, saved in pairs:
        cpu.unregister_rseq(live)
    # scratch space at an address free in both layouts
    gap = memory.free_gap(task.vmas, pid)
    arena = memory.map_trampoline(t, gap, code=False)
    inherited = (lambda st: st.sig_cgt | st.sig_ign)(read_status(pid))

    # the address space and the pages
    res = dict(pid=pid, path="fast", pages_copied=0, pages_dropped=0, reason="")
    touched: list[Span] = []
    if not why:
        warnings += areaflags.guards_back(t, task.vmas, task.guards)   # before pages go in
        try:
            res["pages_copied"], res["pages_dropped"], touched = memory.roll_back_written(
                part.child, t, task.vmas, part.written or [], part.copies)
        except memory.NotFast as e:
            why = str(e)
            now = memory.collect(read_smaps(pid))
    if why:
        res.update(path="full", reason=why, pages_dropped=0,
                   pages_copied=memory.roll_back_all(part.child, t, now, task.vmas, snap.shm,
                                                     part.copies, arena, (gap, gap + memory.TRAMPOLINE)))
        warnings += areaflags.guards_back(t, task.vmas, task.guards)
    # the rest of the task, in the one finish order (resources/finish.py)
    f = finish.Finish(t=t, arena=arena, task=task, tramp=gap, inherited_sigs=inherited,
                      rollback=True, descs=snap.table.descs, threads=list(pairs),
                      fd_keys=snap.table.keys.get(pid, {}), masks=fz.masks,
                      cwd_key=finish.path_key(f"/proc/{part.child.pid}/cwd"))
    warnings += finish.run(f, skip=finish.MEMORY_ONLY if memory_only else frozenset())
    # the process equals the snapshot again: count from here.  What we
    # changed may differ from every other snapshot of the process; the
    # tracker's reset (our own writes) goes to those only.
    if res["path"] == "full":
        touched = [(v.start, v.end) for v in task.vmas if v.pages]
        part.maps = read_maps(pid)            # the layout as rebuilt (shmem comes back as a memfd)
    if tracked is not None:
        tracked.fold(touched, skip=part)
        if not tracked.lent and tracked.collect(skip=part) is not None:
            part.written, part.why_full = [], ""
            if part not in tracked.parts:     # counted from now on (a full rollback of an untracked one)
                tracked.parts.append(part)
    return res


def kill_orphans() -> list[int]:
    """Snapshot processes a dead agent (and its dead guardian) left parked:
    killed (the agent calls this as it starts)."""
    return snapshot_child.kill_orphans()


__all__ = ["kill_orphans", "Snapshot", "take", "writeback", "rollback", "discard", "RollbackRefused"]
